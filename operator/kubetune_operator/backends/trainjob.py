"""Kubeflow Trainer v2: ``TrainJob`` (trainer.kubeflow.org/v1alpha1, schema of v2.3).

A TrainJob refers to a ClusterTrainingRuntime (``config.training_runtime``; the chart ships
``kubetune`` for kubetune's trainer image) and sets what is per job: ``trainer.image``,
``command``/``args``, ``env``, ``numNodes``, ``numProcPerNode`` and ``resourcesPerNode``.
Volumes, mounts, labels and scheduling go through ``runtimePatches`` (v2.3's way to patch the
runtime's pod template), on the runtime's trainer ReplicatedJob ``node`` and container ``node``.

The runtime's JobSet makes one batch Job per node, ``<job>-node-<i>``, whose pods are
``<job>-node-<i>-<index>-<5 chars>``. State: conditions ``Complete``, ``Failed``,
``Suspended``; running is seen in ``status.jobsStatus`` (no condition says it); KEP-2779
progress in ``status.trainerStatus`` (Kubeflow's ``TrainJobStatus`` feature gate).

Per job, a TrainJob cannot carry a pod priority class (the runtime can), a restart limit or a
TTL (the runtime's JobSet ``failurePolicy`` and ``ttlSecondsAfterFinished``): a job that sets
one is refused, naming the field. The exit-code contract lives in the runtime the chart ships:
each node's Job fails on exit 2 (``podFailurePolicy`` FailJob) and the JobSet then fails
(``failurePolicy`` rule on the reason ``PodFailurePolicy``); SIGTERM (143) and disruptions are
ignored; anything else fails the node's Job (backoffLimit 0) and the JobSet restarts the run.
"""

from __future__ import annotations

import re
from typing import Any

from kubetune_operator import builders
from kubetune_operator.apiserver import CURRENT
from kubetune_operator.backends import Backend, ChildState, condition

GROUP = "trainer.kubeflow.org"
NODE = "node"  # the runtime's trainer ReplicatedJob, and its container
MANAGER = "kubetune.io/operator"  # our runtimePatches entry
RUNTIME_KIND = "ClusterTrainingRuntime"


class TrainJobBackend(Backend):
    api_version = f"{GROUP}/v1alpha1"
    kind = "TrainJob"
    plural = "trainjobs"
    container = NODE
    suspend_path = ("spec", "suspend")
    provider = "Kubeflow Trainer v2"

    def render(self, *, job, config, uid=None, labels=None, server=CURRENT) -> dict[str, Any]:
        spec = job.spec
        r = spec.resources
        passed = builders.kueue_labels(labels, config)
        # Kubeflow's own progress endpoint (KEP-2779) when its TrainJobStatus gate is on:
        # Trainer v2 sets the KUBEFLOW_TRAINER_SERVER_* variables itself. kubetune's own
        # reports (checkpoints, outputs) still go to kubetune's (KUBETUNE_PROGRESS_*).
        pod = builders.pod_template(job=job, config=config, role=NODE, container=NODE,
                                    progress=not config.trainer_status)
        c = pod["spec"]["containers"][0]
        trainer: dict[str, Any] = {
            "image": c["image"], "command": c["command"], "args": c["args"], "env": c["env"],
            "numNodes": r.nodes,
            # One process per GPU; a CPU-only job runs one process per node.
            "numProcPerNode": r.gpus_per_node or 1,
        }
        if c.get("resources"):
            trainer["resourcesPerNode"] = c["resources"]
        # What a TrainJob has no field for goes through v2.3's runtimePatches.
        pod_patch: dict[str, Any] = {
            "securityContext": pod["spec"]["securityContext"],  # Pod Security "restricted"
            "terminationGracePeriodSeconds": pod["spec"]["terminationGracePeriodSeconds"],
            "volumes": pod["spec"]["volumes"],
            "containers": [{"name": NODE, "volumeMounts": c["volumeMounts"],
                            "securityContext": c["securityContext"]}],
        }
        for key in ("nodeSelector", "tolerations", "affinity", "serviceAccountName"):
            if key in pod["spec"]:
                pod_patch[key] = pod["spec"][key]
        patch = {"manager": MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {
                "metadata": {"labels": pod["metadata"]["labels"]},
                "spec": pod_patch}}}}]}}}}
        body: dict[str, Any] = {
            "runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND,
                           "name": config.training_runtime},
            # Kueue admits a queued job by unsuspending it: create it suspended.
            "suspend": spec.suspend or builders.KUEUE_QUEUE_LABEL in passed,
            "trainer": trainer,
            "runtimePatches": [patch],
        }
        if spec.run_policy.active_deadline_seconds:
            body["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
        return {"apiVersion": self.api_version, "kind": self.kind,
                "metadata": builders.child_metadata(job, uid, passed), "spec": body}

    def refuses(self, job, server=CURRENT, queued=False) -> str | None:
        policy = job.spec.run_policy
        if policy.ttl_seconds_after_finished is not None:
            return ("spec.runPolicy.ttlSecondsAfterFinished: a TrainJob (Kubeflow Trainer "
                    "v2.3) cannot set it per job; it is the ClusterTrainingRuntime's (its "
                    "JobSet's ttlSecondsAfterFinished): remove it, or use the PyTorchJob or "
                    "Job backend")
        if "backoff_limit" in policy.model_fields_set:
            return ("spec.runPolicy.backoffLimit: a TrainJob (Kubeflow Trainer v2.3) cannot set "
                    "it per job; the ClusterTrainingRuntime's failurePolicy.maxRestarts (chart "
                    "value trainJob.maxRestarts) counts the restarts: remove it, or use the "
                    "PyTorchJob or Job backend")
        sched = job.spec.scheduling
        if sched and sched.priority_class_name:
            return ("spec.scheduling.priorityClassName: a TrainJob (Kubeflow Trainer v2.3) "
                    "cannot set a pod priority class per job; set it in the "
                    "ClusterTrainingRuntime, or use Kueue's kueue.x-k8s.io/priority-class "
                    "label")
        return None

    def state(self, obj: dict[str, Any]) -> ChildState:
        status = obj.get("status") or {}
        jobs = status.get("jobsStatus") or []
        complete, failed = condition(obj, "Complete"), condition(obj, "Failed")
        suspended = self.suspend_flag(obj) or condition(obj, "Suspended") is not None
        return ChildState(
            succeeded=(complete.get("message") or "training finished") if complete else None,
            failed=((failed.get("reason") or "Failed", failed.get("message")
                     or "training failed") if failed else None),
            suspended=suspended,
            # A child Job failed and the JobSet is making it again (failurePolicy).
            restarting=not failed and any((j.get("failed") or 0) > 0 for j in jobs),
            # ready: a child Job whose pods are all ready (active alone may still be pulling)
            running=not suspended and any((j.get("ready") or 0) > 0 for j in jobs),
            trainer_status=status.get("trainerStatus") or None,
        )

    def pod_name_matches(self, pod: str, job: str) -> bool:
        return re.fullmatch(rf"{re.escape(job)}-{NODE}-\d+-\d+-[a-z0-9]{{5}}", pod) is not None

    def makes_pods(self, kind: str, name: str, job: str) -> bool:
        """The runtime's JobSet makes one batch Job per node, which makes its pods."""
        return kind == "Job" and re.fullmatch(rf"{re.escape(job)}-{NODE}-\d+", name) is not None

    def owns_pod(self, pod: dict[str, Any], job: str) -> bool:
        meta = pod.get("metadata") or {}
        owners = meta.get("ownerReferences") or []
        return (meta.get("labels") or {}).get("jobset.sigs.k8s.io/jobset-name") == job and any(
            o.get("kind") == "Job" and re.fullmatch(rf"{re.escape(job)}-{NODE}-\d+",
                                                   o.get("name") or "")
            for o in owners)


TRAINJOB = TrainJobBackend()
