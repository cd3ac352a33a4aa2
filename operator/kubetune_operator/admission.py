"""Admission: what a job needs before its children are made, beyond its own spec.

- the memory check: the estimate against the GPUs' memory, with the model's config.json
  fetched alone from the Hub for an hf:// model (cached; nothing else is read here);
- fromJob: spec.model.fromJob and rewards[].fromJob resolved to the upstream jobs' models;
- the pre-flight pod's verdict (spec.preflight): its report, read from the pod's
  termination message once its Job ended.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from kubetune.api.v1alpha1 import API_VERSION, KIND, FineTuneJob

from kubetune_operator.builders import JOB_LABEL, PREFLIGHT_ROLE, is_preflight
from kubetune_operator.kube import Kube, owned_by, ref
from kubetune_operator.settings import OperatorConfig
from kubetune_operator.status import diagnose_pods

log = logging.getLogger("kubetune.admission")


def needs_upstream(job: FineTuneJob) -> bool:
    """Whether the job starts from another job's model (its own, or a reward model's)."""
    return bool(job.spec.model.from_job or any(r.from_job for r in job.spec.rewards or []))


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


def resolve_from_job(kube: Kube, ns: str, name: str, job: FineTuneJob
              ) -> tuple[FineTuneJob | None, str | None, str | None]:
    """spec.model.fromJob and rewards[].fromJob: (the job with those jobs' models as its
    sources, or None; why it waits; why it cannot run)."""
    from kubetune.pipeline import FIELD, cycle, upstream_model

    def read(other: str) -> dict[str, Any] | None:
        return kube.get(ref(API_VERSION, KIND, ns, other))

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


def preflight_verdict(kube: Kube, ns: str, name: str, job_obj: dict[str, Any]
                      ) -> tuple[dict[str, Any] | None, str | None, tuple[str, str] | None]:
    """The pre-flight Job's verdict: (its pod's report, from the termination message once it
    ended; why the job waits, while it runs; (reason, message) when it stopped the job).
    Training may start when the last two are None."""
    current = kube.get(job_obj) or {}
    state = current.get("status") or {}
    uid = (current.get("metadata") or {}).get("uid")
    pods = [p for p in kube.list("v1", "Pod", ns, labels=f"{JOB_LABEL}={name}")
            if is_preflight(p) and _of_job(p, uid)]
    if not state.get("succeeded") and not state.get("failed") and not any(
            c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
            for c in state.get("conditions") or []):
        _, stuck = diagnose_pods(pods, PREFLIGHT_ROLE)  # unschedulable, its image not pulled
        why = stuck[1] if stuck else None
        if (current.get("spec") or {}).get("suspend"):  # made unsuspended: someone else did
            why = (f"its Job {job_obj['metadata']['name']} is suspended (Kueue suspends Jobs "
                   "without a queue when its manageJobsWithoutQueueName is on): admit it, "
                   "or set spec.preflight: skip")
        return None, ("the pre-flight pod checks every row, prepares the data and estimates "
                      "memory and time, before any GPU is asked for"
                      + (f"; {why}" if why else "")), None
    report, crash = _preflight_report(pods)
    if report is not None and report.get("passed"):
        return report, None, None
    if report is not None:
        field = report.get("field")
        reason = ("DataError" if report.get("reason") == "DataError" else
                  "InsufficientGPUMemory" if field == "spec.resources" else "PreflightFailed")
        return report, None, (reason, f"pre-flight: {field + ': ' if field else ''}"
                                      f"{report.get('message') or 'failed'}")
    return None, None, ("PreflightFailed", "pre-flight: the pod ended without a report"
                        + (f": {crash}" if crash else ""))


def _of_job(pod: dict[str, Any], uid: str | None) -> bool:
    """The pod is this Job's (uid), not an earlier pre-flight Job's: by its owner, or by the
    Job controller's label once orphaned."""
    meta = pod.get("metadata") or {}
    if meta.get("ownerReferences"):
        return owned_by(pod, uid)
    labels = meta.get("labels") or {}
    made_by = labels.get("batch.kubernetes.io/controller-uid") or labels.get("controller-uid")
    return uid is None or made_by in (None, uid)


def _preflight_report(pods: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    """(the report in the newest pod's termination message, else what ended that pod)."""
    crash = None
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "",
                      reverse=True):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            text = term.get("message") or ""
            try:
                report = json.loads(text).get("preflight")
            except (ValueError, AttributeError):
                report = None
            if isinstance(report, dict):
                return report, None
            if term:
                crash = crash or (f"exit {term.get('exitCode')} ({term.get('reason')}): "
                                  f"{text[-500:]}")
    return None, crash
