"""The training child's reconcile, level-triggered: observe → decide → act → status.

One pass converges one FineTuneJob: admission (``admission``: the upstream jobs' models, the
memory check) and which add-on kinds it needs decide whether its children may be made; they
are made create-or-adopt (names are deterministic, a 409 reads back what is there, someone
else's is never adopted), so a crash or restart at any point converges; the running child is
followed (spec drift, suspend carried to it or to its Kueue Workload, a permanent failure the
server cannot see stopped); the status reducer (``status``) turns what was seen into the
status, and ``serving_reconcile`` adds spec.serve's. Every API call goes through ``kube``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobStatus

from kubetune_operator import builders, serving_reconcile
from kubetune_operator.admission import (
    memory_refusal,
    needs_upstream,
    preflight_verdict,
    resolve_from_job,
)
from kubetune_operator.apiserver import ApiServer
from kubetune_operator.backends import Backend, backend_named, children
from kubetune_operator.builders import (
    JOB_LABEL,
    KUEUE_GROUP,
    KUEUE_JOB_UID_LABEL,
    KUEUE_QUEUE_LABEL,
    KUEUE_VERSION,
    SPEC_HASH,
    SUSPEND_APPLIED,
)
from kubetune_operator.discovery import Need, Served, backend_need, kueue_need
from kubetune_operator.kube import Kube, now, owned_by, ref
from kubetune_operator.settings import OperatorConfig
from kubetune_operator.status import (
    TERMINAL,
    Observed,
    pod_rejection,
    reduce,
    serving_settled,
    stopped_by_preflight,
    was_invalid,
)
from kubetune_operator.validation import validate

log = logging.getLogger("kubetune.reconcile")
KUEUE_API = f"{KUEUE_GROUP}/{KUEUE_VERSION}"


@dataclass
class Outcome:
    status: FineTuneJobStatus  # typed; dumped once, at the patch
    created: list[str]
    phase_changed: bool
    settled: bool = False  # nothing left to watch for: finished, and served and checked
    missing: Need | None = None  # a kind it needs that the API server does not serve
    wake: list[str] = field(default_factory=list)  # jobs to converge next (same namespace)


@dataclass
class Seen:
    """What one pass found and did, for the status."""

    job: FineTuneJob | None = None  # valid, with upstream models resolved
    invalid: str | None = None
    waiting: str | None = None  # for an upstream job
    unfit: str | None = None  # would not fit its GPUs
    missing: Need | None = None  # a kind it needs is not served
    blocked: str | None = None  # a child's name is taken by someone else's object
    drift: str | None = None
    created: list[str] = field(default_factory=list)
    made: list[dict[str, Any] | None] = field(default_factory=list)  # the last objects made
    child: dict[str, Any] | None = None
    workload: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    gone_pods: list[dict[str, Any]] = field(default_factory=list)  # ended early, since gone
    progress: dict[str, Any] | None = None
    preflight: dict[str, Any] | None = None  # the pre-flight pod's report, when it ended
    validating: str | None = None  # the pre-flight pod is running
    preflight_failed: tuple[str, str] | None = None  # (reason, message): it stopped the job
    retried: bool = False  # its pre-flight had stopped it; the spec changed since


def needs(backend: Backend, labels: dict[str, str], config: OperatorConfig, *,
          kueue: bool = True) -> list[Need]:
    """The kinds a job's children need that an add-on serves (none for a built-in backend
    with no queue); ``kueue``: Kueue's too, when the job is queued."""
    out = [n for n in [backend_need(backend)] if n is not None]
    queue = builders.kueue_labels(labels, config).get(KUEUE_QUEUE_LABEL)
    if queue and kueue:
        out.append(kueue_need(queue, KUEUE_QUEUE_LABEL not in labels))
    return out


def reconcile(body: dict[str, Any], kube: Kube, config: OperatorConfig,
              progress: dict[str, Any] | None = None, *, server: ApiServer,
              served: Served | None = None, ca: Any = None,
              gone_pods: list[dict[str, Any]] | None = None) -> Outcome:
    """Converge one FineTuneJob; returns the status it should have (patch only if changed).
    ``server``: what the API server can do (read once at startup); ``served``: which kinds
    it serves (None: not checked); ``ca``: the progress CA's publisher
    (``progress_tls.CaPublisher``; None: pods need none from the operator); ``gone_pods``:
    training pods whose trainer ended early, as the pod watch saw them last."""
    backend = backend_named(config.backend)
    seen = Seen(progress=progress, gone_pods=gone_pods or [])
    _admit(body, kube, config, backend, server, served, seen)
    if seen.job is not None and seen.missing is None:
        _make_children(body, kube, config, backend, server, served, ca, seen)
    if seen.child is not None:
        _follow_child(body, kube, config, backend, server, seen)
    return _conclude(kube, config, body, backend, seen, served)


# ------------------------------------------------------------------------ decide


def _admit(body: dict[str, Any], kube: Kube, config: OperatorConfig, backend: Backend,
           server: ApiServer, served: Served | None, seen: Seen) -> None:
    """Valid for this server and backend; upstream models resolved; fits its GPUs; every
    kind it needs served. Only reads."""
    meta = body["metadata"]
    old = body.get("status") or {}
    labels = meta.get("labels") or {}
    seen.job, seen.invalid = validate(body, backend, server, _queued(labels, config))
    if seen.job is not None and needs_upstream(seen.job):
        seen.job, seen.waiting, seen.invalid = resolve_from_job(
            kube, meta["namespace"], meta["name"], seen.job)
    seen.unfit = memory_refusal(seen.job, config) if seen.job is not None else None
    if seen.job is not None and served is not None and (
            old.get("phase") not in TERMINAL or was_invalid(old)):
        # A kind it needs is not served: nothing is made (no ConfigMap without its child).
        # (Kueue only before the child is made: a child it already admitted runs on.)
        wanted = needs(backend, labels, config, kueue=old.get("phase") in (None, "Pending"))
        seen.missing = next((n for n in wanted if served.missing(n)), None)


# ------------------------------------------------------------------------ act


def _make_children(body: dict[str, Any], kube: Kube, config: OperatorConfig, backend: Backend,
                   server: ApiServer, served: Served | None, ca: Any, seen: Seen) -> None:
    """Create-or-adopt each child in order, unless the job is finished, suspended before it
    ran, or would not fit; the training object (last) is the one followed."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    old = body.get("status") or {}
    job = seen.job
    assert job is not None
    objs = children(job=job, config=config, uid=meta.get("uid"), labels=meta.get("labels") or {},
                    server=server)
    # A finished run's cleaned-up child stays gone; a spec that was invalid and is now
    # fixed never had children, so it gets them; so does one its pre-flight stopped, once
    # its spec changed (or its pre-flight Job was deleted, to check fixed data again).
    retry = _retry_preflight(kube, job, old, ns)
    finished = old.get("phase") in TERMINAL and not was_invalid(old) and not retry
    seen.retried = retry  # the stopped run's report is not this spec's
    fresh = not old  # never reconciled: create first (one call) instead of get first
    for obj in objs:
        obj["metadata"]["namespace"] = ns
    # Suspended before it ever ran: no children until resumed (nothing could start, e.g.
    # admitted by Kueue before its Workload is deactivated).
    if job.spec.suspend and not finished and (fresh or kube.get(objs[-1]) is None):
        objs = []
    # Would not fit its GPUs: nothing is created (a child made earlier runs on).
    if seen.unfit and objs and not finished and (fresh or kube.get(objs[-1]) is None):
        objs = []
    else:
        seen.unfit = None
    if ca is not None and objs and not finished:
        ca.ensure(ns)  # the CA the pods mount, there before their child (and kept there)
    passed = bool((old.get("preflight") or {}).get("passed"))
    if any(builders.is_preflight(o) for o in objs):
        if passed or finished:  # (its Job may be gone by now): the training objects
            objs = [o for o in objs if not builders.is_preflight(o)]
        else:  # the config and the pre-flight Job first; the rest once it passed
            cut = next(i for i, o in enumerate(objs) if builders.is_preflight(o)) + 1
            if not _create_or_adopt(kube, objs[:cut], meta, fresh, finished, served, seen) \
                    or not _renew(kube, objs[:cut], seen):
                return
            seen.preflight, seen.validating, seen.preflight_failed = preflight_verdict(
                kube, ns, name, objs[cut - 1])
            if seen.validating or seen.preflight_failed:
                return
            objs, fresh = objs[cut:], True  # (the rest were never made: nothing to read)
    elif retry:  # tried again with no pre-flight now (skip, or no GPUs): the config follows
        config = [o for o in objs if o["kind"] == "ConfigMap"]
        if not _create_or_adopt(kube, config, meta, fresh, finished, served, seen) \
                or not _renew(kube, config, seen):
            return
    if _create_or_adopt(kube, objs, meta, fresh, finished, served, seen):
        seen.child = next((c for o, c in zip(objs, seen.made, strict=True)
                           if o["kind"] == backend.kind), None)


def _retry_preflight(kube: Kube, job: FineTuneJob, old: dict[str, Any], ns: str) -> bool:
    """A job its pre-flight stopped, asked to try again: its spec changed since its
    pre-flight Job was made, or that Job was deleted (to check fixed data again)."""
    if not stopped_by_preflight(old):
        return False
    current = kube.get(ref("batch/v1", "Job", ns, builders.preflight_name(job)))
    return current is None or _hash(current) != builders.spec_hash(job)


def _renew(kube: Kube, wanted: list[dict[str, Any]], seen: Seen) -> bool:
    """Before any training object: the config and the pre-flight Job follow the spec. One
    made from an older spec is brought to this one (the ConfigMap patched; the Job, whose
    pod would check the old spec, replaced). False while an old Job is still going."""
    for i, (obj, current) in enumerate(zip(wanted, seen.made, strict=True)):
        if current is None or _hash(current) == _hash(obj):
            continue
        meta = obj["metadata"]
        if obj["kind"] == "ConfigMap":
            seen.made[i] = kube.patch("v1", "ConfigMap", meta["namespace"], meta["name"],
                                      {"metadata": {"annotations": meta["annotations"]},
                                       "data": obj["data"]})
            continue
        log.info("%s/%s: the spec changed: a new pre-flight", meta["namespace"], meta["name"])
        kube.delete("batch/v1", "Job", meta["namespace"], meta["name"],
                    propagation="Background")  # its pod with it
        seen.made[i], made = kube.create(obj)
        if not made:  # the old one is not gone yet: the re-check makes it
            seen.validating = "the spec changed: the previous pre-flight Job is going"
            return False
        seen.created.append(f"Job/{meta['name']}")
    return True


def _hash(obj: dict[str, Any]) -> str | None:
    return (obj.get("metadata", {}).get("annotations") or {}).get(SPEC_HASH)


def _create_or_adopt(kube: Kube, objs: list[dict[str, Any]], meta: dict[str, Any],
                     fresh: bool, finished: bool, served: Served | None, seen: Seen) -> bool:
    """Each object made, or read back if it is there (``seen.made``: what is there, in order);
    False when one of them is someone else's (``seen.blocked`` says whose name)."""
    name = meta["name"]
    seen.made = []
    for obj in objs:
        current = None if fresh else kube.get(obj)
        if current is None and not finished:  # a finished job's cleaned-up child stays gone
            try:
                current, made = kube.create(obj)
            except Exception as err:  # its kind gone since it was found served?
                if served is not None and getattr(err, "status", None) == 404 \
                        and "/" in obj["apiVersion"]:
                    served.forget(obj["apiVersion"])  # asked again on the retry
                raise
            if made:
                seen.created.append(f"{obj['kind']}/{name}")
        if current is not None and not owned_by(current, meta.get("uid")):
            # Same name, someone else's (e.g. a deleted job's child awaiting garbage
            # collection): never adopt it; the re-check retries once it is gone.
            seen.blocked = (f"a {obj['kind']} named {obj['metadata']['name']!r} already "
                            "exists and belongs to another object; waiting for it to go")
            seen.child = None
            return False
        seen.made.append(current)
    return True


def _follow_child(body: dict[str, Any], kube: Kube, config: OperatorConfig, backend: Backend,
                  server: ApiServer, seen: Seen) -> None:
    """The training object as it runs: spec drift said, suspend carried, its Workload (why it
    waits), its pods, a permanent failure the server cannot see stopped, KEP-2779 progress."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    job, child = seen.job, seen.child
    assert job is not None and child is not None
    annotations = child.get("metadata", {}).get("annotations") or {}
    rendered = _hash(child)
    if rendered and rendered != builders.spec_hash(job):
        seen.drift = (f"the spec changed after the {backend.kind} was made; only suspend "
                      "applies to a job in flight: create a new FineTuneJob for other changes")
    queued = KUEUE_QUEUE_LABEL in (child.get("metadata", {}).get("labels") or {})
    cannot = backend.suspend_problem(server)
    if cannot and annotations.get(SUSPEND_APPLIED) != str(job.spec.suspend).lower():
        # Said in a condition; the running object is left as it is.
        seen.drift = f"{seen.drift}; {cannot}" if seen.drift else cannot
    else:
        child, seen.workload = _apply_suspend(kube, backend, ns, name, child,
                                              job.spec.suspend, queued)
    # Kueue makes the Workload after the child: none to look for in the same pass.
    just_made = f"{backend.kind}/{name}" in seen.created
    if queued and seen.workload is None and backend.suspend_flag(child) and not just_made:
        seen.workload = _workload(kube, ns, child["metadata"].get("uid", ""))  # why it waits
    if child.get("status"):  # no status yet: the training operator made no pods yet
        seen.pods = _pods(kube, ns, name)
        stop = backend.stop_patch(child, seen.pods, server)
        if stop is not None:  # a permanent failure the server cannot see: no retries
            log.info("%s/%s: stopping the %s: %s", ns, name, backend.kind, stop)
            child = _patch_child(kube, backend, ns, name, stop)
        mirrored = backend.state(child).trainer_status
        if mirrored and config.trainer_status:  # Kubeflow's KEP-2779 endpoint
            from kubetune_operator.reporting.clean import from_trainer_status

            seen.progress = {**(seen.progress or {}), **from_trainer_status(mirrored)}
    seen.child = child


async def reconcile_new(body: dict[str, Any], kube: Kube, config: OperatorConfig,
                        server: ApiServer, served: Served | None = None) -> Outcome | None:
    """The first converge of a job never reconciled (no status yet): its children made on the
    event loop, create first and nothing read. None when it needs more than that (invalid,
    suspended, fromJob, the memory check, a child already there, a kind not known to be
    served): ``reconcile`` then, which reads what is there first."""
    meta = body["metadata"]
    if body.get("status"):
        return None
    backend = backend_named(config.backend)
    job, _ = validate(body, backend, server, _queued(meta.get("labels") or {}, config))
    if job is None or job.spec.suspend or needs_upstream(job) \
            or builders.wants_preflight(job, config):
        return None
    if job.spec.resources.gpus_per_node and (job.spec.resources.gpu_memory
                                             or config.gpu_memory):
        return None  # the memory estimate may read the model's config.json (blocking I/O)
    if served is not None and not all(
            served.served(n) for n in needs(backend, meta.get("labels") or {}, config)):
        return None  # discovery is a blocking call
    ns, name = meta["namespace"], meta["name"]
    objs = children(job=job, config=config, uid=meta.get("uid"),
                    labels=meta.get("labels") or {}, server=server)
    seen = Seen(job=job)
    for obj in objs:
        obj["metadata"]["namespace"] = ns
        if not await kube.create_async(obj):
            return None  # already there (ours, or someone else's): the general path looks
        seen.created.append(f"{obj['kind']}/{name}")
    seen.child = objs[-1]
    return _conclude(kube, config, body, backend, seen)


# ------------------------------------------------------------------------ status


def _conclude(kube: Kube, config: OperatorConfig, body: dict[str, Any], backend: Backend,
              seen: Seen, served: Served | None = None) -> Outcome:
    """What was observed → the status the job should have (and spec.serve's part of it)."""
    meta = body["metadata"]
    old = body.get("status") or {}
    labels = meta.get("labels") or {}
    job, missing = seen.job, seen.missing
    observed = Observed(
        waiting=seen.waiting,
        generation=meta.get("generation"),
        spec_suspend=bool((body.get("spec") or {}).get("suspend")),
        queue_name=labels.get(KUEUE_QUEUE_LABEL) or config.default_queue,
        invalid=seen.invalid,
        unfit=seen.unfit,
        blocked=seen.blocked,
        missing=(missing.reason, missing.message) if missing else None,
        drift=seen.drift,
        keep_checkpoints=job.spec.training.save_total_limit if job else None,
        child=seen.child,
        backend=backend,
        workload=seen.workload,
        log_tail=config.failure_log_tail,
        pods=seen.pods,
        gone_pods=seen.gone_pods,
        preflight=seen.preflight,
        preflight_reset=seen.retried,
        validating=seen.validating,
        preflight_failed=seen.preflight_failed,
        rejected=_pods_refused(kube, backend, meta["namespace"], seen.child, seen.pods),
        progress=seen.progress,
    )
    status = reduce(observed, old, now())
    wake: list[str] = []
    if job is not None and (job.spec.serve or old.get("serving")):
        need = serving_reconcile.KSERVE_NEED
        status = serving_reconcile.converge(kube, config, job, meta, status, old, seen.created,
                                            served, wake)
        if missing is None and served is not None and served.waiting(need.api_version) \
                and any(c.reason == need.reason for c in status.conditions):
            missing = need
    settled = status.phase in TERMINAL and (
        job is None or not job.spec.serve or status.phase != "Succeeded"
        or serving_settled(job, status))
    return Outcome(status, seen.created, status.phase != old.get("phase"), settled, missing,
                   wake)


# ------------------------------------------------------------------------ reads and writes


def _pods(kube: Kube, ns: str, job: str) -> list[dict[str, Any]]:
    items = kube.list("v1", "Pod", ns, labels=f"{JOB_LABEL}={job}")
    # Filter here too: selectors are the API server's job, but cheap to double-check.
    return [p for p in items if (p.get("metadata", {}).get("labels") or {}).get(
        JOB_LABEL) == job and not builders.is_preflight(p)]  # the training pods only


def _warnings(kube: Kube, ns: str) -> list[dict[str, Any]]:
    """The namespace's Warning Events (where controllers say the API server refused a pod);
    none when the operator may not list Events (an older chart's RBAC)."""
    try:
        items = kube.list("v1", "Event", ns, fields="type=Warning")
    except Exception as err:
        if getattr(err, "status", None) != 403:
            raise
        log.warning("not allowed to list Events in %s (RBAC): a refused pod's reason needs "
                    "events list", ns)
        return []
    return [e for e in items if e.get("type") == "Warning"]


def _workload(kube: Kube, ns: str, owner_uid: str) -> dict[str, Any] | None:
    """The Kueue Workload of a training object (Kueue labels it with the object's uid); None
    without Kueue, or before Kueue made it."""
    try:
        items = kube.list(KUEUE_API, "Workload", ns, labels=f"{KUEUE_JOB_UID_LABEL}={owner_uid}")
    except Exception as err:
        status = getattr(err, "status", None)
        if status == 403:
            log.warning("not allowed to list Kueue Workloads in %s (RBAC): a queued job's "
                        "reason and spec.suspend through Kueue need list/patch", ns)
        if status in (403, 404):  # Kueue not installed (or not ours to read)
            return None
        raise
    return next((w for w in items if owned_by(w, owner_uid)), None)


def _patch_child(kube: Kube, backend: Backend, ns: str, name: str, patch: dict[str, Any]
                 ) -> dict[str, Any]:
    return kube.patch(backend.api_version, backend.kind, ns, name, patch)


def _pods_refused(kube: Kube, backend: Backend, ns: str, child: dict[str, Any] | None,
                  pods: list[dict[str, Any]] | None) -> tuple[str, str] | None:
    """Why a child that has started (it has a status) still has no pod: the API server refused
    them, as its controller's Events say. Read only then."""
    if not child or not child.get("status") or pods:
        return None
    state = backend.state(child)
    if state.running or state.suspended or state.failed or state.succeeded is not None:
        return None
    return pod_rejection(_warnings(kube, ns), backend, child["metadata"]["name"])


def _merged(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _queued(labels: dict[str, str], config: OperatorConfig) -> bool:
    """The job goes through a Kueue queue: its own label, or the operator's default."""
    return KUEUE_QUEUE_LABEL in builders.kueue_labels(labels, config)


def _apply_suspend(kube: Kube, backend: Backend, ns: str, name: str, child: dict[str, Any],
                   want: bool, queued: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Carry a *user's* change of spec.suspend to the training object; returns it and, for a
    Kueue-managed job, its Workload when it was read.

    We compare with what we last applied (an annotation on the child), never with the child's
    own suspend field, which Kueue sets: we never undo Kueue. A Kueue-managed job is suspended
    the way Kueue expects, by deactivating its Workload (``spec.active: false``): Kueue then
    evicts and suspends the PyTorchJob, and requeues it when reactivated. Suspending the
    PyTorchJob directly would be undone by Kueue while the Workload stays admitted.
    """
    annotations = child.get("metadata", {}).get("annotations") or {}
    wanted = str(want).lower()
    if annotations.get(SUSPEND_APPLIED) == wanted:
        return child, None
    note = {"metadata": {"annotations": {SUSPEND_APPLIED: wanted}}}
    if not queued:
        log.info("%s/%s: spec.suspend=%s applied to the %s", ns, name, wanted, backend.kind)
        return _patch_child(kube, backend, ns, name,
                            _merged(note, backend.suspend_patch(want))), None
    workload = _workload(kube, ns, child["metadata"].get("uid", ""))
    if workload is None:  # Kueue has not made it yet: the next re-check tries again
        return child, None
    if (workload.get("spec") or {}).get("active", True) == want:
        workload = kube.patch(KUEUE_API, "Workload", ns, workload["metadata"]["name"],
                              {"spec": {"active": not want}})
        log.info("%s/%s: spec.suspend=%s applied to Kueue Workload %s (spec.active)", ns, name,
                 wanted, workload["metadata"]["name"])
    return _patch_child(kube, backend, ns, name, note), workload
