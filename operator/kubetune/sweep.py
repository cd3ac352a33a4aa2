"""FineTuneSweep, the logic both runners share (``kubetune sweep`` here, the operator's
``kubetune_operator.sweeps`` on a cluster): parameter values, the algorithms that combine them
into trials, each trial's FineTuneJob (validated by the job parser before any is created), the
objective read from a trial's results, the median stopping rule and the best trial. Pure: no
I/O, no cluster.

Adding an algorithm: a function ``(parameters, max_trials, seed) -> list[Assignment]`` in
``ALGORITHMS`` below and its name in ``kubetune.api.v1alpha1.sweep.ALGORITHMS`` (the CRD's
enum; a test keeps the two equal). An adaptive algorithm (one that picks the next trial from
the results so far) needs the trials' values too: that is a new signature, not yet here.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import random
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1 import (
    LABEL_VALUE,
    FineTuneJob,
    FineTuneSweep,
    FineTuneSweepSpec,
    ParameterSpec,
    RangeSpec,
)
from kubetune.errors import KubetuneError

Assignment = dict[str, Any]  # spec path -> the value a trial gives it
SWEEP_LABEL = "kubetune.io/sweep"
TRIAL_LABEL = "kubetune.io/trial"
PARAMETER_LABEL_PREFIX = "sweep.kubetune.io/"
# The sweep's labels go to its trials (a Kueue queue name, a team), except those that say
# which GitOps tool manages the sweep: the trials are not in git, and must not look as if
# they were (Argo CD's tracking label, Flux's).
NOT_INHERITED = ("app.kubernetes.io/instance", "argocd.argoproj.io/",
                 "kustomize.toolkit.fluxcd.io/", "helm.toolkit.fluxcd.io/")


# --------------------------------------------------------------------------- values


def _tidy(x: float, digits: int) -> float:
    """0.00031072325 -> 0.000311 (digits 3): a value a person can read and a label can hold."""
    return float(f"{x:.{digits}g}")


def _on_scale(r: RangeSpec, u: float) -> float:
    """The point a fraction ``u`` (0..1) of the way from min to max, on the range's scale."""
    if r.scale == "log":
        return math.exp(math.log(r.min) + u * (math.log(r.max) - math.log(r.min)))
    return r.min + u * (r.max - r.min)


def _number(r: RangeSpec, x: float) -> int | float:
    """A point of the range as a trial gets it: whole with integer; three significant digits
    on a log scale (learning rates: 0.000311), six on a linear one."""
    if r.integer:
        return int(round(x))
    return _tidy(x, 3 if r.scale == "log" else 6)


def grid_values(p: ParameterSpec) -> list[Any]:
    """The values a parameter takes in a grid: its list, or ``count`` points of its range
    (min and max included; integer ranges without repeats)."""
    if p.values is not None:
        return list(p.values)
    r = p.range
    assert r is not None
    out: list[Any] = []
    for i in range(r.count):
        value = _number(r, _on_scale(r, i / (r.count - 1)))
        if value not in out:
            out.append(value)
    return out


def _draw(p: ParameterSpec, rng: random.Random) -> Any:
    if p.values is not None:
        return copy.deepcopy(rng.choice(p.values))
    r = p.range
    assert r is not None
    return _number(r, _on_scale(r, rng.random()))


# --------------------------------------------------------------------------- algorithms


def grid(parameters: Sequence[ParameterSpec], max_trials: int, seed: int) -> list[Assignment]:
    """Every combination in order (the last parameter varies fastest), the first max_trials."""
    del seed  # a grid is the same every time
    combos = itertools.product(*(grid_values(p) for p in parameters))
    return [{p.path: copy.deepcopy(v) for p, v in zip(parameters, combo, strict=True)}
            for combo in itertools.islice(combos, max_trials)]


def random_search(parameters: Sequence[ParameterSpec], max_trials: int, seed: int
                  ) -> list[Assignment]:
    """Up to max_trials draws, each a value of each list and a point of each range (uniform on
    its scale), none the same as an earlier one (fewer when the lists hold fewer
    combinations). The same seed gives the same trials."""
    rng = random.Random(seed)
    out: list[Assignment] = []
    seen: set[str] = set()
    for _ in range(20 * max_trials):  # a repeat is drawn again, within bounds
        if len(out) == max_trials:
            break
        draw = {p.path: _draw(p, rng) for p in parameters}
        if show(draw) not in seen:
            seen.add(show(draw))
            out.append(draw)
    return out


Algorithm = Callable[[Sequence[ParameterSpec], int, int], list[Assignment]]
ALGORITHMS: dict[str, Algorithm] = {"grid": grid, "random": random_search}


def assignments(spec: FineTuneSweepSpec) -> list[Assignment]:
    """The trials' parameter values, in trial order."""
    return ALGORITHMS[spec.algorithm.type](spec.parameters, spec.max_trials,
                                           spec.algorithm.seed)


# --------------------------------------------------------------------------- trials


@dataclass(frozen=True)
class Trial:
    """One trial: its number, its FineTuneJob (validated) and what it tries."""

    index: int
    parameters: Assignment
    job: FineTuneJob

    @property
    def name(self) -> str:
        return self.job.metadata.name


def trial_name(sweep: str, index: int) -> str:
    return f"{sweep}-{index}"


def show(value: Any) -> str:
    """A value as a person and the status read it: JSON (0.0003, "cosine", ["q_proj"])."""
    return json.dumps(value, separators=(",", ":"))


def label_key(path: str) -> str:
    """sweep.kubetune.io/training.learningRate (a list index as .0: datasets.0.source)."""
    return PARAMETER_LABEL_PREFIX + re.sub(r"\[([0-9]+)\]", r".\1", path)[:63]


def label_value(value: Any) -> str:
    """The value as a label where one can hold it (3e-04, 16, cosine, true), else a short
    hash of its JSON (h-1a2b3c4d) so trials with the same value still select together."""
    text = show(value).strip('"') if not isinstance(value, bool) else str(value).lower()
    if len(text) <= 63 and re.fullmatch(LABEL_VALUE, text):
        return text
    return "h-" + hashlib.sha256(show(value).encode()).hexdigest()[:12]


def _set(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set a camelCase spec path in a FineTuneJob spec document, making the mappings on the
    way; a list index must exist (datasets[0] of a template with one data set)."""
    parts = re.findall(r"([A-Za-z0-9]+)(?:\[([0-9]+)\])?", path)
    node: Any = doc
    for i, (key, index) in enumerate(parts):
        last = i == len(parts) - 1
        if index:
            items = node.get(key)
            if not isinstance(items, list) or int(index) >= len(items):
                raise KubetuneError(f"parameters {path}: the template has no {key}[{index}]",
                                    field="spec.parameters")
            if last:
                items[int(index)] = copy.deepcopy(value)
            else:
                node = items[int(index)]
        elif last:
            node[key] = copy.deepcopy(value)
        else:
            if node.get(key) is None:
                node[key] = {}
            elif not isinstance(node[key], dict):
                raise KubetuneError(f"parameters {path}: the template's {key} is not a "
                                    "mapping", field="spec.parameters")
            node = node[key]


def trial_output(uri: str, name: str) -> str:
    """Where a trial writes: a folder named after it under the template's output (an hf://
    repository: one named REPO-TRIAL beside it)."""
    if uri.startswith("hf://"):
        return f"{uri}-{name.rsplit('-', 1)[-1]}"
    return f"{uri.rstrip('/')}/{name}"


def trial_document(sweep: FineTuneSweep, index: int, parameters: Assignment) -> dict[str, Any]:
    """The trial's FineTuneJob as a document (what the operator creates, what ``kubetune
    sweep`` runs): the template with the parameters set, its own output folder, labels
    naming the sweep, the trial and each value."""
    name = trial_name(sweep.metadata.name, index)
    spec = sweep.spec.template.model_dump(by_alias=True, exclude_unset=True, mode="json")
    spec.setdefault("output", {})["uri"] = trial_output(sweep.spec.template.output.uri, name)
    for path, value in parameters.items():
        _set(spec, path, value)
    labels = {k: v for k, v in (sweep.metadata.labels or {}).items()
              if not k.startswith(NOT_INHERITED)}
    labels.update({SWEEP_LABEL: sweep.metadata.name, TRIAL_LABEL: str(index)})
    labels.update({label_key(p): label_value(v) for p, v in parameters.items()})
    metadata: dict[str, Any] = {"name": name, "labels": labels}
    if sweep.metadata.namespace:
        metadata["namespace"] = sweep.metadata.namespace
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": metadata,
            "spec": spec}


def plan(sweep: FineTuneSweep) -> list[Trial]:
    """Every trial, each spec checked by the FineTuneJob parser first: one that it refuses
    is an error naming the trial and the values it was given (nothing is created)."""
    from kubetune.jobfile import parse_job

    trials = []
    for index, parameters in enumerate(assignments(sweep.spec)):
        doc = trial_document(sweep, index, parameters)
        try:
            job = parse_job(doc)
        except KubetuneError as e:
            given = ", ".join(f"{p}={show(v)}" for p, v in parameters.items())
            raise KubetuneError(f"trial {doc['metadata']['name']} ({given}) is not a valid "
                                f"FineTuneJob:\n{e}", field="spec.parameters") from None
        if sweep.spec.promote is not None:  # the gate of spec.serve, on any trial that wins
            served = copy.deepcopy(doc)
            served["spec"]["serve"] = sweep.spec.promote.model_dump(
                by_alias=True, exclude_unset=True, mode="json")
            try:
                parse_job(served)
            except KubetuneError as e:
                raise KubetuneError(f"trial {doc['metadata']['name']} could not be served "
                                    f"with it:\n{e}", field="spec.promote") from None
        trials.append(Trial(index=index, parameters=parameters, job=job))
    return trials


# --------------------------------------------------------------------------- objective


def observations(records: Iterable[dict[str, Any]], metric: str) -> dict[int, float]:
    """step -> the metric's value, from a trial's logged records (progress.jsonl lines, or
    the status' progress as the operator saw it). ``loss`` is the training loss."""
    out: dict[int, float] = {}
    for r in records:
        value = r.get(metric)
        if value is None and isinstance(r.get("metrics"), dict):
            value = r["metrics"].get(metric)
        if isinstance(r.get("step"), int) and isinstance(value, int | float) and math.isfinite(
                value):
            out[r["step"]] = float(value)
    return out


def objective_value(metric: str, step: int | None, final: dict[str, Any] | None,
                    logged: dict[int, float]) -> float | None:
    """A trial's objective: the value logged at ``step`` when the objective names one, else
    its final metrics' value (train_loss for loss), else the last logged value."""
    if step is not None:
        return logged.get(step)
    final = final or {}
    for key in (metric, "train_loss" if metric == "loss" else None):
        value = final.get(key) if key else None
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value)
    return logged[max(logged)] if logged else None


def better(a: float, b: float, direction: str) -> bool:
    return a < b if direction == "minimize" else a > b


def best_index(values: Sequence[float | None], direction: str) -> int | None:
    """The index of the best value (the first of equals), None when none has one."""
    best: int | None = None
    for i, v in enumerate(values):
        if v is not None and (best is None or better(v, values[best], direction)):  # type: ignore[arg-type]
            best = i
    return best


def median_stops(running: dict[int, float], completed: Sequence[dict[int, float]], *,
                 direction: str, min_steps: int, min_trials: int) -> int | None:
    """The median stopping rule: the first step (at or after ``min_steps``) where the running
    trial's value is worse than the median of the completed trials' values at that same step,
    given at least ``min_trials`` of them have one; None when it goes on."""
    for step in sorted(running):
        if step < min_steps:
            continue
        others = [c[step] for c in completed if step in c]
        if len(others) >= min_trials and better(statistics.median(others), running[step],
                                                direction):
            return step
    return None


# --------------------------------------------------------------------------- files


def parse_sweep(doc: object) -> FineTuneSweep:
    """A FineTuneSweep document read as the API server reads it (camelCase, no coercion)."""
    from pydantic import ValidationError

    from kubetune.jobfile import format_validation_error

    if not isinstance(doc, dict):
        raise KubetuneError("a FineTuneSweep must be a YAML mapping")
    try:
        return FineTuneSweep.model_validate(doc, by_alias=True, by_name=False)
    except ValidationError as err:
        raise KubetuneError(format_validation_error(err, root=FineTuneSweep)) from None


def load_sweep(path: Any) -> FineTuneSweep:
    """The one FineTuneSweep of a YAML file (read with the job files' checks)."""
    from kubetune.jobfile import load_one

    return parse_sweep(load_one(path, "FineTuneSweep"))
