"""spec.preference: settings of the preference stages (rm, dpo, kto, orpo, cpo)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from kubetune.api.v1alpha1._base import Rule, _cel_list, _enforce, _rules, _Spec

# --------------------------------------------------------------------------- preference


DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
              "sigmoid_norm")
CPO_LOSSES = ("sigmoid", "hinge", "ipo", "simpo")
_STAGES_WITH_REFERENCE = ("dpo", "kto")


_PREFERENCE_RULES = (
    Rule(
        cel="!has(self.lossWeights) || (has(self.lossType) "
        "&& size(self.lossWeights) == size(self.lossType))",
        message="preference.lossWeights needs one weight per entry of preference.lossType",
        check=lambda p: p.loss_weights is None or (
            p.loss_type is not None and len(p.loss_weights) == len(p.loss_type)),
    ),
)


class PreferenceSpec(_Spec):
    """How a preference stage weighs chosen against rejected answers. Each field says which
    stages read it; setting one for another stage is refused."""

    model_config = ConfigDict(json_schema_extra=_rules(*_PREFERENCE_RULES))

    beta: Annotated[
        float | None,
        Field(gt=0, le=100, description="dpo, kto, cpo: strength of the pull towards the "
              "reference (lower: further from it); orpo: weight of the odds-ratio term "
              "(lambda). Default 0.1 (cpo with simpo: 2.0)."),
    ] = None
    loss_type: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=32)]] | None,
        Field(min_length=1, max_length=8,
              description="dpo: one or more of " + ", ".join(DPO_LOSSES) + " (combined with "
              "lossWeights; e.g. [sigmoid, sft] adds the SFT loss on chosen answers, as RPO "
              "does). cpo: exactly one of " + ", ".join(CPO_LOSSES) + ". Default: sigmoid."),
    ] = None
    loss_weights: Annotated[
        list[Annotated[float, Field(ge=0, le=1000)]] | None,
        Field(min_length=1, max_length=8,
              description="dpo: a weight per lossType entry (default 1 each)."),
    ] = None
    label_smoothing: Annotated[
        float | None,
        Field(ge=0, le=0.5, description="dpo (sigmoid, robust), cpo: probability that a pair "
              "is labelled the wrong way round (conservative DPO). Default 0."),
    ] = None
    precompute_ref_log_probs: Annotated[
        bool | None,
        Field(description="dpo, kto: compute the reference model's log-probabilities once "
              "before training (saves memory for full fine-tuning). Default false."),
    ] = None
    desirable_weight: Annotated[
        float | None, Field(gt=0, le=100, description="kto: weight of desirable answers "
                            "(default 1; raise it when they are rarer than undesirable ones).")
    ] = None
    undesirable_weight: Annotated[
        float | None, Field(gt=0, le=100, description="kto: weight of undesirable answers "
                            "(default 1).")
    ] = None
    simpo_gamma: Annotated[
        float | None, Field(ge=0, le=100, description="cpo with lossType simpo: target reward "
                            "margin (default 0.5).")
    ] = None
    cpo_alpha: Annotated[
        float | None, Field(ge=0, le=100, description="cpo: weight of the SFT term on chosen "
                            "answers (default 1; SimPO proper uses 0).")
    ] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _PREFERENCE_RULES)


def _only_for(field: str, stages: tuple[str, ...], attr: str) -> Rule:
    cel_field = "self.preference." + field
    return Rule(
        cel=f"!has(self.preference) || !has({cel_field}) || "
        f"(has(self.stage) && self.stage in {_cel_list(stages)})",
        message=f"preference.{field} is only read by stage {' or '.join(stages)}",
        check=lambda s: s.preference is None or getattr(s.preference, attr) is None
        or s.stage in stages,
    )


_PREFERENCE_SPEC_RULES = (
    Rule(
        cel="!has(self.preference) || (has(self.stage) && self.stage in "
        "['rm', 'dpo', 'kto', 'orpo', 'cpo'])",
        message="preference is only read by the preference stages rm, dpo, kto, orpo and cpo",
        check=lambda s: s.preference is None or s.stage in ("rm", "dpo", "kto", "orpo", "cpo"),
    ),
    _only_for("beta", ("dpo", "kto", "orpo", "cpo"), "beta"),
    _only_for("lossType", ("dpo", "cpo"), "loss_type"),
    _only_for("lossWeights", ("dpo",), "loss_weights"),
    _only_for("labelSmoothing", ("dpo", "cpo"), "label_smoothing"),
    _only_for("precomputeRefLogProbs", _STAGES_WITH_REFERENCE, "precompute_ref_log_probs"),
    _only_for("desirableWeight", ("kto",), "desirable_weight"),
    _only_for("undesirableWeight", ("kto",), "undesirable_weight"),
    _only_for("simpoGamma", ("cpo",), "simpo_gamma"),
    _only_for("cpoAlpha", ("cpo",), "cpo_alpha"),
    Rule(
        cel="!has(self.preference) || !has(self.preference.lossType) || !has(self.stage) "
        f"|| self.stage != 'dpo' || self.preference.lossType.all(l, l in {_cel_list(DPO_LOSSES)})",
        message="preference.lossType for dpo takes " + ", ".join(DPO_LOSSES),
        check=lambda s: s.preference is None or s.preference.loss_type is None
        or s.stage != "dpo" or all(x in DPO_LOSSES for x in s.preference.loss_type),
    ),
    Rule(
        cel="!has(self.preference) || !has(self.preference.lossType) || !has(self.stage) "
        "|| self.stage != 'cpo' || (size(self.preference.lossType) == 1 && "
        f"self.preference.lossType[0] in {_cel_list(CPO_LOSSES)})",
        message="preference.lossType for cpo takes exactly one of " + ", ".join(CPO_LOSSES),
        check=lambda s: s.preference is None or s.preference.loss_type is None
        or s.stage != "cpo" or (len(s.preference.loss_type) == 1
                                and s.preference.loss_type[0] in CPO_LOSSES),
    ),
    Rule(
        cel="!has(self.stage) || self.stage != 'kto' || !has(self.training) || "
        "!has(self.training.batchSizePerDevice) || self.training.batchSizePerDevice > 1",
        message="stage kto needs training.batchSizePerDevice of at least 2 (its KL estimate "
        "pairs each answer with another prompt of the same batch)",
        check=lambda s: s.stage != "kto" or s.training.batch_size_per_device > 1,
    ),
)
