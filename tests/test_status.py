"""Status reducers, table-driven over PyTorchJob and TrainJob status sequences and pod states."""

from __future__ import annotations

import functools
import json

import pytest
from kubetune.api.v1alpha1 import FineTuneJobStatus
from kubetune_operator.backends.pytorchjob import PYTORCHJOB
from kubetune_operator.status import Observed as _Observed
from kubetune_operator.status import diagnose_pods, reduce_status

# A PyTorchJob unless a test names another backend (the reducer has no default).
Observed = functools.partial(_Observed, backend=PYTORCHJOB)

T0, T1 = "2026-11-23T10:00:00Z", "2026-11-23T10:05:00Z"


def pytorchjob(*conds, suspend=False):
    return {"spec": {"runPolicy": {"suspend": suspend}},
            "status": {"conditions": [{"type": t, "status": "True", "reason": r,
                                       "message": f"{t} message"} for t, r in conds]}}


def cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def truth(status):
    return {c["type"] for c in status["conditions"] if c["status"] == "True"}


CASES = [
    # (name, observed, phase, true conditions, reason of Ready)
    ("no child yet", Observed(3), "Pending", {"Reconciling"}, "Creating"),
    ("created suspended", Observed(3, spec_suspend=True), "Suspended",
     {"Suspended"}, "Suspended"),
    ("created", Observed(3, child=pytorchjob(("Created", "PyTorchJobCreated"))),
     "Pending", {"Reconciling"}, "Starting"),
    ("kueue holds it", Observed(3, queue_name="team-a",
                                child=pytorchjob(("Created", "c"), ("Suspended", "s"),
                                                 suspend=True)),
     "Queued", {"Reconciling", "Queued"}, "WaitingForAdmission"),
    ("running", Observed(3, child=pytorchjob(("Created", "c"), ("Running", "r"))),
     "Running", {"Ready"}, "Running"),
    ("restarting", Observed(3, child=pytorchjob(("Created", "c"), ("Restarting", "r"))),
     "Running", {"Ready"}, "Restarting"),
    ("succeeded", Observed(3, child=pytorchjob(("Created", "c"), ("Succeeded", "s"))),
     "Succeeded", {"Ready", "Succeeded"}, "Succeeded"),
    ("failed", Observed(3, child=pytorchjob(("Created", "c"), ("Failed", "BackoffLimitExceeded"))),
     "Failed", {"Stalled", "Failed"}, "BackoffLimitExceeded"),
    ("suspended by the user", Observed(3, spec_suspend=True, child=pytorchjob(
        ("Created", "c"), ("Suspended", "s"), suspend=True)),
     "Suspended", {"Suspended"}, "Suspended"),
    ("invalid spec", Observed(3, invalid="spec.model.source: no such model"),
     "Failed", {"Stalled", "Failed"}, "InvalidSpec"),
]


def test_a_finished_job_whose_child_was_cleaned_up_keeps_its_record():
    done = reduce_status(Observed(2, child=pytorchjob(("Succeeded", "s"))), None, T0)
    later = reduce_status(Observed(2, child=None), done, T1)
    assert later == done
    assert reduce_status(Observed(2, child=None), None, T1)["phase"] == "Pending"


@pytest.mark.parametrize(("observed", "phase", "true", "reason"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_phase_and_conditions(observed, phase, true, reason):
    status = reduce_status(observed, None, T0)
    assert status["phase"] == phase
    assert truth(status) == true
    assert cond(status, "Ready")["reason"] == reason
    assert all(c["observedGeneration"] == 3 for c in status["conditions"])
    assert status["observedGeneration"] == 3
    FineTuneJobStatus.model_validate(status)  # fits the CRD's status schema


def test_a_whole_run_keeps_transition_times_until_a_condition_flips():
    seq = [pytorchjob(("Created", "c")),
           pytorchjob(("Created", "c"), ("Running", "r")),
           pytorchjob(("Created", "c"), ("Running", "r")),
           pytorchjob(("Created", "c"), ("Succeeded", "s"))]
    status = None
    times = []
    for i, child in enumerate(seq):
        status = reduce_status(Observed(1, child=child), status, f"t{i}")
        times.append(cond(status, "Ready")["lastTransitionTime"])
    assert times == ["t0", "t1", "t1", "t1"]  # Ready: False → True (t1) → True → True
    assert cond(status, "Succeeded")["lastTransitionTime"] == "t3"


def _pod(name, **container):
    return {"metadata": {"name": name},
            "status": {"containerStatuses": [{"name": "pytorch", **container}]}}


@pytest.mark.parametrize(("pod", "reason"), [
    (_pod("j-master-0", state={"terminated": {"exitCode": 137, "reason": "OOMKilled"}}),
     "OOMKilled"),
    (_pod("j-master-0", state={"terminated": {"exitCode": 1, "reason": "Error", "message":
                                              "Traceback...\ntorch.OutOfMemoryError: CUDA out "
                                              "of memory. Tried to allocate 2.00 GiB"}}),
     "CUDAOutOfMemory"),
    (_pod("j-worker-1", lastState={"terminated": {"exitCode": 1, "message":
                                                  "[Rank 3] Watchdog caught collective "
                                                  "operation timeout: WorkNCCL(...)"}}),
     "NCCLTimeout"),
    (_pod("j-master-0", state={"terminated": {"exitCode": 2, "message": json.dumps(
        {"reason": "DataError", "field": "spec.datasets[0].source",
         "message": "file not found: /mnt/pvc/data/x.json"})}}), "DataError"),
    (_pod("j-master-0", state={"terminated": {"exitCode": 1, "message": "boom"}}),
     "TrainerError"),
])
def test_failures_are_classified_from_pod_status(pod, reason):
    failure, _ = diagnose_pods([pod], PYTORCHJOB.container)
    assert failure is not None and failure.reason == reason


@pytest.mark.parametrize(("pod", "reason"), [
    (_pod("j-master-0", state={"waiting": {"reason": "ImagePullBackOff",
                                           "message": "Back-off pulling image"}}), "ImagePull"),
    ({"metadata": {"name": "j-master-0"}, "status": {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]}},
     "Unschedulable"),
])
def test_waiting_reasons_show_while_pending(pod, reason):
    obs = Observed(1, child=pytorchjob(("Created", "c")), pods=[pod])
    status = reduce_status(obs, None, T0)
    assert status["phase"] == "Pending"
    assert cond(status, "Ready")["reason"] == reason
    assert cond(status, "Reconciling")["reason"] == reason


def test_failure_keeps_exit_code_and_log_tail_after_pods_are_gone():
    pod = _pod("j-master-0", state={"terminated": {"exitCode": 1, "message":
                                                   "line\nCUDA out of memory"}})
    failed = pytorchjob(("Created", "c"), ("Failed", "PyTorchJobFailed"))  # the real reason
    status = reduce_status(Observed(1, child=failed, pods=[pod]), None, T0)
    assert status["failure"]["exitCode"] == 1
    assert status["failure"]["logTail"].endswith("CUDA out of memory")
    assert cond(status, "Stalled")["reason"] == "CUDAOutOfMemory"
    later = reduce_status(Observed(1, child=failed, pods=[]), status, T1)
    assert later["failure"] == status["failure"]
    # The operator's failureLogTail=false: the output stays out of the status, not the reason.
    private = reduce_status(Observed(1, child=failed, pods=[pod], log_tail=False), None, T0)
    assert "logTail" not in private["failure"]
    assert private["failure"]["reason"] == "CUDAOutOfMemory"
    kept = reduce_status(Observed(1, child=failed, pods=[], log_tail=False), status, T1)
    assert "logTail" not in kept["failure"] and kept["failure"]["exitCode"] == 1


def test_progress_and_checkpoints_are_bounded_and_ordered():
    report = {"step": 40, "totalSteps": 100, "percent": 40.0, "loss": 1.25,
              "checkpoints": [{"step": s, "uri": f"pvc://o/checkpoint-{s}"}
                              for s in range(10, 160, 10)]}
    obs = Observed(1, child=pytorchjob(("Running", "r")), progress=report)
    status = reduce_status(obs, None, T0)
    assert status["progress"]["percent"] == 40.0
    assert [c["step"] for c in status["checkpoints"]] == list(range(60, 160, 10))


def test_checkpoints_listed_are_no_more_than_the_trainer_keeps():
    report = {"checkpoints": [{"step": s, "uri": f"pvc://o/checkpoint-{s}"}
                              for s in range(10, 60, 10)]}
    obs = Observed(1, child=pytorchjob(("Running", "r")), progress=report, keep_checkpoints=3)
    assert [c["step"] for c in reduce_status(obs, None, T0)["checkpoints"]] == [30, 40, 50]


def _workload(active=True, **conds):
    return {"spec": {"active": active}, "status": {"conditions": [
        {"type": t, "status": s, "reason": "r", "message": m} for t, (s, m) in conds.items()]}}


@pytest.mark.parametrize(("workload", "says"), [
    (None, None),
    (_workload(QuotaReserved=("False", "insufficient unused quota for nvidia.com/gpu")),
     "insufficient unused quota for nvidia.com/gpu"),
    (_workload(QuotaReserved=("True", "reserved"), Admitted=("False", "admission check x")),
     "admission check x"),
    (_workload(QuotaReserved=("True", "r"), Evicted=("True", "Preempted by a higher priority")),
     "evicted by Kueue: Preempted by a higher priority"),
    (_workload(active=False), "deactivated (spec.active: false)"),
    (_workload(QuotaReserved=("True", "r"), Admitted=("True", "a")), None),
], ids=["no workload yet", "no quota", "admission check", "evicted", "deactivated", "admitted"])
def test_a_queued_job_says_why_in_kueues_words(workload, says):
    obs = Observed(2, queue_name="team-a", workload=workload,
                   child=pytorchjob(("Created", "c"), suspend=True))
    message = cond(reduce_status(obs, {}, T0), "Queued")["message"]
    assert message.startswith("waiting for Kueue to admit it from queue 'team-a'")
    assert (says in message) if says else message.endswith("'team-a'")


def trainjob(*conds, suspend=False, jobs=None, trainer_status=None):
    """A TrainJob as Trainer v2 writes it: conditions, and its JobSet's Jobs in jobsStatus."""
    status = {"conditions": [{"type": t, "status": "True", "reason": r, "message": f"{t} message"}
                             for t, r in conds]}
    if jobs is not None:
        status["jobsStatus"] = [{"name": "node", "ready": 0, "succeeded": 0, "failed": 0,
                                 "active": 0, "suspended": 0, **jobs}]
    if trainer_status is not None:
        status["trainerStatus"] = trainer_status
    return {"spec": {"suspend": suspend}, "status": status}


TRAINJOB_CASES = [
    ("created", Observed(3, child=trainjob(jobs={})), "Pending", {"Reconciling"}, "Starting"),
    ("pods pending", Observed(3, child=trainjob(jobs={"active": 1})), "Pending",
     {"Reconciling"}, "Starting"),
    ("suspended, queued by Kueue", Observed(3, queue_name="team-a", child=trainjob(
        ("Suspended", "Suspended"), suspend=True, jobs={"suspended": 1})), "Queued",
     {"Reconciling", "Queued"}, "WaitingForAdmission"),
    ("suspended by the user", Observed(3, spec_suspend=True, child=trainjob(
        ("Suspended", "Suspended"), suspend=True)), "Suspended", {"Suspended"}, "Suspended"),
    ("suspended by someone else", Observed(3, child=trainjob(suspend=True)), "Queued",
     {"Reconciling", "Queued"}, "Suspended"),
    ("running via jobsStatus", Observed(3, child=trainjob(jobs={"active": 1, "ready": 1})),
     "Running", {"Ready"}, "Running"),
    ("a child Job failed, JobSet restarts it", Observed(3, child=trainjob(
        jobs={"active": 1, "ready": 1, "failed": 1})), "Running", {"Ready"}, "Restarting"),
    ("complete", Observed(3, child=trainjob(("Complete", "JobsCompleted"),
                                            jobs={"succeeded": 1})),
     "Succeeded", {"Ready", "Succeeded"}, "Succeeded"),
    ("failed with a reason", Observed(3, child=trainjob(("Failed", "JobsFailed"),
                                                        jobs={"failed": 1})),
     "Failed", {"Stalled", "Failed"}, "JobsFailed"),
]


@pytest.mark.parametrize(("name", "obs", "phase", "true", "reason"), TRAINJOB_CASES,
                         ids=[c[0] for c in TRAINJOB_CASES])
def test_trainjob_status_table(name, obs, phase, true, reason):
    from kubetune_operator.backends.trainjob import TRAINJOB

    obs.backend = TRAINJOB
    status = reduce_status(obs, None, T0)
    FineTuneJobStatus.model_validate(status)
    assert status["phase"] == phase
    assert truth(status) == true
    assert cond(status, "Ready")["reason"] == reason


def test_trainjob_sequence_keeps_transition_times_and_reads_the_node_container():
    from kubetune_operator.backends.trainjob import TRAINJOB

    seq = [trainjob(("Suspended", "Suspended"), suspend=True),
           trainjob(jobs={"active": 1, "ready": 1}), trainjob(jobs={"active": 1, "ready": 1}),
           trainjob(("Failed", "JobsFailed"), jobs={"failed": 1})]
    old, phases = None, []
    for i, child in enumerate(seq):
        pods = [] if i < 3 else [{"metadata": {"name": "ident-node-0-0-abcde"}, "status": {
            "containerStatuses": [{"name": "node", "state": {"terminated": {
                "exitCode": 137, "reason": "OOMKilled"}}}]}}]
        old = reduce_status(Observed(1, queue_name="q", child=child, backend=TRAINJOB,
                                     pods=pods), old, T0 if i < 2 else T1)
        phases.append(old["phase"])
    assert phases == ["Queued", "Running", "Running", "Failed"]
    assert cond(old, "Ready")["lastTransitionTime"] == T1
    # The failing pod's own story, read from the TrainJob's container ("node", not "pytorch").
    assert old["failure"]["reason"] == "OOMKilled" and old["failure"]["exitCode"] == 137


def test_trainjob_trainer_status_is_read_as_progress():
    from kubetune_operator.backends.trainjob import TRAINJOB
    from kubetune_operator.reporting.clean import from_trainer_status

    ts = {"progressPercentage": 40, "estimatedRemainingSeconds": 90,
          "lastUpdatedTime": "2026-11-23T10:04:00Z",
          "metrics": [{"name": "loss", "value": "1.25"}, {"name": "current_step", "value": "4"},
                      {"name": "total_steps", "value": "10"}]}
    child = trainjob(jobs={"active": 1, "ready": 1}, trainer_status=ts)
    state = TRAINJOB.state(child)
    assert state.running and state.trainer_status == ts
    progress = from_trainer_status(state.trainer_status)
    status = reduce_status(Observed(1, child=child, backend=TRAINJOB, progress=progress),
                           None, T0)
    FineTuneJobStatus.model_validate(status)
    assert status["progress"] == {"step": 4, "totalSteps": 10, "percent": 40.0,
                                  "etaSeconds": 90.0, "loss": 1.25,
                                  "updatedAt": "2026-11-23T10:04:00Z", "steps": "4/10",
                                  "eta": "1m30s"}


def test_each_backend_suspends_its_own_way():
    from kubetune_operator.backends.pytorchjob import PYTORCHJOB
    from kubetune_operator.backends.trainjob import TRAINJOB

    assert TRAINJOB.suspend_patch(True) == {"spec": {"suspend": True}}
    assert PYTORCHJOB.suspend_patch(False) == {"spec": {"runPolicy": {"suspend": False}}}
    creating = reduce_status(Observed(1, child=None, backend=TRAINJOB), {}, T0)
    assert any(c["message"] == "creating the TrainJob" for c in creating["conditions"])


def test_a_progress_patch_never_goes_back_or_drops_what_another_replica_wrote():
    from kubetune_operator.status import progress_patch

    current = {"progress": {"step": 50, "percent": 50.0},
               "checkpoints": [{"step": 40, "uri": "pvc://o/checkpoint-40"}],
               "outputs": {"adapter": "pvc://o/adapter"}}
    older = {"step": 40, "percent": 40.0,
             "checkpoints": [{"step": 45, "uri": "pvc://o/checkpoint-45"}],
             "outputs": {"mergedModel": "pvc://o/merged"}}
    patch = progress_patch(older, current)
    assert "progress" not in patch  # step 40 < 50: stale
    assert [c["step"] for c in patch["checkpoints"]] == [40, 45]
    assert patch["outputs"] == {"adapter": "pvc://o/adapter", "mergedModel": "pvc://o/merged"}
    newer = progress_patch({"step": 60, "percent": 60.0}, current)
    assert newer == {"progress": {"step": 60, "percent": 60.0}}
    assert progress_patch({"checkpoints": current["checkpoints"]}, current) == {}
    assert [c["step"] for c in progress_patch(
        older, current, keep=1)["checkpoints"]] == [45]  # saveTotalLimit


def test_progress_shows_steps_and_eta_for_kubectl_get():
    from kubetune_operator.status import progress_fields

    p = progress_fields({"step": 120, "totalSteps": 400, "etaSeconds": 3905.0, "loss": 1.2})
    assert p["steps"] == "120/400" and p["eta"] == "1h05m"
    assert progress_fields({"step": 3, "etaSeconds": 42})["eta"] == "42s"
    done = progress_fields({"step": 398, "totalSteps": 400, "etaSeconds": 5}, phase="Succeeded")
    assert done["steps"] == "400/400" and done["eta"] == "0s" and done["percent"] == 100.0


def _refusal(kind, name, reason="FailedCreate", when="2026-11-23T10:01:00Z", message="m"):
    return {"type": "Warning", "reason": reason, "message": message, "lastTimestamp": when,
            "involvedObject": {"kind": kind, "name": name}}


def test_refused_pods_are_read_from_the_events_of_what_makes_them():
    """Each backend's pod maker: the PyTorchJob (Kubeflow's FailedCreatePod), the Job, a
    TrainJob's per-node Jobs; the newest refusal; nothing from another job or a Normal one."""
    from kubetune_operator.backends.job import JOB
    from kubetune_operator.backends.pytorchjob import PYTORCHJOB
    from kubetune_operator.backends.trainjob import TRAINJOB
    from kubetune_operator.status import pod_rejection

    psa = ('pods "ident-master-0" is forbidden: violates PodSecurity "restricted:latest": '
           'runAsNonRoot != true')
    events = [_refusal("PyTorchJob", "ident", "FailedCreatePod", message=psa),
              _refusal("PyTorchJob", "ident", "FailedCreatePod", "2026-11-23T09:00:00Z"),
              _refusal("PyTorchJob", "identity", "FailedCreatePod"),
              {**_refusal("PyTorchJob", "ident"), "type": "Normal"}]
    assert pod_rejection(events, PYTORCHJOB, "ident") == (
        "PodRejected", f"the API server refused the pods of PyTorchJob ident: {psa}")
    assert pod_rejection(events, JOB, "ident") is None
    tj = [_refusal("Job", "ident-node-1", message="quota"), _refusal("Job", "ident", "x")]
    assert pod_rejection(tj, TRAINJOB, "ident") == (
        "PodRejected", "the API server refused the pods of Job ident-node-1: quota")
    assert pod_rejection(tj, TRAINJOB, "iden") is None


def test_refused_pods_explain_a_pending_job_until_a_pod_exists():
    from kubetune_operator.backends.job import JOB

    job = {"metadata": {"name": "ident"}, "status": {"startTime": T0, "active": 0}}
    refused = ("PodRejected", "the API server refused the pods of Job ident: nope")
    status = reduce_status(Observed(3, child=job, backend=JOB, rejected=refused), None, T1)
    assert status["phase"] == "Pending"
    assert (cond(status, "Ready")["reason"], cond(status, "Ready")["message"]) == refused
    assert cond(status, "Reconciling")["reason"] == "PodRejected"
    pod = {"metadata": {"name": "ident-x7k2p"}, "status": {"phase": "Pending"}}
    status = reduce_status(Observed(3, child=job, backend=JOB, rejected=refused, pods=[pod]),
                           None, T1)
    assert cond(status, "Ready")["reason"] == "Starting"


def _ended(name, code, at, *, container="pytorch", disruption=None, in_place=False, **term):
    pod = _pod(name, **{"lastState" if in_place else "state": {"terminated": {
        "exitCode": code, "finishedAt": at, **term}}})
    pod["status"]["containerStatuses"][0]["name"] = container
    if disruption:
        pod["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True",
                                        "reason": disruption}]
    return pod


def test_every_restart_is_counted_once_with_its_reason_and_the_steps_lost():
    from kubetune_operator.backends.job import JOB
    from kubetune_operator.status import restart_event

    running = {"status": {"ready": 1, "active": 1}}
    ckpts = [{"step": 100, "uri": "pvc://o/checkpoint-100"},
             {"step": 120, "uri": "pvc://o/checkpoint-120"}]
    preempted = _ended("j-abcde", 143, "2026-11-23T10:01:00Z", container="trainer",
                       disruption="PreemptionByScheduler", message=json.dumps(
                           {"reason": "Preempted", "message": "stopped by SIGTERM at step "
                            "120: checkpoint-120 saved"}))
    obs = Observed(1, child=running, backend=JOB, pods=[preempted],
                   progress={"step": 120, "totalSteps": 400, "checkpoints": ckpts})
    status = reduce_status(obs, None, T0)
    assert status["restarts"] == 1
    (r,) = status["lastRestarts"]
    assert r == {"at": "2026-11-23T10:01:00Z", "reason": "Preempted", "pod": "j-abcde",
                 "exitCode": 143, "fromStep": 120, "toStep": 120, "lostSteps": 0,
                 "message": "stopped by SIGTERM at step 120: checkpoint-120 saved"}
    again = reduce_status(obs, status, T1)  # the same pods seen again: still one
    assert again["restarts"] == 1 and again["lastRestarts"] == status["lastRestarts"]

    # A new pod, OOM-killed at step 130 (last checkpoint 120): 10 steps lost; a deleted pod
    # (SIGTERM, no DisruptionTarget) reads as preempted; the permanent 2 is no restart.
    oom = _ended("j-fghij", 137, "2026-11-23T10:09:00Z", container="trainer",
                 reason="OOMKilled")
    deleted = _ended("j-klmno", 143, "2026-11-23T10:12:00Z", container="trainer")
    obs = Observed(1, child=running, backend=JOB, pods=[preempted, oom, deleted],
                   progress={"step": 130, "totalSteps": 400})
    later = reduce_status(obs, again, T1)
    assert later["restarts"] == 3
    assert [(r["reason"], r["fromStep"], r["toStep"], r["lostSteps"])
            for r in later["lastRestarts"]] == [("Preempted", 120, 120, 0),
                                                ("OOMKilled", 130, 120, 10),
                                                ("Preempted", 130, 120, 10)]
    from kubetune.api.v1alpha1.status import Restart

    assert restart_event(Restart.model_validate(later["lastRestarts"][1])) == \
        "pod j-fghij ended (OOMKilled, exit 137) at step 130; resumes from step 120 " \
        "(10 steps lost)"
    bad = _ended("j-pqrst", 2, "2026-11-23T10:20:00Z", container="trainer")
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True",
                                         "reason": "PodFailurePolicy"}]}}
    final = reduce_status(Observed(1, child=failed, backend=JOB, pods=[bad]), later, T1)
    assert final["phase"] == "Failed" and final["restarts"] == 3


def test_a_run_without_restarts_has_none_in_its_status():
    status = reduce_status(Observed(1, child=pytorchjob(("Running", "r")), pods=[
        _pod("j-master-0", state={"running": {}})]), None, T0)
    assert "restarts" not in status and status.get("lastRestarts", []) == []
