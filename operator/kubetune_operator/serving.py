"""Serve after train (spec.serve): the server's objects (pure builders), the OpenAI-compatible
chat call, and the post-training check. vLLM's OpenAI-compatible server by default.

The server reads what the run wrote from the same volume claim (read-only): the merged or
whole model, or the base model plus the LoRA adapter (``--enable-lora --lora-modules``).

``spec.serve.kind``: ``deployment`` (a Deployment and a Service) or ``kserve`` (a KServe
InferenceService whose predictor is the same server container, ``kserve-container``; KServe
makes the Service and, in its Serverless mode, the route; its status gives the URL).
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from typing import Any

from kubetune.api.v1alpha1 import CheckResult, FineTuneJob

from kubetune_operator.builders import (
    JOB_LABEL,
    PVC_ROOT,
    RUNTIME_DEFAULT,
    _labels,
    container_security,
    owner_reference,
    run_as,
)
from kubetune_operator.settings import OperatorConfig

PORT = 8000
KSERVE_API = "serving.kserve.io/v1beta1"
KSERVE_KIND = "InferenceService"
KSERVE_PLURAL = "inferenceservices"
SERVE_HASH = "kubetune.io/serve-hash"
ANSWER_CHARS = 500


def serve_name(job: FineTuneJob) -> str:
    return f"{job.metadata.name}-serve"


def model_name(job: FineTuneJob) -> str:
    serve = job.spec.serve
    return (serve.model_name if serve and serve.model_name else None) or job.metadata.name


def endpoint(job: FineTuneJob, config: OperatorConfig) -> str:
    ns = job.metadata.namespace or "default"
    return config.serve_url.format(name=serve_name(job), namespace=ns, port=PORT)


def serve_hash(job: FineTuneJob, config: OperatorConfig) -> str:
    # kind only when not the default: a Deployment made before the field existed is kept;
    # so is who the server runs as (a server made before it ran as its image's user).
    # Nor the gate: it decides whether to serve, not what (a server made before it stays).
    # Nor the endpoint: it names the shared Service, not the server.
    exclude = {"checks", "security_context", "gate", "endpoint"} | (
        {"kind"} if job.spec.serve.kind == "deployment" else set())
    serve = job.spec.serve.model_dump(mode="json", by_alias=True, exclude=exclude)
    parts: list[Any] = [serve, config.serve_image, list(config.serve_args)]
    if server_run_as(job, config) != (OperatorConfig.serve_run_as_user,
                                      OperatorConfig.serve_run_as_group, True):
        parts.append(list(server_run_as(job, config)))
    raw = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def server_run_as(job: FineTuneJob, config: OperatorConfig) -> tuple[int, int, bool]:
    """(uid, gid, read-only root) of the server: spec.serve.securityContext over the
    operator's serve_run_as_user/group."""
    return run_as(job.spec.serve.security_context, config.serve_run_as_user,
                  config.serve_run_as_group)


def _path(uri: str) -> tuple[str, str | None]:
    """Where the server finds ``uri``: (path or hub id, volume claim to mount or None)."""
    if uri.startswith("pvc://"):
        claim = uri[6:].split("/", 1)[0]
        return f"{PVC_ROOT}/{uri[6:]}", claim
    if uri.startswith("hf://"):
        return uri[5:], None
    return uri, None


def what_to_serve(job: FineTuneJob, outputs: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(server arguments naming the weights, claims to mount); empty arguments while the run
    has not said where its output is."""
    serve, name = job.spec.serve, model_name(job)
    if serve.weights == "adapter":
        adapter = outputs.get("adapter")
        base = job.spec.model.source
        if not adapter or not base:
            return [], []
        base_path, base_claim = _path(base)
        adapter_path, claim = _path(adapter)
        claims = [c for c in (base_claim, claim) if c]
        return (["--model", base_path, "--enable-lora", "--lora-modules",
                 f"{name}={adapter_path}"], claims)
    model = outputs.get("mergedModel") or outputs.get("model")
    if not model:
        return [], []
    path, claim = _path(model)
    return ["--model", path, "--served-model-name", name], [claim] if claim else []


def _metadata(job: FineTuneJob, uid: str | None, hash_: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": serve_name(job),
                            "labels": {**_labels(job), "kubetune.io/role": "serve"},
                            "annotations": {SERVE_HASH: hash_}}
    if job.metadata.namespace:
        meta["namespace"] = job.metadata.namespace
    if uid:
        meta["ownerReferences"] = [owner_reference(name=job.metadata.name, uid=uid)]
    return meta


def _server_pod(job: FineTuneJob, config: OperatorConfig, weights: list[str],
                claims: list[str], *, container_name: str, named_port: bool
                ) -> dict[str, Any]:
    """The server's pod spec (a Deployment's template, or a KServe predictor's)."""
    serve = job.spec.serve
    uid, gid, read_only = server_run_as(job, config)
    amounts: dict[str, str] = {}
    if serve.gpus:
        amounts["nvidia.com/gpu"] = str(serve.gpus)
    if serve.memory:
        amounts["memory"] = serve.memory
    # Not root, read-only root filesystem: HOME (vLLM's, Triton's and Inductor's caches under
    # ~/.cache) on the /tmp emptyDir, and a user name for getpass.getuser() (torch calls it
    # at import; a uid with no /etc/passwd entry has none).
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": "/tmp/hf"},
                                 {"name": "HOME", "value": "/tmp"},
                                 {"name": "USER", "value": "kubetune"}]
    if job.spec.model.secret_ref and serve.weights == "adapter":
        ref = job.spec.model.secret_ref
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name,
                                                                       "key": ref.key}}})
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "scratch", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"},
                                    {"name": "scratch", "mountPath": "/tmp"}]
    for i, claim in enumerate(sorted(set(claims))):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {
            "claimName": claim, "readOnly": True}})
        mounts.append({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}",
                       "readOnly": True})
    # Knative (KServe's Serverless mode) takes one unnamed port, probed by number.
    port: dict[str, Any] = {"containerPort": PORT, "protocol": "TCP"}
    if named_port:
        port = {"name": "http", **port}
    container: dict[str, Any] = {
        "name": container_name,
        "image": serve.image or config.serve_image,
        "args": [*weights, "--port", str(PORT), *config.serve_args, *(serve.args or [])],
        "env": env,
        "ports": [port],
        "readinessProbe": {"httpGet": {"path": "/health",
                                       "port": "http" if named_port else PORT},
                           "initialDelaySeconds": 10, "periodSeconds": 10,
                           "failureThreshold": 60},
        "volumeMounts": mounts,
        # Pod Security "restricted", all on the container: Knative (KServe's Serverless
        # mode) takes these there and only some pod-level ones behind a feature flag. The
        # claims are read-only: no fsGroup to apply.
        "securityContext": {**container_security(read_only), "runAsNonRoot": True,
                            "runAsUser": uid, "runAsGroup": gid,
                            "seccompProfile": dict(RUNTIME_DEFAULT)},
    }
    if amounts:
        container["resources"] = {"requests": dict(amounts), "limits": dict(amounts)}
    pod: dict[str, Any] = {"containers": [container], "volumes": volumes}
    sched = job.spec.scheduling
    if sched and sched.node_selector:
        pod["nodeSelector"] = dict(sched.node_selector)
    if sched and sched.tolerations:
        pod["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True)
                              for t in sched.tolerations]
    return pod


def deployment(*, job: FineTuneJob, config: OperatorConfig, outputs: dict[str, Any],
               uid: str | None = None) -> dict[str, Any] | None:
    """The server's Deployment, or None while there is nothing to serve yet."""
    weights, claims = what_to_serve(job, outputs)
    if not weights:
        return None
    selector = {JOB_LABEL: job.metadata.name, "kubetune.io/role": "serve"}
    pod = _server_pod(job, config, weights, claims, container_name="server", named_port=True)
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(job, uid, serve_hash(job, config)),
            "spec": {"replicas": 1, "selector": {"matchLabels": selector},
                     "template": {"metadata": {"labels": {**_labels(job), **selector}},
                                  "spec": pod}}}


def inference_service(*, job: FineTuneJob, config: OperatorConfig, outputs: dict[str, Any],
                      uid: str | None = None) -> dict[str, Any] | None:
    """spec.serve.kind kserve: a KServe InferenceService whose predictor is the server
    container (KServe's custom-container predictor), one replica; None while there is
    nothing to serve yet."""
    weights, claims = what_to_serve(job, outputs)
    if not weights:
        return None
    pod = _server_pod(job, config, weights, claims, container_name="kserve-container",
                      named_port=False)
    return {"apiVersion": KSERVE_API, "kind": KSERVE_KIND,
            "metadata": _metadata(job, uid, serve_hash(job, config)),
            "spec": {"predictor": {"minReplicas": 1, "maxReplicas": 1, **pod}}}


# The shared endpoint (spec.serve.endpoint): a Service whose selector names the job it serves.
ENDPOINT_JOB = "kubetune.io/endpoint-job"  # the job it serves now
ENDPOINT_CREATED = "kubetune.io/endpoint-job-created"  # that job's creationTimestamp


def endpoint_url(job: FineTuneJob, config: OperatorConfig) -> str | None:
    """The shared endpoint's URL (spec.serve.endpoint), or None without one."""
    name = job.spec.serve.endpoint
    if not name:
        return None
    return config.serve_url.format(name=name, namespace=job.metadata.namespace or "default",
                                   port=PORT)


def endpoint_service(*, job: FineTuneJob, uid: str | None, created: str) -> dict[str, Any]:
    """The shared endpoint's Service, serving ``job``'s server (owned by it: it goes with the
    job that serves it)."""
    meta: dict[str, Any] = {
        "name": job.spec.serve.endpoint, "namespace": job.metadata.namespace,
        "labels": {**{k: v for k, v in _labels(job).items() if k != JOB_LABEL},
                   "kubetune.io/role": "endpoint"},
        "annotations": {ENDPOINT_JOB: job.metadata.name, ENDPOINT_CREATED: created}}
    if uid:
        meta["ownerReferences"] = [owner_reference(name=job.metadata.name, uid=uid)]
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {"selector": {JOB_LABEL: job.metadata.name, "kubetune.io/role": "serve"},
                     "ports": [{"name": "http", "port": PORT, "targetPort": "http",
                                "protocol": "TCP"}]}}


def endpoint_holder(svc: dict[str, Any] | None) -> tuple[str, str] | None:
    """(job, its creationTimestamp) the shared endpoint serves now; None when there is no such
    Service or it is not a kubetune endpoint."""
    notes = ((svc or {}).get("metadata") or {}).get("annotations") or {}
    if ENDPOINT_JOB not in notes:
        return None
    return notes[ENDPOINT_JOB], notes.get(ENDPOINT_CREATED) or ""


def newer(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Job ``a`` ((name, creationTimestamp)) came after ``b``: by creation time (RFC 3339 in
    UTC: ordered as text), then by name."""
    return (a[1], a[0]) > (b[1], b[0])


def replica_failure(obj: dict[str, Any] | None) -> str | None:
    """Why the server's pods cannot be created (the API server refused them: Pod Security,
    an admission webhook, a quota), from its Deployment's ReplicaFailure condition, which the
    Deployment controller copies from its ReplicaSet."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == "ReplicaFailure" and \
                c.get("status") == "True":
            return f"the API server refused the server's pods: {c.get('message') or ''}"
    return None


def inference_service_state(obj: dict[str, Any] | None) -> tuple[bool, str | None]:
    """(Ready, the OpenAI-compatible base URL) from an InferenceService's status: its
    in-cluster address (status.address.url) first, else status.url, plus ``/v1``."""
    status = (obj or {}).get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or [] if isinstance(c, dict))
    base = ((status.get("address") or {}).get("url") or status.get("url") or "").rstrip("/")
    return ready, f"{base}/v1" if base else None


def service(*, job: FineTuneJob, config: OperatorConfig, uid: str | None = None
            ) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(job, uid, serve_hash(job, config)),
            "spec": {"selector": {JOB_LABEL: job.metadata.name, "kubetune.io/role": "serve"},
                     "ports": [{"name": "http", "port": PORT, "targetPort": "http",
                                "protocol": "TCP"}]}}


# ------------------------------------------------------------------ talking to the server


class EndpointError(Exception):
    """The server did not answer as an OpenAI-compatible one does."""


def chat(url: str, model: str | None, prompt: str, *, max_tokens: int = 128,
         timeout: float = 60.0) -> str:
    """One user turn to an OpenAI-compatible ``/chat/completions`` (greedy); the answer.
    ``model`` None: the first model the server lists."""
    base = url.rstrip("/")
    if model is None:
        models = _call(f"{base}/models", None, timeout).get("data") or []
        if not models or not isinstance(models[0], dict) or "id" not in models[0]:
            raise EndpointError(f"{base}/models lists no model")
        model = models[0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0}
    reply = _call(f"{base}/chat/completions", body, timeout)
    try:
        return reply["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"{base}/chat/completions answered without "
                            "choices[0].message.content") from None


def _call(url: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as err:
        raise EndpointError(f"{url}: HTTP {err.code}: {err.read()[:300].decode(errors='replace')}"
                            ) from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise EndpointError(f"{url}: {err}") from None


def run_checks(url: str, model: str, checks: list[Any]) -> list[CheckResult]:
    """Ask each check's prompt; an answer passes when it holds every expected substring
    (case-insensitive). Results as status.serving.checks."""
    results = []
    for check in checks:
        answer = chat(url, model, check.prompt)
        missing = [e for e in check.expect if e.lower() not in answer.lower()]
        results.append(CheckResult(prompt=check.prompt, passed=not missing,
                                   answer=answer[:ANSWER_CHARS], missing=missing))
    return results
