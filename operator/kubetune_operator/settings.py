"""The operator's settings: one object, read once from the environment at startup.

The chart sets these variables (values.yaml documents each); tests build ``OperatorConfig``
directly. Nothing else in the operator reads the environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("kubetune.operator")


@dataclass(frozen=True)
class OperatorConfig:
    """What the operator adds that is not in the job, and how it runs."""

    trainer_image: str = "ghcr.io/kubetune/trainer:0.1.0"
    # https://…/v1 ; None: pods report nothing to kubetune. The endpoint serves HTTPS unless
    # this URL names http:// (the one way to plain HTTP: asked for by name).
    progress_url: str | None = None
    # The user's ConfigMap with ca.crt, present in every job namespace; None: the operator
    # keeps its own there (builders.PROGRESS_CA_CONFIGMAP, progress_tls.CaPublisher).
    progress_ca_configmap: str | None = None
    default_priority_class: str | None = None  # for jobs that name none
    default_queue: str | None = None  # Kueue queue for jobs without the queue label
    failure_log_tail: bool = True  # status.failure.logTail (visible to the job's readers)
    # Trainer pods on the node's network (hostNetwork): for clusters whose fast interconnect
    # is only on the host, and for a node whose pods reach the operator on loopback (the e2e
    # suite's). Pod Security "baseline" and "restricted" refuse such pods: opt in by name.
    pod_host_network: bool = False
    # Pod Security "restricted" for every pod kubetune makes: never root. The trainer runs as
    # this uid and gid (the trainer image's USER 10001:10001), the gid also its fsGroup, so a
    # fresh volume claim is writable; a job's spec.trainer.securityContext may name others.
    pod_run_as_user: int = 10001
    pod_run_as_group: int = 10001
    # Memory of one GPU by product label value ("default": jobs that select none); a job's
    # resources.gpuMemory wins. Jobs whose estimate does not fit get no children.
    gpu_memory: tuple[tuple[str, str], ...] = ()
    # The training backend (backends/): "PyTorchJob" (Training Operator v1), "TrainJob"
    # (Kubeflow Trainer v2) or "Job" (batch/v1, no add-on); case-insensitive in the variable.
    backend: str = "PyTorchJob"
    training_runtime: str = "kubetune"  # TrainJob: the ClusterTrainingRuntime it refers to
    # The pre-flight pod for jobs whose spec.preflight is unset: auto (jobs that ask for
    # GPUs), always or skip.
    preflight: str = "auto"
    # The pre-flight pod's resources, (requests|limits, resource, quantity): CPU only and
    # small, it reads, tokenizes and estimates, streaming rows.
    preflight_resources: tuple[tuple[str, str, str], ...] = (
        ("requests", "cpu", "1"), ("requests", "memory", "2Gi"), ("limits", "memory", "8Gi"))
    # TrainJob: Kubeflow's TrainJobStatus gate is on, so Trainer v2 gives the pods its own
    # progress endpoint (KEP-2779) and kubetune mirrors status.trainerStatus instead.
    trainer_status: bool = False
    # Serving (spec.serve): allowed here (RBAC for Deployments and Services), the
    # OpenAI-compatible server's image and extra arguments.
    serve_enabled: bool = True
    serve_image: str = "vllm/vllm-openai:v0.11.0"
    serve_args: tuple[str, ...] = ()
    # The server's uid and gid (vLLM's image has no user of its own: any non-root uid works
    # with HOME and caches on the pod's /tmp); a job's spec.serve.securityContext may name
    # others.
    serve_run_as_user: int = 10001
    serve_run_as_group: int = 10001
    # Where the operator reaches a job's server (checks): the Service's cluster DNS name.
    serve_url: str = "http://{name}.{namespace}.svc:{port}/v1"
    # How the operator runs.
    recheck_seconds: float = 60.0
    # Handlers block on the API server (the client is synchronous), not on the CPU: enough
    # threads that a burst of new jobs is not queued behind a few round trips.
    workers: int = 64
    scanning: bool = True
    metrics_port: int | None = None
    progress_port: int | None = None
    progress_host: str = "0.0.0.0"
    # The user's certificate (a mounted cert-manager Secret): it wins, and its ca.crt
    # (progress_tls_ca) is what pods get. None: the operator's own CA and certificate, kept in
    # the Secret progress_cert_secret in operator_namespace (created, renewed before expiry).
    progress_tls_cert: str | None = None
    progress_tls_key: str | None = None
    progress_tls_ca: str | None = None
    progress_cert_secret: str = "kubetune-progress-tls"
    operator_namespace: str | None = None  # where that Secret lives (the operator's own)
    progress_flush_seconds: float = 2.0

    @property
    def progress_plain_http(self) -> bool:
        """Plain HTTP, asked for by name: the URL the pods get says http://."""
        return bool(self.progress_url) and self.progress_url.lower().startswith("http://")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        """From the KUBETUNE_* variables; a bad value fails startup naming the variable."""
        env = os.environ if env is None else env

        def text(name: str) -> str | None:
            return env.get(name) or None

        def number(name: str, kind: type, default):
            raw = env.get(name)
            if not raw:
                return default
            try:
                return kind(raw)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise ValueError(f"{name}={raw!r}: expected {what}") from None

        def uid(name: str, default: int, least: int) -> int:
            value = number(name, int, default)
            if value < least or value > 2**31 - 1:
                why = " (root: Pod Security \"restricted\" refuses it)" if least else ""
                raise ValueError(f"{name}={value}: expected {least} to {2**31 - 1}{why}")
            return value

        def flag(name: str, default: bool) -> bool:
            raw = (env.get(name) or str(default)).lower()
            if raw not in ("true", "false"):
                raise ValueError(f"{name}={raw!r}: expected true or false")
            return raw == "true"

        # The backend's name is checked where it is looked up (backends.backend_named, at
        # startup: a PermanentError naming the known ones), case-insensitively.
        backend = text("KUBETUNE_BACKEND") or cls.backend
        preflight = text("KUBETUNE_PREFLIGHT") or cls.preflight
        if preflight not in ("auto", "always", "skip"):
            raise ValueError(f"KUBETUNE_PREFLIGHT={preflight!r}: expected auto, always or skip")
        url = text("KUBETUNE_PROGRESS_URL")
        if url and not url.lower().startswith(("http://", "https://")):
            raise ValueError(f"KUBETUNE_PROGRESS_URL={url!r}: expected https://… (or http://… "
                             "for plain HTTP, by name)")
        cert, key = text("KUBETUNE_PROGRESS_TLS_CERT"), text("KUBETUNE_PROGRESS_TLS_KEY")
        if bool(cert) != bool(key):
            raise ValueError("KUBETUNE_PROGRESS_TLS_CERT and KUBETUNE_PROGRESS_TLS_KEY go "
                             "together")
        if cert and url and url.lower().startswith("http://"):
            raise ValueError(f"KUBETUNE_PROGRESS_URL={url!r} names plain HTTP, but "
                             "KUBETUNE_PROGRESS_TLS_CERT gives a certificate: use https://")
        return cls(
            trainer_image=text("KUBETUNE_TRAINER_IMAGE") or cls.trainer_image,
            progress_url=url,
            progress_ca_configmap=text("KUBETUNE_PROGRESS_CA_CONFIGMAP"),
            default_priority_class=text("KUBETUNE_DEFAULT_PRIORITY_CLASS"),
            default_queue=text("KUBETUNE_DEFAULT_QUEUE"),
            failure_log_tail=flag("KUBETUNE_FAILURE_LOG_TAIL", True),
            pod_host_network=flag("KUBETUNE_POD_HOST_NETWORK", False),
            pod_run_as_user=uid("KUBETUNE_POD_RUN_AS_USER", cls.pod_run_as_user, 1),
            pod_run_as_group=uid("KUBETUNE_POD_RUN_AS_GROUP", cls.pod_run_as_group, 0),
            gpu_memory=gpu_memory_table(env.get("KUBETUNE_GPU_MEMORY")),
            backend=backend,
            preflight=preflight,
            preflight_resources=preflight_resources(env.get("KUBETUNE_PREFLIGHT_RESOURCES"))
            or cls.preflight_resources,
            training_runtime=text("KUBETUNE_TRAINING_RUNTIME") or cls.training_runtime,
            trainer_status=flag("KUBETUNE_TRAINER_STATUS", False),
            serve_enabled=flag("KUBETUNE_SERVE_ENABLED", True),
            serve_image=text("KUBETUNE_SERVE_IMAGE") or cls.serve_image,
            serve_args=tuple((env.get("KUBETUNE_SERVE_ARGS") or "").split()),
            serve_run_as_user=uid("KUBETUNE_SERVE_RUN_AS_USER", cls.serve_run_as_user, 1),
            serve_run_as_group=uid("KUBETUNE_SERVE_RUN_AS_GROUP", cls.serve_run_as_group, 0),
            serve_url=text("KUBETUNE_SERVE_URL") or cls.serve_url,
            recheck_seconds=number("KUBETUNE_RECHECK_SECONDS", float, cls.recheck_seconds),
            workers=number("KUBETUNE_WORKERS", int, cls.workers),
            scanning=flag("KUBETUNE_SCANNING", True),
            metrics_port=number("KUBETUNE_METRICS_PORT", int, None),
            progress_port=number("KUBETUNE_PROGRESS_PORT", int, None),
            progress_host=text("KUBETUNE_PROGRESS_HOST") or cls.progress_host,
            progress_tls_cert=text("KUBETUNE_PROGRESS_TLS_CERT"),
            progress_tls_key=text("KUBETUNE_PROGRESS_TLS_KEY"),
            progress_tls_ca=text("KUBETUNE_PROGRESS_TLS_CA"),
            progress_cert_secret=(text("KUBETUNE_PROGRESS_CERT_SECRET")
                                  or cls.progress_cert_secret),
            operator_namespace=text("KUBETUNE_OPERATOR_NAMESPACE") or _own_namespace(),
            progress_flush_seconds=number("KUBETUNE_PROGRESS_FLUSH_SECONDS", float,
                                          cls.progress_flush_seconds),
        )


SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _own_namespace() -> str | None:
    """In a pod: its namespace, from its service account (the chart also sets
    KUBETUNE_OPERATOR_NAMESPACE); elsewhere None."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip() or None
    except OSError:
        return None


PREFLIGHT_RESOURCE_NAMES = ("cpu", "memory", "ephemeral-storage")


def preflight_resources(raw: str | None) -> tuple[tuple[str, str, str], ...]:
    """The chart's preflight.resources (JSON, a container's ``resources``); empty: the
    defaults. A bad one fails startup naming what is wrong."""
    import json

    from kubernetes.utils import parse_quantity

    name = "KUBETUNE_PREFLIGHT_RESOURCES"
    try:
        doc = json.loads(raw or "{}") or {}
    except ValueError:
        raise ValueError(f"{name}: not JSON ({raw!r})") from None
    if not isinstance(doc, dict) or set(doc) - {"requests", "limits"}:
        raise ValueError(f"{name}: expected an object with requests and/or limits")
    out, parsed = [], {}
    for section in ("requests", "limits"):
        quantities = doc.get(section) or {}
        if not isinstance(quantities, dict):
            raise ValueError(f"{name}: {section} must map a resource to a quantity")
        for resource, quantity in sorted(quantities.items()):
            if resource not in PREFLIGHT_RESOURCE_NAMES:  # no GPU: it runs on CPU
                raise ValueError(f"{name}: {section}.{resource}: expected one of "
                                 f"{', '.join(PREFLIGHT_RESOURCE_NAMES)}")
            try:
                parsed[section, resource] = parse_quantity(str(quantity))
            except ValueError:
                raise ValueError(f"{name}: {section}.{resource}={quantity!r}: not a "
                                 "quantity (e.g. 2, 500m, 8Gi)") from None
            out.append((section, resource, str(quantity)))
    for (section, resource), value in parsed.items():
        limit = parsed.get(("limits", resource))
        if section == "requests" and limit is not None and value > limit:
            raise ValueError(f"{name}: requests.{resource} is above limits.{resource}: the "
                             "API server would refuse the pod")
    return tuple(out)


def gpu_memory_table(raw: str | None) -> tuple[tuple[str, str], ...]:
    """The chart's gpuMemory (JSON: GPU product → quantity); a bad entry is logged, skipped."""
    import json

    from kubetune.estimate import parse_quantity

    try:
        table = json.loads(raw or "{}") or {}
    except ValueError:
        log.error("KUBETUNE_GPU_MEMORY is not JSON; no GPU memory is known")
        return ()
    out = []
    for product, quantity in sorted(table.items()):
        try:
            parse_quantity(str(quantity))
            out.append((str(product), str(quantity)))
        except ValueError as err:
            log.error("gpuMemory[%s]: %s; ignored", product, err)
    return tuple(out)
