"""FineTuneSweep: a hyper-parameter search whose trials are FineTuneJobs.

The template is a FineTuneJob spec; each parameter names a spec path (``training.learningRate``)
and the values it takes (a list, or a range on a linear or log scale). ``kubetune.sweep`` turns
a sweep into trials (the algorithms, the median stopping rule); every trial is a FineTuneJob
that the job parser accepts before any is created.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, WithJsonSchema, model_validator

from kubetune.api.v1alpha1._base import (
    _ENUM,
    Rule,
    _enforce,
    _Model,
    _rules,
    _Spec,
)
from kubetune.api.v1alpha1.job import NAME_PATTERN, ObjectMeta
from kubetune.api.v1alpha1.serve import ServeSpec
from kubetune.api.v1alpha1.spec import FineTuneJobSpec
from kubetune.api.v1alpha1.status import Condition

SWEEP_KIND = "FineTuneSweep"
SWEEP_PLURAL = "finetunesweeps"
SWEEP_SHORT_NAMES = ["fts"]
MAX_TRIALS = 1000
# Observations kept per trial in the status (early stopping only): a thousand trials' worth
# stays well under the API server's object size limit (about 1.5 MB).
MAX_OBSERVATIONS = 32
# A trial is named SWEEP-N (N < MAX_TRIALS) and a FineTuneJob name has at most 50 characters.
SWEEP_NAME_MAX = 50 - len(f"-{MAX_TRIALS - 1}")
# A spec path in camelCase, as the FineTuneJob is written: training.learningRate, or a list
# item by index, datasets[0].source.
SPEC_PATH = r"^[a-z][A-Za-z0-9]*(\[[0-9]{1,2}\])?([.][a-z][A-Za-z0-9]*(\[[0-9]{1,2}\])?){0,7}$"
# The algorithms kubetune.sweep.ALGORITHMS implements (a test keeps the two the same).
ALGORITHMS = ("grid", "random")

_NAME_RULES = (
    Rule(
        cel="!has(self.metadata.name) || (size(self.metadata.name) <= "
        f"{SWEEP_NAME_MAX} && self.metadata.name.matches('{NAME_PATTERN}'))",
        message=f"metadata.name must be at most {SWEEP_NAME_MAX} lower-case letters, digits "
        "and '-', starting with a letter (its trials are FineTuneJobs named NAME-N)",
        check=lambda m: len(m.name) <= SWEEP_NAME_MAX
        and re.fullmatch(NAME_PATTERN, m.name) is not None,
    ),
)


class Scale(enum.StrEnum):
    linear = "linear"
    log = "log"


_RANGE_RULES = (
    Rule(
        cel="self.min < self.max",
        message="parameters[].range: min must be below max",
        check=lambda r: r.min < r.max,
    ),
    Rule(
        cel="!has(self.scale) || self.scale != 'log' || self.min > 0.0",
        message="parameters[].range: a log scale needs min above 0",
        check=lambda r: r.scale != "log" or r.min > 0,
    ),
)


class RangeSpec(_Spec):
    """Values between min and max: ``count`` evenly spaced points for grid (evenly in the
    logarithm with scale log), a uniform draw (of the logarithm with log) for random."""

    model_config = ConfigDict(json_schema_extra=_rules(*_RANGE_RULES))

    min: Annotated[float, Field(description="The lowest value.")]
    max: Annotated[float, Field(description="The highest value.")]
    scale: Annotated[Scale, Field(description="linear, or log (learning rates, betas).",
                                  **_ENUM)] = Scale.linear
    count: Annotated[int, Field(ge=2, le=MAX_TRIALS, description="grid: how many points, min "
                                "and max included.")] = 3
    integer: Annotated[bool, Field(description="Round to whole numbers (a rank, a batch "
                                   "size).")] = False

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _RANGE_RULES)


# A value a parameter takes: any JSON value (a number, a string, a list of target modules);
# the trial's FineTuneJob spec is what checks it.
_VALUE = Annotated[Any, WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True})]

_PARAMETER_RULES = (
    Rule(
        cel="has(self.values) != has(self.range)",
        message="parameters[]: give values or range, one of the two",
        check=lambda p: (p.values is None) != (p.range is None),
    ),
)


class ParameterSpec(_Spec):
    """One spec field the sweep varies."""

    model_config = ConfigDict(json_schema_extra=_rules(*_PARAMETER_RULES))

    path: Annotated[str, Field(max_length=256, pattern=SPEC_PATH, description=(
        "A field of the FineTuneJob spec in camelCase, e.g. training.learningRate, "
        "method.lora.rank, preference.beta."))]
    values: Annotated[list[_VALUE] | None, Field(min_length=1, max_length=MAX_TRIALS,
                                                 description="The values to try.")] = None
    range: Annotated[RangeSpec | None, Field(description="A range of numbers instead of "
                                             "values.")] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        if self.values is not None and any(v is None for v in self.values):
            raise ValueError(f"parameters[{self.path}].values: null is not a value")
        return _enforce(self, _PARAMETER_RULES)


class AlgorithmSpec(_Spec):
    """How parameter values are combined into trials. Another algorithm is one function in
    ``kubetune.sweep.ALGORITHMS`` and its name in ``ALGORITHMS`` here."""

    type: Annotated[Literal[ALGORITHMS], Field(  # type: ignore[valid-type]
        description="grid: every combination, in order (ranges give count points); random: "
        "up to maxTrials different draws, each value uniform (ranges on their scale).")
    ] = "grid"
    seed: Annotated[int, Field(ge=0, le=2**32 - 1, description="random: the draws' seed (the "
                               "same seed, the same trials).")] = 0


class ObjectiveSpec(_Spec):
    """What makes a trial better: a metric the trials report, minimized or maximized."""

    metric: Annotated[str, Field(min_length=1, max_length=128, pattern="^[A-Za-z0-9_./-]+$",
                                 description=(
        "A metric of the trials: eval_loss, loss (training loss), or any the stage logs "
        "(status.progress.metrics, status.outputs.metrics), e.g. eval_rewards/accuracies."))]
    direction: Annotated[Literal["minimize", "maximize"], Field(
        description="minimize (losses) or maximize (accuracies, rewards).")] = "minimize"
    step: Annotated[int | None, Field(ge=1, le=10**9, description=(
        "Read the metric as logged at this step; default: the trial's final metrics (its "
        "last logged value where the final metrics lack it)."))] = None


class EarlyStoppingSpec(_Spec):
    """The median stopping rule: at a step where it reports the objective, a running trial
    worse than the median of the completed trials' values at the same step is stopped."""

    type: Annotated[Literal["median"], Field(description="median (the only rule so far).")
                    ] = "median"
    min_steps: Annotated[int, Field(ge=1, le=10**9, description="No trial is stopped before "
                                    "this step.")] = 1
    min_trials: Annotated[int, Field(ge=1, le=MAX_TRIALS, description="Completed trials with "
                                     "a value at that step before any is stopped.")] = 1


_SWEEP_SPEC_RULES = (
    Rule(
        cel="!has(self.template.serve)",
        message="template.serve: trials are not served; promote serves the best one",
        check=lambda s: s.template.serve is None,
        field_path=".template",
    ),
    Rule(
        cel="!has(self.template.suspend) || !self.template.suspend",
        message="template.suspend: suspend the sweep (spec.suspend) instead",
        check=lambda s: not s.template.suspend,
        field_path=".template",
    ),
    Rule(
        cel="self.parameters.all(p, self.parameters.exists_one(q, q.path == p.path))",
        message="parameters[]: each path at most once",
        check=lambda s: len({p.path for p in s.parameters}) == len(s.parameters),
        field_path=".parameters",
    ),
    Rule(
        cel="!has(self.parallelism) || !has(self.maxTrials) || "
        "self.parallelism <= self.maxTrials",
        message="parallelism is at most maxTrials",
        check=lambda s: s.parallelism <= s.max_trials,
    ),
)


def _fixed(field: str) -> dict[str, Any]:
    """A CEL transition rule: the trials are planned from it, so it cannot change."""
    return {"x-kubernetes-validations": [{
        "rule": "self == oldSelf",
        "message": f"spec.{field} cannot change after the sweep is created (its trials are "
        "planned from it); create a new FineTuneSweep",
    }]}


class FineTuneSweepSpec(_Spec):
    """A search over FineTuneJob settings: trials made from the template, run at most
    parallelism at a time, the best by the objective."""

    model_config = ConfigDict(json_schema_extra=_rules(*_SWEEP_SPEC_RULES))

    template: Annotated[FineTuneJobSpec, Field(json_schema_extra=_fixed("template"), description=(
        "The FineTuneJob spec every trial starts from; each trial writes to its own folder "
        "under output.uri (hf:// outputs: a repository named NAME-TRIAL)."))]
    parameters: Annotated[list[ParameterSpec], Field(
        min_length=1, max_length=16, json_schema_extra=_fixed("parameters"),
        description="The fields that vary.")]
    algorithm: Annotated[AlgorithmSpec, Field(
        json_schema_extra=_fixed("algorithm"), description="grid (default) or random.")
    ] = AlgorithmSpec()
    objective: ObjectiveSpec
    max_trials: Annotated[int, Field(ge=1, le=MAX_TRIALS, description=(
        "Trials at most (grid: the first this many combinations)."))] = 16
    parallelism: Annotated[int, Field(ge=1, le=MAX_TRIALS, description=(
        "Trials running at once (each one queued like any job, e.g. by Kueue)."))] = 1
    early_stopping: Annotated[EarlyStoppingSpec | None, Field(
        description="Stop trials that are behind (the median rule).")] = None
    promote: Annotated[ServeSpec | None, Field(description=(
        "Once the sweep completes, serve the best trial with this (its spec.serve, under the "
        "same rules and the same gate: a best trial that misses promote.gate is not served, "
        "and no other is served in its place)."))] = None
    suspend: Annotated[bool, Field(description="Suspend every trial (and create none); set "
                                   "back to false to go on.")] = False

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _SWEEP_SPEC_RULES)


class Observation(_Model):
    """The objective as a trial logged it at one step."""

    step: Annotated[int, Field(ge=0, description="The step.")]
    value: Annotated[float, Field(description="The metric then.")]


class TrialStatus(_Model):
    """One trial: its FineTuneJob, what it tries, how it went."""

    name: Annotated[str, Field(description="The FineTuneJob.")]
    parameters: Annotated[dict[str, str], Field(description=(
        "Spec path -> the value tried (as JSON)."))]
    phase: Annotated[Literal["Pending", "Queued", "Running", "Succeeded", "Failed",
                             "Suspended", "Stopped"] | None, Field(description=(
        "The FineTuneJob's phase; Stopped when early stopping ended it."))] = None
    value: Annotated[float | None, Field(description="The objective's value.")] = None
    stopped_early: Annotated[bool, Field(description="Early stopping ended it.")] = False
    observations: Annotated[list[Observation], Field(max_length=MAX_OBSERVATIONS, description=(
        "With earlyStopping: the objective at the steps it was reported at (running and "
        "succeeded trials; at most 32, spread over the run)."))] = []


class BestTrial(_Model):
    """The best completed trial so far."""

    name: Annotated[str, Field(description="The FineTuneJob.")]
    parameters: Annotated[dict[str, str], Field(description="Spec path -> value (as JSON).")]
    value: Annotated[float, Field(description="Its objective.")]


class FineTuneSweepStatus(_Model):
    """What the operator observed; written only by the operator."""

    observed_generation: Annotated[int | None, Field(ge=0, description=(
        "The metadata.generation the status is for."))] = None
    conditions: Annotated[list[Condition], Field(description=(
        "Ready, Reconciling, Stalled, Succeeded (kstatus); Promoted once the best trial "
        "is promoted (False with GateNotMet or GateMetricMissing: it missed promote.gate, "
        "and is not served)."))] = []
    trials_total: Annotated[int | None, Field(ge=0, description="Trials the sweep runs.")
                            ] = None
    trials_done: Annotated[int | None, Field(ge=0, description="Trials that ended.")] = None
    done: Annotated[str | None, Field(description='trialsDone/trialsTotal, e.g. "3/8" (for '
                                      "kubectl get).")] = None
    trials: Annotated[list[TrialStatus], Field(description="Every trial created.")] = []
    best: Annotated[BestTrial | None, Field(description="The best trial so far.")] = None


class FineTuneSweep(_Model):
    api_version: Literal["kubetune.io/v1alpha1"]
    kind: Literal["FineTuneSweep"]
    metadata: ObjectMeta
    spec: FineTuneSweepSpec
    status: FineTuneSweepStatus | None = None

    @model_validator(mode="after")
    def _name_rules(self) -> Any:
        _enforce(self.metadata, _NAME_RULES)
        return self


SWEEP_RULES = {
    "metadata": _NAME_RULES,
    "spec": _SWEEP_SPEC_RULES,
    "spec.parameters[]": _PARAMETER_RULES,
    "spec.parameters[].range": _RANGE_RULES,
}
