"""SIGTERM → finish the step → a complete checkpoint → exit 143 (retryable).

Kubernetes sends SIGTERM when it takes a pod away (a Kueue preemption, an eviction, a node
drain, a spot reclaim, ``kubectl delete pod``) and SIGKILL ``terminationGracePeriodSeconds``
later. The operator passes that grace period as ``KUBETUNE_GRACE_SECONDS``. While training,
SIGTERM only raises a flag; at the end of the step in flight every rank learns whether any
rank got it (one all-reduce per step), and all of them stop at that same step. They save a
checkpoint there (the marker last, as every save) when the save measured before fits in what
is left of the grace period, and skip it otherwise: the last complete checkpoint stays the
resume point. Then the run ends with ``Preempted`` (exit 143).

Outside training (loading, preparing data, writing the outputs) SIGTERM ends the process at
once with 143: nothing half-written is ever trusted (``outputs``), and as PID 1 of a container
a process without a handler would not even see the signal until the SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from kubetune.errors import EXIT_PREEMPTED

GRACE_ENV = "KUBETUNE_GRACE_SECONDS"
MARGIN_SECONDS = 5.0  # exiting, the marker, the progress line: left out of the save budget
SAVE_SLACK = 1.25  # a save may take this much longer than the last one did


def grace_seconds(env: dict[str, str] | None = None) -> float | None:
    """The pod's grace period (None: no SIGKILL follows, e.g. a local run)."""
    value = (os.environ if env is None else env).get(GRACE_ENV)
    try:
        return float(value) if value else None
    except ValueError:
        return None


def exit_on_sigterm() -> None:
    """Outside training: SIGTERM ends the process now, with the retryable code."""
    def stop(signum: int, _frame: Any) -> None:
        print(f"stopped by signal {signum} (not training: nothing to save)", file=sys.stderr,
              flush=True)
        raise SystemExit(EXIT_PREEMPTED)

    signal.signal(signal.SIGTERM, stop)


class Preemption:
    """Stops training at a step boundary after SIGTERM, with a checkpoint when it fits.

    Light to import (kubetune-launch and the trainer's first checks read this module before
    torch): ``callback()`` is what goes to the trainer."""

    def __init__(self, grace: float | None = None) -> None:
        self.grace = grace
        self.signalled_at: float | None = None
        self.stopped_at: int | None = None  # the step every rank stopped at
        self.saved = False  # a checkpoint was asked for at that step
        self.save_seconds: float | None = None  # how long the last save took
        self._save_started: float | None = None
        self._previous: Any = None

    def callback(self) -> Any:
        """The TrainerCallback that hands the trainer's events to this object."""
        from transformers import TrainerCallback

        owner = self

        class PreemptionCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **_: Any) -> None:
                owner.on_step_end(args, state, control)

            def on_evaluate(self, args, state, control, **_: Any) -> None:
                owner.on_evaluate(args, state, control)

            def on_save(self, args, state, control, **_: Any) -> None:
                owner.on_save(args, state, control)

        return PreemptionCallback()

    # -- the signal -----------------------------------------------------------------------
    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
            print(f"signal {signum}: finishing this step, then a checkpoint and exit",
                  file=sys.stderr, flush=True)

    # -- the decision, the same on every rank ---------------------------------------------
    def fits(self, now: float | None = None) -> bool:
        """Whether a save started now ends before the SIGKILL (this rank's view)."""
        if self.signalled_at is None or self.grace is None or self.save_seconds is None:
            return True  # no deadline, or no measure yet: try (an unfinished save is unmarked)
        now = time.monotonic() if now is None else now
        left = self.grace - (now - self.signalled_at) - MARGIN_SECONDS
        return self.save_seconds * SAVE_SLACK <= left

    def _agree(self) -> tuple[bool, bool]:
        """(stop, save): stop when any rank was signalled; save when it fits on all."""
        stop = self.signalled_at is not None
        skip = stop and not self.fits()
        from accelerate import PartialState

        ps = PartialState()
        if ps.num_processes > 1:
            import torch

            flags = torch.tensor([float(stop), float(skip)], device=ps.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            stop, skip = bool(flags[0].item()), bool(flags[1].item())
        return stop, stop and not skip

    def on_step_end(self, args, state, control, **_: Any) -> None:
        if control.should_save:
            self._save_started = time.monotonic()
        stop, save = self._agree()
        if not stop:
            return
        self.stopped_at, self.saved = state.global_step, save
        control.should_training_stop = True
        control.should_evaluate = False  # no time for it
        control.should_log = True  # the last step's loss reaches progress.jsonl
        control.should_save = save
        if save:
            self._save_started = time.monotonic()

    def on_evaluate(self, args, state, control, **_: Any) -> None:
        if self._save_started is not None:  # the save follows the evaluation
            self._save_started = time.monotonic()

    def on_save(self, args, state, control, **_: Any) -> None:
        if self._save_started is not None:
            self.save_seconds = time.monotonic() - self._save_started
            self._save_started = None
