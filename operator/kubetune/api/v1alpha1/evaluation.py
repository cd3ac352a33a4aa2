"""spec.evaluation: what runs after the last step."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from kubetune.api.v1alpha1._base import (
    NO_CONTROL,
    Rule,
    _enforce,
    _rules,
    _Spec,
    hf_rule,
    url_rule,
)
from kubetune.api.v1alpha1.sources import Source

# --------------------------------------------------------------------------- evaluation


_LM_EVAL_RULES = (url_rule("include", "evaluation.lmEval.include", "a pvc:// claim"),
                  hf_rule("include", "evaluation.lmEval.include"))


class LmEvalSpec(_Spec):
    """Benchmarks of the final model with lm-evaluation-harness (PyPI lm-eval)."""

    model_config = ConfigDict(json_schema_extra=_rules(*_LM_EVAL_RULES))

    tasks: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128, pattern=NO_CONTROL)]],
        Field(min_length=1, max_length=32, description="lm-eval task (or group) names, e.g. "
              "arc_easy, or tasks defined in include."),
    ]
    include: Annotated[
        Source | None,
        Field(description="A directory of lm-eval task YAML files (and their data), e.g. "
              "pvc://CLAIM/tasks: tasks whose data is there need no download."),
    ] = None
    limit: Annotated[int | None, Field(ge=1, le=10**7, description="Rows per task at most "
                                       "(all when unset).")] = None
    num_fewshot: Annotated[int | None, Field(ge=0, le=128, description="Few-shot examples "
                                             "(the task's own default when unset).")] = None
    batch_size: Annotated[int, Field(ge=1, le=1024, description="Rows per forward pass.")] = 8

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _LM_EVAL_RULES)


class EvaluationSpec(_Spec):
    """What runs after the last step, on the held-out rows (training.evalSplit)."""

    predict: Annotated[
        bool, Field(description="Generate an answer to each held-out prompt (greedy) and "
                    "score it against the reference answer: ROUGE-1/2/L and BLEU-4 (x100), "
                    "written with the answers to generated_predictions.jsonl.")
    ] = False
    max_samples: Annotated[
        int, Field(ge=1, le=100_000, description="Held-out prompts answered at most.")
    ] = 64
    max_new_tokens: Annotated[
        int, Field(ge=1, le=32768, description="Tokens generated per answer at most.")
    ] = 256
    lm_eval: Annotated[
        LmEvalSpec | None,
        Field(description="After training, score the final model (merged, or base + adapter) "
              "on lm-eval tasks; scores go to result.json and status.outputs.metrics as "
              "lmeval_TASK_METRIC."),
    ] = None


_EVALUATION_SPEC_RULES = (
    Rule(
        cel="!has(self.training) || !has(self.training.evalSteps) || has(self.evalDatasets) "
        "|| (has(self.training.evalSplit) && self.training.evalSplit > 0.0)",
        message="training.evalSteps needs held-out rows to evaluate: training.evalSplit > 0 "
        "or evalDatasets",
        check=lambda s: s.training.eval_steps is None or s.eval_datasets is not None
        or s.training.eval_split > 0,
    ),
    Rule(
        cel="!has(self.evaluation) || !has(self.evaluation.predict) || "
        "!self.evaluation.predict || (((has(self.training) && has(self.training.evalSplit) && "
        "self.training.evalSplit > 0.0) || has(self.evalDatasets)) && "
        "(!has(self.stage) || self.stage == 'sft'))",
        message="evaluation.predict needs stage sft and held-out conversations to answer: "
        "training.evalSplit > 0 or evalDatasets",
        check=lambda s: s.evaluation is None or not s.evaluation.predict or (
            (s.training.eval_split > 0 or s.eval_datasets is not None) and s.stage == "sft"),
    ),
    Rule(
        cel="!has(self.evaluation) || !has(self.evaluation.predict) || "
        "!self.evaluation.predict || !has(self.resources) || !has(self.resources.strategy) || "
        "!(self.resources.strategy in ['zero3', 'zero3-offload', 'fsdp2'])",
        message="evaluation.predict generates on one process from the whole model: not with "
        "resources.strategy zero3, zero3-offload or fsdp2, which shard the weights (use "
        "evaluation.lmEval, or predict from a separate job)",
        check=lambda s: s.evaluation is None or not s.evaluation.predict
        or s.resources.strategy not in ("zero3", "zero3-offload", "fsdp2"),
    ),
    Rule(
        cel="!has(self.evalDatasets) || !has(self.training) || !has(self.training.evalSplit) "
        "|| self.training.evalSplit == 0.0",
        message="evalDatasets and training.evalSplit are two ways to hold rows out for "
        "evaluation: use one",
        check=lambda s: s.eval_datasets is None or s.training.eval_split == 0,
    ),
    Rule(
        cel="!has(self.evaluation) || !has(self.evaluation.lmEval) || !has(self.stage) || "
        "self.stage != 'rm'",
        message="evaluation.lmEval scores a language model; stage rm trains a reward model",
        check=lambda s: s.evaluation is None or s.evaluation.lm_eval is None or s.stage != "rm",
    ),
)
