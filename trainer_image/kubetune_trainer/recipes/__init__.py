"""One recipe per stage: the rows it needs, the head it trains, its data and its TRL trainer.

A recipe module defines ``HEAD`` ("causal" or "reward"), ``prepare(examples, tokenizer,
template, spec, log) -> Data`` and ``build(Build) -> Trainer``; a recipe with ``STREAMS =
True`` takes the examples as an iterable, and a ``workdir`` for its Arrow files. The shell
(``train.py``) does everything else the same way for every stage. Which stages exist is the
API's ``kubetune.api.stages`` registry; ``recipe`` maps an implemented stage to its module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from kubetune.api.stages import STAGES, implemented_message
from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.errors import KubetuneError


@dataclass
class Data:
    """What a recipe's ``prepare`` hands back: data sets ready for its trainer."""

    train: Any
    eval: Any | None
    stats: dict[str, Any] = field(default_factory=dict)
    eval_examples: list[dict[str, Any]] | None = None  # the held-out rows, as conversations
    template: str | None = None  # the chat template they were rendered with
    keep: Any = None  # what must live as long as the data sets (their scratch directory)


@dataclass
class Build:
    """What the shell hands a recipe's ``build``."""

    spec: FineTuneJobSpec
    model: Any
    tokenizer: Any
    data: Data
    args: dict[str, Any]  # TrainingArguments fields every stage shares
    callbacks: list[Any]
    peft_config: Any | None
    ctx: Any = None  # RunContext: where the run finds things (e.g. a reward's module)


def recipe(stage: str) -> ModuleType:
    info = STAGES.get(stage)
    if info is None or not info.implemented:
        raise KubetuneError(implemented_message(stage), field="spec.stage")
    return importlib.import_module(f"kubetune_trainer.recipes.{stage}")


def split(n: int, eval_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Shuffled row indices for training and for evaluation (``evalSplit`` of them)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(n).tolist()
    n_eval = int(round(n * eval_split)) if eval_split > 0 else 0
    if eval_split > 0 and not 0 < n_eval < n:
        raise KubetuneError(f"evalSplit {eval_split} of {n} rows leaves no train or no eval "
                            "rows", field="spec.training.evalSplit")
    return order[n_eval:], order[:n_eval]
