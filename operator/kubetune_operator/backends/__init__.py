"""Training backends: which object runs a job, and how its state is read. One module each.

Every backend answers the same few questions, and nothing outside its module knows more about
the object than these: how a job renders into it (``render``), what its status says
(``state``), how it is suspended (``suspend_flag``/``suspend_patch``), which pods are its own
(``owns_pod``, ``pod_name_matches``) and the trainer container's name (``container``).

- ``pytorchjob``: Kubeflow Training Operator v1, ``PyTorchJob`` (kubeflow.org/v1).
- ``trainjob``: Kubeflow Trainer v2, ``TrainJob`` (trainer.kubeflow.org/v1alpha1).

The operator setting ``backend`` (chart value ``backend``) picks one; PyTorchJob is the
default while both exist.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubetune.api.v1alpha1 import FineTuneJob

    from kubetune_operator.settings import OperatorConfig


@dataclass(frozen=True)
class ChildState:
    """What a training object's status says, in the backend's own words where it has them."""

    succeeded: str | None = None  # its message, when it succeeded
    failed: tuple[str, str] | None = None  # (reason, message), when it failed
    suspended: bool = False  # suspended (by us, by Kueue, or by anyone else)
    restarting: bool = False
    running: bool = False
    trainer_status: dict[str, Any] | None = None  # KEP-2779 progress the backend recorded


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    """The object's condition ``type_`` if it is True."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


class Backend(ABC):
    api_version: str  # group/version
    kind: str
    plural: str
    container: str  # the trainer container's name in its pods
    suspend_path: tuple[str, ...]  # where the object's suspend flag lives

    @property
    def group(self) -> str:
        return self.api_version.split("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.split("/")[1]

    @abstractmethod
    def render(self, *, job: FineTuneJob, config: OperatorConfig, uid: str | None = None,
               labels: dict[str, str] | None = None) -> dict[str, Any]:
        """The training object for ``job`` (deterministic: same job, same object)."""

    @abstractmethod
    def state(self, obj: dict[str, Any]) -> ChildState:
        """What the object's status says."""

    @abstractmethod
    def pod_name_matches(self, pod: str, job: str) -> bool:
        """Whether a pod of this name can be one of job ``job``'s training pods."""

    @abstractmethod
    def owns_pod(self, pod: dict[str, Any], job: str) -> bool:
        """Whether this pod (as read from the API) was made for job ``job``'s object."""

    def refuses(self, job: FineTuneJob) -> str | None:
        """Why this backend cannot run ``job`` as written (naming the field), or None."""
        return None

    def suspend_flag(self, obj: dict[str, Any]) -> bool:
        node: Any = obj
        for key in self.suspend_path:
            node = (node or {}).get(key)
        return bool(node)

    def suspend_patch(self, want: bool) -> dict[str, Any]:
        patch: Any = want
        for key in reversed(self.suspend_path):
            patch = {key: patch}
        return patch


def _registry() -> dict[str, Backend]:
    from kubetune_operator.backends.pytorchjob import PYTORCHJOB
    from kubetune_operator.backends.trainjob import TRAINJOB

    return {b.kind: b for b in (PYTORCHJOB, TRAINJOB)}


def backend_named(name: str) -> Backend:
    """The backend of kind ``name`` (case-insensitive); a clear error otherwise."""
    backends = _registry()
    for kind, backend in backends.items():
        if kind.lower() == name.lower():
            return backend
    raise ValueError(f"backend {name!r} is not known; expected one of {', '.join(backends)}")


def all_backends() -> list[Backend]:
    return list(_registry().values())
