"""A plain ``Job`` (batch/v1): training with no add-on installed.

One node: a Job with one pod, ``<job>-<5 chars>``. More nodes: an Indexed Job (``completions``
= ``parallelism`` = nodes) and a headless Service of the same name; each pod is
``<job>-<index>-<5 chars>`` with the stable hostname ``<job>-<index>.<job>`` (``subdomain``),
its node rank the completion index (downward API), the master ``<job>-0.<job>``:``PORT``.
``kubetune-launch`` reads the same ``PET_*``/``MASTER_*`` variables as under a PyTorchJob.
The trainer container is ``trainer``, ``restartPolicy: Never``: a lost pod is made again by
the Job (``backoffLimit`` = ``spec.runPolicy.backoffLimit``) and resumes from the newest
complete checkpoint.

Permanent errors (the trainer's exit code 2: bad data or spec) fail the run once:
- servers with ``podFailurePolicy`` (1.26+): rule ``FailJob`` on exit code 2 of ``trainer``,
  ``Ignore`` on ``DisruptionTarget`` (a preempted or evicted pod costs no retry) and on exit
  code 143 (the trainer stopped by SIGTERM after its checkpoint: a deleted pod too);
- older servers: the operator, which reads the pods anyway, sees a ``trainer`` container that
  terminated with exit code 2 and patches the Job once (``stop_patch``): ``STOPPED`` (the pod
  and its message) and ``activeDeadlineSeconds: 1``, so the Job controller fails it
  (``DeadlineExceeded``) and deletes a retry it may have started. The FineTuneJob is Failed from
  that patch on, with the pod's own message. The Job and its failed pod are kept (not deleted:
  the pod's status holds the message; a deleted child would be made again).

What older servers lack, said before any child is made (Stalled, naming the field):
``spec.resources.nodes`` > 1 needs Indexed Jobs (1.22+); a Kueue queue (its label, or the
chart's default queue) needs Job ``suspend`` (1.22+). ``spec.suspend`` still holds a job
that has not started (no child is made); a running Job cannot be suspended there, which a
``SpecChangeIgnored`` condition says. ``ttlSecondsAfterFinished`` is rendered from 1.21,
``podReplacementPolicy: Failed`` (a new pod only once the old one is gone: two pods never
share a hostname) from 1.29.

State: conditions ``Complete``, ``Failed`` (``BackoffLimitExceeded``, ``DeadlineExceeded``,
``PodFailurePolicy``), ``Suspended``; running while ``status.ready`` (1.24+; ``status.active``
before) > 0 and not suspended; restarting while ``status.failed`` > 0 and no pod runs.
"""

from __future__ import annotations

import re
from typing import Any

from kubetune.errors import EXIT_PERMANENT, EXIT_PREEMPTED

from kubetune_operator import builders
from kubetune_operator.apiserver import CURRENT, ApiServer
from kubetune_operator.backends import Backend, ChildState, condition

CONTAINER = "trainer"
PORT = 29500  # the rendezvous port on the master (index 0)
ROLE = "node"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
PERMANENT_EXIT_CODE = EXIT_PERMANENT  # 2: bad data or spec; a retry cannot help
STOPPED = "kubetune.io/stopped"  # why the operator stopped the Job (servers before 1.26)


class JobBackend(Backend):
    api_version = "batch/v1"
    kind = "Job"
    plural = "jobs"
    container = CONTAINER
    suspend_path = ("spec", "suspend")

    def render(self, *, job, config, uid=None, labels=None, server=CURRENT) -> dict[str, Any]:
        """``labels``: the FineTuneJob's own, of which the Kueue ones are passed through
        (batch/v1 Jobs are Kueue's own integration)."""
        spec = job.spec
        nodes = spec.resources.nodes
        passed = builders.kueue_labels(labels, config)
        pod = builders.pod_template(job=job, config=config, role=ROLE, container=CONTAINER)
        pod["spec"]["restartPolicy"] = "Never"  # the Job makes a new pod; podFailurePolicy
        main = pod["spec"]["containers"][0]
        main["env"] = _topology(builders.child_name(job), nodes,
                                spec.resources.gpus_per_node) + main["env"]
        body: dict[str, Any] = {
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": spec.run_policy.backoff_limit,
        }
        if nodes > 1:
            body["completionMode"] = "Indexed"
            pod["spec"]["subdomain"] = builders.child_name(job)  # the headless Service
            main["ports"] = [{"name": "rendezvous", "containerPort": PORT, "protocol": "TCP"}]
        if server.job_suspend:
            # Kueue admits a queued job by unsuspending it: create it suspended.
            body["suspend"] = spec.suspend or builders.KUEUE_QUEUE_LABEL in passed
        if spec.run_policy.active_deadline_seconds:
            body["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
        if spec.run_policy.ttl_seconds_after_finished is not None and server.job_ttl:
            body["ttlSecondsAfterFinished"] = spec.run_policy.ttl_seconds_after_finished
        if server.pod_failure_policy:
            body["podFailurePolicy"] = {"rules": [
                # onPodConditions empty beside onExitCodes: required by the API's schema
                # before 1.29 (measured against 1.26-1.28's).
                {"action": "FailJob", "onExitCodes": {
                    "containerName": CONTAINER, "operator": "In",
                    "values": [PERMANENT_EXIT_CODE]}, "onPodConditions": []},
                {"action": "Ignore", "onPodConditions": [
                    {"type": "DisruptionTarget", "status": "True"}]},
                # Stopped by SIGTERM (a deleted or drained pod, which gets no
                # DisruptionTarget): it saved, and a new pod resumes without using a retry.
                {"action": "Ignore", "onExitCodes": {
                    "containerName": CONTAINER, "operator": "In",
                    "values": [EXIT_PREEMPTED]}, "onPodConditions": []},
            ]}
        if server.pod_replacement_policy:
            body["podReplacementPolicy"] = "Failed"
        body["template"] = pod
        return {"apiVersion": self.api_version, "kind": self.kind,
                "metadata": builders.child_metadata(job, uid, passed), "spec": body}

    def companions(self, *, job, uid=None) -> list[dict[str, Any]]:
        """More than one node: the headless Service that gives each pod its stable hostname
        (published before the pods are ready: rank 0 must resolve while the others start)."""
        if job.spec.resources.nodes == 1:
            return []
        name = builders.child_name(job)
        meta = builders.child_metadata(job, uid, {})
        del meta["annotations"][builders.SUSPEND_APPLIED]  # not the training object
        return [{"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {builders.JOB_LABEL: name, "kubetune.io/role": ROLE},
            "ports": [{"name": "rendezvous", "port": PORT, "targetPort": PORT,
                       "protocol": "TCP"}],
        }}]

    def refuses(self, job, server=CURRENT, queued=False) -> str | None:
        if job.spec.resources.nodes > 1 and not server.indexed_jobs:
            return (f"spec.resources.nodes: {job.spec.resources.nodes} nodes need an Indexed "
                    f"Job (Kubernetes 1.22+); this API server is {server.version}: use one "
                    "node, or the PyTorchJob backend")
        if queued and not server.job_suspend:
            return (f"metadata.labels[{builders.KUEUE_QUEUE_LABEL}]: Kueue admits a Job by "
                    f"unsuspending it, and this API server ({server.version}) has no Job "
                    "suspend (Kubernetes 1.22+): remove the label (and the operator's "
                    "default queue), or use the PyTorchJob backend")
        return None

    def suspend_problem(self, server: ApiServer) -> str | None:
        if server.job_suspend:
            return None
        return (f"spec.suspend: this API server ({server.version}) cannot suspend a running "
                "Job (Kubernetes 1.22+); it runs on. Delete the FineTuneJob to stop it (its "
                "checkpoints stay)")

    def stop_patch(self, obj, pods, server) -> dict[str, Any] | None:
        if server.pod_failure_policy or self.state(obj).failed or self.state(obj).succeeded:
            return None  # the Job's podFailurePolicy fails it; or it is over
        for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
            if not self.owns_pod(pod, obj["metadata"]["name"]):
                continue
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                term = ((cs.get("state") or {}).get("terminated")) or {}
                if cs.get("name") == CONTAINER and term.get("exitCode") == PERMANENT_EXIT_CODE:
                    why = (f"pod {pod['metadata']['name']} exited with code "
                           f"{PERMANENT_EXIT_CODE} (a permanent error: not retried)")
                    return {"metadata": {"annotations": {STOPPED: why}},
                            "spec": {"activeDeadlineSeconds": 1}}
        return None

    def state(self, obj: dict[str, Any]) -> ChildState:
        status = obj.get("status") or {}
        complete, failed = condition(obj, "Complete"), condition(obj, "Failed")
        stopped = ((obj.get("metadata") or {}).get("annotations") or {}).get(STOPPED)
        suspended = self.suspend_flag(obj) or condition(obj, "Suspended") is not None
        # ready (1.24+): pods past their start; active alone may still be pulling an image
        up = status["ready"] if status.get("ready") is not None else status.get("active")
        running = not suspended and (up or 0) > 0
        if failed:
            failure: tuple[str, str] | None = (failed.get("reason") or "Failed",
                                               failed.get("message") or "training failed")
        elif stopped:
            failure = ("PermanentError", stopped)
        else:
            failure = None
        return ChildState(
            succeeded=(complete.get("message") or "training finished") if complete else None,
            failed=failure,
            suspended=suspended,
            restarting=not failure and not running and (status.get("failed") or 0) > 0,
            running=running,
        )

    def pod_name_matches(self, pod: str, job: str) -> bool:
        return re.fullmatch(rf"{re.escape(job)}-(\d+-)?[a-z0-9]{{5}}", pod) is not None

    def owns_pod(self, pod: dict[str, Any], job: str) -> bool:
        owners = (pod.get("metadata") or {}).get("ownerReferences") or []
        return any(o.get("apiVersion") == self.api_version and o.get("kind") == self.kind
                   and o.get("name") == job for o in owners)


def _topology(name: str, nodes: int, gpus: int) -> list[dict[str, Any]]:
    """What a PyTorchJob's controller would inject, for ``kubetune-launch``."""
    env: list[dict[str, Any]] = [
        {"name": "PET_NNODES", "value": str(nodes)},
        # One process per GPU; a CPU-only job runs one process per node.
        {"name": "PET_NPROC_PER_NODE", "value": str(gpus or 1)},
    ]
    if nodes == 1:
        return env + [{"name": "PET_NODE_RANK", "value": "0"}]
    return env + [
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}},
        {"name": "MASTER_ADDR", "value": f"{name}-0.{name}"},
        {"name": "MASTER_PORT", "value": str(PORT)},
    ]


JOB = JobBackend()
