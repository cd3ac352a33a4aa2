"""sft: supervised fine-tuning. Loss on the assistant turns (or every token with
trainOnPrompt), optional packing; TRL's SFTTrainer on rows we tokenize and mask ourselves."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec

from kubetune_trainer.data.prepared import Data, split
from kubetune_trainer.recipes import Build

HEAD = "causal"


STREAMS = True  # prepare reads the examples as it tokenizes them, into Arrow files


def prepare(examples: Iterable[dict[str, Any]], tokenizer: Any, template: str | None,
            spec: FineTuneJobSpec, log=print, *, workdir: Path) -> Data:
    """Template, tokenize, mask, split and (optionally) pack, streaming: the examples are
    read as they are tokenized into scratch files under ``workdir``, then written as the
    train and eval Arrow files the data sets memory-map: memory stays flat in the data's
    size."""
    import datasets
    import numpy as np

    from kubetune_trainer.data.preprocess import (
        Options,
        default_workers,
        tokenize_to_files,
        write_rows,
    )

    t = spec.training
    opts = Options(stage=spec.stage, cutoff_len=t.cutoff_len, train_on_prompt=t.train_on_prompt,
                   mask_history=t.mask_history)
    seqs = tokenize_to_files(examples, tokenizer, template, opts, workdir,
                             workers=t.preprocessing_workers or default_workers())
    st = seqs.stats
    log(f"data: {st.sequences} sequences, {st.tokens} tokens ({st.trained_tokens} trained); "
        f"{st.truncated} cut at cutoffLen, {st.dropped_too_long} dropped (no answer left)")
    train_idx, eval_idx = split(len(seqs.lengths), t.eval_split, t.seed)
    eval_ds = None
    if eval_idx:
        write_rows(seqs, np.asarray(eval_idx), workdir / "eval.arrow")
        eval_ds = datasets.Dataset.from_file(str(workdir / "eval.arrow"))
    write_rows(seqs, np.asarray(train_idx), workdir / "train.arrow",
               pack_to=t.cutoff_len if t.packing else None)
    train = datasets.Dataset.from_file(str(workdir / "train.arrow"))
    if t.packing:
        log(f"data: packed into {len(train)} rows of at most {t.cutoff_len} tokens")
    sources = seqs.sources[eval_idx].tolist() if eval_idx else []
    seqs.ids.unlink()
    seqs.labels.unlink()
    return Data(train, eval_ds, asdict(st), eval_examples=_conversations(examples, sources),
                template=template)


def _conversations(examples: Iterable[dict[str, Any]], wanted: list[int]
                   ) -> list[dict[str, Any]]:
    """The held-out examples that are conversations (what predict-with-generate asks for),
    one per held-out sequence, read in a second pass."""
    if not wanted:
        return []
    need = set(wanted)
    found = {i: ex for i, ex in enumerate(examples) if i in need and "messages" in ex}
    return [found[i] for i in wanted if i in found]


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


def build(b: Build) -> Any:
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**b.args, dataset_kwargs={"skip_prepare_dataset": True})
    return SFTTrainer(model=b.model, args=args, train_dataset=b.data.train,
                      eval_dataset=b.data.eval, processing_class=b.tokenizer,
                      data_collator=Collator(b.tokenizer.pad_token_id),
                      peft_config=b.peft_config, callbacks=b.callbacks)
