"""Read the job's data sets into normalized examples, with a report on rows that do not fit."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import DatasetSpec
from kubetune.errors import DataError

from kubetune_trainer.config import RunContext
from kubetune_trainer.data.formats import (
    CONVERTERS,
    BadRow,
    Layout,
    check_for_stage,
    detect_format,
    fill_placeholders,
)
from kubetune_trainer.sources import resolve

SUFFIXES = {".json", ".jsonl", ".txt", ".csv", ".parquet"}
SHOW_BAD_ROWS = 5


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
        self.reasons[reason.split(";")[0]] += 1
        if len(self.examples) < SHOW_BAD_ROWS:
            snippet = json.dumps(row, ensure_ascii=False, default=str)
            snippet = snippet if len(snippet) <= 160 else snippet[:157] + "..."
            self.examples.append(f"{source} row {index}: {reason}\n      {snippet}")

    def summary(self) -> str:
        lines = [f"{self.kept} of {self.total} rows usable ({self.bad} do not fit)"]
        lines += [f"  {n:>6} × {reason}" for reason, n in self.reasons.most_common(10)]
        if self.examples:
            lines.append("  first bad rows:")
            lines += [f"    {e}" for e in self.examples]
        return "\n".join(lines)


def _read_file(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"data": [...]} or a single object
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        return data
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        rows.append(_Unparsable(f"line {n} is not JSON: {err.msg}"))
        return rows
    if suffix == ".txt":
        with path.open(encoding="utf-8") as f:
            return [{"text": line.rstrip("\n")} for line in f if line.strip()]
    if suffix in (".csv", ".parquet"):
        import datasets

        ds = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
        return list(ds)
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(SUFFIXES)}")


@dataclass
class _Unparsable:
    reason: str


def _files(path: Path, name: str, field: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{name}: directory {path} has no {sorted(SUFFIXES)} files",
                            field=field)
        return files
    if not path.exists():
        raise DataError(f"{name}: file not found: {path}", field=field)
    return [path]


def _registry_parts(spec: DatasetSpec, path: Path, field: str, ctx: RunContext) -> list[Part]:
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read dataset registry {path}: {err}", field=field) from None
    parts = []
    for i, entry in enumerate(spec.entries or []):
        efield = f"{field}.entries[{i}]"
        if entry not in registry:
            raise DataError(f"{entry!r} is not in {path.name}; it has: "
                            f"{', '.join(sorted(registry))}", field=efield)
        info = registry[entry]
        if "file_name" not in info:
            other = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url",
                                 "cloud_file_name") if k in info]
            raise DataError(f"{entry!r} loads from {other or 'nothing'}; only file_name "
                            "entries are supported (point a source at hf:// instead)",
                            field=efield)
        fmt = info.get("formatting", "alpaca")
        if fmt not in ("alpaca", "sharegpt"):
            raise DataError(f"{entry!r}: formatting {fmt!r} is not alpaca or sharegpt",
                            field=efield)
        columns = info.get("columns")
        try:
            layout = Layout.build(fmt, columns, info.get("tags"), bool(info.get("ranking")))
        except ValueError as err:
            raise DataError(f"{entry!r}: {err}", field=efield) from None
        max_samples = spec.max_samples or info.get("num_samples")
        parts.append(Part(entry, efield, spec, _files(path.parent / info["file_name"], entry,
                                                      efield),
                          layout, max_samples, spec.placeholders))
    return parts


def plan(specs: list[DatasetSpec], ctx: RunContext) -> list[Part]:
    """Resolve every source and decide how each file is read (no rows read yet)."""
    parts: list[Part] = []
    for i, spec in enumerate(specs):
        field = f"spec.datasets[{i}]"
        path = resolve(spec.source, ctx, field=f"{field}.source", kind="dataset",
                       revision=spec.revision, token_env=f"KUBETUNE_DATASET_{i}_TOKEN")
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


def load_examples(
    specs: list[DatasetSpec], stage: str, ctx: RunContext, *, max_invalid_fraction: float
) -> tuple[list[dict[str, Any]], Report]:
    """Read, convert and check every row. Fails (naming reasons and rows) when too many are bad."""
    report = Report()
    examples: list[dict[str, Any]] = []
    for part in plan(specs, ctx):
        spec = part.spec
        kept_before, total_before = report.kept, report.total
        remaining = part.max_samples  # across all files of this source
        for path in part.paths:
            if remaining is not None and remaining <= 0:
                break
            try:
                rows = _read_file(path)
            except (OSError, ValueError) as err:
                raise DataError(f"cannot read {path}: {err}", field=f"{part.field}.source") \
                    from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a list of rows", field=f"{part.field}.source")
            if not rows:
                raise DataError(f"{part.name}: {path} has no rows", field=f"{part.field}.source")
            if remaining is not None:
                rows = rows[:remaining]
                remaining -= len(rows)
            layout = _layout_for(part, rows, (spec.columns, spec.tags, spec.ranking))
            convert = CONVERTERS[layout.format]
            missing = _missing_column(rows, layout)
            if missing:
                raise DataError(missing, field=f"{part.field}.columns")
            for n, row in enumerate(rows):
                report.total += 1
                try:
                    if isinstance(row, _Unparsable):
                        raise BadRow(row.reason)
                    if not isinstance(row, dict):
                        raise BadRow(f"a row must be an object, got {type(row).__name__}")
                    if part.placeholders:
                        row = fill_placeholders(row, part.placeholders)
                    shaped = check_for_stage(convert(row, layout), stage)
                except BadRow as err:
                    report.add_bad(f"{part.name} ({path.name})", n, str(err), row)
                    continue
                examples += shaped
                report.kept += 1
        report.per_source[part.name] = (report.kept - kept_before, report.total - total_before)
    for name, (_, total) in report.per_source.items():
        if total == 0:
            raise DataError(f"{name} has no rows")
    if not examples:
        raise DataError("no usable rows in any data set:\n" + report.summary())
    if report.bad / report.total > max_invalid_fraction:
        raise DataError(
            f"{report.bad / report.total:.1%} of rows do not fit their format, more than "
            f"training.maxInvalidFraction ({max_invalid_fraction:.1%}):\n" + report.summary())
    return examples, report


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
