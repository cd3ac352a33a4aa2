"""Errors a user can act on: each names the field (or file) and what is allowed."""

from __future__ import annotations


class KubetuneError(Exception):
    """A problem with the job's input; ``field`` is the spec path it concerns."""

    exit_code = 2

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)

    # What the trainer writes to /dev/termination-log for the operator to classify.
    reason = "InvalidInput"


class DataError(KubetuneError):
    reason = "DataError"


class SourceError(KubetuneError):
    reason = "SourceError"


class OutputError(KubetuneError):
    """The output location cannot take the run's files: read-only, not a directory, full."""

    reason = "OutputError"


class DiskFullError(KubetuneError):
    """A cache (model, data, prepared rows, staging) ran out of space: retried only where a
    new pod gets a new volume (``exit_code`` set per case)."""

    reason = "DiskFull"


class GPUOutOfMemoryError(KubetuneError):
    """The model and batch do not fit in the GPU's memory: the same step on the same data
    runs out again on every retry (from the last checkpoint too), so it is permanent."""

    reason = "CUDAOutOfMemory"


# The trainer's exit codes: the contract between the trainer and the controllers (README,
# "Preemption, failures and restarts"). Kubeflow's restartPolicy ExitCode reads 1-127 as
# permanent and 128-255 as retryable; the Job backend's podFailurePolicy says the same.
EXIT_DONE = 0
EXIT_PERMANENT = KubetuneError.exit_code  # 2: the spec, data, credentials, a model that won't fit
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped by a signal, the checkpoint saved (or the last kept)
EXIT_RETRYABLE = 200  # an unexpected error (a crash, a CUDA/NCCL/network fault): try again


class Preempted(Exception):
    """SIGTERM (a preemption, an eviction, a drain, a deleted pod): the run stopped at a step
    boundary, after a complete checkpoint (or without one, when it could not be written
    within the grace period); the next pod resumes."""

    exit_code = EXIT_PREEMPTED
    reason = "Preempted"

    def __init__(self, message: str, *, step: int, saved: bool) -> None:
        self.message = message
        self.step = step
        self.saved = saved
        super().__init__(message)
