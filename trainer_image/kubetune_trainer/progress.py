"""What a run tells the world: progress lines (JSON), checkpoint markers, a loss curve.

``progress.jsonl`` in the output directory gets one JSON object per logging step:
step, total_steps, percent, eta_seconds, loss, learning_rate, tokens_per_second, epoch, time.
The operator reads these; on a terminal transformers' own progress bar shows the same run.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from kubetune.api.stages import STAGE_METRIC_PATTERN
from transformers import TrainerCallback

COMPLETE_MARKER = "kubetune-complete.json"
STAGE_METRIC = re.compile(STAGE_METRIC_PATTERN)  # kept in each record's "metrics"


class ProgressLog(TrainerCallback):
    def __init__(self, path: Path, *, echo: bool) -> None:
        self.path = path
        self.echo = echo
        self._t0 = 0.0
        self._step0 = 0
        self._tokens0 = 0
        self._last_t = 0.0
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **_: Any) -> None:
        self._t0 = self._last_t = time.monotonic()
        self._step0 = state.global_step  # non-zero when resuming
        self._tokens0 = self._last_tokens = state.num_input_tokens_seen
        if state.global_step:
            # Steps logged after the checkpoint we resume from will be run again: drop them.
            kept = [r for r in read_progress(self.path) if r.get("step", 0) <= state.global_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self._write({"event": "resumed", "step": state.global_step,
                         "total_steps": state.max_steps})

    def on_log(self, args, state, control, logs=None, **_: Any) -> None:
        logs = logs or {}
        now = time.monotonic()
        done = state.global_step - self._step0
        total = state.max_steps
        eta = (now - self._t0) / done * (total - state.global_step) if done > 0 else None
        tokens = state.num_input_tokens_seen
        dt = now - self._last_t
        tps = (tokens - self._last_tokens) / dt if dt > 0 and tokens else None
        self._last_t, self._last_tokens = now, tokens
        record: dict[str, Any] = {
            "step": state.global_step,
            "total_steps": total,
            "percent": round(100.0 * state.global_step / total, 2) if total else None,
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "epoch": round(state.epoch, 4) if state.epoch is not None else None,
            "tokens_per_second": round(tps, 1) if tps else None,
        }
        if "loss" in logs:
            record["loss"] = round(float(logs["loss"]), 6)
            record["learning_rate"] = float(logs.get("learning_rate", 0.0))
        if "eval_loss" in logs:
            record["eval_loss"] = round(float(logs["eval_loss"]), 6)
        metrics = {k: round(float(v), 6) for k, v in logs.items()
                   if STAGE_METRIC.match(k) and isinstance(v, int | float) and math.isfinite(v)}
        if metrics:
            record["metrics"] = metrics
        if "train_loss" in logs:  # the summary transformers logs at the end
            record["event"] = "finished"
            record["train_loss"] = logs.get("train_loss")
        self._write(record)
        if self.echo and "loss" in record:
            eta_txt = f"{record['eta_seconds']:.0f}s" if record["eta_seconds"] is not None else "?"
            print(f"step {record['step']}/{total} ({record['percent']}%)  "
                  f"loss {record['loss']:.4f}  lr {record['learning_rate']:.2e}  "
                  f"eta {eta_txt}", file=sys.stderr, flush=True)

    def on_save(self, args, state, control, **_: Any) -> None:
        self._write({"event": "checkpoint", "step": state.global_step,
                     "loss": _last_loss(state),
                     "path": str(Path(args.output_dir) / f"checkpoint-{state.global_step}")})

    def _write(self, record: dict[str, Any]) -> None:
        record["time"] = time.time()
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once transformers has written all of it.

    A run killed while saving leaves a checkpoint without the marker; resume skips it.
    """

    def on_save(self, args, state, control, **_: Any) -> None:
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every rank's part (RNG state, shards) is written
        if not rank_zero():
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            marker = {"step": state.global_step, "loss": _last_loss(state)}
            tmp = ckpt / (COMPLETE_MARKER + ".tmp")
            tmp.write_text(json.dumps(marker))
            tmp.rename(ckpt / COMPLETE_MARKER)


def rank_zero() -> bool:
    """The global rank-0 process (torchrun and accelerate set RANK; a lone process has none).

    Not ``state.is_world_process_zero``: under torchrun on CPU it was True on every rank."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _last_loss(state: Any) -> float | None:
    for entry in reversed(state.log_history):
        if "loss" in entry:
            return float(entry["loss"])
    return None


def latest_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    if not checkpoints_dir.is_dir():
        return None
    found = []
    for d in checkpoints_dir.glob("checkpoint-*"):
        step = d.name.removeprefix("checkpoint-")
        if step.isdigit() and (d / COMPLETE_MARKER).exists():
            found.append((int(step), d))
    return max(found)[1] if found else None


def read_progress(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


PLOTTED_METRICS = ("rewards/margins", "rewards/accuracies", "kl", "accuracy",
                   "eval_rewards/margins", "eval_rewards/accuracies", "eval_accuracy")


def plot_loss(progress_file: Path, png: Path) -> Path | None:
    """Training (and eval) loss against step, as a PNG; preference stages get a second panel
    with their reward margin / accuracy / KL."""
    records = [r for r in read_progress(progress_file) if "event" not in r]  # no checkpoints
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for k, v in (r.get("metrics") or {}).items():
            if k in PLOTTED_METRICS:
                series.setdefault(k, []).append((r["step"], v))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if series else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 3.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if series:
        ax2 = axes[0][1]
        for name, points in series.items():
            ax2.plot(*zip(*points, strict=True), "o-" if name.startswith("eval_") else "-",
                     label=name)
        ax2.set_xlabel("step")
        ax2.grid(alpha=0.3)
        ax2.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


class OperatorReport(TrainerCallback):
    """Tells the operator about checkpoints (progress itself goes through transformers'
    KubeflowCallback). Same endpoint, token and CA; failures never stop training."""

    def __init__(self, output_uri: str) -> None:
        self.output_uri = output_uri.rstrip("/")

    def on_save(self, args, state, control, **_: Any) -> None:
        if rank_zero():
            post_to_operator({"checkpoint": {
                "step": state.global_step, "loss": _last_loss(state),
                "uri": f"{self.output_uri}/checkpoints/checkpoint-{state.global_step}"}})


def post_to_operator(kubetune: dict[str, Any]) -> bool:
    import os
    import ssl
    import urllib.request

    url = os.environ.get("KUBEFLOW_TRAINER_SERVER_URL")
    token_file = os.environ.get("KUBEFLOW_TRAINER_SERVER_TOKEN")
    if not url or not token_file or not os.path.exists(token_file):
        return False
    ca = os.environ.get("KUBEFLOW_TRAINER_SERVER_CA_CERT")
    ctx = ssl.create_default_context(cafile=ca) if ca and url.startswith("https") else None
    with open(token_file) as f:
        token = f.read().strip()
    req = urllib.request.Request(
        url, data=json.dumps({"kubetune": kubetune}).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
            return resp.status == 200
    except OSError:
        return False
