"""Run one FineTuneJob: pre-flight, data, model, TRL trainer, checkpoints, outputs.

Launched directly (one process), or by accelerate/torchrun (one per GPU): every rank runs this
same function; only rank 0 writes progress, plots and results.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import IMPLEMENTED_STAGES, FineTuneJob, FineTuneJobSpec
from kubetune.errors import KubetuneError

from kubetune_trainer.config import RunContext
from kubetune_trainer.sources import resolve, split_uri

RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.jsonl"


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
    scheme, _ = split_uri(spec.output.uri)
    if scheme not in ("", "file", "pvc"):
        raise KubetuneError(f"{scheme}:// outputs are not supported yet; use a local path or "
                            "pvc://CLAIM/path", field="spec.output.uri")
    return resolve(spec.output.uri, ctx, field="spec.output.uri", kind="output")


def preflight(spec: FineTuneJobSpec) -> None:
    """Checks that need no data or model: what this trainer version can do."""
    if spec.stage not in IMPLEMENTED_STAGES:
        raise KubetuneError(
            f"stage {spec.stage!r} is accepted by the API but not implemented by this trainer "
            f"yet; implemented: {', '.join(sorted(IMPLEMENTED_STAGES))}", field="spec.stage")
    if spec.method.type == "qlora":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise KubetuneError("method.type qlora needs the bitsandbytes package in the "
                                "trainer (pip install bitsandbytes)", field="spec.method.type")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _precision(spec: FineTuneJobSpec) -> dict[str, bool]:
    import torch

    want = spec.training.precision
    if want == "auto":
        want = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": want == "bf16", "fp16": want == "fp16"}


def load_tokenizer(model_path: Path, spec: FineTuneJobSpec) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path,
                                        trust_remote_code=spec.model.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.is_fast:
        raise KubetuneError("the model needs a fast (Rust) tokenizer for answer masking",
                            field="spec.model.source")
    return tok


def prepare_data(spec: FineTuneJobSpec, ctx: RunContext, tokenizer: Any,
                 log=print) -> tuple[Any, Any, dict[str, Any]]:
    """Load, check, template, tokenize, mask, split and (optionally) pack the data sets."""
    import datasets

    from kubetune_trainer.data.loading import load_examples
    from kubetune_trainer.data.preprocess import (
        Options,
        default_workers,
        pack,
        resolve_template,
        tokenize,
    )

    t = spec.training
    examples, report = load_examples(spec.datasets, spec.stage, ctx,
                                     max_invalid_fraction=t.max_invalid_fraction)
    log(f"data: {report.summary()}")
    chat = any("messages" in ex for ex in examples)
    template = resolve_template(tokenizer, spec.template) if chat else None
    opts = Options(stage=spec.stage, cutoff_len=t.cutoff_len, train_on_prompt=t.train_on_prompt,
                   mask_history=t.mask_history)
    tok = tokenize(examples, tokenizer, template, opts,
                   workers=t.preprocessing_workers or default_workers())
    st = tok.stats
    log(f"data: {st.sequences} sequences, {st.tokens} tokens ({st.trained_tokens} trained); "
        f"{st.truncated} cut at cutoffLen, {st.dropped_too_long} dropped (no answer left)")
    import numpy as np

    order = np.random.default_rng(t.seed).permutation(len(tok.input_ids))
    n_eval = int(round(len(order) * t.eval_split)) if t.eval_split > 0 else 0
    if t.eval_split > 0 and not 0 < n_eval < len(order):
        raise KubetuneError(f"evalSplit {t.eval_split} of {len(order)} sequences leaves no "
                            "train or no eval rows", field="spec.training.evalSplit")
    eval_ds = None
    if n_eval:
        eval_ds = datasets.Dataset.from_dict(
            {"input_ids": [tok.input_ids[i] for i in order[:n_eval]],
             "labels": [tok.labels[i] for i in order[:n_eval]]})
    train_ids = [tok.input_ids[i] for i in order[n_eval:]]
    train_labels = [tok.labels[i] for i in order[n_eval:]]
    if t.packing:
        ds = datasets.Dataset.from_dict(pack(train_ids, train_labels, t.cutoff_len))
        log(f"data: packed into {len(ds)} rows of at most {t.cutoff_len} tokens")
    else:
        ds = datasets.Dataset.from_dict({"input_ids": train_ids, "labels": train_labels})
    stats = {**asdict(st), "bad_rows": report.bad, "rows": report.total}
    return ds, eval_ds, stats


class Collator:
    """Right-pads a batch. Packed rows carry position_ids and no attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        packed = "position_ids" in features[0]
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        batch["position_ids" if packed else "attention_mask"] = []
        for f in features:
            n = len(f["input_ids"])
            pad = width - n
            batch["input_ids"].append(f["input_ids"] + [self.pad_id] * pad)
            batch["labels"].append(f["labels"] + [-100] * pad)
            if packed:
                batch["position_ids"].append(f["position_ids"] + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * n + [0] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def load_model(model_path: Path, spec: FineTuneJobSpec) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": spec.model.trust_remote_code}
    prec = _precision(spec)
    kwargs["dtype"] = torch.bfloat16 if prec["bf16"] else torch.float32
    if spec.method.type == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False  # training; also lets packed rows get block masks
    if spec.method.type == "freeze":
        apply_freeze(model, spec)
    if spec.method.type == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.training.gradient_checkpointing)
    return model


def _decoder_layers(model: Any) -> Any:
    import torch

    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise KubetuneError("cannot find the decoder layers for method.type freeze",
                        field="spec.method.type")


def apply_freeze(model: Any, spec: FineTuneJobSpec) -> None:
    """Train only the last (or first) N decoder layers, optionally only some modules."""
    fr = spec.method.freeze_or_default()
    layers = _decoder_layers(model)
    n = len(layers)
    if not 0 < abs(fr.trainable_layers) <= n:
        raise KubetuneError(f"trainableLayers must be between -{n} and {n} (not 0) for a "
                            f"{n}-layer model", field="spec.method.freeze.trainableLayers")
    picked = range(n - fr.trainable_layers, n) if fr.trainable_layers > 0 else \
        range(0, -fr.trainable_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    hits = 0
    for i in picked:
        for name, p in layers[i].named_parameters():
            if "all" in fr.trainable_modules or any(m in name for m in fr.trainable_modules):
                p.requires_grad_(True)
                hits += 1
    for name, p in model.named_parameters():
        if any(m in name for m in fr.extra_modules):
            p.requires_grad_(True)
            hits += 1
    if hits == 0:
        raise KubetuneError(f"no parameter matches trainableModules {fr.trainable_modules}",
                            field="spec.method.freeze.trainableModules")


def peft_config(spec: FineTuneJobSpec) -> Any:
    if spec.method.type not in ("lora", "qlora"):
        return None
    from peft import LoraConfig

    lo = spec.method.lora_or_default()
    targets = lo.target_modules
    return LoraConfig(
        r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout, task_type="CAUSAL_LM",
        target_modules="all-linear" if targets == ["all-linear"] else targets)


def training_args(spec: FineTuneJobSpec, out: Layout, *, has_eval: bool) -> Any:
    from trl import SFTConfig

    t = spec.training
    return SFTConfig(
        output_dir=str(out.checkpoints),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        per_device_train_batch_size=t.batch_size_per_device,
        per_device_eval_batch_size=t.batch_size_per_device,
        gradient_accumulation_steps=t.gradient_accumulation,
        activation_checkpointing=t.gradient_checkpointing,
        dataloader_pin_memory=_has_cuda(),
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        logging_steps=t.log_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps or t.save_steps if has_eval else None,
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        disable_tqdm=not sys.stderr.isatty(),
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        # Use the process group made in run() (gloo on CPU) instead of making a new one.
        accelerator_config={"use_configured_state": True},
        **_precision(spec),
    )


def run(job: FineTuneJob, ctx: RunContext, *, log=print) -> dict[str, Any]:
    """Train to the end (resuming from the newest complete checkpoint) and write outputs."""
    from accelerate import PartialState

    spec = job.spec
    preflight(spec)
    out = Layout(output_root(spec, ctx))
    state = _distributed_state(PartialState)
    main = state.is_main_process
    if main:
        out.root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with state.local_main_process_first():  # one download/conversion per node, not per rank
        model_path = resolve(spec.model.source, ctx, field="spec.model.source",
                             revision=spec.model.revision)
    if not (model_path / "config.json").exists():
        raise KubetuneError(f"no model at {model_path} (config.json missing)",
                            field="spec.model.source")
    tokenizer = load_tokenizer(model_path, spec)
    with state.main_process_first():
        train_ds, eval_ds, data_stats = prepare_data(spec, ctx, tokenizer,
                                                     log=log if main else _quiet)

    from trl import SFTTrainer

    from kubetune_trainer.progress import (
        CheckpointMarker,
        OperatorReport,
        ProgressLog,
        latest_complete_checkpoint,
        plot_loss,
        post_to_operator,
    )

    model = load_model(model_path, spec)
    callbacks = [CheckpointMarker(), OperatorReport(spec.output.uri)]
    if main:
        callbacks.append(ProgressLog(out.progress, echo=not sys.stderr.isatty()))
    trainer = SFTTrainer(
        model=model,
        args=training_args(spec, out, has_eval=eval_ds is not None),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=Collator(tokenizer.pad_token_id),
        peft_config=peft_config(spec),
        callbacks=callbacks,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # ProgressLog prints one readable line instead
    resume = latest_complete_checkpoint(out.checkpoints)
    if resume is not None:
        log(f"resuming from {resume}")
    train_result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    trainer.accelerator.wait_for_everyone()

    result: dict[str, Any] = {
        "job": job.metadata.name,
        "stage": spec.stage,
        "method": spec.method.type,
        "base_model": spec.model.source,
        "resumed_from": str(resume) if resume else None,
        "global_step": trainer.state.global_step,
        "world_size": state.num_processes,
        "metrics": {k: float(v) for k, v in train_result.metrics.items()
                    if isinstance(v, int | float)},
        "data": data_stats,
        "progress": str(out.progress),
        "checkpoints": sorted(str(p) for p in out.checkpoints.glob("checkpoint-*")),
    }
    if eval_ds is not None:
        result["metrics"].update({k: float(v) for k, v in trainer.evaluate().items()
                                  if isinstance(v, int | float)})
    whole_model = spec.method.type not in ("lora", "qlora")
    if whole_model:  # every rank takes part (ZeRO-3/FSDP gather the weights); rank 0 writes
        staging = out.model.with_name(out.model.name + ".partial")
        trainer.save_model(str(staging))
        trainer.accelerator.wait_for_everyone()
    if main:
        written = save_outputs(trainer, tokenizer, spec, out)
        result.update(written)
        post_to_operator({"outputs": {
            {"merged_model": "mergedModel"}.get(k, k): spec.output.uri.rstrip("/") + "/"
            + Path(v).name for k, v in written.items()}})
        png = plot_loss(out.progress, out.root / "loss.png")
        result["loss_plot"] = str(png) if png else None
        result["seconds"] = round(time.time() - started, 1)
        tmp = out.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.rename(out.result)
    return result


def save_outputs(trainer: Any, tokenizer: Any, spec: FineTuneJobSpec, out: Layout
                 ) -> dict[str, str]:
    model = trainer.model
    model.config.use_cache = True
    written: dict[str, str] = {}
    if spec.method.type in ("lora", "qlora"):
        _replace_dir(out.adapter, lambda p: (model.save_pretrained(p),
                                             tokenizer.save_pretrained(p)))
        written["adapter"] = str(out.adapter)
        if spec.output.merge:
            merged = model.merge_and_unload() if spec.method.type == "lora" else \
                _merge_into_full_precision(model, spec)
            _replace_dir(out.merged, lambda p: (merged.save_pretrained(p),
                                                tokenizer.save_pretrained(p)))
            written["merged_model"] = str(out.merged)
    else:  # run() had every rank save the weights into model.partial
        staging = out.model.with_name(out.model.name + ".partial")
        tokenizer.save_pretrained(staging)
        _swap_in(staging, out.model)
        written["model"] = str(out.model)
    return written


def _merge_into_full_precision(model: Any, spec: FineTuneJobSpec) -> Any:
    """QLoRA: merge the adapter into an unquantized copy of the base model."""
    import tempfile

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        base = AutoModelForCausalLM.from_pretrained(model.peft_config["default"]
                                                    .base_model_name_or_path)
        return PeftModel.from_pretrained(base, tmp).merge_and_unload()


def _replace_dir(target: Path, write) -> None:
    """Write into a temporary directory, then swap it in: no half-written output."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _swap_in(tmp, target)


def _swap_in(staging: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _distributed_state(partial_state: Any) -> Any:
    """The process group, made before the trainer's arguments so they use it.

    Under torchrun on CPU, accelerate only forms the group when asked for gloo explicitly.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not _has_cuda():
        return partial_state(backend="gloo")
    return partial_state()


def _quiet(*_: Any, **__: Any) -> None:
    pass


def main(argv: list[str] | None = None) -> int:
    """``python -m kubetune_trainer.train JOB.yaml``: what the trainer image runs."""
    import argparse

    from kubetune.jobfile import load_job

    p = argparse.ArgumentParser(prog="kubetune-train", description=main.__doc__)
    p.add_argument("job", help="FineTuneJob YAML (the operator mounts it from a ConfigMap)")
    p.add_argument("--pvc-root", default="/mnt/pvc", help="where pvc:// claims are mounted")
    p.add_argument("--base-dir", default=None, help="relative paths resolve here")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        job = load_job(args.job)
        ctx = RunContext(base_dir=Path(args.base_dir or Path(args.job).resolve().parent),
                         pvc_root=Path(args.pvc_root))
        run(job, ctx)
    except KubetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        _termination_message(err)
        return err.exit_code
    return 0


def _termination_message(err: KubetuneError) -> None:
    """A short structured reason the operator reads from the pod status."""
    path = Path("/dev/termination-log")
    if path.exists() and os.access(path, os.W_OK):
        path.write_text(json.dumps({"reason": err.reason, "field": err.field,
                                    "message": err.message[:1500]}))


if __name__ == "__main__":
    sys.exit(main())
