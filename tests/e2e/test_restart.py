"""Operator restarts on a real API server: a crash between the two children, a restart with
everything in place, and a job deleted while no operator runs."""

from __future__ import annotations

import time

import pytest
import yaml

from e2e.util import REPO, run_operator, wait

pytestmark = pytest.mark.e2e


def _operator(namespace):
    return run_operator(namespace, "PyTorchJob")


def _job(namespace, name):
    doc = yaml.safe_load((REPO / "examples" / "assistant-identity.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    return doc


def test_restarts_never_duplicate_and_deletion_needs_no_operator(kube, namespace):
    from kubetune.jobfile import parse_job
    from kubetune_operator import builders

    custom, core = kube.CustomObjectsApi(), kube.CoreV1Api()
    body = _job(namespace, "crash")
    made = custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", namespace,
                                                  "finetunejobs", body)
    # The operator "crashed" right after the ConfigMap: it exists, the PyTorchJob does not.
    cm = builders.config_map(job=parse_job(body), uid=made["metadata"]["uid"])
    core.create_namespaced_config_map(namespace, cm)

    def children():
        ptjs = custom.list_namespaced_custom_object("kubeflow.org", "v1", namespace,
                                                    "pytorchjobs")["items"]
        cms = [c for c in core.list_namespaced_config_map(namespace).items
               if c.metadata.name.startswith("crash")]
        return ptjs, cms

    with _operator(namespace) as runner:
        wait(lambda: children()[0])
        wait(lambda: any(c["reason"] == "Starting" for c in (custom.get_namespaced_custom_object(
            "kubetune.io", "v1alpha1", namespace, "finetunejobs", "crash").get("status") or {}
        ).get("conditions", [])))  # the PyTorchJob is there, its pods not yet
    assert runner.exception is None, runner.output
    ptjs, cms = children()
    assert [p["metadata"]["name"] for p in ptjs] == ["crash"] and len(cms) == 1
    first_uid = ptjs[0]["metadata"]["uid"]
    status = custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", namespace,
                                                 "finetunejobs", "crash")["status"]

    with _operator(namespace) as runner:  # a restart with everything in place
        time.sleep(5)
    assert runner.exception is None, runner.output
    ptjs, cms = children()
    assert [p["metadata"]["uid"] for p in ptjs] == [first_uid] and len(cms) == 1
    after = custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", namespace,
                                                "finetunejobs", "crash")["status"]
    assert after["conditions"] == status["conditions"]  # same transition times: no flapping

    # No operator running: deleting the job is not held up by a finalizer, and the API
    # server's garbage collector removes the children.
    job = custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", namespace,
                                              "finetunejobs", "crash")
    assert not job["metadata"].get("finalizers")
    custom.delete_namespaced_custom_object("kubetune.io", "v1alpha1", namespace,
                                           "finetunejobs", "crash")
    wait(lambda: not any(children()), timeout=120)
