"""End to end on a real cluster (`make e2e`, or `pytest -m e2e`): whatever KUBECONFIG points at.

Installs our CRD and the real PyTorchJob CRD, runs the operator (kopf's KopfRunner), applies
the cluster example into a fresh namespace and plays the training operator's part by patching
the PyTorchJob's status. Checks what only a real API server does: generation and
observedGeneration, CEL rules, schema pruning and strict field validation, events, garbage
collection. Skipped when no cluster answers.
"""

from __future__ import annotations

import copy
import os
import time
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CONFORMANCE = Path(os.environ.get("KUBETUNE_CONFORMANCE", REPO.parent / "shared" / "conformance"))
CRDS = [REPO / "crds" / "kubetune.io_finetunejobs.yaml",
        CONFORMANCE / "kubeflow" / "kubeflow.org_pytorchjobs.yaml"]


def _wait(check, timeout=60.0, every=0.5):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {check}")
        time.sleep(every)


@pytest.fixture(scope="module")
def kube():
    kubernetes = pytest.importorskip("kubernetes")
    try:
        kubernetes.config.load_kube_config()
        kubernetes.client.VersionApi().get_code(_request_timeout=5)
    except Exception as err:  # no kubeconfig, or nothing answers
        pytest.skip(f"no Kubernetes cluster answers through KUBECONFIG ({err})")
    return kubernetes.client


@pytest.fixture(scope="module")
def crds(kube):
    ext = kube.ApiextensionsV1Api()
    for path in CRDS:
        crd = yaml.safe_load(path.read_text())
        name = crd["metadata"]["name"]
        try:
            ext.create_custom_resource_definition(crd)
        except kube.exceptions.ApiException as err:
            if err.status != 409:
                raise
            crd["metadata"]["resourceVersion"] = \
                ext.read_custom_resource_definition(name).metadata.resource_version
            ext.replace_custom_resource_definition(name, crd)
        _wait(lambda n=name: any(c.type == "Established" and c.status == "True"
                                 for c in ext.read_custom_resource_definition(n).status.conditions
                                 or []))


@pytest.fixture(scope="module")
def namespace(kube, crds):
    name = f"kubetune-e2e-{uuid.uuid4().hex[:6]}"
    core = kube.CoreV1Api()
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def operator(namespace):
    from kopf.testing import KopfRunner

    args = ["run", "--standalone", "--namespace", namespace, "-m",
            "kubetune_operator.handlers"]
    with KopfRunner(args, timeout=60) as runner:
        time.sleep(3)
        yield runner
    assert runner.exception is None, runner.output


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


def test_cel_rules_and_strict_fields_are_enforced_by_the_api_server(kube, namespace):
    bad = _job(namespace, "bad-merge", method={"type": "full"})
    with pytest.raises(kube.exceptions.ApiException) as err:
        _create(kube, namespace, bad)
    assert err.value.status == 422
    assert "output.merge needs method.type lora or qlora" in err.value.body
    typo = _job(namespace, "typo")
    typo["spec"]["trainng"] = {}
    with pytest.raises(kube.exceptions.ApiException) as err:
        _create(kube, namespace, typo, field_validation="Strict")
    assert err.value.status == 422 and "trainng" in err.value.body


def test_a_job_runs_through_its_phases(kube, namespace, operator):
    custom = kube.CustomObjectsApi()
    _create(kube, namespace, _job(namespace, "ident"))
    child = _wait(lambda: _get(kube, namespace, "ident", "pytorchjobs", "kubeflow.org", "v1"))
    owner = child["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "FineTuneJob" and owner["controller"] is True
    kube.CoreV1Api().read_namespaced_config_map("ident-config", namespace)

    def status():
        return _get(kube, namespace, "ident").get("status") or {}

    job = _wait(lambda: _get(kube, namespace, "ident") if status().get("phase") else None)
    assert job["status"]["observedGeneration"] == job["metadata"]["generation"]
    assert all(c["observedGeneration"] == job["metadata"]["generation"]
               for c in job["status"]["conditions"])

    def child_status(*types):
        custom.patch_namespaced_custom_object_status(
            "kubeflow.org", "v1", namespace, "pytorchjobs", "ident",
            {"status": {"conditions": [{"type": t, "status": "True", "reason": t,
                                        "message": t} for t in types]}})

    child_status("Created", "Running")
    _wait(lambda: status().get("phase") == "Running")
    ready = next(c for c in status()["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"

    # Identity fields are immutable (CEL transition rule); suspend is not.
    with pytest.raises(kube.exceptions.ApiException) as err:
        custom.patch_namespaced_custom_object("kubetune.io", "v1alpha1", namespace,
                                              "finetunejobs", "ident",
                                              {"spec": {"model": {"source": "hf://a/b"}}})
    assert "spec.model.source cannot change" in err.value.body
    custom.patch_namespaced_custom_object("kubetune.io", "v1alpha1", namespace, "finetunejobs",
                                          "ident", {"spec": {"suspend": True}})
    _wait(lambda: _get(kube, namespace, "ident", "pytorchjobs", "kubeflow.org", "v1")
          ["spec"]["runPolicy"]["suspend"] is True)
    job = _wait(lambda: (j := _get(kube, namespace, "ident"))["status"].get(
        "observedGeneration") == j["metadata"]["generation"] and j)
    assert job["metadata"]["generation"] == 2

    child_status("Created", "Succeeded")
    _wait(lambda: status().get("phase") == "Succeeded")
    events = kube.CoreV1Api().list_namespaced_event(
        namespace, field_selector="involvedObject.name=ident").items
    reasons = {e.reason for e in events}
    assert {"Created", "Succeeded"} <= reasons, reasons


def test_status_fields_outside_the_schema_are_pruned(kube, namespace, operator):
    _create(kube, namespace, _job(namespace, "pruned"))
    _wait(lambda: (_get(kube, namespace, "pruned").get("status") or {}).get("phase"))
    kube.CustomObjectsApi().patch_namespaced_custom_object_status(
        "kubetune.io", "v1alpha1", namespace, "finetunejobs", "pruned",
        {"status": {"notInSchema": 1}})
    assert "notInSchema" not in _get(kube, namespace, "pruned")["status"]


def test_deleting_a_job_garbage_collects_its_children(kube, namespace, operator):
    _create(kube, namespace, _job(namespace, "gone"))
    _wait(lambda: _get(kube, namespace, "gone", "pytorchjobs", "kubeflow.org", "v1"))
    kube.CustomObjectsApi().delete_namespaced_custom_object(
        "kubetune.io", "v1alpha1", namespace, "finetunejobs", "gone",
        propagation_policy="Foreground")

    def children_gone():
        try:
            _get(kube, namespace, "gone", "pytorchjobs", "kubeflow.org", "v1")
            return False
        except kube.exceptions.ApiException as err:
            return err.status == 404

    _wait(children_gone, timeout=120)
    names = [c.metadata.name for c in kube.CoreV1Api().list_namespaced_config_map(
        namespace).items]
    assert "gone-config" not in names


def test_an_invalid_spec_that_passes_the_schema_stalls_with_the_field(kube, namespace, operator):
    body = copy.deepcopy(_job(namespace, "local-path"))
    body["spec"]["datasets"] = [{"source": "data/identity.json"}]
    _create(kube, namespace, body)
    stalled = _wait(lambda: next(
        (c for c in (_get(kube, namespace, "local-path").get("status") or {}).get(
            "conditions", []) if c["type"] == "Stalled" and c["status"] == "True"), None))
    assert "spec.datasets[0].source" in stalled["message"]
