"""A pod's report made safe for the status: the KEP-2779 ``trainerStatus`` mapped to
status.progress, kubetune's checkpoint and outputs, each value checked against what the status
field may hold (a value the API server would refuse must never reach a patch)."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

from kubetune.api.stages import FINAL_METRIC_PATTERN, MAX_STAGE_METRICS, STAGE_METRIC_PATTERN
from kubetune.api.v1alpha1 import Checkpoint, Outputs

from kubetune_operator import metrics
from kubetune_operator.status import as_api

_METRIC_MAP = {"current_step": "step", "total_steps": "totalSteps", "loss": "loss",
               "learning_rate": "learningRate", "current_epoch": "epoch", "epoch": "epoch"}
_TOKENS = "num_input_tokens_seen"
_OUTPUTS = ("adapter", "mergedModel", "model", "trackingUrl")
_STAGE_METRIC = re.compile(STAGE_METRIC_PATTERN)
_FINAL_METRIC = re.compile(FINAL_METRIC_PATTERN + "|" + STAGE_METRIC_PATTERN)

# What a status field may hold. A value the API server would refuse (NaN, a 300-digit step)
# must never reach a patch: the flusher would retry that patch, and every later one, forever.
INT64_MAX = 2**63 - 1
MAX_ETA_SECONDS = 10 * 365 * 24 * 3600.0
MAX_NUMBER_TEXT = 64  # a number sent as a string ("1.25", as the KEP does)
MAX_TIME_TEXT = 64  # RFC 3339 takes about 32
MAX_URI_TEXT = 2048


class BadReport(ValueError):
    """A body the endpoint refuses as a whole (400)."""


@dataclass
class TokenRate:
    """A job's last (monotonic time, tokens seen): tokens/s comes from two reports."""

    last: tuple[float, float] | None = None


def _finite(value: Any) -> tuple[float | None, str | None]:
    """A finite float from a JSON number or a numeric string, else (None, why)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None, "type"
    if isinstance(value, str) and len(value) > MAX_NUMBER_TEXT:
        return None, "length"
    try:
        f = float(value)
    except ValueError:
        return None, "type"
    except OverflowError:  # an int past float's range
        return None, "range"
    return (f, None) if math.isfinite(f) else (None, "nonfinite")


def from_trainer_status(ts: dict[str, Any]) -> dict[str, Any]:
    """A TrainJob's ``status.trainerStatus`` (Kubeflow's own KEP-2779 endpoint wrote it) as
    kubetune's progress report, cleaned the same way as a report to kubetune's endpoint."""
    return report_fields(ts, Clean(), TokenRate()) if isinstance(ts, dict) else {}


class Clean:
    """Cleans one report field by field: a value that does not fit is dropped and counted.
    An absent field (None) is neither."""

    def __init__(self) -> None:
        self.dropped: list[str] = []

    def drop(self, name: str, why: str) -> None:
        metrics.PROGRESS_FIELDS_DROPPED.labels(name, why).inc()
        if name not in self.dropped:
            self.dropped.append(name)

    def number(self, name: str, value: Any, low: float = -math.inf,
               high: float = math.inf) -> float | None:
        if value is None:
            return None
        f, why = _finite(value)
        if f is not None and not low <= f <= high:
            f, why = None, "range"
        if why:
            self.drop(name, why)
        return f

    def count(self, name: str, value: Any) -> int | None:
        """A step count: an int in [0, int64], from 42, 42.0 or "42" (a fraction is cut)."""
        if value is None:
            return None
        n: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif isinstance(value, str) and value.isascii() and value.strip().isdigit():
            n = int(value)
        elif (f := self.number(name, value)) is not None:
            n = int(f)
        else:
            return None  # counted by number()
        if not 0 <= n <= INT64_MAX:
            self.drop(name, "range")
            return None
        return n

    def text(self, name: str, value: Any, limit: int) -> str | None:
        """A string as sent, never ``str()`` of something else."""
        if value is None:
            return None
        why = None
        if not isinstance(value, str):
            why = "type"
        elif len(value) > limit:
            why = "length"
        elif not _utf8(value):  # a lone surrogate ("\\ud800") cannot be sent on
            why = "encoding"
        if why:
            self.drop(name, why)
            return None
        return value


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def checkpoint(value: Any, clean: Clean) -> dict[str, Any] | None:
    """A checkpoint report in the status's own shape, or None (a bad one is dropped, not
    allowed to make every later status patch fail)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        clean.drop("checkpoint", "type")
        return None
    step = clean.count("checkpoint.step", value.get("step"))
    uri = clean.text("checkpoint.uri", value.get("uri"), MAX_URI_TEXT)
    loss, why = _finite(value.get("loss")) if value.get("loss") is not None else (None, None)
    if step is None or uri is None or why not in (None, "nonfinite"):
        clean.drop("checkpoint", "incomplete" if step is None or uri is None else why)
        return None
    if why:  # NaN or infinite: a diverged run's checkpoint is still a checkpoint
        clean.drop("checkpoint.loss", why)
    return as_api(Checkpoint(step=step, uri=uri, loss=loss))


def outputs(value: Any, clean: Clean) -> dict[str, Any]:
    """Output URIs, and the run's final metrics (``{"metrics": {name: number}}``)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        clean.drop("outputs", "type")
        return {}
    outs: dict[str, Any] = {k: clean.text(f"outputs.{k}", value.get(k), MAX_URI_TEXT)
                            for k in _OUTPUTS}
    final = value.get("metrics")
    if isinstance(final, dict):
        kept: dict[str, float] = {}
        for name, v in final.items():
            if not (isinstance(name, str) and _FINAL_METRIC.match(name)):
                clean.drop("outputs.metrics", "name")
            elif len(kept) >= MAX_STAGE_METRICS:
                clean.drop("outputs.metrics", "count")
                break
            elif (f := clean.number(f"outputs.metrics.{name}", v)) is not None:
                kept[name] = f
        outs["metrics"] = kept or None
    elif final is not None:
        clean.drop("outputs.metrics", "type")
    return as_api(Outputs.model_validate({k: v for k, v in outs.items() if v is not None}))


def _stage_metrics(named: dict[str, Any], clean: Clean) -> dict[str, float]:
    """The stage's own metrics (rewards/margins, kl, …): finite numbers, a bounded count."""
    out: dict[str, float] = {}
    for name, value in named.items():
        if not _STAGE_METRIC.match(name):
            continue
        if len(out) >= MAX_STAGE_METRICS:
            clean.drop("metrics", "count")
            break
        if (v := clean.number(f"metrics.{name}", value)) is not None:
            out[name] = v
    return out


def _metrics(value: Any, clean: Clean) -> dict[str, Any]:
    """The metrics we map, by name, from the KEP's ``[{"name": …, "value": …}]``."""
    if value is None:
        return {}
    if not isinstance(value, list):
        clean.drop("metrics", "type")
        return {}
    out: dict[str, Any] = {}
    for m in value:
        name = m.get("name") if isinstance(m, dict) else None
        if not isinstance(name, str):
            clean.drop("metrics", "type")
        elif name in _METRIC_MAP or name == _TOKENS or _STAGE_METRIC.match(name):
            out[name] = m.get("value")
    return out


def report_fields(ts: dict[str, Any], clean: Clean, rate: TokenRate) -> dict[str, Any]:
    """A KEP-2779 ``trainerStatus`` as status.progress fields, each cleaned (``clean`` says
    what was dropped); ``rate``: the job's tokens seen, for tokens/s."""
    out: dict[str, Any] = {}
    # A percentage past 100 or below 0 is a rounding slip, not a reason to lose the report.
    if (p := clean.number("percent", ts.get("progressPercentage"))) is not None:
        out["percent"] = round(min(max(p, 0.0), 100.0), 2)
    if (e := clean.number("etaSeconds", ts.get("estimatedRemainingSeconds"), 0,
                          MAX_ETA_SECONDS)) is not None:
        out["etaSeconds"] = e
    metrics_ = _metrics(ts.get("metrics"), clean)
    for key, target in _METRIC_MAP.items():
        if target in ("step", "totalSteps"):
            v: float | int | None = clean.count(target, metrics_.get(key))
        else:
            v = clean.number(target, metrics_.get(key))
        if v is not None:
            out[target] = v
    if stage := _stage_metrics(metrics_, clean):
        out["metrics"] = stage
    tokens = clean.number("tokensPerSecond", metrics_.get(_TOKENS), 0)
    if tokens is not None:
        t = time.monotonic()
        last = rate.last
        if last and t > last[0] and tokens >= last[1]:
            per_second = round((tokens - last[1]) / (t - last[0]), 1)
            if math.isfinite(per_second):
                out["tokensPerSecond"] = per_second
        rate.last = (t, tokens)
    if (u := clean.text("updatedAt", ts.get("lastUpdatedTime"), MAX_TIME_TEXT)) is not None:
        out["updatedAt"] = u
    return out
