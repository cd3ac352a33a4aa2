"""spec.resources, spec.scheduling and spec.runPolicy: where and how long it runs."""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, model_validator

from kubetune.api.v1alpha1._base import (
    _ENUM,
    DNS_SUBDOMAIN,
    INT32_MAX,
    LABEL_VALUE,
    QUALIFIED_NAME,
    QUANTITY,
    Rule,
    _drop_nulls,
    _enforce,
    _rules,
    _Spec,
    immutable,
)

# --------------------------------------------------------------------------- where it runs


class Strategy(enum.StrEnum):
    """How the training processes share the model (see kubetune_trainer/launch.py)."""

    ddp = "ddp"  # every process holds the whole model, gradients and optimizer state
    zero2 = "zero2"  # DeepSpeed ZeRO stage 2: gradients and optimizer state sharded
    zero2_offload = "zero2-offload"  # ... and the optimizer state in CPU memory
    zero3 = "zero3"  # ZeRO stage 3: the weights sharded too
    zero3_offload = "zero3-offload"  # ... and weights and optimizer state in CPU memory
    fsdp2 = "fsdp2"  # PyTorch FSDP2 (fully_shard): weights, gradients, optimizer sharded


# A GPU's memory: a positive Kubernetes quantity with a unit (a bare "80" would be 80 bytes).
GPU_MEMORY = r"^[1-9][0-9]*(\.[0-9]+)?(M|G|T|Mi|Gi|Ti)$"

_RESOURCE_RULES = (
    Rule(
        cel="!has(self.nodes) || self.nodes == 1 || !has(self.gpusPerNode) "
        "|| self.gpusPerNode > 0",
        message="resources.nodes > 1 needs resources.gpusPerNode > 0",
        check=lambda r: r.nodes == 1 or r.gpus_per_node > 0,
    ),
    Rule(
        cel="!has(self.gpuMemory) || !has(self.gpusPerNode) || self.gpusPerNode > 0",
        message="resources.gpuMemory needs resources.gpusPerNode > 0 (it is the memory of "
        "one GPU)",
        check=lambda r: r.gpu_memory is None or r.gpus_per_node > 0,
    ),
    Rule(
        cel="!has(self.strategy) || self.strategy != 'fsdp2' || !has(self.gpusPerNode) "
        "|| self.gpusPerNode > 0",
        message="resources.strategy fsdp2 needs resources.gpusPerNode > 0 (FSDP runs on GPUs "
        "only; zero3 shards the same way on CPU too)",
        check=lambda r: r.strategy != "fsdp2" or r.gpus_per_node > 0,
    ),
)


class ResourcesSpec(_Spec):
    """Machines and GPUs: one training process per GPU."""

    model_config = ConfigDict(json_schema_extra=_rules(*_RESOURCE_RULES))

    nodes: Annotated[
        int, Field(ge=1, le=1024, description="Machines (PyTorchJob replicas).",
                   json_schema_extra=immutable("spec.resources.nodes"))
    ] = 1
    gpus_per_node: Annotated[
        int, Field(ge=0, le=64, description="GPUs per machine; one training process each.",
                   json_schema_extra=immutable("spec.resources.gpusPerNode"))
    ] = 1
    strategy: Annotated[
        Strategy,
        Field(description="How the processes share the model: ddp (each holds all of it), "
              "zero2 (DeepSpeed ZeRO-2: gradients and optimizer state sharded), zero2-offload "
              "(optimizer state in CPU memory), zero3 (weights sharded too), zero3-offload "
              "(weights and optimizer state in CPU memory) or fsdp2 (PyTorch FSDP2, like "
              "zero3).", **_ENUM),
    ] = Strategy.ddp
    gpu_memory: Annotated[
        str | None,
        Field(pattern=GPU_MEMORY, max_length=64,
              description="Memory of one GPU, e.g. 80Gi (default: the operator's setting for "
              "the GPU type). A job whose estimate does not fit is refused before any pod "
              "starts."),
    ] = None
    cpu: Annotated[
        str | None, Field(pattern=QUANTITY, max_length=64,
                          description="CPU request and limit per node.")
    ] = None
    memory: Annotated[
        str | None, Field(pattern=QUANTITY, max_length=64,
                          description="Memory request and limit per node.")
    ] = None
    shared_memory: Annotated[
        str, Field(pattern=QUANTITY, max_length=64,
                   description="Size of /dev/shm (data loader workers, NCCL).")
    ] = "8Gi"
    scratch_size: Annotated[
        str | None, Field(pattern=QUANTITY, max_length=64,
                          description="Size limit of each pod's scratch volume (/tmp): "
                          "downloaded models, prepared data, and the staging of an s3://, "
                          "gs:// or hf:// output (its checkpoints before upload). Default: "
                          "no limit but the node's disk.")
    ] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _RESOURCE_RULES)


_SCHEDULING_RULES = (
    Rule(
        cel="!has(self.nodeSelector) || self.nodeSelector.all(k, size(k) <= 317 && "
        f"k.matches('{QUALIFIED_NAME}'))",
        message="scheduling.nodeSelector: each key must be a label key ([prefix/]name: name "
        "up to 63 letters, digits, '-', '_', '.')",
        check=lambda s: s.node_selector is None or all(
            len(k) <= 317 and re.fullmatch(QUALIFIED_NAME, k) for k in s.node_selector),
    ),
)


_TOLERATION_RULES = (  # what the API server checks in a Pod (ValidateTolerations)
    Rule(
        cel="(has(self.key) && self.key != '') || (has(self.operator) "
        "&& self.operator == 'Exists')",
        message="scheduling.tolerations[]: a toleration without key needs operator Exists",
        check=lambda t: bool(t.key) or t.operator == "Exists",
    ),
    Rule(
        cel="!has(self.operator) || self.operator != 'Exists' || !has(self.value) "
        "|| self.value == ''",
        message="scheduling.tolerations[]: operator Exists takes no value",
        check=lambda t: t.operator != "Exists" or not t.value,
    ),
    Rule(
        cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        message="scheduling.tolerations[]: tolerationSeconds needs effect NoExecute",
        check=lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
    ),
)


class Toleration(_Spec):
    """A pod toleration, as in a Pod spec."""

    model_config = ConfigDict(json_schema_extra=_rules(*_TOLERATION_RULES))

    key: Annotated[str | None, Field(max_length=317, pattern=f"^$|{QUALIFIED_NAME}",
                                     description="The taint key (empty: every key).")] = None
    operator: Annotated[Literal["Exists", "Equal"] | None,
                        Field(description="Exists or Equal (default).")] = None
    value: Annotated[str | None, Field(max_length=63, pattern=LABEL_VALUE,
                                       description="The taint value, with Equal.")] = None
    effect: Annotated[
        Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None,
        Field(description="The taint effect to tolerate (empty: all).")
    ] = None
    toleration_seconds: Annotated[int | None, Field(
        ge=0, le=10**10, description="With NoExecute: how long the pod stays after the taint "
        "appears.")] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _TOLERATION_RULES)


class SchedulingSpec(_Spec):
    """Where the training pods may run; copied onto every replica of the PyTorchJob."""

    model_config = ConfigDict(json_schema_extra=_rules(*_SCHEDULING_RULES))

    node_selector: Annotated[
        Annotated[Annotated[dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]],
                            Field(max_length=64)],
                  BeforeValidator(_drop_nulls)] | None,
        Field(description="Node labels the pods need (label values)."),
    ] = None
    tolerations: Annotated[
        list[Toleration] | None, Field(max_length=64,
                                       description="Pod tolerations, as in a Pod spec.")
    ] = None
    affinity: Annotated[
        dict[str, Any] | None, Field(description="Pod affinity, as in a Pod spec.")
    ] = None
    priority_class_name: Annotated[
        str | None, Field(max_length=253, pattern=DNS_SUBDOMAIN,
                          description="A PriorityClass (a DNS-1123 subdomain).")
    ] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _SCHEDULING_RULES)


GRACE_SECONDS = 300  # time to save a large model's checkpoint (Kubernetes' own default: 30)


class RunPolicySpec(_Spec):
    """How long the run may take, how often its pods may restart, and cleanup."""

    active_deadline_seconds: Annotated[
        int | None, Field(ge=1, le=10**10, description="Fail the run after this long.")
    ] = None
    backoff_limit: Annotated[
        int, Field(ge=0, le=100, description="Pod restarts before the run fails; each restart "
                   "resumes from the last checkpoint.")
    ] = 3
    ttl_seconds_after_finished: Annotated[
        int | None, Field(ge=0, le=INT32_MAX,
                          description="Delete the PyTorchJob this long after it ends "
                          "(the FineTuneJob and its outputs stay).")
    ] = None
    termination_grace_period_seconds: Annotated[
        int, Field(ge=10, le=3600,
                   description="How long a training pod that is taken away (preempted, "
                   "evicted, drained, deleted) has between SIGTERM and SIGKILL: the trainer "
                   "finishes its step and saves a checkpoint in it when the save fits "
                   "(otherwise the last complete one is the resume point).")
    ] = GRACE_SECONDS
