"""spec.training: the hyper-parameters of the optimisation."""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from kubetune.api.v1alpha1._base import _ENUM, Rule, _cel_list, _enforce, _rules, _Spec, _str
from kubetune.api.v1alpha1.tracking import Tracker, TrackingSpec

# --------------------------------------------------------------------------- training


class Precision(enum.StrEnum):
    auto = "auto"  # bf16 where the GPU supports it, fp32 on CPU
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class LrScheduler(enum.StrEnum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"


class OptimizerName(enum.StrEnum):
    adamw = "adamw"
    adamw_8bit = "adamw_8bit"  # bitsandbytes
    paged_adamw_8bit = "paged_adamw_8bit"
    paged_adamw_32bit = "paged_adamw_32bit"
    adafactor = "adafactor"
    galore = "galore"  # galore-torch
    galore_8bit = "galore_8bit"
    apollo = "apollo"  # apollo-torch
    badam = "badam"  # badam: one block of layers at a time
    muon = "muon"  # torch.optim.Muon for hidden matrices, AdamW for the rest
    lomo = "lomo"  # lomo-optim: the update fused into the backward pass
    adalomo = "adalomo"


# transformers' ``optim`` name of each (badam: its own BlockOptimizer around AdamW)
OPTIM_NAMES = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit",
               "paged_adamw_8bit": "paged_adamw_8bit", "paged_adamw_32bit": "paged_adamw_32bit",
               "adafactor": "adafactor", "galore": "galore_adamw",
               "galore_8bit": "galore_adamw_8bit", "apollo": "apollo_adamw", "badam": "adamw_torch",
               "muon": "adamw_torch",
               "lomo": "lomo", "adalomo": "adalomo"}
FUSED_OPTIMIZERS = ("lomo", "adalomo")  # step inside backward: no gradient accumulation
LOW_RANK_OPTIMIZERS = ("galore", "galore_8bit", "apollo")


class BadamSwitch(enum.StrEnum):
    ascending = "ascending"
    descending = "descending"
    random = "random"
    fixed = "fixed"


_OPTIMIZER_RULES = (
    Rule(
        cel=f"(has(self.name) && self.name in {_cel_list(LOW_RANK_OPTIMIZERS)}) || "
        "(!has(self.targetModules) && !has(self.rank) && !has(self.updateInterval) "
        "&& !has(self.scale) && !has(self.layerwise))",
        message="training.optimizer targetModules, rank, updateInterval, scale and layerwise "
        "are only used by galore, galore_8bit and apollo",
        check=lambda o: o.name in LOW_RANK_OPTIMIZERS or (
            o.target_modules is None and o.rank is None and o.update_interval is None
            and o.scale is None and o.layerwise is None),
    ),
    Rule(
        cel="(has(self.name) && self.name == 'badam') || "
        "(!has(self.switchMode) && !has(self.switchEvery))",
        message="training.optimizer switchMode and switchEvery are only used by badam",
        check=lambda o: o.name == "badam" or (o.switch_mode is None and o.switch_every is None),
    ),
)


class OptimizerSpec(_Spec):
    """The optimizer. Every name is one transformers/PyPI already implements."""

    model_config = ConfigDict(json_schema_extra=_rules(*_OPTIMIZER_RULES))

    name: Annotated[OptimizerName, Field(
        description="adamw; adamw_8bit, paged_adamw_8bit, paged_adamw_32bit (bitsandbytes); "
        "adafactor; galore, galore_8bit, apollo (low-rank gradient projection of "
        "targetModules); badam (full fine-tuning one block of layers at a time); muon (torch's "
        "Muon for the layers' weight matrices, AdamW for the rest); lomo, adalomo "
        "(the update fused into the backward pass: no optimizer states).", **_ENUM)
    ] = OptimizerName.adamw
    target_modules: Annotated[list[Annotated[str, _str()]] | None, Field(
        min_length=1, max_length=256, description='galore/apollo: modules whose gradients are '
        'projected (names or regexes; default ["attn", "mlp"]).')] = None
    rank: Annotated[int | None, Field(ge=1, le=65536, description="galore/apollo: the "
                                      "projection's rank (default 16).")] = None
    update_interval: Annotated[int | None, Field(ge=1, le=10**6, description="galore/apollo: "
                                                 "steps between projection updates (default "
                                                 "200).")] = None
    scale: Annotated[float | None, Field(gt=0, le=1000, description="galore/apollo: scale of "
                                         "the projected update (default 0.25 / 32).")] = None
    layerwise: Annotated[bool | None, Field(
        description="galore/apollo: one optimizer per layer, stepped during the backward pass "
        "(less memory; one process, no gradient accumulation).")] = None
    switch_mode: Annotated[BadamSwitch | None, Field(
        description="badam: order of the blocks (default ascending).", **_ENUM)] = None
    switch_every: Annotated[int | None, Field(ge=1, le=10**6, description="badam: steps per "
                                              "block (default 50).")] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _OPTIMIZER_RULES)


class Attention(enum.StrEnum):
    auto = "auto"  # flash_attention_2 when installed and on a GPU, else sdpa
    sdpa = "sdpa"
    flash_attention_2 = "flash_attention_2"
    eager = "eager"


class BoostersSpec(_Spec):
    """Speed and memory switches that leave the result the same (neftune aside)."""

    attention: Annotated[Attention, Field(
        description="Attention kernel: auto (flash_attention_2 where flash-attn is installed "
        "and a GPU runs, else sdpa), sdpa, flash_attention_2 (GPU) or eager.", **_ENUM)
    ] = Attention.auto
    liger: Annotated[bool, Field(description="Liger kernels (GPU; fused RMSNorm, RoPE, SwiGLU "
                                 "and cross-entropy).")] = False
    neftune_alpha: Annotated[float | None, Field(
        gt=0, le=1000, description="NEFTune: noise of this scale on the input embeddings "
        "while training (5 in the paper).")] = None
    torch_compile: Annotated[bool, Field(description="torch.compile the model (slow first "
                                         "steps, faster after).")] = False
    activation_offload: Annotated[bool, Field(
        description="With gradientCheckpointing: keep the saved activations in CPU memory "
        "(GPU; stages sft, pt, rm, dpo, kto).")] = False


PACKED_CUTOFF_MAX = 131072
_TRAINING_RULES = (
    Rule(
        cel="!has(self.packing) || !self.packing || !has(self.cutoffLen) "
        f"|| self.cutoffLen <= {PACKED_CUTOFF_MAX}",
        message=f"training.cutoffLen with packing is at most {PACKED_CUTOFF_MAX} tokens (every "
        "packed row is that long)",
        check=lambda t: not t.packing or t.cutoff_len <= PACKED_CUTOFF_MAX,
        field_path=".cutoffLen",
    ),
    Rule(
        cel="!has(self.boosters) || !has(self.boosters.activationOffload) "
        "|| !self.boosters.activationOffload "
        "|| (has(self.gradientCheckpointing) && self.gradientCheckpointing)",
        message="training.boosters.activationOffload needs training.gradientCheckpointing",
        check=lambda t: not t.boosters.activation_offload or t.gradient_checkpointing,
    ),
    Rule(
        cel="!has(self.optimizer) || !has(self.optimizer.layerwise) || "
        "!self.optimizer.layerwise || !has(self.gradientAccumulation) "
        "|| self.gradientAccumulation == 1",
        message="training.optimizer.layerwise steps during the backward pass: "
        "gradientAccumulation must be 1",
        check=lambda t: not t.optimizer.layerwise or t.gradient_accumulation == 1,
    ),
    Rule(
        cel="!has(self.optimizer) || !has(self.optimizer.name) || "
        f"!(self.optimizer.name in {_cel_list(FUSED_OPTIMIZERS)}) "
        "|| !has(self.gradientAccumulation) || self.gradientAccumulation == 1",
        message="training.optimizer lomo and adalomo update during the backward pass: "
        "gradientAccumulation must be 1",
        check=lambda t: t.optimizer.name not in FUSED_OPTIMIZERS
        or t.gradient_accumulation == 1,
    ),
)


class TrainingSpec(_Spec):
    """Hyper-parameters, evaluation and checkpoints."""

    model_config = ConfigDict(json_schema_extra=_rules(*_TRAINING_RULES))

    epochs: Annotated[float, Field(gt=0, le=1000, description="Passes over the data.")] = 3.0
    max_steps: Annotated[
        int | None, Field(ge=1, le=10**9, description="Stop after this many optimizer steps.")
    ] = None
    learning_rate: Annotated[
        float | None,
        Field(gt=0, lt=1, description="Peak learning rate. Default by stage: 1e-4 for pt and "
              "sft, 1e-5 for rm, 5e-6 for dpo, kto, orpo and cpo."),
    ] = None
    lr_scheduler: Annotated[LrScheduler, Field(
        description="Learning-rate schedule after warm-up: cosine, linear, constant or "
        "constant_with_warmup.", **_ENUM)] = LrScheduler.cosine
    warmup_ratio: Annotated[float, Field(ge=0, lt=1, description="Fraction of the steps spent "
                                         "raising the learning rate from 0.")] = 0.0
    weight_decay: Annotated[float, Field(ge=0, le=10, description="Weight decay.")] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0, le=10000, description="Gradients are clipped "
                                          "to this norm.")] = 1.0
    batch_size_per_device: Annotated[int, Field(ge=1, le=4096, description="Rows per GPU (or "
                                                "CPU process) per forward pass.")] = 4
    gradient_accumulation: Annotated[int, Field(ge=1, le=4096, description="Forward passes per "
                                                "optimizer step; the global batch is "
                                                "batchSizePerDevice × this × GPUs.")] = 1
    cutoff_len: Annotated[
        int, Field(ge=8, le=1048576,
                   description="Tokens per sample (and per packed row); longer is cut.")
    ] = 2048
    packing: Annotated[
        bool, Field(description="Pack samples into full rows; attention never crosses samples.")
    ] = False
    train_on_prompt: Annotated[
        bool, Field(description="Also compute loss on system/user/tool turns.")
    ] = False
    mask_history: Annotated[
        bool, Field(description="Compute loss on the last assistant turn only.")
    ] = False
    max_invalid_fraction: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description="Fail when more than this fraction of rows does not fit its format.",
        ),
    ] = 0.01
    eval_split: Annotated[
        float, Field(ge=0, lt=1, description="Fraction of rows held out for evaluation.")
    ] = 0.0
    eval_steps: Annotated[int | None, Field(ge=1, le=10**9, description="Evaluate every N "
                                            "steps (default: saveSteps); needs evalSplit or "
                                            "evalDatasets.")] = None
    save_steps: Annotated[int, Field(ge=1, le=10**9,
                                     description="Checkpoint every N steps.")] = 100
    save_total_limit: Annotated[
        int | None, Field(ge=1, le=10**6, description="Keep at most N checkpoints.")
    ] = 3
    log_steps: Annotated[int, Field(ge=1, le=10**9, description="Report progress (loss, "
                                    "step, ETA) every N steps.")] = 10
    seed: Annotated[int, Field(ge=0, le=2**32 - 1,
                               description="Random seed, 0 to 4294967295.")] = 42
    precision: Annotated[Precision, Field(
        description="auto (bf16 on GPUs that have it, else fp32), bf16, fp16 or fp32.",
        **_ENUM)] = Precision.auto
    gradient_checkpointing: Annotated[bool, Field(
        description="Recompute activations in the backward pass: less memory, ~20 % slower."
    )] = False
    optimizer: Annotated[OptimizerSpec, Field(
        description="The optimizer (default adamw).")] = OptimizerSpec()
    boosters: Annotated[BoostersSpec, Field(
        description="Attention kernel, Liger, NEFTune, torch.compile, activation offload.")
    ] = BoostersSpec()
    preprocessing_workers: Annotated[
        int | None, Field(ge=1, le=1024,
                          description="Processes for data preparation (default: CPUs).")
    ] = None
    report_to: Annotated[
        list[Annotated[Tracker, Field(**_ENUM)]] | None,
        Field(max_length=3, description="Experiment trackers that get the run's metrics and "
              "hyper-parameters: tensorboard (event files under the output's runs/), wandb, "
              "mlflow; settings and credentials in tracking."),
    ] = None
    tracking: Annotated[TrackingSpec | None, Field(
        description="Settings of the trackers in reportTo.")] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _TRAINING_RULES)
