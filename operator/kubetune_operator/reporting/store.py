"""The latest progress report per job, in memory, until the flusher writes it (a restart
loses at most a few seconds)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetune_operator.reporting.clean import (
    BadReport,
    Clean,
    TokenRate,
    checkpoint,
    outputs,
    report_fields,
)
from kubetune_operator.status import MAX_CHECKPOINTS


@dataclass
class JobProgress:
    report: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    dirty: bool = False
    rate: TokenRate = field(default_factory=TokenRate)  # tokens seen, for tokens/s
    refused: int = 0  # status patches refused in a row (400/422)

    def snapshot(self) -> dict[str, Any]:
        out = dict(self.report)
        if self.checkpoints:
            out["checkpoints"] = list(self.checkpoints)
        if self.outputs:
            out["outputs"] = dict(self.outputs)
        return out


class ProgressStore:
    """The latest report per job, in memory (a restart loses at most a few seconds)."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], JobProgress] = {}

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        job = self.jobs.get((namespace, name))
        return job.snapshot() if job else None

    def forget(self, namespace: str, name: str) -> None:
        self.jobs.pop((namespace, name), None)

    def update(self, namespace: str, name: str, payload: dict[str, Any]) -> list[str]:
        """Apply one report; fields that do not fit the status are dropped (and counted), the
        rest applies. Returns the dropped fields; raises ``BadReport`` for a body of the wrong
        shape, before anything is applied."""
        ts, ext = payload.get("trainerStatus"), payload.get("kubetune")
        for key, section in (("trainerStatus", ts), ("kubetune", ext)):
            if section is not None and not isinstance(section, dict):
                raise BadReport(f"{key} must be an object")
        job = self.jobs.setdefault((namespace, name), JobProgress())
        clean = Clean()
        if ts:
            job.report.update(report_fields(ts, clean, job.rate))
        if ext:
            cp = checkpoint(ext.get("checkpoint"), clean)
            if cp is not None:
                job.checkpoints = [c for c in job.checkpoints if c["step"] != cp["step"]]
                job.checkpoints.append(cp)
                job.checkpoints = sorted(job.checkpoints, key=lambda c: c["step"])[
                    -MAX_CHECKPOINTS:]
            job.outputs.update(outputs(ext.get("outputs"), clean))
        job.dirty = True
        return clean.dropped

    def remember_checkpoints(self, namespace: str, name: str,
                             checkpoints: list[dict[str, Any]]) -> None:
        """After a restart: start from what the status already lists, so a flush that writes
        the (replaced-as-a-whole) list keeps them."""
        job = self.jobs.get((namespace, name))
        if job is not None and not job.checkpoints and checkpoints:
            job.checkpoints = list(checkpoints)[-MAX_CHECKPOINTS:]

    def take_dirty(self) -> list[tuple[str, str]]:
        keys = [k for k, j in self.jobs.items() if j.dirty]
        for k in keys:
            self.jobs[k].dirty = False
        return keys
