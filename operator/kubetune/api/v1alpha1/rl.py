"""spec.rewards and spec.grpo: online RL."""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from kubetune.api.v1alpha1._base import (
    _ENUM,
    SOURCE_HELP,
    SOURCE_PATTERN,
    TEXT,
    Rule,
    _cel_list,
    _enforce,
    _rules,
    _Spec,
    _str,
    hf_rule,
    url_rule,
)

# --------------------------------------------------------------------------- online RL


class RewardType(enum.StrEnum):
    exact_match = "exactMatch"  # the answer equals a column (normalised)
    numeric = "numeric"  # the answer's last number equals a column's, within tolerance
    math = "math"  # mathematically equivalent to a column (math-verify)
    regex = "regex"  # the completion matches a pattern (a format, e.g. <think>…</think>)
    json = "json"  # the answer is JSON (valid against jsonSchema when given)
    length = "length"  # close to target completion tokens
    reward_model = "rewardModel"  # a reward model's score (e.g. an rm job's output)
    python = "python"  # module:function, called with TRL's reward-function arguments


# What each reward type reads; any other of these fields is refused for it.
_REWARD_FIELDS = {
    "column": ("exactMatch", "numeric", "math"),
    "normalize": ("exactMatch",),
    "tolerance": ("numeric",),
    "pattern": ("regex",),
    "jsonSchema": ("json",),
    "target": ("length",),
    "source": ("rewardModel",),
    "fromJob": ("rewardModel",),
    "function": ("python",),
    "path": ("python",),
}
_REWARD_NEEDS = {"exactMatch": "column", "numeric": "column", "math": "column",
                 "regex": "pattern", "length": "target", "python": "function"}


def _reward_rules() -> tuple[Rule, ...]:
    rules = []
    for wire, types in _REWARD_FIELDS.items():
        attr = re.sub(r"(?<!^)(?=[A-Z])", "_", wire).lower()
        rules.append(Rule(
            cel=f"!has(self.{wire}) || self.type in {_cel_list(types)}",
            message=f"rewards[].{wire} is only read by type {' or '.join(types)}",
            check=lambda r, a=attr, t=types: getattr(r, a) is None or r.type in t))
    for type_, wire in _REWARD_NEEDS.items():
        attr = re.sub(r"(?<!^)(?=[A-Z])", "_", wire).lower()
        rules.append(Rule(
            cel=f"self.type != '{type_}' || has(self.{wire})",
            message=f"a reward of type {type_} needs {wire}",
            check=lambda r, a=attr, t=type_: r.type != t or getattr(r, a) is not None))
    return tuple(rules)


_REWARD_RULES = (
    *_reward_rules(),
    Rule(
        cel="self.type != 'rewardModel' || has(self.source) != has(self.fromJob)",
        message="a reward of type rewardModel needs exactly one of source and fromJob",
        check=lambda r: r.type != "rewardModel" or (r.source is None) != (r.from_job is None),
    ),
    url_rule("source", "rewards[].source", "a pvc:// claim or the model's secretRef"),
    hf_rule("source", "rewards[].source"),
    url_rule("path", "rewards[].path", "a pvc:// claim or a ConfigMap mount"),
)


class RewardSpec(_Spec):
    """One reward for grpo; the run maximises the weighted sum of all of them."""

    model_config = ConfigDict(json_schema_extra=_rules(*_REWARD_RULES))

    type: Annotated[RewardType, Field(description="exactMatch, numeric, math, regex, json, "
                                      "length, rewardModel or python.", **_ENUM)]
    name: Annotated[
        str | None,
        _str("^[A-Za-z][A-Za-z0-9_]*$", 40, description="Name in metrics (rewards/NAME/mean); "
             "default: the type and its index."),
    ] = None
    weight: Annotated[float, Field(ge=-100, le=100, description="Weight in the sum.")] = 1.0
    column: Annotated[
        str | None, _str("^[A-Za-z_][A-Za-z0-9_]*$", 64, description="exactMatch, numeric, "
                         "math: the data column with the right answer (e.g. answer).")
    ] = None
    normalize: Annotated[
        bool | None, Field(description="exactMatch: ignore case, spacing, width and trailing "
                           "punctuation (default true).")
    ] = None
    tolerance: Annotated[
        float | None, Field(ge=0, le=1, description="numeric: relative tolerance (default "
                            "1e-6).")
    ] = None
    pattern: Annotated[
        str | None, _str(TEXT, 1024, min_length=1, description="regex: a Python regular "
                         "expression, searched with DOTALL; anchor it with ^…$ for a shape.")
    ] = None
    json_schema: Annotated[
        dict[str, Any] | None,
        Field(description="json: a JSON Schema the answer must satisfy (any JSON without).",
              json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}),
    ] = None
    target: Annotated[
        int | None, Field(ge=1, le=1_000_000, description="length: completion tokens that "
                          "score 1 (0 at none and at twice as many).")
    ] = None
    source: Annotated[
        str | None, _str(SOURCE_PATTERN, 2048, description="rewardModel: the reward model "
                         f"(e.g. an rm job's output/model): {SOURCE_HELP}.")
    ] = None
    from_job: Annotated[
        str | None, _str("^[a-z]([-a-z0-9]*[a-z0-9])?$", 50, description="rewardModel: the "
                         "rm FineTuneJob (in this namespace) whose model scores, instead of "
                         "source; this job waits for it as for model.fromJob.")
    ] = None
    function: Annotated[
        str | None, _str("^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$", 256,
                         description="python: module:function, called as TRL calls reward "
                         "functions (prompts, completions, completion_ids, data columns).")
    ] = None
    path: Annotated[
        str | None, _str(SOURCE_PATTERN, 2048, description="python: a directory to import the "
                         "module from (e.g. pvc://CLAIM/rewards or a ConfigMap mount); default: "
                         "the trainer image.")
    ] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _REWARD_RULES)


GRPO_LOSSES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo")


class GrpoSpec(_Spec):
    """Generation and loss for grpo."""

    num_generations: Annotated[
        int, Field(ge=2, le=256, description="Completions sampled per prompt (a group). "
                   "batchSizePerDevice × gradientAccumulation × GPUs must divide by it.")
    ] = 8
    max_completion_len: Annotated[
        int, Field(ge=1, le=131072, description="Tokens generated per completion at most.")
    ] = 256
    temperature: Annotated[float, Field(gt=0, le=10, description="Sampling temperature.")] = 1.0
    beta: Annotated[
        float, Field(ge=0, le=100, description="KL penalty towards the starting model (0: "
                     "none, and no reference copy is kept).")
    ] = 0.0
    loss_type: Annotated[
        Literal[GRPO_LOSSES],  # type: ignore[valid-type]
        Field(description="How token losses are averaged: " + ", ".join(GRPO_LOSSES) + "."),
    ] = "dapo"
    vllm: Annotated[
        bool, Field(description="Generate with vLLM (colocate mode) when the trainer image has "
                    "it and a GPU is there; otherwise transformers generates.")
    ] = True


_RL_SPEC_RULES = (
    Rule(
        cel="!has(self.stage) || self.stage != 'grpo' || (has(self.rewards) "
        "&& size(self.rewards) > 0)",
        message="stage grpo needs at least one reward in rewards",
        check=lambda s: s.stage != "grpo" or bool(s.rewards),
    ),
    Rule(
        cel="(has(self.stage) && self.stage == 'grpo') || (!has(self.rewards) && !has(self.grpo))",
        message="rewards and grpo are only read by stage grpo",
        check=lambda s: s.stage == "grpo" or (s.rewards is None and s.grpo is None),
    ),
    Rule(
        cel="!has(self.stage) || self.stage != 'grpo' || "
        "((has(self.training) && has(self.training.batchSizePerDevice) ? "
        "self.training.batchSizePerDevice : 4) * (has(self.training) && "
        "has(self.training.gradientAccumulation) ? self.training.gradientAccumulation : 1)) % "
        "(has(self.grpo) && has(self.grpo.numGenerations) ? self.grpo.numGenerations : 8) == 0",
        message="stage grpo needs training.batchSizePerDevice × training.gradientAccumulation "
        "to be a multiple of grpo.numGenerations (each prompt's completions form one group)",
        check=lambda s: s.stage != "grpo" or (
            s.training.batch_size_per_device * s.training.gradient_accumulation
        ) % s.grpo_or_default().num_generations == 0,
    ),
)
