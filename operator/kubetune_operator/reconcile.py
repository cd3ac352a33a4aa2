"""Level-triggered reconcile: observe → act → compute status. All Kubernetes I/O lives here.

``Kube`` wraps the (sync) kubernetes client; kopf runs the sync handlers in threads. The
reconcile never makes a second child: names are deterministic and creation is
create-or-adopt (409 → read back), so a crash or restart at any point converges.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.v1alpha1 import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    CheckResult,
    FineTuneJob,
    FineTuneJobStatus,
    Serving,
    gate_verdict,
)

from kubetune_operator import builders, serving
from kubetune_operator.apiserver import ApiServer
from kubetune_operator.backends import Backend, all_backends, backend_named
from kubetune_operator.builders import (
    JOB_LABEL,
    KUEUE_GROUP,
    KUEUE_JOB_UID_LABEL,
    KUEUE_QUEUE_LABEL,
    KUEUE_VERSION,
    SPEC_HASH,
    SUSPEND_APPLIED,
    OperatorConfig,
)
from kubetune_operator.discovery import Need, Served, backend_need, kueue_need
from kubetune_operator.status import (
    TERMINAL,
    Observed,
    pod_rejection,
    reduce,
    serving_settled,
    was_invalid,
    with_serving,
)
from kubetune_operator.validation import validate

log = logging.getLogger("kubetune.reconcile")

def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    """An API server's refusal on the asyncio path (``status`` as ApiException has it; 0 when
    the server could not be reached)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status


class Kube:
    """The only place that talks to the API server."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        # Custom objects through the typed client; built-in kinds (ConfigMap, Service,
        # Deployment, Pod) as raw requests through the same ApiClient: the typed CoreV1Api
        # and AppsV1Api build a validator for each of their hundreds of methods on first use
        # (24 MiB of the operator's memory for the five calls made here).
        self.custom = client.CustomObjectsApi(api_client)
        self._api = api_client
        self._exc = client.exceptions.ApiException
        self._conf = api_client.configuration
        self._agent = api_client.user_agent  # the same on both paths (audit logs, tests)
        self._session: Any = None  # aiohttp, for the progress hot path (patch_status_async)
        self._auth: tuple[float, dict[str, str]] = (-1e9, {})

    def _missing(self, err: Exception) -> bool:
        return isinstance(err, self._exc) and err.status == 404

    def _raw(self, method: str, path: str, body: Any = None,
             query: list[tuple[str, str]] | None = None,
             content_type: str = "application/json") -> Any:
        """One request through the synchronous client (its pool, TLS and credentials), the
        answer as the API's own JSON; ApiException as the typed calls raise it."""
        api = self._api
        method, url, headers, body, _ = api.param_serialize(
            method, path, query_params=query, body=body, auth_settings=["BearerToken"],
            header_params={"Accept": "application/json", "Content-Type": content_type})
        resp = api.call_api(method, url, header_params=headers, body=body)
        resp.read()  # to the end: the connection goes back to the pool
        if not 200 <= resp.status <= 299:
            raise self._exc.from_response(http_resp=resp, body=resp.data.decode(errors="replace"),
                                          data=None)
        return json.loads(resp.data) if resp.data else None

    @staticmethod
    def _builtin_path(kind: str, ns: str, name: str | None = None) -> str | None:
        """The path of a built-in kind's objects (ConfigMap, Secret, Service, Deployment)."""
        plural = {"ConfigMap": "configmaps", "Secret": "secrets", "Service": "services",
                  "Deployment": "deployments"}.get(kind)
        if plural is None:
            return None
        base = "/apis/apps/v1" if kind == "Deployment" else "/api/v1"
        return f"{base}/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")

    def server(self) -> ApiServer:
        """What the API server can do, from its version (``GET /version``: every
        authenticated client may read it). Read once, at startup."""
        return ApiServer.from_version(self._raw("GET", "/version") or {})

    def served_resources(self, api_version: str) -> frozenset[str] | None:
        """The resources (plurals) the API server serves in ``api_version`` (discovery:
        ``GET /apis/<group>/<version>``, readable by every authenticated client); None when
        it answers 404: no such group/version here (its CRD is not installed)."""
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        try:
            answer = self._raw("GET", path) or {}
        except self._exc as err:
            if self._missing(err):
                return None
            raise
        return frozenset(r["name"] for r in answer.get("resources") or []
                         if "/" not in r.get("name", "/"))

    def get(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        try:
            if path := self._builtin_path(obj["kind"], ns, name):
                return self._raw("GET", path)
            group, version = obj["apiVersion"].split("/")
            return self.custom.get_namespaced_custom_object(
                group, version, ns, _plural(obj["kind"]), name)
        except self._exc as err:
            if self._missing(err):
                return None
            raise

    def create(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create, or return what is already there (never a second one)."""
        ns = obj["metadata"]["namespace"]
        try:
            if path := self._builtin_path(obj["kind"], ns):
                self._raw("POST", path, obj)
                return obj, True
            group, version = obj["apiVersion"].split("/")
            made = self.custom.create_namespaced_custom_object(
                group, version, ns, _plural(obj["kind"]), obj)
            return made or obj, True  # (an emulator answering 200 instead of 201 gives None)
        except self._exc as err:
            if err.status == 409:
                existing = self.get(obj)
                if existing is not None:
                    return existing, False
            raise

    def delete(self, kind: str, ns: str, name: str) -> bool:
        """Delete an object of ours (built-in, or a KServe InferenceService); False if it was
        not there (or, for an InferenceService, its CRD is not installed)."""
        try:
            if kind == serving.KSERVE_KIND:
                group, version = serving.KSERVE_API.split("/")
                self.custom.delete_namespaced_custom_object(
                    group, version, ns, serving.KSERVE_PLURAL, name)
            else:
                self._raw("DELETE", self._builtin_path(kind, ns, name))
        except self._exc as err:
            if self._missing(err):
                return False
            raise
        return True

    def patch_builtin(self, kind: str, ns: str, name: str, patch: dict[str, Any]) -> None:
        """Merge-patch a built-in object of ours (the progress CA's ConfigMap, the operator's
        certificate Secret); with ``metadata.resourceVersion`` in the patch, only if it has
        not changed since (409 otherwise). The answer is not kept (it may hold a key)."""
        self._raw("PATCH", self._builtin_path(kind, ns, name), patch,
                  content_type="application/merge-patch+json")

    def patch_child(self, backend: Backend, ns: str, name: str, patch: dict[str, Any]
                    ) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(
            backend.group, backend.version, ns, backend.plural, name, patch)

    def workload(self, ns: str, owner_uid: str) -> dict[str, Any] | None:
        """The Kueue Workload of a PyTorchJob (Kueue labels it with the job's uid); None
        without Kueue, or before Kueue made it."""
        try:
            resp = self.custom.list_namespaced_custom_object(
                KUEUE_GROUP, KUEUE_VERSION, ns, "workloads",
                label_selector=f"{KUEUE_JOB_UID_LABEL}={owner_uid}")
        except self._exc as err:
            if err.status == 403:
                log.warning("not allowed to list Kueue Workloads in %s (RBAC): a queued job's "
                            "reason and spec.suspend through Kueue need list/patch", ns)
            if err.status in (403, 404):  # Kueue not installed (or not ours to read)
                return None
            raise
        for item in resp.get("items") or []:
            refs = (item.get("metadata") or {}).get("ownerReferences") or []
            if any(r.get("uid") == owner_uid for r in refs):
                return item
        return None

    def patch_workload(self, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, ns, "workloads", name, patch)

    def pods(self, ns: str, job: str) -> list[dict[str, Any]]:
        # Raw JSON: the API's own field names, and no client-side model to trip over.
        resp = self._raw("GET", f"/api/v1/namespaces/{ns}/pods",
                         query=[("labelSelector", f"{JOB_LABEL}={job}")])
        items = (resp or {}).get("items") or []
        # Filter here too: selectors are the API server's job, but cheap to double-check.
        return [p for p in items if (p.get("metadata", {}).get("labels") or {}).get(
            JOB_LABEL) == job]

    def warnings(self, ns: str) -> list[dict[str, Any]]:
        """The namespace's Warning Events (where controllers say the API server refused a
        pod); none when the operator may not list Events (an older chart's RBAC)."""
        try:
            resp = self._raw("GET", f"/api/v1/namespaces/{ns}/events",
                             query=[("fieldSelector", "type=Warning")])
        except self._exc as err:
            if err.status != 403:
                raise
            log.warning("not allowed to list Events in %s (RBAC): a refused pod's reason "
                        "needs events list", ns)
            return []
        return [e for e in (resp or {}).get("items") or [] if e.get("type") == "Warning"]

    def patch_status(self, ns: str, name: str, status: dict[str, Any],
                     resource_version: str | None = None) -> None:
        """Merge-patch the status; with ``resource_version`` only if the job has not changed
        since it was read (409 otherwise)."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, PLURAL, name, body)

    async def patch_status_async(self, ns: str, name: str, status: dict[str, Any],
                                 resource_version: str | None = None) -> None:
        """The same merge patch on the event loop, with the same credentials: the progress
        flusher's hot path (hundreds a second at a thousand jobs; one thread per request, as
        the synchronous client needs, does not keep up). Raises ``ApiError`` with the status."""
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        await self._request_async(
            "PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}/{name}/status",
            body, content_type="application/merge-patch+json", answer=False)

    async def get_finetunejob_async(self, ns: str, name: str) -> dict[str, Any] | None:
        """``get_finetunejob`` on the event loop."""
        try:
            return await self._request_async(
                "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}/{name}")
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def token_review_async(self, token: str, audience: str) -> dict[str, Any]:
        """``token_review`` on the event loop (a thousand pods' first reports at once)."""
        return await self._request_async("POST", "/apis/authentication.k8s.io/v1/tokenreviews", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": {"name": f"kubetune-{uuid.uuid4().hex[:16]}"},
            "spec": {"token": token, "audiences": [audience]}}) or {}

    async def pod_async(self, ns: str, name: str) -> dict[str, Any] | None:
        """``pod`` on the event loop; None when there is no such pod."""
        try:
            return await self._request_async("GET", f"/api/v1/namespaces/{ns}/pods/{name}")
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def _request_async(self, method: str, path: str, body: Any = None, *,
                             content_type: str = "application/json", answer: bool = True
                             ) -> Any:
        """One API call on the event loop (the API server's own field names, no client
        models). The review's name is ignored by the API server; a unique one keeps emulators
        that store every create (kmock) from refusing the second review."""
        import aiohttp

        session = await self._async_session()
        headers = {"Content-Type": content_type, "Accept": "application/json",
                   "User-Agent": self._agent}
        headers.update(self._auth_headers())
        try:
            async with session.request(method, self._conf.host + path, json=body,
                                       headers=headers) as resp:
                if resp.status >= 300:
                    raise ApiError(resp.status, (await resp.text())[:500])
                if not answer:  # read to the end all the same: the connection is reused
                    await resp.read()
                    return None
                return await resp.json(content_type=None)
        except aiohttp.ClientError as err:
            raise ApiError(0, str(err)) from err

    AUTH_SECONDS = 10.0  # how long the client's auth headers are reused on the asyncio path

    def _auth_headers(self) -> dict[str, str]:
        """The client's own auth settings (a bearer token, refreshed when it rotates): the
        same credentials as every synchronous call. Asked again every few seconds, not per
        request: with a kubeconfig, the client reloads it on every ask."""
        at, headers = self._auth
        if time.monotonic() - at > self.AUTH_SECONDS:
            headers = {auth["key"]: auth["value"]
                       for auth in self._conf.auth_settings().values()
                       if auth.get("in") == "header" and auth.get("value")}
            self._auth = (time.monotonic(), headers)
        return headers

    async def _async_session(self) -> Any:
        import asyncio
        import ssl

        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is not None and self._session[0] is loop:
            return self._session[1]
        conf = self._conf
        tls: Any = False  # plain http (test servers); https below
        if conf.host.startswith("https"):
            tls = ssl.create_default_context(cafile=conf.ssl_ca_cert)
            if conf.cert_file:
                tls.load_cert_chain(conf.cert_file, conf.key_file)
            if not conf.verify_ssl:
                tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, ssl=tls),
                                        timeout=aiohttp.ClientTimeout(total=30))
        self._session = (loop, session)
        return session

    async def close_async(self) -> None:
        if self._session is not None:
            await self._session[1].close()
            self._session = None

    async def create_async(self, obj: dict[str, Any]) -> bool:
        """``create`` on the event loop: True when made, False when one of that name is
        already there (409: nothing is read back here)."""
        ns = obj["metadata"]["namespace"]
        if obj["kind"] in ("ConfigMap", "Service"):
            path = f"/api/v1/namespaces/{ns}/{obj['kind'].lower()}s"
        else:
            prefix = "/apis/" + obj["apiVersion"]
            path = f"{prefix}/namespaces/{ns}/{_plural(obj['kind'])}"
        try:
            await self._request_async("POST", path, obj, answer=False)
        except ApiError as err:
            if err.status == 409:
                return False
            raise
        return True

    def get_finetunejob(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, name)
        except self._exc as err:
            if self._missing(err):
                return None
            raise


def _plural(kind: str) -> str:
    if kind == KIND:
        return PLURAL
    if kind == serving.KSERVE_KIND:
        return serving.KSERVE_PLURAL
    return next(b.plural for b in all_backends() if b.kind == kind)


# ------------------------------------------------------------------------ reconcile


@dataclass
class Outcome:
    status: FineTuneJobStatus  # typed; dumped once, at the patch
    created: list[str]
    phase_changed: bool
    settled: bool = False  # nothing left to watch for: finished, and served and checked
    missing: Need | None = None  # a kind it needs that the API server does not serve
    wake: list[str] = field(default_factory=list)  # jobs to converge next (same namespace)


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
              served: Served | None = None, ca: Any = None) -> Outcome:
    """Converge one FineTuneJob; returns the status it should have (patch only if changed).
    ``server``: what the API server can do (read once at startup); ``served``: which kinds
    it serves (None: not checked); ``ca``: the progress CA's publisher
    (``progress_tls.CaPublisher``; None: pods need none from the operator)."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    old = body.get("status") or {}
    labels = meta.get("labels") or {}
    backend = backend_named(config.backend)
    job, invalid = validate(body, backend, server, _queued(labels, config))
    waiting: str | None = None
    if job is not None and (job.spec.model.from_job
                            or any(r.from_job for r in job.spec.rewards or [])):
        job, waiting, invalid = _from_job(kube, ns, name, job)
    unfit = memory_refusal(job, config) if job is not None else None
    created: list[str] = []
    blocked: str | None = None
    drift: str | None = None
    child = None
    workload: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = []
    missing: Need | None = None
    if job is not None and served is not None and (
            old.get("phase") not in TERMINAL or was_invalid(old)):
        # A kind it needs is not served: nothing is made (no ConfigMap without its child).
        # (Kueue only before the child is made: a child it already admitted runs on.)
        wanted = needs(backend, labels, config, kueue=old.get("phase") in (None, "Pending"))
        missing = next((n for n in wanted if served.missing(n)), None)
    if job is not None and missing is None:
        objs = builders.children(job=job, config=config, uid=meta.get("uid"), labels=labels,
                                 server=server)
        # A finished run's cleaned-up child stays gone; a spec that was invalid and is now
        # fixed never had children, so it gets them.
        finished = old.get("phase") in TERMINAL and not was_invalid(old)
        fresh = not old  # never reconciled: create first (one call) instead of get first
        for obj in objs:
            obj["metadata"]["namespace"] = ns
        # Suspended before it ever ran: no children until resumed (nothing could start, e.g.
        # admitted by Kueue before its Workload is deactivated).
        if job.spec.suspend and not finished and (fresh or kube.get(objs[-1]) is None):
            objs = []
        # Would not fit its GPUs: nothing is created (a child made earlier runs on).
        if unfit and objs and not finished and (fresh or kube.get(objs[-1]) is None):
            objs = []
        else:
            unfit = None
        if ca is not None and objs and not finished:
            ca.ensure(ns)  # the CA the pods mount, there before their child (and kept there)
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
                    created.append(f"{obj['kind']}/{name}")
            if current is not None and not _owned_by(current, meta.get("uid")):
                # Same name, someone else's (e.g. a deleted job's child awaiting garbage
                # collection): never adopt it; the re-check retries once it is gone.
                blocked = (f"a {obj['kind']} named {obj['metadata']['name']!r} already exists "
                           "and belongs to another object; waiting for it to go")
                child = None
                break
            if obj["kind"] == backend.kind:
                child = current
        if child is not None:
            rendered = (child.get("metadata", {}).get("annotations") or {}).get(SPEC_HASH)
            if rendered and rendered != builders.spec_hash(job):
                drift = (f"the spec changed after the {backend.kind} was made; only suspend "
                         "applies to a job in flight: create a new FineTuneJob for other changes")
            queued = KUEUE_QUEUE_LABEL in (child.get("metadata", {}).get("labels") or {})
            cannot = backend.suspend_problem(server)
            applied = (child.get("metadata", {}).get("annotations") or {}).get(SUSPEND_APPLIED)
            if cannot and applied != str(job.spec.suspend).lower():
                # Said in a condition; the running object is left as it is.
                drift = f"{drift}; {cannot}" if drift else cannot
            else:
                child, workload = _apply_suspend(kube, backend, ns, name, child,
                                                 job.spec.suspend, queued)
            # Kueue makes the Workload after the child: none to look for in the same pass.
            just_made = f"{backend.kind}/{name}" in created
            if queued and workload is None and backend.suspend_flag(child) and not just_made:
                workload = kube.workload(ns, child["metadata"].get("uid", ""))  # why it waits
            if child.get("status"):  # no status yet: the training operator made no pods yet
                pods = kube.pods(ns, name)
                stop = backend.stop_patch(child, pods, server)
                if stop is not None:  # a permanent failure the server cannot see: no retries
                    log.info("%s/%s: stopping the %s: %s", ns, name, backend.kind, stop)
                    child = kube.patch_child(backend, ns, name, stop)
                mirrored = backend.state(child).trainer_status
                if mirrored and config.trainer_status:  # Kubeflow's KEP-2779 endpoint
                    from kubetune_operator.reporting import from_trainer_status

                    progress = {**(progress or {}), **from_trainer_status(mirrored)}
    return _conclude(kube, config, body, job, backend, created, waiting=waiting,
                     invalid=invalid, unfit=unfit, blocked=blocked, drift=drift, child=child,
                     workload=workload, pods=pods, progress=progress, missing=missing,
                     served=served)


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
    if job is None or job.spec.suspend or job.spec.model.from_job or any(
            r.from_job for r in job.spec.rewards or []):
        return None
    if job.spec.resources.gpus_per_node and (job.spec.resources.gpu_memory
                                             or config.gpu_memory):
        return None  # the memory estimate may read the model's config.json (blocking I/O)
    if served is not None and not all(
            served.served(n) for n in needs(backend, meta.get("labels") or {}, config)):
        return None  # discovery is a blocking call
    ns, name = meta["namespace"], meta["name"]
    objs = builders.children(job=job, config=config, uid=meta.get("uid"),
                             labels=meta.get("labels") or {}, server=server)
    created: list[str] = []
    for obj in objs:
        obj["metadata"]["namespace"] = ns
        if not await kube.create_async(obj):
            return None  # already there (ours, or someone else's): the general path looks
        created.append(f"{obj['kind']}/{name}")
    return _conclude(kube, config, body, job, backend, created, child=objs[-1])


def _conclude(kube: Kube, config: OperatorConfig, body: dict[str, Any],
              job: FineTuneJob | None, backend: Backend, created: list[str], *,
              waiting: str | None = None, invalid: str | None = None, unfit: str | None = None,
              blocked: str | None = None, drift: str | None = None,
              child: dict[str, Any] | None = None, workload: dict[str, Any] | None = None,
              pods: list[dict[str, Any]] | None = None, progress: dict[str, Any] | None = None,
              missing: Need | None = None, served: Served | None = None) -> Outcome:
    """What was observed → the status the job should have."""
    meta = body["metadata"]
    old = body.get("status") or {}
    labels = meta.get("labels") or {}
    observed = Observed(
        waiting=waiting,
        generation=meta.get("generation"),
        spec_suspend=bool((body.get("spec") or {}).get("suspend")),
        queue_name=labels.get(KUEUE_QUEUE_LABEL) or config.default_queue,
        invalid=invalid,
        unfit=unfit,
        blocked=blocked,
        missing=(missing.reason, missing.message) if missing else None,
        drift=drift,
        keep_checkpoints=job.spec.training.save_total_limit if job else None,
        child=child,
        backend=backend,
        workload=workload,
        log_tail=config.failure_log_tail,
        pods=pods or [],
        rejected=_pods_refused(kube, backend, meta["namespace"], child, pods),
        progress=progress,
    )
    status = reduce(observed, old, now())
    wake: list[str] = []
    if job is not None and (job.spec.serve or old.get("serving")):
        status = _serve(kube, config, job, meta, status, old, created, served, wake)
        if missing is None and served is not None and served.waiting(KSERVE_NEED.api_version) \
                and any(c.reason == KSERVE_NEED.reason for c in status.conditions):
            missing = KSERVE_NEED
    settled = status.phase in TERMINAL and (
        job is None or not job.spec.serve or status.phase != "Succeeded"
        or serving_settled(job, status))
    return Outcome(status, created, status.phase != old.get("phase"), settled, missing, wake)


KSERVE_NEED = Need(serving.KSERVE_API, serving.KSERVE_PLURAL, serving.KSERVE_KIND, "KServe",
                   "KServeUnavailable", "")  # (the message: _kserve_refused)


def _serve(kube: Kube, config: OperatorConfig, job: FineTuneJob, meta: dict[str, Any],
           status: FineTuneJobStatus, old: dict[str, Any], created: list[str],
           served: Served | None = None, wake: list[str] | None = None
           ) -> FineTuneJobStatus:
    """spec.serve: the server once the run succeeded and passed its gate (and the check once
    it is ready), and the shared endpoint moved to it once ready; gone when spec.serve is
    unset. ``wake``: gets the job the endpoint was moved from (its server goes when it is
    converged next)."""
    ns = meta["namespace"]
    name = serving.serve_name(job)
    was = old.get("conditions") or []
    if not job.spec.serve or status.phase != "Succeeded":
        if old.get("serving"):  # unset (or never succeeded): the server goes
            for kind in ("Deployment", "Service", serving.KSERVE_KIND):
                if kube.delete(kind, ns, name):
                    log.info("%s/%s: deleted %s/%s (spec.serve unset)", ns, meta["name"],
                             kind, name)
        return with_serving(status, None, meta.get("generation"), now(), was)
    if not config.serve_enabled:  # no RBAC for it: say so, and train all the same
        return with_serving(status, None, meta.get("generation"), now(), was, blocked=(
            "spec.serve: serving is turned off in this installation (the chart's "
            "serve.enabled)"), blocked_reason="ServingDisabled")
    if job.spec.serve.gate and not status.outputs:  # its metrics come with its outputs
        return with_serving(status, None, meta.get("generation"), now(), was, blocked=(
            "spec.serve.gate: the run has not reported its outputs and final metrics "
            "(status.outputs) yet"), blocked_reason="WaitingForOutput")
    gate = gate_verdict(job.spec.serve.gate, status.outputs.metrics if status.outputs else None)
    if not gate.passed:  # trained, not served: what was made for it goes (a gate added since)
        if old.get("serving"):
            for kind in ("Deployment", "Service", serving.KSERVE_KIND):
                if _delete_owned(kube, kind, ns, name, meta.get("uid")):
                    log.info("%s/%s: deleted %s/%s (%s)", ns, meta["name"], kind, name,
                             gate.message)
        return with_serving(status, None, meta.get("generation"), now(), was,
                            blocked=gate.message, blocked_reason=gate.reason or "GateNotMet")
    endpoint = job.spec.serve.endpoint if job.spec.serve.kind == "deployment" else None
    me = (meta["name"], meta.get("creationTimestamp") or "")
    shared = holder = None
    if endpoint:
        shared = kube.get({"apiVersion": "v1", "kind": "Service",
                           "metadata": {"namespace": ns, "name": endpoint}})
        holder = serving.endpoint_holder(shared)
        if shared is not None and holder is None:
            return with_serving(status, None, meta.get("generation"), now(), was, blocked=(
                f"spec.serve.endpoint: a Service named {endpoint!r} already exists and is not "
                "a kubetune endpoint"))
        if holder is not None and holder[0] != me[0] and serving.newer(holder, me):
            # A newer job passed its gate and holds the endpoint: this one's server goes.
            for kind in ("Deployment", "Service"):
                if _delete_owned(kube, kind, ns, name, meta.get("uid")):
                    log.info("%s/%s: deleted %s/%s (endpoint %s serves %s)", ns,
                             meta["name"], kind, name, endpoint, holder[0])
            return with_serving(status, None, meta.get("generation"), now(), was, blocked=(
                f"spec.serve.endpoint {endpoint!r} serves job {holder[0]}, created after "
                "this one, whose gate passed; this job's server is removed"),
                blocked_reason="Replaced")
    outputs = status.outputs.model_dump(by_alias=True, exclude_none=True) \
        if status.outputs else {}
    kserve = job.spec.serve.kind == "kserve"
    # The other kind's objects go (spec.serve.kind changed).
    for kind in (("Deployment", "Service") if kserve else (serving.KSERVE_KIND,)):
        if old.get("serving") and _delete_owned(kube, kind, ns, name, meta.get("uid")):
            log.info("%s/%s: deleted %s/%s (spec.serve.kind is %s)", ns, meta["name"], kind,
                     name, job.spec.serve.kind)
    if kserve and served is not None and served.missing(KSERVE_NEED):  # no request per job
        return with_serving(status, None, meta.get("generation"), now(), was,
                            blocked=_kserve_refused(404), blocked_reason=KSERVE_NEED.reason)
    if kserve:
        dep = serving.inference_service(job=job, config=config, outputs=outputs,
                                        uid=meta.get("uid"))
        wanted_objs = [dep] if dep is not None else []
    else:
        dep = serving.deployment(job=job, config=config, outputs=outputs, uid=meta.get("uid"))
        wanted_objs = ([serving.service(job=job, config=config, uid=meta.get("uid")), dep]
                       if dep is not None else [])
    current = None
    if dep is not None:
        for obj in wanted_objs:
            obj["metadata"]["namespace"] = ns
        try:
            for obj in wanted_objs:
                have = kube.get(obj)
                if have is not None and not _owned_by(have, meta.get("uid")):
                    return with_serving(
                        status, None, meta.get("generation"), now(), was, blocked=(
                            f"a {obj['kind']} named {name!r} already exists and belongs to "
                            "another object"))
                hash_ = obj["metadata"]["annotations"][serving.SERVE_HASH]
                if have is not None and (have["metadata"].get("annotations") or {}).get(
                        serving.SERVE_HASH) != hash_:
                    kube.delete(obj["kind"], ns, name)  # spec.serve changed: made anew
                    have = None
                if have is None:
                    have, made = kube.create(obj)
                    if made:
                        created.append(f"{obj['kind']}/{name}")
                current = have
        except Exception as err:  # KServe: its CRD is not installed, or not ours to use
            if not kserve or getattr(err, "status", None) not in (403, 404):
                raise
            return with_serving(status, None, meta.get("generation"), now(), was,
                                blocked=_kserve_refused(err.status),
                                blocked_reason="KServeUnavailable")
    if kserve:
        ready, address = serving.inference_service_state(current)
        ready = ready and bool(address)
        rejected = None
        # Until KServe says, the address it gives an InferenceService in the cluster.
        url = address or f"http://{name}.{ns}.svc.cluster.local/v1"
    else:
        ready = bool(((current or {}).get("status") or {}).get("availableReplicas"))
        rejected = None if ready else serving.replica_failure(current)
        url = serving.endpoint(job, config)
    holds = bool(endpoint) and holder is not None and holder[0] == me[0]
    if endpoint and ready and not holds:  # the new server is ready: the endpoint moves to it
        holds = _take_endpoint(kube, job, meta, shared, wake)
    before = old.get("serving") or {}
    checks = [CheckResult.model_validate(c) for c in before.get("checks") or []]
    wanted = [c.prompt for c in job.spec.serve.checks or []]
    if [c.prompt for c in checks] != wanted or before.get("url") != url:
        checks = []  # asked anew for these prompts
    problem = None
    if ready and wanted and not checks:
        try:
            checks = serving.run_checks(url, serving.model_name(job), job.spec.serve.checks)
        except serving.EndpointError as err:
            problem = str(err)
    served = Serving(url=url, model_name=serving.model_name(job),
                     weights=job.spec.serve.weights, ready=ready, checks=checks,
                     endpoint=serving.endpoint_url(job, config) if holds else None)
    return with_serving(status, served, meta.get("generation"), now(), was,
                        waiting=None if dep else "the run has not reported where its output "
                        "is (status.outputs)", check_error=problem, rejected=rejected,
                        gate=gate.message)


def _take_endpoint(kube: Kube, job: FineTuneJob, meta: dict[str, Any],
                   shared: dict[str, Any] | None, wake: list[str] | None) -> bool:
    """Point spec.serve.endpoint's Service at this job's (ready) server: made, or moved from
    the older job it served (only if unchanged since read: a 409 is retried), which is woken
    to remove its server. Whether it serves this job now."""
    ns = meta["namespace"]
    svc = serving.endpoint_service(job=job, uid=meta.get("uid"),
                                   created=meta.get("creationTimestamp") or "")
    if shared is None:
        have, made = kube.create(svc)  # one made meanwhile by another job: decided next time
        if made:
            log.info("%s/%s: made endpoint Service/%s", ns, meta["name"],
                     job.spec.serve.endpoint)
        return made or (serving.endpoint_holder(have) or ("",))[0] == meta["name"]
    before = serving.endpoint_holder(shared)
    patch: dict[str, Any] = {
        "metadata": {k: svc["metadata"][k] for k in ("annotations", "ownerReferences")
                     if k in svc["metadata"]},
        "spec": {"selector": svc["spec"]["selector"]}}
    if version := shared["metadata"].get("resourceVersion"):
        patch["metadata"]["resourceVersion"] = version
    kube.patch_builtin("Service", ns, job.spec.serve.endpoint, patch)
    log.info("%s/%s: endpoint Service/%s moved here from %s", ns, meta["name"],
             job.spec.serve.endpoint, before[0] if before else "?")
    if before and wake is not None:
        wake.append(before[0])
    return True


def _pods_refused(kube: Kube, backend: Backend, ns: str, child: dict[str, Any] | None,
                  pods: list[dict[str, Any]] | None) -> tuple[str, str] | None:
    """Why a child that has started (it has a status) still has no pod: the API server refused
    them, as its controller's Events say. Read only then."""
    if not child or not child.get("status") or pods:
        return None
    state = backend.state(child)
    if state.running or state.suspended or state.failed or state.succeeded is not None:
        return None
    return pod_rejection(kube.warnings(ns), backend, child["metadata"]["name"])


def _kserve_refused(code: int) -> str:
    if code == 404:
        return ("spec.serve.kind: kserve needs KServe's InferenceService CRD "
                f"({serving.KSERVE_API}), which is not installed in this cluster; install "
                "KServe, or use spec.serve.kind: deployment")
    return ("spec.serve.kind: kserve: the operator may not create InferenceServices "
            f"({serving.KSERVE_API}) here (RBAC: the chart's serve.kserve); or use "
            "spec.serve.kind: deployment")


def _delete_owned(kube: Kube, kind: str, ns: str, name: str, uid: str | None) -> bool:
    api = serving.KSERVE_API if kind == serving.KSERVE_KIND else (
        "apps/v1" if kind == "Deployment" else "v1")
    try:
        have = kube.get({"apiVersion": api, "kind": kind,
                         "metadata": {"namespace": ns, "name": name}})
    except Exception as err:  # no KServe here (or not ours to read): nothing of ours either
        if getattr(err, "status", None) in (403, 404):
            return False
        raise
    return have is not None and _owned_by(have, uid) and kube.delete(kind, ns, name)


# ------------------------------------------------------------------------ memory


def memory_verdict(job: FineTuneJob, config: OperatorConfig) -> Any:
    """The memory estimate against the job's GPUs (``kubetune.estimate.Verdict``; its
    ``fits`` is None when the GPU's memory is unknown), or None when the model's shape is
    unknown here (only an hf:// model's config.json is read)."""
    from kubetune.estimate import fits, gpu_memory_for

    shape = model_config(job.spec.model.source, job.spec.model.revision)
    if shape is None:
        return None
    try:
        return fits(shape, job.spec, gpu_memory_for(job.spec, dict(config.gpu_memory)))
    except ValueError as err:  # a config.json kubetune cannot read: no estimate, no refusal
        log.info("%s: memory not estimated (%s)", job.metadata.name, err)
        return None


def memory_refusal(job: FineTuneJob, config: OperatorConfig) -> str | None:
    """Why the job cannot fit its GPUs (the estimate, the numbers and the cheapest fixes), or
    None: it fits, or the GPU's memory or the model's shape is unknown here."""
    if not job.spec.resources.gpus_per_node:
        return None
    if not job.spec.resources.gpu_memory and not config.gpu_memory:
        return None  # nothing to compare with: no need to fetch the model's config
    verdict = memory_verdict(job, config)
    if verdict is None or verdict.fits is not False:
        return None
    return f"spec.resources: {verdict.message()}"


# (when fetched, the config.json or None, why it is None)
_CONFIGS: dict[tuple[str, str], tuple[float, dict[str, Any] | None, str | None]] = {}
CONFIG_TTL = 300.0  # seconds a fetched (or missing) config.json is reused


def model_config(source: str | None, revision: str | None) -> dict[str, Any] | None:
    """The config.json of an hf:// model, fetched alone from the Hub (HF_ENDPOINT) and
    cached; None for other sources (the operator does not mount volumes), gated or private
    models (the operator holds no token), offline (HF_HUB_OFFLINE) or any error."""
    import urllib.request

    if not source or not source.startswith("hf://") or os.environ.get("HF_HUB_OFFLINE") == "1":
        return None
    parts = source[len("hf://"):].split("/")
    repo, sub = "/".join(parts[:2]), "/".join(p for p in parts[2:] if p)
    key = (source, revision or "main")
    hit = _CONFIGS.get(key)
    if hit and time.monotonic() - hit[0] < CONFIG_TTL:
        return hit[1]
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/{repo}/resolve/{revision or 'main'}/{sub + '/' if sub else ''}config.json"
    shape: dict[str, Any] | None = None
    why = None
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (https or set)
            shape = json.loads(resp.read(1 << 20))
        if not isinstance(shape, dict):
            shape, why = None, f"{url} is not a JSON object"
    except (OSError, ValueError) as err:
        why = f"{url}: {err}"
        log.info("%s: config.json not read (%s): memory not checked", source, err)
    _CONFIGS[key] = (time.monotonic(), shape, why)
    return shape


def model_config_problem(source: str | None, revision: str | None) -> str | None:
    """Why ``model_config`` found no config.json for an hf:// model (the last fetch's error,
    or HF_HUB_OFFLINE), None when it did or never tried."""
    if source and source.startswith("hf://") and os.environ.get("HF_HUB_OFFLINE") == "1":
        return "HF_HUB_OFFLINE=1 (the Hub is not asked)"
    hit = _CONFIGS.get((source or "", revision or "main"))
    return hit[2] if hit else None


def _from_job(kube: Kube, ns: str, name: str, job: FineTuneJob
              ) -> tuple[FineTuneJob | None, str | None, str | None]:
    """spec.model.fromJob and rewards[].fromJob: (the job with those jobs' models as its
    sources, or None; why it waits; why it cannot run)."""
    from kubetune.pipeline import FIELD, cycle, upstream_model

    def read(other: str) -> dict[str, Any] | None:
        return kube.get({"apiVersion": API_VERSION, "kind": KIND,
                         "metadata": {"namespace": ns, "name": other}})

    def model_of(upstream: str, field: str) -> tuple[str | None, str | None, str | None]:
        other = read(upstream)
        if other is None:
            return None, None, f"{field}: there is no FineTuneJob {upstream!r} in namespace " \
                f"{ns!r}"
        status = other.get("status") or {}
        model, waiting, problem = upstream_model(upstream, status.get("phase"),
                                                 status.get("outputs"))
        return model, waiting, problem and problem.replace(FIELD, field, 1)

    spec = job.spec
    if spec.model.from_job:
        loop = cycle(name, lambda n: spec.model.from_job if n == name else (
            ((read(n) or {}).get("spec") or {}).get("model") or {}).get("fromJob"))
        if loop:
            return None, None, f"{FIELD}: the jobs start from each other: {' → '.join(loop)}"
        model, waiting, problem = model_of(spec.model.from_job, FIELD)
        if model is None:
            return None, waiting, problem
        spec = spec.model_copy(update={"model": spec.model.model_copy(
            update={"source": model, "from_job": None})})
    rewards = list(spec.rewards or [])
    for i, reward in enumerate(rewards):
        if reward.from_job:
            field = f"spec.rewards[{i}].fromJob"
            if reward.from_job == name:
                return None, None, f"{field}: a job cannot score itself"
            model, waiting, problem = model_of(reward.from_job, field)
            if model is None:
                return None, waiting, problem
            rewards[i] = reward.model_copy(update={"source": model, "from_job": None})
    if spec.rewards:
        spec = spec.model_copy(update={"rewards": rewards})
    return job.model_copy(update={"spec": spec}), None, None


def _merged(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _queued(labels: dict[str, str], config: OperatorConfig) -> bool:
    """The job goes through a Kueue queue: its own label, or the operator's default."""
    return KUEUE_QUEUE_LABEL in builders.kueue_labels(labels, config)


def _owned_by(obj: dict[str, Any], uid: str | None) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return uid is None or any(r.get("uid") == uid for r in refs)


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
        return kube.patch_child(backend, ns, name,
                                _merged(note, backend.suspend_patch(want))), None
    workload = kube.workload(ns, child["metadata"].get("uid", ""))
    if workload is None:  # Kueue has not made it yet: the next re-check tries again
        return child, None
    if (workload.get("spec") or {}).get("active", True) == want:
        workload = kube.patch_workload(ns, workload["metadata"]["name"],
                                       {"spec": {"active": not want}})
        log.info("%s/%s: spec.suspend=%s applied to Kueue Workload %s (spec.active)", ns, name,
                 wanted, workload["metadata"]["name"])
    return kube.patch_child(backend, ns, name, note), workload
