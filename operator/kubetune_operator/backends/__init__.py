"""Training backends: which object runs a job, and how its state is read. One module each.

Every backend answers the same few questions, and nothing outside its module knows more about
the object than these: how a job renders into it (``render``, and ``companions`` made before
it), what it cannot run on this API server (``refuses``), what its status says (``state``), how
it is suspended (``suspend_flag``/``suspend_patch``), how it is stopped after a permanent
failure the server cannot see (``stop_patch``), which pods are its own (``owns_pod``,
``pod_name_matches``) and the trainer container's name (``container``). Rendering is for an
``ApiServer`` (what the server can do, read once at startup).

- ``pytorchjob``: Kubeflow Training Operator v1, ``PyTorchJob`` (kubeflow.org/v1).
- ``trainjob``: Kubeflow Trainer v2, ``TrainJob`` (trainer.kubeflow.org/v1alpha1).
- ``job``: a plain ``Job`` (batch/v1), no add-on; Indexed for more than one node.

The operator setting ``backend`` (chart value ``backend``) picks one; PyTorchJob is the
default. A new backend is a new module here holding its ``Backend`` at module level (found by
``_registry``), plus its RBAC and name in the chart (templates/rbac.yaml, values.schema.json).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune_operator.apiserver import CURRENT, ApiServer
from kubetune_operator.builders import config_map, preflight_job, wants_preflight

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
    provider: str | None = None  # the add-on that serves the kind (None: built in)

    @property
    def group(self) -> str:
        return self.api_version.split("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.split("/")[1]

    @abstractmethod
    def render(self, *, job: FineTuneJob, config: OperatorConfig, uid: str | None = None,
               labels: dict[str, str] | None = None, server: ApiServer = CURRENT
               ) -> dict[str, Any]:
        """The training object for ``job`` (deterministic: same job, same object), with only
        the fields ``server`` knows."""

    def companions(self, *, job: FineTuneJob, uid: str | None = None
                   ) -> list[dict[str, Any]]:
        """Objects the training object needs, made before it (none by default)."""
        return []

    @abstractmethod
    def state(self, obj: dict[str, Any]) -> ChildState:
        """What the object's status says."""

    @abstractmethod
    def pod_name_matches(self, pod: str, job: str) -> bool:
        """Whether a pod of this name can be one of job ``job``'s training pods."""

    @abstractmethod
    def owns_pod(self, pod: dict[str, Any], job: str) -> bool:
        """Whether this pod (as read from the API) was made for job ``job``'s object."""

    def makes_pods(self, kind: str, name: str, job: str) -> bool:
        """Whether the object ``kind``/``name`` creates job ``job``'s pods (its controller
        records an Event on it when the API server refuses one)."""
        return kind == self.kind and name == job

    def refuses(self, job: FineTuneJob, server: ApiServer = CURRENT, queued: bool = False
                ) -> str | None:
        """Why this backend cannot run ``job`` as written on ``server`` (naming the field), or
        None. ``queued``: the job goes through a Kueue queue (its label, or the default)."""
        return None

    def suspend_problem(self, server: ApiServer) -> str | None:
        """Why a running object cannot be suspended on ``server`` (naming the field), or
        None."""
        return None

    def stop_patch(self, obj: dict[str, Any], pods: list[dict[str, Any]],
                   server: ApiServer) -> dict[str, Any] | None:
        """A patch that stops the object from retrying a failure its pods show to be
        permanent where ``server`` cannot see it itself; None: nothing to stop."""
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


@functools.cache
def _registry() -> dict[str, Backend]:
    """Every backend: each module of this package holds one ``Backend`` at module level (a new
    backend is one new module here, plus its chart RBAC)."""
    found: dict[str, Backend] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Backend):
                found.setdefault(value.kind, value)
    return found


def backend_named(name: str) -> Backend:
    """The backend of kind ``name`` (case-insensitive); a clear error otherwise."""
    backends = _registry()
    for kind, backend in backends.items():
        if kind.lower() == name.lower():
            return backend
    raise ValueError(f"backend {name!r} is not known; expected one of {', '.join(backends)}")


def all_backends() -> list[Backend]:
    return list(_registry().values())


def children(*, job: FineTuneJob, config: OperatorConfig, uid: str | None = None,
             labels: dict[str, str] | None = None, server: ApiServer = CURRENT
             ) -> list[dict[str, Any]]:
    """Everything the operator creates for a job, in creation order: the trainer config,
    the pre-flight Job when it has one (``builders.wants_preflight``), what the training
    object needs (a headless Service), then the training object of the
    configured backend, last. ``server``: what the API server can do (``kubetune render``,
    with no cluster: a current one)."""
    backend = backend_named(config.backend)
    preflight = []
    if wants_preflight(job, config):  # before the training objects (reconcile waits for it)
        from kubetune.estimate import gpu_memory_for

        preflight = [preflight_job(job=job, config=config, uid=uid, gpu_memory=gpu_memory_for(
            job.spec, dict(config.gpu_memory)))]
    return [config_map(job=job, uid=uid), *preflight, *backend.companions(job=job, uid=uid),
            backend.render(job=job, config=config, uid=uid, labels=labels, server=server)]
