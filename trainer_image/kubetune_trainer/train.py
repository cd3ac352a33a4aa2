"""Run one FineTuneJob: pre-flight → model and data → the stage's recipe → resume → train →
``outputs.publish`` (evaluation, outputs, result). The same for every stage; what differs
lives in ``recipes/<stage>.py``.

Launched directly (one process), or by accelerate/torchrun (one per GPU): every rank runs this
same function; only rank 0 writes progress, plots and results.

Faults: the output is checked (writable, room for one checkpoint) before torch is imported /
before the model loads; a full or read-only disk during training or saving ends the run with
an ``OutputError`` (exit 2, reason in /dev/termination-log) after the half-written checkpoint or
output is removed. result.json's ``metrics.train_loss`` is the mean over the whole run, across
restarts (``train_loss_since_resume``: the part after the last one).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec
from kubetune.credentials import model_secret
from kubetune.errors import EXIT_RETRYABLE, KubetuneError, Preempted
from kubetune.strategy import STRATEGIES, strategy_of

from kubetune_trainer import outputs, tracking
from kubetune_trainer.config import RunContext
from kubetune_trainer.data.prepared import Data
from kubetune_trainer.outputs import Layout, output_root
from kubetune_trainer.recipes import Build, recipe
from kubetune_trainer.sources import resolve
from kubetune_trainer.storage import Store, uploader


def preflight(spec: FineTuneJobSpec, *, on_gpu: bool = True) -> Any:
    """Checks that need no data or model. Returns the stage's recipe. ``on_gpu``: False in
    the pre-flight pod, which has none (what needs one is checked by the training pods)."""
    import importlib.util

    rec = recipe(spec.stage)
    needs = [(t, t, "spec.training.reportTo") for t in spec.training.report_to or []]
    if spec.evaluation and spec.evaluation.lm_eval:
        needs.append(("evaluation.lmEval", "lm_eval", "spec.evaluation.lmEval"))
    for what, module, field in needs:
        if importlib.util.find_spec(module) is None:
            raise KubetuneError(f"{what} needs the {module} package in the trainer (pip "
                                "install 'kubetune[trackers,lmeval]', or the trainer image)",
                                field=field)
    if on_gpu:
        _needs_gpu(spec)
    for needed, package, field in _needs(spec):
        if needed and importlib.util.find_spec(package) is None:
            raise KubetuneError(f"{field} needs the {package} package in the trainer image "
                                f"(pip install {package})", field=field)
    return rec


def _needs_gpu(spec: FineTuneJobSpec) -> None:
    """Options that only run on a GPU (the API refuses them with gpusPerNode 0; a local run on
    a machine without one ends here)."""
    from kubetune_trainer.model import has_cuda

    lo, b = spec.method.lora, spec.training.boosters
    for wanted, field, what in (
            (lo is not None and lo.init == "loftq", "spec.method.lora.init", "loftq"),
            (b.liger, "spec.training.boosters.liger", "liger"),
            (spec.training.optimizer.name == "adalomo", "spec.training.optimizer.name",
             "adalomo"),
            (b.activation_offload, "spec.training.boosters.activationOffload",
             "activation offload"),
            (b.attention == "flash_attention_2", "spec.training.boosters.attention",
             "flash_attention_2")):
        if wanted and not has_cuda():
            raise KubetuneError(f"{field}: {what} needs a CUDA GPU and this machine has none",
                                field=field)


def _needs(spec: FineTuneJobSpec) -> list[tuple[bool, str, str]]:
    """(wanted, Python package, field) for the options that need an optional package."""
    opt, b = spec.training.optimizer.name, spec.training.boosters
    return [
        (spec.method.quantization is not None, "bitsandbytes", "spec.method.quantization"),
        (opt in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "galore_8bit"),
         "bitsandbytes", "spec.training.optimizer.name"),
        (opt in ("galore", "galore_8bit"), "galore_torch", "spec.training.optimizer.name"),
        (opt == "apollo", "apollo_torch", "spec.training.optimizer.name"),
        (opt == "badam", "badam", "spec.training.optimizer.name"),
        (opt in ("lomo", "adalomo"), "lomo_optim", "spec.training.optimizer.name"),
        (b.liger, "liger_kernel", "spec.training.boosters.liger"),
        (b.attention == "flash_attention_2", "flash_attn", "spec.training.boosters.attention"),
    ]


def model_path(spec: FineTuneJobSpec, ctx: RunContext, *, light: bool = False) -> Path:
    """The model's directory; ``light``: an hf:// model's config and tokenizer only."""
    if spec.model.from_job:
        path, field = outputs.upstream_model_path(spec.model.from_job, ctx), "spec.model.fromJob"
    else:
        field = "spec.model.source"
        path = resolve(spec.model.source, ctx, field=field, revision=spec.model.revision,
                       light=light, secret=model_secret(spec))
    if not (path / "config.json").exists():
        raise KubetuneError(f"no model at {path} (config.json missing)", field=field)
    return path


def prepare_data(spec: FineTuneJobSpec, ctx: RunContext, tokenizer: Any, rec: Any, *,
                 log=print, limit: int | None = None) -> Data:
    """Load and check every row, then let the recipe template, tokenize and split them;
    sft/pt data comes from the content-hash cache when an earlier run or rank prepared it."""
    from kubetune_trainer.data import cache

    digest = cache.key(spec, ctx, tokenizer, limit)
    if digest is None:
        if not getattr(rec, "STREAMS", False):
            return _prepare_data(spec, ctx, tokenizer, rec, log=log, limit=limit)
        work = cache.scratch(ctx)  # removed when the data sets are let go
        data = _prepare_data(spec, ctx, tokenizer, rec, log=log, limit=limit,
                             workdir=Path(work.name))
        data.keep = work
        return data
    limit_bytes = cache.limit_bytes()  # a bad setting is said before any work
    with cache.lock(ctx, digest):
        hit = cache.load(ctx, digest)
        store = _prepared_store(spec, digest)  # (an object-store output: shared there)
        if hit is None and store is not None and store[0].has(f"{store[1]}/meta.json"):
            with cache.building(ctx, digest) as work:
                store[0].get_dir(store[1], work)
            log(f"data: prepared rows fetched from {store[0].uri}/{store[1]}")
            hit = cache.load(ctx, digest)
        if hit is not None:
            data, lines = hit
            for line in lines:
                log(line)
            log(f"data: prepared rows loaded from the cache ({digest[:12]})")
            _share(store, ctx, digest, data, log)
            return data
        lines = []

        def keep(line: str) -> None:
            lines.append(line)
            log(line)

        with cache.building(ctx, digest) as work:
            data = _prepare_data(spec, ctx, tokenizer, rec, log=keep, limit=limit,
                                 workdir=work)
            cache.save(work, data, lines)
        data = cache.load(ctx, digest)[0]  # memory-mapped, as every other rank's
        data.stats["cached"] = False
        _share(store, ctx, digest, data, log)
    removed = cache.prune(ctx, digest, limit_bytes)
    unfinished = sum(cache.BUILDING in name or name.startswith(cache.SCRATCH)
                     for name in removed)
    if len(removed) > unfinished:
        log(f"data: {len(removed) - unfinished} least recently used prepared data sets removed "
            f"from the cache (over {cache.LIMIT_ENV})")
    if unfinished:
        log(f"data: {unfinished} unfinished prepared data sets of stopped runs removed from "
            "the cache")
    return data


SHARE_ENV = "KUBETUNE_SHARE_PREPARED"  # set in the pre-flight pod of an object-store output
PREPARED_IN_STORE = ".kubetune/prepared"


def _prepared_store(spec: FineTuneJobSpec, digest: str) -> tuple[Store, str] | None:
    """(the output's store, where this key's prepared rows go in it), or None."""
    store = Store.for_output(spec)
    return (store, f"{PREPARED_IN_STORE}/{digest[:32]}") if store is not None else None


def _share(store: tuple[Store, str] | None, ctx: RunContext, digest: str, data: Data,
           log) -> None:
    """In the pre-flight pod (SHARE_ENV): the prepared rows into the output's store, their
    meta.json last, for the training pods (``data.stats["shared"]`` says where)."""
    from kubetune_trainer.data import cache

    if store is None or not os.environ.get(SHARE_ENV):
        return
    where = f"{store[0].uri}/{store[1]}"
    if not store[0].has(f"{store[1]}/meta.json"):
        store[0].put_dir(cache.entry(ctx, digest), store[1], last="meta.json")
        log(f"data: prepared rows shared in {where}")
    data.stats["shared"] = where


def _prepare_data(spec: FineTuneJobSpec, ctx: RunContext, tokenizer: Any, rec: Any, *,
                  log=print, limit: int | None = None, workdir: Path | None = None) -> Data:
    """Recipes that stream (sft, pt) read the rows as they tokenize them and write the
    prepared rows under ``workdir``; the others get every example as a list."""
    from kubetune_trainer.data.loading import Examples
    from kubetune_trainer.data.templates import resolve_template

    def rows(specs: list, at: str) -> Examples:
        return Examples(specs, spec.stage, ctx, spec.training.max_invalid_fraction, at)

    examples = rows(spec.datasets, "spec.datasets")
    if workdir is not None:
        # A tokenizer without a chat template is an error only if a conversation comes.
        try:
            template = resolve_template(tokenizer, spec.template)
        except KubetuneError:
            template = None
        source = examples if limit is None else list(examples)[:limit]
        data = rec.prepare(source, tokenizer, template, spec, log, workdir=workdir)
    else:
        source = list(examples)[:limit] if limit is not None else list(examples)
        chat = any("messages" in ex for ex in source)
        template = resolve_template(tokenizer, spec.template) if chat else None
        data = rec.prepare(source, tokenizer, template, spec, log)
    report = examples.report
    log(f"data: {report.summary()}")
    data.stats.update(bad_rows=report.bad, rows=report.total,
                      bad_reasons=[r for r, _ in report.reasons.most_common(5)])
    if spec.eval_datasets:  # held out by the job, not by evalSplit: prepared the same way
        held_rows = rows(spec.eval_datasets, "spec.evalDatasets")
        held = list(held_rows)
        log(f"eval data: {held_rows.report.summary()}")
        plain = spec.model_copy(update={"training": spec.training.model_copy(
            update={"packing": False, "eval_split": 0.0})})
        more = {"workdir": workdir / "held"} if workdir is not None else {}
        if more:
            more["workdir"].mkdir()
        data.eval = rec.prepare(held, tokenizer, template, plain, _quiet, **more).train
        data.eval_examples = held
        data.stats.update(eval_rows=len(data.eval))
    return data


def training_args(spec: FineTuneJobSpec, out: Layout, *, has_eval: bool,
                  run_name: str | None = None) -> dict[str, Any]:
    """TrainingArguments fields every stage shares; a recipe adds its own and picks the
    TRL config class."""
    from kubetune_trainer.model import booster_args, has_cuda, optimizer_args, precision

    t = spec.training
    return dict(
        output_dir=str(out.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=spec.learning_rate(),
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.batch_size_per_device,
        per_device_eval_batch_size=t.batch_size_per_device,
        gradient_accumulation_steps=t.gradient_accumulation,
        dataloader_pin_memory=has_cuda(),
        use_cpu=not has_cuda(),
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # CheckpointMarker rotates, once the new one is complete
        logging_steps=t.log_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps or t.save_steps if has_eval else None,
        seed=t.seed,
        data_seed=t.seed,
        report_to=list(t.report_to or []) or "none",  # settings: tracking.session
        run_name=run_name,
        disable_tqdm=not sys.stderr.isatty(),
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        # Use the process group made in run() (gloo on CPU) instead of making a new one.
        accelerator_config={"use_configured_state": True},
        **precision(spec),
        **optimizer_args(spec),
        **booster_args(spec),
    )


def run(job: FineTuneJob, ctx: RunContext, *, log=print, callbacks: tuple[Any, ...] = ()
        ) -> dict[str, Any]:
    """Train to the end (resuming from the newest complete checkpoint) and write outputs.
    ``callbacks``: more transformers TrainerCallbacks (``kubetune sweep``'s early stopping)."""
    with tracking.session(job.spec, job.metadata.name, output_root(job.spec, ctx)) as trackers:
        return _run(job, ctx, trackers, log=log, extra=callbacks)


def _run(job: FineTuneJob, ctx: RunContext, trackers: tracking.Session, *, log=print,
         extra: tuple[Any, ...] = ()) -> dict[str, Any]:
    spec = job.spec
    out = Layout(output_root(spec, ctx))
    outputs.check_writable(out.root)  # first, before torch: a read-only output fails now
    store = Store.for_output(spec)  # s3:// or gs://: staged in out.root, uploaded
    if store is not None and os.environ.get("RANK", "0") == "0":
        log(store.check())  # unreachable, no bucket, refused credentials: fail now
    quiet_libraries(bars=sys.stderr.isatty())

    from accelerate import PartialState

    from kubetune_trainer.model import (
        checkpoint_bytes,
        finish_setup,
        load_model,
        load_tokenizer,
        peft_config,
    )
    from kubetune_trainer.preemption import Preemption, grace_seconds
    from kubetune_trainer.progress import (
        CheckpointMarker,
        LogLastStep,
        OperatorReport,
        ProgressLog,
    )

    rec = preflight(spec)
    state = _distributed_state(PartialState)
    main = state.is_main_process
    if main:
        for stale in outputs.clean_partial(out):
            log(f"removed {stale.name}, left half-written by an earlier run")
    if store is not None and state.is_local_main_process:  # each node stages its own copy
        store.restore(out, log if main else _quiet)  # a fresh pod: the newest checkpoint
    if main:
        trackers.start(out.root)  # MLflow/W&B runs: new, or continued from tracking.json
    state.wait_for_everyone()
    started = time.time()
    with state.local_main_process_first():  # one download/conversion per node, not per rank
        path = model_path(spec, ctx)
    if main:  # before the model loads: room for one checkpoint of the estimated size
        log(outputs.check_room(out.root, checkpoint_bytes(path, spec)))
    tokenizer = load_tokenizer(path, spec)
    with state.main_process_first():
        data = prepare_data(spec, ctx, tokenizer, rec, log=log if main else _quiet)

    # Preemption last: the save it measures includes the marker and the upload.
    preemption = Preemption(grace_seconds())
    callbacks = [LogLastStep(), CheckpointMarker(keep=spec.training.save_total_limit),
                 *([uploader(store, out)] if store else []), OperatorReport(spec.output.uri),
                 preemption.callback(), *extra]
    progress = ProgressLog(out.progress, echo=not sys.stderr.isatty())
    if main:
        callbacks.append(progress)
    args = training_args(spec, out, has_eval=data.eval is not None, run_name=trackers.run_name)
    sharded = _sharded_loading(spec, args)  # kept alive until the trainer is built
    # Seeded here, before the model and its adapter are made: a new head, LoRA's A and PiSSA's
    # randomized SVD come out the same after a restart (PiSSA's residual base must, or the
    # resumed adapter would sit on a different base).
    from transformers import set_seed

    set_seed(spec.training.seed)
    model = load_model(path, spec, head=rec.HEAD, pad_token_id=tokenizer.pad_token_id)
    if sharded is not None and main:
        log(f"{strategy_of(spec)}: the weights loaded sharded over {state.num_processes} "
            "processes")
    trainer = rec.build(Build(
        spec=spec, model=model, tokenizer=tokenizer, data=data, args=args,
        callbacks=callbacks, peft_config=peft_config(spec, head=rec.HEAD), ctx=ctx))
    del sharded
    _check_strategy(trainer, spec)
    _check_kept(trainer, data, spec, log if main else _quiet)
    finish_setup(trainer, spec, out.root, main=main)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # ProgressLog prints one readable line instead
    if sys.stderr.isatty():  # the bar, without raw {'loss': …} dicts written beside it
        from kubetune_trainer.progress import BarOnly

        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(BarOnly())
    resume = _resume_point(out, trainer, progress if main else None, log if main else _quiet)
    with _output_faults(out, progress if main else None):
        with _on_sigterm(preemption):
            train_result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if preemption.stopped_at is not None:
            raise _preempted(preemption, out, progress if main else None, log)
        trainer.accelerator.wait_for_everyone()
        metrics = _train_metrics(train_result, trainer, out, resume, main=main)
        result = outputs.run_result(
            job=job.metadata.name, spec=spec, out=out, resumed_from=resume,
            global_step=trainer.state.global_step, world_size=state.num_processes,
            metrics=metrics, data_stats=data.stats)
        return outputs.publish(
            trainer, result, spec=spec, ctx=ctx, out=out, data=data, tokenizer=tokenizer,
            head=rec.HEAD, store=store, trackers=trackers, main=main, started=started, log=log)


def _train_metrics(train_result: Any, trainer: Any, out: Layout, resume: Path | None, *,
                   main: bool) -> dict[str, float]:
    """transformers' training metrics; after a resume, rank 0's ``train_loss`` is the mean over
    the whole run (``train_loss_since_resume``: the part since the resume)."""
    from kubetune_trainer.progress import read_progress, run_train_loss

    metrics = outputs.numbers(train_result.metrics)
    resumed_step = _step_of(resume) if resume else 0
    if resumed_step and main and "train_loss" in metrics:  # the whole run, not this part
        metrics["train_loss_since_resume"] = metrics["train_loss"]
        metrics["train_loss"] = run_train_loss(
            read_progress(out.progress), metrics["train_loss"], resumed_step=resumed_step,
            global_step=trainer.state.global_step)
    return metrics


def _resume_point(out: Layout, trainer: Any, progress: Any, log) -> Path | None:
    """The newest complete checkpoint that passes its check; newer ones that fail are said
    (log and progress.jsonl) and, by rank 0 (``progress`` given), moved out of the way."""
    from kubetune_trainer.progress import find_resume, set_aside

    point = find_resume(out.checkpoints)  # every rank reads the same files, gets the same
    trainer.accelerator.wait_for_everyone()  # before rank 0 moves rejected ones away
    for ckpt, problem in point.rejected:
        fallback = f"resuming from {point.path.name}" if point.path else "starting over"
        log(f"{ckpt.name} is not usable ({problem}); {fallback}")
        if progress is not None:
            progress.notes.append({"event": "checkpoint_rejected", "step": _step_of(ckpt),
                                   "path": str(set_aside(ckpt)), "reason": problem})
    if point.path is not None:
        log(f"resuming from {point.path}")
    return point.path


@contextlib.contextmanager
def _output_faults(out: Layout, progress: Any) -> Iterator[None]:
    """A full or read-only disk while training or saving ends the run with an OutputError;
    rank 0 (``progress`` given) first removes what was half-written."""
    try:
        yield
    except Exception as exc:
        fault = outputs.output_fault(exc, out.root)
        if fault is None:
            raise
        if progress is not None:
            outputs.clean_partial(out)
            with contextlib.suppress(OSError):
                progress.write({"event": "failed", "reason": fault.reason,
                                "message": fault.message})
        raise fault from exc


@contextlib.contextmanager
def _on_sigterm(preemption: Any) -> Iterator[None]:
    """SIGTERM stops training at the next step boundary (the main thread only: a run inside
    another thread, as in some tests, keeps the process's own handling)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    preemption.install()
    try:
        yield
    finally:
        preemption.uninstall()


def _preempted(preemption: Any, out: Layout, progress: Any, log) -> Preempted:
    """What ends a run stopped by SIGTERM: said in the log and progress.jsonl (rank 0)."""
    from kubetune_trainer.progress import latest_complete_checkpoint

    step = preemption.stopped_at
    kept = latest_complete_checkpoint(out.checkpoints) if progress is not None else None
    if preemption.saved:
        what = f"checkpoint-{step} saved"
    else:
        what = ("no time left to save within the grace period; resuming from "
                f"{kept.name if kept else 'the start'}")
    message = f"stopped by SIGTERM at step {step}: {what}"
    if progress is not None:
        log(message)
        with contextlib.suppress(OSError):
            progress.write({"event": "preempted", "step": step, "saved": preemption.saved,
                            "resume_step": _step_of(kept) if kept else 0})
    return Preempted(message, step=step, saved=preemption.saved)


def _step_of(ckpt: Path) -> int:
    return int(ckpt.name.rsplit("-", 1)[-1])


def _check_kept(trainer: Any, data: Data, spec: FineTuneJobSpec, log) -> None:
    """Preference trainers drop rows that do not fit cutoffLen: say how many, and refuse to
    train on nothing."""
    kept = len(trainer.train_dataset)
    dropped = len(data.train) - kept
    if dropped > 0:
        log(f"data: {dropped} of {len(data.train)} rows do not fit training.cutoffLen "
            f"({spec.training.cutoff_len} tokens) and are left out")
    if kept == 0:
        from kubetune.errors import DataError

        raise DataError(f"no training row fits within {spec.training.cutoff_len} tokens; raise "
                        "it", field="spec.training.cutoffLen")


def _sharded_loading(spec: FineTuneJobSpec, args: dict[str, Any]) -> Any:
    """With ZeRO-3 the training arguments come before the model: they tell transformers to
    load the weights already partitioned (deepspeed.zero.Init), not whole on every process.
    Returns what must stay alive while the model loads (None without ZeRO-3)."""
    info = STRATEGIES[strategy_of(spec)]
    if info.engine != "deepspeed" or not info.shard_weights:
        return None
    from transformers import TrainingArguments
    from transformers.integrations import is_deepspeed_zero3_enabled

    fields = TrainingArguments.__dataclass_fields__  # not TRL's own (activation_offloading)
    made = TrainingArguments(**{k: v for k, v in args.items() if k in fields})
    return made if is_deepspeed_zero3_enabled() else None


def _check_strategy(trainer: Any, spec: FineTuneJobSpec) -> None:
    """resources.strategy is what the trainer really runs: a trainer started without
    kubetune-launch, or FSDP on CPU (accelerate runs FSDP on GPUs only), would otherwise
    train as plain data parallel, and run out of memory where the estimate said it fits."""
    from kubetune_trainer.model import has_cuda

    strategy = strategy_of(spec)
    want = STRATEGIES[strategy].engine
    got = "deepspeed" if trainer.is_deepspeed_enabled else \
        "fsdp" if trainer.is_fsdp_enabled else None
    if want is None or want == got:
        return
    if want == "fsdp" and not has_cuda():
        raise KubetuneError("fsdp2 needs CUDA GPUs (accelerate runs FSDP on GPUs only); on "
                            "CPU use zero3", field="spec.resources.strategy")
    raise KubetuneError(f"{strategy}: this trainer runs {got or 'plain data parallel'}; start "
                        f"it with kubetune-launch --strategy {strategy} (as the operator and "
                        "kubetune run do)", field="spec.resources.strategy")


def _distributed_state(partial_state: Any) -> Any:
    """The process group, made before the trainer's arguments so they use it.

    Under torchrun on CPU, accelerate only forms the group when asked for gloo explicitly.
    """
    from kubetune_trainer.model import has_cuda

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not has_cuda():
        return partial_state(backend="gloo")
    return partial_state()


def quiet_libraries(*, bars: bool) -> None:
    """No FutureWarnings about our pinned libraries' own deprecations, no transformers
    notices about its internals, no DeepSpeed notice that a CPU is a CPU. In a log (not a
    terminal, ``bars=False``) also no progress bars from datasets (TRL's passes) or
    transformers (loading, saving): one line per logging step."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # said, not detected: no warning
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    # bitsandbytes on CPU says it could not fetch an optional kernel from a hub (the `kernels`
    # package, deliberately absent): it falls back to its own, so it is not news.
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not bars:
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def _quiet(*_: Any, **__: Any) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    """``python -m kubetune_trainer.train JOB.yaml``: what the trainer image runs."""
    import argparse

    p = argparse.ArgumentParser(prog="kubetune-train", description=main.__doc__)
    p.add_argument("job", help="FineTuneJob YAML (the operator mounts it from a ConfigMap)")
    p.add_argument("--pvc-root", default="/mnt/pvc", help="where pvc:// claims are mounted")
    p.add_argument("--base-dir", default=None, help="relative paths resolve here")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    code = _exit_code(args)
    _exit_file(code)
    return code


def _exit_code(args: Any) -> int:
    """Run the job; the exit code is the contract with the controllers (``kubetune.errors``):
    0 done, 2 permanent (said in /dev/termination-log), 143 stopped by SIGTERM, 200 any other
    error (retryable: a crash, a CUDA/NCCL/network fault)."""
    import traceback

    from kubetune.jobfile import load_job

    from kubetune_trainer.preemption import exit_on_sigterm

    exit_on_sigterm()
    try:
        job = load_job(args.job)
        ctx = RunContext(base_dir=Path(args.base_dir or Path(args.job).resolve().parent),
                         pvc_root=Path(args.pvc_root))
        run(job, ctx)
    except KubetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        _termination_message(err)
        return err.exit_code
    except Preempted as stop:
        print(f"preempted: {stop.message}", file=sys.stderr, flush=True)
        _termination_message(stop)
        return stop.exit_code
    except SystemExit as stop:  # SIGTERM outside training: exit_on_sigterm
        if stop.code == Preempted.exit_code:
            return Preempted.exit_code
        raise
    except Exception as exc:  # noqa: BLE001 - the code tells the controller to retry
        full = outputs.disk_full(exc) or _out_of_gpu_memory(exc)
        if full is not None:  # a cache (model, data, prepared rows, staging), or a GPU
            print(f"error: {full.message}", file=sys.stderr)
            _termination_message(full)
            return full.exit_code
        traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc} (exit {EXIT_RETRYABLE}: retried, resuming "
              "from the last complete checkpoint)", file=sys.stderr, flush=True)
        return EXIT_RETRYABLE
    return 0


def _out_of_gpu_memory(exc: BaseException) -> KubetuneError | None:
    """A CUDA out-of-memory error as the permanent error it is (a model that does not fit
    at this batch size and length fails again on every retry), naming what to change."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is None or not isinstance(exc, oom):
        return None
    from kubetune.errors import GPUOutOfMemoryError

    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else "out of memory"
    return GPUOutOfMemoryError(
        f"the GPU ran out of memory ({first}): the model does not fit at this batch size and "
        "length; lower batchSizePerDevice or cutoffLen, turn on gradientCheckpointing, use "
        "lora (with quantization: QLoRA), a ZeRO strategy or more GPUs (`kubetune estimate` "
        "shows the parts)", field="spec.training")


def _exit_file(code: int) -> None:
    """Under kubetune-launch with several processes: this rank's exit code, for the
    launcher to pass the contract on (torchrun and accelerate exit 1 for any failure)."""
    where = os.environ.get("KUBETUNE_EXIT_DIR")
    if where and os.path.isdir(where):
        with contextlib.suppress(OSError):
            Path(where, f"rank-{os.environ.get('RANK', '0')}").write_text(str(code))


def _termination_message(err: KubetuneError | Preempted) -> None:
    """A short structured reason the operator reads from the pod status."""
    termination_log({"reason": err.reason, "field": getattr(err, "field", None),
                     "message": err.message[:1500]})


def termination_log(payload: dict[str, Any]) -> None:
    """``payload`` as JSON in the pod's termination message (KUBETUNE_TERMINATION_LOG, else
    /dev/termination-log; nothing where it cannot be written, as outside a pod)."""
    path = Path(os.environ.get("KUBETUNE_TERMINATION_LOG", "/dev/termination-log"))
    if path.parent.is_dir() and os.access(path if path.exists() else path.parent, os.W_OK):
        path.write_text(json.dumps(payload, separators=(",", ":")))


if __name__ == "__main__":
    sys.exit(main())
