"""Fixtures for the e2e suite: a cluster through KUBECONFIG (skip when none answers), our CRD
and the real PyTorchJob CRD installed, a fresh namespace per module."""

from __future__ import annotations

import uuid

import pytest
import yaml

from e2e.util import CRDS, KUEUE_CRDS, TRAINER_V2_CRDS, install_crd, wait


@pytest.fixture(scope="session")
def kube():
    kubernetes = pytest.importorskip("kubernetes")
    try:
        kubernetes.config.load_kube_config()
        kubernetes.client.VersionApi().get_code(_request_timeout=5)
    except Exception as err:  # no kubeconfig, or nothing answers
        pytest.skip(f"no Kubernetes cluster answers through KUBECONFIG ({err})")
    return kubernetes.client


@pytest.fixture(scope="session")
def server_minor(kube):
    return int("".join(ch for ch in kube.VersionApi().get_code().minor if ch.isdigit()))


@pytest.fixture(scope="session")
def crds(kube):
    missing = [str(p) for p in CRDS if not p.exists()]
    if missing:
        pytest.skip(f"CRD files missing (KUBETUNE_CONFORMANCE?): {missing}")
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
        wait(lambda n=name: any(c.type == "Established" and c.status == "True"
                                for c in ext.read_custom_resource_definition(n).status.conditions
                                or []))


@pytest.fixture(scope="module")
def namespace(kube, crds):
    name = f"kubetune-e2e-{uuid.uuid4().hex[:6]}"
    core = kube.CoreV1Api()
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def trainer_v2_crds(kube):
    """Kubeflow Trainer v2's and Kueue's real CRDs; {file name: how it was installed}."""
    paths = TRAINER_V2_CRDS + KUEUE_CRDS
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"CRD files missing (KUBETUNE_CONFORMANCE?): {missing}")
    installed = {}
    for path in paths:
        try:
            installed[path.name] = install_crd(kube, path)
        except kube.exceptions.ApiException as err:
            pytest.skip(f"this API server cannot take {path.name}: {err.status} "
                        f"{err.body[:300]}")
    return installed
