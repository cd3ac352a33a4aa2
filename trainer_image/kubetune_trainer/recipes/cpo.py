"""cpo: contrastive preference optimisation (TRL's CPOTrainer, in ``trl.experimental``), no
reference model. ``preference.lossType: [simpo]`` is SimPO: a length-normalised reward with a
target margin (``simpoGamma``); SimPO proper sets ``cpoAlpha: 0`` (no SFT term)."""

from __future__ import annotations

import os
from typing import Any

from kubetune_trainer.data.preference import prepare_pairs as prepare
from kubetune_trainer.recipes import Build

__all__ = ["HEAD", "build", "prepare"]

HEAD = "causal"


def build(b: Build) -> Any:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # pinned and tested here
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    p = b.spec.preference_or_default()
    loss = (p.loss_type or ["sigmoid"])[0]
    args = CPOConfig(**b.args, max_length=b.spec.training.cutoff_len, loss_type=loss,
                     beta=p.beta or (2.0 if loss == "simpo" else 0.1),
                     label_smoothing=p.label_smoothing or 0.0,
                     cpo_alpha=1.0 if p.cpo_alpha is None else p.cpo_alpha,
                     simpo_gamma=0.5 if p.simpo_gamma is None else p.simpo_gamma)
    return CPOTrainer(model=b.model, args=args, train_dataset=b.data.train,
                      eval_dataset=b.data.eval, processing_class=b.tokenizer,
                      peft_config=b.peft_config, callbacks=b.callbacks)
