"""What a recipe's ``prepare`` hands back (``Data``) and the train/eval split every recipe
makes the same way (``split``). Below the recipes: the data code and the cache build and
load ``Data`` without importing a recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


def split(n: int, eval_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Shuffled row indices for training and for evaluation (``evalSplit`` of them)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(n).tolist()
    n_eval = int(round(n * eval_split)) if eval_split > 0 else 0
    if eval_split > 0 and not 0 < n_eval < n:
        raise KubetuneError(f"evalSplit {eval_split} of {n} rows leaves no train or no eval "
                            "rows", field="spec.training.evalSplit")
    return order[n_eval:], order[:n_eval]
