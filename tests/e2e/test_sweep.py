"""A FineTuneSweep on the real API server: its CRD's schema, the operator's trials as real
FineTuneJobs (each with its own child), parallelism, and deletion by the real garbage
collector (kube-controller-manager), which kmock does not have."""

from __future__ import annotations

import uuid

import pytest
import yaml

from e2e.util import REPO, run_operator, wait

pytestmark = pytest.mark.e2e
GROUP = ("kubetune.io", "v1alpha1")


def _sweep(namespace: str, name: str, **spec) -> dict:
    template = yaml.safe_load((REPO / "examples" / "assistant-identity.yaml").read_text())["spec"]
    body = {"template": template,
            "parameters": [{"path": "training.learningRate", "values": [1e-4, 3e-4, 1e-3]}],
            "objective": {"metric": "eval_loss", "direction": "minimize"},
            "maxTrials": 3, "parallelism": 2}
    body.update(spec)
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def test_the_sweep_schema_is_enforced_by_the_api_server(kube, namespace, server_minor):
    custom = kube.CustomObjectsApi()
    with pytest.raises(kube.exceptions.ApiException) as err:
        custom.create_namespaced_custom_object(*GROUP, namespace, "finetunesweeps",
                                               _sweep(namespace, "bad", parallelism=0))
    assert err.value.status == 422 and "spec.parallelism" in err.value.body
    with pytest.raises(kube.exceptions.ApiException) as err:
        custom.create_namespaced_custom_object(
            *GROUP, namespace, "finetunesweeps",
            _sweep(namespace, "bad", algorithm={"type": "bayesian"}))
    assert err.value.status == 422 and "spec.algorithm.type" in err.value.body
    typo = _sweep(namespace, "typo")
    typo["spec"]["template"]["trainng"] = {"epochs": 9}
    made = custom.create_namespaced_custom_object(*GROUP, namespace, "finetunesweeps", typo)
    assert "trainng" not in made["spec"]["template"]  # the template's schema prunes it too
    if server_minor >= 25:  # CEL: a cross-field rule and a transition rule (422 Invalid)
        with pytest.raises(kube.exceptions.ApiException) as err:
            custom.create_namespaced_custom_object(
                *GROUP, namespace, "finetunesweeps", _sweep(namespace, "wide", parallelism=4))
        assert err.value.status == 422 and "parallelism is at most maxTrials" in err.value.body
        with pytest.raises(kube.exceptions.ApiException) as err:
            custom.patch_namespaced_custom_object(
                *GROUP, namespace, "finetunesweeps", "typo",
                {"spec": {"parameters": [{"path": "training.epochs", "values": [1, 2]}]}})
        assert err.value.status == 422 and "spec.parameters cannot change" in err.value.body
    custom.delete_namespaced_custom_object(*GROUP, namespace, "finetunesweeps", "typo")


def test_a_sweep_makes_at_most_parallelism_trials_and_its_deletion_removes_them(
        kube, namespace):
    custom = kube.CustomObjectsApi()
    name = f"lr-{uuid.uuid4().hex[:4]}"

    def trials():
        return custom.list_namespaced_custom_object(
            *GROUP, namespace, "finetunejobs",
            label_selector=f"kubetune.io/sweep={name}")["items"]

    def sweep_status():
        return custom.get_namespaced_custom_object(*GROUP, namespace, "finetunesweeps",
                                                   name).get("status") or {}

    with run_operator(namespace, "PyTorchJob"):
        sweep = custom.create_namespaced_custom_object(*GROUP, namespace, "finetunesweeps",
                                                       _sweep(namespace, name))
        made = wait(lambda: trials() if len(trials()) == 2 else None)
        for trial in made:  # owned, labelled, and trained like any job: a PyTorchJob each
            owner = trial["metadata"]["ownerReferences"][0]
            assert owner["kind"] == "FineTuneSweep" and owner["uid"] == sweep["metadata"]["uid"]
            wait(lambda t=trial: custom.get_namespaced_custom_object(
                "kubeflow.org", "v1", namespace, "pytorchjobs", t["metadata"]["name"]))
        assert {t["spec"]["training"]["learningRate"] for t in made} < {1e-4, 3e-4, 1e-3}
        wait(lambda: sweep_status().get("done") == "0/3")
        ready = wait(lambda: next((c for c in sweep_status().get("conditions", [])
                                   if c["type"] == "Ready"), None))
        assert ready["observedGeneration"] == sweep["metadata"]["generation"]

        # One trial's PyTorchJob succeeds (the suite plays Kubeflow's controller): the third
        # trial takes its place, never more than two in flight.
        first = sorted(t["metadata"]["name"] for t in made)[0]
        custom.patch_namespaced_custom_object_status(
            "kubeflow.org", "v1", namespace, "pytorchjobs", first,
            {"status": {"conditions": [{"type": "Succeeded", "status": "True",
                                        "reason": "Done", "message": "done"}]}})
        wait(lambda: len(trials()) == 3 or None)
        running = [t for t in trials() if (t.get("status") or {}).get("phase") != "Succeeded"]
        assert len(running) <= 2

    # Deleting the sweep: the real garbage collector removes its trials (and their children).
    custom.delete_namespaced_custom_object(*GROUP, namespace, "finetunesweeps", name)
    wait(lambda: not trials(), timeout=120)
