"""The Helm chart, with the real helm binary: lint, render over several values sets, validate
every object (kubernetes-validate --strict for core kinds, the CRDs' own schemas for ours),
CRD drift, a values typo failing, and RBAC that allows exactly what the operator calls."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from tools import helm

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "kubetune"
K8S_VERSION = "1.33.0"

VALUE_SETS = {
    "default": [],
    "namespaced": ["--set", "watchNamespaces={team-a,team-b}"],
    "ha": ["--set", "replicaCount=2"],
    "no-crds-no-peering": ["--set", "crds.enabled=false", "--set", "peering.enabled=false"],
    "tls-and-defaults": ["--set", "progress.tlsSecretName=kubetune-tls",
                         "--set", "progress.caConfigMap=kubetune-ca",
                         "--set", "defaults.queueName=shared",
                         "--set", "defaults.priorityClassName=batch"],
    "no-progress": ["--set", "progress.enabled=false"],
    "gpu-memory": ["--set", "gpuMemory.default=80Gi",
                   "--set", "gpuMemory.NVIDIA-A100-SXM4-40GB=40Gi"],
    "servicemonitor": ["--set", "metrics.serviceMonitor.enabled=true",
                       "--set", "metrics.serviceMonitor.labels.release=prom"],
    "no-metrics": ["--set", "metrics.enabled=false", "--set", "progress.enabled=false"],
    "trainjob": ["--set", "backend=TrainJob", "--set", "defaults.priorityClassName=batch"],
    "trainjob-namespaced": ["--set", "backend=TrainJob", "--set", "watchNamespaces={team-a}"],
    "job": ["--set", "backend=job"],
    "job-namespaced-no-serve": ["--set", "backend=Job", "--set", "watchNamespaces={team-a}",
                                "--set", "serve.enabled=false"],
}


@pytest.fixture(scope="module")
def helm_bin() -> str:
    try:
        return str(helm())
    except (subprocess.CalledProcessError, OSError) as err:
        pytest.fail(f"could not get helm from the registry wheel: {err}")


def render(helm_bin: str, *args: str) -> list[dict]:
    out = subprocess.run([helm_bin, "template", "rel", str(CHART), "-n", "kubetune-system",
                          *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_helm_lint(helm_bin):
    for name, args in VALUE_SETS.items():
        out = subprocess.run([helm_bin, "lint", str(CHART), *args], capture_output=True,
                             text=True)
        assert out.returncode == 0, f"{name}: {out.stdout}{out.stderr}"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_rendered_object_is_valid(helm_bin, name):
    import kubernetes_validate

    docs = render(helm_bin, *VALUE_SETS[name])
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("kopf.dev/"):
            assert set(doc) <= {"apiVersion", "kind", "metadata"}
            continue
        if doc["kind"] == "ClusterTrainingRuntime":  # Kubeflow Trainer v2's kind: its schema
            _trainer_v2_schema_validate(doc)
            continue
        if doc["kind"] == "ServiceMonitor":  # prometheus-operator's kind: check its shape
            assert doc["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics",
                                                 "interval": "30s"}]
            assert doc["metadata"]["labels"]["release"] == "prom"
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {err}")


def _trainer_v2_schema_validate(doc):
    import jsonschema
    from conftest import CONFORMANCE
    from test_builders import _strict

    crd = CONFORMANCE / "kubeflow-trainer-v2" / "trainer.kubeflow.org_clustertrainingruntimes.yaml"
    schema = yaml.safe_load(crd.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.validate(doc, _strict(schema))


def test_the_trainjob_backend_ships_its_runtime_and_its_rbac_only(helm_bin):
    docs = render(helm_bin, *VALUE_SETS["trainjob"])
    (runtime,) = [d for d in docs if d["kind"] == "ClusterTrainingRuntime"]
    _trainer_v2_schema_validate(runtime)
    assert runtime["metadata"]["name"] == "kubetune"
    assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"  # what the operator's runtimePatches and pod checks expect
    assert node["template"]["metadata"]["labels"] == {
        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["name"] == "node"
    assert pod["containers"][0]["image"] == "ghcr.io/kubetune/trainer:0.1.0"
    assert pod["priorityClassName"] == "batch"  # a TrainJob cannot carry it per job
    # The trainer's exit codes: 2 fails the run once; 143 and disruptions make the pod again.
    assert pod["restartPolicy"] == "Never" and node["template"]["spec"]["backoffLimit"] == 0
    rules = node["template"]["spec"]["podFailurePolicy"]["rules"]
    assert [(r["action"], (r.get("onExitCodes") or {}).get("values")) for r in rules] == [
        ("FailJob", [2]), ("Ignore", None), ("Ignore", [143])]
    assert runtime["spec"]["template"]["spec"]["failurePolicy"]["rules"] == [
        {"name": "permanentError", "action": "FailJobSet",
         "onJobFailureReasons": ["PodFailurePolicy"]}]
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    trainjob_rules = {k: v for k, v in NAMESPACED.items() if k != ("kubeflow.org", "pytorchjobs")}
    trainjob_rules[("trainer.kubeflow.org", "trainjobs")] = {"get", "list", "watch", "create",
                                                             "patch"}
    assert _rules(role) == {**trainjob_rules,
                            ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch",
                                                                 "patch"},
                            ("apiextensions.k8s.io", "customresourcedefinitions"): {
                                "list", "watch"},
                            ("authentication.k8s.io", "tokenreviews"): {"create"}}
    env = {e["name"]: e.get("value") for e in next(
        d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["env"]}
    assert (env["KUBETUNE_BACKEND"], env["KUBETUNE_TRAINING_RUNTIME"],
            env["KUBETUNE_TRAINER_STATUS"]) == ("TrainJob", "kubetune", "false")
    # Namespaced: the TrainJob rules in each Role, the runtime still cluster-wide.
    docs = render(helm_bin, *VALUE_SETS["trainjob-namespaced"])
    (role,) = _watched_roles(docs)
    assert ("trainer.kubeflow.org", "trainjobs") in _rules(role)
    assert ("kubeflow.org", "pytorchjobs") not in _rules(role)
    # The PyTorchJob backend (the default) ships no runtime; a user-named runtime, none either.
    assert not [d for d in render(helm_bin) if d["kind"] == "ClusterTrainingRuntime"]
    assert not [d for d in render(helm_bin, "--set", "backend=TrainJob", "--set",
                                  "trainJob.createRuntime=false")
                if d["kind"] == "ClusterTrainingRuntime"]


def test_the_job_backend_needs_no_add_on_and_gets_its_rbac_only(helm_bin):
    docs = render(helm_bin, *VALUE_SETS["job"])
    assert not [d for d in docs if d["kind"] == "ClusterTrainingRuntime"]
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    job_rules = {k: v for k, v in NAMESPACED.items() if k != ("kubeflow.org", "pytorchjobs")}
    job_rules[("batch", "jobs")] = {"get", "list", "watch", "create", "patch", "delete"}
    assert _rules(role) == {**job_rules,
                            ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch",
                                                                 "patch"},
                            ("apiextensions.k8s.io", "customresourcedefinitions"): {
                                "list", "watch"},
                            ("authentication.k8s.io", "tokenreviews"): {"create"}}
    env = {e["name"]: e.get("value") for e in next(
        d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["env"]}
    assert env["KUBETUNE_BACKEND"] == "job" and "KUBETUNE_TRAINING_RUNTIME" not in env
    # Namespaced, no serving: the multi-node Job's headless Service still (get, create).
    (role,) = _watched_roles(render(helm_bin, *VALUE_SETS["job-namespaced-no-serve"]))
    rules = _rules(role)
    assert rules[("batch", "jobs")] == {"get", "list", "watch", "create", "patch", "delete"}
    assert rules[("", "services")] == {"get", "create"}
    assert not [k for k in rules if k[1] in ("pytorchjobs", "trainjobs", "deployments")]
    out = subprocess.run([helm_bin, "install", "rel", str(CHART), "--dry-run=client",
                          "--set", "backend=job"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert "Nothing to install for training" in notes and "pytorchjobs" not in notes


def test_an_unknown_backend_fails(helm_bin):
    out = subprocess.run([helm_bin, "template", "rel", str(CHART), "--set", "backend=MPIJob"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "backend" in out.stderr


def test_crds_in_the_chart_are_the_generated_ones(helm_bin):
    assert sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml")) == sorted(
        p.name for p in (REPO / "crds").glob("*.yaml"))
    for crd in (REPO / "crds").glob("*.yaml"):
        assert (CHART / "files" / "crds" / crd.name).read_text() == crd.read_text(), \
            "run make chart"
    sweeps = {d["metadata"]["name"]: d for d in render(helm_bin)
              if d["kind"] == "CustomResourceDefinition"}["finetunesweeps.kubetune.io"]
    assert sweeps["spec"] == yaml.safe_load(
        (REPO / "crds" / "kubetune.io_finetunesweeps.yaml").read_text())["spec"]
    rendered = {d["metadata"]["name"]: d for d in render(helm_bin)
                if d["kind"] == "CustomResourceDefinition"}
    ours = yaml.safe_load((REPO / "crds" / "kubetune.io_finetunejobs.yaml").read_text())
    got = rendered["finetunejobs.kubetune.io"]
    assert got["spec"] == ours["spec"]
    assert got["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    unkept = {d["metadata"]["name"]: d for d in render(helm_bin, "--set", "crds.keep=false")
              if d["kind"] == "CustomResourceDefinition"}
    assert not unkept["finetunejobs.kubetune.io"]["metadata"].get("annotations")
    assert not [d for d in render(helm_bin, "--set", "crds.enabled=false")
                if d["metadata"]["name"] == "finetunejobs.kubetune.io"]


def test_a_typo_in_values_fails(helm_bin):
    out = subprocess.run([helm_bin, "template", "rel", str(CHART), "--set", "replicaCont=2"],
                         capture_output=True, text=True)
    assert out.returncode != 0
    assert "replicaCont" in out.stderr


def _watched_roles(docs: list[dict]) -> list[dict]:
    """The Roles of watched namespaces (not the progress certificate's, in the release's)."""
    return [d for d in docs if d["kind"] == "Role"
            and not d["metadata"]["name"].endswith("-progress-tls")]


def _rules(doc: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in doc["rules"]:
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                out.setdefault((group, res), set()).update(rule["verbs"])
    return out


# What the operator calls (kube.Kube, kopf) — and nothing else: no secrets, no pods/log,
# no deletes (owner references garbage-collect the children).
NAMESPACED = {
    ("kubetune.io", "finetunejobs"): {"get", "list", "watch", "create", "patch"},  # + trials
    ("kubetune.io", "finetunejobs/status"): {"get", "patch"},
    # not a call: admission (OwnerReferencesPermissionEnforcement) checks it for
    # blockOwnerDeletion on the children's owner references
    ("kubetune.io", "finetunejobs/finalizers"): {"update"},
    ("kubetune.io", "finetunesweeps"): {"get", "list", "watch"},
    ("kubetune.io", "finetunesweeps/status"): {"get", "patch"},
    ("kubetune.io", "finetunesweeps/finalizers"): {"update"},  # the trials' owner references
    ("kubeflow.org", "pytorchjobs"): {"get", "list", "watch", "create", "patch"},
    # the pre-flight Job; delete: one of an older spec, replaced before training starts
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
    # patch: the progress CA when it changes; a job's config changed before training starts
    ("", "configmaps"): {"get", "create", "patch"},
    ("apps", "deployments"): {"get", "create", "delete"},  # spec.serve
    # patch: spec.serve.endpoint's shared Service, moved to the newer job it serves
    ("", "services"): {"get", "create", "patch", "delete"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "events"): {"create", "list"},
    ("kueue.x-k8s.io", "workloads"): {"list", "patch"},
}


def test_rbac_cluster_wide_is_exactly_what_the_operator_calls(helm_bin):
    docs = render(helm_bin)
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert _rules(role) == {**NAMESPACED,
                            ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch",
                                                                 "patch"},
                            ("apiextensions.k8s.io", "customresourcedefinitions"): {
                                "list", "watch"},
                            ("authentication.k8s.io", "tokenreviews"): {"create"}}
    # Secrets: only the operator's own progress certificate, in its own namespace.
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "kubetune-system"
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["secrets"],
         "resourceNames": ["rel-kubetune-progress-tls"], "verbs": ["get", "patch"]}]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_progress_https_by_default_plain_http_only_by_name(helm_bin):
    def operator(*args):
        docs = render(helm_bin, *args)
        env = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
            "containers"][0]["env"]
        secrets = [d for d in docs if d["kind"] == "Role"
                   and d["rules"][0]["resources"] == ["secrets"]]
        return {e["name"]: e.get("value") for e in env}, secrets

    env, secrets = operator()
    assert env["KUBETUNE_PROGRESS_URL"] == "https://rel-kubetune.kubetune-system.svc:8443/v1"
    assert env["KUBETUNE_PROGRESS_CERT_SECRET"] == "rel-kubetune-progress-tls"
    assert env["KUBETUNE_OPERATOR_NAMESPACE"] == "kubetune-system"
    assert secrets
    env, secrets = operator("--set", "progress.plainHTTP=true")
    assert env["KUBETUNE_PROGRESS_URL"].startswith("http://")
    assert "KUBETUNE_PROGRESS_CERT_SECRET" not in env and not secrets
    env, secrets = operator(*VALUE_SETS["tls-and-defaults"])  # the user's wins
    assert env["KUBETUNE_PROGRESS_URL"].startswith("https://")
    assert env["KUBETUNE_PROGRESS_TLS_CA"] == "/etc/kubetune/tls/ca.crt"
    assert "KUBETUNE_PROGRESS_CERT_SECRET" not in env and not secrets
    out = subprocess.run([helm_bin, "template", "rel", str(CHART), "--set",
                          "progress.plainHTTP=true", "--set", "progress.tlsSecretName=x"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "choose one" in out.stderr


def test_rbac_for_kserve_inference_services_only_when_the_values_say_so(helm_bin):
    isvc = ("serving.kserve.io", "inferenceservices")
    role = next(d for d in render(helm_bin, "--set", "serve.kserve=true")
                if d["kind"] == "ClusterRole")
    assert _rules(role)[isvc] == {"get", "create", "delete"}  # spec.serve.kind: kserve
    role = next(d for d in render(helm_bin, "--set", "serve.kserve=true",
                                  "--set", "serve.enabled=false")
                if d["kind"] == "ClusterRole")
    assert isvc not in _rules(role)


def test_rbac_per_namespace_when_watching_namespaces(helm_bin):
    docs = render(helm_bin, *VALUE_SETS["namespaced"])
    roles = _watched_roles(docs)
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert _rules(role) == {**NAMESPACED, ("kopf.dev", "kopfpeerings"): {
            "get", "list", "watch", "patch"}}
    cluster = next(d for d in docs if d["kind"] == "ClusterRole")
    # No cluster-wide reads: kopf's namespace and CRD scanning is off for exact namespaces.
    assert _rules(cluster) == {("authentication.k8s.io", "tokenreviews"): {"create"}}
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert "--namespace=team-a" in args and "--all-namespaces" not in args


def test_the_operator_pod_meets_pod_security_restricted(helm_bin):
    dep = next(d for d in render(helm_bin) if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = pod["containers"][0]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KUBETUNE_PROGRESS_URL"] == "https://rel-kubetune.kubetune-system.svc:8443/v1"
    assert env["KUBETUNE_FAILURE_LOG_TAIL"] == "true"
    assert env["KUBETUNE_POD_HOST_NETWORK"] == "false"  # trainer pods: opt in by name


def test_ha_and_tls_settings_reach_the_operator(helm_bin):
    dep = next(d for d in render(helm_bin, *VALUE_SETS["ha"], *VALUE_SETS["tls-and-defaults"])
               if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 2
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert "--peering=rel-kubetune" in c["args"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KUBETUNE_PROGRESS_URL"].startswith("https://")
    assert env["KUBETUNE_DEFAULT_QUEUE"] == "shared"
    assert env["KUBETUNE_PROGRESS_TLS_CERT"] == "/etc/kubetune/tls/tls.crt"


def test_notes_tell_the_next_steps(helm_bin):
    out = subprocess.run([helm_bin, "install", "rel", str(CHART), "--dry-run=client",
                          "-n", "kubetune-system"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert "kubectl get crd pytorchjobs.kubeflow.org" in notes  # the prerequisite check
    assert "kubectl get finetunejobs -w" in notes  # no short name before discovery
    applied = re.findall(r"kubectl apply -f (\S+)", notes)
    assert applied and all((REPO / p).is_file() for p in applied), applied  # real files
    assert "https://" not in notes
    assert "WARNING" not in notes  # HTTPS by default: nothing to warn about
    out = subprocess.run([helm_bin, "install", "rel", str(CHART), "--dry-run=client",
                          "-n", "kubetune-system", "--set", "progress.plainHTTP=true"],
                         capture_output=True, text=True)
    assert "WARNING: progress.plainHTTP is on" in out.stdout.split("NOTES:", 1)[1]


def test_chart_readme_documents_every_value():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "charts" / "gen_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    values_text = (CHART / "values.yaml").read_text()
    readme = (CHART / "README.md").read_text()
    assert gen.render(readme, values_text) == readme, "the values table drifted: make chart"
    documented = {key for key, _, _ in gen.rows(values_text)}

    def leaves(node, prefix=""):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and value and path not in documented:
                yield from leaves(value, path + ".")
            else:
                yield path

    assert set(leaves(yaml.safe_load(values_text))) == documented


def test_metrics_service_and_monitor_follow_the_values(helm_bin):
    default = render(helm_bin)
    svc = next(d for d in default if d["kind"] == "Service")
    assert {p["name"] for p in svc["spec"]["ports"]} == {"progress", "metrics"}
    assert not [d for d in default if d["kind"] == "ServiceMonitor"]
    assert [d for d in render(helm_bin, *VALUE_SETS["servicemonitor"])
            if d["kind"] == "ServiceMonitor"]
    assert not [d for d in render(helm_bin, *VALUE_SETS["no-metrics"]) if d["kind"] == "Service"]


def test_peering_crds_install_before_the_peering_objects(helm_bin):
    # Objects of a kind whose CRD is a template in the same release fail `helm install`
    # ("resource mapping not found"): kopf's CRDs are in crds/, which Helm applies first.
    docs = render(helm_bin)
    assert {d["kind"] for d in docs} >= {"ClusterKopfPeering"}
    assert not [d for d in docs if d["kind"] == "CustomResourceDefinition"
                and d["spec"]["group"] == "kopf.dev"]
    with_crds = render(helm_bin, "--include-crds")
    import kubernetes_validate

    peering = [d for d in with_crds if d["kind"] == "CustomResourceDefinition"
               and d["spec"]["group"] == "kopf.dev"]
    assert len(peering) == 2
    for crd in peering:
        kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def test_the_gpu_memory_table_reaches_the_operators_memory_check(helm_bin, monkeypatch):
    from kubetune_operator.settings import OperatorConfig

    dep = next(d for d in render(helm_bin, *VALUE_SETS["gpu-memory"])
               if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0][
        "env"]}
    monkeypatch.setenv("KUBETUNE_GPU_MEMORY", env["KUBETUNE_GPU_MEMORY"])
    assert dict(OperatorConfig.from_env().gpu_memory) == {"default": "80Gi",
                                                  "NVIDIA-A100-SXM4-40GB": "40Gi"}
    out = subprocess.run([helm_bin, "template", "rel", str(CHART), "--set",
                          "gpuMemory.default=80GB"], capture_output=True, text=True)
    assert out.returncode != 0 and "gpuMemory" in out.stderr  # the values schema refuses it
