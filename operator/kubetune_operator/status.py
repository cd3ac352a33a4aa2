"""Status reducers: what is observed in, the FineTuneJob's status out. Pure functions.

Conditions follow kstatus (Flux, Argo CD, kubectl wait): ``Ready`` is True once the run is
admitted and running (a ten-hour run is healthy, not "in progress"), ``Stalled`` is True on a
terminal failure or an invalid spec, ``Reconciling`` while children are being created or the
job waits, and ``Succeeded``/``Failed``/``Suspended``/``Queued`` say the rest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.v1alpha1 import (
    Checkpoint,
    Condition,
    Failure,
    FineTuneJobStatus,
    Outputs,
    Preflight,
    Progress,
    Serving,
)
from kubetune.api.v1alpha1.status import Restart
from kubetune.errors import EXIT_PERMANENT, EXIT_PREEMPTED

from kubetune_operator.backends import Backend

TERMINAL = ("Succeeded", "Failed")
REFUSED = ("InvalidSpec", "InsufficientGPUMemory")  # stalled before any child was made
PHASES = ("Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended")
MAX_CHECKPOINTS = 10  # in status; older ones are usually rotated away by saveTotalLimit
MAX_RESTARTS = 5  # status.lastRestarts; status.restarts counts them all
LOG_TAIL_CHARS = 2000


@dataclass
class Observed:
    """Everything the reducer needs, gathered by the reconciler."""

    generation: int | None
    spec_suspend: bool = False
    queue_name: str | None = None  # Kueue queue label on the job
    invalid: str | None = None  # a spec error the schema could not catch (names the field)
    unfit: str | None = None  # the memory estimate exceeds the GPU's memory (and why)
    blocked: str | None = None  # something else holds the children's names
    missing: tuple[str, str] | None = None  # (reason, message): a kind it needs is not served
    waiting: str | None = None  # spec.model.fromJob: that job has not succeeded yet
    drift: str | None = None  # the spec changed after the children were made
    child: dict[str, Any] | None = None  # the backend's training object as read back
    workload: dict[str, Any] | None = None  # its Kueue Workload, read while it waits
    pods: list[dict[str, Any]] = field(default_factory=list)
    # Pods whose trainer ended early, as the pod watch last saw them: a deleted pod is gone
    # moments after, often before any listing; their restarts count all the same.
    gone_pods: list[dict[str, Any]] = field(default_factory=list)
    # (reason, message): the API server refused the child's pods (admission: Pod Security, a
    # webhook such as Kyverno or Gatekeeper, a quota), from its controller's Events
    rejected: tuple[str, str] | None = None
    progress: dict[str, Any] | None = None  # the latest progress report from the trainer
    keep_checkpoints: int | None = None  # training.saveTotalLimit: older ones are deleted
    backend: Backend = field(kw_only=True)  # what the child is, and how to read it
    preflight: dict[str, Any] | None = None  # the pre-flight pod's report, when it ended
    preflight_reset: bool = False  # an earlier report is of an older spec: not shown
    validating: str | None = None  # the pre-flight pod is running
    preflight_failed: tuple[str, str] | None = None  # (reason, message): it stopped the job
    log_tail: bool = True  # put the failing rank's last output into status.failure


# ----------------------------------------------------------------------- failure diagnosis

_PATTERNS = [
    (re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED"),
     "CUDAOutOfMemory", "the GPU ran out of memory: lower batchSizePerDevice or cutoffLen, "
     "or use gradientCheckpointing, lora (with quantization: QLoRA) or more GPUs"),
    (re.compile(r"NCCL.*(timeout|Timeout|timed out)|Watchdog caught collective operation "
                r"timeout"),
     "NCCLTimeout", "a collective operation between GPUs timed out (a rank died, hung, or the "
     "network between nodes failed)"),
]


Waiting = tuple[str, str]  # (reason, message): why the pods wait


def diagnose_pods(pods: list[dict[str, Any]], container: str
                  ) -> tuple[Failure | None, Waiting | None]:
    """(why it failed, why it waits) from pod status alone: no pods/log rights needed.
    ``container``: the trainer container's name (each backend has its own)."""
    failure: Failure | None = None
    waiting: Waiting | None = None
    for pod in sorted(pods, key=lambda p: p.get("metadata", {}).get("name", "")):
        name = pod.get("metadata", {}).get("name")
        status = pod.get("status", {}) or {}
        for cond in status.get("conditions", []) or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                    and cond.get("reason") == "Unschedulable":
                waiting = waiting or (
                    "Unschedulable", f"pod {name} cannot be scheduled: "
                    f"{cond.get('message', '')}".strip())
        for cs in status.get("containerStatuses", []) or []:
            if cs.get("name") != container:
                continue
            state = cs.get("state", {}) or {}
            last = cs.get("lastState", {}) or {}
            w = state.get("waiting") or {}
            if w.get("reason") in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName"):
                waiting = waiting or (
                    "ImagePull", f"pod {name} cannot pull its image: {w.get('message', '')}"
                    .strip())
            term = state.get("terminated") or last.get("terminated")
            if term and term.get("exitCode", 0) != 0 and failure is None:
                failure = _diagnose_termination(name, term)
    return failure, waiting


# ----------------------------------------------------------------------- restarts

# The pod's DisruptionTarget condition (Kubernetes 1.26+) says who took it away.
_DISRUPTIONS = {"PreemptionByScheduler": "Preempted", "PreemptionByKueue": "Preempted",
                "EvictionByEvictionAPI": "Evicted", "TerminationByKubelet": "Evicted",
                "DeletionByTaintManager": "NodeLost", "DeletionByPodGC": "NodeLost"}


def restart_reason(pod: dict[str, Any], term: dict[str, Any]) -> str:
    """Preempted, Evicted, OOMKilled, NodeLost or Error, for a trainer that ended early."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return _DISRUPTIONS.get(cond.get("reason") or "", "Preempted")
    if term.get("reason") == "OOMKilled":
        return "OOMKilled"
    if status.get("reason") in ("Evicted", "NodeLost", "NodeShutdown", "Terminated"):
        return "Evicted" if status["reason"] == "Evicted" else "NodeLost"
    if term.get("exitCode") == EXIT_PREEMPTED or term.get("reason") == UNREPORTED:
        return "Preempted"  # SIGTERM with no condition: a deleted pod
    return "Error"


def observe_restarts(pods: list[dict[str, Any]], container: str, seen: list[dict[str, Any]],
                     *, from_step: int | None, to_step: int | None) -> list[Restart]:
    """The restarts the pods show (``ended_early``) that ``seen`` (status.lastRestarts) does
    not list yet. A restart counts once: it is newer than the newest one seen, by the time it
    ended."""
    known = {(r.get("pod"), r.get("at")) for r in seen}
    newest = max((r.get("at") or "" for r in seen), default="")
    found: list[Restart] = []
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name")
        for term in ended_early(pod, container):
            at = term["finishedAt"]
            if at < newest or (name, at) in known:
                continue
            known.add((name, at))
            lost = from_step - to_step if from_step is not None and to_step is not None \
                else None
            found.append(Restart(
                at=at, reason=restart_reason(pod, term), pod=name, exit_code=term.get("exitCode"),
                from_step=from_step, to_step=to_step,
                lost_steps=max(lost, 0) if lost is not None else None,
                message=_restart_message(term)))
    return sorted(found, key=lambda r: r.at)


def ended_early(pod: dict[str, Any], container: str) -> list[dict[str, Any]]:
    """The pod's ``container`` terminations that a restart follows: a retryable exit code
    (not 0, not the permanent 2), in place (``lastState``) or with the pod (``state``); or
    one ``deleted_unreported`` made up for."""
    out = []
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") != container:
            continue
        for state in (cs.get("lastState") or {}, cs.get("state") or {}):
            term = state.get("terminated") or {}
            if term.get("finishedAt") and (
                    term.get("exitCode") not in (None, 0, EXIT_PERMANENT)
                    or term.get("reason") == UNREPORTED):
                out.append(term)
    return out


UNREPORTED = "DeletedWhileRunning"  # the kubelet removed the pod before saying how it ended
UNREPORTED_MESSAGE = "the pod was deleted while its trainer ran (no exit code reported)"


def deleted_unreported(pod: dict[str, Any], container: str, at: str) -> dict[str, Any] | None:
    """A pod deleted while its trainer ran, gone with no exit code reported (the kubelet
    may write an empty or unknown end for a deleted pod before it removes it): its end, as
    a termination ended ``at`` (when it went), with no exit code. None when its end was
    reported, or it never ran."""
    if not (pod.get("metadata") or {}).get("deletionTimestamp") or ended_early(pod, container):
        return None
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        state = cs.get("state") or {}
        term = state.get("terminated")
        if cs.get("name") == container and (state.get("running") or (
                term is not None and not term.get("finishedAt"))):
            return {"reason": UNREPORTED, "finishedAt": at, "message": UNREPORTED_MESSAGE}
    return None


def _restart_message(term: dict[str, Any]) -> str | None:
    message = (term.get("message") or "").strip()
    try:  # the trainer's own (/dev/termination-log): {"reason", "message"}
        data = json.loads(message)
        if isinstance(data, dict) and data.get("message"):
            return str(data["message"])[:500]
    except (json.JSONDecodeError, TypeError):
        pass
    return (message.splitlines()[-1][:500] if message else None) or term.get("reason")


def restart_event(r: Restart) -> str:
    """The Event's message for one restart."""
    steps = ""
    if r.from_step is not None:
        steps = (f" at step {r.from_step}; resumes from "
                 + (f"step {r.to_step}" if r.to_step else "the start")
                 + (f" ({r.lost_steps} steps lost)" if r.lost_steps is not None else ""))
    code = f"exit {r.exit_code}" if r.exit_code is not None else "no exit code reported"
    return f"pod {r.pod} ended ({r.reason}, {code}){steps}"


# What controllers record when the API server refuses a pod they create: the Kubernetes
# ones (Job, ReplicaSet) "FailedCreate", Kubeflow's Training Operator "FailedCreatePod".
FAILED_CREATE = ("FailedCreate", "FailedCreatePod")


def pod_rejection(events: list[dict[str, Any]], backend: Backend, job: str
                  ) -> Waiting | None:
    """(PodRejected, the server's message) from the newest Warning Event a controller of the
    job's pods recorded on failing to create one; None when there is none."""
    refusals = []
    for ev in events:
        obj = ev.get("involvedObject") or ev.get("regarding") or {}
        if ev.get("type") == "Warning" and ev.get("reason") in FAILED_CREATE and \
                backend.makes_pods(obj.get("kind") or "", obj.get("name") or "", job):
            refusals.append(ev)
    if not refusals:
        return None

    def when(ev: dict[str, Any]) -> str:
        return (ev.get("lastTimestamp") or ev.get("eventTime")
                or (ev.get("metadata") or {}).get("creationTimestamp") or "")

    ev = max(refusals, key=when)
    obj = ev.get("involvedObject") or ev.get("regarding") or {}
    message = (ev.get("message") or ev.get("note") or "").strip()
    return ("PodRejected", f"the API server refused the pods of {obj.get('kind')} "
            f"{obj.get('name')}: {message}"[:LOG_TAIL_CHARS])


def _failure(reason: str, message: str, code: int | None, pod: str | None,
             tail: str | None) -> Failure:
    return Failure(reason=reason, message=message, exit_code=code, pod=pod, log_tail=tail)


def _diagnose_termination(pod: str | None, term: dict[str, Any]) -> Failure:
    code = term.get("exitCode")
    message = (term.get("message") or "").strip()
    tail = message[-LOG_TAIL_CHARS:] if message else None
    if term.get("reason") == "OOMKilled":
        return _failure("OOMKilled", f"pod {pod} ran out of memory (OOMKilled): raise "
                        "resources.memory or lower batchSizePerDevice", code, pod, tail)
    try:  # the trainer's own structured reason (/dev/termination-log)
        data = json.loads(message)
        if isinstance(data, dict) and "reason" in data:
            where = f"{data['field']}: " if data.get("field") else ""
            return _failure(str(data["reason"]), f"{where}{data.get('message', '')}", code,
                            pod, None)
    except (json.JSONDecodeError, TypeError):
        pass
    for pattern, reason, explanation in _PATTERNS:
        if pattern.search(message):
            return _failure(reason, explanation, code, pod, tail)
    return _failure("TrainerError", f"pod {pod} exited with code {code}", code, pod, tail)


# ----------------------------------------------------------------------- the reducer


def was_invalid(status: dict[str, Any]) -> bool:
    """The job stalled on its spec (and so never had children)."""
    return any(c.get("type") == "Stalled" and c.get("reason") in REFUSED
               for c in status.get("conditions") or [])


def stopped_by_preflight(status: dict[str, Any]) -> bool:
    """The job's pre-flight stopped it (its report failed, or its pod ended without one):
    no training object was ever made."""
    stalled = next((c.get("reason") for c in status.get("conditions") or []
                    if c.get("type") == "Stalled" and c.get("status") == "True"), None)
    report = status.get("preflight")
    return stalled == "PreflightFailed" or (
        stalled in ("DataError", "InsufficientGPUMemory") and bool(report)
        and not report.get("passed"))


def _condition(type_: str, status: bool, reason: str, message: str,
               generation: int | None) -> Condition:
    return Condition(type=type_, status="True" if status else "False", reason=reason,
                     message=message, observed_generation=generation)


def dump(status: FineTuneJobStatus) -> dict[str, Any]:
    """The status as the API has it: by alias, unset fields left out. The one place a typed
    status becomes the patch's body."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def reduce_status(obs: Observed, old: dict[str, Any] | None, now: str) -> dict[str, Any]:
    """The whole new status, as the API has it (see ``reduce`` for the typed one)."""
    return dump(reduce(obs, old, now))


def reduce(obs: Observed, old: dict[str, Any] | None, now: str) -> FineTuneJobStatus:
    """The whole new status. ``old`` keeps transition times, checkpoints and outputs."""
    status = _reduce(obs, old or {}, now)
    if not obs.log_tail and status.failure is not None and status.failure.log_tail:
        # failureLogTail off: a new failure's, and one recorded before it was turned off
        status.failure = status.failure.model_copy(update={"log_tail": None})
    return status


def _reduce(obs: Observed, old: dict[str, Any], now: str) -> FineTuneJobStatus:
    gen = obs.generation
    if obs.child is None and obs.invalid is None and old.get("phase") in TERMINAL \
            and not was_invalid(old) and not obs.validating:
        # Finished, and the training object is gone (ttlSecondsAfterFinished): the record stays.
        # (Validating: its pre-flight stopped it, and runs again for a changed spec.)
        return FineTuneJobStatus.model_validate({**old, "observedGeneration": gen})
    phase, reason, message = _phase(obs)
    failure, waiting = diagnose_pods(obs.pods, obs.backend.container)

    conds: list[Condition] = []
    ready = phase in ("Running", "Succeeded")
    conds.append(_condition("Ready", ready, reason, message, gen))
    stalled = phase == "Failed" or obs.invalid is not None or obs.missing is not None
    conds.append(_condition("Stalled", stalled, reason if stalled else "Progressing",
                            message if stalled else "", gen))
    waits = phase in ("Pending", "Validating", "Queued")
    reconciling = waits and not stalled  # kstatus reads Reconciling before Stalled
    conds.append(_condition("Reconciling", reconciling, reason if waits else "Done",
                            message if waits else "", gen))
    conds.append(_condition("Queued", phase == "Queued", reason if phase == "Queued"
                            else "NotQueued", message if phase == "Queued" else "", gen))
    conds.append(_condition("Suspended", phase == "Suspended", reason if phase == "Suspended"
                            else "NotSuspended", message if phase == "Suspended" else "", gen))
    if obs.drift:
        conds.append(_condition("SpecChangeIgnored", True, "ChangedAfterStart", obs.drift, gen))
    if phase in ("Succeeded", "Failed"):
        conds.append(_condition("Succeeded", phase == "Succeeded", reason, message, gen))
        conds.append(_condition("Failed", phase == "Failed", reason, message, gen))

    if phase == "Failed" and failure and obs.invalid is None:  # e.g. PyTorchJobFailed
        for c in conds:
            if c.type in ("Ready", "Stalled", "Failed", "Succeeded"):
                c.reason, c.message = failure.reason, failure.message
    if phase == "Pending" and not waiting and not obs.pods:
        waiting = obs.rejected  # no pod at all: were they refused?
    if phase == "Pending" and waiting:
        for c in conds:
            if c.type in ("Ready", "Reconciling"):
                c.reason, c.message = waiting

    progress = progress_model(obs.progress, old.get("progress"), phase)
    outputs = dict(old.get("outputs") or {})
    if obs.progress and obs.progress.get("outputs"):
        outputs.update(obs.progress["outputs"])
    if phase != "Failed":
        failure = None
    elif obs.preflight_failed:  # it stopped the job before any training pod
        failure = Failure(reason=reason, message=message)
    elif failure is None and old.get("failure"):
        failure = Failure.model_validate(old["failure"])  # the pods are gone; keep what they said
    seen = old.get("lastRestarts") or []
    reached = (obs.progress or {}).get("step")
    if reached is None:
        reached = (old.get("progress") or {}).get("step")
    kept = [c.get("step") for c in [*(old.get("checkpoints") or []),
                                    *((obs.progress or {}).get("checkpoints") or [])]
            if c.get("step") is not None]
    listed = {(p.get("metadata") or {}).get("name") for p in obs.pods}
    pods = [*obs.pods, *(p for p in obs.gone_pods
                         if (p.get("metadata") or {}).get("name") not in listed)]
    new = observe_restarts(pods, obs.backend.container, seen, from_step=reached,
                           to_step=max(kept) if kept else (0 if reached is not None else None))
    if phase == "Failed" and failure is not None:  # its last pod failed the run: no restart
        new = [r for r in new if r.pod != failure.pod]
    if phase in TERMINAL:  # pods deleted as a finished run is torn down: not restarts
        new = [r for r in new if r.message != UNREPORTED_MESSAGE]
    restarts = [Restart.model_validate(r) for r in seen] + new
    return FineTuneJobStatus(
        restarts=(old.get("restarts") or 0) + len(new) if restarts else None,
        last_restarts=restarts[-MAX_RESTARTS:],
        phase=phase, observed_generation=gen,
        conditions=_keep_transition_times(conds, old.get("conditions") or [], now),
        progress=progress,
        checkpoints=[Checkpoint.model_validate(c) for c in merge_checkpoints(
            obs.progress, old.get("checkpoints") or [], keep=obs.keep_checkpoints)],
        outputs=Outputs.model_validate(outputs) if outputs else None,
        failure=failure,
        # (while a pre-flight runs, an earlier one's report is not shown: it was of another spec)
        preflight=_preflight(obs.preflight or (None if obs.validating or obs.preflight_reset
                                               else old.get("preflight"))))


def _preflight(report: dict[str, Any] | None) -> Preflight | None:
    """The pre-flight report as status.preflight (the trainer's fields, the time for people)."""
    if not report:
        return None
    fields = {k: v for k, v in report.items() if k in Preflight.model_fields
              or k in {f.alias for f in Preflight.model_fields.values()}}
    model = Preflight.model_validate(fields)
    if model.estimated_seconds is not None and model.estimated_time is None:
        model.estimated_time = duration_text(model.estimated_seconds)
    return model


def _phase(obs: Observed) -> tuple[str, str, str]:
    if obs.invalid:
        return "Failed", "InvalidSpec", obs.invalid
    if obs.unfit:
        return "Failed", "InsufficientGPUMemory", obs.unfit
    if obs.missing:  # not terminal: it proceeds once the kind is served
        return "Pending", *obs.missing
    if obs.blocked:
        return "Pending", "Conflict", obs.blocked
    if obs.waiting:
        return "Pending", "WaitingForJob", obs.waiting
    if obs.preflight_failed:
        return "Failed", *obs.preflight_failed
    if obs.validating:
        return "Validating", "Validating", obs.validating
    child, b = obs.child, obs.backend
    if child is None:
        if obs.spec_suspend:
            return "Suspended", "Suspended", "suspended before it started: nothing is " \
                "created until spec.suspend is false"
        return "Pending", "Creating", f"creating the {b.kind}"
    state = b.state(child)
    if state.succeeded is not None:
        return "Succeeded", "Succeeded", state.succeeded
    if state.failed is not None:
        return "Failed", *state.failed
    if state.suspended:
        if obs.spec_suspend:
            return "Suspended", "Suspended", "suspended by spec.suspend; set it to false to " \
                "resume from the last checkpoint"
        if obs.queue_name:
            why = kueue_reason(obs.workload)
            return "Queued", "WaitingForAdmission", (
                f"waiting for Kueue to admit it from queue {obs.queue_name!r}"
                + (f": {why}" if why else ""))
        return "Queued", "Suspended", f"the {b.kind} is suspended by another controller"
    if state.restarting:
        return "Running", "Restarting", "a pod failed and is restarting; training resumes " \
            "from the last checkpoint"
    if state.running:
        return "Running", "Running", "training"
    return "Pending", "Starting", "waiting for the training pods to start"


def with_serving(status: FineTuneJobStatus, served: Serving | None, generation: int | None,
                 now: str, old_conditions: list[dict[str, Any]], *,
                 waiting: str | None = None, blocked: str | None = None,
                 blocked_reason: str = "Conflict", check_error: str | None = None,
                 rejected: str | None = None, gate: str = "") -> FineTuneJobStatus:
    """The status with spec.serve's part: status.serving and the Serving and Checked
    conditions (none of them when nothing is served). ``rejected``: why the server's pods
    were refused (its Deployment's ReplicaFailure); ``gate``: how spec.serve.gate passed."""
    kept = [c for c in status.conditions if c.type not in ("Serving", "Checked")]
    conds: list[Condition] = []
    shown: Serving | None = None
    if blocked:
        conds.append(_condition("Serving", False, blocked_reason, blocked, generation))
    elif served is not None and waiting:
        conds.append(_condition("Serving", False, "WaitingForOutput", waiting, generation))
    elif served is not None:
        shown = served
        conds.append(_condition(
            "Serving", served.ready, "ServerReady" if served.ready else
            "PodRejected" if rejected else "ServerStarting",
            f"{served.model_name} at {served.url}"
            + (f" and at {served.endpoint} (spec.serve.endpoint)" if served.endpoint else "")
            + (f" (gate passed: {gate})" if gate else "")
            if served.ready else rejected or
            "waiting for the server to pass its readiness probe", generation))
        if check_error:
            conds.append(_condition("Checked", False, "CheckError", check_error, generation))
        elif served.checks:
            failed = [c for c in served.checks if not c.passed]
            conds.append(_condition(
                "Checked", not failed, "ChecksFailed" if failed else "ChecksPassed",
                "; ".join(f"{c.prompt!r}: the answer lacks {', '.join(map(repr, c.missing))}"
                          for c in failed)
                or f"{len(served.checks)} of {len(served.checks)} checks passed", generation))
    return status.model_copy(update={
        "serving": shown,
        "conditions": kept + _keep_transition_times(conds, old_conditions, now)})


# Not served for good: its gate missed (a finished run's final metrics do not change), or its
# shared endpoint serves a newer job.
NOT_SERVED_REASONS = ("GateNotMet", "GateMetricMissing", "Replaced")


def serving_settled(job: Any, status: FineTuneJobStatus) -> bool:
    """Served, ready, checked (when the job has checks) and on its shared endpoint (when it
    names one), or not served for good: nothing more to wait for."""
    served = status.serving
    if any(c.type == "Serving" and c.reason in NOT_SERVED_REASONS for c in status.conditions):
        return True
    if served is None or not served.ready:
        return False
    if job.spec.serve.endpoint and not served.endpoint:
        return False
    return not job.spec.serve.checks or bool(served.checks)


def kueue_reason(workload: dict[str, Any] | None) -> str | None:
    """Why Kueue has not admitted (or has evicted) a Workload, in Kueue's own words."""
    if not workload:
        return None
    if (workload.get("spec") or {}).get("active") is False:
        return "its Kueue Workload is deactivated (spec.active: false)"
    conds = {c.get("type"): c for c in (workload.get("status") or {}).get("conditions") or []}
    evicted = conds.get("Evicted") or {}
    if evicted.get("status") == "True":
        return f"evicted by Kueue: {evicted.get('message') or evicted.get('reason')}"
    for type_ in ("QuotaReserved", "Admitted"):
        c = conds.get(type_) or {}
        if c.get("status") == "False" and (c.get("message") or c.get("reason")):
            return c.get("message") or c.get("reason")
    return None


def _keep_transition_times(new: list[Condition], old: list[dict[str, Any]], now: str
                           ) -> list[Condition]:
    before = {c.get("type"): c for c in old}
    for c in new:
        prev = before.get(c.type)
        same = prev is not None and prev.get("status") == c.status
        c.last_transition_time = prev.get("lastTransitionTime", now) if same else now
    return new


PROGRESS_REPORTED = ("step", "totalSteps", "percent", "etaSeconds", "loss", "learningRate",
                     "tokensPerSecond", "epoch", "metrics", "updatedAt")


def progress_model(report: dict[str, Any] | None, old: dict[str, Any] | None = None,
                   phase: str | None = None) -> Progress | None:
    """status.progress from a (cleaned) report, with what ``kubectl get`` shows; the old one
    when the report has nothing."""
    p = Progress.model_validate({k: report[k] for k in PROGRESS_REPORTED
                                 if report.get(k) is not None}) if report else Progress()
    if phase == "Succeeded" and report:
        p.percent, p.eta_seconds = 100.0, 0
        if p.total_steps is not None:
            p.step = p.total_steps
    # What `kubectl get` shows (a printer column reads one field: no arithmetic there).
    if p.step is not None and p.total_steps is not None:
        p.steps = f"{p.step}/{p.total_steps}"
    if p.eta_seconds is not None:
        p.eta = duration_text(p.eta_seconds)
    if as_api(p):
        return p
    return Progress.model_validate(old) if old else None


def as_api(model: Any) -> dict[str, Any]:
    """A status part as the API has it: by alias, unset fields left out; a float that is not
    finite is left out too (the report's cleaning drops them first; never into a patch)."""
    return {k: v for k, v in model.model_dump(mode="json", by_alias=True,
                                               exclude_none=True).items() if v is not None}


def progress_fields(report: dict[str, Any] | None, old: dict[str, Any] | None = None,
                    phase: str | None = None) -> dict[str, Any] | None:
    """``progress_model`` as the patch's body."""
    p = progress_model(report, old, phase)
    return as_api(p) if p is not None else None


def duration_text(seconds: float) -> str:
    """1h05m, 5m30s, 42s."""
    s = max(0, int(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_patch(report: dict[str, Any], current: dict[str, Any],
                   keep: int | None = None) -> dict[str, Any]:
    """The status patch for a progress report, against the status as it is now: checkpoints
    and outputs merged with what is there (another operator replica may have written some),
    and progress only if it is not older than what is there."""
    patch: dict[str, Any] = {}
    prog = progress_fields(report)
    have = (current.get("progress") or {}).get("step")
    if prog and not (have is not None and prog.get("step") is not None
                     and prog["step"] < have):
        patch["progress"] = prog
    if report.get("checkpoints"):
        merged = [as_api(Checkpoint.model_validate(c)) for c in merge_checkpoints(
            report, current.get("checkpoints") or [], keep=keep)]
        if merged != current.get("checkpoints"):
            patch["checkpoints"] = merged
    if report.get("outputs"):
        outputs = as_api(Outputs.model_validate({**(current.get("outputs") or {}),
                                                  **report["outputs"]}))
        if outputs != current.get("outputs"):
            patch["outputs"] = outputs
    return patch


def merge_checkpoints(report: dict[str, Any] | None, old: list[dict[str, Any]],
                      keep: int | None = None) -> list[dict[str, Any]]:
    """A bounded list, newest last, one entry per step; no more than the trainer keeps."""
    by_step = {c["step"]: c for c in old}
    for c in (report or {}).get("checkpoints", []) or []:
        by_step[c["step"]] = c
    return [by_step[s] for s in sorted(by_step)][-min(MAX_CHECKPOINTS, keep or MAX_CHECKPOINTS):]
