"""kopf handlers: every handler of the operator, each a thin shim into ``reconcile``.

Run with ``kopf run -m kubetune_operator.handlers`` (or ``kubetune-operator``): importing this
module registers the handlers in kopf's default registry, watching the children of the backend
``KUBETUNE_BACKEND`` names. ``register`` builds the same into another registry (tests,
embedding: ``kopf.operator(registry=...)``, ``KopfRunner(registry=...)``), so that each
operator watches its own backend's kind only (kopf has no public way to drop a handler).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

import kopf
from kubetune.api.v1alpha1 import GROUP, PLURAL, VERSION

from kubetune_operator import metrics
from kubetune_operator import reconcile as rc
from kubetune_operator.backends import Backend, backend_named
from kubetune_operator.builders import JOB_LABEL
from kubetune_operator.reporting import Flusher, ProgressStore, TokenChecker, make_app
from kubetune_operator.settings import OperatorConfig
from kubetune_operator.status import TERMINAL, dump, progress_fields, progress_patch

log = logging.getLogger("kubetune.operator")
RETRY_SECONDS = 10  # after a transient API error (kopf.TemporaryError)
REFUSED = frozenset({400, 422})  # the API server refused what we sent: retrying cannot help


class Gone(Exception):
    """The job was deleted: the flusher forgets it."""

    status = 404


def api_client() -> Any:
    """In a pod: its service account; elsewhere: the current kubeconfig context."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    conf = client.Configuration.get_default_copy()
    # One pooled connection per thread that may call at once (kopf's workers and asyncio's
    # executor): with fewer, urllib3 drops connections and every new one costs a TLS
    # handshake that loads the CA store (measured: 40 % of the operator's CPU at 200 jobs).
    conf.connection_pool_maxsize = max(conf.connection_pool_maxsize or 0, 64)
    return client.ApiClient(conf)


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Our own names for kopf's bookkeeping (annotations, not status: the status is typed).
    settings.persistence.finalizer = "kubetune.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.INFO
    # The one read of the environment (tests hand in their own OperatorConfig).
    try:
        config: OperatorConfig = memo.setdefault("config", OperatorConfig.from_env())
    except ValueError as bad:  # a setting the chart or a person got wrong: retrying cannot help
        raise kopf.PermanentError(str(bad)) from bad
    settings.execution.max_workers = config.workers
    # Watching exact namespaces (the chart's watchNamespaces): no cluster-wide namespace and CRD
    # scanning, so the operator needs no cluster-scope read of namespaces.
    settings.scanning.disabled = not config.scanning
    if "kube" not in memo:  # tests may hand in their own client
        memo.kube = rc.Kube(api_client())
    memo.setdefault("store", ProgressStore())
    memo.setdefault("active", set())
    memo.setdefault("locks", {})  # (namespace, name) -> the lock of its converge
    memo.backend = backend_named(config.backend)
    if config.metrics_port and not memo.get("metrics_started"):
        metrics.serve(config.metrics_port)
        memo.metrics_started = True


async def start_progress_server(memo: kopf.Memo, **_: Any) -> None:
    """The HTTPS endpoint pods report progress to, and the flusher that writes statuses."""
    config: OperatorConfig = memo.config
    port = config.progress_port or memo.get("progress_port")
    if not port:
        memo.progress_runner = None
        return
    loop = asyncio.get_running_loop()
    kube: rc.Kube = memo.kube
    # Token reviews, pod reads and progress-only patches run on the event loop; the rarer
    # merge of new checkpoints and outputs (a read, then a patch, under the job's lock) gets
    # threads of its own (asyncio's default pool has cpu + 4).
    from concurrent.futures import ThreadPoolExecutor

    writers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="progress")

    async def review(token: str, audience: str) -> dict[str, Any]:
        return await kube.token_review_async(token, audience)

    # What each job's last flush wrote of checkpoints and outputs: while they stay the same,
    # a flush only replaces status.progress (one merge patch, no read first).
    merged: dict[tuple[str, str], tuple[Any, Any]] = memo.setdefault("progress_merged", {})

    async def patch(ns: str, name: str, snap: dict[str, Any]) -> None:
        key, extras = (ns, name), (snap.get("checkpoints"), snap.get("outputs"))
        if merged.get(key) == extras:  # progress only: one patch on the event loop
            fields = progress_fields(snap)
            if fields:
                try:
                    await kube.patch_status_async(ns, name, {"progress": fields})
                except Exception:
                    metrics.STATUS_PATCHES.labels("error").inc()
                    raise
                metrics.STATUS_PATCHES.labels("ok").inc()
            return

        def write() -> bool:
            # New checkpoints or outputs: in turn with converges, and merged with the status
            # as it is now (another replica may have written newer progress or checkpoints).
            with memo.locks.setdefault(key, threading.Lock()):
                job = kube.get_finetunejob(ns, name)
                if job is None:
                    raise Gone(ns, name)
                keep = ((job.get("spec") or {}).get("training") or {}).get("saveTotalLimit")
                status = progress_patch(snap, job.get("status") or {}, keep)
                if status:  # a conflict (409) leaves the report dirty for the next round
                    kube.patch_status(ns, name, status, job["metadata"].get("resourceVersion"))
                merged[key] = extras
                return bool(status)

        try:
            wrote = await loop.run_in_executor(writers, write)
        except Exception:
            metrics.STATUS_PATCHES.labels("error").inc()
            raise
        if wrote:
            metrics.STATUS_PATCHES.labels("ok").inc()

    store: ProgressStore = memo.store
    async def pod_lookup(ns: str, pod: str) -> dict[str, Any] | None:
        return await kube.pod_async(ns, pod)

    app = make_app(store, TokenChecker(review), pod_lookup=pod_lookup, backend=memo.backend)
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    ssl_ctx = None
    cert, key = config.progress_tls_cert, config.progress_tls_key
    if cert and key:
        import ssl

        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(cert, key)
    site = web.TCPSite(runner, host=config.progress_host, port=port, ssl_context=ssl_ctx)
    await site.start()
    memo.flusher_task = asyncio.create_task(
        Flusher(store, patch, interval=config.progress_flush_seconds, concurrency=32).run())
    memo.progress_runner = runner
    log.info("progress endpoint on port %s (%s)", port, "https" if ssl_ctx else "http")


async def stop_progress_server(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("recheck_task"):
        memo.recheck_task.cancel()
    if memo.get("flusher_task"):
        memo.flusher_task.cancel()
    if memo.get("progress_runner"):
        await memo.progress_runner.cleanup()
    if memo.get("kube") is not None and hasattr(memo.kube, "close_async"):
        await memo.kube.close_async()


def _converge(parent: dict[str, Any], memo: kopf.Memo) -> rc.Outcome:
    body = kopf.Body(parent)  # for kopf's Events
    meta = parent["metadata"]
    ns, name = meta["namespace"], meta["name"]
    memo.store.remember_checkpoints(ns, name, (parent.get("status") or {}).get("checkpoints")
                                    or [])
    with metrics.RECONCILE_SECONDS.time():
        try:
            outcome = rc.reconcile(parent, memo.kube, memo.config,
                                   memo.store.get(ns, name))
        except Exception:
            metrics.RECONCILES.labels("error").inc()
            raise
    metrics.RECONCILES.labels("ok").inc()
    phase = outcome.status.phase
    metrics.observe_phase(ns, name, phase)
    # Jobs still in flight get the slow re-check (pod-level waits change no training object),
    # and so do finished jobs whose server is not ready or not checked yet.
    if outcome.settled:
        memo.active.discard((ns, name))
    else:
        memo.active.add((ns, name))
    for what in outcome.created:
        metrics.CHILDREN_CREATED.labels(what.split("/")[0]).inc()
    if outcome.created:  # one Event for all of them: Events are API writes too
        kopf.info(body, reason="Created", message="created " + ", ".join(outcome.created))
    # Phase changes as Events; a new job's Pending is said by "Created" already.
    if outcome.phase_changed and ((parent.get("status") or {}).get("phase")
                                  or phase != "Pending"):
        ready = next(c for c in outcome.status.conditions if c.type == "Ready")
        post = kopf.warn if phase == "Failed" else kopf.info
        post(body, reason=phase if phase != "Failed" else ready.reason,
             message=ready.message or phase)
    return outcome


def converge(meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    from kubernetes.client.exceptions import ApiException

    # Always from a fresh read, even on create: after a restart kopf may call the create
    # handler with a body older than the status already written (a finished job whose child
    # was cleaned up would get it back).
    try:
        _converge_by_name(memo, meta["namespace"], meta["name"])
    except ApiException as err:
        # Retry intent, stated: what the API server refused stays refused; anything else
        # (a conflict, throttling, the server away) is retried after a pause.
        what = f"the API server answered {err.status} {err.reason}"
        if err.status in REFUSED:
            raise kopf.PermanentError(f"{what}: {err.body}") from err
        raise kopf.TemporaryError(what, delay=RETRY_SECONDS) from err


def _converge_by_name(memo: kopf.Memo, ns: str, name: str) -> None:
    """The one way a job is converged and its status written (kopf's handlers, events on
    children, the re-check): one at a time per job, each from a fresh read, so no converge
    works from a status another one has already replaced (transition times, the suspend
    annotation and the Workload's spec.active stay consistent)."""
    with memo.locks.setdefault((ns, name), threading.Lock()):
        parent = memo.kube.get_finetunejob(ns, name)
        if parent is None:
            memo.active.discard((ns, name))
            return
        outcome = _converge(parent, memo)
        before = parent.get("status") or {}
        status = dump(outcome.status)  # the one place the typed status becomes JSON
        if status != before:
            # A merge patch: a field the new status no longer has (serving) is removed by null.
            gone = {k: None for k in before if k not in status}
            memo.kube.patch_status(ns, name, {**gone, **status})


async def start_rechecks(memo: kopf.Memo, **_: Any) -> None:
    """One task re-checks jobs in flight every ``config.recheck_seconds``. (A per-object kopf timer
    would put a finalizer on every job: no job could be deleted while the operator is down.)"""
    async def loop() -> None:
        while True:
            await asyncio.sleep(memo.config.recheck_seconds)
            for ns, name in sorted(memo.active):
                try:
                    await asyncio.to_thread(_converge_by_name, memo, ns, name)
                except Exception:
                    log.warning("re-check of %s/%s failed", ns, name, exc_info=True)
                await asyncio.sleep(0.02)  # spread the load

    memo.recheck_task = asyncio.create_task(loop())


def child_changed(body: kopf.Body, memo: kopf.Memo, type: str | None, **_: Any) -> None:
    """The training object changed (its operator, Kueue): bring its FineTuneJob's status."""
    if type != "MODIFIED" or not body.get("status"):
        return  # the listing (resume covers it), our own creation, or nothing to report yet
    meta = body["metadata"]
    _converge_by_name(memo, meta["namespace"], meta["labels"][JOB_LABEL])


def dependents(namespace: str, name: str, spec: kopf.Spec, **_: Any) -> Any:
    """(namespace, job) -> the jobs whose spec.model.fromJob names it."""
    upstreams = [((spec or {}).get("model") or {}).get("fromJob"),
                 *(r.get("fromJob") for r in (spec or {}).get("rewards") or []
                   if isinstance(r, dict))]
    return {(namespace, u): name for u in upstreams if u} or None


async def upstream_changed(body: kopf.Body, memo: kopf.Memo, dependents: kopf.Index,
                           type: str | None, **_: Any) -> None:
    """A job appeared, or finished: the jobs that start from it wait no longer (or stall)."""
    meta = body["metadata"]
    phase = (body.get("status") or {}).get("phase")
    if type not in ("ADDED", "MODIFIED") or (type == "MODIFIED" and phase not in TERMINAL):
        return
    # Read on the event loop, where kopf updates its indices (a thread could see it change).
    for dependent in list(dependents.get((meta["namespace"], meta["name"]), [])):
        await asyncio.to_thread(_converge_by_name, memo, meta["namespace"], dependent)


def forget(meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    """Children go by owner references; outputs on volumes stay. Drop in-memory progress."""
    memo.store.forget(meta["namespace"], meta["name"])
    memo.get("progress_merged", {}).pop((meta["namespace"], meta["name"]), None)
    memo.active.discard((meta["namespace"], meta["name"]))
    memo.locks.pop((meta["namespace"], meta["name"]), None)
    metrics.observe_phase(meta["namespace"], meta["name"], None)


# ------------------------------------------------------------------------ registration


def _watching(kind: str) -> Any:
    def same_backend(memo: kopf.Memo, **_: Any) -> None:
        """The registry watches one backend's kind; the settings must name that one."""
        if memo.backend.kind != kind:
            raise kopf.PermanentError(
                f"this operator's handlers watch {kind} objects, its settings name the "
                f"{memo.backend.kind} backend: build them with register(registry, backend)")
    return same_backend


def register(registry: kopf.OperatorRegistry, backend: Backend) -> kopf.OperatorRegistry:
    """Every handler, into ``registry``; children of ``backend``'s kind alone are watched
    (the chart gives RBAC for that one). Startup handlers run in this order. A new
    ``kopf.OperatorRegistry()`` has none of kopf's default login handlers: add one
    (``kopf.on.login(registry=...)(kopf.login_via_client)``)."""
    kopf.on.startup(registry=registry)(configure)
    kopf.on.startup(registry=registry, id="same_backend")(_watching(backend.kind))
    kopf.on.startup(registry=registry)(start_progress_server)
    kopf.on.startup(registry=registry)(start_rechecks)
    kopf.on.cleanup(registry=registry)(stop_progress_server)
    for on in (kopf.on.resume, kopf.on.create):
        on(GROUP, VERSION, PLURAL, registry=registry)(converge)
    kopf.on.update(GROUP, VERSION, PLURAL, field="spec", registry=registry)(converge)
    kopf.index(GROUP, VERSION, PLURAL, registry=registry)(dependents)
    kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)(upstream_changed)
    kopf.on.delete(GROUP, VERSION, PLURAL, optional=True, registry=registry)(forget)
    kopf.on.event(backend.group, backend.version, backend.plural, registry=registry,
                  id=f"child_changed/{backend.kind}",
                  labels={JOB_LABEL: kopf.PRESENT})(child_changed)
    return registry


def _backend_at_import() -> Backend:
    """The backend the environment names (what ``configure`` reads again at startup; a
    wrong name is its PermanentError, so the default here)."""
    try:
        return backend_named(os.environ.get("KUBETUNE_BACKEND") or OperatorConfig.backend)
    except ValueError:
        return backend_named(OperatorConfig.backend)


register(kopf.get_default_registry(), _backend_at_import())
