"""Fixtures for the e2e suite: a cluster through KUBECONFIG (skip when none answers), our CRD
and the real PyTorchJob CRD installed, a fresh namespace per module."""

from __future__ import annotations

import uuid

import pytest
import yaml

from e2e.util import CRDS, KUEUE_CRDS, TRAINER_V2_CRDS, apply_crd, install_crd


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
    for path in CRDS:  # ours, as shipped: a server that refuses them fails the suite
        apply_crd(kube, yaml.safe_load(path.read_text()))


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
