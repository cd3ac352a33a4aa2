"""kto: Kahneman-Tversky optimisation with TRL's KTOTrainer, on single answers marked
desirable or not (kto_tag / label); a paired data set is split into one of each. The
reference is the starting model, as for dpo."""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec

from kubetune_trainer.data.prepared import Data
from kubetune_trainer.recipes import Build

HEAD = "causal"


def prepare(examples: list[dict[str, Any]], tokenizer: Any, template: str | None,
            spec: FineTuneJobSpec, log=print) -> Data:
    from kubetune.errors import DataError

    from kubetune_trainer.data.preference import preference_data

    data = preference_data(examples, tokenizer, template, spec, unpaired=True, log=log)
    if not data.stats["desirable"] or not data.stats["undesirable"]:
        raise DataError("stage kto needs both desirable and undesirable answers; the data has "
                        f"{data.stats['desirable']} desirable and "
                        f"{data.stats['undesirable']} undesirable", field="spec.datasets")
    return data


def build(b: Build) -> Any:
    from trl import KTOConfig, KTOTrainer

    p = b.spec.preference_or_default()
    args = KTOConfig(**{**b.args, "remove_unused_columns": True},
                     max_length=b.spec.training.cutoff_len,
                     beta=p.beta or 0.1,
                     desirable_weight=p.desirable_weight or 1.0,
                     undesirable_weight=p.undesirable_weight or 1.0,
                     precompute_ref_log_probs=bool(p.precompute_ref_log_probs))
    return KTOTrainer(model=b.model, args=args, train_dataset=b.data.train,
                      eval_dataset=b.data.eval, processing_class=b.tokenizer,
                      peft_config=b.peft_config, callbacks=b.callbacks)
