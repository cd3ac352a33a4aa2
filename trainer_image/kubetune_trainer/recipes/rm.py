"""rm: a reward model. The base model gets a one-score head (sequence classification) trained
with TRL's RewardTrainer to score chosen above rejected; with LoRA the head trains in full
and is saved with the adapter. Eval accuracy is the share of held-out pairs ranked right."""

from __future__ import annotations

from typing import Any

from kubetune_trainer.data.preference import prepare_pairs as prepare
from kubetune_trainer.recipes import Build

__all__ = ["HEAD", "build", "prepare"]

HEAD = "reward"


def build(b: Build) -> Any:
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(**{**b.args, "remove_unused_columns": True},
                        max_length=b.spec.training.cutoff_len)
    return RewardTrainer(model=b.model, args=args, train_dataset=b.data.train,
                         eval_dataset=b.data.eval, processing_class=b.tokenizer,
                         peft_config=b.peft_config, callbacks=b.callbacks)
