"""On a real API server without the backend's CRD: the job says so, and starts once it is there.

The PyTorchJob CRD (installed for the whole suite by the ``crds`` fixture) is deleted at the
start of the test and installed again at its end, whatever happens: the other modules, in any
order, find it as they expect.
"""

from __future__ import annotations

import time

import pytest
import yaml

from e2e.util import CRDS, REPO, install_crd, run_operator, wait

pytestmark = pytest.mark.e2e

PTJ_CRD = "pytorchjobs.kubeflow.org"
PTJ_PATH = next(p for p in CRDS if p.name == "kubeflow.org_pytorchjobs.yaml")


def _served(kube) -> bool:
    """Whether discovery lists kubeflow.org/v1 pytorchjobs (what the operator asks)."""
    try:
        answer = kube.CustomObjectsApi().get_api_resources("kubeflow.org", "v1")
    except kube.exceptions.ApiException as err:
        if err.status == 404:
            return False
        raise
    return any(r.name == "pytorchjobs" for r in answer.resources or [])


@pytest.fixture
def without_pytorchjob_crd(kube, namespace):
    ext = kube.ApiextensionsV1Api()
    try:
        ext.delete_custom_resource_definition(PTJ_CRD)
    except kube.exceptions.ApiException as err:
        if err.status != 404:
            raise
    try:
        wait(lambda: not _served(kube), timeout=60)
        yield
    finally:  # back for every other module
        install_crd(kube, PTJ_PATH)
        wait(lambda: _served(kube), timeout=60)


def _events(kube, namespace, name):
    return [e for e in kube.CoreV1Api().list_namespaced_event(namespace).items
            if e.involved_object.name == name and e.involved_object.kind == "FineTuneJob"]


def test_without_the_pytorchjob_crd_the_job_says_so_then_starts_once_installed(
        kube, namespace, without_pytorchjob_crd):
    custom, core = kube.CustomObjectsApi(), kube.CoreV1Api()
    doc = yaml.safe_load((REPO / "examples" / "assistant-identity.yaml").read_text())
    doc["metadata"] = {"name": "ident", "namespace": namespace}  # no Kueue here
    with run_operator(namespace, "PyTorchJob", {"KUBETUNE_RECHECK_SECONDS": "1"}) as runner:
        custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", namespace,
                                               "finetunejobs", doc)

        def stalled():
            status = custom.get_namespaced_custom_object(
                "kubetune.io", "v1alpha1", namespace, "finetunejobs", "ident").get("status")
            conds = {c["type"]: c for c in (status or {}).get("conditions") or []}
            if conds.get("Stalled", {}).get("status") == "True":
                return status["phase"], conds
            return None

        phase, conds = wait(stalled, timeout=60)
        assert phase == "Pending"
        assert conds["Stalled"]["reason"] == "PyTorchJobNotInstalled"
        message = conds["Stalled"]["message"]
        assert "does not serve PyTorchJob (kubeflow.org/v1)" in message, message
        assert "install the Kubeflow Training Operator" in message
        assert "`backend: job`" in message
        assert conds["Reconciling"]["status"] == "False"
        events = wait(lambda: [e for e in _events(kube, namespace, "ident")
                               if e.reason == "PyTorchJobNotInstalled"], timeout=30)
        time.sleep(4)  # several re-checks: still one Event, still nothing made
        said = [e for e in _events(kube, namespace, "ident")
                if e.reason == "PyTorchJobNotInstalled"]
        assert len(said) == 1 and (said[0].count or 1) == 1, said
        assert events[0].type == "Warning" and "PyTorchJob" in events[0].message
        with pytest.raises(kube.exceptions.ApiException) as err:
            core.read_namespaced_config_map("ident-config", namespace)
        assert err.value.status == 404  # no ConfigMap without its PyTorchJob

        install_crd(kube, PTJ_PATH)  # the training operator's CRD arrives
        child = wait(lambda: custom.get_namespaced_custom_object(
            "kubeflow.org", "v1", namespace, "pytorchjobs", "ident"), timeout=90)
        assert child["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
        core.read_namespaced_config_map("ident-config", namespace)
        wait(lambda: stalled() is None, timeout=30)
    assert runner.exception is None, runner.output
    assert runner.output.count("is not served by this API server") == 1, runner.output
    assert "converge failed" not in runner.output, runner.output
