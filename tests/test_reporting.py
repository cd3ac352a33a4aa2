"""The progress endpoint (KEP-2779 wire format) over real HTTP, and its flusher."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer
from kubetune_operator.reporting import (
    Flusher,
    ProgressStore,
    TokenChecker,
    allowed,
    make_app,
)

# What the API server's TokenReview answers for each token (audience "kubetune").
REVIEWS = {
    "good": {"status": {"authenticated": True, "audiences": ["kubetune"], "user": {
        "username": "system:serviceaccount:team-a:default",
        "extra": {"authentication.kubernetes.io/pod-name": ["ident-master-0"],
                  "authentication.kubernetes.io/pod-uid": ["pod-uid-1"]}}}},
    "impostor": {"status": {"authenticated": True, "audiences": ["kubetune"], "user": {
        "username": "system:serviceaccount:team-a:default",
        "extra": {"authentication.kubernetes.io/pod-name": ["ident-master-0"],
                  "authentication.kubernetes.io/pod-uid": ["someone-elses-pod"]}}}},
    "other-job": {"status": {"authenticated": True, "audiences": ["kubetune"], "user": {
        "username": "system:serviceaccount:team-a:default",
        "extra": {"authentication.kubernetes.io/pod-name": ["someone-else-master-0"]}}}},
    "api-audience": {"status": {"authenticated": True, "audiences": [], "user": {
        "username": "system:serviceaccount:team-a:default",
        "extra": {"authentication.kubernetes.io/pod-name": ["ident-master-0"]}}}},
    "other-namespace": {"status": {"authenticated": True, "audiences": ["kubetune"], "user": {
        "username": "system:serviceaccount:team-b:default",
        "extra": {"authentication.kubernetes.io/pod-name": ["ident-master-0"]}}}},
}
URL = "/v1/namespaces/team-a/finetunejobs/ident/status"
KEP_BODY = {"trainerStatus": {
    "lastUpdatedTime": "2026-11-23T10:00:00+00:00", "progressPercentage": 42,
    "estimatedRemainingSeconds": 120,
    "metrics": [{"name": "loss", "value": "1.25"}, {"name": "learning_rate", "value": "0.0002"},
                {"name": "current_step", "value": "42"}, {"name": "total_steps", "value": "100"},
                {"name": "current_epoch", "value": "0.84"}]}}


async def _review(token: str, audience: str) -> dict:
    assert audience == "kubetune"
    return REVIEWS.get(token, {"status": {"authenticated": False}})


# The pods the API server knows: the job's real master pod, owned by its PyTorchJob.
PODS = {("team-a", "ident-master-0"): {"metadata": {
    "name": "ident-master-0", "uid": "pod-uid-1",
    "ownerReferences": [{"kind": "PyTorchJob", "name": "ident", "uid": "ptj-1"}]}}}


async def _pod(namespace: str, name: str):
    return PODS.get((namespace, name))


@pytest.fixture
async def client():
    store = ProgressStore()
    app = make_app(store, TokenChecker(_review), pod_lookup=_pod)
    async with TestClient(TestServer(app)) as c:
        c.store = store
        yield c


async def test_a_pod_of_the_job_reports_progress(client):
    resp = await client.post(URL, json=KEP_BODY, headers={"Authorization": "Bearer good"})
    assert resp.status == 200
    snap = client.store.get("team-a", "ident")
    assert snap == {"percent": 42.0, "etaSeconds": 120.0, "loss": 1.25, "learningRate": 0.0002,
                    "step": 42, "totalSteps": 100, "epoch": 0.84,
                    "updatedAt": "2026-11-23T10:00:00+00:00"}


@pytest.mark.parametrize(("token", "code"), [
    (None, 401), ("forged", 401), ("api-audience", 401), ("other-job", 403),
    ("other-namespace", 403), ("impostor", 403)])
async def test_forged_or_foreign_tokens_are_refused(client, token, code):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = await client.post(URL, json=KEP_BODY, headers=headers)
    assert resp.status == code
    assert client.store.get("team-a", "ident") is None


async def test_checkpoints_and_outputs_from_the_trainer(client):
    auth = {"Authorization": "Bearer good"}
    for step in (10, 20, 20):
        await client.post(URL, headers=auth, json={"kubetune": {"checkpoint": {
            "step": step, "loss": 1.0, "uri": f"pvc://o/checkpoints/checkpoint-{step}"}}})
    await client.post(URL, headers=auth, json={"kubetune": {"checkpoint": {  # dropped
        "step": 30, "loss": "not a number", "uri": "pvc://o/checkpoints/checkpoint-30"}}})
    await client.post(URL, headers=auth, json={"kubetune": {"outputs": {
        "adapter": "pvc://o/adapter", "mergedModel": "pvc://o/merged", "evil": "x"}}})
    snap = client.store.get("team-a", "ident")
    assert [c["step"] for c in snap["checkpoints"]] == [10, 20]
    assert snap["outputs"] == {"adapter": "pvc://o/adapter", "mergedModel": "pvc://o/merged"}


async def test_bad_bodies_are_refused(client):
    auth = {"Authorization": "Bearer good"}
    resp = await client.post(URL, data=b"not json", headers=auth)
    assert resp.status == 400
    resp = await client.post(URL, data=b"x" * 70_000, headers=auth)
    assert resp.status == 413


def test_allowed_matches_only_this_jobs_pods():
    user = REVIEWS["good"]["status"]["user"]
    assert allowed(user, "team-a", "ident")
    assert not allowed(user, "team-a", "iden")  # prefix of another job's name
    assert not allowed(user, "team-b", "ident")


async def test_flusher_patches_each_dirty_job_once_and_retries_failures():
    store = ProgressStore()
    patched: list[tuple[str, str]] = []
    fail = {"team-a/b"}

    async def patch(ns, name, snap):
        if f"{ns}/{name}" in fail:
            fail.clear()
            raise RuntimeError("api away")
        patched.append((ns, name))

    for name in ("a", "b", "a"):
        store.update("team-a", name, KEP_BODY)
    flusher = Flusher(store, patch, interval=0, rate=1000)
    assert await flusher.run_once() == 1  # a patched, b failed
    assert await flusher.run_once() == 1  # b retried
    assert await flusher.run_once() == 0  # nothing new
    assert sorted(patched) == [("team-a", "a"), ("team-a", "b")]
