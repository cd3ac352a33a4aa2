"""resources.strategy: what each strategy shards, and the launcher arguments it needs.

One table read by the memory estimate (``kubetune.estimate``), by every backend that renders a
pod command (``launcher_args``), and by the launcher itself (``kubetune_trainer.launch``). No
torch, no kopf: the operator imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StrategyInfo:
    engine: str | None  # None: torchrun (DDP); "deepspeed" or "fsdp": accelerate launch
    config: str | None  # the data file in kubetune_trainer/deepspeed/ (DeepSpeed JSON or an
    #                     accelerate config YAML for FSDP)
    shard_grads: bool = False  # gradients split over the processes
    shard_optimizer: bool = False  # optimizer state split over the processes
    shard_weights: bool = False  # the weights split too (ZeRO-3, FSDP)
    offload_optimizer: bool = False  # optimizer state (and its fp32 master copy) in CPU RAM
    offload_weights: bool = False  # the weights in CPU RAM between uses


STRATEGIES: dict[str, StrategyInfo] = {
    "ddp": StrategyInfo(None, None),
    "zero2": StrategyInfo("deepspeed", "zero2.json", shard_grads=True, shard_optimizer=True),
    "zero2-offload": StrategyInfo("deepspeed", "zero2_offload.json", shard_grads=True,
                                  shard_optimizer=True, offload_optimizer=True),
    "zero3": StrategyInfo("deepspeed", "zero3.json", shard_grads=True, shard_optimizer=True,
                          shard_weights=True),
    "zero3-offload": StrategyInfo("deepspeed", "zero3_offload.json", shard_grads=True,
                                  shard_optimizer=True, shard_weights=True,
                                  offload_optimizer=True, offload_weights=True),
    "fsdp2": StrategyInfo("fsdp", "fsdp2.yaml", shard_grads=True, shard_optimizer=True,
                          shard_weights=True),
}


def strategy_of(spec: Any) -> str:
    return str(getattr(spec.resources, "strategy", "ddp"))


def launcher_args(spec: Any) -> list[str]:
    """What ``kubetune-launch`` needs besides the job file for this job (a FineTuneJobSpec):
    every backend appends these to the pod's command, and ``kubetune run`` to its own."""
    strategy = strategy_of(spec)
    return [] if strategy == "ddp" else ["--strategy", strategy]
