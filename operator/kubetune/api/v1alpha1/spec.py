"""FineTuneJobSpec: the spec as a whole, and its rules across sections."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from kubetune.api.stages import IMPLEMENTED_STAGES, STAGES
from kubetune.api.v1alpha1._base import _ENUM, TEMPLATES, Rule, _enforce, _rules, _Spec, immutable
from kubetune.api.v1alpha1.evaluation import _EVALUATION_SPEC_RULES, EvaluationSpec
from kubetune.api.v1alpha1.method import _METHOD_SPEC_RULES, MethodSpec
from kubetune.api.v1alpha1.output import OutputSpec
from kubetune.api.v1alpha1.preference import _PREFERENCE_SPEC_RULES, PreferenceSpec
from kubetune.api.v1alpha1.resources import ResourcesSpec, RunPolicySpec, SchedulingSpec
from kubetune.api.v1alpha1.rl import _RL_SPEC_RULES, GrpoSpec, RewardSpec
from kubetune.api.v1alpha1.serve import SERVE_SPEC_RULE, ServeSpec
from kubetune.api.v1alpha1.sources import DatasetSpec, ModelSpec
from kubetune.api.v1alpha1.trainer import TrainerSpec
from kubetune.api.v1alpha1.training import TrainingSpec

# --------------------------------------------------------------------------- the spec


Stage = enum.StrEnum("Stage", {s: s for s in STAGES})

_NOT_YET = sorted(set(STAGES) - IMPLEMENTED_STAGES)
STAGE_MESSAGE = (
    f"spec.stage: {' and '.join(_NOT_YET)} is not available in this version of kubetune ("
    + "; ".join(f"{s}: {STAGES[s].summary}" for s in _NOT_YET)
    + f"); implemented: {', '.join(s for s in STAGES if s in IMPLEMENTED_STAGES)}"
)
_STAGE_RULE = Rule(
    cel="!has(self.stage) || self.stage in [" + ", ".join(
        f"'{s}'" for s in STAGES if s in IMPLEMENTED_STAGES) + "]",
    message=STAGE_MESSAGE,
    check=lambda s: s.stage in IMPLEMENTED_STAGES,
    field_path=".stage",
)


_SPEC_RULES = (
    _STAGE_RULE,
    *_EVALUATION_SPEC_RULES,
    *_PREFERENCE_SPEC_RULES,
    *_RL_SPEC_RULES,
    *_METHOD_SPEC_RULES,
    Rule(
        cel="!has(self.output.merge) || !self.output.merge || !has(self.method) "
        "|| !has(self.method.type) || self.method.type == 'lora'",
        message="output.merge needs method.type lora (full and freeze already save a whole "
        "model)",
        check=lambda s: not s.output.merge or s.method.type == "lora",
    ),
    SERVE_SPEC_RULE,
)


class FineTuneJobSpec(_Spec):
    """What to fine-tune, on which data, how, and where the result goes."""

    model_config = ConfigDict(json_schema_extra=_rules(*_SPEC_RULES))

    model: ModelSpec
    datasets: Annotated[list[DatasetSpec], Field(
        min_length=1, max_length=64, description="The training data: every data set's rows, "
        "mixed (evalSplit holds some out).")]
    eval_datasets: Annotated[list[DatasetSpec] | None, Field(
        min_length=1, max_length=64, description="Held-out data for eval loss/perplexity "
        "(and evaluation.predict) instead of training.evalSplit: read, templated and "
        "tokenized like datasets, never trained on.")] = None
    stage: Annotated[
        Stage,
        Field(description="What to train: " + "; ".join(
            f"{k}: {v.summary}" + ("" if v.implemented else " (planned)")
            for k, v in STAGES.items()) + ".",
            json_schema_extra=immutable("spec.stage"), **_ENUM),
    ] = Stage.sft
    preference: Annotated[
        PreferenceSpec | None,
        Field(description="Settings of the preference stages (rm, dpo, kto, orpo, cpo)."),
    ] = None
    rewards: Annotated[
        list[RewardSpec] | None,
        Field(min_length=1, max_length=16, description="grpo: what a completion scores; the "
              "run maximises their weighted sum."),
    ] = None
    grpo: Annotated[GrpoSpec | None, Field(description="grpo: generation and loss.")] = None
    evaluation: Annotated[
        EvaluationSpec | None, Field(description="After the last step: answers to held-out "
                                     "prompts, scored (predict); lm-eval benchmarks (lmEval).")
    ] = None
    method: MethodSpec = MethodSpec()
    template: Annotated[
        Literal[TEMPLATES],  # type: ignore[valid-type]
        Field(
            description='"auto" (the tokenizer\'s chat template) or a named one: chatml, '
            "llama3, alpaca.",
        ),
    ] = "auto"
    training: TrainingSpec = TrainingSpec()
    resources: ResourcesSpec = ResourcesSpec()
    output: OutputSpec
    scheduling: SchedulingSpec | None = None
    run_policy: RunPolicySpec = RunPolicySpec()
    trainer: TrainerSpec | None = None
    suspend: Annotated[
        bool, Field(description="Stop the pods; set back to false to resume from the last "
                    "checkpoint.")
    ] = False
    serve: Annotated[
        ServeSpec | None,
        Field(description="After success: serve the trained model (OpenAI-compatible) and "
              "check it; unset to remove the server."),
    ] = None
    preflight: Annotated[
        Literal["auto", "always", "skip"] | None,
        Field(description="Before any GPU is asked for, a CPU pod (phase Validating) reads "
              "every row, prepares the data where the training pods find it (a pvc:// "
              "output), and estimates memory and time from the model's real config "
              "(status.preflight); a job whose data or memory fails stops there. auto: for "
              "jobs that ask for GPUs; always; skip. Unset: the operator's default (the "
              "chart's preflight.default, auto)."),
    ] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _SPEC_RULES)

    def learning_rate(self) -> float:
        """training.learningRate, or the stage's usual one."""
        return self.training.learning_rate or STAGES[self.stage].learning_rate

    def preference_or_default(self) -> PreferenceSpec:
        return self.preference or PreferenceSpec()

    def grpo_or_default(self) -> GrpoSpec:
        return self.grpo or GrpoSpec()
