"""sft: supervised fine-tuning. Loss on the assistant turns (or every token with
trainOnPrompt), optional packing; TRL's SFTTrainer on rows we tokenize and mask ourselves."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec

from kubetune_trainer.recipes import Build, Data, split

HEAD = "causal"


def prepare(examples: list[dict[str, Any]], tokenizer: Any, template: str | None,
            spec: FineTuneJobSpec, log=print) -> Data:
    """Template, tokenize, mask, split and (optionally) pack."""

    from kubetune_trainer.data.preprocess import (
        Options,
        dataset,
        default_workers,
        packed_table,
        table,
        tokenize,
    )

    t = spec.training
    opts = Options(stage=spec.stage, cutoff_len=t.cutoff_len, train_on_prompt=t.train_on_prompt,
                   mask_history=t.mask_history)
    tok = tokenize(examples, tokenizer, template, opts,
                   workers=t.preprocessing_workers or default_workers())
    st = tok.stats
    log(f"data: {st.sequences} sequences, {st.tokens} tokens ({st.trained_tokens} trained); "
        f"{st.truncated} cut at cutoffLen, {st.dropped_too_long} dropped (no answer left)")
    train_idx, eval_idx = split(len(tok.input_ids), t.eval_split, t.seed)
    eval_ds = None
    if eval_idx:
        eval_ds = dataset(table([tok.input_ids[i] for i in eval_idx],
                                [tok.labels[i] for i in eval_idx]))
    train_ids = [tok.input_ids[i] for i in train_idx]
    train_labels = [tok.labels[i] for i in train_idx]
    if t.packing:
        train = dataset(packed_table(train_ids, train_labels, t.cutoff_len))
        log(f"data: packed into {len(train)} rows of at most {t.cutoff_len} tokens")
    else:
        train = dataset(table(train_ids, train_labels))
    # For predict-with-generate: the held-out conversations (tokenized rows keep the order of
    # the examples that kept a trained token; the rest were dropped and are not in the split).
    return Data(train, eval_ds, asdict(st),
                eval_examples=[examples[tok.sources[i]] for i in eval_idx],
                template=template)


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
