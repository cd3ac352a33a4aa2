"""Helpers shared by the e2e modules (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from e2e.local_cluster import free_port  # noqa: F401  (shared with the tests)

REPO = Path(__file__).resolve().parents[2]
CONFORMANCE = Path(os.environ.get("KUBETUNE_CONFORMANCE", REPO.parent / "shared" / "conformance"))
CRDS = [REPO / "crds" / "kubetune.io_finetunejobs.yaml",
        CONFORMANCE / "kubeflow" / "kubeflow.org_pytorchjobs.yaml"]


def wait(check, timeout=60.0, every=0.5):
    """Poll ``check`` until it returns something truthy; exceptions count as not yet."""
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


def post(url: str, token: str, body: dict) -> int:
    """POST JSON with a bearer token; the HTTP status."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def pod_token(core, namespace: str, pod, audience: str = "kubetune",
              service_account: str = "default") -> str:
    """A projected-style token bound to ``pod`` (TokenRequest), as the kubelet would mount."""
    request = {"spec": {"audiences": [audience], "expirationSeconds": 600,
                        "boundObjectRef": {"kind": "Pod", "apiVersion": "v1",
                                           "name": pod.metadata.name, "uid": pod.metadata.uid}}}
    return core.create_namespaced_service_account_token(service_account, namespace,
                                                        request).status.token


def job_pod(core, namespace: str, name: str, owner: dict | None):
    """A pod as the training operator makes it (``owner``: the PyTorchJob), never scheduled."""
    meta: dict = {"name": name}
    if owner:
        meta["ownerReferences"] = [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                                    "name": owner["metadata"]["name"],
                                    "uid": owner["metadata"]["uid"], "controller": True}]
    return core.create_namespaced_pod(namespace, {
        "metadata": meta, "spec": {"automountServiceAccountToken": False,
                                   "containers": [{"name": "pytorch", "image": "trainer"}]}})
