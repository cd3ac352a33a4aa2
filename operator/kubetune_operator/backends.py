"""The training backend, behind a small seam: which object runs a job, and how its state is read.

The operator renders one training object per FineTuneJob (``builders.children``) and
reads back only what this module describes: where its suspend flag lives and which of its
conditions mean running, restarting, succeeded, failed, suspended. Kubeflow's PyTorchJob
(kubeflow.org/v1, the training-operator) is the backend today; a Kubeflow Trainer v2
``TrainJob`` (trainer.kubeflow.org/v1alpha1: ``spec.suspend``, conditions ``Complete`` /
``Failed`` / ``Suspended``) would be a second ``Backend`` plus its renderer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Backend:
    api_version: str  # group/version
    kind: str
    plural: str
    suspend_path: tuple[str, ...]  # where the object's suspend flag lives
    # our signal (running, restarting, succeeded, failed, suspended) -> its condition type
    conditions: Mapping[str, str]

    @property
    def group(self) -> str:
        return self.api_version.split("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.split("/")[1]

    def condition(self, obj: dict[str, Any] | None, signal: str) -> dict[str, Any] | None:
        """The backend's condition for ``signal`` if it is True, else None."""
        type_ = self.conditions.get(signal)
        for c in (obj or {}).get("status", {}).get("conditions", []) or []:
            if type_ and c.get("type") == type_ and c.get("status") == "True":
                return c
        return None

    def suspend_flag(self, obj: dict[str, Any]) -> bool:
        node: Any = obj
        for key in self.suspend_path:
            node = (node or {}).get(key)
        return bool(node)

    def suspended(self, obj: dict[str, Any]) -> bool:
        return self.suspend_flag(obj) or self.condition(obj, "suspended") is not None

    def suspend_patch(self, want: bool) -> dict[str, Any]:
        patch: Any = want
        for key in reversed(self.suspend_path):
            patch = {key: patch}
        return patch


PYTORCHJOB = Backend(
    api_version="kubeflow.org/v1", kind="PyTorchJob", plural="pytorchjobs",
    suspend_path=("spec", "runPolicy", "suspend"),
    conditions={"running": "Running", "restarting": "Restarting", "succeeded": "Succeeded",
                "failed": "Failed", "suspended": "Suspended"})

BACKENDS = {b.kind: b for b in (PYTORCHJOB,)}
