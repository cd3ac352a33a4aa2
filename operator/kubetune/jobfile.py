"""Reading FineTuneJob files: the one loader for validate, render, run and the trainer.

A job file is read as bytes (at most ``MAX_BYTES``), decoded as UTF-8, checked event by event
(no anchors or aliases, no duplicate keys, at most ``MAX_DEPTH`` levels of nesting), and only
then built into Python objects and validated by the typed API models, exactly as the API server
would read the same document: by the camelCase names only, no type coercion, and an explicit
``null`` meaning "not set". Every message names the file or the field.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.errors import KubetuneError

MAX_BYTES = 1024 * 1024  # a ConfigMap (which carries the job to the pods) holds at most 1 MiB
MAX_DEPTH = 32  # the deepest part of a real job (an affinity) is about 10 levels

# libyaml (C) when present: about 4x faster on large files; the pure-Python loader otherwise.
_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _JobLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    """SafeLoader without YAML 1.1 timestamps: `revision: 2024-01-01` stays the string the API
    server sees, not a date."""


_JobLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _where(event: Any) -> str:
    mark = getattr(event, "start_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"


MAX_NUMBER = 64  # characters of a plain number: a 64-bit integer or a float is far shorter
_NUMBERS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _plain_tag(event: Any) -> str | None:
    """What an untagged plain scalar resolves to (int, float, bool, null, str); None when
    quoted or tagged (then it is a string, or its tag says)."""
    if event.tag is not None or not event.implicit[0] or event.style:
        return None
    return _JobLoader.resolve(_JobLoader, yaml.ScalarNode, event.value, (True, False))


def _path(stack: list[list[Any]]) -> str:
    """spec.training.maxSteps for the scalar being read (keys of the open mappings)."""
    out = ""
    for entry in stack:
        if entry[0] and entry[3] is not None:
            out += f".{entry[3]}" if out else str(entry[3])
        elif not entry[0]:
            out += f"[{entry[3]}]"
    return out


def _check_events(text: str, name: str) -> None:
    """Refuse what would expand, recurse or silently drop data, before anything is built."""
    # Per open collection: [is_mapping, expecting_key, keys_seen, current key or index].
    stack: list[list[Any]] = []
    for event in yaml.parse(text, Loader=_BaseLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise KubetuneError(
                f"{name}: {_where(event)}: YAML anchors and aliases (&name, *name, <<) are not "
                "allowed in a job file; write the values out")
        if isinstance(event, yaml.CollectionEndEvent):
            stack.pop()
            if stack and stack[-1][0]:
                stack[-1][1] = True
            continue
        if not isinstance(event, yaml.NodeEvent):
            continue
        top = stack[-1] if stack else None
        if top is not None and top[0]:
            if top[1]:  # a key
                if not isinstance(event, yaml.ScalarEvent) or _plain_tag(event) not in (
                        None, "tag:yaml.org,2002:str"):
                    raise KubetuneError(f"{name}: {_where(event)}: mapping keys must be "
                                        "plain strings (quote a number or a boolean used "
                                        "as a key)")
                if event.value in top[2]:
                    raise KubetuneError(f"{name}: {_where(event)}: duplicate key "
                                        f"{event.value!r}")
                top[2].add(event.value)
                top[3] = event.value
            top[1] = not top[1]
        elif top is not None:
            top[3] += 1
        if (isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_NUMBER
                and _plain_tag(event) in _NUMBERS):
            raise KubetuneError(
                f"{name}: {_where(event)}: {_path(stack) or 'a value'}: a number of "
                f"{len(event.value)} characters is too long to read (at most {MAX_NUMBER})")
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= MAX_DEPTH:
                raise KubetuneError(f"{name}: {_where(event)}: nested more than {MAX_DEPTH} "
                                    "levels deep")
            mapping = isinstance(event, yaml.MappingStartEvent)
            stack.append([mapping, True, set(), None if mapping else -1])


def read_text(path: str | Path) -> str:
    """The file's text: a regular file, at most MAX_BYTES, UTF-8."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise KubetuneError(f"{path}: no such file") from None
    except OSError as err:
        raise KubetuneError(f"{path}: cannot be read: {err.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise KubetuneError(f"{path}: not a regular file")
        raw = f.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise KubetuneError(f"{path}: larger than {MAX_BYTES // 1024} KiB; a job file is a "
                            "few KiB (data belongs in the data sets)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise KubetuneError(f"{path}: not UTF-8 text (byte {err.start}, line {line}); save the "
                            "file as UTF-8") from None


def load_documents(text: str, name: str) -> list[Any]:
    """The YAML documents of ``text`` (empty ones left out), checked by ``_check_events``."""
    try:
        _check_events(text, name)
        return [d for d in yaml.load_all(text, Loader=_JobLoader) if d is not None]
    except yaml.YAMLError as err:
        raise KubetuneError(f"{name}: not valid YAML: {err}") from None


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """spec.datasets[0].format: list indexes in brackets, as kubectl and the API server
    write them."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(loc: tuple[Any, ...] | list[Any], root: type[BaseModel] = FineTuneJob
              ) -> type[BaseModel] | None:
    """The API model whose field list applies at ``loc`` (list indexes skipped)."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = next((f for n, f in model.model_fields.items()
                      if part in (n, f.alias)), None)
        model = _inner_model(field.annotation) if field else None
    return model


def _inner_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def did_you_mean(loc: tuple[Any, ...] | list[Any], root: type[BaseModel] = FineTuneJob) -> str:
    """ "; did you mean 'format'?" for a misspelled key, when a close field name exists."""
    model = _model_at(loc[:-1], root)
    if model is None or not isinstance(loc[-1], str):
        return ""
    names = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.7)
    if not close and loc[-1].replace("_", "").lower() in {n.lower(): n for n in names}:
        close = [{n.lower(): n for n in names}[loc[-1].replace("_", "").lower()]]
    return f"; did you mean {close[0]!r}?" if close else ""


OUTPUTS = "a local path, pvc://CLAIM/path, s3://BUCKET/path, gs://BUCKET/path or hf://ORG/NAME"


def output_uri_problem(uri: str) -> str:
    """What is wrong with an output URI that OUTPUT_PATTERN refuses, in words (quoting it
    redacted)."""
    from kubetune.api.v1alpha1._base import _SPACE, DNS_SUBDOMAIN
    from kubetune.urls import redact

    uri = redact(uri)
    if re.search(f"[{_SPACE}]", uri):
        return "contains a space or a control character"
    scheme, sep, rest = uri.partition("://")
    if scheme in ("s3", "gs") and sep:
        bucket = rest.split("/", 1)[0]
        if not 3 <= len(bucket) <= 63:
            size = f"{len(bucket)} character{'s' if len(bucket) != 1 else ''}"
            return (f"the bucket name {bucket!r} is {size} long; {scheme}:// bucket names are "
                    "3 to 63 characters")
        return (f"{bucket!r} is not a bucket name: lower-case letters, digits, '-', '.' and "
                "'_', starting with a letter or a digit")
    if scheme == "pvc" and sep and not re.match(DNS_SUBDOMAIN, rest.split("/", 1)[0]):
        return (f"{rest.split('/', 1)[0]!r} is not a volume claim name (lower-case letters, "
                "digits, '-' and '.', at most 63 characters between dots)")
    if scheme == "hf" and sep:
        return "an hf:// output is a Hub repository: hf://ORG/NAME, no path below it"
    if sep and scheme not in ("file", "pvc"):
        return f"{scheme}:// is not a place kubetune writes outputs to; an output is {OUTPUTS}"
    return f"not an output location; an output is {OUTPUTS}"


# Fields whose values are never quoted in a message (they may hold anything).
_UNQUOTED = ("value", "args")


def _secret_of(loc: str) -> str:
    """The secretRef that a credential in the URL at ``loc`` belongs in."""
    if loc.endswith("image"):
        return "an image pull secret of trainer.serviceAccountName"
    owner = loc.rsplit(".", 1)[0]
    return f"{owner}.secretRef" if owner.endswith(
        ("model", "output", "tracking", "]")) and "rewards" not in owner else "a Secret"


def format_validation_error(err: ValidationError, prefix: str = "",
                            root: type[BaseModel] = FineTuneJob) -> str:
    from kubetune import urls

    lines = []
    for e in err.errors():
        loc = field_path(e["loc"])
        loc = f"{prefix}.{loc}" if prefix and loc else prefix or loc
        msg = e["msg"].removeprefix("Value error, ")
        raw = e.get("input")
        if isinstance(raw, str):  # every quoted value is shown redacted (kubetune.urls)
            e = {**e, "input": urls.redact(raw)}
            if loc.split(".")[-1].split("[")[0] in _UNQUOTED or re.search(
                    r"(env|args)\[[0-9]+\](\.value)?$", loc):
                e["input"] = "the value"
        if (e["type"] == "string_pattern_mismatch" and isinstance(raw, str)
                and (urls.url_problem(raw) or (loc.endswith("image")
                                               and urls.image_problem(raw)))):
            lines.append(urls.image_message(loc, "trainer.serviceAccountName")
                         if loc.endswith("image") else urls.refusal(loc, _secret_of(loc)))
            continue
        if e["type"] == "extra_forbidden":
            msg = f"unknown field {e['loc'][-1]!r}" + (
                did_you_mean(e["loc"], root) if not prefix else "")
        elif e["type"] == "enum":
            msg = f"{e['input']!r} is not allowed; expected {e['ctx']['expected']}"
        elif e["type"] == "string_pattern_mismatch" and loc.endswith("output.uri"):
            msg = f"{e['input']!r}: {output_uri_problem(str(e['input']))}"
        elif e["type"] == "string_pattern_mismatch" and loc.endswith(("source", "uri")):
            msg = f"{e['input']!r} is not a source kubetune knows"
        elif e["type"] == "string_pattern_mismatch" and re.search(r"gate\[[0-9]+\]\.metric$",
                                                                  loc):
            msg = (f"{e['input']!r} is not a metric status.outputs.metrics holds (train_loss, "
                   "eval_loss, eval_perplexity, predict_rouge1/2/L, predict_bleu4, "
                   "lmeval_TASK_METRIC, or the stage's eval metric such as eval_reward)")
        elif e["type"] == "string_pattern_mismatch":
            msg = f"{e['input']!r} does not match {e['ctx']['pattern']}"
        elif e["type"] == "string_type" and e["input"] is None:
            msg = "null is not allowed here"
        lines.append(f"{loc}: {msg}" if loc and not msg.startswith(f"{loc}.") else msg)
    return "\n".join(lines)


def validate_job(doc: object) -> FineTuneJob:
    """Validate a job document as the API server reads it: by camelCase names only (a
    snake_case key is an unknown field), no coercion ("3" is not a number). Raises
    ValidationError."""
    return FineTuneJob.model_validate(doc, by_alias=True, by_name=False)


def parse_job(doc: object) -> FineTuneJob:
    if not isinstance(doc, dict):
        raise KubetuneError("a FineTuneJob must be a YAML mapping")
    try:
        return validate_job(doc)
    except ValidationError as err:
        raise KubetuneError(format_validation_error(err)) from None


def load_one(path: str | Path, kind: str) -> dict:
    """The one document of ``kind`` in a YAML file, read with the job files' checks."""
    path = Path(path)
    docs = load_documents(read_text(path), str(path))
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == kind]
    if len(found) != 1:
        raise KubetuneError(f"{path}: expected exactly one {kind}, found {len(found)}")
    return found[0]


def load_job(path: str | Path) -> FineTuneJob:
    return parse_job(load_one(path, "FineTuneJob"))
