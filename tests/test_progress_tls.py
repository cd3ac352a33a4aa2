"""The progress endpoint's TLS with nothing set up: the operator's own CA and certificate (made
when missing, reused, renewed when due, shared by replicas), the CA published to each job's
namespace before its child, a user's certificate winning, plain HTTP only by name; and a real
TLS round trip (a client with the CA is accepted, one without is refused). Against kmock's API
emulator, as tests/test_operator.py runs the operator."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import ssl
import threading

import aiohttp
import kubernetes
import pytest
import test_operator
from kubetune_operator import progress_tls as pt
from kubetune_operator.builders import PROGRESS_CA_CONFIGMAP
from kubetune_operator.kube import Kube
from kubetune_operator.settings import OperatorConfig
from test_operator import (
    CM,
    NS,
    PTJ,
    Operator,
    _assert,
    _job,
    _operator_calls,
    _seed_master_pod,
    _status,
    eventually,
    exists,
)

OP_NS = "kubetune-system"
SECRET = ("v1/secrets", OP_NS, "kubetune-progress-tls")
CA_MAP = (CM, NS, PROGRESS_CA_CONFIGMAP)
HOSTS = ["127.0.0.1"]
NOW = dt.datetime.now(dt.UTC)


# tests/test_operator.py's kmock fixture (FineTuneJobs, PyTorchJobs, TokenReviews), here too.
cluster = test_operator.cluster


def _https(op: Operator) -> str:
    return f"https://127.0.0.1:{op.port}/v1"


async def _tls_operator(cluster, **config) -> Operator:
    op = Operator(cluster, operator_namespace=OP_NS, **config)
    op.config.setdefault("progress_url", _https(op))
    await op.start()
    return op


def _secret_bundle(cluster) -> pt.Bundle:
    bundle = pt.Bundle.from_secret(cluster.objects[SECRET])
    assert bundle is not None
    return bundle


def _seed_secret(cluster, bundle: pt.Bundle) -> None:
    cluster.objects[SECRET] = {
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": SECRET[2], "namespace": OP_NS, "resourceVersion": "1"},
        "data": bundle.secret_data()}


def _der(pem: bytes | str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    raw = pem.encode() if isinstance(pem, str) else pem
    return x509.load_pem_x509_certificate(raw).public_bytes(serialization.Encoding.DER)


async def _served(op: Operator) -> bytes:
    """The certificate the endpoint presents now (DER)."""
    pem = await asyncio.to_thread(ssl.get_server_certificate, ("127.0.0.1", op.port))
    return _der(pem)


def _requests(cluster, method: str, fragment: str) -> list[int]:
    return [i for i, req in enumerate(list(cluster))
            if req.method.value == method and fragment in req.url.path]


# ------------------------------------------------------------------------ pure


def test_a_new_bundle_is_good_and_names_the_hosts():
    bundle = pt.new_bundle(pt.hosts_for("https://rel-kubetune.kubetune-system.svc:8443/v1"),
                           NOW)
    hosts = ["rel-kubetune.kubetune-system.svc", "rel-kubetune.kubetune-system.svc.cluster.local",
             "rel-kubetune.kubetune-system", "rel-kubetune"]
    assert pt.hosts_for("https://rel-kubetune.kubetune-system.svc:8443/v1") == hosts
    assert pt.renewal_reason(bundle, hosts, NOW) is None
    assert pt.Bundle.from_secret({"data": bundle.secret_data()}) == bundle
    assert "does not name other" in pt.renewal_reason(bundle, ["other"], NOW)


def test_renewal_keeps_the_ca_until_it_is_due_then_publishes_both():
    old = pt.new_bundle(HOSTS, NOW - dt.timedelta(days=340))  # certificate: 25 days left
    assert "certificate expires" in pt.renewal_reason(old, HOSTS, NOW)
    new = pt.renewed(old, HOSTS, NOW)
    assert new.ca_crt == old.ca_crt and new.tls_crt != old.tls_crt
    assert pt.renewal_reason(new, HOSTS, NOW) is None
    aged = pt.new_bundle(HOSTS, NOW - dt.timedelta(days=3400))  # CA: ~250 days left
    assert "the CA expires" in pt.renewal_reason(aged, HOSTS, NOW)
    fresh = pt.renewed(aged, HOSTS, NOW)
    assert fresh.ca_crt != aged.ca_crt and fresh.previous_ca == aged.ca_crt
    # Pods trust both while the old CA lives (another replica may still serve its certificate).
    assert fresh.published_ca(NOW).count(b"BEGIN CERTIFICATE") == 2
    assert fresh.published_ca(NOW + dt.timedelta(days=400)) == fresh.ca_crt
    other = pt.new_bundle(HOSTS, NOW)
    mixed = pt.Bundle(other.ca_crt, other.ca_key, old.tls_crt, old.tls_key)
    assert "not issued by its CA" in pt.renewal_reason(mixed, HOSTS, NOW)


def test_settings_plain_http_only_by_name():
    assert OperatorConfig.from_env({"KUBETUNE_PROGRESS_URL": "http://x/v1"}).progress_plain_http
    https = OperatorConfig.from_env({"KUBETUNE_PROGRESS_URL": "https://x/v1",
                                     "KUBETUNE_OPERATOR_NAMESPACE": "ops"})
    assert not https.progress_plain_http and https.operator_namespace == "ops"
    assert https.progress_cert_secret == "kubetune-progress-tls"
    with pytest.raises(ValueError, match="KUBETUNE_PROGRESS_URL='x:8443/v1'"):
        OperatorConfig.from_env({"KUBETUNE_PROGRESS_URL": "x:8443/v1"})
    with pytest.raises(ValueError, match="names plain HTTP"):
        OperatorConfig.from_env({"KUBETUNE_PROGRESS_URL": "http://x/v1",
                                 "KUBETUNE_PROGRESS_TLS_CERT": "/c",
                                 "KUBETUNE_PROGRESS_TLS_KEY": "/k"})


class _RacingKube:
    """A client whose first read of the Secret answers "missing" for each replica until both
    have read: both create, one gets 409 (kmock) and reads back."""

    def __init__(self, kube: Kube, barrier: threading.Barrier) -> None:
        self.kube, self.barrier, self.first = kube, barrier, True

    def get(self, obj):
        if self.first and obj["kind"] == "Secret":
            self.first = False
            self.barrier.wait(5)
            return None
        return self.kube.get(obj)

    def __getattr__(self, name):
        return getattr(self.kube, name)


async def test_two_replicas_starting_together_share_one_certificate(cluster):
    conf = kubernetes.client.Configuration(host=str(cluster.url))
    barrier = threading.Barrier(2)
    keepers = [pt.CertKeeper(_RacingKube(Kube(kubernetes.client.ApiClient(conf)), barrier),
                             OP_NS, SECRET[2], HOSTS) for _ in range(2)]
    out = await asyncio.gather(*(asyncio.to_thread(k.ensure) for k in keepers))
    assert len(out) == 2 and out[0] == out[1] == _secret_bundle(cluster)
    assert len(_requests(cluster, "POST", "/secrets")) == 2  # both tried; one was refused


class _FakeKube:
    """Two replicas renewing at once: ours loses the conditional patch (409)."""

    def __init__(self, first: dict, theirs: dict) -> None:
        self.reads, self.patches = [first, theirs], []

    def get(self, obj):
        return self.reads.pop(0)

    def patch(self, api_version, kind, ns, name, patch):
        self.patches.append(patch)
        err = Exception("conflict")
        err.status = 409
        raise err


def test_a_renewal_that_loses_the_race_takes_the_winners_certificate():
    due = pt.new_bundle(HOSTS, NOW - dt.timedelta(days=340))
    theirs = pt.renewed(due, HOSTS, NOW)
    kube = _FakeKube({"metadata": {"resourceVersion": "7"}, "data": due.secret_data()},
                     {"metadata": {"resourceVersion": "8"}, "data": theirs.secret_data()})
    assert pt.CertKeeper(kube, OP_NS, SECRET[2], HOSTS).ensure() == theirs
    assert kube.patches[0]["metadata"] == {"resourceVersion": "7"}  # conditional


# ------------------------------------------------------------------------ the operator


async def test_made_when_missing_published_before_the_child_and_a_real_tls_round_trip(
        cluster, tmp_path, caplog, monkeypatch):
    caplog.set_level("DEBUG")
    op = await _tls_operator(cluster)
    try:
        secret = cluster.objects[SECRET]
        assert secret["type"] == "kubernetes.io/tls"
        assert set(secret["data"]) >= {"ca.crt", "ca.key", "tls.crt", "tls.key"}
        bundle = _secret_bundle(cluster)
        assert await _served(op) == _der(bundle.tls_crt)

        await op.create(_job())
        child = await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
        ca = cluster.objects[CA_MAP]
        assert ca["data"]["ca.crt"] == bundle.ca_crt.decode()
        assert ca["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune"
        made_ca = _requests(cluster, "POST", f"/namespaces/{NS}/configmaps")
        made_child = _requests(cluster, "POST", f"/namespaces/{NS}/pytorchjobs")
        assert made_ca and made_child and made_ca[0] < made_child[0]  # the CA first

        # The pods: the CA beside the token, and both reporting variables pointing at it.
        pod = child["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["KUBETUNE_PROGRESS_URL"].startswith(f"https://127.0.0.1:{op.port}/v1/")
        assert env["KUBETUNE_PROGRESS_CA_CERT"] == "/var/run/secrets/kubetune/ca.crt"
        assert env["KUBEFLOW_TRAINER_SERVER_CA_CERT"] == "/var/run/secrets/kubetune/ca.crt"
        (token,) = [v for v in pod["volumes"] if v["name"] == "kubetune-token"]
        assert {"configMap": {"name": PROGRESS_CA_CONFIGMAP, "items": [
            {"key": "ca.crt", "path": "ca.crt"}]}} in token["projected"]["sources"]

        # A real TLS round trip: with the published CA, accepted; without it, refused.
        _seed_master_pod(cluster)
        cafile = tmp_path / "ca.crt"
        cafile.write_text(ca["data"]["ca.crt"])
        url = f"{_https(op)}/namespaces/{NS}/finetunejobs/ident/status"
        report = {"trainerStatus": {"progressPercentage": 12}}
        auth = {"Authorization": "Bearer pod-token"}
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.post(url, json=report, headers=auth)  # the system's CAs only
            resp = await http.post(url, json=report, headers=auth,
                                   ssl=ssl.create_default_context(cafile=str(cafile)))
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientError):  # plain HTTP is not served
                await http.post(url.replace("https", "http"), json=report, headers=auth)
        await eventually(lambda: _assert(_status(cluster)["progress"]["percent"] == 12),
                         timeout=10)

        # The trainer's own reports, as in a pod: the CA file checks the endpoint.
        from kubetune_trainer.progress import post_to_operator

        token_file = tmp_path / "token"
        token_file.write_text("pod-token")
        monkeypatch.setenv("KUBETUNE_PROGRESS_URL", url)
        monkeypatch.setenv("KUBETUNE_PROGRESS_TOKEN", str(token_file))
        monkeypatch.setenv("KUBETUNE_PROGRESS_CA_CERT", str(cafile))
        assert await asyncio.to_thread(post_to_operator, {"outputs": {"adapter": "pvc://o/a"}})
        stranger = tmp_path / "other-ca.crt"
        stranger.write_bytes(pt.new_ca(NOW)[0])
        monkeypatch.setenv("KUBETUNE_PROGRESS_CA_CERT", str(stranger))
        assert not await asyncio.to_thread(post_to_operator, {"outputs": {"adapter": "x"}})
        monkeypatch.setenv("KUBETUNE_PROGRESS_CA_CERT", str(tmp_path / "missing.crt"))
        assert not await asyncio.to_thread(post_to_operator, {"outputs": {"adapter": "x"}})
    finally:
        await op.stop()
    # No key or certificate in the logs or the status.
    said = caplog.text + json.dumps(_status(cluster), default=repr)
    assert "BEGIN" not in said and "PRIVATE" not in said
    for part in (bundle.tls_key, bundle.ca_key):
        assert base64.b64encode(part).decode()[:40] not in said
    # Every call is allowed by the chart's RBAC: secrets only in the release namespace.
    _assert_the_chart_allows(cluster)


def _assert_the_chart_allows(cluster) -> None:
    from test_chart import _rules, render
    from tools import helm

    docs = render(str(helm()))
    cluster_rules = _rules(next(d for d in docs if d["kind"] == "ClusterRole"))
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "kubetune-system"
    own_rules = _rules(role)
    for group, plural, verb in _operator_calls(cluster):
        if plural == "secrets":
            assert verb in own_rules.get((group, plural), set()), (plural, verb)
        else:
            assert verb in cluster_rules.get((group, plural), set()), (plural, verb)


async def test_a_client_that_never_finishes_its_handshake_is_closed(cluster, monkeypatch):
    """TLS by default must keep the slow-client limit: a connection that sends nothing is
    closed after HEADER_TIMEOUT, not asyncio's 60 s."""
    from kubetune_operator.reporting import server

    monkeypatch.setattr(server, "HEADER_TIMEOUT", 0.5)
    op = await _tls_operator(cluster)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", op.port)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
        assert asyncio.get_running_loop().time() - started < 3
        writer.close()
    finally:
        await op.stop()


async def test_a_certificate_in_the_secret_is_reused(cluster):
    bundle = pt.new_bundle(HOSTS, NOW)
    _seed_secret(cluster, bundle)
    op = await _tls_operator(cluster)
    try:
        assert await _served(op) == _der(bundle.tls_crt)
        assert _secret_bundle(cluster) == bundle
        assert not _requests(cluster, "PATCH", "/secrets") + _requests(cluster, "POST",
                                                                       "/secrets")
    finally:
        await op.stop()


async def test_a_certificate_near_expiry_is_renewed_and_a_renewal_elsewhere_is_served(cluster):
    due = pt.new_bundle(HOSTS, NOW - dt.timedelta(days=340))  # 25 days left
    _seed_secret(cluster, due)
    op = Operator(cluster, operator_namespace=OP_NS)
    op.config["progress_url"] = _https(op)
    op.memo["tls_check_seconds"] = 0.3
    await op.start()
    try:
        renewed = _secret_bundle(cluster)
        assert renewed.tls_crt != due.tls_crt and renewed.ca_crt == due.ca_crt
        assert pt.renewal_reason(renewed, HOSTS, NOW) is None
        assert await _served(op) == _der(renewed.tls_crt)
        # Another replica renews the CA: this one serves the new certificate, and namespaces
        # it published to get both CAs.
        await op.create(_job())
        await eventually(lambda: cluster.objects[CA_MAP])
        theirs = pt.renewed(renewed, HOSTS, NOW + dt.timedelta(days=3400))
        _seed_secret(cluster, theirs)
        await eventually(lambda: _assert(cluster.objects[CA_MAP]["data"]["ca.crt"]
                                         == theirs.published_ca().decode()))
        assert cluster.objects[CA_MAP]["data"]["ca.crt"].count("BEGIN CERTIFICATE") == 2

        async def served_now():
            assert await _served(op) == _der(theirs.tls_crt)

        for _ in range(50):
            try:
                await served_now()
                break
            except AssertionError:
                await asyncio.sleep(0.1)
        await served_now()
    finally:
        await op.stop()


async def test_the_ca_configmap_is_patched_when_stale_and_left_alone_when_not_ours(cluster):
    conf = kubernetes.client.Configuration(host=str(cluster.url))
    kube = Kube(kubernetes.client.ApiClient(conf))
    ca = pt.new_ca(NOW)[0]
    publisher = pt.CaPublisher(kube, ca)

    def seed(ns, labels):
        cluster.objects[CM, ns, PROGRESS_CA_CONFIGMAP] = {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": PROGRESS_CA_CONFIGMAP, "namespace": ns, "labels": labels,
                         "resourceVersion": "1"}, "data": {"ca.crt": "old"}}

    seed("ours", dict(pt.LABELS))
    seed("theirs", {"app": "other"})
    await asyncio.to_thread(publisher.ensure, "ours")
    await asyncio.to_thread(publisher.ensure, "theirs")
    assert cluster.objects[CM, "ours", PROGRESS_CA_CONFIGMAP]["data"]["ca.crt"] == ca.decode()
    assert cluster.objects[CM, "theirs", PROGRESS_CA_CONFIGMAP]["data"]["ca.crt"] == "old"
    before = len(list(cluster))
    await asyncio.to_thread(publisher.ensure, "ours")  # known: no request
    assert len(list(cluster)) == before


async def test_a_users_secret_wins(cluster, tmp_path):
    users = pt.new_bundle(HOSTS, NOW)
    for name, pem in (("tls.crt", users.tls_crt), ("tls.key", users.tls_key),
                      ("ca.crt", users.ca_crt)):
        (tmp_path / name).write_bytes(pem)
    op = await _tls_operator(cluster, progress_tls_cert=str(tmp_path / "tls.crt"),
                             progress_tls_key=str(tmp_path / "tls.key"),
                             progress_tls_ca=str(tmp_path / "ca.crt"))
    try:
        assert await _served(op) == _der(users.tls_crt)
        assert not exists(cluster, SECRET)  # nothing of its own
        await op.create(_job())
        await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
        assert cluster.objects[CA_MAP]["data"]["ca.crt"] == users.ca_crt.decode()
    finally:
        await op.stop()


async def test_a_users_ca_configmap_is_mounted_and_none_is_published(cluster, tmp_path):
    op = await _tls_operator(cluster, progress_ca_configmap="team-ca")
    try:
        await op.create(_job())
        child = await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
        assert not exists(cluster, CA_MAP)
        pod = child["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        (token,) = [v for v in pod["volumes"] if v["name"] == "kubetune-token"]
        assert token["projected"]["sources"][1]["configMap"]["name"] == "team-ca"
    finally:
        await op.stop()


async def test_plain_http_only_when_the_url_names_it(cluster):
    op = Operator(cluster)  # progress_url http://… : named
    await op.start()
    try:
        await op.create(_job())
        child = await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
        assert not exists(cluster, SECRET) and not exists(cluster, CA_MAP)
        pod = child["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        env = {e["name"] for e in pod["containers"][0]["env"]}
        assert "KUBETUNE_PROGRESS_CA_CERT" not in env
        (token,) = [v for v in pod["volumes"] if v["name"] == "kubetune-token"]
        assert len(token["projected"]["sources"]) == 1  # the token alone
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{op.port}/healthz") as resp:
            assert resp.status == 200
    finally:
        await op.stop()


def test_https_without_the_operators_namespace_says_what_to_set():
    tls = pt.ProgressTls(OperatorConfig(progress_url="https://op/v1"), kube=None, serving=True)
    with pytest.raises(ValueError, match="KUBETUNE_OPERATOR_NAMESPACE"):
        tls.start()
