"""One recipe per stage: the rows it needs, the head it trains, its data and its TRL trainer.

A recipe module defines ``HEAD`` ("causal" or "reward"), ``prepare(examples, tokenizer,
template, spec, log) -> Data`` and ``build(Build) -> Trainer``; a recipe with ``STREAMS =
True`` takes the examples as an iterable, and a ``workdir`` for its Arrow files. ``Data`` and
the train/eval ``split`` live below the recipes, in ``kubetune_trainer.data.prepared``. The shell
(``train.py``) does everything else the same way for every stage. Which stages exist is the
API's ``kubetune.api.stages`` registry; ``recipe`` maps an implemented stage to its module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from kubetune.api.stages import STAGES, implemented_message
from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.errors import KubetuneError

from kubetune_trainer.data.prepared import Data


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

