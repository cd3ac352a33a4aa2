"""Read the job's data sets into normalized examples, with a report on rows that do not fit."""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.stages import STAGES
from kubetune.api.v1alpha1 import DatasetSpec
from kubetune.credentials import dataset_env_prefix, source_secret
from kubetune.errors import DataError

from kubetune_trainer.config import RunContext
from kubetune_trainer.data.formats import (
    CONVERTERS,
    BadRow,
    Layout,
    check_for_stage,
    detect_format,
    fill_placeholders,
    show,
    with_columns,
)
from kubetune_trainer.sources import resolve

SUFFIXES = {".json", ".jsonl", ".txt", ".csv", ".parquet"}
# A line of a .jsonl or .txt file (one row) longer than this is refused with its size, read in
# bounded memory: never more than the limit at once, the rest only counted. (A 50 MB line
# validated, but tokenizing it took 6.5 GB.) A JSON, CSV or Parquet file is parsed as a whole.
MAX_LINE_ENV = "KUBETUNE_MAX_LINE_MB"
MAX_LINE_MB = 8
SHOW_BAD_ROWS = 5
UNEXPECTED = "unexpected row shape"  # a converter's bug caught as a bad row


@dataclass
class Part:
    """One data file (or registry entry) with the layout to read it."""

    name: str  # what the report calls it
    field: str  # spec path, for messages
    spec: DatasetSpec  # the data set entry it comes from
    paths: list[Path]
    layout: Layout | None  # None: detect from the first row
    max_samples: int | None = None
    placeholders: dict[str, str] | None = None


@dataclass
class Report:
    total: int = 0
    kept: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    per_source: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def bad(self) -> int:
        return self.total - self.kept

    def add_bad(self, source: str, index: int, reason: str, row: Any) -> None:
        reason = _cut(reason, 200)
        self.reasons[reason.split(";")[0]] += 1
        if len(self.examples) < SHOW_BAD_ROWS:
            # The row as written (JSON escapes control characters); plain text, never markup:
            # whoever prints the report must not interpret it.
            if isinstance(row, _Unparsable):
                snippet = json.dumps(row.text, ensure_ascii=False)
            else:
                try:
                    snippet = json.dumps(row, ensure_ascii=False, default=str)
                except (ValueError, RecursionError):
                    snippet = "(too deeply nested to show)"
            self.examples.append(f"{source} row {index}: {reason}\n      {_cut(snippet, 160)}")

    def summary(self) -> str:
        lines = [f"{self.kept} of {self.total} rows usable ({self.bad} do not fit)"]
        lines += [f"  {n:>6} × {reason}" for reason, n in self.reasons.most_common(10)]
        if self.examples:
            lines.append("  first bad rows:")
            lines += [f"    {e}" for e in self.examples]
        return "\n".join(lines)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _regular_file(path: Path, field: str) -> None:
    """Refuse what is not a plain file before opening it: a FIFO would block forever, a
    device never end."""
    if not path.exists():
        raise DataError(f"{path}: not found (a broken link?)", field=field)
    if not path.is_file():
        raise DataError(f"{path} is not a regular file (a FIFO, socket or device?)",
                        field=field)


def _decode(data: bytes, path: Path, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        raise DataError(f"{path}: line {line} is not UTF-8 text") from None


def _read_json(path: Path) -> Any:
    text = _decode(path.read_bytes(), path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not JSON: {err.msg} at line {err.lineno} column "
                        f"{err.colno}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None
    except ValueError as err:  # e.g. an integer with thousands of digits
        raise DataError(f"{path}: not readable JSON: {_cut(str(err), 120)}") from None
    return data


def max_line_bytes() -> int:
    """The longest line a row may be, from ``KUBETUNE_MAX_LINE_MB`` (MiB, more than 0)."""
    raw = os.environ.get(MAX_LINE_ENV, "").strip()
    try:
        mb = float(raw) if raw else MAX_LINE_MB
    except ValueError:
        mb = -1.0
    if not 0 < mb <= 2**20:
        raise DataError(f"{MAX_LINE_ENV}={raw!r} is not a size: a number of MiB, more than 0")
    return max(1, int(mb * 2**20))


def _lines(f: Any, path: Path, limit: int) -> Iterator[tuple[int, bytes]]:
    """(number, bytes) of each line of ``f``, holding at most ``limit`` + 1 bytes of it; a
    longer line is counted to its end in pieces and refused with its size."""
    n = 0
    while raw := f.readline(limit + 1):
        n += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            size = len(raw)
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(limit + 1)
                size += len(raw)
            size -= raw.endswith(b"\n")
            raise DataError(
                f"{path}: line {n} is {size:,} bytes, longer than a row may be ({limit:,} "
                f"bytes, {MAX_LINE_ENV}={limit / 2**20:g}); it was not read: split it into "
                f"rows, or raise {MAX_LINE_ENV}")
        yield n, raw


def _rows(path: Path) -> Iterator[Any]:
    """The rows of one file, read as they are asked for (JSONL line by line, CSV and Parquet
    batch by batch); a JSON document is parsed whole."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = _read_json(path)
        if isinstance(data, dict):  # {"data": [...]} or a single object
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of rows (or an object), got "
                            f"{type(data).__name__}")
        yield from data
    elif suffix == ".jsonl":
        limit = max_line_bytes()
        with path.open("rb") as f:
            for n, raw in _lines(f, path, limit):
                line = _decode(raw, path, n).strip() if raw.strip() else ""
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    yield _Unparsable(f"line {n} is not JSON: {err.msg}", line)
                except RecursionError:
                    yield _Unparsable(f"line {n} is nested too deeply", line)
                except ValueError as err:
                    yield _Unparsable(f"line {n}: {_cut(str(err), 80)}", line)
    elif suffix == ".txt":  # a row per non-blank line (\n, \r\n or \r ends one)
        limit = max_line_bytes()
        with path.open("rb") as f:
            for n, raw in _lines(f, path, limit):
                text = _decode(raw, path, n)
                for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
                    if line.strip():
                        yield {"text": line}
    elif suffix in (".csv", ".parquet"):
        yield from _read_table(path, suffix[1:])
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of "
                        f"{sorted(SUFFIXES)}")


def _read_table(path: Path, kind: str) -> Any:
    """A CSV or Parquet file as a memory-mapped datasets.Dataset (rows are read when
    iterated)."""
    import datasets

    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - a parser's own errors: say what it says
        while err.__cause__ is not None or err.__context__ is not None:
            err = err.__cause__ or err.__context__
        what = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"{path}: not a readable {kind.upper()} file: {_cut(what, 200)}") \
            from None


@dataclass
class _Unparsable:
    reason: str
    text: str  # the line as written, shown in the report


def _inside(path: Path, root: Path, name: str, field: str) -> None:
    """Refuse ``path`` unless it resolves (links followed, ``..`` applied) inside ``root``:
    a data set never reads outside its folder (on a claim: outside the claim)."""
    shown = path.relative_to(root) if path.is_relative_to(root) else path
    try:
        real, top = path.resolve(), root.resolve()
    except (OSError, RuntimeError):  # a loop of links (3.11 raises RuntimeError, 3.13 OSError)
        raise DataError(f"{name}: {shown} is a loop of links; only files inside the data "
                        f"folder {root} are read", field=field) from None
    if real != top and not real.is_relative_to(top):
        raise DataError(f"{name}: {shown} is outside the data folder {root} (a '..' or a "
                        "link out of it); only files inside it are read", field=field)


def _files(path: Path, name: str, field: str, root: Path | None = None) -> list[Path]:
    """The data files at ``path`` (a file, or a directory's files), each inside ``root``
    (default: the directory itself)."""
    if root is not None:
        _inside(path, root, name, field)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.suffix.lower() in SUFFIXES and not p.is_dir())
        if not files:
            raise DataError(f"{name}: directory {path} has no {sorted(SUFFIXES)} files",
                            field=field)
        for p in files:
            _inside(p, root or path, name, field)
            _regular_file(p, field)
        return files
    if not path.exists():
        raise DataError(f"{name}: file not found: {path}", field=field)
    _regular_file(path, field)
    return [path]


def _registry_parts(spec: DatasetSpec, path: Path, field: str, ctx: RunContext) -> list[Part]:
    if not path.exists():
        raise DataError(f"dataset registry not found: {path}", field=field)
    _regular_file(path, field)
    try:
        registry = _read_json(path)
    except OSError as err:
        raise DataError(f"cannot read dataset registry {path}: {err}", field=field) from None
    except DataError as err:
        raise DataError(f"dataset registry {err.message}", field=field) from None
    if not isinstance(registry, dict):
        raise DataError(f"{path} must be a JSON object of named entries, got "
                        f"{type(registry).__name__}", field=field)
    parts = []
    for i, entry in enumerate(spec.entries or []):
        efield = f"{field}.entries[{i}]"
        if entry not in registry:
            raise DataError(f"{entry!r} is not in {path.name}; it has: "
                            f"{_cut(', '.join(sorted(registry)), 300)}", field=efield)
        info = registry[entry]
        if not isinstance(info, dict):
            raise DataError(f"{path.name}: {entry!r} must be an object, got "
                            f"{type(info).__name__}", field=efield)
        bad = _registry_entry_problem(info)
        if bad:
            raise DataError(f"{path.name}: {entry!r}: {bad}", field=efield)
        if "file_name" not in info:
            other = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url",
                                 "cloud_file_name") if k in info]
            raise DataError(f"{entry!r} loads from {other or 'nothing'}; only file_name "
                            "entries are supported (point a source at hf:// instead)",
                            field=efield)
        fmt = info.get("formatting", "alpaca")
        if fmt not in ("alpaca", "sharegpt"):
            raise DataError(f"{entry!r}: formatting {show(fmt)} is not alpaca or sharegpt",
                            field=efield)
        columns = info.get("columns")
        try:
            layout = Layout.build(fmt, columns, info.get("tags"), bool(info.get("ranking")))
        except ValueError as err:
            raise DataError(f"{entry!r}: {err}", field=efield) from None
        max_samples = spec.max_samples or info.get("num_samples")
        parts.append(Part(entry, efield, spec, _files(path.parent / info["file_name"], entry,
                                                      efield, root=path.parent),
                          layout, max_samples, spec.placeholders))
    return parts


def _registry_entry_problem(info: dict[str, Any]) -> str | None:
    """What is wrong with the types in one dataset_info.json entry, if anything."""
    for key, want, ok in (
            ("file_name", "a non-empty string", lambda v: isinstance(v, str) and v.strip()),
            ("formatting", "a string", lambda v: isinstance(v, str)),
            ("columns", "an object of strings", lambda v: isinstance(v, dict)),
            ("tags", "an object of strings", lambda v: isinstance(v, dict)),
            ("ranking", "true or false", lambda v: isinstance(v, bool)),
            ("num_samples", "a positive integer",
             lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0)):
        if key in info and info[key] is not None and not ok(info[key]):
            return f"{key} must be {want}, got {show(info[key])}"
    return None


def plan(specs: list[DatasetSpec], ctx: RunContext, *, at: str = "spec.datasets"
         ) -> list[Part]:
    """Resolve every source and decide how each file is read (no rows read yet). ``at``:
    where the list is in the spec (spec.datasets, spec.evalDatasets)."""
    parts: list[Part] = []
    for i, spec in enumerate(specs):
        field = f"{at}[{i}]"
        secret = source_secret(spec.source, spec.secret_ref, prefix=dataset_env_prefix(at, i),
                               field=f"{field}.secretRef")
        path = resolve(spec.source, ctx, field=f"{field}.source", kind="dataset",
                       revision=spec.revision, secret=secret)
        if spec.entries:
            if path.is_dir():
                path = path / "dataset_info.json"
            parts += _registry_parts(spec, path, field, ctx)
            continue
        layout = None
        if spec.format is not None:
            try:
                layout = Layout.build(spec.format, spec.columns, spec.tags, spec.ranking)
            except ValueError as err:
                raise DataError(str(err), field=field) from None
        parts.append(Part(spec.source, field, spec, _files(path, spec.source, f"{field}.source"),
                          layout, spec.max_samples, spec.placeholders))
    return parts


def _layout_for(part: Part, rows: list[Any], spec_fields: tuple) -> Layout:
    if part.layout is not None:
        return part.layout
    first = next((r for r in rows if isinstance(r, dict)), None)
    fmt = detect_format(first) if first else None
    if fmt is None:
        keys = sorted(first) if first else []
        raise DataError(
            f"cannot tell the format of {part.name} from its columns {keys}; set format: "
            "alpaca, sharegpt, messages, promptCompletion, text, preference or "
            "openaiPreference", field=f"{part.field}.format")
    columns, tags, ranking = spec_fields
    # chosen/rejected columns beside a prompt-like format: a ranking data set
    ranking = ranking or ("chosen" in first and "rejected" in first)
    return Layout.build(fmt, columns, tags, ranking)


PEEK = 100  # rows read ahead of converting a file: its layout and columns come from them


@dataclass
class Examples:
    """Every example of some data sets, read and checked as it is iterated, so that memory
    stays flat however many rows there are. Each pass reads the files again; a pass that
    finishes leaves its ``report`` and fails, naming reasons and rows, when too many are bad."""

    specs: list[DatasetSpec]
    stage: str
    ctx: RunContext
    max_invalid_fraction: float
    at: str = "spec.datasets"
    report: Report | None = None

    def __post_init__(self) -> None:
        self.parts = plan(self.specs, self.ctx, at=self.at)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        report = Report()
        kept = 0
        for part in self.parts:
            kept_before, total_before = report.kept, report.total
            remaining = part.max_samples  # across all files of this source
            for path in part.paths:
                if remaining is not None and remaining <= 0:
                    break
                read_before = report.total
                for ex in self._file(part, path, report, remaining):
                    kept += 1
                    yield ex
                if remaining is not None:
                    remaining -= report.total - read_before
            report.per_source[part.name] = (report.kept - kept_before,
                                            report.total - total_before)
        for name, (_, total) in report.per_source.items():
            if total == 0:
                raise DataError(f"{name} has no rows")
        if not kept:
            raise DataError("no usable rows in any data set:\n" + report.summary())
        if report.bad / report.total > self.max_invalid_fraction:
            raise DataError(
                f"{report.bad / report.total:.1%} of rows do not fit their format, more than "
                f"training.maxInvalidFraction ({self.max_invalid_fraction:.1%}):\n"
                + report.summary())
        self.report = report

    def _file(self, part: Part, path: Path, report: Report, remaining: int | None
              ) -> Iterator[dict[str, Any]]:
        spec = part.spec
        prompts_only = STAGES[self.stage].rows == "prompts"
        try:
            rows = _rows(path)
            if remaining is not None:
                rows = itertools.islice(rows, remaining)
            head = list(itertools.islice(rows, PEEK))
        except DataError as err:
            raise DataError(err.message, field=f"{part.field}.source") from None
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {path}: {err}", field=f"{part.field}.source") \
                from None
        if not head:
            raise DataError(f"{part.name}: {path} has no rows", field=f"{part.field}.source")
        layout = _layout_for(part, head, (spec.columns, spec.tags, spec.ranking))
        convert = CONVERTERS[layout.format]
        missing = _missing_column(head, layout)
        if missing:
            raise DataError(missing, field=f"{part.field}.columns")
        rows = itertools.chain(head, rows)
        n = -1
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except DataError as err:  # e.g. a line further down that is not UTF-8
                raise DataError(err.message, field=f"{part.field}.source") from None
            n += 1
            report.total += 1
            try:
                if isinstance(row, _Unparsable):
                    raise BadRow(row.reason)
                if not isinstance(row, dict):
                    raise BadRow(f"a row must be an object, got {type(row).__name__}")
                if part.placeholders:
                    row = fill_placeholders(row, part.placeholders)
                shaped = check_for_stage(convert(row, layout), self.stage)
                if prompts_only:
                    shaped = [with_columns(ex, row, layout) for ex in shaped]
            except BadRow as err:
                report.add_bad(f"{part.name} ({path.name})", n, str(err), row)
                continue
            except RecursionError:
                report.add_bad(f"{part.name} ({path.name})", n, "nested too deeply", row)
                continue
            except (TypeError, AttributeError, KeyError, IndexError, ValueError) as err:
                # Defence in depth: a shape no check foresaw is a bad row, not a crash.
                report.add_bad(f"{part.name} ({path.name})", n,
                               f"{UNEXPECTED} ({type(err).__name__})", row)
                continue
            report.kept += 1
            yield from shaped


def load_examples(
    specs: list[DatasetSpec], stage: str, ctx: RunContext, *, max_invalid_fraction: float,
    at: str = "spec.datasets",
) -> tuple[list[dict[str, Any]], Report]:
    """Read, convert and check every row, into a list. Fails (naming reasons and rows) when
    too many are bad."""
    examples = Examples(specs, stage, ctx, max_invalid_fraction, at)
    rows = list(examples)
    assert examples.report is not None
    return rows, examples.report


def _missing_column(rows: list[Any], layout: Layout) -> str | None:
    """A column the layout needs that no row has: one clear message instead of N bad rows."""
    sample = [r for r in rows[:100] if isinstance(r, dict)]
    if not sample:
        return None
    seen = set().union(*(r.keys() for r in sample))
    optional = {"promptCompletion": ("kto_tag",), "preference": ("prompt",)}
    for role in ("prompt", "messages", "chosen", "rejected", "kto_tag"):
        if role in optional.get(layout.format, ()):
            continue
        name = layout.columns.get(role)
        if name and name not in seen:
            return (f"column {name!r} ({role}) is not in the data; its columns are "
                    f"{sorted(seen)}")
    return None
