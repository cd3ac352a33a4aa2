"""Pipelines of jobs: a FineTuneJob that starts from another one's result
(``spec.model.fromJob``). The operator reads that job's status; ``kubetune run`` reads its
``result.json`` beside it. Both decide the same way here."""

from __future__ import annotations

from typing import Any

FIELD = "spec.model.fromJob"


def upstream_model(name: str, phase: str | None, outputs: dict[str, Any] | None,
                   ) -> tuple[str | None, str | None, str | None]:
    """From the upstream job's phase and outputs: (model to start from, why to wait, why it
    cannot work). Exactly one of the three is set."""
    outputs = outputs or {}
    if phase == "Succeeded":
        model = outputs.get("mergedModel") or outputs.get("merged_model") or outputs.get("model")
        if model:
            return str(model), None, None
        if outputs.get("adapter"):
            return None, None, (f"{FIELD}: {name!r} produced only a LoRA adapter; set "
                                "output.merge: true on it so a whole model can be started from")
        # Its outputs may reach the status a moment after its phase does.
        return None, f"waiting for FineTuneJob {name!r} to report its model", None
    if phase == "Failed":
        return None, None, f"{FIELD}: {name!r} failed, so there is no model to start from"
    return None, (f"waiting for FineTuneJob {name!r} to succeed (its phase: "
                  f"{phase or 'not started'})"), None


def cycle(start: str, next_of: Any, limit: int = 16) -> list[str] | None:
    """The chain start → … → start when fromJob references loop back, else None.
    ``next_of(name)`` gives a job's fromJob (None: not a pipeline job, or no such job)."""
    chain, name = [start], next_of(start)
    while name is not None and len(chain) <= limit:
        chain.append(name)
        if name == start:
            return chain
        if name in chain[:-1]:
            return None  # a loop further up: that job reports it
        name = next_of(name)
    return None
