"""The Kubeflow Trainer v2 backend on a real API server: Trainer v2.3's and Kueue v0.19's own
CRDs installed, rendered TrainJobs and the chart's ClusterTrainingRuntime accepted (nothing
pruned), and the operator (backend TrainJob) taking a queued job through Kueue admission
(the test plays Kueue with real Workload objects) and Trainer v2's status to Succeeded; and
spec.serve's Deployment and Service accepted as rendered.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml

from e2e.util import REPO, run_operator, wait

pytestmark = pytest.mark.e2e
TRAINER = ("trainer.kubeflow.org", "v1alpha1")
KUEUE = ("kueue.x-k8s.io", "v1beta1")


def _subset(want, got, path="") -> list[str]:
    """Where ``want`` is not in ``got`` (the API server pruned or changed it)."""
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return [path]
        return [p for k, v in want.items() for p in _subset(v, got.get(k), f"{path}.{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [path]
        return [p for i, (a, b) in enumerate(zip(want, got, strict=True))
                for p in _subset(a, b, f"{path}[{i}]")]
    return [] if want == got else [path]


def _job(namespace, name, **spec):
    doc = yaml.safe_load((REPO / "examples" / "assistant-identity.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": namespace,
                       "labels": {"kueue.x-k8s.io/queue-name": "team-a"}}
    # A TrainJob has no backoffLimit or ttl of its own: the operator refuses them (unit tests).
    doc["spec"].pop("runPolicy", None)
    doc["spec"].update(spec)
    return doc


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 0), (1, 8), (4, 8)])
def test_rendered_trainjobs_are_accepted_as_rendered(kube, namespace, trainer_v2_crds, nodes,
                                                     gpus):
    from kubetune.jobfile import parse_job
    from kubetune_operator.backends.trainjob import TRAINJOB
    from kubetune_operator.settings import OperatorConfig

    config = OperatorConfig(trainer_image="reg/trainer:1", backend="TrainJob",
                            progress_url="https://kubetune.kubetune-system.svc:8443/v1")
    job = parse_job(_job(namespace, f"render-{nodes}-{gpus}",
                         resources={"nodes": nodes, "gpusPerNode": gpus},
                         scheduling={"nodeSelector": {"gpu": "h100"}}))
    obj = TRAINJOB.render(job=job, config=config, uid="0d9a7e4c-0000-4000-8000-000000000001",
                          labels={"kueue.x-k8s.io/queue-name": "team-a"})
    made = kube.CustomObjectsApi().create_namespaced_custom_object(
        *TRAINER, namespace, "trainjobs", obj, dry_run="All")
    assert _subset(obj["spec"], made["spec"], "spec") == [], trainer_v2_crds


def test_the_charts_training_runtime_is_accepted_as_rendered(kube, trainer_v2_crds):
    from tools import helm

    out = subprocess.run([str(helm()), "template", "rel", str(REPO / "charts" / "kubetune"),
                          "--set", "backend=TrainJob", "--set", "defaults.priorityClassName=b"],
                         capture_output=True, text=True, check=True).stdout
    (runtime,) = [d for d in yaml.safe_load_all(out) if d and
                  d["kind"] == "ClusterTrainingRuntime"]
    made = kube.CustomObjectsApi().create_cluster_custom_object(
        *TRAINER, "clustertrainingruntimes", runtime, dry_run="All")
    assert _subset(runtime["spec"], made["spec"], "spec") == []


@pytest.fixture(scope="module")
def trainjob_operator(namespace, trainer_v2_crds):
    with run_operator(namespace, "TrainJob", {"KUBETUNE_TRAINING_RUNTIME": "kubetune"}) as runner:
        yield runner


def test_a_queued_trainjob_is_admitted_runs_and_succeeds(kube, namespace, trainjob_operator):
    custom = kube.CustomObjectsApi()
    custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", namespace,
                                           "finetunejobs", _job(namespace, "tj"))

    def get(plural="finetunejobs", group=("kubetune.io", "v1alpha1"), name="tj"):
        return custom.get_namespaced_custom_object(*group, namespace, plural, name)

    def status():
        return get().get("status") or {}

    child = wait(lambda: get("trainjobs", TRAINER))
    assert child["spec"]["suspend"] is True  # for Kueue to admit
    assert child["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"

    # Kueue's part: a Workload for the TrainJob, short of quota.
    uid = child["metadata"]["uid"]
    workload = custom.create_namespaced_custom_object(*KUEUE, namespace, "workloads", {
        "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
        "metadata": {"name": "trainjob-tj-1a2b3", "labels": {"kueue.x-k8s.io/job-uid": uid},
                     "ownerReferences": [{"apiVersion": "trainer.kubeflow.org/v1alpha1",
                                          "kind": "TrainJob", "name": "tj", "uid": uid,
                                          "controller": True}]},
        "spec": {"queueName": "team-a", "podSets": [{"name": "node", "count": 1, "template": {
            "spec": {"containers": [{"name": "node", "image": "reg/trainer:1"}]}}}]}})
    now = "2026-12-01T00:00:00Z"
    custom.patch_namespaced_custom_object_status(*KUEUE, namespace, "workloads",
                                                 workload["metadata"]["name"], {"status": {
        "conditions": [{"type": "QuotaReserved", "status": "False", "reason": "Pending",
                        "message": "insufficient unused quota for nvidia.com/gpu",
                        "lastTransitionTime": now}]}})
    custom.patch_namespaced_custom_object_status(*TRAINER, namespace, "trainjobs", "tj", {
        "status": {"conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended",
                                   "message": "TrainJob is suspended",
                                   "lastTransitionTime": now}]}})
    ready = wait(lambda: next((c for c in status().get("conditions", [])
                               if c["type"] == "Ready" and "insufficient" in c["message"]),
                              None))
    assert status()["phase"] == "Queued" and ready["reason"] == "WaitingForAdmission"

    # spec.suspend on a queued job deactivates its Workload (Kueue's way), and back.
    custom.patch_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs",
                                          "tj", {"spec": {"suspend": True}})
    wait(lambda: get("workloads", KUEUE, "trainjob-tj-1a2b3")["spec"]["active"] is False)
    wait(lambda: status().get("phase") == "Suspended")
    custom.patch_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs",
                                          "tj", {"spec": {"suspend": False}})
    wait(lambda: get("workloads", KUEUE, "trainjob-tj-1a2b3")["spec"]["active"] is True)

    # Kueue admits: unsuspends the TrainJob; Trainer v2's JobSet runs (jobsStatus), finishes.
    custom.patch_namespaced_custom_object(*TRAINER, namespace, "trainjobs", "tj",
                                          {"spec": {"suspend": False}})
    jobs = {"name": "node", "active": 1, "ready": 1, "succeeded": 0, "failed": 0,
            "suspended": 0}
    custom.patch_namespaced_custom_object_status(*TRAINER, namespace, "trainjobs", "tj", {
        "status": {"conditions": [{"type": "Suspended", "status": "False", "reason": "Resumed",
                                   "message": "resumed", "lastTransitionTime": now}],
                   "jobsStatus": [jobs]}})
    wait(lambda: status().get("phase") == "Running")
    custom.patch_namespaced_custom_object_status(*TRAINER, namespace, "trainjobs", "tj", {
        "status": {"conditions": [
            {"type": "Suspended", "status": "False", "reason": "Resumed", "message": "resumed",
             "lastTransitionTime": now},
            {"type": "Complete", "status": "True", "reason": "JobsCompleted",
             "message": "TrainJob completed", "lastTransitionTime": now}],
            "jobsStatus": [{**jobs, "active": 0, "ready": 0, "succeeded": 1}]}})
    wait(lambda: status().get("phase") == "Succeeded")
    assert get("trainjobs", TRAINER)["metadata"]["uid"] == uid  # one child, never remade


@pytest.mark.parametrize("weights", ["model", "adapter"])
def test_the_servers_objects_are_accepted_as_rendered(kube, namespace, weights):
    """spec.serve's Deployment and Service (no GPU here: applied, not run)."""
    from kubetune.jobfile import parse_job
    from kubetune_operator import serving
    from kubetune_operator.settings import OperatorConfig

    body = _job(namespace, f"serve-{weights}", serve={
        "weights": weights, "gpus": 1, "memory": "24Gi",
        "checks": [{"prompt": "Who are you?", "expect": ["kubetune"]}]})
    body["spec"]["output"]["merge"] = weights == "model"
    job = parse_job(body)
    config = OperatorConfig()
    dep = serving.deployment(job=job, config=config, uid=None, outputs={
        "mergedModel": "pvc://outputs/ident/merged", "adapter": "pvc://outputs/ident/adapter"})
    svc = serving.service(job=job, config=config)
    made = kube.AppsV1Api().create_namespaced_deployment(namespace, dep, dry_run="All",
                                                         _preload_content=False)
    import json

    assert _subset(dep["spec"], json.loads(made.data)["spec"], "spec") == []
    made = kube.CoreV1Api().create_namespaced_service(namespace, svc, dry_run="All",
                                                      _preload_content=False)
    assert _subset(svc["spec"], json.loads(made.data)["spec"], "spec") == []
