"""Builders: golden objects, validated against the real PyTorchJob CRD schema."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import CONFORMANCE
from kubetune.jobfile import load_job, parse_job
from kubetune_operator import builders
from kubetune_operator.backends import children
from kubetune_operator.backends.pytorchjob import PYTORCHJOB
from kubetune_operator.builders import OperatorConfig

REPO = Path(__file__).resolve().parents[1]
PYTORCHJOB_CRD = CONFORMANCE / "kubeflow" / "kubeflow.org_pytorchjobs.yaml"
# Rendering of the training objects; the pre-flight Job has its own tests (test_preflight
# in this file), so these leave it out.
CONFIG = OperatorConfig(trainer_image="registry.example/kubetune/trainer:1",
                        progress_url="https://kubetune.kubetune-system.svc:8443/v1",
                        progress_ca_configmap="kubetune-ca", preflight="skip")


def _strict(schema):
    """The CRD's structural schema as JSON Schema that refuses unknown fields (the API server
    would silently prune them: a rendered field it does not know is a bug of ours)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        for key in ("properties",):
            for child in node.get(key, {}).values():
                walk(child)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def pytorchjob_schema():
    if not PYTORCHJOB_CRD.exists():
        pytest.skip(f"{PYTORCHJOB_CRD} not found")
    crd = yaml.safe_load(PYTORCHJOB_CRD.read_text())
    return _strict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def _job(**spec):
    base = {"model": {"source": "hf://Qwen/Qwen2.5-1.5B-Instruct",
                      "secretRef": {"name": "hf-token"}},
            "datasets": [{"source": "pvc://data/identity.json", "format": "alpaca"},
                         {"source": "pvc://data/dataset_info.json", "entries": ["alpaca_en_demo"]}],
            "output": {"uri": "pvc://outputs/assistant-identity", "merge": True}}
    base.update(spec)
    return parse_job({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                      "metadata": {"name": "assistant-identity", "namespace": "team-a"},
                      "spec": base})


def _container(obj, role="Master"):
    return obj["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (1, 8), (4, 8), (1, 0)])
def test_pytorchjob_topology_is_valid_against_the_real_crd(nodes, gpus, pytorchjob_schema):
    job = _job(resources={"nodes": nodes, "gpusPerNode": gpus})
    obj = PYTORCHJOB.render(job=job, config=CONFIG, uid="u-1")
    jsonschema.validate(obj, pytorchjob_schema)
    specs = obj["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    assert ("Worker" in specs) == (nodes > 1)
    if nodes > 1:
        assert specs["Worker"]["replicas"] == nodes - 1
    assert obj["spec"]["nprocPerNode"] == str(gpus or 1)
    limits = _container(obj).get("resources", {}).get("limits", {})
    assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)


def test_pytorchjob_golden(pytorchjob_schema):
    job = _job(scheduling={"nodeSelector": {"gpu": "h100"},
                           "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                            "effect": "NoSchedule"}],
                           "priorityClassName": "training"},
               runPolicy={"backoffLimit": 2, "activeDeadlineSeconds": 36000,
                          "ttlSecondsAfterFinished": 600},
               resources={"gpusPerNode": 2, "memory": "64Gi", "cpu": "8"})
    obj = PYTORCHJOB.render(job=job, config=CONFIG, uid="u-1",
                              labels={"kueue.x-k8s.io/queue-name": "team-a", "other": "x"})
    jsonschema.validate(obj, pytorchjob_schema)
    meta = obj["metadata"]
    assert meta["name"] == "assistant-identity" and meta["namespace"] == "team-a"
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "other" not in meta["labels"]
    assert meta["ownerReferences"] == [{
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "name": "assistant-identity", "uid": "u-1", "controller": True,
        "blockOwnerDeletion": True}]
    assert obj["spec"]["runPolicy"] == {"cleanPodPolicy": "None", "backoffLimit": 2,
                                        "suspend": True,  # queued: Kueue unsuspends it
                                        "activeDeadlineSeconds": 36000,
                                        "ttlSecondsAfterFinished": 600}
    pod = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["priorityClassName"] == "training"
    # The exit code decides: 2 fails the job once, 143/137/200 make the pod again.
    assert {r["restartPolicy"] for r in obj["spec"]["pytorchReplicaSpecs"].values()} == \
        {"ExitCode"}
    assert pod["terminationGracePeriodSeconds"] == 300  # runPolicy's default: time to save
    c = pod["containers"][0]
    assert {"name": "KUBETUNE_GRACE_SECONDS", "value": "300"} in c["env"]
    assert c["name"] == "pytorch" and c["image"] == "registry.example/kubetune/trainer:1"
    assert c["args"] == ["/etc/kubetune/job.yaml", "--pvc-root", "/mnt/pvc"]
    assert c["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456,
                           "protocol": "TCP"}]
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "2", "cpu": "8", "memory": "64Gi"}
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token",
                                                             "key": "token"}}
    assert env["KUBEFLOW_TRAINER_SERVER_URL"]["value"] == (
        "https://kubetune.kubetune-system.svc:8443/v1/namespaces/team-a/finetunejobs/"
        "assistant-identity/status")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/mnt/pvc/data"]["readOnly"] is True
    assert mounts["/mnt/pvc/outputs"]["readOnly"] is False
    assert mounts["/dev/shm"]["name"] == "dshm"
    volumes = {v["name"]: v for v in pod["volumes"]}
    token = volumes["kubetune-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "kubetune"


@pytest.mark.parametrize(("url", "users", "mounted"), [
    ("https://kubetune.kubetune-system.svc:8443/v1", None, "kubetune-progress-ca"),
    ("https://kubetune.kubetune-system.svc:8443/v1", "team-ca", "team-ca"),
    ("http://127.0.0.1:8443/v1", None, None),  # plain HTTP, named: no CA
    (None, None, None),  # no endpoint: no token, no CA
])
def test_pods_get_the_progress_ca_beside_their_token(url, users, mounted):
    """HTTPS by default: the CA ConfigMap the operator keeps in the job's namespace (or the
    user's) is mounted beside the token, and both reporting clients are pointed at it."""
    config = OperatorConfig(trainer_image="t:1", progress_url=url, progress_ca_configmap=users)
    c = _container(PYTORCHJOB.render(job=_job(), config=config))
    pod = PYTORCHJOB.render(job=_job(), config=config)["spec"]["pytorchReplicaSpecs"][
        "Master"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    if url is None:
        assert "kubetune-token" not in volumes and "KUBETUNE_PROGRESS_URL" not in env
        return
    sources = volumes["kubetune-token"]["projected"]["sources"]
    if mounted is None:
        assert len(sources) == 1 and "KUBETUNE_PROGRESS_CA_CERT" not in env
        return
    assert sources[1] == {"configMap": {"name": mounted,
                                        "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
    assert env["KUBETUNE_PROGRESS_CA_CERT"] == env["KUBEFLOW_TRAINER_SERVER_CA_CERT"] == \
        "/var/run/secrets/kubetune/ca.crt"


def test_secrets_only_by_reference():
    job = _job()
    cm = builders.config_map(job=job, uid="u")
    text = yaml.safe_dump(cm) + yaml.safe_dump(PYTORCHJOB.render(job=job, config=CONFIG))
    assert "secretKeyRef" in text and "hf-token" in text
    assert "value: hf_" not in text  # no literal token anywhere


def test_config_map_carries_the_job_the_trainer_parses_back():
    job = _job()
    cm = builders.config_map(job=job, uid="u")
    data = yaml.safe_load(cm["data"]["job.yaml"])
    again = parse_job(data)
    assert again.spec == job.spec
    assert again.metadata.name == "assistant-identity"


def test_rendering_is_deterministic_and_hash_tracks_the_spec():
    a = children(job=_job(), config=CONFIG, uid="u")
    b = children(job=_job(), config=CONFIG, uid="u")
    assert a == b
    changed = PYTORCHJOB.render(job=_job(stage="pt"), config=CONFIG, uid="u")
    assert changed["metadata"]["annotations"][builders.SPEC_HASH] != \
        a[1]["metadata"]["annotations"][builders.SPEC_HASH]


def test_suspend_renders_a_suspended_pytorchjob():
    obj = PYTORCHJOB.render(job=_job(suspend=True), config=CONFIG)
    assert obj["spec"]["runPolicy"]["suspend"] is True


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_render_valid_children(path, pytorchjob_schema):
    job = load_job(path)
    for obj in children(job=job, config=CONFIG, uid="u"):
        if obj["kind"] == "PyTorchJob":
            jsonschema.validate(obj, pytorchjob_schema)


def test_the_strict_schema_catches_a_field_the_crd_does_not_know(pytorchjob_schema):
    obj = PYTORCHJOB.render(job=_job(), config=CONFIG)
    obj["spec"]["pytorchReplicaSpecs"]["Master"]["replica"] = 1  # typo of `replicas`
    with pytest.raises(jsonschema.ValidationError, match="'replica' was unexpected"):
        jsonschema.validate(obj, pytorchjob_schema)


def test_operator_defaults_for_priority_class_and_kueue_queue():
    config = OperatorConfig(default_priority_class="batch-low", default_queue="shared")
    obj = PYTORCHJOB.render(job=_job(), config=config)
    assert obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "shared"
    assert obj["spec"]["runPolicy"]["suspend"] is True  # Kueue admits it
    pod = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["priorityClassName"] == "batch-low"
    own = PYTORCHJOB.render(job=_job(scheduling={"priorityClassName": "urgent"}),
                              config=config, labels={"kueue.x-k8s.io/queue-name": "mine"})
    assert own["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "mine"
    assert own["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
        "priorityClassName"] == "urgent"


def test_host_network_only_when_the_operator_setting_asks(pytorchjob_schema):
    def pod(config):
        return PYTORCHJOB.render(job=_job(), config=config)["spec"]["pytorchReplicaSpecs"][
            "Master"]["template"]["spec"]

    assert "hostNetwork" not in pod(OperatorConfig())
    obj = PYTORCHJOB.render(job=_job(), config=OperatorConfig(pod_host_network=True))
    assert pod(OperatorConfig(pod_host_network=True))["hostNetwork"] is True
    assert pod(OperatorConfig(pod_host_network=True))["dnsPolicy"] == "ClusterFirstWithHostNet"
    jsonschema.validate(obj, pytorchjob_schema)


def test_trainer_env_secret_keys_render_as_references_only(pytorchjob_schema):
    job = _job(trainer={"env": [
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "k"}}},
        {"name": "WANDB_MODE", "value": "offline"}]})
    obj = PYTORCHJOB.render(job=job, config=CONFIG)
    jsonschema.validate(obj, pytorchjob_schema)
    env = _container(obj)["env"]
    assert env[-2:] == [
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "k"}}},
        {"name": "WANDB_MODE", "value": "offline"}]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names))  # nothing the operator sets is repeated
    cm = yaml.safe_load(builders.config_map(job=job)["data"]["job.yaml"])
    assert cm["spec"]["trainer"]["env"][0] == {
        "name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "k"}}}


def test_tolerations_render_as_the_pod_spec_writes_them(pytorchjob_schema):
    job = _job(scheduling={"tolerations": [{"key": "k", "operator": "Equal", "value": "v",
                                            "effect": "NoExecute", "tolerationSeconds": 30}]})
    obj = PYTORCHJOB.render(job=job, config=CONFIG)
    jsonschema.validate(obj, pytorchjob_schema)
    pod = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["tolerations"] == [{"key": "k", "operator": "Equal", "value": "v",
                                   "effect": "NoExecute", "tolerationSeconds": 30}]


# ------------------------------------------------------------------ Kubeflow Trainer v2 TrainJob

TRAINER_V2 = CONFORMANCE / "kubeflow-trainer-v2"
TRAINJOB_CONFIG = OperatorConfig(trainer_image="registry.example/kubetune/trainer:1",
                                 progress_url="https://kubetune.kubetune-system.svc:8443/v1",
                                 backend="TrainJob", training_runtime="kubetune",
                                 preflight="skip")


@pytest.fixture(scope="module")
def trainjob_schema():
    crd = TRAINER_V2 / "trainer.kubeflow.org_trainjobs.yaml"
    if not crd.exists():
        pytest.skip(f"{crd} not found")
    return _strict(yaml.safe_load(crd.read_text())["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"])


def _trainjob(job, config=TRAINJOB_CONFIG, **kw):
    from kubetune_operator.backends.trainjob import TRAINJOB

    return TRAINJOB.render(job=job, config=config, **kw)


def _patched_pod(obj):
    """The pod template our runtimePatches entry applies to the runtime's trainer job."""
    (patch,) = obj["spec"]["runtimePatches"]
    assert patch["manager"] == "kubetune.io/operator"
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rj["name"] == "node"
    return rj["template"]["spec"]["template"]


@pytest.mark.parametrize(("nodes", "gpus"), [(1, 1), (1, 8), (4, 8), (1, 0)])
def test_trainjob_topology_is_valid_against_the_real_crd(nodes, gpus, trainjob_schema):
    obj = _trainjob(_job(resources={"nodes": nodes, "gpusPerNode": gpus}), uid="u-1")
    jsonschema.validate(obj, trainjob_schema)
    assert obj["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and obj["kind"] == "TrainJob"
    trainer = obj["spec"]["trainer"]
    assert trainer["numNodes"] == nodes and trainer["numProcPerNode"] == (gpus or 1)
    limits = trainer.get("resourcesPerNode", {}).get("limits", {})
    assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)


def test_trainjob_golden(trainjob_schema):
    job = _job(scheduling={"nodeSelector": {"gpu": "h100"},
                           "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                            "effect": "NoSchedule"}]},
               runPolicy={"activeDeadlineSeconds": 36000},
               resources={"gpusPerNode": 2, "memory": "64Gi", "cpu": "8"},
               trainer={"serviceAccountName": "trainer", "env": [
                   {"name": "WANDB_API_KEY",
                    "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "k"}}}]})
    obj = _trainjob(job, uid="u-1", labels={"kueue.x-k8s.io/queue-name": "team-a", "x": "y"})
    jsonschema.validate(obj, trainjob_schema)
    meta = obj["metadata"]
    assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and "x" not in meta["labels"]
    assert meta["ownerReferences"][0]["uid"] == "u-1"
    spec = obj["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime", "name": "kubetune"}
    assert spec["suspend"] is True  # queued: Kueue unsuspends it
    assert spec["activeDeadlineSeconds"] == 36000
    trainer = spec["trainer"]
    assert trainer["image"] == "registry.example/kubetune/trainer:1"
    assert trainer["command"] == ["kubetune-launch"]
    assert trainer["args"] == ["/etc/kubetune/job.yaml", "--pvc-root", "/mnt/pvc"]
    assert trainer["resourcesPerNode"]["limits"] == {"nvidia.com/gpu": "2", "cpu": "8",
                                                     "memory": "64Gi"}
    env = {e["name"]: e for e in trainer["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "wandb"
    # Gate off: the pods report to kubetune's endpoint, with kubetune's token.
    assert env["KUBEFLOW_TRAINER_SERVER_URL"]["value"].endswith(
        "/namespaces/team-a/finetunejobs/assistant-identity/status")
    pod = _patched_pod(obj)
    assert pod["metadata"]["labels"]["kubetune.io/job"] == "assistant-identity"
    ps = pod["spec"]
    assert ps["nodeSelector"] == {"gpu": "h100"} and ps["serviceAccountName"] == "trainer"
    assert ps["tolerations"][0]["key"] == "nvidia.com/gpu"
    (c,) = ps["containers"]
    assert c["name"] == "node"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/mnt/pvc/outputs"]["readOnly"] is False and "/etc/kubetune" in mounts
    volumes = {v["name"]: v for v in ps["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "assistant-identity-config"
    assert "kubetune-token" in volumes


def test_trainjob_with_kubeflows_status_endpoint_leaves_the_reporting_variables_to_it(
        trainjob_schema):
    config = OperatorConfig(trainer_image="t:1", progress_url="https://k/v1",
                            backend="TrainJob", trainer_status=True)
    obj = _trainjob(_job(), config=config)
    jsonschema.validate(obj, trainjob_schema)
    env = {e["name"]: e["value"] for e in obj["spec"]["trainer"]["env"] if "value" in e}
    assert not [n for n in env if n.startswith("KUBEFLOW_TRAINER_SERVER")]
    # kubetune's own reports (checkpoints, outputs) still go to kubetune's endpoint, with
    # kubetune's token: status.checkpoints/outputs, spec.serve and fromJob depend on them.
    assert env["KUBETUNE_PROGRESS_URL"] == (
        "https://k/v1/namespaces/team-a/finetunejobs/assistant-identity/status")
    assert env["KUBETUNE_PROGRESS_TOKEN"] == "/var/run/secrets/kubetune/token"
    pod = _patched_pod(obj)
    (token,) = [v for v in pod["spec"]["volumes"] if v["name"] == "kubetune-token"]
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "kubetune"
    assert {"name": "kubetune-token", "mountPath": "/var/run/secrets/kubetune",
            "readOnly": True} in pod["spec"]["containers"][0]["volumeMounts"]


def test_trainjob_suspend_and_runtime_name():
    config = OperatorConfig(backend="TrainJob", training_runtime="team-torch")
    obj = _trainjob(_job(suspend=True), config=config)
    assert obj["spec"]["suspend"] is True
    assert obj["spec"]["runtimeRef"]["name"] == "team-torch"
    assert _trainjob(_job(), config=config)["spec"]["suspend"] is False


def test_the_backend_setting_picks_the_training_object():
    kinds = [o["kind"] for o in children(job=_job(), config=TRAINJOB_CONFIG)]
    assert kinds == ["ConfigMap", "TrainJob"]
    assert children(job=_job(), config=CONFIG)[1]["kind"] == "PyTorchJob"
    from kubetune_operator.backends import backend_named

    with pytest.raises(ValueError, match="backend 'mpijob' is not known; expected one of "
                                         "Job, PyTorchJob, TrainJob$"):
        backend_named("mpijob")


def test_trainjob_refuses_a_per_job_priority_class():
    from kubetune_operator.backends.trainjob import TRAINJOB
    from kubetune_operator.validation import cluster_problem

    job = _job(scheduling={"priorityClassName": "urgent"})
    assert cluster_problem(job, TRAINJOB).startswith("spec.scheduling.priorityClassName: ")
    assert cluster_problem(job, PYTORCHJOB) is None


def test_trainjob_refuses_what_it_cannot_carry_per_job_never_drops_it(trainjob_schema):
    """Before: ttlSecondsAfterFinished and backoffLimit were silently left out."""
    from kubetune_operator.backends.trainjob import TRAINJOB
    from kubetune_operator.validation import cluster_problem

    ttl = _job(runPolicy={"ttlSecondsAfterFinished": 600})
    assert cluster_problem(ttl, TRAINJOB).startswith(
        "spec.runPolicy.ttlSecondsAfterFinished: a TrainJob (Kubeflow Trainer v2.3) cannot")
    limit = _job(runPolicy={"backoffLimit": 5})
    assert cluster_problem(limit, TRAINJOB).startswith("spec.runPolicy.backoffLimit: ")
    from kubetune_operator.backends.job import JOB

    assert cluster_problem(ttl, PYTORCHJOB) is None and cluster_problem(limit, JOB) is None
    # Not set: the runtime's (no refusal); the grace period reaches the pods.
    job = _job(runPolicy={"terminationGracePeriodSeconds": 900})
    assert cluster_problem(job, TRAINJOB) is None
    obj = _trainjob(job, uid="u-1")
    jsonschema.validate(obj, trainjob_schema)
    pod = obj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 900
    assert {"name": "KUBETUNE_GRACE_SECONDS", "value": "900"} in obj["spec"]["trainer"]["env"]


@pytest.mark.parametrize("uri", ["s3://bucket/runs/a", "gs://bucket/runs/a", "hf://org/model"])
def test_object_store_outputs_run_in_a_cluster_staged_on_a_bounded_scratch_volume(
        uri, pytorchjob_schema):
    from kubetune_operator.validation import cluster_problem

    job = _job(output={"uri": uri, "secretRef": {"name": "store"}},
               resources={"gpusPerNode": 1, "scratchSize": "200Gi"})
    assert cluster_problem(job, PYTORCHJOB) is None
    obj = PYTORCHJOB.render(job=job, config=OperatorConfig())
    jsonschema.validate(obj, pytorchjob_schema)
    pod = obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    scratch = next(v for v in pod["volumes"] if v["name"] == "scratch")
    assert scratch == {"name": "scratch", "emptyDir": {"sizeLimit": "200Gi"}}
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v
                and v["persistentVolumeClaim"]["claimName"] == "outputs"]  # no claim for it
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert any(n.startswith("KUBETUNE_OUTPUT_") and "secretKeyRef" in e["valueFrom"]
               for n, e in env.items() if "valueFrom" in e)
    assert next(v for v in PYTORCHJOB.render(job=_job(), config=OperatorConfig())["spec"][
        "pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
        if v["name"] == "scratch") == {"name": "scratch", "emptyDir": {}}  # no limit by default


def test_what_cannot_work_with_a_store_output_is_refused_naming_the_field():
    from kubetune_operator.validation import cluster_problem

    served = _job(output={"uri": "s3://bucket/a", "secretRef": {"name": "s"}, "merge": True},
                  serve={})
    assert cluster_problem(served, PYTORCHJOB).startswith("spec.serve: ")
    hub = _job(output={"uri": "hf://org/model", "secretRef": {"name": "s"}, "merge": True},
               serve={})
    assert cluster_problem(hub, PYTORCHJOB) is None  # the server reads it from the Hub
    local = _job(output={"uri": "outputs/here"})
    assert cluster_problem(local, PYTORCHJOB).startswith("spec.output.uri: 'outputs/here' is a "
                                                         "local path")


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_render_valid_trainjobs(path, trainjob_schema):
    job = load_job(path)
    for obj in children(job=job, config=TRAINJOB_CONFIG, uid="u"):
        if obj["kind"] == "TrainJob":
            jsonschema.validate(obj, trainjob_schema)


def test_the_strict_trainjob_schema_catches_an_unknown_field(trainjob_schema):
    obj = _trainjob(_job())
    obj["spec"]["trainer"]["numProcsPerNode"] = 1  # typo
    with pytest.raises(jsonschema.ValidationError, match="'numProcsPerNode' was unexpected"):
        jsonschema.validate(obj, trainjob_schema)


def test_kubetune_render_backend_prints_what_the_trainjob_operator_would_create(
        trainjob_schema, tmp_path):
    from kubetune.cli import app
    from typer.testing import CliRunner

    example = REPO / "examples" / "assistant-identity.yaml"
    refused = CliRunner().invoke(app, ["render", str(example), "--backend", "TrainJob"])
    assert refused.exit_code == 2  # its runPolicy.ttlSecondsAfterFinished: the runtime's
    assert "spec.runPolicy.ttlSecondsAfterFinished: a TrainJob" in refused.output
    doc = yaml.safe_load(example.read_text())
    del doc["spec"]["runPolicy"]
    path = tmp_path / example.name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = CliRunner().invoke(app, ["render", str(path), "--backend", "TrainJob", "-n", "a"])
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job", "TrainJob"]  # Job: pre-flight
    jsonschema.validate(docs[2], trainjob_schema)
    assert docs[2] == children(job=load_job(path).model_copy(update={
        "metadata": load_job(path).metadata.model_copy(update={"namespace": "a"})}),
        config=OperatorConfig(backend="TrainJob"), labels=load_job(path).metadata.labels)[2]
    bad = CliRunner().invoke(app, ["render", str(path), "--backend", "MPIJob"])
    assert bad.exit_code == 2 and "--backend: backend 'MPIJob' is not known" in bad.output


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero2-offload", "zero3", "zero3-offload",
                                      "fsdp2"])
def test_the_strategy_reaches_the_launcher_on_every_node(strategy, pytorchjob_schema):
    obj = PYTORCHJOB.render(job=_job(resources={"nodes": 2, "gpusPerNode": 8,
                                                "strategy": strategy}),
                            config=OperatorConfig())
    jsonschema.validate(obj, pytorchjob_schema)
    for role in ("Master", "Worker"):
        c = _container(obj, role)
        assert c["command"] == ["kubetune-launch"]
        assert c["args"] == ["/etc/kubetune/job.yaml", "--pvc-root", "/mnt/pvc"] + (
            [] if strategy == "ddp" else ["--strategy", strategy])


def test_the_spec_hash_ignores_defaults_and_sees_changes():
    """A field written out at its default (as a newer API version adds one) is no change to a
    job in flight; a real change is."""
    plain = builders.spec_hash(_job())
    assert builders.spec_hash(_job(resources={"strategy": "ddp"},
                                   training={"learningRate": None})) == plain
    assert builders.spec_hash(_job(resources={"strategy": "zero3"})) != plain


# ------------------------------------------------------------------ the Job (batch/v1) backend

JOB_CONFIG = OperatorConfig(trainer_image="registry.example/kubetune/trainer:1",
                            progress_url="https://kubetune.kubetune-system.svc:8443/v1",
                            backend="Job", preflight="skip")
QUEUED = {"kueue.x-k8s.io/queue-name": "team-a"}


def _server(version):
    from kubetune_operator.apiserver import ApiServer

    major, minor = version.split(".")[:2]
    return ApiServer.from_version({"major": major, "minor": minor, "gitVersion": f"v{version}"})


def _valid_core(objs, version="1.33.0"):
    """Every object against the real Kubernetes schema of that release (unknown fields too)."""
    import kubernetes_validate

    for obj in objs:
        obj = copy.deepcopy(obj)
        obj["metadata"].setdefault("namespace", "team-a")
        kubernetes_validate.validate(obj, version, strict=True)


def _trainer(obj):
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    assert c["name"] == "trainer"
    return c


def _env(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_job_one_node_is_one_pod_with_the_launcher_and_a_failure_policy():
    job = _job(resources={"gpusPerNode": 4}, runPolicy={"backoffLimit": 5,
                                                        "ttlSecondsAfterFinished": 600})
    objs = children(job=job, config=JOB_CONFIG, uid="u-1")
    assert [o["kind"] for o in objs] == ["ConfigMap", "Job"]  # no Service for one node
    _valid_core(objs)
    spec = objs[1]["spec"]
    assert objs[1]["apiVersion"] == "batch/v1"
    assert (spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (1, 1, 5)
    assert "completionMode" not in spec and "subdomain" not in spec["template"]["spec"]
    assert spec["suspend"] is False and spec["ttlSecondsAfterFinished"] == 600
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    assert spec["podFailurePolicy"] == {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                              "values": [2]},
         "onPodConditions": []},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                  "status": "True"}]},
        # SIGTERM'd after its checkpoint (kubectl delete pod has no DisruptionTarget)
        {"action": "Ignore", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                             "values": [143]},
         "onPodConditions": []}]}
    assert spec["podReplacementPolicy"] == "Failed"
    c = _trainer(objs[1])
    assert c["command"] == ["kubetune-launch"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    env = _env(c)
    assert (env["PET_NNODES"], env["PET_NODE_RANK"], env["PET_NPROC_PER_NODE"]) == ("1", "0", "4")
    assert "MASTER_ADDR" not in env
    assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}


def test_job_on_more_nodes_is_an_indexed_job_behind_a_headless_service():
    job = _job(resources={"nodes": 3, "gpusPerNode": 8})
    objs = children(job=job, config=JOB_CONFIG, uid="u-1")
    assert [o["kind"] for o in objs] == ["ConfigMap", "Service", "Job"]  # the Job last
    _valid_core(objs)
    svc, obj = objs[1], objs[2]
    name = "assistant-identity"
    assert svc["metadata"]["name"] == name and svc["metadata"]["ownerReferences"][0]["uid"] \
        == "u-1"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    pod = obj["spec"]["template"]
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    spec = obj["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert pod["spec"]["subdomain"] == name  # stable hostnames <job>-<index>.<service>
    env = _env(_trainer(obj))
    assert env["PET_NODE_RANK"] == {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"]) == ("3", "8")
    assert env["MASTER_ADDR"] == f"{name}-0.{name}" and env["MASTER_PORT"] == "29500"
    assert svc["spec"]["ports"][0]["port"] == 29500


def test_the_launcher_reads_the_job_topology_as_a_pytorchjobs():
    """What kubetune-launch makes of the Indexed Job's variables (the index as the downward
    API would give it on node 2)."""
    from kubetune_trainer.launch import command, topology

    obj = children(job=_job(resources={"nodes": 2, "gpusPerNode": 8}),
                            config=JOB_CONFIG)[-1]
    env = {k: v for k, v in _env(_trainer(obj)).items() if isinstance(v, str)}
    topo = topology({**env, "PET_NODE_RANK": "1"}, gpus=8)
    assert (topo.nnodes, topo.node_rank, topo.world_size) == (2, 1, 16)
    cmd = command(topo, [], python="python")
    assert cmd[cmd.index("--master_addr") + 1] == "assistant-identity-0.assistant-identity"
    assert cmd[cmd.index("--master_port") + 1] == "29500"


def test_a_queued_job_is_created_suspended_for_kueue():
    from kubetune_operator.backends.job import JOB

    obj = JOB.render(job=_job(), config=JOB_CONFIG, labels={**QUEUED, "x": "y"})
    _valid_core([obj])
    assert obj["spec"]["suspend"] is True
    assert obj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "x" not in obj["metadata"]["labels"]
    assert JOB.render(job=_job(suspend=True), config=JOB_CONFIG)["spec"]["suspend"] is True
    assert JOB.suspend_patch(False) == {"spec": {"suspend": False}}


@pytest.mark.parametrize(("version", "present"), [
    ("1.20.15", set()),
    ("1.22.0", {"suspend", "completionMode", "ttlSecondsAfterFinished"}),
    ("1.26.3", {"suspend", "completionMode", "ttlSecondsAfterFinished", "podFailurePolicy"}),
    ("1.29.0", {"suspend", "completionMode", "ttlSecondsAfterFinished", "podFailurePolicy",
                "podReplacementPolicy"}),
])
def test_the_job_carries_only_what_its_api_server_knows(version, present):
    """A 1.20 server prunes fields it does not know, silently: a Job rendered for a newer one
    would not be the Job we meant (no suspend: it runs at once; no failure policy). (More
    than one node is refused before 1.22: one node there.)"""
    server = _server(version)
    job = _job(resources={"nodes": 2 if server.indexed_jobs else 1},
               runPolicy={"ttlSecondsAfterFinished": 60})
    obj = children(job=job, config=JOB_CONFIG, server=server)[-1]
    optional = {"suspend", "completionMode", "ttlSecondsAfterFinished", "podFailurePolicy",
                "podReplacementPolicy"}
    assert set(obj["spec"]) & optional == present
    if server.at_least(25):  # kubernetes-validate has the schemas of 1.25 and later
        _valid_core([obj], version)


def test_an_old_api_server_refuses_more_nodes_and_kueue_naming_the_field():
    from kubetune_operator.backends.job import JOB
    from kubetune_operator.validation import cluster_problem

    old, new = _server("1.20.15"), _server("1.33.1")
    two = _job(resources={"nodes": 2})
    assert cluster_problem(two, JOB, old).startswith("spec.resources.nodes: 2 nodes need an "
                                                     "Indexed Job (Kubernetes 1.22+); this API "
                                                     "server is v1.20.15")
    assert cluster_problem(two, JOB, new) is None
    assert cluster_problem(_job(), JOB, old) is None  # one node runs there
    assert cluster_problem(_job(), JOB, old, queued=True).startswith(
        "metadata.labels[kueue.x-k8s.io/queue-name]: ")
    assert cluster_problem(_job(), JOB, new, queued=True) is None
    assert cluster_problem(two, PYTORCHJOB, old, queued=True) is None  # a CRD: its own fields
    assert JOB.suspend_problem(old).startswith("spec.suspend: ")
    assert JOB.suspend_problem(new) is None


def test_the_api_server_version_is_read_as_servers_write_it():
    from kubetune_operator.apiserver import ApiServer

    eks = ApiServer.from_version({"major": "1", "minor": "20+",
                                  "gitVersion": "v1.20.15-eks-abc"})
    assert (eks.minor, eks.indexed_jobs, eks.version) == (20, False, "v1.20.15-eks-abc")
    bare = ApiServer.from_version({"major": "", "minor": "", "gitVersion": "v1.31.2+k3s1"})
    assert (bare.minor, bare.pod_failure_policy, bare.pod_replacement_policy) == (31, True, True)
    with pytest.raises(ValueError, match="unreadable"):
        ApiServer.from_version({"gitVersion": "devel"})


def _job_obj(status=None, annotations=None, suspend=False):
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "ident", "annotations": annotations or {}},
            "spec": {"suspend": suspend}, "status": status or {}}


def _cond(type_, reason="", message=""):
    return {"type": type_, "status": "True", "reason": reason, "message": message,
            "lastProbeTime": "2026-12-07T10:00:00Z",
            "lastTransitionTime": "2026-12-07T10:00:00Z"}


def test_job_state_from_what_the_job_controller_writes():
    from kubetune_operator.backends.job import JOB

    start = {"startTime": "2026-12-07T09:00:00Z"}
    # Queued by Kueue: suspended, the Suspended condition (1.24+), no pods.
    s = JOB.state(_job_obj({"conditions": [_cond("Suspended", "JobSuspended",
                                                 "Job suspended")]}, suspend=True))
    assert s.suspended and not s.running
    # Admitted, a pod pulling its image: active but not ready (1.24+ writes ready).
    s = JOB.state(_job_obj({**start, "active": 1, "ready": 0}))
    assert not s.running and not s.restarting and not s.suspended
    assert JOB.state(_job_obj({**start, "active": 1, "ready": 1})).running
    # 1.20 writes no ready: active it is.
    assert JOB.state(_job_obj({**start, "active": 1})).running
    # A pod failed; its replacement not up yet: restarting. Up again: running.
    s = JOB.state(_job_obj({**start, "failed": 1, "active": 1, "ready": 0}))
    assert s.restarting and not s.running
    s = JOB.state(_job_obj({**start, "failed": 1, "active": 1, "ready": 1}))
    assert s.running and not s.restarting
    s = JOB.state(_job_obj({**start, "succeeded": 1, "completionTime": "2026-12-07T11:00:00Z",
                            "conditions": [_cond("Complete")]}))
    assert s.succeeded == "training finished" and not s.failed
    s = JOB.state(_job_obj({**start, "failed": 4, "conditions": [_cond(
        "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")]}))
    assert s.failed == ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
    assert not s.restarting
    s = JOB.state(_job_obj({**start, "failed": 1, "conditions": [
        _cond("FailureTarget", "PodFailurePolicy", "m"), _cond(
            "Failed", "PodFailurePolicy", "Container trainer for pod team-a/ident-x7k2p failed "
            "with exit code 2 matching FailJob rule at index 0")]}))
    assert s.failed[0] == "PodFailurePolicy" and "exit code 2" in s.failed[1]
    s = JOB.state(_job_obj({**start, "failed": 1},
                           annotations={"kubetune.io/stopped": "pod ident-x7k2p exited 2"}))
    assert s.failed == ("PermanentError", "pod ident-x7k2p exited 2")


def _pod(name, code, container="trainer", owner="ident", message=""):
    return {"metadata": {"name": name, "ownerReferences": [
        {"apiVersion": "batch/v1", "kind": "Job", "name": owner, "uid": "j",
         "controller": True}]},
            "status": {"phase": "Failed", "containerStatuses": [{"name": container, "state": {
                "terminated": {"exitCode": code, "reason": "Error", "message": message}}}]}}


def test_a_permanent_exit_stops_the_job_only_where_the_server_cannot():
    from kubetune_operator.backends.job import JOB

    old, new = _server("1.20.15"), _server("1.26.0")
    running = _job_obj({"active": 1, "failed": 1})
    patch = JOB.stop_patch(running, [_pod("ident-x7k2p", 2)], old)
    assert patch == {"metadata": {"annotations": {"kubetune.io/stopped": (
        "pod ident-x7k2p exited with code 2 (a permanent error: not retried)")}},
        "spec": {"activeDeadlineSeconds": 1}}
    assert JOB.stop_patch(running, [_pod("ident-x7k2p", 2)], new) is None  # podFailurePolicy
    assert JOB.stop_patch(running, [_pod("ident-x7k2p", 1)], old) is None  # retried
    assert JOB.stop_patch(running, [_pod("ident-x7k2p", 137)], old) is None
    assert JOB.stop_patch(running, [_pod("ident-x7k2p", 2, container="sidecar")], old) is None
    assert JOB.stop_patch(running, [_pod("other-x7k2p", 2, owner="other")], old) is None
    stopped = _job_obj({"active": 1}, annotations=patch["metadata"]["annotations"])
    assert JOB.stop_patch(stopped, [_pod("ident-x7k2p", 2)], old) is None  # once


def test_job_pods_by_name_and_owner():
    from kubetune_operator.backends.job import JOB

    assert JOB.pod_name_matches("ident-x7k2p", "ident")  # one node
    assert JOB.pod_name_matches("ident-1-x7k2p", "ident")  # indexed
    for other in ("ident-master-0", "ident-node-0-0-x7k2p", "identx-x7k2p", "ident-x7k2"):
        assert not JOB.pod_name_matches(other, "ident"), other
    assert JOB.owns_pod(_pod("ident-x7k2p", 0), "ident")
    assert not JOB.owns_pod(_pod("ident-x7k2p", 0, owner="ident-node-0"), "ident")  # TrainJob's


def test_the_job_backend_is_picked_by_its_setting_and_rendered_by_the_cli():
    from kubetune.cli import app
    from kubetune_operator.backends import backend_named
    from kubetune_operator.backends.job import JOB
    from kubetune_operator.settings import OperatorConfig as Config
    from typer.testing import CliRunner

    assert backend_named(Config.from_env({"KUBETUNE_BACKEND": "job"}).backend) is JOB
    path = REPO / "examples" / "assistant-identity.yaml"
    result = CliRunner().invoke(app, ["render", str(path), "--backend", "job", "-n", "a"])
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(result.stdout))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job", "Job"]  # pre-flight, training
    _valid_core(docs)
    assert "podFailurePolicy" in docs[2]["spec"]  # for a current server
    assert docs[2]["spec"]["suspend"] is True  # the example names a Kueue queue
    assert "suspend" not in docs[1]["spec"]  # the pre-flight Job is not queued


# ------------------------------------------------------------------ the pre-flight Job


@pytest.mark.parametrize(("default", "spec", "gpus", "wanted"), [
    ("auto", None, 1, True), ("auto", None, 0, False),  # auto: jobs that ask for GPUs
    ("always", None, 0, True), ("skip", None, 8, False),
    ("skip", "always", 0, True), ("auto", "skip", 1, False),  # the job's own word wins
])
def test_which_jobs_get_a_pre_flight_pod(default, spec, gpus, wanted):
    job = _job(resources={"nodes": 1, "gpusPerNode": gpus},
               **({"preflight": spec} if spec else {}))
    config = OperatorConfig(trainer_image="t:1", preflight=default)
    assert builders.wants_preflight(job, config) is wanted
    kinds = [o["kind"] for o in children(job=job, config=config)]
    assert kinds == (["ConfigMap", "Job", "PyTorchJob"] if wanted else
                     ["ConfigMap", "PyTorchJob"])


def test_the_pre_flight_pod_is_the_trainer_on_cpu_with_the_jobs_volumes_and_credentials():
    job = _job(resources={"nodes": 2, "gpusPerNode": 8, "gpuMemory": "80Gi"},
               scheduling={"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100"}})
    config = OperatorConfig(trainer_image="t:1", preflight="auto",
                            progress_url="https://kubetune.kubetune-system.svc:8443/v1")
    cm, pf, ptj = children(job=job, config=config, uid="u-1")
    pod = pf["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    assert main["command"] == ["kubetune-preflight"] and main["image"] == "t:1"
    assert main["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"},  # small, no GPU
                                 "limits": {"memory": "8Gi"}}
    bigger = dataclasses.replace(config, preflight_resources=(("requests", "memory", "16Gi"),))
    _, pf_big, _ = children(job=job, config=bigger, uid="u-1")  # the chart's preflight.resources
    assert pf_big["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"memory": "16Gi"}}
    assert "nodeSelector" not in pod and pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False  # no API access: none needed
    assert pf["spec"]["backoffLimit"] == 0 and "suspend" not in pf["spec"]  # not queued
    env = {e["name"]: e for e in main["env"]}
    assert env["KUBETUNE_GPU_MEMORY"]["value"] == str(80 * 2**30)
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
    assert not [n for n in env if n.startswith("KUBEFLOW_TRAINER_")]
    # Its rows are the training pods' own: the same directory, beside the outputs.
    where = "/mnt/pvc/outputs/assistant-identity/.kubetune/prepared"
    train_env = {e["name"]: e.get("value") for e in ptj["spec"]["pytorchReplicaSpecs"][
        "Master"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_PREPARED_DIR"]["value"] == where == train_env["KUBETUNE_PREPARED_DIR"]
    mounts = {m["mountPath"]: m for m in main["volumeMounts"]}
    assert not mounts["/mnt/pvc/outputs"].get("readOnly")
    assert pf["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert builders.is_preflight(pf) and not builders.is_preflight(ptj)
    _valid_core([pf])
