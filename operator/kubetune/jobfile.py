"""Reading FineTuneJob files with the typed API models; messages name the field."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.errors import KubetuneError


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        loc = f"{prefix}.{loc}" if prefix and loc else prefix or loc
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field {e['loc'][-1]!r}"
        elif e["type"] == "enum":
            msg = f"{e['input']!r} is not allowed; expected {e['ctx']['expected']}"
        elif e["type"] == "string_pattern_mismatch" and loc.endswith(("source", "uri")):
            msg = f"{e['input']!r} is not a source kubetune knows"
        elif e["type"] == "string_pattern_mismatch":
            msg = f"{e['input']!r} does not match {e['ctx']['pattern']}"
        lines.append(f"{loc}: {msg}" if loc and not msg.startswith(f"{loc}.") else msg)
    return "\n".join(lines)


def parse_job(doc: object) -> FineTuneJob:
    if not isinstance(doc, dict):
        raise KubetuneError("a FineTuneJob must be a YAML mapping")
    try:
        return FineTuneJob.model_validate(doc)
    except ValidationError as err:
        raise KubetuneError(format_validation_error(err)) from None


def load_job(path: str | Path) -> FineTuneJob:
    path = Path(path)
    if not path.is_file():
        raise KubetuneError(f"{path}: no such file")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as err:
        raise KubetuneError(f"{path}: not valid YAML: {err}") from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]
    if len(jobs) != 1:
        raise KubetuneError(f"{path}: expected exactly one FineTuneJob, found {len(jobs)}")
    return parse_job(jobs[0])
