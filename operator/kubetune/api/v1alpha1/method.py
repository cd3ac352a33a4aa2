"""spec.method: what trains (full, freeze, LoRA) and how."""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from kubetune.api.v1alpha1._base import _ENUM, Rule, _enforce, _rules, _Spec, _str, immutable


class MethodType(enum.StrEnum):
    full = "full"
    freeze = "freeze"
    lora = "lora"
    qlora = "qlora"


class LoraSpec(_Spec):
    """LoRA adapter settings (method.type lora or qlora)."""

    rank: Annotated[int, Field(ge=1, le=1024, description="LoRA rank r.")] = 16
    alpha: Annotated[int, Field(ge=1, le=65536,
                                description="LoRA alpha (scale = alpha / rank).")] = 32
    dropout: Annotated[float, Field(ge=0, lt=1, description="Dropout on the adapter's input.")
                       ] = 0.0
    target_modules: Annotated[
        list[Annotated[str, _str()]],
        Field(
            min_length=1,
            max_length=256,
            description='Module names to adapt, e.g. [q_proj, v_proj]; ["all-linear"] for all.',
        ),
    ] = ["all-linear"]


class FreezeSpec(_Spec):
    """Which layers train (method.type freeze); the rest stay frozen."""

    trainable_layers: Annotated[
        int,
        Field(ge=-4096, le=4096,
              description="Train the last N decoder layers (a negative N: the first |N|)."),
    ] = 2
    trainable_modules: Annotated[
        list[Annotated[str, _str()]],
        Field(max_length=256,
              description='Module name parts to train inside those layers, or ["all"].'),
    ] = ["all"]
    extra_modules: Annotated[
        list[Annotated[str, _str()]],
        Field(max_length=256, description="Other modules to train too, e.g. [embed_tokens].")
    ] = []


_METHOD_RULES = (
    Rule(
        cel="!has(self.type) || self.type in ['lora', 'qlora'] || !has(self.lora)",
        message="method.lora is only used when method.type is lora or qlora",
        check=lambda m: m.type in ("lora", "qlora") or m.lora is None,
    ),
    Rule(
        cel="(has(self.type) && self.type == 'freeze') || !has(self.freeze)",
        message="method.freeze is only used when method.type is freeze",
        check=lambda m: m.type == "freeze" or m.freeze is None,
    ),
)


class MethodSpec(_Spec):
    """How the weights train: all of them, some layers, or a LoRA adapter."""

    model_config = ConfigDict(json_schema_extra=_rules(*_METHOD_RULES))

    type: Annotated[
        MethodType,
        Field(description="full, freeze, lora or qlora.",
              json_schema_extra=immutable("spec.method.type"), **_ENUM),
    ] = MethodType.lora
    lora: LoraSpec | None = None
    freeze: FreezeSpec | None = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _METHOD_RULES)

    def lora_or_default(self) -> LoraSpec:
        return self.lora or LoraSpec()

    def freeze_or_default(self) -> FreezeSpec:
        return self.freeze or FreezeSpec()
