"""spec.method: what trains (full, freeze, LoRA), and orthogonal to it how the base is loaded
(``quantization``: with lora that is QLoRA), the adapter's variant (``lora``) and how freeze
picks its layers (``freeze`` by position, or ``spectrum`` by signal-to-noise ratio)."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from kubetune.api.v1alpha1._base import (
    _ENUM,
    Rule,
    _cel_list,
    _enforce,
    _rules,
    _Spec,
    _str,
    immutable,
)


class MethodType(enum.StrEnum):
    full = "full"
    freeze = "freeze"
    lora = "lora"


class QuantType(enum.StrEnum):
    nf4 = "nf4"
    fp4 = "fp4"


class ComputeDtype(enum.StrEnum):
    auto = "auto"  # the training precision
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


_QUANT_RULES = (
    Rule(
        cel="!has(self.bits) || self.bits == 4 || (!has(self.type) && !has(self.doubleQuant))",
        message="method.quantization.type and doubleQuant apply to 4 bits only",
        check=lambda q: q.bits == 4 or (q.type is None and q.double_quant is None),
    ),
)


class QuantizationSpec(_Spec):
    """The frozen base loaded quantized by bitsandbytes (with method.type lora: QLoRA)."""

    model_config = ConfigDict(json_schema_extra=_rules(*_QUANT_RULES))

    bits: Annotated[Literal[4, 8], Field(description="4 or 8 bits per base weight.")] = 4
    type: Annotated[QuantType | None, Field(
        description="4 bits only: nf4 (normal float, the QLoRA default) or fp4.", **_ENUM)
    ] = None
    double_quant: Annotated[bool | None, Field(
        description="4 bits only: quantize the quantization constants too (default true).")
    ] = None
    compute_dtype: Annotated[ComputeDtype, Field(
        description="dtype of the matmuls on the de-quantized weights; auto: the training "
        "precision.", **_ENUM)] = ComputeDtype.auto

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _QUANT_RULES)

    def quant_type(self) -> str:
        return self.type or QuantType.nf4

    def double(self) -> bool:
        return True if self.double_quant is None else self.double_quant


class LoraInit(enum.StrEnum):
    default = "default"  # PEFT's: A Kaiming-uniform, B zero (the adapter starts as a no-op)
    gaussian = "gaussian"
    pissa = "pissa"
    olora = "olora"
    loftq = "loftq"
    eva = "eva"


BASE_CHANGING_INITS = ("pissa", "olora", "loftq")  # they rewrite the base weights


class LoraSpec(_Spec):
    """LoRA adapter settings (method.type lora)."""

    rank: Annotated[int, Field(ge=1, le=1024, description="LoRA rank r.")] = 16
    alpha: Annotated[int, Field(ge=1, le=65536,
                                description="LoRA alpha (scale = alpha / rank, or alpha / "
                                "sqrt(rank) with rslora).")] = 32
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
    dora: Annotated[bool, Field(description="DoRA: learn each weight's magnitude apart from "
                                "its direction (slower per step).")] = False
    rslora: Annotated[bool, Field(description="Rank-stabilised LoRA: scale by alpha / "
                                  "sqrt(rank), for large ranks.")] = False
    init: Annotated[LoraInit, Field(
        description="How the adapter starts: default (a no-op), gaussian, pissa / olora (from "
        "the base's principal components / QR; the saved adapter still applies to the original "
        "base), loftq (compensates for 4-bit quantization of the base), eva (from activations "
        "of the first training batches).", **_ENUM)] = LoraInit.default
    lora_plus_lr_ratio: Annotated[float | None, Field(
        ge=1, le=1000, description="LoRA+: the B matrices learn this many times faster than "
        "the A matrices (the paper uses 16).")] = None
    modules_to_save: Annotated[
        list[Annotated[str, _str()]],
        Field(max_length=64, description="Modules trained in full and saved with the adapter, "
              "e.g. [embed_tokens, lm_head] when the chat template adds tokens."),
    ] = []


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


class SpectrumSpec(_Spec):
    """Spectrum (method.type freeze): train the weight matrices with the highest
    signal-to-noise ratio (Marchenko–Pastur on their singular values), the top fraction of
    each module type (q_proj, mlp.down_proj, …); embeddings and norms stay frozen. The scan is
    cached per model revision."""

    top_fraction: Annotated[float, Field(
        gt=0, le=1, description="Fraction of the layers of each module type that train.")
    ] = 0.25


_METHOD_RULES = (
    Rule(
        cel="!has(self.type) || self.type == 'lora' || !has(self.lora)",
        message="method.lora is only used when method.type is lora",
        check=lambda m: m.type == "lora" or m.lora is None,
    ),
    Rule(
        cel="(has(self.type) && self.type == 'freeze') || !has(self.freeze)",
        message="method.freeze is only used when method.type is freeze",
        check=lambda m: m.type == "freeze" or m.freeze is None,
    ),
    Rule(
        cel="(has(self.type) && self.type == 'freeze') || !has(self.spectrum)",
        message="method.spectrum is only used when method.type is freeze",
        check=lambda m: m.type == "freeze" or m.spectrum is None,
    ),
    Rule(
        cel="!has(self.spectrum) || !has(self.freeze)",
        message="method.spectrum and method.freeze both pick the layers that train: set one",
        check=lambda m: m.spectrum is None or m.freeze is None,
    ),
    Rule(
        cel="!has(self.quantization) || !has(self.type) || self.type == 'lora'",
        message="method.quantization needs method.type lora (QLoRA): quantized weights "
        "cannot train in full or freeze",
        check=lambda m: m.quantization is None or m.type == "lora",
    ),
    Rule(
        cel="!has(self.quantization) || !has(self.lora) || !has(self.lora.init) "
        f"|| !(self.lora.init in {_cel_list(BASE_CHANGING_INITS)})",
        message="method.lora.init pissa, olora and loftq start from the full-precision base "
        "(they rewrite it): not with method.quantization",
        check=lambda m: m.quantization is None or m.lora is None
        or m.lora.init not in BASE_CHANGING_INITS,
    ),
)


class MethodSpec(_Spec):
    """How the weights train: all of them, some layers, or a LoRA adapter."""

    model_config = ConfigDict(json_schema_extra=_rules(*_METHOD_RULES))

    type: Annotated[
        MethodType,
        Field(description="full, freeze or lora (with quantization: QLoRA).",
              json_schema_extra=immutable("spec.method.type"), **_ENUM),
    ] = MethodType.lora
    quantization: Annotated[QuantizationSpec | None, Field(
        description="Load the frozen base in 4 or 8 bits (bitsandbytes); needs type lora.")
    ] = None
    lora: LoraSpec | None = None
    freeze: FreezeSpec | None = None
    spectrum: Annotated[SpectrumSpec | None, Field(
        description="type freeze: pick the layers that train by signal-to-noise ratio "
        "instead of position.")] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _METHOD_RULES)

    def lora_or_default(self) -> LoraSpec:
        return self.lora or LoraSpec()

    def freeze_or_default(self) -> FreezeSpec:
        return self.freeze or FreezeSpec()

    @property
    def adapter(self) -> bool:
        return self.type == MethodType.lora

    @property
    def qlora(self) -> bool:
        return self.type == MethodType.lora and self.quantization is not None


# Rules between the method, training.optimizer / boosters and resources (checked on the spec).
_LORA = "(!has(self.method) || !has(self.method.type) || self.method.type == 'lora')"
_OPT = "(has(self.training) && has(self.training.optimizer) && has(self.training.optimizer.name)"
_BOOST = "(has(self.training) && has(self.training.boosters) && has(self.training.boosters."
_NO_GPU = ("(has(self.resources) && has(self.resources.gpusPerNode) "
           "&& self.resources.gpusPerNode == 0)")
_MANY = ("(has(self.resources) && ((has(self.resources.nodes) && self.resources.nodes > 1) "
         "|| (has(self.resources.gpusPerNode) && self.resources.gpusPerNode > 1)))")
_STRATEGY = "(has(self.resources) && has(self.resources.strategy) && self.resources.strategy"
_DEEPSPEED = ("zero2", "zero2-offload", "zero3", "zero3-offload")
_SHARDED = ("zero3", "zero3-offload", "fsdp2")  # the weights themselves are split
_NOT_LORA_PLUS = ("galore", "galore_8bit", "apollo", "badam", "lomo", "adalomo", "muon")
_OFFLOAD_STAGES = ("sft", "pt", "rm", "dpo", "kto")  # TRL configs with activation_offloading


def _processes(s: Any) -> int:
    return s.resources.nodes * max(1, s.resources.gpus_per_node)


_METHOD_SPEC_RULES = (
    Rule(
        cel="!has(self.method) || !has(self.method.lora) "
        "|| !has(self.method.lora.loraPlusLrRatio) "
        f"|| !{_OPT} && self.training.optimizer.name in {_cel_list(_NOT_LORA_PLUS)})",
        message="method.lora.loraPlusLrRatio builds its own AdamW-family optimizer: not with "
        f"training.optimizer {', '.join(_NOT_LORA_PLUS)}",
        check=lambda s: s.method.lora is None or s.method.lora.lora_plus_lr_ratio is None
        or s.training.optimizer.name not in _NOT_LORA_PLUS,
    ),
    Rule(
        cel=f"!{_OPT} && self.training.optimizer.name == 'muon') || (!{_LORA} "
        f"&& !{_STRATEGY} != 'ddp'))",
        message="training.optimizer muon orthogonalises whole weight matrices: method.type "
        "full or freeze, resources.strategy ddp",
        check=lambda s: s.training.optimizer.name != "muon"
        or (s.method.type != "lora" and s.resources.strategy == "ddp"),
    ),
    Rule(
        cel=f"!{_OPT} && self.training.optimizer.name in ['galore', 'galore_8bit', 'apollo']) "
        f"|| !{_LORA}",
        message="training.optimizer galore, galore_8bit and apollo project full-weight "
        "gradients: method.type full or freeze, not lora",
        check=lambda s: s.training.optimizer.name not in ("galore", "galore_8bit", "apollo")
        or s.method.type != "lora",
    ),
    Rule(
        cel=f"!{_OPT} && self.training.optimizer.name == 'badam') || "
        "(has(self.method) && has(self.method.type) && self.method.type == 'full')",
        message="training.optimizer badam trains the whole model one block at a time: "
        "method.type full",
        check=lambda s: s.training.optimizer.name != "badam" or s.method.type == "full",
    ),
    Rule(
        cel="!has(self.training) || !has(self.training.optimizer) "
        f"|| !has(self.training.optimizer.layerwise) || !self.training.optimizer.layerwise "
        f"|| !{_MANY}",
        message="training.optimizer.layerwise runs in one process only: resources.nodes 1 and "
        "gpusPerNode at most 1",
        check=lambda s: not s.training.optimizer.layerwise or _processes(s) == 1,
    ),
    Rule(
        cel=f"!{_OPT} && self.training.optimizer.name == 'badam') || !{_MANY} "
        f"|| {_STRATEGY} in ['zero3', 'zero3-offload'])",
        message="training.optimizer badam on more than one GPU needs resources.strategy zero3 "
        "(or zero3-offload)",
        check=lambda s: s.training.optimizer.name != "badam" or _processes(s) == 1
        or s.resources.strategy in ("zero3", "zero3-offload"),
    ),
    Rule(
        cel=f"!{_OPT} && self.training.optimizer.name in ['galore', 'galore_8bit', 'apollo']) "
        f"|| !{_STRATEGY} != 'ddp')",
        message="training.optimizer galore, galore_8bit and apollo do not work with DeepSpeed "
        "or FSDP: resources.strategy ddp",
        check=lambda s: s.training.optimizer.name not in ("galore", "galore_8bit", "apollo")
        or s.resources.strategy == "ddp",
    ),
    Rule(
        cel="!has(self.method) || !has(self.method.lora) || !has(self.method.lora.init) "
        f"|| !(self.method.lora.init in {_cel_list(BASE_CHANGING_INITS)}) "
        f"|| !{_STRATEGY} in {_cel_list(_SHARDED)})",
        message="method.lora.init pissa, olora and loftq decompose whole weights: not with "
        "resources.strategy zero3, zero3-offload or fsdp2",
        check=lambda s: s.method.lora is None or s.method.lora.init not in BASE_CHANGING_INITS
        or s.resources.strategy not in _SHARDED,
    ),
    Rule(
        cel="!has(self.method) || !has(self.method.spectrum) "
        f"|| !{_STRATEGY} in ['zero3', 'zero3-offload'])",
        message="method.spectrum scans whole weight matrices, which ZeRO-3 loads already "
        "split: resources.strategy ddp, zero2 or fsdp2",
        check=lambda s: s.method.spectrum is None
        or s.resources.strategy not in ("zero3", "zero3-offload"),
    ),
    Rule(
        cel="!has(self.method) || !has(self.method.quantization) "
        "|| !has(self.method.quantization.bits) || self.method.quantization.bits == 4 "
        f"|| !{_STRATEGY} in {_cel_list(_SHARDED)})",
        message="method.quantization bits 8 cannot be sharded: with resources.strategy zero3, "
        "zero3-offload or fsdp2 use bits 4",
        check=lambda s: s.method.quantization is None or s.method.quantization.bits == 4
        or s.resources.strategy not in _SHARDED,
    ),
    Rule(
        cel=f"!{_OPT} && self.training.optimizer.name in ['lomo', 'adalomo']) "
        f"|| !{_STRATEGY} in {_cel_list(_DEEPSPEED)})",
        message="training.optimizer lomo and adalomo update inside the backward pass, which "
        "DeepSpeed owns: resources.strategy ddp or fsdp2",
        check=lambda s: s.training.optimizer.name not in ("lomo", "adalomo")
        or s.resources.strategy not in _DEEPSPEED,
    ),
    Rule(
        cel=f"!{_BOOST}liger) && self.training.boosters.liger) || !{_NO_GPU}",
        message="training.boosters.liger needs a GPU (Triton kernels): resources.gpusPerNode "
        "> 0",
        check=lambda s: not s.training.boosters.liger or s.resources.gpus_per_node > 0,
    ),
    Rule(
        cel=f"!{_BOOST}attention) && self.training.boosters.attention == 'flash_attention_2')"
        f" || !{_NO_GPU}",
        message="training.boosters.attention flash_attention_2 needs a GPU: "
        "resources.gpusPerNode > 0 (or attention auto)",
        check=lambda s: s.training.boosters.attention != "flash_attention_2"
        or s.resources.gpus_per_node > 0,
    ),
    Rule(
        cel=f"!{_OPT} && self.training.optimizer.name == 'adalomo') || !{_NO_GPU}",
        message="training.optimizer adalomo runs on a GPU only (lomo-optim): "
        "resources.gpusPerNode > 0, or lomo",
        check=lambda s: s.training.optimizer.name != "adalomo" or s.resources.gpus_per_node > 0,
    ),
    Rule(
        cel=f"!{_BOOST}activationOffload) && self.training.boosters.activationOffload) "
        f"|| !{_NO_GPU}",
        message="training.boosters.activationOffload moves activations off a GPU (TRL): "
        "resources.gpusPerNode > 0",
        check=lambda s: not s.training.boosters.activation_offload
        or s.resources.gpus_per_node > 0,
    ),
    Rule(
        cel="!has(self.method) || !has(self.method.lora) || !has(self.method.lora.init) "
        f"|| self.method.lora.init != 'loftq' || !{_NO_GPU}",
        message="method.lora.init loftq quantizes on a GPU (PEFT): resources.gpusPerNode > 0",
        check=lambda s: s.method.lora is None or s.method.lora.init != "loftq"
        or s.resources.gpus_per_node > 0,
    ),
    Rule(
        cel=f"!{_BOOST}activationOffload) && self.training.boosters.activationOffload) "
        f"|| !has(self.stage) || self.stage in {_cel_list(_OFFLOAD_STAGES)}",
        message="training.boosters.activationOffload is available for stages "
        f"{', '.join(_OFFLOAD_STAGES)}",
        check=lambda s: not s.training.boosters.activation_offload
        or s.stage in _OFFLOAD_STAGES,
    ),
)
