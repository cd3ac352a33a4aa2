"""kopf handlers: every handler of the operator, each a thin shim into the ``Controller``.

Run with ``kopf run -m kubetune_operator.handlers`` (or ``kubetune-operator``): importing this
module registers the handlers in kopf's default registry, watching the children of the backend
``KUBETUNE_BACKEND`` names. ``register`` builds the same into another registry (tests,
embedding: ``kopf.operator(registry=...)``, ``KopfRunner(registry=...)``), so that each
operator watches its own backend's kind only (kopf has no public way to drop a handler).

kopf's memo carries one thing, ``memo.controller``; tests may hand in ``config``, ``kube``,
``store``, ``server``, ``progress_port`` and ``tls_check_seconds`` through it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
from kubetune.api.v1alpha1 import GROUP, PLURAL, VERSION

from kubetune_operator import metrics, sweeps
from kubetune_operator.backends import Backend, backend_named
from kubetune_operator.builders import JOB_LABEL, PREFLIGHT_ROLE, ROLE_LABEL
from kubetune_operator.controller import Controller
from kubetune_operator.discovery import Served, backend_need
from kubetune_operator.kube import Kube, api_client
from kubetune_operator.progress_tls import CHECK_SECONDS, ProgressTls
from kubetune_operator.reconcile import KUEUE_API
from kubetune_operator.reporting.auth import TokenChecker
from kubetune_operator.reporting.flusher import Flusher, StatusWriter
from kubetune_operator.reporting.server import listen, make_app, start_runner
from kubetune_operator.reporting.store import ProgressStore
from kubetune_operator.settings import OperatorConfig

log = logging.getLogger("kubetune.operator")


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf's last-handled state, for operators with no create/update/resume handlers (ours:
    event handlers only). kopf builds it on every event all the same, a deep copy of the
    body each time; here nothing is copied, kept or written."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: kopf.Body) -> None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        pass


def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """kopf's settings, then the controller. A setting that cannot work is a
    ``kopf.PermanentError``; an API error (the server not up yet) is retried by kopf."""
    # Our own names for kopf's bookkeeping (annotations, not status: the status is typed).
    settings.persistence.finalizer = "kubetune.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.level = logging.INFO
    # The one read of the environment (tests hand in their own OperatorConfig).
    try:
        config: OperatorConfig = memo.get("config") or OperatorConfig.from_env()
        backend = backend_named(config.backend)
    except ValueError as bad:  # a setting the chart or a person got wrong
        raise kopf.PermanentError(str(bad)) from bad
    settings.execution.max_workers = config.workers
    # A per-object worker holds the last event's body while it idles (5 s by default): at a
    # thousand jobs reporting progress, a thousand bodies. Idle workers go after 0.5 s.
    settings.queueing.idle_timeout = 0.5
    # Watching exact namespaces (the chart's watchNamespaces): no cluster-wide namespace and
    # CRD scanning, so the operator needs no cluster-scope read of namespaces.
    settings.scanning.disabled = not config.scanning
    # Children and pods: the API server sends ours only (kopf's label filters are its own).
    for kind in ((backend.group, backend.version, backend.plural), ("batch", "v1", "jobs"),
                 ("v1", "pods")):
        settings.watching.label_selectors[kind] = JOB_LABEL
    if memo.get("controller") is not None:
        return
    kube: Kube = memo.get("kube") or Kube(api_client())
    # What the API server can do, read once: rendering leaves out what it does not know.
    server = memo.get("server") or kube.server()
    log.info("API server %s", server.version)
    # Which add-on kinds are served, shared by all jobs: the backend's asked now, so the
    # first jobs need no discovery of their own.
    served = Served(kube.served_resources)
    need = backend_need(backend)
    for api_version in ([need.api_version] if need else []) + [KUEUE_API]:
        served.prime(api_version)
    memo.controller = Controller(
        config=config, kube=kube, server=server, served=served, backend=backend,
        store=memo.get("store") or ProgressStore(),
        executor=ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="converge"))
    if config.metrics_port and not memo.get("metrics_started"):
        metrics.serve(config.metrics_port)
        memo.metrics_started = True


def _progress_port(memo: kopf.Memo) -> int | None:
    return memo.controller.config.progress_port or memo.get("progress_port")


async def start_progress_tls(memo: kopf.Memo, **_: Any) -> None:
    """The endpoint's certificate and the CA for pods (progress_tls): read, made or renewed
    now, then re-checked every CHECK_SECONDS. A setting that cannot work stops the operator;
    an API error is retried by kopf."""
    ctl: Controller = memo.controller
    loop = asyncio.get_running_loop()
    tls = ProgressTls(ctl.config, ctl.kube, serving=bool(_progress_port(memo)))
    try:
        await loop.run_in_executor(ctl.executor, tls.start)
    except (ValueError, OSError) as bad:  # a missing namespace, CA or certificate file
        raise kopf.PermanentError(str(bad)) from bad
    memo.progress_tls = tls
    ctl.ca = tls.publisher

    async def renew() -> None:
        while True:
            await asyncio.sleep(memo.get("tls_check_seconds") or CHECK_SECONDS)
            try:
                await loop.run_in_executor(ctl.executor, tls.refresh)
            except Exception as err:  # kept serving what it has; asked again next time
                log.warning("progress endpoint: its certificate was not re-checked (%s)",
                            getattr(err, "status", None) or type(err).__name__)

    ctl.tasks.append(asyncio.create_task(renew()))


async def start_progress_server(memo: kopf.Memo, **_: Any) -> None:
    """The endpoint pods report progress to (HTTPS unless the URL names http), and the
    flusher that writes statuses."""
    ctl: Controller = memo.controller
    port = _progress_port(memo)
    if not port:
        return
    ctl.writer = StatusWriter(ctl.kube, ctl.lock)
    app = make_app(ctl.store, TokenChecker(ctl.kube.token_review_async),
                   pod_lookup=lambda ns, pod: ctl.kube.get_async("v1", "Pod", ns, pod),
                   backend=ctl.backend)
    runner = await start_runner(app)
    tls: ProgressTls | None = memo.get("progress_tls")
    ssl_ctx = tls.context if tls is not None else None
    listener = await listen(runner, ctl.config.progress_host, port, ssl_ctx)
    ctl.closers += [listener.close, runner.cleanup]  # the socket first, then the app
    ctl.tasks.append(asyncio.create_task(
        Flusher(ctl.store, ctl.writer, interval=ctl.config.progress_flush_seconds,
                concurrency=32).run()))
    log.info("progress endpoint on port %s (%s)", port, "https" if ssl_ctx else "http")


async def stop(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("controller") is not None:
        await memo.controller.stop()


GC_THRESHOLDS = (10_000, 20, 50)  # Python's default: (700, 10, 10)


def tune_gc(**_: Any) -> None:
    """Started: what is in memory now (imports, settings) stays, so the garbage collector's
    full passes skip it; and young objects (each watch event's parsed body) are collected
    less often. Measured on a burst of 400 jobs: 1.4 s of collection (passes up to 0.35 s,
    each a stall of every job in flight) down to 0.3 s."""
    import gc

    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def start_rechecks(memo: kopf.Memo, **_: Any) -> None:
    """One task re-checks jobs in flight (``Controller.recheck_forever``)."""
    memo.controller.tasks.append(asyncio.create_task(memo.controller.recheck_forever()))


async def job_event(event: dict[str, Any], memo: kopf.Memo, type: str | None, **_: Any
                    ) -> None:
    """Every event of a FineTuneJob, as the API sent it (no kopf state per job: see the
    controller's docstring for why)."""
    await memo.controller.on_event(event["object"], type)


async def child_changed(body: kopf.Body, memo: kopf.Memo, type: str | None, **_: Any) -> None:
    """The training object changed (its operator, Kueue), or the pre-flight Job: bring its
    FineTuneJob's status."""
    meta = body["metadata"]
    key = (meta["namespace"], meta["labels"][JOB_LABEL])
    # A pre-flight Job deleted: to check fixed data again, or replaced (not with its job).
    preflight_gone = type == "DELETED" and meta["labels"].get(ROLE_LABEL) == PREFLIGHT_ROLE \
        and key in memo.controller.uids
    if not preflight_gone and (type != "MODIFIED" or not body.get("status")):
        return  # the listing (resume covers it), our own creation, or nothing to report yet
    await memo.controller.converge_named(*key)


async def pod_changed(body: kopf.Body, memo: kopf.Memo, type: str | None, **_: Any) -> None:
    """A training pod changed or went (``Controller.on_pod``); pre-flight pods have their
    Job."""
    labels = body.get("metadata", {}).get("labels") or {}
    if labels.get(ROLE_LABEL) != PREFLIGHT_ROLE:
        await memo.controller.on_pod(dict(body), labels[JOB_LABEL], type)


# ------------------------------------------------------------------------ registration


def _watching(kind: str) -> Any:
    def same_backend(memo: kopf.Memo, **_: Any) -> None:
        """The registry watches one backend's kind; the settings must name that one."""
        named = memo.controller.backend.kind
        if named != kind:
            raise kopf.PermanentError(
                f"this operator's handlers watch {kind} objects, its settings name the "
                f"{named} backend: build them with register(registry, backend)")
    return same_backend


def register(registry: kopf.OperatorRegistry, backend: Backend) -> kopf.OperatorRegistry:
    """Every handler, into ``registry``; children of ``backend``'s kind alone are watched
    (the chart gives RBAC for that one). Startup handlers run in this order. A new
    ``kopf.OperatorRegistry()`` has none of kopf's default login handlers: add one
    (``kopf.on.login(registry=...)(kopf.login_via_client)``)."""
    kopf.on.startup(registry=registry)(configure)
    kopf.on.startup(registry=registry, id="same_backend")(_watching(backend.kind))
    kopf.on.startup(registry=registry)(start_progress_tls)
    kopf.on.startup(registry=registry)(start_progress_server)
    kopf.on.startup(registry=registry)(start_rechecks)
    kopf.on.startup(registry=registry)(tune_gc)  # last: after the other startup handlers
    kopf.on.cleanup(registry=registry)(stop)
    # Only an event handler on FineTuneJobs: no kopf state in annotations, no finalizer (a
    # job can be deleted while the operator is down).
    kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)(job_event)
    kopf.on.event(backend.group, backend.version, backend.plural, registry=registry,
                  id=f"child_changed/{backend.kind}",
                  labels={JOB_LABEL: kopf.PRESENT})(child_changed)
    kopf.on.event("v1", "pods", registry=registry, id="pod_changed",
                  labels={JOB_LABEL: kopf.PRESENT})(pod_changed)
    if backend.kind != "Job":  # the job backend's watch above sees pre-flight Jobs too
        kopf.on.event("batch", "v1", "jobs", registry=registry, id="preflight_changed",
                      labels={JOB_LABEL: kopf.PRESENT, ROLE_LABEL: PREFLIGHT_ROLE}
                      )(child_changed)
    sweeps.register(registry)  # FineTuneSweeps and their trials (kubetune_operator.sweeps)
    return registry


def _backend_at_import() -> Backend:
    """The backend the environment names (what ``configure`` reads again at startup; a
    wrong name is its PermanentError, so the default here)."""
    try:
        return backend_named(os.environ.get("KUBETUNE_BACKEND") or OperatorConfig.backend)
    except ValueError:
        return backend_named(OperatorConfig.backend)


register(kopf.get_default_registry(), _backend_at_import())
