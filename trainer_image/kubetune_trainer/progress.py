"""What a run tells the world: progress lines (JSON), checkpoint markers, a loss curve.

``progress.jsonl`` in the output directory gets one JSON object per logging step:
step, total_steps, percent, eta_seconds, loss, learning_rate, tokens_per_second, epoch, time;
plus events (``checkpoint``, ``resumed``, ``checkpoint_rejected``, ``finished``). After a
resume it holds each step once: the steps logged after the checkpoint resumed from are dropped.
The operator reads these; on a terminal transformers' own progress bar shows the same run.

A checkpoint counts once its marker (``kubetune-complete.json``) is written, after every rank
saved; the marker lists each file's size (and sha256 for files up to 16 MiB). Resume trusts
the newest checkpoint whose files still match its marker, and whose safetensors files are
whole; a newer one that does not is set aside as ``rejected-checkpoint-N`` and said so in the
log. Markers written before the file list existed get the safetensors check only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.stages import STAGE_METRIC_PATTERN
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

COMPLETE_MARKER = "kubetune-complete.json"
# history, kept when later steps are dropped
KEPT_EVENTS = ("checkpoint_rejected", "failed", "preempted")
STAGE_METRIC = re.compile(STAGE_METRIC_PATTERN)  # kept in each record's "metrics"


class ProgressLog(TrainerCallback):
    def __init__(self, path: Path, *, echo: bool) -> None:
        self.path = path
        self.echo = echo
        self.notes: list[dict[str, Any]] = []  # events to log once training begins
        self._t0 = 0.0
        self._step0 = 0
        self._tokens0 = 0
        self._last_t = 0.0
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **_: Any) -> None:
        self._t0 = self._last_t = time.monotonic()
        self._step0 = state.global_step  # non-zero when resuming
        self._tokens0 = self._last_tokens = state.num_input_tokens_seen
        # Steps logged after the checkpoint we resume from (all of them when starting over)
        # will be run again: drop them, so that each step is logged once.
        records = read_progress(self.path)
        kept = [r for r in records if r.get("event") in KEPT_EVENTS
                or r.get("step", 0) <= state.global_step]
        # How far the run got before it stopped: the steps after the resume point are lost.
        reached = max((r["step"] for r in records if isinstance(r.get("step"), int)
                       and r.get("event") in (None, "preempted", "checkpoint")), default=0)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)
        for note in self.notes:
            self.write(dict(note))
        if state.global_step or reached:
            self.write({"event": "resumed", "step": state.global_step,
                        "total_steps": state.max_steps, "from_step": reached,
                        "lost_steps": max(reached - state.global_step, 0)})

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
            record["train_loss"] = run_train_loss(
                read_progress(self.path), float(logs["train_loss"]),
                resumed_step=self._step0, global_step=state.global_step)
        self.write(record)
        if self.echo and "loss" in record:
            eta_txt = f"{record['eta_seconds']:.0f}s" if record["eta_seconds"] is not None else "?"
            print(f"step {record['step']}/{total} ({record['percent']}%)  "
                  f"loss {record['loss']:.4f}  lr {record['learning_rate']:.2e}  "
                  f"eta {eta_txt}", file=sys.stderr, flush=True)

    def on_save(self, args, state, control, **_: Any) -> None:
        self.write({"event": "checkpoint", "step": state.global_step,
                    "loss": _last_loss(state),
                    "path": str(Path(args.output_dir) / f"checkpoint-{state.global_step}")})

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a step or an event), stamped with the time."""
        record["time"] = time.time()
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class LogLastStep(TrainerCallback):
    """The last step is logged even when logSteps does not divide it (transformers logs every
    logSteps steps only), so that its loss reaches the progress lines, progress.jsonl and
    loss.png like every other logged step's. On every rank: logging gathers the loss."""

    def on_step_end(self, args, state, control, **_: Any) -> None:
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True


class BarOnly(ProgressCallback):
    """transformers' progress bar on a terminal, without the raw log dicts it writes beside
    it (ProgressLog prints one readable line per logging step)."""

    def on_log(self, args, state, control, logs=None, **_: Any) -> None:
        pass


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once transformers has written all of it, with the size
    (and, for small files, the sha256) of every file so that resume can check it is unchanged.

    A run killed (or out of space) while saving leaves a checkpoint without the marker; resume
    skips it. A safetensors file that is not whole is never marked.

    ``keep`` (training.saveTotalLimit): the rotation, here and not in transformers (which
    deletes the oldest before the new one is marked: with 1 there was a moment with no
    complete checkpoint at all). Older checkpoints go only once the new one's marker is
    written; an object store drops its copies after the new marker is uploaded (``storage``).
    """

    def __init__(self, keep: int | None = None) -> None:
        self.keep = keep

    def on_save(self, args, state, control, **_: Any) -> None:
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every rank's part (RNG state, shards) is written
        if not rank_zero():
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not ckpt.is_dir():
            return
        problem = _safetensors_problems(ckpt)
        if problem:
            print(f"warning: {ckpt.name} not marked complete: {problem}", file=sys.stderr,
                  flush=True)
            return
        marker = {"step": state.global_step, "loss": _last_loss(state),
                  "files": file_manifest(ckpt)}
        tmp = ckpt / (COMPLETE_MARKER + ".tmp")
        tmp.write_text(json.dumps(marker))
        tmp.rename(ckpt / COMPLETE_MARKER)
        if self.keep:
            rotate(ckpt.parent, self.keep)


def rotate(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Remove all but the ``keep`` newest complete checkpoints, and any unmarked one older
    than the newest complete (a save that never finished); never the newest complete one.
    Returns what was removed."""
    import shutil

    dirs = sorted((s, d) for d in checkpoints_dir.iterdir() if (s := _step(d)) is not None)
    complete = [s for s, d in dirs if (d / COMPLETE_MARKER).exists()]
    if not complete:
        return []
    kept = set(complete[-max(keep, 1):])
    removed = []
    for s, d in dirs:
        if s not in kept and s < complete[-1]:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


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


HASHED_UP_TO = 16 * 2**20  # bytes: larger files get their size checked (and safetensors' header)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def file_manifest(ckpt: Path) -> dict[str, dict[str, Any]]:
    """Every file of a checkpoint (relative path → size, and sha256 when small)."""
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(ckpt.rglob("*")):
        if not p.is_file() or p.name.startswith(COMPLETE_MARKER):
            continue
        size = p.stat().st_size
        entry: dict[str, Any] = {"size": size}
        if size <= HASHED_UP_TO:
            entry["sha256"] = _sha256(p)
        files[p.relative_to(ckpt).as_posix()] = entry
    return files


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole (None when its header and size agree)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, too short for a header"
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                return f"header length {n} does not fit in {size} bytes"
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                  default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        return f"unreadable header ({e})"
    if 8 + n + end != size:
        return f"{size} bytes, its header says {8 + n + end}"
    return None


def _safetensors_problems(ckpt: Path) -> str | None:
    for p in sorted(ckpt.rglob("*.safetensors")):
        problem = safetensors_problem(p)
        if problem:
            return f"{p.relative_to(ckpt).as_posix()}: {problem}"
    return None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint that has its marker cannot be trusted (None when it can)."""
    try:
        marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable {COMPLETE_MARKER} ({e})"
    files = marker.get("files") if isinstance(marker, dict) else None
    for rel, want in (files or {}).items():  # none in markers older than the file list
        p = ckpt / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != want.get("size"):
            return f"{rel} has {size} bytes, {want.get('size')} were written"
        if "sha256" in want and _sha256(p) != want["sha256"]:
            return f"{rel} changed after it was written (sha256 differs)"
    return _safetensors_problems(ckpt)


@dataclass
class ResumePoint:
    """The checkpoint to resume from, and the newer ones that failed their check."""

    path: Path | None = None
    rejected: list[tuple[Path, str]] = field(default_factory=list)


def _step(d: Path) -> int | None:
    step = d.name.removeprefix("checkpoint-")
    return int(step) if d.name.startswith("checkpoint-") and step.isdigit() else None


def find_resume(checkpoints_dir: Path) -> ResumePoint:
    """The newest complete checkpoint whose files match its marker; only the ones newer than
    it are checked. Pure: every rank gets the same answer from the same files."""
    point = ResumePoint()
    if not checkpoints_dir.is_dir():
        return point
    marked = sorted(((s, d) for d in checkpoints_dir.iterdir()
                     if (s := _step(d)) is not None and (d / COMPLETE_MARKER).exists()),
                    reverse=True)
    for _, d in marked:
        problem = checkpoint_problem(d)
        if problem is None:
            point.path = d
            break
        point.rejected.append((d, problem))
    return point


def latest_complete_checkpoint(checkpoints_dir: Path) -> Path | None:
    return find_resume(checkpoints_dir).path


def set_aside(ckpt: Path) -> Path:
    """Move a rejected checkpoint out of the way (kept for a look, no longer matched by
    ``checkpoint-*``, so neither resume nor transformers' rotation sees it)."""
    target = ckpt.with_name(f"rejected-{ckpt.name}")
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"rejected-{ckpt.name}.{n}")
    ckpt.rename(target)
    return target


def read_progress(path: Path) -> list[dict[str, Any]]:
    """The records of a progress file; a line cut short by a kill is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def run_train_loss(records: list[dict[str, Any]], session_loss: float, *, resumed_step: int,
                   global_step: int) -> float:
    """The mean training loss over the whole run, across resumes.

    transformers' ``train_loss`` covers only the steps since this process started
    (``resumed_step`` .. ``global_step``); the steps before come from progress.jsonl, each
    logged loss weighted by the number of steps it averages."""
    done = global_step - resumed_step
    if resumed_step <= 0:
        return session_loss
    total, steps, prev = 0.0, 0, 0
    for r in records:
        step = r.get("step")
        if not isinstance(step, int) or step > resumed_step:
            continue
        if r.get("event") == "resumed":
            prev = step
        elif "event" not in r and isinstance(r.get("loss"), int | float) and step > prev:
            total += r["loss"] * (step - prev)
            steps += step - prev
            prev = step
    if steps + done <= 0:
        return session_loss
    return (total + session_loss * done) / (steps + done)


PLOTTED_METRICS = ("rewards/margins", "rewards/accuracies", "kl", "accuracy",
                   "eval_rewards/margins", "eval_rewards/accuracies", "eval_accuracy")


def loss_points(records: list[dict[str, Any]]
                ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, loss) for training and for evaluation: logged steps only, not the checkpoint
    and resume events (which repeat a loss at their step)."""
    steps = [r for r in records if "event" not in r]
    return ([(r["step"], r["loss"]) for r in steps if "loss" in r],
            [(r["step"], r["eval_loss"]) for r in steps if "eval_loss" in r])


def plot_loss(progress_file: Path, png: Path) -> Path | None:
    """Training (and eval) loss against step, as a PNG; preference stages get a second panel
    with their reward margin / accuracy / KL."""
    fig = loss_figure(read_progress(progress_file))
    if fig is None:
        return None
    import matplotlib.pyplot as plt  # after loss_figure chose the Agg backend

    tmp = png.with_name(png.name + ".tmp")
    try:
        fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    tmp.replace(png)
    return png


def loss_figure(records: list[dict[str, Any]]) -> Any:
    """The figure ``plot_loss`` saves (a matplotlib Figure), None when no loss was logged.
    Steps are whole numbers: so are the x axis' ticks."""
    train, evals = loss_points(records)
    records = [r for r in records if "event" not in r]
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
    from matplotlib.ticker import MaxNLocator

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
    for axis in axes[0][:panels]:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


class OperatorReport(TrainerCallback):
    """Tells the operator about checkpoints (progress itself goes through transformers'
    KubeflowCallback, to Kubeflow's endpoint when Trainer v2 has its own); failures never
    stop training."""

    def __init__(self, output_uri: str) -> None:
        self.output_uri = output_uri.rstrip("/")

    def on_save(self, args, state, control, **_: Any) -> None:
        if rank_zero():
            post_to_operator({"checkpoint": {
                "step": state.global_step, "loss": _last_loss(state),
                "uri": f"{self.output_uri}/checkpoints/checkpoint-{state.global_step}"}})


def post_to_operator(kubetune: dict[str, Any]) -> bool:
    """POST ``{"kubetune": ...}`` to kubetune's own endpoint (``KUBETUNE_PROGRESS_URL``, with
    the token and CA beside it), never to ``KUBEFLOW_TRAINER_SERVER_URL``: with Trainer v2's
    TrainJobStatus gate on, that one is Kubeflow's, which knows nothing of checkpoints or
    outputs. False when there is no endpoint or it did not take the report."""
    import os
    import ssl
    import urllib.request

    url = os.environ.get("KUBETUNE_PROGRESS_URL")
    token_file = os.environ.get("KUBETUNE_PROGRESS_TOKEN")
    if not url or not token_file or not os.path.exists(token_file):
        return False
    ca = os.environ.get("KUBETUNE_PROGRESS_CA_CERT")
    with open(token_file) as f:
        token = f.read().strip()
    req = urllib.request.Request(
        url, data=json.dumps({"kubetune": kubetune}).encode(), method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        # https: the endpoint's certificate is checked, against the operator's CA (mounted
        # beside the token) when there is one, else the system's; never not at all. (The CA
        # file is read on every report: a renewed CA reaches a running pod.)
        ctx = ssl.create_default_context(cafile=ca if ca else None) \
            if url.lower().startswith("https") else None
        with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
            return resp.status == 200
    except OSError:
        return False
