"""Kubeflow Training Operator v1: ``PyTorchJob`` (kubeflow.org/v1), in maintenance upstream.

One Master replica and ``nodes - 1`` Workers, the trainer container named ``pytorch`` (the
training operator requires it), pods ``<job>-master-0`` / ``<job>-worker-N`` owned by the
PyTorchJob; suspend at ``spec.runPolicy.suspend``; state from conditions alone.
"""

from __future__ import annotations

import re
from typing import Any

from kubetune_operator import builders
from kubetune_operator.apiserver import CURRENT
from kubetune_operator.backends import Backend, ChildState, condition

PORT = 23456
# The trainer's exit code decides (kubetune.errors): Kubeflow's rule reads 1-127 as permanent
# (2: the spec or data; the job fails once) and 128-255 as retryable (143 after SIGTERM, 137
# OOM-killed, 200 a crash): the pod is made again and resumes.
RESTART = "ExitCode"


class PyTorchJobBackend(Backend):
    api_version = "kubeflow.org/v1"
    kind = "PyTorchJob"
    plural = "pytorchjobs"
    container = "pytorch"
    suspend_path = ("spec", "runPolicy", "suspend")
    provider = "the Kubeflow Training Operator (v1, which serves PyTorchJob)"

    def render(self, *, job, config, uid=None, labels=None, server=CURRENT) -> dict[str, Any]:
        """``labels``: the FineTuneJob's own, of which the Kueue ones are passed through so
        Kueue queues and admits the PyTorchJob."""
        spec = job.spec
        r = spec.resources
        passed = builders.kueue_labels(labels, config)

        def template(role: str) -> dict[str, Any]:
            pod = builders.pod_template(job=job, config=config, role=role,
                                        container=self.container)
            pod["spec"]["containers"][0]["ports"] = [
                {"name": "pytorchjob-port", "containerPort": PORT, "protocol": "TCP"}]
            return pod

        replicas: dict[str, Any] = {"Master": {
            "replicas": 1, "restartPolicy": RESTART, "template": template("master")}}
        if r.nodes > 1:
            replicas["Worker"] = {"replicas": r.nodes - 1, "restartPolicy": RESTART,
                                  "template": template("worker")}
        run_policy: dict[str, Any] = {
            "cleanPodPolicy": "None",  # keep finished pods' status (exit codes, messages)
            "backoffLimit": spec.run_policy.backoff_limit,
            # Kueue admits a queued job by unsuspending it: create it suspended.
            "suspend": spec.suspend or builders.KUEUE_QUEUE_LABEL in passed,
        }
        if spec.run_policy.active_deadline_seconds:
            run_policy["activeDeadlineSeconds"] = spec.run_policy.active_deadline_seconds
        if spec.run_policy.ttl_seconds_after_finished is not None:
            run_policy["ttlSecondsAfterFinished"] = spec.run_policy.ttl_seconds_after_finished
        meta = builders.child_metadata(job, uid, passed)
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "metadata": meta,
            "spec": {
                # One process per GPU; a CPU-only job runs one process per node.
                "nprocPerNode": str(r.gpus_per_node or 1),
                "runPolicy": run_policy,
                "pytorchReplicaSpecs": replicas,
            },
        }

    def state(self, obj: dict[str, Any]) -> ChildState:
        failed = condition(obj, "Failed")
        succeeded = condition(obj, "Succeeded")
        return ChildState(
            succeeded=(succeeded.get("message") or "training finished") if succeeded else None,
            failed=((failed.get("reason") or "Failed", failed.get("message")
                     or "training failed") if failed else None),
            suspended=self.suspend_flag(obj) or condition(obj, "Suspended") is not None,
            restarting=condition(obj, "Restarting") is not None,
            running=condition(obj, "Running") is not None,
        )

    def pod_name_matches(self, pod: str, job: str) -> bool:
        return re.fullmatch(rf"{re.escape(job)}-(master|worker)-\d+", pod) is not None

    def owns_pod(self, pod: dict[str, Any], job: str) -> bool:
        owners = (pod.get("metadata") or {}).get("ownerReferences") or []
        return any(o.get("kind") == self.kind and o.get("name") == job for o in owners)


PYTORCHJOB = PyTorchJobBackend()
