"""spec.evaluation: what runs after the last step."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from kubetune.api.v1alpha1._base import Rule, _Spec

# --------------------------------------------------------------------------- evaluation


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


_EVALUATION_SPEC_RULES = (
    Rule(
        cel="!has(self.evaluation) || !has(self.evaluation.predict) || "
        "!self.evaluation.predict || (has(self.training) && has(self.training.evalSplit) && "
        "self.training.evalSplit > 0.0 && (!has(self.stage) || self.stage == 'sft'))",
        message="evaluation.predict needs stage sft and training.evalSplit > 0 (the held-out "
        "conversations it answers)",
        check=lambda s: s.evaluation is None or not s.evaluation.predict or (
            s.training.eval_split > 0 and s.stage == "sft"),
    ),
)
