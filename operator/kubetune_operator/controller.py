"""The controller: when a FineTuneJob is converged, one at a time, and what follows.

``Controller`` holds what the operator keeps between events, typed (kopf's memo carries only
it): the client, what the API server can do and serves, the progress store, one lock per job,
the spec version each job was last converged at, the jobs still in flight (re-checked on a
timer), the kinds jobs wait for, and the pipeline index (which jobs start from which).

Why some of this is ours and not kopf's (measured with ``bench/operator_scale.py --cluster
--jobs 1000``, against a bare kopf operator with one create handler, 2026-12-07: per job kopf
writes one more PATCH of the FineTuneJob, its own annotations, and its burst p50 is half
ours, p99 and CPU per job within 10 %: 0.03/0.13 s and 5.6 ms against 0.06/0.14 s, 5.9 ms):
- Retries: FineTuneJobs have one kopf *event* handler, which kopf never retries; its
  create/update/resume handlers would (``kopf.TemporaryError``), but keep a copy of every
  job in an annotation, patch it after each handler and deep-copy each body, and put a
  finalizer on every job (none could be deleted while the operator is down). So a failed
  converge is retried here, from a fresh read, after RETRY_SECONDS; what the API server
  refused (400/422) is said once (an Event) and not retried until the spec changes. Startup
  handlers do use kopf's retries: ``kopf.PermanentError`` for a setting that cannot work,
  anything else retried by kopf.
- Re-checks: one task for all jobs in flight, not a kopf timer per object (a timer needs the
  finalizer too, and a thousand timers wake a thousand workers).
- The pipeline index: kopf's indices call their function on every event of every job
  (progress included) for the few jobs that start from others; ours changes only when a
  spec's fromJob does.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import threading
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubetune.api.v1alpha1 import API_VERSION, KIND

from kubetune_operator import metrics
from kubetune_operator import reconcile as rc
from kubetune_operator.apiserver import ApiServer
from kubetune_operator.backends import Backend
from kubetune_operator.discovery import Served
from kubetune_operator.kube import Kube, now
from kubetune_operator.reporting.store import ProgressStore
from kubetune_operator.settings import OperatorConfig
from kubetune_operator.status import (
    MAX_RESTARTS,
    TERMINAL,
    deleted_unreported,
    dump,
    ended_early,
    restart_event,
)
from kubetune_operator.sweeps import SweepApi, SweepController

log = logging.getLogger("kubetune.operator")
RETRY_SECONDS = 10  # after a transient API error
REFUSED = frozenset({400, 422})  # the API server refused what we sent: retrying cannot help

Key = tuple[str, str]  # (namespace, name)


@dataclass
class Controller:
    config: OperatorConfig
    kube: Kube
    server: ApiServer
    served: Served
    backend: Backend
    store: ProgressStore
    executor: Executor  # converges that read first run in threads of their own
    ca: Any = None  # progress_tls.CaPublisher once the endpoint's TLS is set up
    writer: Any = None  # reporting.flusher.StatusWriter once the endpoint is up
    locks: dict[Key, threading.Lock] = field(default_factory=dict)
    # The version of the spec last converged by this process: an event whose spec matches
    # needs nothing (our own status writes, progress); a new or changed spec, or one this
    # process has not seen since it started, is converged. None: converge on the next event.
    converged: dict[Key, str | None] = field(default_factory=dict)
    active: set[Key] = field(default_factory=set)  # in flight: re-checked on the timer
    waiting_for: dict[Key, str] = field(default_factory=dict)  # the group/version it needs
    dependents: dict[Key, set[str]] = field(default_factory=dict)  # job -> jobs from it
    upstreams: dict[Key, frozenset[str]] = field(default_factory=dict)  # job -> its sources
    uids: dict[Key, str | None] = field(default_factory=dict)  # for Events about a job
    created: dict[Key, str] = field(default_factory=dict)  # its creationTimestamp
    # Training pods whose trainer ended early, by pod name, as the pod watch saw them last
    # (status.ended_early): kept until the job settles, so a pod deleted before any converge
    # listed it still counts as a restart.
    ended: dict[Key, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # The context of kopf's handlers, kept from the first job event: kopf posts Events
    # through context variables it sets for its watchers only.
    kopf_context: contextvars.Context | None = None
    retries: set[asyncio.Task[None]] = field(default_factory=set)
    # What the startup handlers started (re-checks, the certificate's renewal, the flusher),
    # and what closes the progress endpoint: the cleanup handler stops them.
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closers: list[Any] = field(default_factory=list)  # callables, maybe async
    sweeps: SweepController = field(init=False)  # FineTuneSweeps (kubetune_operator.sweeps)

    def __post_init__(self) -> None:
        self.sweeps = SweepController(SweepApi(self.kube), self.executor)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for close in self.closers:
            done = close()
            if asyncio.iscoroutine(done):
                await done
        await self.kube.close_async()

    def lock(self, key: Key) -> threading.Lock:
        return self.locks.setdefault(key, threading.Lock())

    # ------------------------------------------------------------------ events

    async def on_event(self, raw: dict[str, Any], type: str | None) -> None:
        """Every event of a FineTuneJob (the listing at start, then the watch): converged when
        this process has not converged its spec yet; then the jobs that start from this one,
        if it appeared or finished."""
        meta = raw["metadata"]
        key = (meta["namespace"], meta["name"])
        if self.kopf_context is None:  # kopf's Event queue, for converges of our own
            self.kopf_context = contextvars.copy_context()
        if type == "DELETED":
            self.forget(*key)
            return
        self._track_upstreams(key, _upstreams(raw.get("spec")))
        self.uids[key] = meta.get("uid")
        self.created[key] = meta.get("creationTimestamp") or ""
        version = spec_version(raw)
        if self.converged.get(key) != version:
            await self._converge_event(raw, version)
        phase = (raw.get("status") or {}).get("phase")
        if type in (None, "ADDED") or phase in TERMINAL:
            for dependent in sorted(self.dependents.get(key, ())):
                await self.converge_named(key[0], dependent)

    async def on_pod(self, pod: dict[str, Any], job: str, type: str | None = None) -> None:
        """A training pod of ``job`` changed or went: one whose trainer ended early (deleted,
        preempted, evicted, crashed) is kept, and its job converged while the pod can still
        be seen. One deleted while its trainer ran and gone with no exit code reported (the
        kubelet may write an empty end for a deleted pod) is kept as such."""
        meta = pod.get("metadata") or {}
        key = (meta["namespace"], job)
        container = self.backend.container
        before = self.ended.get(key, {})
        unreported = None
        if type == "DELETED" and meta.get("name") not in before:
            unreported = deleted_unreported(pod, container, now())
        if not unreported and not ended_early(pod, container):
            return
        # No such job (yet: its own listing finds the pods), or the pod is of an earlier job
        # of that name (deleted and applied again while its pods were going).
        if key not in self.uids or (meta.get("creationTimestamp") or "") < self.created[key]:
            return
        status = pod.get("status") or {}
        seen = {  # what restart_reason and observe_restarts read
            "metadata": {"name": meta["name"]},
            "status": {k: status[k] for k in ("conditions", "reason", "containerStatuses")
                       if k in status}}
        if unreported:
            seen["status"]["containerStatuses"] = [
                {"name": container, "state": {"terminated": unreported}}]
        if before.get(meta["name"]) == seen:
            return  # nothing new (a repeated update, its deletion): converged already
        kept = {k: v for k, v in before.items() if k != meta["name"]}
        kept[meta["name"]] = seen
        while len(kept) > MAX_RESTARTS:
            kept.pop(next(iter(kept)))
        self.ended[key] = kept  # replaced, not changed: converges read it from their threads
        await self.converge_named(*key)

    def forget(self, ns: str, name: str) -> None:
        """Deleted: children go by owner references; outputs on volumes stay. Drop what is
        kept in memory of the job."""
        key = (ns, name)
        self.store.forget(ns, name)
        if self.writer is not None:
            self.writer.forget(ns, name)
        self.active.discard(key)
        self.waiting_for.pop(key, None)
        self.locks.pop(key, None)
        self.converged.pop(key, None)
        self.uids.pop(key, None)
        self.created.pop(key, None)
        self.ended.pop(key, None)
        self._track_upstreams(key, frozenset())
        metrics.observe_phase(ns, name, None)

    # ------------------------------------------------------------------ converging

    async def _converge_event(self, raw: dict[str, Any], version: str) -> None:
        """A new job (no status, never converged here): created on the event loop from the
        event's body, nothing read first. Anything else: from a fresh read (after a restart
        the watch may hand over a body older than the status already written: a finished job
        whose child was cleaned up would get it back)."""
        meta = raw["metadata"]
        key = (meta["namespace"], meta["name"])
        lock = self.lock(key)
        fresh = not raw.get("status") and key not in self.converged
        if fresh and lock.acquire(blocking=False):
            try:
                self.converged[key] = None  # touched: a later event never takes this path
                outcome = await self._first_converge(raw)
            except Exception as err:
                self._retry_later(key, err, version)
                return
            finally:
                lock.release()
            if outcome is not None:
                self.converged[key] = version
                return
        await self.converge_named(*key, version=version)

    async def _first_converge(self, raw: dict[str, Any]) -> rc.Outcome | None:
        ns = raw["metadata"]["namespace"]
        if self.ca is not None and not self.ca.known(ns):  # the pods' CA before their child
            await asyncio.get_running_loop().run_in_executor(self.executor, self.ca.ensure, ns)
        with metrics.RECONCILE_SECONDS.time():
            try:
                outcome = await rc.reconcile_new(raw, self.kube, self.config, self.server,
                                                 self.served)
            except Exception:
                metrics.RECONCILES.labels("error").inc()
                raise
        if outcome is None:
            return None
        meta = raw["metadata"]
        await self.kube.patch_status_async(meta["namespace"], meta["name"],
                                           dump(outcome.status))
        self._account(raw, outcome)
        return outcome

    async def converge_named(self, ns: str, name: str, version: str | None = None) -> None:
        """``converge_by_name`` in a thread; a refusal is said once, anything else retried."""
        loop = asyncio.get_running_loop()
        try:
            # In kopf's context (its Events are posted through context variables).
            parent = await loop.run_in_executor(self.executor, contextvars.copy_context().run,
                                                self.converge_by_name, ns, name)
        except Exception as err:
            self._retry_later((ns, name), err, version)
            return
        if parent is not None:  # what was converged (a newer spec's event converges again)
            self.converged[(ns, name)] = spec_version(parent)

    def converge_by_name(self, ns: str, name: str) -> dict[str, Any] | None:
        """The one way a job is converged and its status written (its events, events on
        children, the re-check): one at a time per job, each from a fresh read, so no
        converge works from a status another one has already replaced (transition times,
        the suspend annotation and the Workload's spec.active stay consistent). Returns the
        job as read (None: it is gone)."""
        key = (ns, name)
        with self.lock(key):
            parent = self.kube.get_finetunejob(ns, name)
            if parent is not None and parent["metadata"].get("deletionTimestamp"):
                # Being deleted (foreground, as Argo CD prunes): its children go with it, and
                # nothing is made again for it while they go.
                self.active.discard(key)
                return parent
            if parent is not None:
                self._converge(parent)
                return parent
            self.active.discard(key)
        self.locks.pop(key, None)  # gone: a late event about a child leaves no lock behind
        return None

    def _converge(self, parent: dict[str, Any]) -> None:
        meta = parent["metadata"]
        ns, name = meta["namespace"], meta["name"]
        self.store.remember_checkpoints(
            ns, name, (parent.get("status") or {}).get("checkpoints") or [])
        with metrics.RECONCILE_SECONDS.time():
            try:
                outcome = rc.reconcile(parent, self.kube, self.config, self.store.get(ns, name),
                                       server=self.server, served=self.served, ca=self.ca,
                                       gone_pods=list(self.ended.get((ns, name), {}).values()))
            except Exception:
                metrics.RECONCILES.labels("error").inc()
                raise
        self._account(parent, outcome)
        before = parent.get("status") or {}
        status = dump(outcome.status)  # the one place the typed status becomes JSON
        if status != before:
            # A merge patch: a field the new status no longer has (serving) goes by null.
            gone = {k: None for k in before if k not in status}
            self.kube.patch_status(ns, name, {**gone, **status})

    def _retry_later(self, key: Key, err: Exception, version: str | None) -> None:
        """Retry intent, stated: what the API server refused stays refused (until the spec
        changes); anything else (a conflict, throttling, the server away) is retried after a
        pause, from a fresh read."""
        code = getattr(err, "status", None)
        if code in REFUSED:
            log.error("%s/%s: the API server refused the change (%s): %s", *key, code, err)
            # Said on the job too (as kopf's "failed permanently" was): kubectl describe.
            kopf.warn({"apiVersion": API_VERSION, "kind": KIND,
                       "metadata": {"namespace": key[0], "name": key[1],
                                    "uid": self.uids.get(key)}}, reason="Refused",
                      message=f"the API server refused a change ({code}): {str(err)[:500]}")
            if version is not None:
                self.converged[key] = version
            return
        log.warning("%s/%s: converge failed (%s); retrying in %ss", *key, err, RETRY_SECONDS,
                    exc_info=code is None)
        self.converged[key] = None  # any later event converges again too
        loop = asyncio.get_running_loop()

        def retry() -> None:
            task = loop.create_task(self.converge_named(*key))
            self.retries.add(task)
            task.add_done_callback(self.retries.discard)

        loop.call_later(RETRY_SECONDS, retry)

    async def recheck_forever(self) -> None:
        """Every ``config.recheck_seconds``: the kinds jobs wait for asked again (one
        discovery request per group/version), then each job in flight converged."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.recheck_seconds)
            try:
                await loop.run_in_executor(self.executor, self.served.refresh)
            except Exception as err:  # the API server away: the jobs are re-checked anyway
                log.warning("discovery failed (%s); asked again in %ss", err,
                            self.config.recheck_seconds)
            # In the context of kopf's handlers (a task started here has none).
            context = self.kopf_context or contextvars.copy_context()
            for ns, name in sorted(self.active):
                if self.served.waiting(self.waiting_for.get((ns, name))):
                    continue  # nothing to do until its kind is served
                await context.copy().run(asyncio.ensure_future, self.converge_named(ns, name))
                await asyncio.sleep(0.02)  # spread the load

    # ------------------------------------------------------------------ after a converge

    def _account(self, parent: dict[str, Any], outcome: rc.Outcome) -> None:
        """Metrics, the re-check set, and Events."""
        body = kopf.Body(parent)  # for kopf's Events
        meta = parent["metadata"]
        ns, name = meta["namespace"], meta["name"]
        old = parent.get("status") or {}
        metrics.RECONCILES.labels("ok").inc()
        phase = outcome.status.phase
        metrics.observe_phase(ns, name, phase)
        # Jobs in flight get the slow re-check (pod-level waits change no training object),
        # and so do finished jobs whose server is not ready or not checked yet.
        if outcome.settled:
            self.active.discard((ns, name))
            self.ended.pop((ns, name), None)
        else:
            self.active.add((ns, name))
        for other in outcome.wake:  # e.g. the job a shared endpoint moved from
            self.active.add((ns, other))
        if outcome.missing is not None:  # re-checked once its kind is served
            self.waiting_for[(ns, name)] = outcome.missing.api_version
        else:
            self.waiting_for.pop((ns, name), None)
        for cond in _new_warnings(old, outcome):  # each said once
            kopf.warn(body, reason=cond.reason, message=cond.message)
        said = {(r.get("pod"), r.get("at")) for r in old.get("lastRestarts") or []}
        for r in outcome.status.last_restarts:  # one Event per restart
            if (r.pod, r.at) not in said:
                kopf.warn(body, reason="Restarted", message=restart_event(r))
        for what in outcome.created:
            metrics.CHILDREN_CREATED.labels(what.split("/")[0]).inc()
        if outcome.created:  # one Event for all of them: Events are API writes too
            kopf.info(body, reason="Created", message="created " + ", ".join(outcome.created))
        # Phase changes as Events; a new job's Pending is said by "Created" already.
        if outcome.phase_changed and (old.get("phase") or phase != "Pending"):
            ready = next(c for c in outcome.status.conditions if c.type == "Ready")
            post = kopf.warn if phase == "Failed" else kopf.info
            post(body, reason=phase if phase != "Failed" else ready.reason,
                 message=ready.message or phase)

    def _track_upstreams(self, key: Key, now: frozenset[str]) -> None:
        before = self.upstreams.get(key, frozenset())
        if now == before:
            return
        ns, name = key
        for upstream in before - now:
            waiting = self.dependents.get((ns, upstream), set())
            waiting.discard(name)
            if not waiting:
                self.dependents.pop((ns, upstream), None)
        for upstream in now - before:
            self.dependents.setdefault((ns, upstream), set()).add(name)
        if now:
            self.upstreams[key] = now
        else:
            self.upstreams.pop(key, None)


def spec_version(body: dict[str, Any]) -> str:
    """What a converge is of: a digest of the spec. (Not metadata.generation: emulators
    leave it as it is, and the digest costs a few microseconds.)"""
    raw = json.dumps(body.get("spec"), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()


def _upstreams(spec: dict[str, Any] | None) -> frozenset[str]:
    """The jobs a spec starts from: spec.model.fromJob and rewards[].fromJob."""
    spec = spec or {}
    names = [(spec.get("model") or {}).get("fromJob"),
             *(r.get("fromJob") for r in spec.get("rewards") or [] if isinstance(r, dict))]
    return frozenset(n for n in names if n and isinstance(n, str))


def _new_warnings(old: dict[str, Any], outcome: rc.Outcome) -> list[Any]:
    """The conditions that say a kind this job needs is not served, where the job's status
    did not say so yet: one Event each (the condition stays; the Event is for ``kubectl
    describe`` and event-based alerting)."""
    if outcome.missing is None:
        return []
    said = {(c.get("type"), c.get("reason")) for c in old.get("conditions") or []
            if c.get("status") in ("True", "False")}
    wanted = {("Stalled", "True"), ("Serving", "False")}
    return [c for c in outcome.status.conditions
            if c.reason == outcome.missing.reason and (c.type, c.status) in wanted
            and (c.type, c.reason) not in said]
