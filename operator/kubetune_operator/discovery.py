"""Which kinds this API server serves, shared by every job: no I/O here (``lookup`` asks).

A job needs kinds that come with add-ons: its backend's training object (PyTorchJob with the
Kubeflow Training Operator, TrainJob with Kubeflow Trainer v2), Kueue's Workloads when it is
queued, KServe's InferenceService when it is served that way. Without the add-on the API server
answers 404 for that group/version; creating anything for the job then leaves half a set of
children and a job that says nothing. ``Served`` remembers, per group/version, what the API
server lists there (``GET /apis/<group>/<version>``, ``kube.Kube.served_resources``):

- a group/version found served is trusted until ``forget`` (a create answered 404);
- one found missing is asked again only by ``refresh`` (the operator's periodic re-check: one
  request per missing group/version per interval, however many jobs wait for it), which says
  which ones appeared, so the jobs waiting for them proceed with no restart;
- each change is logged once (missing, then served again), not once per job and retry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kubetune_operator.builders import KUEUE_GROUP, KUEUE_QUEUE_LABEL, KUEUE_VERSION

if TYPE_CHECKING:
    from kubetune_operator.backends import Backend

log = logging.getLogger("kubetune.operator")

Lookup = Callable[[str], "frozenset[str] | None"]  # group/version -> its resources, None: 404


@dataclass(frozen=True)
class Need:
    """A kind a job needs, what provides it, and what the job says while it is missing."""

    api_version: str  # group/version
    plural: str
    kind: str
    provider: str  # what to install, e.g. "the Kubeflow Training Operator"
    reason: str  # the Stalled condition's reason (and the Event's)
    message: str  # the condition's message: the missing kind and the ways out

    @property
    def what(self) -> str:
        return f"{self.kind} ({self.api_version} {self.plural})"


def backend_need(backend: Backend) -> Need | None:
    """A training backend's kind (None: a built-in kind, always served)."""
    kind, api_version, provider = backend.kind, backend.api_version, backend.provider
    if provider is None:
        return None
    return Need(api_version, backend.plural, kind, provider, f"{kind}NotInstalled", (
        f"this cluster does not serve {kind} ({api_version}), the operator's training "
        f"backend: install {provider}, or choose another backend (the chart's value "
        "`backend: job` runs each job as a plain batch/v1 Job, no add-on). The job starts "
        f"by itself once {kind} is served; nothing is created until then"))


def kueue_need(queue: str, from_default: bool) -> Need:
    """Kueue's Workloads, for a job that goes through a Kueue queue."""
    where = ("the operator's default queue (the chart's kueue.queueName) is " + repr(queue)
             if from_default else f"the label {KUEUE_QUEUE_LABEL}={queue} asks for a Kueue "
             "queue")
    return Need(f"{KUEUE_GROUP}/{KUEUE_VERSION}", "workloads", "Workload", "Kueue",
                "KueueNotInstalled", (
                    f"{where}, but this cluster does not serve Kueue ({KUEUE_GROUP}/"
                    f"{KUEUE_VERSION} localqueues, workloads): the training object would be "
                    "created suspended for Kueue to admit and stay suspended forever. "
                    f"Install Kueue, or remove the {KUEUE_QUEUE_LABEL} label"
                    + (" and the default queue" if from_default else "")
                    + ". Nothing is created until then"))


class Served:
    """Per group/version: its resources as last listed (None: not served). Thread-safe:
    converges run in threads."""

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        self._known: dict[str, frozenset[str] | None] = {}
        self._wanted: dict[str, set[str]] = {}  # group/version -> the plurals jobs need
        self._said: set[str] = set()  # group/versions logged as missing
        self._lock = threading.Lock()

    def missing(self, need: Need) -> bool:
        """Whether ``need``'s kind is not served; asks the API server only the first time
        (per group/version)."""
        with self._lock:
            self._wanted.setdefault(need.api_version, set()).add(need.plural)
            asked = need.api_version in self._known
            known = self._known.get(need.api_version)
        if not asked:
            known = self._ask(need.api_version)
        lacking = known is None or need.plural not in known
        with self._lock:
            say = lacking and need.api_version not in self._said
            if say:
                self._said.add(need.api_version)
        if say:
            log.warning("%s is not served by this API server: every job that needs it waits "
                        "(condition Stalled, reason %s) until %s is installed", need.what,
                        need.reason, need.provider)
        return lacking

    def prime(self, api_version: str) -> None:
        """Ask now (at startup), so that the first jobs need no request of their own."""
        with self._lock:
            if api_version in self._known:
                return
        self._ask(api_version)

    def served(self, need: Need) -> bool:
        """Known to be served (no request: False when never asked)."""
        with self._lock:
            known = self._known.get(need.api_version)
        return known is not None and need.plural in known

    def waiting(self, api_version: str | None) -> bool:
        """Something needed in ``api_version`` was found missing, and not found since."""
        if api_version is None:
            return False
        with self._lock:
            return self._absent(api_version)

    def _absent(self, gv: str) -> bool:
        if gv not in self._known:
            return False
        known = self._known[gv]
        return known is None or not self._wanted.get(gv, set()) <= known

    def refresh(self) -> list[str]:
        """Ask again for every group/version found missing (one request each); returns those
        served now."""
        with self._lock:
            absent = sorted(gv for gv in self._known if self._absent(gv))
        back = []
        for gv in absent:
            self._ask(gv)
            with self._lock:
                now = not self._absent(gv)
            if now:
                log.info("%s is served now: the jobs that waited for it proceed", gv)
                with self._lock:
                    self._said.discard(gv)
                back.append(gv)
        return back

    def forget(self, api_version: str) -> None:
        """Ask again next time (a create in that group/version answered 404)."""
        with self._lock:
            self._known.pop(api_version, None)

    def _ask(self, api_version: str) -> frozenset[str] | None:
        known = self._lookup(api_version)
        with self._lock:
            self._known[api_version] = known
        return known
