"""Helpers shared by the e2e modules (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
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
        REPO / "crds" / "kubetune.io_finetunesweeps.yaml",
        CONFORMANCE / "kubeflow" / "kubeflow.org_pytorchjobs.yaml"]
# Kubeflow Trainer v2 (v2.3.0) and Kueue (v0.19.2): the real CRDs, for the TrainJob backend.
TRAINER_V2_CRDS = [CONFORMANCE / "kubeflow-trainer-v2" / f"trainer.kubeflow.org_{name}.yaml"
                   for name in ("trainjobs", "clustertrainingruntimes")]
KUEUE_CRDS = [CONFORMANCE / "kueue" / f"kueue.x-k8s.io_{name}.yaml"
              for name in ("workloads", "localqueues", "clusterqueues", "resourceflavors")]


def compat_for_old_servers(crd: dict) -> dict:
    """The CRD less what an old API server (1.20) cannot take, and nothing else.

    Newer controller-gen writes ``default: ""`` on optional ``name`` fields of embedded core
    types; kube-apiserver 1.20 decodes that default as null and refuses the whole CRD. The
    empty defaults go; a list-map key (``imagePullSecrets[].name``), which 1.20 requires to
    have a default or be required, becomes required. Every type, enum, bound and field stays,
    so objects are still validated and pruned by the real schema.
    """
    import copy

    crd = copy.deepcopy(crd)

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        items = node.get("items") if isinstance(node.get("items"), dict) else {}
        for key in node.get("x-kubernetes-list-map-keys") or []:
            prop = (items.get("properties") or {}).get(key)
            if isinstance(prop, dict) and prop.get("default") == "":
                del prop["default"]
                if key not in items.setdefault("required", []):
                    items["required"].append(key)
        for prop in (node.get("properties") or {}).values():
            if isinstance(prop, dict) and prop.get("default") == "":
                del prop["default"]
        for value in node.values():
            walk(value)

    walk(crd)
    return crd


def install_crd(kube, path: Path) -> str:
    """Create (or replace) a CRD as shipped; on a server too old for it, the compat copy.
    Returns "as shipped" or "compat (…)"; raises what the server said otherwise."""
    import yaml

    shipped = yaml.safe_load(path.read_text())
    how = "as shipped"
    for crd in (shipped, compat_for_old_servers(shipped)):
        try:
            apply_crd(kube, crd)
            break
        except kube.exceptions.ApiException as err:
            # (the body is JSON: the value's quotes come escaped)
            if crd is not shipped or err.status != 422 or \
                    ".default: Invalid value: \\\"null\\\"" not in err.body:
                raise
            how = 'compat (this server decodes default: "" as null)'
    return how


def apply_crd(kube, crd: dict) -> None:
    """Create a CRD, or replace the one of that name; then wait until it is Established."""
    ext = kube.ApiextensionsV1Api()
    name = crd["metadata"]["name"]
    try:
        ext.create_custom_resource_definition(crd)
    except kube.exceptions.ApiException as err:
        if err.status != 409:
            raise
        crd["metadata"]["resourceVersion"] = \
            ext.read_custom_resource_definition(name).metadata.resource_version
        ext.replace_custom_resource_definition(name, crd)
    wait(lambda: any(c.type == "Established" and c.status == "True"
                     for c in ext.read_custom_resource_definition(name).status.conditions
                     or []))


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


def local_image(*tags: str) -> str | None:
    """The first of ``tags`` that the local Docker engine has (``make images`` builds them)."""
    import shutil
    import subprocess

    if not shutil.which("docker"):
        return None
    for tag in tags:
        if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0:
            return tag
    return None


def image_tags(name: str) -> list[str]:
    """Our image ``name``'s tags as trainer_image/images.sh makes them (CPU variant first)."""
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return [f"kubetune/{name}:{version}-cpu", f"kubetune/{name}:{version}"]


@contextlib.contextmanager
def run_operator(namespace: str, backend: str, env: dict[str, str] | None = None):
    """The operator (kopf's KopfRunner) in this process, watching ``namespace`` and the
    children of ``backend``, with ``env`` set. Its own registry: the default one was built at
    the first import for whatever backend the environment named then. Fails at once when a
    startup handler fails, rather than leaving every test to wait for a status."""
    import kopf
    import pytest
    from kopf.testing import KopfRunner
    from kubetune_operator.backends import backend_named
    from kubetune_operator.handlers import register

    with pytest.MonkeyPatch.context() as mp:
        # No pre-flight pod unless a test names one (KUBETUNE_PREFLIGHT or spec.preflight).
        for k, v in {"KUBETUNE_BACKEND": backend, "KUBETUNE_PREFLIGHT": "skip",
                     **(env or {})}.items():
            mp.setenv(k, v)
        registry = register(kopf.OperatorRegistry(), backend_named(backend))
        # A new registry has none of kopf's default login handlers: the kubeconfig's here.
        kopf.on.login(registry=registry)(kopf.login_via_client)
        with KopfRunner(["run", "--standalone", "--namespace", namespace, "-m",
                         "kubetune_operator.handlers"], timeout=60, registry=registry) as runner:
            time.sleep(3)
            # A failed startup handler stops the operator (its log is in the test's output).
            assert runner._thread.is_alive(), "the operator stopped while starting"
            yield runner
    assert runner.exception is None, runner.output[-5000:]
