"""``kubetune import``: a LLaMA-Factory, Axolotl or TRL training config as a FineTuneJob.

Each tool has one module with a table from its keys to the job's fields (``KEYS``) and the
values its own defaults give where kubetune's differ (``DEFAULTS``); this module holds what
they share: the kinds of table entries, the draft job being filled, sources and outputs, and
the rendered file. Every input key ends up in exactly one place: a field of the job
(``To``/``Step``), the same behaviour without a setting (``Same``), or the list of keys with
no equivalent and why (``Lost``); a key the tool does not know is an error with "did you
mean", and what kubetune cannot train (``Refuse``) is an error with the reason. The result is
checked by the project's own parser (``kubetune.jobfile.parse_job``) before it is written.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.errors import KubetuneError

TOOLS = ("llamafactory", "axolotl", "trl")


class ImportProblem(KubetuneError):
    """The config cannot become a FineTuneJob (an unknown key, something kubetune does not
    train); the message names the key."""


# --------------------------------------------------------------------------- table entries


@dataclass(frozen=True)
class To:
    """The key sets one field of the job (camelCase path below ``spec``), converted."""

    path: str
    convert: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Step:
    """The key is read by the tool's own build step (datasets, stage, method); ``where``
    says which fields it fills, for the report."""

    where: str


@dataclass(frozen=True)
class Same:
    """kubetune does this without a setting (or the key changes nothing in a run)."""

    reason: str


@dataclass(frozen=True)
class Lost:
    """No equivalent: listed with the reason. ``unless``: the value(s) that mean the tool's
    default, which kubetune matches (then nothing is lost)."""

    reason: str
    unless: tuple[Any, ...] = (None,)


@dataclass(frozen=True)
class Refuse:
    """kubetune cannot train this: an error with the reason, unless the value is one of
    ``unless`` (the tool's default: off)."""

    reason: str
    unless: tuple[Any, ...] = (None, False)


Entry = To | Step | Same | Lost | Refuse


# --------------------------------------------------------------------------- conversions


def number(value: Any) -> float:
    """A float; YAML 1.1 reads ``1e-4`` as a string, the tools' parsers as a number."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None


def integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an integer")
    if isinstance(value, int):
        return value
    f = number(value)
    if f != int(f):
        raise ValueError(f"{value!r} is not an integer")
    return int(f)


def flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", "none", ""):
        return False
    raise ValueError(f"{value!r} is not true or false")


def names_list(value: Any) -> list[str]:
    """``q_proj,v_proj`` or a list, as a list of names."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    raise ValueError(f"{value!r} is not a name or a list of names")


def positive_or_unset(value: Any) -> int | None:
    """HF's -1/0 mean "not set"."""
    n = integer(value)
    return n if n > 0 else None


# --------------------------------------------------------------------------- the draft


@dataclass
class Context:
    """Where the config was read and where the job goes."""

    config_path: Path
    base_dir: Path  # relative paths in the config resolve here (the tool's working directory)
    out_dir: Path  # the job file's folder: kubetune resolves local sources from it
    name: str | None = None
    stage: str | None = None  # trl: the trainer (the `trl sft|dpo|…` command)


@dataclass
class Draft:
    """The job being built, and the account of every key."""

    tool: str
    ctx: Context
    spec: dict[str, Any] = field(default_factory=dict)
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (key, field)
    same: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    lost: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    defaults: list[tuple[str, Any, str]] = field(default_factory=list)  # (field, value, why)
    moves: list[tuple[str, str, str]] = field(default_factory=list)  # (field, path, to do)
    unset: list[str] = field(default_factory=list)  # keys given as null: the tool's default

    def set(self, path: str, value: Any) -> None:
        node = self.spec
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    def get(self, path: str, default: Any = None) -> Any:
        node: Any = self.spec
        for p in path.split("."):
            if not isinstance(node, dict) or p not in node:
                return default
            node = node[p]
        return node

    def has(self, path: str) -> bool:
        return self.get(path, _MISSING) is not _MISSING

    def drop(self, path: str) -> None:
        *parents, last = path.split(".")
        node = self.get(".".join(parents)) if parents else self.spec
        if isinstance(node, dict):
            node.pop(last, None)

    def map(self, key: str, where: str) -> None:
        self.mapped.append((key, where))

    def lose(self, key: str, why: str) -> None:
        self.lost.append((key, why))

    def default(self, path: str, value: Any, why: str) -> None:
        """The tool's own default where kubetune's differs, written explicitly (a key of the
        config that sets the field replaces it)."""
        if not self.has(path):
            self.set(path, value)
            self.defaults.append((path, value, why))

    # ----------------------------------------------------------------- sources, outputs

    def source(self, text: str, where: str, kind: str, *, hub: bool = True) -> str:
        """A model or data set location as a kubetune source: a URL stays, a Hub id becomes
        hf://, a local path is written relative to the job file and listed as a move."""
        text = str(text).strip()
        if re.match(r"^[a-z][a-z0-9+.-]*://", text):
            return text
        local = self.ctx.base_dir / os.path.expanduser(text)
        if hub and not _looks_local(text) and not local.exists():
            return f"hf://{text}"
        self.moves.append((where, str(local), f"the {kind} is a local path: copy it to a "
                           f"volume claim (pvc://CLAIM/...) or a bucket (s3://, gs://) and set "
                           f"{where} before `kubectl apply`; `kubetune run` reads it here"))
        return self.relative(local, text)

    def output(self, text: str, where: str = "spec.output.uri") -> str:
        text = str(text).strip()
        if re.match(r"^[a-z][a-z0-9+.-]*://", text):
            return text
        local = self.ctx.base_dir / os.path.expanduser(text)
        self.moves.append((where, str(local), "the output is a local path: on a cluster it "
                           "must be pvc://CLAIM/path, s3://, gs:// or hf://ORG/NAME (the "
                           "operator refuses a local output); `kubetune run` writes here"))
        return self.relative(local, text)

    def relative(self, path: Path, given: str) -> str:
        """``path`` as kubetune reads a local source: relative to the job file's folder (an
        absolute path stays absolute)."""
        if os.path.isabs(os.path.expanduser(given)):
            return str(path)
        return os.path.relpath(os.path.abspath(path), os.path.abspath(self.ctx.out_dir))


_MISSING = object()


def _looks_local(text: str) -> bool:
    """A path, not a Hub id (ORG/NAME or NAME): absolute, ./ ../ ~, a file suffix, or more
    than one slash."""
    return (text.startswith(("/", ".", "~")) or text.count("/") > 1
            or bool(re.search(r"\.(json|jsonl|parquet|csv|txt|arrow|bin|safetensors|gguf)$",
                              text)))


# --------------------------------------------------------------------------- applying a table


def did_you_mean(key: str, known: set[str] | frozenset[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def apply_table(draft: Draft, config: Mapping[str, Any], table: Mapping[str, Entry],
                known: Mapping[str, str], what: str) -> None:
    """Every key of ``config``: through ``table`` or, when the tool knows it but the table
    does not, lost with its group's reason (``known``: key → reason). Unknown keys and
    refusals are collected and raised together."""
    unknown, refused = [], []
    for key, value in config.items():
        entry = table.get(key)
        if entry is None:
            if key not in known:
                unknown.append(f"{key!r}{did_you_mean(key, set(table) | set(known))}")
            elif value is not None:
                draft.lose(key, known[key])
            else:
                draft.unset.append(key)
            continue
        if isinstance(entry, Refuse):
            if value not in entry.unless:
                refused.append(f"{key}: {_show(value)}: {entry.reason}")
            elif value is None:
                draft.unset.append(key)
            else:
                draft.same.append((key, f"{_show(value)}: the tool's default, as kubetune "
                                   "does"))
            continue
        if value is None:  # the tools' parsers read null as "not set"
            draft.unset.append(key)
            continue
        if isinstance(entry, To):
            try:
                draft.set(entry.path, entry.convert(value) if entry.convert else value)
            except ValueError as err:
                raise ImportProblem(f"{key}: {err}") from None
            draft.map(key, "spec." + entry.path)
        elif isinstance(entry, Same):
            draft.same.append((key, entry.reason))
        elif isinstance(entry, Lost):
            if value not in entry.unless:
                draft.lose(key, entry.reason)
            else:
                draft.same.append((key, f"{_show(value)}: the tool's default, as kubetune "
                                   "does"))
    if unknown:
        raise ImportProblem(f"{what}: unknown key{'s' if len(unknown) > 1 else ''} "
                            + ", ".join(unknown))
    if refused:
        raise ImportProblem(f"{what}: kubetune cannot train this: " + "; ".join(refused))


def known_keys(groups: Mapping[str, str], reasons: Mapping[str, str]) -> dict[str, str]:
    """key → the reason for its group (``groups``: group → names; ``reasons``: group →
    why)."""
    out: dict[str, str] = {}
    for group, text in groups.items():
        for key in text.split():
            out.setdefault(key, reasons[group])
    return out


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def value_of(config: Mapping[str, Any], key: str, default: Any, convert: Callable[[Any], Any]
             ) -> Any:
    """A key's value converted, or ``default`` when absent or null; an error names the key."""
    value = config.get(key)
    if value is None:
        return default
    try:
        return convert(value)
    except ValueError as err:
        raise ImportProblem(f"{key}: {err}") from None


def job_name(ctx: Context, *candidates: str | None) -> str:
    """metadata.name: --name, else the output folder's or the config file's name, made a
    valid name (lower-case letters, digits, '-', at most 50)."""
    for raw in (ctx.name, *candidates, ctx.config_path.stem):
        if not raw:
            continue
        name = re.sub(r"[^a-z0-9-]+", "-", Path(str(raw).rstrip("/")).name.lower()).strip("-")
        name = re.sub(r"^[^a-z]+", "", name)[:50].rstrip("-")
        if name:
            return name
    return "imported"


# --------------------------------------------------------------------------- the result


@dataclass
class Imported:
    job: dict[str, Any]
    draft: Draft

    def report(self) -> list[str]:
        """The account of the keys, as lines (the file's comment block and stderr)."""
        d = self.draft
        lines = [f"Imported from {d.ctx.config_path.name} ({d.tool}) by `kubetune import "
                 f"{d.tool}`."]
        if d.mapped:
            lines.append("Mapped:")
            lines += [f"  {k} -> {w}" for k, w in d.mapped]
        if d.defaults:
            lines.append(f"{d.tool}'s defaults where kubetune's differ, written out:")
            lines += [f"  {p} = {_yaml_value(v)} ({why})" for p, v, why in d.defaults]
        if d.same:
            lines.append("Same in kubetune without a setting:")
            lines += [f"  {k}: {why}" for k, why in d.same]
        if d.unset:
            lines.append("Left empty (null: the tool's default, as above): "
                         + ", ".join(d.unset))
        if d.lost:
            lines.append("No equivalent in kubetune (not carried over):")
            lines += [f"  {k}: {why}" for k, why in d.lost]
        if d.moves:
            lines.append("Before `kubectl apply`:")
            lines += [f"  {f}: {path}: {todo}" for f, path, todo in d.moves]
        return lines

    def text(self) -> str:
        import yaml

        head = "".join(f"# {line}\n" if line else "#\n" for line in self.report())
        return head + yaml.safe_dump(self.job, sort_keys=False, width=100)


def _yaml_value(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix(
        "\n...").removesuffix(" ...")


def finish(draft: Draft, name: str, config: Mapping[str, Any]) -> Imported:
    """The job document, checked by the project's own parser. A key that no step accounted
    for (e.g. a LoRA option with full fine-tuning) is listed, never dropped silently."""
    from kubetune.jobfile import parse_job

    seen = ({k for k, _ in draft.mapped} | {k for k, _ in draft.same}
            | {k for k, _ in draft.lost} | set(draft.unset))
    for key in config:
        if key not in seen:
            draft.lose(key, "not read in this configuration (its stage, method or "
                       "optimizer does not use it)")
    # Keys inside the values (a data set entry, an inline DeepSpeed config, …): each one is
    # listed under its dotted path, unless a key above it was listed as a whole (the same,
    # lost or left empty: nothing of it is carried over, for the reason given there).
    seen = {k for k, _ in draft.mapped} | {k for k, _ in draft.same} | {
        k for k, _ in draft.lost} | set(draft.unset)
    whole = {k for k, _ in draft.same} | {k for k, _ in draft.lost} | set(draft.unset)
    for path, value in nested_keys(config):
        if path in seen or not is_leaf(value) or any(within(path, w) for w in whole):
            continue
        draft.lose(path, "not read in this configuration (kubetune's import does not use "
                   "it here)")

    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": name}, "spec": _ordered(draft.spec)}
    try:
        parse_job(job)
    except KubetuneError as err:
        raise ImportProblem(f"kubetune refuses the imported job: {err}") from None
    return Imported(job, draft)


def nested_keys(config: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Every key below the top level with its value, by path: ``datasets[0].type``,
    ``deepspeed.zero_optimization.stage``; a parent before its children."""
    out: list[tuple[str, Any]] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                out.append((f"{prefix}.{k}", v))
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)

    for key, value in config.items():
        walk(str(key), value)
    return out


def is_leaf(value: Any) -> bool:
    """A value with no keys below it (a list of names is one value)."""
    if isinstance(value, dict):
        return not value
    if isinstance(value, list):
        return not any(isinstance(v, dict | list) for v in value)
    return True


def within(path: str, parent: str) -> bool:
    """``path`` is ``parent`` or below it (``parent.x``, ``parent[0]``)."""
    return path == parent or path.startswith((parent + ".", parent + "["))


def account(draft: Draft, key: str, value: Mapping[str, Any], known: Mapping[str, str],
            read: Mapping[str, str] | None = None, *, what: str = "",
            check: bool = True, off: frozenset[str] = frozenset()) -> None:
    """The keys of a nested mapping ``value`` (found at ``key``), each under ``key.name``:
    ``read`` (name → the field it fills) mapped, a null left empty, else lost with its reason
    from ``known`` (name → why), or the same where it is false and named in ``off`` (false is
    the tool's default, which kubetune matches). A name in neither is an error with "did you
    mean" when ``check``; keys an earlier step listed are left as they are."""
    read = read or {}
    listed = ({k for k, _ in draft.mapped} | {k for k, _ in draft.same}
              | {k for k, _ in draft.lost} | set(draft.unset))
    unknown = [k for k in value if k not in known and k not in read]
    if unknown and check:
        raise ImportProblem(f"{what or key}: unknown key{'s' if len(unknown) > 1 else ''} "
                            + ", ".join(f"{k!r}{did_you_mean(str(k), set(known) | set(read))}"
                                        for k in unknown))
    for k, v in value.items():
        path = f"{key}.{k}"
        if path in listed:
            continue
        if k in read:
            draft.map(path, read[k])
        elif v is None:
            draft.unset.append(path)
        elif v is False and k in off:
            draft.same.append((path, "false: the tool's default, as kubetune does"))
        else:
            draft.lose(path, known.get(k, "not read by kubetune"))


def _ordered(value: Any, model: Any = None) -> Any:
    """Keys in the order of the API model's fields (as `kubetune init` writes them)."""
    from pydantic import BaseModel

    from kubetune.api.v1alpha1 import FineTuneJobSpec
    from kubetune.jobfile import _inner_model

    model = FineTuneJobSpec if model is None else model
    if isinstance(value, list):
        return [_ordered(v, model) for v in value]
    if not isinstance(value, dict) or not (isinstance(model, type)
                                           and issubclass(model, BaseModel)):
        return value
    fields = {(f.alias or n): f for n, f in model.model_fields.items()}
    names = list(fields)
    return {k: _ordered(value[k], _inner_model(fields[k].annotation) if k in fields else None)
            for k in sorted(value, key=lambda k: names.index(k) if k in names else len(names))}


def convert(tool: str, config: Any, ctx: Context) -> Imported:
    """``config`` (the parsed YAML) of ``tool`` as a FineTuneJob."""
    if not isinstance(config, dict):
        raise ImportProblem(f"{ctx.config_path}: a {tool} config is a YAML mapping of keys")
    if tool == "llamafactory":
        from kubetune.importing import llamafactory as module
    elif tool == "axolotl":
        from kubetune.importing import axolotl as module  # type: ignore[no-redef]
    elif tool == "trl":
        from kubetune.importing import trl as module  # type: ignore[no-redef]
    else:
        raise ImportProblem(f"no importer for {tool!r}; choose one of: {', '.join(TOOLS)}"
                            + did_you_mean(tool, frozenset(TOOLS)))
    return module.convert(config, ctx)


def read_config(path: Path) -> Any:
    """The tool's YAML as the tool reads it (PyYAML's safe loader), through the project's
    size and encoding checks."""
    import yaml

    from kubetune.jobfile import read_text

    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise ImportProblem(f"{path}: not valid YAML: {err}") from None
