"""dpo: direct preference optimisation with TRL's DPOTrainer and its loss family.

The reference is the starting model: with LoRA the same weights with the adapter switched off
(no second copy), otherwise a frozen copy (or its log-probabilities computed once, with
``preference.precomputeRefLogProbs``)."""

from __future__ import annotations

from typing import Any

from kubetune_trainer.data.preference import prepare_pairs as prepare
from kubetune_trainer.recipes import Build

__all__ = ["HEAD", "build", "prepare"]

HEAD = "causal"


def build(b: Build) -> Any:
    from trl import DPOConfig, DPOTrainer

    p = b.spec.preference_or_default()
    args = DPOConfig(**{**b.args, "remove_unused_columns": True},
                     max_length=b.spec.training.cutoff_len,
                     beta=p.beta or 0.1,
                     loss_type=p.loss_type or ["sigmoid"],
                     loss_weights=p.loss_weights,
                     label_smoothing=p.label_smoothing or 0.0,
                     precompute_ref_log_probs=bool(p.precompute_ref_log_probs))
    return DPOTrainer(model=b.model, args=args, train_dataset=b.data.train,
                      eval_dataset=b.data.eval, processing_class=b.tokenizer,
                      peft_config=b.peft_config, callbacks=b.callbacks)
