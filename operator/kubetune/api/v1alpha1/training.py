"""spec.training: the hyper-parameters of the optimisation."""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from kubetune.api.v1alpha1._base import _ENUM, Rule, _enforce, _rules, _Spec
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


PACKED_CUTOFF_MAX = 131072
_TRAINING_RULES = (
    Rule(
        cel="!has(self.evalSteps) || (has(self.evalSplit) && self.evalSplit > 0.0)",
        message="training.evalSteps needs training.evalSplit > 0 (there is nothing to evaluate)",
        check=lambda t: t.eval_steps is None or t.eval_split > 0,
    ),
    Rule(
        cel="!has(self.packing) || !self.packing || !has(self.cutoffLen) "
        f"|| self.cutoffLen <= {PACKED_CUTOFF_MAX}",
        message=f"training.cutoffLen with packing is at most {PACKED_CUTOFF_MAX} tokens (every "
        "packed row is that long)",
        check=lambda t: not t.packing or t.cutoff_len <= PACKED_CUTOFF_MAX,
        field_path=".cutoffLen",
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
    weight_decay: Annotated[float, Field(ge=0, le=10, description="AdamW weight decay.")] = 0.0
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
                                            "steps (default: saveSteps); needs evalSplit.")] = None
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
