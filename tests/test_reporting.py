"""The progress endpoint (KEP-2779 wire format) over real HTTP, and its flusher."""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import types

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from kubetune.api.v1alpha1 import Checkpoint, Outputs, Progress
from kubetune_operator.backends.pytorchjob import PYTORCHJOB
from kubetune_operator.reporting import auth
from kubetune_operator.reporting import flusher as flusher_module
from kubetune_operator.reporting.auth import TokenChecker, allowed, pod_belongs
from kubetune_operator.reporting.clean import INT64_MAX, MAX_URI_TEXT
from kubetune_operator.reporting.flusher import Flusher
from kubetune_operator.reporting.server import make_app
from kubetune_operator.reporting.store import ProgressStore

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
    app = make_app(store, TokenChecker(_review), pod_lookup=_pod, backend=PYTORCHJOB)
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
    await client.post(URL, headers=auth, json={"kubetune": {"outputs": {
        "adapter": "s3://b/o/adapter", "trackingUrl": "http://mlflow/#/experiments/1/runs/a",
        "metrics": {"lmeval_kubetune_tiny_acc": 0.5, "lmeval_x y": 1.0, "train_loss": 1.0}}}})
    snap = client.store.get("team-a", "ident")
    assert snap["outputs"]["trackingUrl"] == "http://mlflow/#/experiments/1/runs/a"
    assert snap["outputs"]["metrics"] == {"lmeval_kubetune_tiny_acc": 0.5, "train_loss": 1.0}


async def test_a_forged_token_is_refused_the_same_way_twice():
    reviews = []

    async def review(token, audience):
        reviews.append(token)
        return await _review(token, audience)

    app = make_app(ProgressStore(), TokenChecker(review), backend=PYTORCHJOB)
    async with TestClient(TestServer(app)) as c:
        for _ in range(2):
            resp = await c.post(URL, json=KEP_BODY, headers={"Authorization": "Bearer forged"})
            assert resp.status == 401
    assert reviews == ["forged"]  # the second answer came from the cache


async def test_a_pod_is_looked_up_once_while_its_token_is_reviewed_again(monkeypatch):
    """The token is reviewed again after its minute (it could have died with its pod); the
    pod's ownership, fixed for its life, is read once, however long the pod lives. A new pod
    of the same name (a restart: a new uid) is read again, and one not the job's is refused."""
    clock = [time.monotonic()]
    monkeypatch.setattr(auth, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    lookups = []

    async def pod(namespace, name):
        lookups.append(name)
        return await _pod(namespace, name)

    reviews = dict(REVIEWS)
    app = make_app(ProgressStore(), TokenChecker(lambda t, a: _answer(reviews, t)),
                   pod_lookup=pod, backend=PYTORCHJOB)
    async with TestClient(TestServer(app)) as c:
        for _ in range(3):
            resp = await c.post(URL, json=KEP_BODY, headers={"Authorization": "Bearer good"})
            assert resp.status == 200
            clock[0] += 600
        assert lookups == ["ident-master-0"]
        reviews["good"] = REVIEWS["impostor"]  # the pod was replaced by one not owned so
        resp = await c.post(URL, json=KEP_BODY, headers={"Authorization": "Bearer good"})
        assert resp.status == 403
        assert lookups == ["ident-master-0"] * 2


async def _answer(reviews: dict, token: str) -> dict:
    return reviews.get(token, {"status": {"authenticated": False}})


@pytest.mark.parametrize(("body", "code"), [
    (b"not json", 400),
    (b"[" * 20_000 + b"]" * 20_000, 400),  # deeper than the JSON parser goes, under 64 KB
    (b"\xff\xfe{", 400),
    (b"[]", 400),
    (b'{"trainerStatus": []}', 400),
    (b'{"kubetune": "x"}', 400),
    (b"x" * 70_000, 413),
    # Bad values in a well-formed report are dropped, the report is accepted.
    (b'{"trainerStatus": {"metrics": [{"name": ["loss"], "value": 1}]}}', 200),
    (b'{"trainerStatus": {"metrics": 5, "progressPercentage": Infinity}}', 200),
    (b'{"trainerStatus": {"metrics": [{"name": "current_step", "value": NaN}]}}', 200),
])
async def test_bad_bodies_get_a_reason_never_a_500(client, body, code):
    resp = await client.post(URL, data=body, headers={"Authorization": "Bearer good"})
    assert resp.status == code
    if code == 400:
        assert (await resp.json())["error"]
    if code == 200:
        assert client.store.get("team-a", "ident") == {}


async def test_a_nan_loss_leaves_loss_as_it_was_and_applies_the_rest(client):
    auth = {"Authorization": "Bearer good"}
    await client.post(URL, json=KEP_BODY, headers=auth)
    for loss in ("NaN", float("nan"), float("inf")):
        body = {"trainerStatus": {"progressPercentage": 43, "metrics": [
            {"name": "loss", "value": loss}, {"name": "current_step", "value": "43"}]}}
        resp = await client.post(URL, data=json.dumps(body), headers=auth)
        assert (resp.status, await resp.json()) == (200, {"ok": True, "dropped": ["loss"]})
    snap = client.store.get("team-a", "ident")
    assert (snap["loss"], snap["step"], snap["percent"]) == (1.25, 43, 43.0)


@pytest.mark.parametrize(("status", "key", "kept"), [
    ({"progressPercentage": 1e20}, "percent", 100.0),  # clamped, not dropped
    ({"progressPercentage": -3}, "percent", 0.0),
    ({"metrics": [{"name": "current_step", "value": "42.0"}]}, "step", 42),
    ({"metrics": [{"name": "current_step", "value": 10**300}]}, "step", None),
    ({"metrics": [{"name": "current_step", "value": 2**63}]}, "step", None),
    ({"metrics": [{"name": "total_steps", "value": -1}]}, "totalSteps", None),
    ({"metrics": [{"name": "current_epoch", "value": True}]}, "epoch", None),
    ({"estimatedRemainingSeconds": -5}, "etaSeconds", None),
    ({"lastUpdatedTime": {"a": 1}}, "updatedAt", None),  # not str()-ed
    ({"lastUpdatedTime": "x" * 100}, "updatedAt", None),
])
def test_each_field_is_kept_only_in_the_status_shape(status, key, kept):
    store = ProgressStore()
    dropped = store.update("team-a", "ident", {"trainerStatus": status})
    assert store.get("team-a", "ident").get(key) == kept
    assert dropped == ([key] if kept is None else [])


def test_checkpoints_and_outputs_keep_strings_only():
    store = ProgressStore()
    store.update("team-a", "ident", {"kubetune": {
        "checkpoint": {"step": 5, "loss": "NaN", "uri": "pvc://o/checkpoint-5"},
        "outputs": {"adapter": {"uri": "x"}, "model": ["x"], "mergedModel": "pvc://o/m"}}})
    store.update("team-a", "ident", {"kubetune": {"checkpoint": {"step": 6, "uri": 7}}})
    store.update("team-a", "ident", {"kubetune": {"checkpoint": {"loss": "NaN", "uri": "u"}}})
    snap = store.get("team-a", "ident")
    assert snap == {"checkpoints": [{"step": 5, "uri": "pvc://o/checkpoint-5"}],
                    "outputs": {"mergedModel": "pvc://o/m"}}


def test_allowed_matches_only_this_jobs_pods():
    user = REVIEWS["good"]["status"]["user"]
    assert allowed(user, "team-a", "ident", PYTORCHJOB)
    assert not allowed(user, "team-a", "iden", PYTORCHJOB)  # prefix of another job's name
    assert not allowed(user, "team-b", "ident", PYTORCHJOB)


async def test_a_trainjob_pod_is_recognised_by_its_name_and_its_owner():
    """Trainer v2: a JobSet's Job ``<job>-node-<i>`` owns pods ``<job>-node-<i>-<n>-xxxxx``;
    a PyTorchJob's pod name or owner does not pass, nor does another job's."""
    from kubetune_operator.backends.trainjob import TRAINJOB

    def ident(pod):
        return {"username": "system:serviceaccount:team-a:default", "extra": {
            "authentication.kubernetes.io/pod-name": [pod],
            "authentication.kubernetes.io/pod-uid": ["uid-1"]}}

    assert allowed(ident("ident-node-0-0-x7k2p"), "team-a", "ident", TRAINJOB)
    assert not allowed(ident("ident-master-0"), "team-a", "ident", TRAINJOB)
    assert not allowed(ident("ident-node-0-0-x7k2p"), "team-a", "ident", PYTORCHJOB)  #'s names
    assert not allowed(ident("identx-node-0-0-x7k2p"), "team-a", "ident", TRAINJOB)

    def pod(owner_kind, owner, jobset="ident"):
        async def lookup(ns, name):
            return {"metadata": {"name": name, "uid": "uid-1", "labels": {
                "jobset.sigs.k8s.io/jobset-name": jobset}, "ownerReferences": [
                    {"kind": owner_kind, "name": owner, "uid": "j"}]}}
        return lookup

    who = ident("ident-node-0-0-x7k2p")
    assert await pod_belongs(who, "team-a", "ident", pod("Job", "ident-node-0"), TRAINJOB)
    assert not await pod_belongs(who, "team-a", "ident", pod("PyTorchJob", "ident"), TRAINJOB)
    assert not await pod_belongs(who, "team-a", "ident", pod("Job", "ident-node-0", "other"),
                                 TRAINJOB)


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


async def test_the_flusher_patches_jobs_concurrently_within_its_rate():
    store, running, most = ProgressStore(), set(), [0]
    release = asyncio.Event()

    async def patch(ns, name, snap):
        running.add(name)
        most[0] = max(most[0], len(running))
        if len(running) == 4:
            release.set()
        await release.wait()  # a slow API server: each patch waits for the others
        running.discard(name)

    for i in range(12):
        store.update("team-a", f"job-{i}", KEP_BODY)
    flusher = Flusher(store, patch, interval=0, rate=1000, concurrency=4)
    assert await asyncio.wait_for(flusher.run_once(), 5) == 12
    assert most[0] == 4  # four at a time, never more


async def test_flush_rounds_start_every_interval_however_long_a_round_takes(monkeypatch):
    """A round that takes most of the interval (a thousand jobs at the rate limit) is not
    followed by a whole interval's pause: a job reporting all the time is written about once
    per interval, not once per round + interval. (On a clock of the test's own.)"""
    clock = [0.0]
    real_sleep = asyncio.sleep

    async def sleep(seconds):
        clock[0] += seconds
        await real_sleep(0)

    monkeypatch.setattr(flusher_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(flusher_module, "asyncio", types.SimpleNamespace(
        **{k: getattr(asyncio, k) for k in ("Semaphore", "gather")}, sleep=sleep))
    store, writes = ProgressStore(), []

    async def patch(ns, name, snap):
        writes.append(clock[0])
        clock[0] += 0.25  # the round's length
        store.update(ns, name, KEP_BODY)  # reported again meanwhile: dirty for the next round

    store.update("team-a", "ident", KEP_BODY)
    task = asyncio.create_task(Flusher(store, patch, interval=0.3, rate=1000).run())
    while len(writes) < 4:
        await real_sleep(0)
    task.cancel()
    assert writes == pytest.approx([0.0, 0.3, 0.6, 0.9])  # a pause after each round: 0.55 s


async def test_a_refused_patch_does_not_block_later_reports():
    store, written = ProgressStore(), []

    class Refused(Exception):
        status = 422  # what the API server answers for a value its schema refuses

    refusals = [Refused()]

    async def patch(ns, name, snap):
        if refusals:
            raise refusals.pop()
        written.append(snap)

    store.update("team-a", "ident", KEP_BODY)
    store.update("team-a", "ident", {"kubetune": {"checkpoint": {"step": 10, "uri": "pvc://c"}}})
    flusher = Flusher(store, patch, interval=0, rate=1000)
    assert await flusher.run_once() == 0
    assert await flusher.run_once() == 1  # the checkpoint, without the refused progress
    assert written == [{"checkpoints": [{"step": 10, "uri": "pvc://c"}]}]
    store.update("team-a", "ident", KEP_BODY)
    assert await flusher.run_once() == 1
    assert written[-1]["step"] == 42


# ------------------------------------------------------------------------ fuzzing
# KUBETUNE_FUZZ_EXAMPLES=20000 pytest tests/test_reporting.py -k fuzz  for a longer run.

_GOOD = (st.integers(0, 10**6) | st.floats(0, 1e4) | st.integers(0, 10**6).map(str)
         | st.floats(0, 1e4).map(str) | st.just("pvc://o/checkpoint-1"))
_NASTY = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
          | st.integers(MAX_URI_TEXT, MAX_URI_TEXT + 99).map("x".__mul__)
          | st.sampled_from([math.nan, math.inf, -math.inf, 10**300, 2**63, -1, 1e20, 1e308,
                             "NaN", "-Infinity", "1e400", "9" * 300, " 7 ", "0x10", "²",
                             "\ud800"]))
_LEAF = _GOOD | _NASTY
_JSON = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_NAMES = st.sampled_from(["loss", "learning_rate", "current_step", "total_steps", "epoch",
                          "current_epoch", "num_input_tokens_seen", "grad_norm"])


def _mostly(shaped, other=_JSON):
    """The KEP's shape three times in four, anything else the fourth."""
    return st.sampled_from([shaped] * 3 + [other]).flatmap(lambda strategy: strategy)


_METRIC = st.fixed_dictionaries({"name": _mostly(_NAMES), "value": _mostly(_LEAF)})
_TRAINER_STATUS = st.fixed_dictionaries({}, optional={
    "lastUpdatedTime": _LEAF, "progressPercentage": _LEAF, "estimatedRemainingSeconds": _LEAF,
    "metrics": _mostly(st.lists(_mostly(_METRIC), max_size=8))})
_KUBETUNE = st.fixed_dictionaries({}, optional={
    "checkpoint": _mostly(st.fixed_dictionaries(
        {"step": _LEAF, "uri": _LEAF}, optional={"loss": _LEAF})),
    "outputs": _mostly(st.fixed_dictionaries({}, optional={
        "adapter": _LEAF, "mergedModel": _LEAF, "model": _LEAF, "evil": _LEAF}))})
_BODY = _mostly(st.fixed_dictionaries({}, optional={"trainerStatus": _mostly(_TRAINER_STATUS),
                                                     "kubetune": _mostly(_KUBETUNE)}))

def _fits_the_status(value) -> bool:
    """Every number finite, every int an int64, every string bounded and sendable."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _fits_the_status(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_fits_the_status(v) for v in value)
    if isinstance(value, str):
        surrogate = any("\ud800" <= c <= "\udfff" for c in value)  # not UTF-8: unsendable
        return len(value) <= MAX_URI_TEXT and not surrogate
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -INT64_MAX - 1 <= value <= INT64_MAX
    return isinstance(value, float) and math.isfinite(value)


@settings(max_examples=int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "300")), deadline=None,
          derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_BODY)
async def test_fuzz_any_body_gets_200_or_4xx_and_the_status_stays_valid(client, body):
    resp = await client.post(URL, data=json.dumps(body),
                             headers={"Authorization": "Bearer good"})
    event(f"HTTP {resp.status}")  # --hypothesis-show-statistics
    assert resp.status == 200 or 400 <= resp.status < 500, await resp.text()
    if resp.status != 200:
        assert (await resp.json())["error"]
        return
    snap = client.store.get("team-a", "ident")  # everything accepted so far, in this client
    assert _fits_the_status(snap), snap
    json.dumps(snap, allow_nan=False)
    progress = {k: v for k, v in snap.items() if k not in ("checkpoints", "outputs")}
    Progress.model_validate(progress)
    assert 0 <= progress.get("percent", 0) <= 100
    assert all(v >= 0 for k, v in progress.items() if k in ("step", "totalSteps", "etaSeconds"))
    for cp in snap.get("checkpoints", []):
        assert Checkpoint.model_validate(cp).step >= 0
    Outputs.model_validate(snap.get("outputs", {}))
