"""Where a run writes, and how: every output appears whole or not at all.

Each directory is written as ``NAME.partial`` and then swapped in; each file as ``NAME.tmp``
and renamed. A run killed half-way leaves the previous output (or none), never half of one;
the next run (and a run stopped by a full or read-only disk, before it exits) removes what
such a run left: ``*.partial``, ``*.tmp`` and checkpoints without their complete marker.

Pre-flight, before the model loads: the output must be a writable directory with room for one
checkpoint of the estimated size (``model.checkpoint_bytes``). After the last step,
``publish`` does the end of a run: final evaluation, the model (and its merge), predictions and
lm-eval, the loss plot, the trackers, result.json, the upload to a store or the Hub, and the
report to the operator.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.errors import KubetuneError, OutputError

from kubetune_trainer import evaluation
from kubetune_trainer.config import RunContext
from kubetune_trainer.data.prepared import Data
from kubetune_trainer.sources import resolve, split_uri
from kubetune_trainer.storage import Store
from kubetune_trainer.tracking import Session

RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.jsonl"
STATUS_KEYS = {"adapter": "adapter", "merged_model": "mergedModel", "model": "model"}


@dataclass(frozen=True)
class Layout:
    """Where a run writes, under the job's output location."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def progress(self) -> Path:
        return self.root / PROGRESS_FILE

    @property
    def result(self) -> Path:
        return self.root / RESULT_FILE


def output_root(spec: FineTuneJobSpec, ctx: RunContext) -> Path:
    """The output directory on this machine: the output itself, or, for s3://, gs:// and
    hf:// outputs, where they are staged before upload (``storage``)."""
    from kubetune_trainer.storage import is_remote, staging_root

    scheme, _ = split_uri(spec.output.uri)
    if is_remote(spec.output.uri):
        return staging_root(spec.output.uri, ctx)
    if scheme not in ("", "file", "pvc"):
        raise KubetuneError(f"{scheme}:// outputs are not supported; use a local path, "
                            "pvc://CLAIM/path, s3://, gs:// or hf://ORG/NAME",
                            field="spec.output.uri")
    return resolve(spec.output.uri, ctx, field="spec.output.uri", kind="output")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_writable(root: Path) -> None:
    """The output directory exists (or can be made) and takes a file."""
    probe = root / f".kubetune-write-check-{os.getpid()}"
    try:
        if root.exists() and not root.is_dir():
            raise OutputError(f"{root} is a file, not a directory", field="spec.output.uri")
        root.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise OutputError(f"cannot write to {root}: {e.strerror or e}",
                          field="spec.output.uri") from None


def check_room(root: Path, need: int | None) -> str:
    """Refuse to start when the output's file system cannot take one checkpoint."""
    free = shutil.disk_usage(root).free
    if need is not None and free < need:
        raise OutputError(f"{root} has {human(free)} free; a checkpoint of this run needs "
                          f"about {human(need)}", field="spec.output.uri")
    about = f", a checkpoint needs about {human(need)}" if need is not None else ""
    return f"output: {root} writable, {human(free)} free{about}"


def clean_partial(out: Layout) -> list[Path]:
    """Remove what an interrupted run left half-written; returns what was removed."""
    from kubetune_trainer.progress import COMPLETE_MARKER

    removed = []
    found = [*out.root.glob("*.partial"), *out.root.glob("*.tmp")]
    if out.checkpoints.is_dir():
        found += [d for d in out.checkpoints.glob("checkpoint-*")
                  if d.is_dir() and not (d / COMPLETE_MARKER).exists()]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


FULL = (errno.ENOSPC, errno.EDQUOT)
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_RUST_IO = re.compile(r"os error (\d+)")  # safetensors/tokenizers: "... (os error 28)"


def output_fault(exc: BaseException, root: Path) -> OutputError | None:
    """An OutputError when ``exc`` (or its cause) is the disk saying full or read-only."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code, where = None, None
        if isinstance(e, OSError) and e.errno is not None:
            code, where = e.errno, e.filename
        elif m := _RUST_IO.search(str(e)):
            code = int(m.group(1))
        elif isinstance(e, RuntimeError) and "write" in str(e) and _nearly_full(root):
            code = errno.ENOSPC  # torch.save: "PytorchStreamWriter failed writing file ..."
        if code in FULL or code in READ_ONLY:
            if code in READ_ONLY and where and not str(where).startswith(str(root)):
                return None  # not ours: some other file was refused
            target = f"writing {where}" if where else f"writing under {root}"
            if code in FULL:
                free = _free(root)
                what = (f"no space left ({human(free)} free) {target}: free some space or give "
                        "the output a larger volume") if free is not None else \
                    f"no space left {target}"
            else:
                what = f"{os.strerror(code).lower()} {target}: the output must be writable"
            return OutputError(f"{what}; the half-written checkpoint or output was removed, "
                               "complete checkpoints are kept", field="spec.output.uri")
        e = e.__cause__ or e.__context__
    return None


def disk_full(exc: BaseException, *, in_pod: bool | None = None) -> Any:
    """A DiskFullError for ``exc`` (or its cause) when it is a disk saying full anywhere
    (a model or data download, the prepared-rows cache, staging), naming the path and its
    free space; None otherwise. Its exit code is 2 where a retry meets the same full disk
    (a claim, a local directory) and retryable (200) on a pod's scratch volume (under the
    temporary directory, new in each pod)."""
    import tempfile

    from kubetune.errors import EXIT_RETRYABLE, DiskFullError

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code = e.errno if isinstance(e, OSError) else None
        if code is None and (m := _RUST_IO.search(str(e))):
            code = int(m.group(1))
        if code is None and isinstance(e, OSError) and _nearly_full(_cache_root()) and \
                re.search(r"No space left|requested and \d+ written", str(e)):
            code = errno.ENOSPC  # pyarrow (datasets): "7589 requested and 0 written"
        if code in FULL:
            where = getattr(e, "filename", None) or getattr(e, "filename2", None)
            path = Path(str(where)) if where else _cache_root()
            probe = path
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            try:
                usage = shutil.disk_usage(probe)
                room = f"{human(usage.free)} free of {human(usage.total)}"
            except OSError:
                room = "free space unknown"
            scratch = str(path).startswith(tempfile.gettempdir().rstrip("/") + "/")
            if in_pod is None:
                in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
            retry = in_pod and scratch
            err = DiskFullError(
                f"no space left on device writing {path} ({room} there): "
                + ("the pod's scratch volume is full; retried in a new pod (raise "
                   "spec.resources.scratchSize if it fills again)" if retry else
                   "free some space or move the cache to a larger volume "
                   "(KUBETUNE_CACHE, HF_HOME); not retried, a retry would meet the same disk"))
            if retry:
                err.exit_code = EXIT_RETRYABLE
            return err
        e = e.__cause__ or e.__context__
    return None


def _cache_root() -> Path:
    from kubetune_trainer.config import default_cache_dir

    return default_cache_dir()


def _free(root: Path) -> int | None:
    try:
        return shutil.disk_usage(root).free
    except OSError:
        return None


def _nearly_full(root: Path) -> bool:
    free = _free(root)
    return free is not None and free < 16 * 2**20


def staging(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def swap_in(staged: Path, target: Path) -> None:
    """Replace ``target`` by the fully written ``staged`` directory."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staged.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def replace_dir(target: Path, write: Callable[[Path], Any]) -> Path:
    """Write into a fresh staging directory, then swap it in."""
    tmp = staging(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    swap_in(tmp, target)
    return target


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.rename(path)


def save_whole_model(trainer: Any, out: Layout, *, adapter: bool = False,
                     max_shard_size: str = "5GB") -> None:
    """Every rank calls this (ZeRO-3/FSDP gather the weights); rank 0 writes the staging dir:
    the whole model, or (``adapter``, with sharded weights) the adapter alone. One process:
    safetensors shards of at most ``max_shard_size`` (output.maxShardSize); distributed,
    transformers' own gathering save (its default shard size)."""
    target = staging(out.adapter if adapter else out.model)
    if trainer.accelerator.num_processes == 1 and not (trainer.is_deepspeed_enabled
                                                       or trainer.is_fsdp_enabled):
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(str(target), max_shard_size=max_shard_size)
    else:
        trainer.save_model(str(target))
    trainer.accelerator.wait_for_everyone()


def save(trainer: Any, tokenizer: Any, spec: FineTuneJobSpec, out: Layout, *, adapter: bool,
         head: str, gathered: bool = False) -> dict[str, str]:
    """Rank 0, after ``save_whole_model`` on every rank for whole-model methods (and for
    adapters when the weights are sharded: ``gathered``). Returns what was written: adapter
    (+ merged_model), or model."""
    model = trainer.model
    model.config.use_cache = True
    written: dict[str, str] = {}

    def with_tokenizer(obj: Any, **kw: Any) -> Callable[[Path], None]:
        return lambda p: (obj.save_pretrained(p, **kw), tokenizer.save_pretrained(p))

    if adapter:
        if gathered:  # this rank's model holds only its shard: the adapter is on disk
            tokenizer.save_pretrained(staging(out.adapter))
            swap_in(staging(out.adapter), out.adapter)
        else:
            replace_dir(out.adapter, _adapter_writer(model, spec, out, tokenizer))
        written["adapter"] = str(out.adapter)
        if spec.output.merge:
            merged = _merge_full_precision(model, head, out.adapter if gathered else None) \
                if spec.method.qlora or gathered else model.merge_and_unload()
            written["merged_model"] = str(replace_dir(out.merged, with_tokenizer(
                merged, max_shard_size=spec.output.max_shard_size)))
    else:
        tokenizer.save_pretrained(staging(out.model))
        swap_in(staging(out.model), out.model)
        written["model"] = str(out.model)
    return written


def _adapter_writer(model: Any, spec: FineTuneJobSpec, out: Layout,
                    tokenizer: Any) -> Callable[[Path], None]:
    """PiSSA/OLoRA trained on a rewritten base: the adapter is saved converted (PEFT, rank
    2r) so that it applies to the original base like any LoRA."""
    from kubetune_trainer.model import CONVERTED_INITS, initial_adapter_dir

    init = initial_adapter_dir(out.root)
    lo = spec.method.lora
    kwargs = {}
    if lo is not None and lo.init in CONVERTED_INITS and init.exists():
        kwargs["path_initial_model_for_weight_conversion"] = str(init)
    return lambda p: (model.save_pretrained(p, **kwargs), tokenizer.save_pretrained(p))


def _merge_full_precision(model: Any, head: str, saved: Path | None = None) -> Any:
    """QLoRA, or sharded weights: merge the adapter (``saved`` there already, or saved from
    ``model``) into a fresh, unquantized copy of the base model (full precision, not 4/8-bit)."""
    import tempfile

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.integrations import unset_hf_deepspeed_config

    # Rank 0 alone loads this copy, whole: not through ZeRO-3's collective, partitioned
    # loading (the run's last load; the trainer is done with it).
    unset_hf_deepspeed_config()
    base_path = model.peft_config["default"].base_model_name_or_path
    with tempfile.TemporaryDirectory() as tmp:
        if saved is None:
            model.save_pretrained(tmp)
        else:
            tmp = str(saved)
        if head == "reward":
            base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1)
        else:
            base = AutoModelForCausalLM.from_pretrained(base_path)
        return PeftModel.from_pretrained(base, tmp).merge_and_unload()


def run_result(*, job: str, spec: FineTuneJobSpec, out: Layout, resumed_from: Path | None,
               global_step: int, world_size: int, metrics: dict[str, float],
               data_stats: dict[str, Any]) -> dict[str, Any]:
    """What result.json says of the training itself; ``publish`` adds the rest."""
    return {
        "job": job,
        "stage": spec.stage,
        "method": spec.method.type,
        "base_model": spec.model.source or f"fromJob {spec.model.from_job}",
        "resumed_from": str(resumed_from) if resumed_from else None,
        "global_step": global_step,
        "world_size": world_size,
        "metrics": metrics,
        "data": data_stats,
        "progress": str(out.progress),
        "checkpoints": [str(p) for p in sorted(
            out.checkpoints.glob("checkpoint-*"),
            key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit()
            else -1)],
    }


def publish(trainer: Any, result: dict[str, Any], *, spec: FineTuneJobSpec, ctx: RunContext,
            out: Layout, data: Data, tokenizer: Any, head: str, store: Store | None,
            trackers: Session, main: bool, started: float, log=print) -> dict[str, Any]:
    """The end of a run, after the last step. Every rank evaluates and, for whole-model
    methods or sharded weights, gathers the model (both collective); rank 0 (``main``) then
    answers the held-out prompts, saves (and merges), runs lm-eval, plots the loss, closes the
    trackers, writes result.json, uploads to the store or pushes to the Hub, and reports the
    outputs to the operator. Returns ``result`` with all of that added."""
    import time

    from kubetune.strategy import STRATEGIES, strategy_of

    from kubetune_trainer.model import method
    from kubetune_trainer.progress import plot_loss, post_to_operator

    metrics = result["metrics"]
    if data.eval is not None:
        metrics.update(_final_eval(trainer))
        metrics.update(evaluation.perplexity(metrics))
    adapter = method(spec).adapter
    gathered = STRATEGIES[strategy_of(spec)].shard_weights  # a rank holds a shard only
    if not adapter or gathered:
        save_whole_model(trainer, out, adapter=adapter, max_shard_size=spec.output.max_shard_size)
    if not main:
        return result
    if spec.evaluation and spec.evaluation.predict and data.eval_examples:
        log(f"evaluation: answering up to {spec.evaluation.max_samples} held-out prompts")
        metrics.update(evaluation.predict(
            trainer.model, tokenizer, data.template, data.eval_examples,
            out.root / evaluation.PREDICTIONS_FILE, max_samples=spec.evaluation.max_samples,
            max_new_tokens=spec.evaluation.max_new_tokens))
        result["predictions"] = str(out.root / evaluation.PREDICTIONS_FILE)
    written = save(trainer, tokenizer, spec, out, adapter=adapter, head=head, gathered=gathered)
    result.update(written)
    if spec.evaluation and spec.evaluation.lm_eval:
        metrics.update(evaluation.lm_eval(spec.evaluation.lm_eval, written, ctx, out.root,
                                          log=log))
    png = plot_loss(out.progress, out.root / "loss.png")
    result["loss_plot"] = str(png) if png else None
    status = status_outputs(spec, written)
    if url := trackers.finish(metrics):
        result["tracking_url"] = status["trackingUrl"] = url
    result["output_uri"] = spec.output.uri
    result["seconds"] = round(time.time() - started, 1)
    write_json(out.result, result)
    if store is not None:  # the status points at the store once all is there
        log(f"output: uploading to {store.uri}")
        store.upload_outputs(out, [Path(p).name for p in written.values()] + [
            evaluation.PREDICTIONS_FILE, "loss.png", "runs", out.progress.name,
            out.result.name])
    elif spec.output.uri.startswith("hf://"):
        from kubetune_trainer import hub

        hub.push(hub.plan(spec, out, result, written), spec=spec, log=log)
    post_to_operator({"outputs": {**status, "metrics": final_metrics(metrics)}})
    return result


def _final_eval(trainer: Any) -> dict[str, float]:
    """The eval metrics at the last step: the ones logged there when the run evaluated at its
    last step (no second eval point in progress.jsonl), else a fresh evaluation."""
    for entry in reversed(trainer.state.log_history[-3:]):
        if "eval_loss" in entry and entry.get("step") == trainer.state.global_step:
            return numbers({k: v for k, v in entry.items() if k.startswith("eval_")})
    return numbers(trainer.evaluate())


def final_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """What the status keeps of result.json's metrics: losses and the stage's eval metrics."""
    import math

    from kubetune.api.stages import FINAL_METRIC_PATTERN, STAGE_METRIC_PATTERN

    keep = re.compile(FINAL_METRIC_PATTERN + "|" + STAGE_METRIC_PATTERN)
    return {k: v for k, v in metrics.items() if keep.match(k) and math.isfinite(v)}


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics, as floats."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}


def status_outputs(spec: FineTuneJobSpec, written: dict[str, str]) -> dict[str, str]:
    """The same outputs as URIs under spec.output.uri, keyed as in the FineTuneJob status."""
    base = spec.output.uri.rstrip("/")
    if base.startswith("hf://"):  # one model at the repository's root (hub.plan)
        pushed = next(k for k in ("merged_model", "adapter", "model") if k in written)
        return {STATUS_KEYS[pushed]: base}
    return {STATUS_KEYS[k]: f"{base}/{Path(v).name}" for k, v in written.items()}


def upstream_model_path(name: str, ctx: RunContext) -> Path:
    """spec.model.fromJob, locally: the job file of that name beside this one, and the model
    its finished run wrote (result.json). In a cluster the operator resolves it instead."""
    from kubetune.jobfile import load_job
    from kubetune.pipeline import FIELD, upstream_model

    for candidate in sorted([*ctx.base_dir.glob("*.yaml"), *ctx.base_dir.glob("*.yml")]):
        try:
            other = load_job(candidate)
        except KubetuneError:
            continue
        if other.metadata.name != name:
            continue
        result = Layout(output_root(other.spec, ctx)).result
        if not result.exists():
            raise KubetuneError(f"{name!r} ({candidate.name}) has not finished here: no "
                                f"{result}; run it first: kubetune run {candidate}", field=FIELD)
        done = json.loads(result.read_text())
        model, _, problem = upstream_model(name, "Succeeded", done)
        if model is None:
            raise KubetuneError((problem or f"{name!r}: its {result} lists no model"
                                 ).removeprefix(f"{FIELD}: "), field=FIELD)
        return Path(model)
    raise KubetuneError(f"no job file for FineTuneJob {name!r} in {ctx.base_dir}", field=FIELD)
