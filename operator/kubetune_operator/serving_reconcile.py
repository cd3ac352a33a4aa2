"""spec.serve converged: the server (a Deployment and Service, or a KServe InferenceService)
once the run succeeded and passed its gate, the checks once it is ready, the shared endpoint
moved to it; gone when spec.serve is unset or the gate is missed. The objects themselves are
built in ``serving``.
"""

from __future__ import annotations

import logging
from typing import Any

from kubetune.api.v1alpha1 import CheckResult, FineTuneJob, FineTuneJobStatus, Serving, gate_verdict

from kubetune_operator import serving
from kubetune_operator.discovery import Need, Served
from kubetune_operator.kube import Kube, now, owned_by, ref
from kubetune_operator.settings import OperatorConfig
from kubetune_operator.status import with_serving

log = logging.getLogger("kubetune.serving")

# The kinds a server is made of, and their API versions.
API_OF = {"Deployment": "apps/v1", "Service": "v1", serving.KSERVE_KIND: serving.KSERVE_API}


KSERVE_NEED = Need(serving.KSERVE_API, serving.KSERVE_PLURAL, serving.KSERVE_KIND, "KServe",
                   "KServeUnavailable", "")  # (the message: _kserve_refused)


def converge(kube: Kube, config: OperatorConfig, job: FineTuneJob, meta: dict[str, Any],
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
                if kube.delete(API_OF[kind], kind, ns, name):
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
        shared = kube.get(ref("v1", "Service", ns, endpoint))
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
                if have is not None and not owned_by(have, meta.get("uid")):
                    return with_serving(
                        status, None, meta.get("generation"), now(), was, blocked=(
                            f"a {obj['kind']} named {name!r} already exists and belongs to "
                            "another object"))
                hash_ = obj["metadata"]["annotations"][serving.SERVE_HASH]
                if have is not None and (have["metadata"].get("annotations") or {}).get(
                        serving.SERVE_HASH) != hash_:
                    kube.delete(obj["apiVersion"], obj["kind"], ns, name)  # made anew
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
    kube.patch("v1", "Service", ns, job.spec.serve.endpoint, patch)
    log.info("%s/%s: endpoint Service/%s moved here from %s", ns, meta["name"],
             job.spec.serve.endpoint, before[0] if before else "?")
    if before and wake is not None:
        wake.append(before[0])
    return True


def _kserve_refused(code: int) -> str:
    if code == 404:
        return ("spec.serve.kind: kserve needs KServe's InferenceService CRD "
                f"({serving.KSERVE_API}), which is not installed in this cluster; install "
                "KServe, or use spec.serve.kind: deployment")
    return ("spec.serve.kind: kserve: the operator may not create InferenceServices "
            f"({serving.KSERVE_API}) here (RBAC: the chart's serve.kserve); or use "
            "spec.serve.kind: deployment")


def _delete_owned(kube: Kube, kind: str, ns: str, name: str, uid: str | None) -> bool:
    try:
        have = kube.get(ref(API_OF[kind], kind, ns, name))
    except Exception as err:  # no KServe here (or not ours to read): nothing of ours either
        if getattr(err, "status", None) in (403, 404):
            return False
        raise
    return have is not None and owned_by(have, uid) and kube.delete(API_OF[kind], kind, ns, name)
