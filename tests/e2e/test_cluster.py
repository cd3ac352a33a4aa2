"""End to end on a real cluster (`make e2e`, or `pytest -m e2e`): whatever KUBECONFIG points at
(`make e2e-local` starts a throwaway control plane: tests/e2e/local_cluster.py).

Installs our CRD and the real PyTorchJob CRD, runs the operator (kopf's KopfRunner), applies
the cluster example into a fresh namespace and plays the training operator's part by patching
the PyTorchJob's status. Checks what only a real API server does: generation and
observedGeneration, CEL rules, schema pruning and strict field validation, events, garbage
collection. Skipped when no cluster answers.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from e2e.util import REPO, free_port, job_pod, pod_token, post, run_operator, wait

pytestmark = pytest.mark.e2e


def _needs(server_minor, minor, what):
    if server_minor < minor:
        pytest.skip(f"{what} needs Kubernetes >= 1.{minor}; this API server is 1.{server_minor}")


@pytest.fixture(scope="module")
def progress_port():
    return free_port()


@pytest.fixture(scope="module")
def operator(namespace, progress_port):
    env = {"KUBETUNE_PROGRESS_PORT": str(progress_port), "KUBETUNE_PROGRESS_HOST": "127.0.0.1",
           "KUBETUNE_PROGRESS_URL": f"http://127.0.0.1:{progress_port}/v1",
           "KUBETUNE_PROGRESS_FLUSH_SECONDS": "0.5"}
    with run_operator(namespace, "PyTorchJob", env) as runner:
        yield runner
    if os.environ.get("KUBETUNE_E2E_LOG"):
        Path(os.environ["KUBETUNE_E2E_LOG"]).write_text(runner.output)


def _job(namespace, name, **spec):
    doc = yaml.safe_load((REPO / "examples" / "assistant-identity.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}  # no Kueue in a bare cluster
    doc["spec"].update(spec)
    return doc


def _create(kube, namespace, body, **kw):
    return kube.CustomObjectsApi().create_namespaced_custom_object(
        "kubetune.io", "v1alpha1", namespace, "finetunejobs", body, **kw)


def _get(kube, namespace, name, plural="finetunejobs", group="kubetune.io",
         version="v1alpha1"):
    return kube.CustomObjectsApi().get_namespaced_custom_object(group, version, namespace,
                                                                plural, name)


def test_cel_rules_are_enforced_by_the_api_server(kube, namespace, server_minor):
    _needs(server_minor, 25, "CEL validation rules (x-kubernetes-validations)")
    bad = _job(namespace, "bad-merge", method={"type": "full"})
    with pytest.raises(kube.exceptions.ApiException) as err:
        _create(kube, namespace, bad)
    assert err.value.status == 422
    assert "output.merge needs method.type lora" in err.value.body


def test_schema_types_and_enums_are_enforced_by_the_api_server(kube, namespace):
    bad = _job(namespace, "bad-stage", stage="sftt")
    with pytest.raises(kube.exceptions.ApiException) as err:
        _create(kube, namespace, bad)
    assert err.value.status == 422 and "spec.stage" in err.value.body
    bad = _job(namespace, "bad-nodes", resources={"nodes": 0, "gpusPerNode": 1})
    with pytest.raises(kube.exceptions.ApiException) as err:
        _create(kube, namespace, bad)
    assert err.value.status == 422 and "spec.resources.nodes" in err.value.body


def test_unknown_fields_are_refused_or_pruned(kube, namespace, server_minor):
    typo = _job(namespace, "typo")
    typo["spec"]["trainng"] = {"epochs": 9}
    if server_minor >= 25:  # server-side field validation (beta, on by default, in 1.25)
        with pytest.raises(kube.exceptions.ApiException) as err:
            _create(kube, namespace, typo, field_validation="Strict")
        # A strict decoding error, not a validation error: 400 BadRequest naming the path
        # (apiserver handlers/create.go → transformDecodeError; the CRD decoder says
        # `unknown field "spec.trainng"`), where schema and CEL errors are 422 Invalid.
        assert err.value.status == 400, err.value.body
        assert json.loads(err.value.body)["reason"] == "BadRequest"
        assert "spec.trainng" in err.value.body
    stored = _create(kube, namespace, typo)
    assert "trainng" not in stored["spec"]  # a structural schema prunes it
    assert stored["spec"]["training"]["epochs"] == 3


def test_a_job_runs_through_its_phases(kube, namespace, operator, server_minor):
    custom = kube.CustomObjectsApi()
    _create(kube, namespace, _job(namespace, "ident"))
    child = wait(lambda: _get(kube, namespace, "ident", "pytorchjobs", "kubeflow.org", "v1"))
    owner = child["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "FineTuneJob" and owner["controller"] is True
    kube.CoreV1Api().read_namespaced_config_map("ident-config", namespace)

    def status():
        return _get(kube, namespace, "ident").get("status") or {}

    job = wait(lambda: _get(kube, namespace, "ident") if status().get("phase") else None)
    assert job["status"]["observedGeneration"] == job["metadata"]["generation"]
    assert all(c["observedGeneration"] == job["metadata"]["generation"]
               for c in job["status"]["conditions"])

    def child_status(*types):
        custom.patch_namespaced_custom_object_status(
            "kubeflow.org", "v1", namespace, "pytorchjobs", "ident",
            {"status": {"conditions": [{"type": t, "status": "True", "reason": t,
                                        "message": t} for t in types]}})

    child_status("Created", "Running")
    wait(lambda: status().get("phase") == "Running")
    ready = next(c for c in status()["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"

    # Identity fields are immutable (CEL transition rule); suspend is not.
    if server_minor >= 25:
        with pytest.raises(kube.exceptions.ApiException) as err:
            custom.patch_namespaced_custom_object("kubetune.io", "v1alpha1", namespace,
                                                  "finetunejobs", "ident",
                                                  {"spec": {"model": {"source": "hf://a/b"}}})
        assert err.value.status == 422  # CEL errors are field errors: 422 Invalid
        assert "spec.model.source cannot change" in err.value.body
    custom.patch_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs",
                                          "ident", {"spec": {"suspend": True}})
    wait(lambda: _get(kube, namespace, "ident", "pytorchjobs", "kubeflow.org", "v1")
          ["spec"]["runPolicy"]["suspend"] is True)
    job = wait(lambda: (j := _get(kube, namespace, "ident"))["status"].get(
        "observedGeneration") == j["metadata"]["generation"] and j)
    assert job["metadata"]["generation"] == 2

    child_status("Created", "Succeeded")
    wait(lambda: status().get("phase") == "Succeeded")
    events = kube.CoreV1Api().list_namespaced_event(
        namespace, field_selector="involvedObject.name=ident").items
    reasons = {e.reason for e in events}
    assert {"Created", "Succeeded"} <= reasons, reasons


def test_status_fields_outside_the_schema_are_pruned(kube, namespace, operator):
    _create(kube, namespace, _job(namespace, "pruned"))
    wait(lambda: (_get(kube, namespace, "pruned").get("status") or {}).get("phase"))
    kube.CustomObjectsApi().patch_namespaced_custom_object_status(
        "kubetune.io", "v1alpha1", namespace, "finetunejobs", "pruned",
        {"status": {"notInSchema": 1}})
    assert "notInSchema" not in _get(kube, namespace, "pruned")["status"]


def test_deleting_a_job_garbage_collects_its_children(kube, namespace, operator):
    _create(kube, namespace, _job(namespace, "gone"))
    wait(lambda: _get(kube, namespace, "gone", "pytorchjobs", "kubeflow.org", "v1"))
    kube.CustomObjectsApi().delete_namespaced_custom_object(
        "kubetune.io", "v1alpha1", namespace, "finetunejobs", "gone",
        propagation_policy="Foreground")

    def children_gone():
        try:
            _get(kube, namespace, "gone", "pytorchjobs", "kubeflow.org", "v1")
            return False
        except kube.exceptions.ApiException as err:
            return err.status == 404

    wait(children_gone, timeout=120)
    names = [c.metadata.name for c in kube.CoreV1Api().list_namespaced_config_map(
        namespace).items]
    assert "gone-config" not in names


def test_an_invalid_spec_that_passes_the_schema_stalls_with_the_field(kube, namespace, operator):
    body = copy.deepcopy(_job(namespace, "local-path"))
    body["spec"]["datasets"] = [{"source": "data/identity.json"}]
    _create(kube, namespace, body)
    stalled = wait(lambda: next(
        (c for c in (_get(kube, namespace, "local-path").get("status") or {}).get(
            "conditions", []) if c["type"] == "Stalled" and c["status"] == "True"), None))
    assert "spec.datasets[0].source" in stalled["message"]



def test_progress_from_the_jobs_pod_reaches_the_status_through_a_real_token_review(
        kube, namespace, operator, progress_port):
    """KEP-2779 on a real API server: a pod-bound projected token (audience kubetune) is
    accepted from the PyTorchJob's pod, refused from a look-alike pod and for another audience."""
    core = kube.CoreV1Api()
    _create(kube, namespace, _job(namespace, "prog"))
    child = wait(lambda: _get(kube, namespace, "prog", "pytorchjobs", "kubeflow.org", "v1"))
    wait(lambda: core.read_namespaced_service_account("default", namespace))  # pod admission

    master = job_pod(core, namespace, "prog-master-0", owner=child)
    lookalike = job_pod(core, namespace, "prog-master-1", owner=None)

    def token(pod, audience="kubetune"):
        return pod_token(core, namespace, pod, audience)

    url = f"http://127.0.0.1:{progress_port}/v1/namespaces/{namespace}/finetunejobs/prog/status"
    report = {"trainerStatus": {"progressPercentage": 42, "estimatedRemainingSeconds": 90,
                                "metrics": [{"name": "loss", "value": "1.25"},
                                            {"name": "current_step", "value": "42"},
                                            {"name": "total_steps", "value": "100"}]}}
    assert post(url, "not-a-token", report) == 401
    assert post(url, token(master, "another-service"), report) == 401  # not meant for us
    assert post(url, token(lookalike), report) == 403  # right name pattern, not the job's pod
    assert post(url, token(master), report) == 200
    progress = wait(lambda: (_get(kube, namespace, "prog").get("status") or {}).get(
        "progress", {}).get("percent") == 42.0 and _get(kube, namespace, "prog")["status"][
        "progress"], timeout=30)
    assert progress["loss"] == 1.25 and progress["step"] == 42
    # A later report is progress only: the operator patches it from its event loop, with the
    # same credentials (once sent anonymously: refused, and nothing said it).
    later = {"trainerStatus": {"metrics": [{"name": "current_step", "value": "43"},
                                           {"name": "loss", "value": "1.0"}]}}
    assert post(url, token(master), later) == 200
    progress = wait(lambda: (_get(kube, namespace, "prog").get("status") or {}).get(
        "progress", {}).get("step") == 43 and _get(kube, namespace, "prog")["status"][
        "progress"], timeout=30)
    assert progress["loss"] == 1.0
    # What `kubectl get finetunejobs` prints: the server's table from our printer columns.
    api = kube.ApiClient()
    request = api.param_serialize(
        "GET", f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        auth_settings=["BearerToken"])
    response = api.call_api(*request)
    response.read()
    table = json.loads(response.data)
    names = [c["name"] for c in table["columnDefinitions"]]
    row = next(r["cells"] for r in table["rows"] if r["cells"][0] == "prog")
    shown = dict(zip(names, row, strict=True))
    assert shown["Step"] == "43/100" and shown["Loss"] == 1.0


def test_a_job_from_another_job_waits_then_starts_from_its_model(kube, namespace, operator):
    custom = kube.CustomObjectsApi()
    _create(kube, namespace, _job(namespace, "first"))
    wait(lambda: _get(kube, namespace, "first", "pytorchjobs", "kubeflow.org", "v1"))
    second = _job(namespace, "second", stage="dpo", model={"fromJob": "first"})
    _create(kube, namespace, second)

    def status(name):
        return _get(kube, namespace, name).get("status") or {}

    wait(lambda: any(c["reason"] == "WaitingForJob" for c in status("second").get(
        "conditions", [])))
    with pytest.raises(kube.exceptions.ApiException):  # nothing made while it waits
        _get(kube, namespace, "second", "pytorchjobs", "kubeflow.org", "v1")
    custom.patch_namespaced_custom_object_status(
        "kubeflow.org", "v1", namespace, "pytorchjobs", "first",
        {"status": {"conditions": [{"type": "Succeeded", "status": "True", "reason": "Done",
                                    "message": "done"}]}})
    wait(lambda: status("first").get("phase") == "Succeeded")
    custom.patch_namespaced_custom_object_status(  # what the trainer reports at the end
        "kubetune.io", "v1alpha1", namespace, "finetunejobs", "first",
        {"status": {"outputs": {"mergedModel": "pvc://outputs/first/merged"}}})
    wait(lambda: _get(kube, namespace, "second", "pytorchjobs", "kubeflow.org", "v1"))
    config = kube.CoreV1Api().read_namespaced_config_map("second-config", namespace)
    assert "source: pvc://outputs/first/merged" in config.data["job.yaml"]
