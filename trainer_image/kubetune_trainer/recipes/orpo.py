"""orpo: odds-ratio preference optimisation (TRL keeps it in ``trl.experimental``): an SFT loss
plus a term that raises the odds of chosen over rejected; no reference model.
``preference.beta`` is the weight of that term (lambda in the paper)."""

from __future__ import annotations

import os
from typing import Any

from kubetune_trainer.data.preference import prepare_pairs as prepare
from kubetune_trainer.recipes import Build

__all__ = ["HEAD", "build", "prepare"]

HEAD = "causal"


def build(b: Build) -> Any:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # pinned and tested here
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    p = b.spec.preference_or_default()
    args = ORPOConfig(**b.args, max_length=b.spec.training.cutoff_len, beta=p.beta or 0.1)
    return ORPOTrainer(model=b.model, args=args, train_dataset=b.data.train,
                       eval_dataset=b.data.eval, processing_class=b.tokenizer,
                       peft_config=b.peft_config, callbacks=b.callbacks)
