
"""The real kopf operator against kmock's Kubernetes API emulator, over HTTP.

kmock does not run controllers: this test plays the training operator's part by patching the
PyTorchJob's status, and the API server's part for TokenReviews. What only a real API server
checks (generation, CEL, pruning, garbage collection) is in tests/e2e.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import socket
import threading
import types
from pathlib import Path

import aiohttp
import kopf
import kubernetes
import kubetune_operator.controller
import kubetune_operator.handlers
import pytest
import yaml
from kubetune_operator.backends import backend_named, children
from kubetune_operator.builders import OperatorConfig
from kubetune_operator.kube import Kube
from kubetune_operator.reporting.store import ProgressStore

REPO = Path(__file__).resolve().parents[1]
FTJ = "kubetune.io/v1alpha1/finetunejobs"
PTJ = "kubeflow.org/v1/pytorchjobs"
TJ = "trainer.kubeflow.org/v1alpha1/trainjobs"
JOB = "batch/v1/jobs"
SVC = "v1/services"
CM = "v1/configmaps"
WL = "kueue.x-k8s.io/v1beta1/workloads"
ISVC = "serving.kserve.io/v1beta1/inferenceservices"
NS = "team-a"
_LOGIN = {"url": None}
OPERATOR_AGENT = "kubetune-operator-under-test"


@kopf.on.login()
def _login_to_the_emulator(**kwargs):
    # Registered globally by importing this module: anything else running kopf in this process
    # (the e2e suite, collected beside it) gets the usual kubeconfig login.
    if _LOGIN["url"] is None:
        return kopf.login_via_client(**kwargs)
    return kopf.ConnectionInfo(server=_LOGIN["url"], insecure=True)


async def eventually(check, timeout=15.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return check()
        except (AssertionError, KeyError, IndexError, TypeError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(name="ident", **spec_changes):
    doc = yaml.safe_load((REPO / "examples" / "assistant-identity.yaml").read_text())
    doc["metadata"].update({"name": name, "namespace": NS, "resourceVersion": "1",
                            "generation": 1, "uid": f"uid-{name}"})
    doc["spec"].update(spec_changes)
    return doc


@pytest.fixture
def cluster(kmock):
    kmock.resources.load_bundled()
    kmock.resources[FTJ] = kmock.ResourceInfo(
        kind="FineTuneJob", singular="finetunejob", namespaced=True, subresources={"status"},
        verbs={"get", "list", "watch", "create", "patch", "delete"})
    kmock.resources[PTJ] = kmock.ResourceInfo(
        kind="PyTorchJob", singular="pytorchjob", namespaced=True, subresources={"status"},
        verbs={"get", "list", "watch", "create", "patch", "delete"})
    kmock.resources[TJ] = kmock.ResourceInfo(
        kind="TrainJob", singular="trainjob", namespaced=True, subresources={"status"},
        verbs={"get", "list", "watch", "create", "patch", "delete"})
    kmock.resources[WL] = kmock.ResourceInfo(
        kind="Workload", singular="workload", namespaced=True, subresources={"status"},
        verbs={"get", "list", "watch", "create", "patch", "delete"})
    reviews = {
        "pod-token": {"username": f"system:serviceaccount:{NS}:default",
                      "extra": {"authentication.kubernetes.io/pod-name": ["ident-master-0"],
                                "authentication.kubernetes.io/pod-uid": ["pod-uid-0"]}},
        "trainjob-pod-token": {
            "username": f"system:serviceaccount:{NS}:default",
            "extra": {"authentication.kubernetes.io/pod-name": ["ident-node-0-0-x7k2p"],
                      "authentication.kubernetes.io/pod-uid": ["pod-uid-tj"]}},
        "job-pod-token": {
            "username": f"system:serviceaccount:{NS}:default",
            "extra": {"authentication.kubernetes.io/pod-name": ["ident-1-x7k2p"],
                      "authentication.kubernetes.io/pod-uid": ["pod-uid-job"]}},
        "foreign-token": {"username": "system:serviceaccount:team-b:default",
                          "extra": {"authentication.kubernetes.io/pod-name": ["ident-master-0"]}},
    }

    def token_review(req):
        spec = req.data["spec"]
        user = reviews.get(spec["token"])
        status = {"authenticated": True, "user": user, "audiences": spec.get("audiences")} \
            if user else {"authenticated": False}
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "spec": spec, "status": status}

    # Not a stored resource (kmock would keep each review as an object), just an answer.
    for key in [k for k in kmock.resources if "tokenreviews" in str(k)]:
        del kmock.resources[key]
    kmock["post /apis/authentication.k8s.io/v1/tokenreviews"] << token_review
    _LOGIN["url"] = str(kmock.url)
    yield kmock
    _LOGIN["url"] = None


class Operator:
    def __init__(self, cluster, **config):
        self.cluster = cluster
        self.config = config  # OperatorConfig fields (gpu_memory: the chart's gpuMemory table)
        cfg = kubernetes.client.Configuration(host=str(cluster.url))
        self.api = kubernetes.client.ApiClient(cfg)  # the test's own calls
        self.operator_api = kubernetes.client.ApiClient(cfg)
        self.operator_api.user_agent = OPERATOR_AGENT
        self.custom = kubernetes.client.CustomObjectsApi(self.api)
        self.port = _free_port()
        self.thread: threading.Thread | None = None
        self.stop_flag: threading.Event | None = None
        self.memo: dict = {}  # more of the operator's memo (e.g. tls_check_seconds)

    async def start(self):
        """kopf in its own thread and loop, as in production (and away from pytest's loop,
        whose tasks kopf would cancel on stop)."""
        settings = kopf.OperatorSettings()
        settings.posting.enabled = False  # kmock refuses a second Event (generateName)
        # Plain HTTP named in the URL, unless a test names its own (https: the operator's CA).
        # No pre-flight pod unless a test asks (its own tests below): the rest play the
        # training object's controller and would have to play the pre-flight Job's too.
        config = OperatorConfig(**{"trainer_image": "reg/trainer:1",
                                   "progress_url": f"http://127.0.0.1:{self.port}/v1",
                                   "preflight": "skip", **self.config})
        memo = kopf.Memo(kube=Kube(self.operator_api), store=ProgressStore(),
                         progress_port=self.port, config=config, **self.memo)
        # Each operator its own registry: it watches its own backend's kind only.
        registry = kubetune_operator.handlers.register(kopf.OperatorRegistry(),
                                                       backend_named(config.backend))
        kopf.on.login(registry=registry)(_login_to_the_emulator)
        self.stop_flag = threading.Event()
        ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(kopf.operator(
            registry=registry, settings=settings, memo=memo, clusterwide=True,
            standalone=True, stop_flag=self.stop_flag, ready_flag=ready)), daemon=True)
        self.thread.start()
        assert await asyncio.to_thread(ready.wait, 15), "the operator did not start"

    async def stop(self):
        if self.thread:
            self.stop_flag.set()
            await asyncio.to_thread(self.thread.join, 20)
            assert not self.thread.is_alive(), "the operator did not stop"
            self.thread = None

    async def create(self, body):
        await asyncio.to_thread(self.custom.create_namespaced_custom_object,
                                "kubetune.io", "v1alpha1", NS, "finetunejobs", body)

    async def patch_child_status(self, name, *conditions):
        body = {"status": {"conditions": [{"type": t, "status": "True", "reason": t,
                                           "message": f"{t} message"} for t in conditions]}}
        await asyncio.to_thread(self.custom.patch_namespaced_custom_object_status,
                                "kubeflow.org", "v1", NS, "pytorchjobs", name, body)


@pytest.fixture
async def operator(cluster):
    op = Operator(cluster)
    await op.start()
    yield op
    await op.stop()


@pytest.fixture
async def trainjob_operator(cluster):
    """The operator with the Kubeflow Trainer v2 backend."""
    op = Operator(cluster, backend="TrainJob")
    await op.start()
    yield op
    await op.stop()


def _seed_master_pod(cluster):
    """The pod the training operator would have made: the one the pod-token belongs to."""
    cluster.objects["v1/pods", NS, "ident-master-0"] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ident-master-0", "namespace": NS, "resourceVersion": "1",
                     "uid": "pod-uid-0", "labels": {"kubetune.io/job": "ident"},
                     "ownerReferences": [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                                          "name": "ident", "uid": "ptj-uid",
                                          "controller": True}]}}


def _status(cluster, name="ident"):
    return cluster.objects[FTJ, NS, name]["status"]


def _phase(cluster, name="ident"):
    return _status(cluster, name)["phase"]


def _children(cluster, kind):
    return [k for k in cluster.objects if k[0] == kind]


def exists(cluster, key) -> bool:
    """Whether kmock holds the object and it is not deleted. (``key in cluster.objects`` does
    not parse a "group/version/plural" key, so it is always False: never use it.)"""
    try:
        return not cluster.objects[key].deleted
    except KeyError:
        return False


async def test_create_makes_each_child_once_and_follows_the_pytorchjob(cluster, operator):
    await operator.create(_job())
    child = await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
    cm = cluster.objects[CM, NS, "ident-config"]
    assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-ident"
    assert child["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert "hf-token" in str(child) and "job.yaml" in cm["data"]
    await eventually(lambda: _assert(_phase(cluster) == "Queued"))
    ready = next(c for c in _status(cluster)["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "WaitingForAdmission" and "team-a" in ready["message"]

    # The training operator's part: Kueue admitted it, then it runs, then it succeeds.
    await asyncio.to_thread(operator.custom.patch_namespaced_custom_object, "kubeflow.org",
                            "v1", NS, "pytorchjobs", "ident",
                            {"spec": {"runPolicy": {"suspend": False}}})
    await operator.patch_child_status("ident", "Created", "Running")
    await eventually(lambda: _assert(_phase(cluster) == "Running"))
    assert {c["type"] for c in _status(cluster)["conditions"] if c["status"] == "True"} == {
        "Ready"}
    await operator.patch_child_status("ident", "Created", "Succeeded")
    await eventually(lambda: _assert(_phase(cluster) == "Succeeded"))
    assert len(_children(cluster, PTJ)) == 1 and len(_children(cluster, CM)) == 1
    # Kueue's unsuspend was never undone.
    assert cluster.objects[PTJ, NS, "ident"]["spec"]["runPolicy"]["suspend"] is False


async def test_failure_is_explained_from_the_pods(cluster, operator):
    await operator.create(_job(name="ident"))
    await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
    cluster.objects["v1/pods", NS, "ident-master-0"] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ident-master-0", "namespace": NS, "resourceVersion": "1",
                     "labels": {"kubetune.io/job": "ident"}},
        "status": {"phase": "Failed", "containerStatuses": [{
            "name": "pytorch", "image": "reg/trainer:1", "imageID": "", "ready": False,
            "restartCount": 3, "state": {"terminated": {"exitCode": 137,
                                                       "reason": "OOMKilled"}}}]}}
    await operator.patch_child_status("ident", "Created", "Failed")
    await eventually(lambda: _assert(_phase(cluster) == "Failed"))
    status = _status(cluster)
    stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "OOMKilled"
    assert status["failure"]["exitCode"] == 137


async def test_a_pod_deleted_before_any_listing_still_counts_as_a_restart(cluster, operator):
    """`kubectl delete pod` mid-run: the trainer saves and exits 143, and the pod is gone a
    moment later, before any converge lists pods. The pod watch saw it end."""
    body = _job()
    del body["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]  # not queued: it runs
    body["metadata"]["creationTimestamp"] = "2026-12-07T09:30:00Z"
    await operator.create(body)
    await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
    await operator.patch_child_status("ident", "Created", "Running")
    await eventually(lambda: _assert(_phase(cluster) == "Running"))
    core = kubernetes.client.CoreV1Api(operator.api)
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "ident-master-0", "namespace": NS,
                        "creationTimestamp": "2026-12-07T09:31:00Z",
                        "labels": {"kubetune.io/job": "ident"}},
           "spec": {"containers": [{"name": "pytorch", "image": "reg/trainer:1"}]},
           "status": {"phase": "Failed", "containerStatuses": [{
               "name": "pytorch", "image": "reg/trainer:1", "imageID": "", "ready": False,
               "restartCount": 0, "state": {"terminated": {
                   "exitCode": 143, "finishedAt": "2026-12-07T10:00:00Z",
                   "message": '{"reason": "Preempted", "message": "saved at step 3"}'}}}]}}
    # A pod of an earlier job of that name (deleted, applied again) ends: not this job's.
    earlier = copy.deepcopy(pod)
    earlier["metadata"].update(name="ident-master-old", creationTimestamp="2026-12-07T09:00:00Z")
    await asyncio.to_thread(core.create_namespaced_pod, NS, earlier)
    await asyncio.to_thread(core.create_namespaced_pod, NS, pod)
    await asyncio.to_thread(core.delete_namespaced_pod, "ident-master-old", NS)
    await asyncio.to_thread(core.delete_namespaced_pod, "ident-master-0", NS)
    await eventually(lambda: _assert(_status(cluster).get("restarts") == 1), timeout=10)
    restart = _status(cluster)["lastRestarts"][0]
    assert (restart["pod"], restart["reason"], restart["exitCode"], restart["message"]) == (
        "ident-master-0", "Preempted", 143, "saved at step 3")
    # The kubelet of some versions writes an empty end for a deleted pod and removes it: a
    # pod deleted while its trainer ran, gone with no exit code, counts too (no code given).
    unreported = copy.deepcopy(pod)
    unreported["metadata"].update(name="ident-master-1", creationTimestamp="2026-12-07T09:40:00Z")
    unreported["status"] = {"phase": "Running", "containerStatuses": [{
        "name": "pytorch", "image": "reg/trainer:1", "imageID": "", "ready": True,
        "restartCount": 0, "state": {"running": {"startedAt": "2026-12-07T09:40:05Z"}}}]}
    unreported["metadata"]["finalizers"] = ["e2e.kubetune.io/hold"]  # deleted, still there
    await asyncio.to_thread(core.create_namespaced_pod, NS, unreported)
    await asyncio.to_thread(core.delete_namespaced_pod, "ident-master-1", NS)
    await asyncio.to_thread(core.patch_namespaced_pod, "ident-master-1", NS,
                            {"metadata": {"finalizers": []}, "status": {"containerStatuses": [{
                                "name": "pytorch", "image": "reg/trainer:1", "imageID": "",
                                "ready": False, "restartCount": 0,
                                "state": {"terminated": {"exitCode": 0}}}]}})
    await eventually(lambda: _assert(_status(cluster).get("restarts") == 2), timeout=10)
    second = _status(cluster)["lastRestarts"][1]
    assert (second["pod"], second["reason"], second.get("exitCode")) == (
        "ident-master-1", "Preempted", None), second
    # Seen again (another converge): still two.
    await operator.patch_child_status("ident", "Created", "Running", "Restarting")
    await asyncio.sleep(1)
    assert _status(cluster)["restarts"] == 2


async def test_invalid_spec_becomes_a_condition_and_no_children(cluster, operator):
    await operator.create(_job(stage="ppo"))
    await eventually(lambda: _assert(_phase(cluster) == "Failed"))
    stalled = next(c for c in _status(cluster)["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "InvalidSpec"
    assert stalled["message"].startswith("spec.stage: ppo is not available")
    assert not _children(cluster, PTJ) and not _children(cluster, CM)
    # An implemented preference stage, with its settings, gets its children.
    await operator.create(_job(name="pref", stage="dpo", preference={"beta": 0.2}))
    child = await eventually(lambda: cluster.objects[PTJ, NS, "pref"])
    assert "stage: dpo" in cluster.objects[CM, NS, "pref-config"]["data"]["job.yaml"]
    assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-pref"


async def test_a_job_from_another_job_waits_for_it_then_starts_from_its_model(cluster,
                                                                               operator):
    def from_job(name, upstream):
        body = _job(name=name, stage="dpo")
        body["spec"]["model"] = {"fromJob": upstream}
        return body

    await operator.create(from_job("dpo", "ident"))  # the upstream is not there yet
    await eventually(lambda: _assert(_phase(cluster, "dpo") == "Failed"))
    stalled = next(c for c in _status(cluster, "dpo")["conditions"] if c["type"] == "Stalled")
    assert stalled["message"] == ("spec.model.fromJob: there is no FineTuneJob 'ident' in "
                                  f"namespace '{NS}'")
    await operator.create(_job())  # now it is: the dpo job waits while it runs
    scored = _job(name="scored", stage="grpo", rewards=[{"type": "rewardModel",
                                                         "fromJob": "ident"}])
    await operator.create(scored)  # and so does a grpo job scored by its model
    await eventually(lambda: _assert(_phase(cluster, "dpo") == "Pending"))
    await eventually(lambda: _assert(_phase(cluster, "scored") == "Pending"))
    ready = next(c for c in _status(cluster, "dpo")["conditions"] if c["type"] == "Reconciling")
    assert ready["reason"] == "WaitingForJob" and "'ident'" in ready["message"]
    assert not exists(cluster, (PTJ, NS, "dpo"))
    # As a run ends: the trainer reports its outputs, then its pod exits.
    _seed_master_pod(cluster)
    url = f"http://127.0.0.1:{operator.port}/v1/namespaces/{NS}/finetunejobs/ident/status"
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer pod-token"}) as http:
        assert (await http.post(url, json={"kubetune": {"outputs": {
            "mergedModel": "pvc://outputs/ident/merged"}}})).status == 200
    await eventually(lambda: _assert(_status(cluster).get("outputs")), timeout=30)
    assert not exists(cluster, (PTJ, NS, "dpo"))  # not before the upstream succeeded
    await asyncio.to_thread(operator.custom.patch_namespaced_custom_object, "kubeflow.org",
                            "v1", NS, "pytorchjobs", "ident",
                            {"spec": {"runPolicy": {"suspend": False}}})
    await operator.patch_child_status("ident", "Created", "Succeeded")
    await eventually(lambda: _assert(_phase(cluster) == "Succeeded"))
    await eventually(lambda: cluster.objects[PTJ, NS, "dpo"])
    config = cluster.objects[CM, NS, "dpo-config"]["data"]["job.yaml"]
    assert "source: pvc://outputs/ident/merged" in config and "fromJob" not in config
    await eventually(lambda: cluster.objects[PTJ, NS, "scored"])
    rewards = yaml.safe_load(cluster.objects[CM, NS, "scored-config"]["data"]["job.yaml"])[
        "spec"]["rewards"]
    assert rewards == [{"type": "rewardModel", "weight": 1.0,
                        "source": "pvc://outputs/ident/merged"}]

    await operator.create(from_job("loop-a", "loop-b"))
    await operator.create(from_job("loop-b", "loop-a"))

    def loop_a_stalled() -> str | None:  # first "no loop-b" (made second), then the loop
        return next((c["message"] for c in _status(cluster, "loop-a").get("conditions", [])
                     if c["type"] == "Stalled" and c["status"] == "True"), None)

    await eventually(lambda: _assert(loop_a_stalled() == (
        "spec.model.fromJob: the jobs start from each other: loop-a → loop-b → loop-a")))


async def test_a_fixed_invalid_spec_gets_its_children(cluster, operator):
    body = _job()
    body["spec"]["datasets"] = [{"source": "data/identity.json"}]  # local: no meaning here
    await operator.create(body)
    await eventually(lambda: _assert(_phase(cluster) == "Failed"))
    assert not _children(cluster, PTJ)
    await asyncio.to_thread(operator.custom.patch_namespaced_custom_object, "kubetune.io",
                            "v1alpha1", NS, "finetunejobs", "ident",
                            {"metadata": {"generation": 2},
                             "spec": {"datasets": [{"source": "pvc://data/identity.json"}]}})
    await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
    await eventually(lambda: _assert(_phase(cluster) == "Queued"))
    assert _status(cluster)["observedGeneration"] == 2


async def test_a_child_of_another_owner_is_never_adopted(cluster, operator):
    from kubetune.jobfile import parse_job
    from kubetune_operator.backends.pytorchjob import PYTORCHJOB

    stale = PYTORCHJOB.render(job=parse_job(_job()), config=OperatorConfig(), uid="old-uid")
    stale["metadata"].update(namespace=NS, resourceVersion="1")
    cluster.objects[PTJ, NS, "ident"] = stale  # a deleted job's child, not yet collected
    await operator.create(_job())
    await eventually(lambda: _assert(_phase(cluster) == "Pending"))
    ready = next(c for c in _status(cluster)["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "Conflict" and "belongs to another object" in ready["message"]
    assert cluster.objects[PTJ, NS, "ident"]["metadata"]["ownerReferences"][0]["uid"] == \
        "old-uid"


async def test_a_spec_change_in_flight_is_reported_not_silently_ignored(cluster, operator):
    await operator.create(_job())
    await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
    await asyncio.to_thread(operator.custom.patch_namespaced_custom_object, "kubetune.io",
                            "v1alpha1", NS, "finetunejobs", "ident",
                            {"spec": {"training": {"learningRate": 0.5}}})
    await eventually(lambda: _assert(any(
        c["type"] == "SpecChangeIgnored" and c["status"] == "True"
        for c in _status(cluster)["conditions"])))


def _requests_for(cluster, name, agent=OPERATOR_AGENT):
    """(method, path) of the operator's requests about the FineTuneJob ``name``."""
    return [(req.method.value, req.url.path) for req in list(cluster)
            if req.headers.get("User-Agent", "").startswith(agent)
            and f"/finetunejobs/{name}" in req.url.path]


async def test_a_new_job_costs_its_creates_and_one_status_write(cluster, operator):
    """At a thousand jobs every request counts: a new job is converged from the watch
    event's body (no read first), and kopf keeps no state in annotations (no patch of the
    job, no last-handled-configuration copy of its spec)."""
    await operator.create(_job())
    await eventually(lambda: _assert(_phase(cluster) == "Queued"))
    await asyncio.sleep(0.5)  # anything that would follow the status write
    ours = _requests_for(cluster, "ident") + _requests_for(cluster, "ident", agent="kopf/")
    assert ours == [("PATCH", f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs/"
                              "ident/status")], ours
    annotations = cluster.objects[FTJ, NS, "ident"]["metadata"].get("annotations") or {}
    assert not [a for a in annotations if a.startswith("kubetune.io/")], annotations
    assert not cluster.objects[FTJ, NS, "ident"]["metadata"].get("finalizers")


async def _train_to_a_merged_model(cluster, op, body, metrics=None) -> None:
    """Create the job; its master pod reports a merged model (and ``metrics``, the final
    ones), then its PyTorchJob succeeds."""
    await op.create(body)
    await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
    _seed_master_pod(cluster)
    url = f"http://127.0.0.1:{op.port}/v1/namespaces/{NS}/finetunejobs/ident/status"
    outputs = {"mergedModel": "pvc://outputs/ident/merged",
               **({"metrics": metrics} if metrics else {})}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(url, headers={"Authorization": "Bearer pod-token"}, json={
            "kubetune": {"outputs": outputs}})
        assert resp.status == 200
    await eventually(lambda: _assert(_status(cluster).get("outputs")), timeout=10)
    await op.patch_child_status("ident", "Created", "Succeeded")


async def _report_progress(cluster, operator) -> None:
    """The master pod of job "ident" reports 5 %, and the status shows it."""
    _seed_master_pod(cluster)
    url = f"http://127.0.0.1:{operator.port}/v1/namespaces/{NS}/finetunejobs/ident/status"
    async with aiohttp.ClientSession() as http:
        resp = await http.post(url, json={"trainerStatus": {"progressPercentage": 5}},
                               headers={"Authorization": "Bearer pod-token"})
        assert resp.status == 200
    await eventually(lambda: _assert(_status(cluster).get("progress", {}).get("percent") == 5))


async def test_a_progress_report_is_one_status_write_without_a_read(cluster, operator):
    """A report with no checkpoints or outputs replaces status.progress: one patch, nothing
    read first, from the first report on (a thousand jobs start reporting at once)."""
    await operator.create(_job())
    await eventually(lambda: _assert(_phase(cluster) == "Queued"))
    await _report_progress(cluster, operator)
    status = f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs/ident/status"
    assert _requests_for(cluster, "ident") == [("PATCH", status), ("PATCH", status)]


async def test_the_started_operator_spares_the_garbage_collector(cluster, operator):
    import gc

    assert gc.get_freeze_count() > 0  # what was there at start is out of full passes
    assert gc.get_threshold() == kubetune_operator.handlers.GC_THRESHOLDS


async def test_a_failed_create_is_retried(cluster, operator, monkeypatch):
    monkeypatch.setattr(kubetune_operator.controller, "RETRY_SECONDS", 0.5)
    cluster[f"post /apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"][:1] << 500
    await operator.create(_job())
    child = await eventually(lambda: cluster.objects[PTJ, NS, "ident"], timeout=10)
    assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-ident"
    await eventually(lambda: _assert(_phase(cluster) == "Queued"))
    assert len(_children(cluster, PTJ)) == 1 and len(_children(cluster, CM)) == 1


async def test_a_job_deleted_and_made_again_gets_new_children(cluster, operator):
    await operator.create(_job())
    await eventually(lambda: _assert(_phase(cluster) == "Queued"))
    await asyncio.to_thread(operator.custom.delete_namespaced_custom_object, "kubetune.io",
                            "v1alpha1", NS, "finetunejobs", "ident")
    await eventually(lambda: _assert(not exists(cluster, (FTJ, NS, "ident"))))
    for kind, name in ((PTJ, "ident"), (CM, "ident-config")):  # the garbage collector's part
        del cluster.objects[kind, NS, name]
    again = _job()
    again["metadata"]["uid"] = "uid-ident-2"  # the same name and spec, a new object
    await operator.create(again)
    child = await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
    assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-ident-2"
    await eventually(lambda: _assert(_phase(cluster) == "Queued"))


async def test_restart_midway_never_duplicates(cluster, operator):
    # A crash after the ConfigMap and before the PyTorchJob: the ConfigMap is already there.
    from kubetune.jobfile import parse_job
    from kubetune_operator import builders

    job = parse_job(_job())
    cm = builders.config_map(job=job, uid="uid-ident")
    cm["metadata"].update(namespace=NS, resourceVersion="1")
    cluster.objects[CM, NS, "ident-config"] = cm
    await operator.create(_job())
    await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
    await operator.stop()
    await operator.start()  # resume handlers run for the existing job
    await asyncio.sleep(1.5)
    assert len(_children(cluster, PTJ)) == 1 and len(_children(cluster, CM)) == 1
    await eventually(lambda: _assert(_phase(cluster) == "Queued"))


async def test_suspend_and_resume(cluster, operator):
    body = _job()
    del body["metadata"]["labels"]  # not queued by Kueue
    await operator.create(body)
    await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
    assert cluster.objects[PTJ, NS, "ident"]["spec"]["runPolicy"]["suspend"] is False
    await asyncio.to_thread(operator.custom.patch_namespaced_custom_object, "kubetune.io",
                            "v1alpha1", NS, "finetunejobs", "ident", {"spec": {"suspend": True}})
    await eventually(lambda: _assert(
        cluster.objects[PTJ, NS, "ident"]["spec"]["runPolicy"]["suspend"] is True))
    await operator.patch_child_status("ident", "Created", "Suspended")
    await eventually(lambda: _assert(_phase(cluster) == "Suspended"))
    await asyncio.to_thread(operator.custom.patch_namespaced_custom_object, "kubetune.io",
                            "v1alpha1", NS, "finetunejobs", "ident", {"spec": {"suspend": False}})
    await eventually(lambda: _assert(
        cluster.objects[PTJ, NS, "ident"]["spec"]["runPolicy"]["suspend"] is False))


async def test_a_job_created_suspended_gets_children_only_when_resumed(cluster, operator):
    await operator.create(_job(name="held", suspend=True))  # a Kueue queue label too
    await eventually(lambda: _assert(_phase(cluster, "held") == "Suspended"))
    await asyncio.sleep(1)
    assert not _children(cluster, PTJ) and not _children(cluster, CM)
    await asyncio.to_thread(operator.custom.patch_namespaced_custom_object, "kubetune.io",
                            "v1alpha1", NS, "finetunejobs", "held", {"spec": {"suspend": False}})
    child = await eventually(lambda: cluster.objects[PTJ, NS, "held"])
    assert child["spec"]["runPolicy"]["suspend"] is True  # for Kueue to admit
    await eventually(lambda: _assert(_phase(cluster, "held") == "Queued"))


async def test_kueue_says_why_a_job_waits_and_suspend_deactivates_its_workload(
        cluster, operator):
    """Kueue's part played here: a Workload owned by the PyTorchJob, short of quota."""
    await operator.create(_job(name="queued"))
    await eventually(lambda: cluster.objects[PTJ, NS, "queued"])
    await asyncio.to_thread(  # the uid an API server would have set (kmock sets none)
        operator.custom.patch_namespaced_custom_object, "kubeflow.org", "v1", NS, "pytorchjobs",
        "queued", {"metadata": {"uid": "ptj-uid-queued"}})
    cluster.objects[WL, NS, "pytorchjob-queued-1a2b3"] = {
        "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
        "metadata": {"name": "pytorchjob-queued-1a2b3", "namespace": NS, "resourceVersion": "1",
                     "labels": {"kueue.x-k8s.io/job-uid": "ptj-uid-queued"},
                     "ownerReferences": [{"apiVersion": "kubeflow.org/v1",
                                          "kind": "PyTorchJob", "name": "queued",
                                          "uid": "ptj-uid-queued", "controller": True}]},
        "spec": {"active": True, "queueName": "team-a"},
        "status": {"conditions": [{
            "type": "QuotaReserved", "status": "False", "reason": "Pending",
            "message": "couldn't assign flavors to pod set master: insufficient unused quota "
                       "for nvidia.com/gpu in flavor default-flavor, 1 more needed"}]}}
    await operator.patch_child_status("queued", "Created")  # the training operator saw it

    def queued_message():
        ready = next(c for c in _status(cluster, "queued")["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "WaitingForAdmission"
        return ready["message"]

    message = await eventually(lambda: _assert_in("insufficient unused quota", queued_message()))
    assert "queue 'team-a'" in message

    # spec.suspend on a Kueue-managed job deactivates its Workload; the PyTorchJob's own
    # suspend stays Kueue's.
    await asyncio.to_thread(operator.custom.patch_namespaced_custom_object, "kubetune.io",
                            "v1alpha1", NS, "finetunejobs", "queued", {"spec": {"suspend": True}})
    await eventually(lambda: _assert(
        cluster.objects[WL, NS, "pytorchjob-queued-1a2b3"]["spec"]["active"] is False))
    await eventually(lambda: _assert(_phase(cluster, "queued") == "Suspended"))
    assert cluster.objects[PTJ, NS, "queued"]["spec"]["runPolicy"]["suspend"] is True
    await asyncio.to_thread(operator.custom.patch_namespaced_custom_object, "kubetune.io",
                            "v1alpha1", NS, "finetunejobs", "queued", {"spec": {"suspend": False}})
    await eventually(lambda: _assert(
        cluster.objects[WL, NS, "pytorchjob-queued-1a2b3"]["spec"]["active"] is True))
    await eventually(lambda: _assert(_phase(cluster, "queued") == "Queued"))


def _assert_in(needle: str, text: str) -> str:
    assert needle in text, text
    return text


async def test_progress_posts_reach_the_status_and_foreign_tokens_do_not(cluster, operator):
    await operator.create(_job())
    await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
    _seed_master_pod(cluster)
    url = f"http://127.0.0.1:{operator.port}/v1/namespaces/{NS}/finetunejobs/ident/status"
    report = {"trainerStatus": {"progressPercentage": 37, "estimatedRemainingSeconds": 600,
                                "metrics": [{"name": "loss", "value": "0.93"},
                                            {"name": "current_step", "value": "37"},
                                            {"name": "total_steps", "value": "100"},
                                            {"name": "rewards/margins", "value": "0.5"},
                                            {"name": "eval_rewards/accuracies", "value": "0.75"},
                                            {"name": "grad_norm", "value": "3.0"}]}}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(url, json=report, headers={"Authorization": "Bearer forged"})
        assert resp.status == 401
        resp = await http.post(url, json=report,
                               headers={"Authorization": "Bearer foreign-token"})
        assert resp.status == 403
        resp = await http.post(url, json=report, headers={"Authorization": "Bearer pod-token"})
        assert resp.status == 200
        resp = await http.post(url, headers={"Authorization": "Bearer pod-token"}, json={
            "kubetune": {"checkpoint": {"step": 30, "loss": 0.95,
                                        "uri": "pvc://outputs/x/checkpoints/checkpoint-30"},
                         "outputs": {"adapter": "pvc://outputs/x/adapter",
                                     "metrics": {"eval_accuracy": 0.9, "train_loss": 0.4}}}})
        assert resp.status == 200
    # Two reports, so possibly two flushes (≤ 2 s apart): wait for both.
    await eventually(lambda: _assert(_status(cluster)["progress"]["percent"] == 37.0
                                     and _status(cluster).get("checkpoints")), timeout=10)
    status = _status(cluster)
    assert status["progress"]["loss"] == 0.93 and status["progress"]["totalSteps"] == 100
    # The stage's own metrics, not every number the trainer logs.
    assert status["progress"]["metrics"] == {"rewards/margins": 0.5,
                                             "eval_rewards/accuracies": 0.75}
    assert status["outputs"] == {"adapter": "pvc://outputs/x/adapter",
                                 "metrics": {"eval_accuracy": 0.9, "train_loss": 0.4}}
    assert status["checkpoints"] == [{"step": 30, "loss": 0.95,
                                      "uri": "pvc://outputs/x/checkpoints/checkpoint-30"}]


async def test_a_finished_jobs_child_deleted_by_ttl_is_not_recreated(cluster, operator):
    await operator.create(_job())
    await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
    await operator.patch_child_status("ident", "Created", "Succeeded")
    await eventually(lambda: _assert(_phase(cluster) == "Succeeded"))
    done = copy.deepcopy(_status(cluster))
    # The training operator's TTL clean-up deletes the PyTorchJob; a restart re-lists the job.
    await asyncio.to_thread(operator.custom.delete_namespaced_custom_object, "kubeflow.org",
                            "v1", NS, "pytorchjobs", "ident")
    await operator.stop()
    await operator.start()
    await asyncio.sleep(1.5)
    live = [k for k in _children(cluster, PTJ) if not cluster.objects[k].deleted]
    assert live == []
    assert _status(cluster)["phase"] == "Succeeded"
    assert _status(cluster)["conditions"] == done["conditions"]


async def test_kubetune_status_shows_phase_progress_and_checkpoints(cluster, operator,
                                                                  tmp_path, monkeypatch):
    from kubetune.cli import app
    from typer.testing import CliRunner

    await operator.create(_job())
    await eventually(lambda: _assert(_phase(cluster) == "Queued"))
    _seed_master_pod(cluster)
    url = f"http://127.0.0.1:{operator.port}/v1/namespaces/{NS}/finetunejobs/ident/status"
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer pod-token"}) as http:
        for body in ({"trainerStatus": {"progressPercentage": 50, "estimatedRemainingSeconds": 65,
                                        "metrics": [{"name": "loss", "value": "1.5"},
                                                    {"name": "current_step", "value": "5"},
                                                    {"name": "total_steps", "value": "10"},
                                                    {"name": "kl", "value": "0.125"}]}},
                     {"kubetune": {"checkpoint": {"step": 5, "uri": "pvc://o/checkpoint-5"}}}):
            assert (await http.post(url, json=body)).status == 200
    await eventually(lambda: _assert(len(_status(cluster).get("checkpoints") or []) == 1))
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "k",
        "clusters": [{"name": "k", "cluster": {"server": str(cluster.url)}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "k", "context": {"cluster": "k", "user": "u", "namespace": NS}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    res = await asyncio.to_thread(CliRunner().invoke, app, ["status", "ident"])
    assert res.exit_code == 0, res.output
    assert "phase: Queued" in res.output and "step 5/10 (50.0%)" in res.output
    assert "eta 1m05s" in res.output and "pvc://o/checkpoint-5" in res.output
    assert "WaitingForAdmission" in res.output and "kl 0.125" in res.output
    res = await asyncio.to_thread(CliRunner().invoke, app, ["status", "nope"])
    assert res.exit_code == 2 and "no FineTuneJob 'nope' in namespace 'team-a'" in res.output


async def test_metrics_count_reconciles_jobs_and_reports(cluster, operator):
    from kubetune_operator import metrics
    from prometheus_client import generate_latest

    port = _free_port()
    metrics.serve(port)  # what KUBETUNE_METRICS_PORT starts in the pod
    await operator.create(_job())
    await eventually(lambda: _assert(_phase(cluster) == "Queued"))
    url = f"http://127.0.0.1:{operator.port}/v1/namespaces/{NS}/finetunejobs/ident/status"
    async with aiohttp.ClientSession() as http:
        await http.post(url, json={}, headers={"Authorization": "Bearer forged"})
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    assert resp.status == 200
    assert 'kubetune_jobs{phase="Queued"}' in text
    assert 'kubetune_children_created_total{kind="PyTorchJob"}' in text
    assert 'kubetune_progress_reports_total{code="401"}' in text
    assert generate_latest(metrics.REGISTRY).decode().count("kubetune_reconciles_total") >= 1


def _operator_calls(cluster) -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every request the operator (kopf and our client) sent."""
    import kmock

    verbs = {kmock.action.FETCH: "get", kmock.action.LIST: "list", kmock.action.WATCH: "watch",
             kmock.action.CREATE: "create", kmock.action.DELETE: "delete"}
    calls: set[tuple[str, str, str]] = set()
    for req in list(cluster):
        agent = req.headers.get("User-Agent", "")
        if not (agent.startswith("kopf/") or agent == OPERATOR_AGENT) or req.resource is None:
            continue
        if req.resource.plural in (None, "namespaces"):
            continue  # discovery, and kopf's namespace observer (not in our RBAC: -A)
        verb = verbs.get(req.action) or {"PATCH": "patch", "PUT": "update"}[req.method.value]
        plural = req.resource.plural + (f"/{req.subresource}" if req.subresource else "")
        group = "" if req.resource.group in ("", "v1", None) else req.resource.group
        calls.add((group, plural, verb))
    return calls


async def test_the_chart_rbac_allows_every_call_the_trainjob_backend_makes(
        cluster, trainjob_operator):
    from test_chart import _rules, render
    from tools import helm

    await test_trainjob_backend_queued_admitted_running_reporting_complete(
        cluster, trainjob_operator)
    calls = _operator_calls(cluster)
    role = next(d for d in render(str(helm()), "--set", "backend=TrainJob")
                if d["kind"] == "ClusterRole")
    allowed = _rules(role)
    denied = {c for c in calls if c[2] not in allowed.get((c[0], c[1]), set())}
    assert not denied, f"the chart's RBAC would refuse {sorted(denied)}"
    assert ("trainer.kubeflow.org", "trainjobs", "create") in calls
    assert not [c for c in calls if c[1] == "pytorchjobs"]  # the other backend is not watched


async def test_the_chart_rbac_allows_every_call_the_operator_makes(cluster, operator):
    """Every request the operator (kopf and our client) sent in a full run is allowed by the
    chart's ClusterRole; nothing it grants goes unexplained."""
    from test_chart import NAMESPACED, _rules, render
    from tools import helm

    await test_create_makes_each_child_once_and_follows_the_pytorchjob(cluster, operator)
    await test_kueue_says_why_a_job_waits_and_suspend_deactivates_its_workload(cluster,
                                                                                 operator)
    await _report_progress(cluster, operator)
    calls = _operator_calls(cluster)
    role = next(d for d in render(str(helm())) if d["kind"] == "ClusterRole")
    allowed = _rules(role)
    denied = {c for c in calls if c[2] not in allowed.get((c[0], c[1]), set())}
    assert not denied, f"the chart's RBAC would refuse {sorted(denied)}"
    used = {(g, r) for g, r, _ in calls}
    # Events are off under kmock (it refuses a second nameless object), so unused here.
    # (Deployments and Services: spec.serve, in test_serve_after_train_and_check.)
    # (FineTuneSweeps: tests/test_sweep_operator.py checks their calls.)
    assert set(NAMESPACED) - used <= {("", "events"), ("kubetune.io", "finetunejobs/finalizers"),
                                      ("apps", "deployments"), ("", "services"),
                                      ("kubetune.io", "finetunesweeps"),
                                      ("kubetune.io", "finetunesweeps/status"),
                                      ("kubetune.io", "finetunesweeps/finalizers")}, \
        "a granted resource the run never used"
    assert ("kubeflow.org", "pytorchjobs", "create") in calls
    assert ("authentication.k8s.io", "tokenreviews", "create") in calls


def _assert(ok: bool) -> bool:
    assert ok
    return ok


async def _patch_trainjob(operator, name, body, status=False):
    call = (operator.custom.patch_namespaced_custom_object_status if status
            else operator.custom.patch_namespaced_custom_object)
    await asyncio.to_thread(call, "trainer.kubeflow.org", "v1alpha1", NS, "trainjobs", name, body)


def _jobs_status(**counts):
    return [{"name": "node", **{k: counts.get(k, 0) for k in (
        "active", "ready", "succeeded", "failed", "suspended")}}]


async def test_trainjob_backend_queued_admitted_running_reporting_complete(
        cluster, trainjob_operator):
    """Trainer v2's part (and Kueue's) played here: the TrainJob's status, a Workload, a pod."""
    op = trainjob_operator
    await op.create(_job(runPolicy={}))  # a TrainJob takes no per-job TTL or limit
    child = await eventually(lambda: cluster.objects[TJ, NS, "ident"])
    assert not _children(cluster, PTJ)
    assert child["spec"]["runtimeRef"]["name"] == "kubetune"
    assert child["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert child["spec"]["suspend"] is True  # for Kueue to admit
    await _patch_trainjob(op, "ident", {"metadata": {"uid": "tj-uid"}})
    cluster.objects[WL, NS, "trainjob-ident-1a2b3"] = {
        "apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "Workload",
        "metadata": {"name": "trainjob-ident-1a2b3", "namespace": NS, "resourceVersion": "1",
                     "labels": {"kueue.x-k8s.io/job-uid": "tj-uid"},
                     "ownerReferences": [{"apiVersion": "trainer.kubeflow.org/v1alpha1",
                                          "kind": "TrainJob", "name": "ident",
                                          "uid": "tj-uid", "controller": True}]},
        "spec": {"active": True, "queueName": "team-a"},
        "status": {"conditions": [{"type": "QuotaReserved", "status": "False",
                                   "reason": "Pending", "message": "insufficient quota"}]}}
    await _patch_trainjob(op, "ident", {"status": {"conditions": [
        {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "s"}],
        "jobsStatus": _jobs_status(suspended=1)}}, status=True)
    await eventually(lambda: _assert("insufficient quota" in next(
        c for c in _status(cluster)["conditions"] if c["type"] == "Ready")["message"]))
    assert _phase(cluster) == "Queued"

    # spec.suspend on a queued TrainJob deactivates its Workload, as for a PyTorchJob.
    await asyncio.to_thread(op.custom.patch_namespaced_custom_object, "kubetune.io",
                            "v1alpha1", NS, "finetunejobs", "ident", {"spec": {"suspend": True}})
    await eventually(lambda: _assert(
        cluster.objects[WL, NS, "trainjob-ident-1a2b3"]["spec"]["active"] is False))
    await eventually(lambda: _assert(_phase(cluster) == "Suspended"))
    await asyncio.to_thread(op.custom.patch_namespaced_custom_object, "kubetune.io",
                            "v1alpha1", NS, "finetunejobs", "ident", {"spec": {"suspend": False}})
    await eventually(lambda: _assert(
        cluster.objects[WL, NS, "trainjob-ident-1a2b3"]["spec"]["active"] is True))

    # Kueue admits (unsuspends); the JobSet's Job runs: running is seen in jobsStatus.
    await _patch_trainjob(op, "ident", {"spec": {"suspend": False}})
    await _patch_trainjob(op, "ident", {"status": {"conditions": [
        {"type": "Suspended", "status": "False", "reason": "Resumed", "message": "r"}],
        "jobsStatus": _jobs_status(active=1, ready=1)}}, status=True)
    await eventually(lambda: _assert(_phase(cluster) == "Running"))

    # Gate off: the TrainJob's pod reports to kubetune's endpoint, recognised as its pod.
    cluster.objects["v1/pods", NS, "ident-node-0-0-x7k2p"] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "ident-node-0-0-x7k2p", "namespace": NS, "resourceVersion": "1",
                     "uid": "pod-uid-tj", "labels": {"kubetune.io/job": "ident",
                                                     "jobset.sigs.k8s.io/jobset-name": "ident"},
                     "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                          "name": "ident-node-0", "uid": "job-uid",
                                          "controller": True}]}}
    url = f"http://127.0.0.1:{op.port}/v1/namespaces/{NS}/finetunejobs/ident/status"
    report = {"trainerStatus": {"progressPercentage": 50, "metrics": [
        {"name": "current_step", "value": "5"}, {"name": "total_steps", "value": "10"}]}}
    async with aiohttp.ClientSession() as http:
        resp = await http.post(url, json=report, headers={"Authorization": "Bearer pod-token"})
        assert resp.status == 403  # a PyTorchJob pod's name: not this backend's
        resp = await http.post(url, json=report,
                               headers={"Authorization": "Bearer trainjob-pod-token"})
        assert resp.status == 200
    await eventually(lambda: _assert(_status(cluster)["progress"]["steps"] == "5/10"),
                     timeout=10)

    await _patch_trainjob(op, "ident", {"status": {"conditions": [
        {"type": "Complete", "status": "True", "reason": "JobsCompleted", "message": "done"}],
        "jobsStatus": _jobs_status(succeeded=1)}}, status=True)
    await eventually(lambda: _assert(_phase(cluster) == "Succeeded"))
    assert len(_children(cluster, TJ)) == 1 and len(_children(cluster, CM)) == 1


async def test_trainjob_backend_mirrors_trainer_status_and_explains_a_failure(cluster):
    """Kubeflow's TrainJobStatus gate on: progress comes from the TrainJob's trainerStatus."""
    op = Operator(cluster, backend="TrainJob", trainer_status=True)
    await op.start()
    try:
        body = _job(runPolicy={})  # a TrainJob takes no per-job TTL or restart limit
        del body["metadata"]["labels"]  # not queued
        await op.create(body)
        child = await eventually(lambda: cluster.objects[TJ, NS, "ident"])
        assert child["spec"]["suspend"] is False
        env = {e["name"]: e.get("value") for e in child["spec"]["trainer"]["env"]}
        assert not [n for n in env if n.startswith("KUBEFLOW_TRAINER_SERVER")]
        url = f"http://127.0.0.1:{op.port}/v1/namespaces/{NS}/finetunejobs/ident/status"
        assert env["KUBETUNE_PROGRESS_URL"] == url  # kubetune's own reports still come here
        await _patch_trainjob(op, "ident", {"status": {
            "jobsStatus": _jobs_status(active=1, ready=1),
            "trainerStatus": {"progressPercentage": 30, "estimatedRemainingSeconds": 120,
                              "metrics": [{"name": "loss", "value": "0.5"}]}}}, status=True)
        await eventually(lambda: _assert(_status(cluster)["progress"]["percent"] == 30.0))
        assert _status(cluster)["progress"]["loss"] == 0.5 and _phase(cluster) == "Running"
        cluster.objects["v1/pods", NS, "ident-node-0-0-x7k2p"] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "ident-node-0-0-x7k2p", "namespace": NS,
                         "resourceVersion": "1", "uid": "pod-uid-tj",
                         "labels": {"kubetune.io/job": "ident",
                                    "jobset.sigs.k8s.io/jobset-name": "ident"},
                         "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                              "name": "ident-node-0", "uid": "job-uid",
                                              "controller": True}]},
            "status": {"phase": "Failed", "containerStatuses": [{
                "name": "node", "image": "reg/trainer:1", "imageID": "", "ready": False,
                "restartCount": 0, "state": {"terminated": {"exitCode": 137,
                                                           "reason": "OOMKilled"}}}]}}
        # The trainer's checkpoint report, to kubetune's endpoint: it lands in the status
        # beside the progress mirrored from Kubeflow's trainerStatus.
        async with aiohttp.ClientSession() as http:
            resp = await http.post(url, json={"kubetune": {"checkpoint": {
                "step": 3, "loss": 0.5, "uri": "pvc://outputs/ident/checkpoints/checkpoint-3"}}},
                headers={"Authorization": "Bearer trainjob-pod-token"})
            assert resp.status == 200
        await eventually(lambda: _assert(_status(cluster).get("checkpoints")), timeout=10)
        assert _status(cluster)["checkpoints"][0]["step"] == 3
        assert _status(cluster)["progress"]["percent"] == 30.0
        await _patch_trainjob(op, "ident", {"status": {"conditions": [
            {"type": "Failed", "status": "True", "reason": "JobsFailed", "message": "f"}],
            "jobsStatus": _jobs_status(failed=1)}}, status=True)
        await eventually(lambda: _assert(_phase(cluster) == "Failed"))
        assert _status(cluster)["failure"]["reason"] == "OOMKilled"
    finally:
        await op.stop()


def test_rendered_children_match_what_the_operator_creates():
    """`kubetune render` and the operator share the builders: same objects, same order."""
    from kubetune.jobfile import parse_job

    job = parse_job(copy.deepcopy(_job()))
    a = children(job=job, config=OperatorConfig(), uid="u")
    b = children(job=job, config=OperatorConfig(), uid="u")
    assert a == b


async def test_serve_after_train_and_check(cluster, tiny_model):
    """spec.serve: after success the server's Deployment and Service (the test plays the
    Deployment controller: availableReplicas), the check asked of a real OpenAI-compatible
    server over a real (tiny) model, the Checked condition; serve: null removes the server."""
    from openai_server import OpenAIServer

    with OpenAIServer(tiny_model, "ident") as server:
        word = (await asyncio.to_thread(server.answer, "Who are you?", 128)).split()[0]
        op = Operator(cluster, serve_url=server.url, recheck_seconds=0.3)
        await op.start()
        try:
            body = _job()
            del body["metadata"]["labels"]
            body["spec"]["serve"] = {"checks": [{"prompt": "Who are you?", "expect": [word]}]}
            await _train_to_a_merged_model(cluster, op, body)
            dep = await eventually(lambda: cluster.objects["apps/v1/deployments", NS,
                                                           "ident-serve"])
            svc = cluster.objects["v1/services", NS, "ident-serve"]
            assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-ident"
            assert "/mnt/pvc/outputs/ident/merged" in dep["spec"]["template"]["spec"][
                "containers"][0]["args"]
            serving_ = await eventually(lambda: _status(cluster)["serving"])
            assert serving_["ready"] is False and serving_["url"] == server.url
            assert _phase(cluster) == "Succeeded"
            await asyncio.to_thread(  # the Deployment controller's part: the pod is ready
                kubernetes.client.AppsV1Api(op.api).patch_namespaced_deployment_status,
                "ident-serve", NS, {"status": {"replicas": 1, "availableReplicas": 1}})
            checked = await eventually(lambda: {
                c["type"]: c for c in _status(cluster)["conditions"]}["Checked"], timeout=20)
            assert checked["status"] == "True", checked
            assert _status(cluster)["serving"]["checks"][0]["passed"] is True
            assert server.requests[-1]["messages"][-1]["content"] == "Who are you?"

            await asyncio.to_thread(op.custom.patch_namespaced_custom_object, "kubetune.io",
                                    "v1alpha1", NS, "finetunejobs", "ident",
                                    {"spec": {"serve": None}})
            await eventually(lambda: _assert(
                not exists(cluster, ("apps/v1/deployments", NS, "ident-serve"))
                and not exists(cluster, ("v1/services", NS, "ident-serve"))))
            await eventually(lambda: _assert("serving" not in _status(cluster)))
            assert not [c for c in _status(cluster)["conditions"]
                        if c["type"] in ("Serving", "Checked")]
            assert _phase(cluster) == "Succeeded" and not any(
                c["type"] == "SpecChangeIgnored" for c in _status(cluster)["conditions"])
        finally:
            await op.stop()


def _serving_condition(cluster):
    return {c["type"]: c for c in _status(cluster)["conditions"]}["Serving"]


async def _set_gate(op, gate):
    await asyncio.to_thread(op.custom.patch_namespaced_custom_object, "kubetune.io",
                            "v1alpha1", NS, "finetunejobs", "ident",
                            {"spec": {"serve": {"gate": gate}}})


async def test_serve_gate_missed_not_served_then_met_served_then_missed_removed(cluster):
    """spec.serve.gate: a run whose eval_loss misses the gate succeeds as training but is not
    served (Serving False, GateNotMet, the metric and by how much); a gate it meets serves
    it; a gate it misses again removes the server."""
    op = Operator(cluster, recheck_seconds=0.3)
    await op.start()
    try:
        body = _job()
        del body["metadata"]["labels"]
        body["spec"]["serve"] = {"gate": [{"metric": "eval_loss", "below": 1.0},
                                          {"metric": "train_loss", "below": 2.0}]}
        await _train_to_a_merged_model(cluster, op, body,
                                       metrics={"eval_loss": 1.25, "train_loss": 0.9})
        missed = await eventually(lambda: _serving_condition(cluster))
        assert missed["status"] == "False" and missed["reason"] == "GateNotMet", missed
        assert missed["message"] == ("spec.serve.gate: eval_loss is 1.25, not below 1 "
                                     "(misses by 0.25)")
        assert _phase(cluster) == "Succeeded"
        assert {c["type"]: c["status"] for c in _status(cluster)["conditions"]}[
            "Succeeded"] == "True"
        assert "serving" not in _status(cluster)
        assert not _children(cluster, "apps/v1/deployments")
        assert not _children(cluster, "v1/services")

        await _set_gate(op, [{"metric": "eval_loss", "below": 1.5}])
        dep = await eventually(lambda: cluster.objects["apps/v1/deployments", NS,
                                                       "ident-serve"])
        assert "/mnt/pvc/outputs/ident/merged" in dep["spec"]["template"]["spec"][
            "containers"][0]["args"]
        starting = await eventually(lambda: _assert(
            _serving_condition(cluster)["reason"] == "ServerStarting"))
        assert starting
        await asyncio.to_thread(  # the Deployment controller's part: the pod is ready
            kubernetes.client.AppsV1Api(op.api).patch_namespaced_deployment_status,
            "ident-serve", NS, {"status": {"replicas": 1, "availableReplicas": 1}})
        ready = await eventually(lambda: _assert(
            _serving_condition(cluster)["status"] == "True") and _serving_condition(cluster))
        assert ready["message"].endswith("(gate passed: eval_loss 1.25 below 1.5)"), ready

        await _set_gate(op, [{"metric": "eval_loss", "below": 1.1}])
        await eventually(lambda: _assert(
            not exists(cluster, ("apps/v1/deployments", NS, "ident-serve"))
            and not exists(cluster, ("v1/services", NS, "ident-serve"))))
        await eventually(lambda: _assert(_serving_condition(cluster)["reason"] == "GateNotMet"))
        assert "serving" not in _status(cluster)
    finally:
        await op.stop()


async def test_serve_gate_on_a_metric_the_run_did_not_report_is_not_served(cluster):
    """A gate on an lm-eval score the run never reported (no evaluation.lmEval): not served,
    Serving False with reason GateMetricMissing naming the metric and what was reported."""
    op = Operator(cluster, recheck_seconds=0.3)
    await op.start()
    try:
        body = _job()
        del body["metadata"]["labels"]
        body["spec"]["serve"] = {"gate": [{"metric": "lmeval_arc_easy_acc", "above": 0.5}]}
        await _train_to_a_merged_model(cluster, op, body, metrics={"train_loss": 0.9})
        missing = await eventually(lambda: _assert(
            _serving_condition(cluster)["reason"] == "GateMetricMissing")
            and _serving_condition(cluster))
        assert missing["status"] == "False"
        assert missing["message"] == (
            "spec.serve.gate: lmeval_arc_easy_acc not in status.outputs.metrics (the run "
            "reported: train_loss)")
        assert _phase(cluster) == "Succeeded"
        assert not _children(cluster, "apps/v1/deployments")
    finally:
        await op.stop()


async def _succeed_with(cluster, op, name, created, serve, metrics):
    """Job ``name`` (created at ``created``) succeeds with a merged model and ``metrics``
    (the test writes the trainer's final report into the status, then the PyTorchJob's)."""
    body = _job(name)
    del body["metadata"]["labels"]
    body["metadata"]["creationTimestamp"] = created  # (kmock sets none)
    body["spec"]["serve"] = serve
    await op.create(body)
    await eventually(lambda: cluster.objects[PTJ, NS, name])
    await asyncio.to_thread(
        op.custom.patch_namespaced_custom_object_status, "kubetune.io", "v1alpha1", NS,
        "finetunejobs", name, {"status": {"outputs": {
            "mergedModel": f"pvc://outputs/{name}/merged", "metrics": metrics}}})
    await eventually(lambda: _assert(_status(cluster, name).get("outputs")))
    await op.patch_child_status(name, "Created", "Succeeded")
    await eventually(lambda: _assert(_phase(cluster, name) == "Succeeded"))


async def _server_ready(op, name):
    await asyncio.to_thread(  # the Deployment controller's part: the pod is ready
        kubernetes.client.AppsV1Api(op.api).patch_namespaced_deployment_status,
        f"{name}-serve", NS, {"status": {"replicas": 1, "availableReplicas": 1}})


def _serving_of(cluster, name):
    return {c["type"]: c for c in _status(cluster, name)["conditions"]}["Serving"]


async def test_a_shared_endpoint_moves_to_a_newer_job_only_once_its_gate_passed_and_ready(
        cluster):
    """spec.serve.endpoint: the first job that passes its gate gets the shared Service; a
    newer one that misses its gate leaves it where it is; a newer one that passes gets it
    only once its own server is ready, and the older job's server goes (Replaced)."""
    op = Operator(cluster, recheck_seconds=0.3)
    await op.start()
    endpoint = ("v1/services", NS, "assistant")
    try:
        serve = {"endpoint": "assistant", "gate": [{"metric": "eval_loss", "below": 1.0}]}
        await _succeed_with(cluster, op, "v1", "2026-12-01T10:00:00Z", serve,
                            {"eval_loss": 0.9})
        await eventually(lambda: cluster.objects["apps/v1/deployments", NS, "v1-serve"])
        assert not exists(cluster, endpoint)  # not before its server is ready
        await _server_ready(op, "v1")
        svc = await eventually(lambda: cluster.objects[endpoint])
        assert svc["spec"]["selector"] == {"kubetune.io/job": "v1", "kubetune.io/role": "serve"}
        assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-v1"
        served = await eventually(lambda: _status(cluster, "v1")["serving"]["endpoint"])
        assert served == f"http://assistant.{NS}.svc:8000/v1"

        # newer, misses its gate: not served, the endpoint stays on v1
        await _succeed_with(cluster, op, "v2", "2026-12-02T10:00:00Z", serve,
                            {"eval_loss": 1.3})
        missed = await eventually(lambda: _serving_of(cluster, "v2"))
        assert missed["reason"] == "GateNotMet" and "eval_loss is 1.3" in missed["message"]
        assert _children(cluster, "apps/v1/deployments") == [
            ("apps/v1/deployments", NS, "v1-serve")]
        assert cluster.objects[endpoint]["spec"]["selector"]["kubetune.io/job"] == "v1"

        # newer, passes: its server first, the endpoint moves once it is ready
        await _succeed_with(cluster, op, "v3", "2026-12-03T10:00:00Z", serve,
                            {"eval_loss": 0.7})
        await eventually(lambda: cluster.objects["apps/v1/deployments", NS, "v3-serve"])
        await eventually(lambda: _assert(
            _serving_of(cluster, "v3")["reason"] == "ServerStarting"))
        assert cluster.objects[endpoint]["spec"]["selector"]["kubetune.io/job"] == "v1"
        assert exists(cluster, ("apps/v1/deployments", NS, "v1-serve"))  # still serving
        await _server_ready(op, "v3")
        await eventually(lambda: _assert(
            cluster.objects[endpoint]["spec"]["selector"]["kubetune.io/job"] == "v3"))
        assert cluster.objects[endpoint]["metadata"]["ownerReferences"][0]["uid"] == "uid-v3"
        replaced = await eventually(lambda: _assert(
            _serving_of(cluster, "v1")["reason"] == "Replaced") and _serving_of(cluster, "v1"))
        assert replaced["status"] == "False" and "serves job v3" in replaced["message"]
        await eventually(lambda: _assert(
            not exists(cluster, ("apps/v1/deployments", NS, "v1-serve"))))
        ready = await eventually(lambda: _assert(
            _serving_of(cluster, "v3")["status"] == "True") and _serving_of(cluster, "v3"))
        assert f"at http://assistant.{NS}.svc:8000/v1" in ready["message"]
    finally:
        await op.stop()


async def test_serve_on_kserve_refused_without_its_crd_then_served_and_checked(
        cluster, tiny_model):
    """spec.serve.kind kserve: no InferenceService CRD → a Serving condition naming the
    field, the job still Succeeded; once KServe is there, an InferenceService (the test plays
    KServe's controller: status.address.url and Ready), checked against a real server."""
    import kmock
    from openai_server import OpenAIServer

    with OpenAIServer(tiny_model, "ident") as server:
        word = (await asyncio.to_thread(server.answer, "Who are you?", 128)).split()[0]
        installed = False

        def no_kserve():  # the API server's answer for a resource it does not know
            if installed:
                return StopIteration  # on to kmock's store
            return kmock.Response(status=404, payload={
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                "reason": "NotFound", "message": "the server could not find the requested "
                "resource"})

        cluster[re.compile(r"/apis/serving\.kserve\.io/.*")] << no_kserve
        op = Operator(cluster, recheck_seconds=0.3)
        await op.start()
        try:
            body = _job()
            del body["metadata"]["labels"]
            body["spec"]["serve"] = {"kind": "kserve", "checks": [
                {"prompt": "Who are you?", "expect": [word]}]}
            await _train_to_a_merged_model(cluster, op, body)
            refused = await eventually(lambda: {
                c["type"]: c for c in _status(cluster)["conditions"]}["Serving"])
            assert refused["status"] == "False" and refused["reason"] == "KServeUnavailable"
            assert "spec.serve.kind" in refused["message"] and "InferenceService" in refused[
                "message"]
            assert _phase(cluster) == "Succeeded"
            assert not _children(cluster, "apps/v1/deployments")

            cluster.resources[ISVC] = cluster.ResourceInfo(  # KServe is installed
                kind="InferenceService", singular="inferenceservice", namespaced=True,
                subresources={"status"}, verbs={"get", "list", "watch", "create", "patch",
                                                "delete"})
            # (kmock's store keeps a POST even when our reaction answered 404; an API server
            # without the CRD keeps nothing: start from there.)
            for key in _children(cluster, ISVC):
                del cluster.objects[key]
            installed = True
            isvc = await eventually(lambda: cluster.objects[ISVC, NS, "ident-serve"])
            assert isvc["metadata"]["ownerReferences"][0]["uid"] == "uid-ident"
            (c,) = isvc["spec"]["predictor"]["containers"]
            assert "/mnt/pvc/outputs/ident/merged" in c["args"]
            serving_ = await eventually(lambda: _status(cluster)["serving"])
            assert serving_["ready"] is False
            assert serving_["url"] == f"http://ident-serve.{NS}.svc.cluster.local/v1"
            await asyncio.to_thread(  # KServe's part: the predictor is up, at this address
                op.custom.patch_namespaced_custom_object_status, "serving.kserve.io",
                "v1beta1", NS, "inferenceservices", "ident-serve", {"status": {
                    "address": {"url": server.url.removesuffix("/v1")},
                    "conditions": [{"type": "Ready", "status": "True"}]}})
            checked = await eventually(lambda: {
                c["type"]: c for c in _status(cluster)["conditions"]}["Checked"], timeout=20)
            assert checked["status"] == "True", checked
            assert _status(cluster)["serving"]["url"] == server.url
            assert _status(cluster)["serving"]["ready"] is True
            assert not _children(cluster, "apps/v1/deployments")

            await asyncio.to_thread(op.custom.patch_namespaced_custom_object, "kubetune.io",
                                    "v1alpha1", NS, "finetunejobs", "ident",
                                    {"spec": {"serve": None}})
            await eventually(lambda: _assert(not exists(cluster, (ISVC, NS, "ident-serve"))))
            await eventually(lambda: _assert("serving" not in _status(cluster)))
        finally:
            await op.stop()


async def test_serve_turned_off_says_so_and_the_job_still_trains(cluster):
    op = Operator(cluster, serve_enabled=False)
    await op.start()
    try:
        body = _job()
        del body["metadata"]["labels"]
        body["spec"]["serve"] = {}
        await op.create(body)
        await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
        await op.patch_child_status("ident", "Created", "Succeeded")
        serving_ = await eventually(lambda: {
            c["type"]: c for c in _status(cluster)["conditions"]}["Serving"])
        assert serving_["status"] == "False" and serving_["reason"] == "ServingDisabled"
        assert "serve.enabled" in serving_["message"] and _phase(cluster) == "Succeeded"
        assert not _children(cluster, "apps/v1/deployments")
    finally:
        await op.stop()


async def test_a_job_that_cannot_fit_its_gpus_is_refused_before_any_child(cluster, hub):
    """The issue's example: a 72B full fine-tune, batch 64 × 32k tokens, on one GPU. Refused
    with the numbers and the fixes, whether the job says its GPU's memory or the chart does;
    once fixed, it gets its children."""
    op = Operator(cluster, gpu_memory=(("default", "80Gi"),))
    await op.start()
    try:
        big = {"method": {"type": "full"}, "model": {"source": "hf://Qwen/Qwen2-72B"},
               "training": {"batchSizePerDevice": 64, "cutoffLen": 32768, "packing": False},
               "output": {"uri": "pvc://outputs/big"}}
        await op.create(_job(name="own", **big, resources={"gpusPerNode": 1,
                                                            "gpuMemory": "141Gi"}))
        await op.create(_job(name="chart", **big))
        for name, limit in (("own", "141 GiB"), ("chart", "80 GiB")):
            await eventually(lambda n=name: _assert(_phase(cluster, n) == "Failed"))
            stalled = next(c for c in _status(cluster, name)["conditions"]
                           if c["type"] == "Stalled")
            assert stalled["status"] == "True" and stalled["reason"] == "InsufficientGPUMemory"
            msg = stalled["message"]
            assert msg.startswith("spec.resources: about ") and f"does not fit in {limit}" \
                in msg, msg
            assert "cheapest fixes: training.gradientCheckpointing: true" in msg
            assert "resources.strategy: zero3-offload" in msg and "(QLoRA: " in msg
        assert not _children(cluster, PTJ) and not _children(cluster, CM)

        # Fixed (QLoRA, one row of 4k tokens, checkpointing): the job gets its children.
        await asyncio.to_thread(op.custom.patch_namespaced_custom_object, "kubetune.io",
                                "v1alpha1", NS, "finetunejobs", "own", {
                                    "metadata": {"generation": 2},
                                    "spec": {"method": {"type": "lora",
                                                        "quantization": {"bits": 4}},
                                             "training": {"batchSizePerDevice": 1,
                                                          "cutoffLen": 4096,
                                                          "gradientCheckpointing": True}}})
        await eventually(lambda: cluster.objects[PTJ, NS, "own"])
        await eventually(lambda: _assert(_phase(cluster, "own") == "Queued"))
        assert not exists(cluster, (PTJ, NS, "chart"))
    finally:
        await op.stop()


def test_a_registry_refuses_settings_that_name_another_backend():
    """register() watches one backend's kind; settings naming another stop the operator at
    startup with a clear error (it would watch the wrong children)."""
    from kubetune_operator.backends.pytorchjob import PYTORCHJOB
    from kubetune_operator.backends.trainjob import TRAINJOB
    from kubetune_operator.handlers import _watching

    def memo(backend):
        return kopf.Memo(controller=types.SimpleNamespace(backend=backend))

    _watching(PYTORCHJOB.kind)(memo=memo(PYTORCHJOB))
    with pytest.raises(kopf.PermanentError, match="watch PyTorchJob objects, its settings "
                       "name the TrainJob backend"):
        _watching(PYTORCHJOB.kind)(memo=memo(TRAINJOB))


# ------------------------------------------------------------------ the Job (batch/v1) backend


def _api_server_version(cluster, git_version):
    """The API server's answer to GET /version (kmock's own says 1.26)."""
    major, minor = git_version.lstrip("v").split(".")[:2]
    cluster["get /version"] << (lambda _: {"major": major, "minor": minor,
                                           "gitVersion": git_version})


async def _patch_job(op, name, body, status=False):
    call = (op.custom.patch_namespaced_custom_object_status if status
            else op.custom.patch_namespaced_custom_object)
    await asyncio.to_thread(call, "batch", "v1", NS, "jobs", name, body)


def _job_pod(name, uid, state=None):
    """A pod as the Job controller makes it (our labels from the template, its owner)."""
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": NS, "resourceVersion": "1", "uid": uid,
                        "labels": {"kubetune.io/job": "ident", "job-name": "ident",
                                   "controller-uid": "job-uid"},
                        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                             "name": "ident", "uid": "job-uid",
                                             "controller": True}]}}
    if state:
        pod["status"] = {"phase": "Failed", "containerStatuses": [{
            "name": "trainer", "image": "reg/trainer:1", "imageID": "", "ready": False,
            "restartCount": 0, "state": state}]}
    return pod


async def test_job_backend_multi_node_queued_admitted_running_reporting_complete(cluster):
    """The Job controller's part (and Kueue's) played here, on a current API server."""
    _api_server_version(cluster, "v1.33.1")
    op = Operator(cluster, backend="Job")
    await op.start()
    try:
        body = _job()
        body["spec"]["resources"]["nodes"] = 2
        await op.create(body)
        child = await eventually(lambda: cluster.objects[JOB, NS, "ident"])
        svc = cluster.objects[SVC, NS, "ident"]
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-ident"
        posts = [req.url.path for req in list(cluster) if req.method.value == "POST"
                 and req.headers.get("User-Agent") == OPERATOR_AGENT]
        assert posts.index(f"/api/v1/namespaces/{NS}/services") < posts.index(
            f"/apis/batch/v1/namespaces/{NS}/jobs")  # the Job last: its pods find the Service
        spec = child["spec"]
        assert spec["completionMode"] == "Indexed" and spec["suspend"] is True  # for Kueue
        assert spec["podFailurePolicy"]["rules"][0]["action"] == "FailJob"
        assert child["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert not _children(cluster, PTJ)
        await _patch_job(op, "ident", {"status": {"conditions": [
            {"type": "Suspended", "status": "True", "reason": "JobSuspended",
             "message": "Job suspended"}]}}, status=True)
        await eventually(lambda: _assert(_phase(cluster) == "Queued"))

        # Kueue admits (unsuspends); the pods start, then are ready.
        await _patch_job(op, "ident", {"spec": {"suspend": False}})
        await _patch_job(op, "ident", {"status": {
            "conditions": [{"type": "Suspended", "status": "False", "reason": "JobResumed",
                            "message": "Job resumed"}],
            "startTime": "2026-12-07T10:00:00Z", "active": 2, "ready": 0}}, status=True)
        await eventually(lambda: _assert(_phase(cluster) == "Pending"))
        await _patch_job(op, "ident", {"status": {"active": 2, "ready": 2}}, status=True)
        await eventually(lambda: _assert(_phase(cluster) == "Running"))

        # Node 1's pod reports to kubetune's endpoint, recognised as this Job's pod.
        cluster.objects["v1/pods", NS, "ident-1-x7k2p"] = _job_pod("ident-1-x7k2p",
                                                                   "pod-uid-job")
        url = f"http://127.0.0.1:{op.port}/v1/namespaces/{NS}/finetunejobs/ident/status"
        report = {"trainerStatus": {"progressPercentage": 50, "metrics": [
            {"name": "current_step", "value": "5"}, {"name": "total_steps", "value": "10"}]}}
        async with aiohttp.ClientSession() as http:
            resp = await http.post(url, json=report,
                                   headers={"Authorization": "Bearer pod-token"})
            assert resp.status == 403  # a PyTorchJob pod's name: not this backend's
            resp = await http.post(url, json=report,
                                   headers={"Authorization": "Bearer job-pod-token"})
            assert resp.status == 200
        await eventually(lambda: _assert(_status(cluster)["progress"]["steps"] == "5/10"),
                         timeout=10)

        await _patch_job(op, "ident", {"status": {
            "active": 0, "ready": 0, "succeeded": 2, "completionTime": "2026-12-07T11:00:00Z",
            "conditions": [{"type": "Complete", "status": "True", "reason": "", "message": ""}]}},
            status=True)
        await eventually(lambda: _assert(_phase(cluster) == "Succeeded"))
        assert [len(_children(cluster, k)) for k in (JOB, SVC, CM)] == [1, 1, 1]
    finally:
        await op.stop()
    from test_chart import _rules, render
    from tools import helm

    calls = _operator_calls(cluster)
    role = next(d for d in render(str(helm()), "--set", "backend=job")
                if d["kind"] == "ClusterRole")
    allowed = _rules(role)
    denied = {c for c in calls if c[2] not in allowed.get((c[0], c[1]), set())}
    assert not denied, f"the chart's RBAC would refuse {sorted(denied)}"
    assert {("batch", "jobs", "create"), ("", "services", "create")} <= calls
    assert not [c for c in calls if c[1] in ("pytorchjobs", "trainjobs")]


async def test_job_backend_on_a_1_20_server_fails_a_permanent_error_once(cluster):
    """No podFailurePolicy, suspend or Indexed Jobs there: the operator stops the Job itself
    after the trainer's exit code 2, and refuses what the server cannot run."""
    _api_server_version(cluster, "v1.20.15")
    op = Operator(cluster, backend="Job")
    await op.start()
    try:
        body = _job()
        del body["metadata"]["labels"]  # not queued
        await op.create(body)
        child = await eventually(lambda: cluster.objects[JOB, NS, "ident"])
        assert not {"suspend", "podFailurePolicy", "completionMode"} & set(child["spec"])
        assert child["spec"]["template"]["spec"]["restartPolicy"] == "Never"

        wide = _job(name="wide")
        del wide["metadata"]["labels"]
        wide["spec"]["resources"]["nodes"] = 2
        await op.create(wide)
        queued = _job(name="queued")  # the example's Kueue label
        await op.create(queued)
        for name, field in (("wide", "spec.resources.nodes: "),
                            ("queued", "metadata.labels[kueue.x-k8s.io/queue-name]: ")):
            await eventually(lambda n=name: _assert(_phase(cluster, n) == "Failed"))
            stalled = next(c for c in _status(cluster, name)["conditions"]
                           if c["type"] == "Stalled")
            assert stalled["reason"] == "InvalidSpec" and stalled["message"].startswith(field)
            assert not exists(cluster, (JOB, NS, name))

        await _patch_job(op, "ident", {"status": {"startTime": "2026-12-07T10:00:00Z",
                                                  "active": 1}}, status=True)
        await eventually(lambda: _assert(_phase(cluster) == "Running"))  # 1.20: no ready
        # No Job suspend on 1.20: a running Job runs on, and the condition says so.
        await asyncio.to_thread(op.custom.patch_namespaced_custom_object, "kubetune.io",
                                "v1alpha1", NS, "finetunejobs", "ident",
                                {"spec": {"suspend": True}})
        await eventually(lambda: _assert([
            c for c in _status(cluster)["conditions"] if c["type"] == "SpecChangeIgnored"
            and c["message"].startswith("spec.suspend: this API server (v1.20.15) cannot "
                                        "suspend")]))
        assert _phase(cluster) == "Running"
        await asyncio.to_thread(op.custom.patch_namespaced_custom_object, "kubetune.io",
                                "v1alpha1", NS, "finetunejobs", "ident",
                                {"spec": {"suspend": False}})
        # The trainer refused its data (exit 2, its reason in the termination message); the
        # Job controller counts the failure and makes a new pod.
        cluster.objects["v1/pods", NS, "ident-x7k2p"] = _job_pod(
            "ident-x7k2p", "pod-uid-1", {"terminated": {"exitCode": 2, "reason": "Error",
                                                        "message": json.dumps({
                "reason": "DataError", "field": "spec.datasets[0].source",
                "message": "identity.json: no such file"})}})
        await _patch_job(op, "ident", {"status": {"active": 1, "failed": 1}}, status=True)
        await eventually(lambda: _assert(_phase(cluster) == "Failed"))
        status = _status(cluster)
        assert status["failure"]["reason"] == "DataError" and status["failure"]["exitCode"] == 2
        assert status["failure"]["message"] == (
            "spec.datasets[0].source: identity.json: no such file")
        job = cluster.objects[JOB, NS, "ident"]
        assert job["spec"]["activeDeadlineSeconds"] == 1  # the Job controller ends it now
        assert "exited with code 2" in job["metadata"]["annotations"]["kubetune.io/stopped"]

        # The Job controller's part: the deadline passed, the Job failed.
        await _patch_job(op, "ident", {"status": {"active": 0, "failed": 2, "conditions": [
            {"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
             "message": "Job was active longer than specified deadline"}]}}, status=True)
        await asyncio.sleep(0.5)
        assert _phase(cluster) == "Failed"
        assert _status(cluster)["failure"]["reason"] == "DataError"
        patches = [req for req in list(cluster) if req.method.value == "PATCH"
                   and req.headers.get("User-Agent") == OPERATOR_AGENT
                   and req.url.path == f"/apis/batch/v1/namespaces/{NS}/jobs/ident"]
        assert len(patches) == 1, patches  # stopped once
    finally:
        await op.stop()


def _stalled(cluster, name):
    return next(c for c in _status(cluster, name)["conditions"] if c["type"] == "Stalled")


def _discovery_requests(cluster, api_version):
    return [req for req in list(cluster) if req.method.value == "GET"
            and req.url.path == f"/apis/{api_version}"]


async def test_without_the_backends_crd_jobs_say_so_then_start_once_it_is_served(
        cluster, caplog):
    """No Kubeflow Training Operator: each job is Pending with Stalled naming PyTorchJob and
    the ways out, and nothing is made (no ConfigMap without its PyTorchJob). The operator
    logs it once and asks discovery once per re-check for all jobs; once the CRD is there
    the jobs get their children with no restart."""
    import logging

    caplog.set_level(logging.INFO, logger="kubetune.operator")
    ptj = cluster.resources[PTJ]
    del cluster.resources[PTJ]  # the API server's discovery: no kubeflow.org/v1
    op = Operator(cluster, recheck_seconds=0.3)
    await op.start()
    try:
        names = ("ident", "second", "third")
        for name in names:
            body = _job(name=name)
            del body["metadata"]["labels"]  # not queued
            await op.create(body)
        for name in names:
            await eventually(lambda n=name: _assert(_phase(cluster, n) == "Pending"))
            stalled = _stalled(cluster, name)
            assert stalled["status"] == "True" and stalled["reason"] == "PyTorchJobNotInstalled"
            assert "does not serve PyTorchJob (kubeflow.org/v1)" in stalled["message"]
            assert "install the Kubeflow Training Operator" in stalled["message"]
            assert "`backend: job`" in stalled["message"]
            conds = {c["type"]: c for c in _status(cluster, name)["conditions"]}
            assert conds["Reconciling"]["status"] == "False"  # kstatus: stalled, not progressing
            assert conds["Ready"]["status"] == "False"
        before = len(_discovery_requests(cluster, "kubeflow.org/v1"))
        await asyncio.sleep(1.5)  # five re-checks
        asked = len(_discovery_requests(cluster, "kubeflow.org/v1")) - before
        assert 2 <= asked <= 7, asked  # once per re-check, not once per job
        assert not _children(cluster, PTJ) and not _children(cluster, CM)
        assert not [req for req in list(cluster) if "pytorchjobs" in req.url.path
                    and req.headers.get("User-Agent") == OPERATOR_AGENT]
        said = [r for r in caplog.records if "is not served" in r.getMessage()]
        assert len(said) == 1 and "PyTorchJob" in said[0].getMessage(), said
        assert not [r for r in caplog.records if "converge failed" in r.getMessage()]

        cluster.resources[PTJ] = ptj  # the training operator is installed
        for name in names:
            child = await eventually(lambda n=name: cluster.objects[PTJ, NS, n])
            assert child["metadata"]["ownerReferences"][0]["uid"] == f"uid-{name}"
            assert cluster.objects[CM, NS, f"{name}-config"]["metadata"]["ownerReferences"]
            await eventually(lambda n=name: _assert(_stalled(cluster, n)["status"] == "False"))
        assert [r for r in caplog.records if "kubeflow.org/v1 is served now" in r.getMessage()]
    finally:
        await op.stop()


async def test_a_queued_job_without_kueue_says_so_and_waits_for_it(cluster):
    """The Kueue queue label with no Kueue: the child would be made suspended and stay so
    forever. Stalled (KueueNotInstalled) naming the label, nothing made; Kueue installed →
    the job gets its children, suspended for Kueue to admit."""
    workloads = cluster.resources[WL]
    del cluster.resources[WL]
    op = Operator(cluster, recheck_seconds=0.3)
    await op.start()
    try:
        await op.create(_job())  # the example's queue label: team-a
        await eventually(lambda: _assert(_phase(cluster) == "Pending"))
        stalled = _stalled(cluster, "ident")
        assert stalled["status"] == "True" and stalled["reason"] == "KueueNotInstalled"
        assert "the label kueue.x-k8s.io/queue-name=team-a" in stalled["message"]
        assert "stay suspended forever" in stalled["message"]
        assert "Install Kueue, or remove the kueue.x-k8s.io/queue-name label" in stalled[
            "message"]
        await asyncio.sleep(0.7)
        assert not _children(cluster, PTJ) and not _children(cluster, CM)

        cluster.resources[WL] = workloads
        child = await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
        assert child["spec"]["runPolicy"]["suspend"] is True  # for Kueue to admit
        await eventually(lambda: _assert(_phase(cluster) == "Queued"))
    finally:
        await op.stop()


async def test_pods_refused_by_admission_say_so_in_the_condition(cluster):
    """A stricter policy than the pods meet (Kyverno here): the Job controller can make no pod
    and records FailedCreate on the Job; the job's Ready condition carries the server's
    message, with the chart's RBAC (events list)."""
    _api_server_version(cluster, "v1.33.1")
    op = Operator(cluster, backend="Job")
    await op.start()
    refused = ('Error creating: admission webhook "validate.kyverno.svc-fail" denied the '
               'request: resource Pod/team-a/ident-x7k2p was blocked: require-image-digest')
    try:
        body = _job()
        del body["metadata"]["labels"]  # no Kueue: the Job starts at once
        await op.create(body)
        await eventually(lambda: cluster.objects[JOB, NS, "ident"])
        # Another object's refusal, and an older one of ours: neither is the answer.
        for name, involved, message, when in [
                ("other.1", {"kind": "Job", "name": "other"}, "pods are forbidden: quota",
                 "2026-12-07T10:00:05Z"),
                ("ident.0", {"kind": "Job", "name": "ident"}, "an older refusal",
                 "2026-12-07T09:00:00Z"),
                ("ident.1", {"kind": "Job", "name": "ident"}, refused,
                 "2026-12-07T10:00:01Z")]:
            cluster.objects["v1/events", NS, name] = {
                "apiVersion": "v1", "kind": "Event", "type": "Warning",
                "reason": "FailedCreate", "message": message, "lastTimestamp": when,
                "metadata": {"name": name, "namespace": NS, "resourceVersion": "1"},
                "involvedObject": {"apiVersion": "batch/v1", "namespace": NS, **involved}}
        await _patch_job(op, "ident", {"status": {"startTime": "2026-12-07T10:00:00Z",
                                                  "active": 0}}, status=True)

        def refused_condition():
            ready = next(c for c in _status(cluster)["conditions"] if c["type"] == "Ready")
            assert ready["reason"] == "PodRejected", ready
            return ready

        ready = await eventually(refused_condition)
        assert ready["status"] == "False" and _phase(cluster) == "Pending"
        assert ready["message"] == f"the API server refused the pods of Job ident: {refused}"
        # The policy is fixed: a pod is made, and the old Event no longer speaks.
        cluster.objects["v1/pods", NS, "ident-x7k2p"] = _job_pod("ident-x7k2p", "pod-uid-job")
        await _patch_job(op, "ident", {"status": {"active": 1, "ready": 1}}, status=True)
        await eventually(lambda: _assert(_phase(cluster) == "Running"))
    finally:
        await op.stop()
    from test_chart import _rules, render
    from tools import helm

    calls = _operator_calls(cluster)
    role = next(d for d in render(str(helm()), "--set", "backend=job")
                if d["kind"] == "ClusterRole")
    allowed = _rules(role)
    denied = {c for c in calls if c[2] not in allowed.get((c[0], c[1]), set())}
    assert not denied, f"the chart's RBAC would refuse {sorted(denied)}"
    assert ("", "events", "list") in calls


# ------------------------------------------------------------------ the pre-flight pod


def _preflight_pod(report=None, exit_code=0, message=None):
    """The pre-flight Job's pod as the Job controller makes it, ended (its report in the
    termination message, as kubetune-preflight writes it)."""
    text = message if message is not None else json.dumps({"preflight": report})
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "ident-preflight-x7k2p", "namespace": NS,
                         "resourceVersion": "1", "uid": "pf-pod",
                         "creationTimestamp": "2026-12-07T10:00:00Z",
                         "labels": {"kubetune.io/job": "ident", "kubetune.io/role": "preflight",
                                    "job-name": "ident-preflight"}},
            "status": {"phase": "Succeeded" if exit_code == 0 else "Failed",
                       "containerStatuses": [{
                           "name": "preflight", "image": "reg/trainer:1", "imageID": "",
                           "ready": False, "restartCount": 0, "state": {"terminated": {
                               "exitCode": exit_code, "reason": "Completed" if exit_code == 0
                               else "Error", "message": text}}}]}}


GOOD = {"passed": True, "rows": 1000, "badRows": 3, "badReasons": ["'output' is empty"],
        "sequences": 997, "tokens": 120000, "trainedTokens": 60000, "truncated": 4,
        "rowLengthPercentiles": {"p50": 110, "p90": 230, "p99": 500, "max": 1024},
        "prepared": True, "memoryPerGpu": "21.4 GiB", "gpuMemory": "80.0 GiB",
        "estimatedSeconds": 3900.0, "assumptions": "1 × NVIDIA-H100 at 989 TFLOP/s bf16"}


async def _preflight_operator(cluster, **config):
    op = Operator(cluster, preflight="auto", recheck_seconds=0.5, **config)
    await op.start()
    return op


async def test_a_gpu_job_is_validated_on_cpu_before_its_training_object_is_made(cluster):
    op = await _preflight_operator(cluster)
    try:
        await op.create(_job(resources={"nodes": 1, "gpusPerNode": 1, "gpuMemory": "80Gi"}))
        pf = await eventually(lambda: cluster.objects[JOB, NS, "ident-preflight"])
        assert exists(cluster, (CM, NS, "ident-config"))
        pod = pf["spec"]["template"]["spec"]
        main = pod["containers"][0]
        assert main["command"] == ["kubetune-preflight"]
        assert "nvidia.com/gpu" not in json.dumps(main["resources"])  # CPU only
        assert {"name": "KUBETUNE_GPU_MEMORY", "value": str(80 * 2**30)} in main["env"]
        assert pf["metadata"]["ownerReferences"][0]["uid"] == "uid-ident"
        await eventually(lambda: _assert(_phase(cluster) == "Validating"))
        conds = {c["type"]: c for c in _status(cluster)["conditions"]}
        assert conds["Reconciling"]["status"] == "True"
        assert conds["Reconciling"]["reason"] == "Validating"
        assert conds["Stalled"]["status"] == "False" and conds["Ready"]["status"] == "False"
        assert not exists(cluster, (PTJ, NS, "ident"))  # no GPU asked for yet
        # Its pod cannot be scheduled: the wait says why.
        pending = _preflight_pod(GOOD)
        pending["status"] = {"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/3 nodes are available: 3 Insufficient cpu."}]}
        cluster.objects["v1/pods", NS, "ident-preflight-x7k2p"] = pending
        await eventually(lambda: _assert("3 Insufficient cpu" in {
            c["type"]: c for c in _status(cluster)["conditions"]}["Reconciling"]["message"]))
        assert _phase(cluster) == "Validating"
        # Something suspended it (Kueue taking in Jobs without a queue): said, with the way out.
        await _patch_job(op, "ident-preflight", {"spec": {"suspend": True}})
        await eventually(lambda: _assert("ident-preflight is suspended" in {
            c["type"]: c for c in _status(cluster)["conditions"]}["Reconciling"]["message"]))
        await _patch_job(op, "ident-preflight", {"spec": {"suspend": False}})

        cluster.objects["v1/pods", NS, "ident-preflight-x7k2p"] = _preflight_pod(GOOD)
        await _patch_job(op, "ident-preflight", {"status": {"succeeded": 1}}, status=True)
        await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
        await eventually(lambda: _assert(_status(cluster).get("preflight")))
        report = _status(cluster)["preflight"]
        assert report["passed"] is True and report["rows"] == 1000
        assert report["memoryPerGpu"] == "21.4 GiB" and report["estimatedTime"] == "1h05m"
        assert _phase(cluster) == "Queued"  # the example names a Kueue queue: now Kueue's turn
    finally:
        await op.stop()


@pytest.mark.parametrize(("pod", "reason", "words"), [
    (_preflight_pod({"passed": False, "reason": "DataError", "field": None, "rows": 10,
                     "message": "no usable rows in any data set"}, exit_code=2),
     "DataError", "pre-flight: no usable rows in any data set"),
    (_preflight_pod({"passed": False, "reason": "KubetuneError", "field": "spec.resources",
                     "message": "about 90.1 GiB per GPU, more than 80.0 GiB"}, exit_code=2),
     "InsufficientGPUMemory", "pre-flight: spec.resources: about 90.1 GiB per GPU"),
    (_preflight_pod(exit_code=200, message="Traceback ...\nMemoryError"),
     "PreflightFailed", "the pod ended without a report: exit 200 (Error)"),
])
async def test_a_job_its_pre_flight_stops_never_asks_for_a_gpu(cluster, pod, reason, words):
    op = await _preflight_operator(cluster)
    try:
        await op.create(_job())
        await eventually(lambda: cluster.objects[JOB, NS, "ident-preflight"])
        cluster.objects["v1/pods", NS, "ident-preflight-x7k2p"] = pod
        await _patch_job(op, "ident-preflight", {"status": {"failed": 1}}, status=True)
        await eventually(lambda: _assert(_phase(cluster) == "Failed"))
        status = _status(cluster)
        conds = {c["type"]: c for c in status["conditions"]}
        assert conds["Stalled"]["status"] == "True" and conds["Stalled"]["reason"] == reason
        assert words in conds["Failed"]["message"]
        assert status["failure"]["reason"] == reason
        await asyncio.sleep(1.5)  # re-checked: still nothing for the GPUs
        assert not exists(cluster, (PTJ, NS, "ident"))
    finally:
        await op.stop()


async def test_a_job_its_pre_flight_stopped_is_checked_again_after_a_fix(cluster):
    """A changed spec (`kubectl apply`, a GitOps sync) runs a new pre-flight from the new
    spec; fixed data with the same spec: deleting the pre-flight Job runs it again."""
    from kubetune_operator.builders import SPEC_HASH

    bad = _preflight_pod({"passed": False, "reason": "DataError", "field": None, "rows": 10,
                          "message": "7 of 10 rows are invalid"}, exit_code=2)

    def preflight_hash():
        return cluster.objects[JOB, NS, "ident-preflight"]["metadata"]["annotations"][SPEC_HASH]

    async def stopped():
        cluster.objects["v1/pods", NS, "ident-preflight-x7k2p"] = bad
        await _patch_job(op, "ident-preflight", {"status": {"failed": 1}}, status=True)
        await eventually(lambda: _assert(_phase(cluster) == "Failed"))

    op = await _preflight_operator(cluster)
    try:
        await op.create(_job())
        await eventually(lambda: cluster.objects[JOB, NS, "ident-preflight"])
        first = preflight_hash()
        await stopped()
        # The spec changes: a new pre-flight Job, from a config that says the new spec.
        await asyncio.to_thread(op.custom.patch_namespaced_custom_object, "kubetune.io",
                                "v1alpha1", NS, "finetunejobs", "ident",
                                {"spec": {"training": {"maxInvalidFraction": 0.8}}})
        await eventually(lambda: _assert(preflight_hash() != first))
        await eventually(lambda: _assert(_phase(cluster) == "Validating"))
        assert "maxInvalidFraction: 0.8" in cluster.objects[CM, NS, "ident-config"]["data"][
            "job.yaml"]
        assert "preflight" not in _status(cluster)  # the old spec's report is gone
        assert not exists(cluster, (PTJ, NS, "ident"))
        await stopped()  # stopped again: the same spec stays stopped
        await asyncio.sleep(1.5)
        assert _phase(cluster) == "Failed" and not exists(cluster, (PTJ, NS, "ident"))
        # The data is fixed on its volume (the spec is not): the pre-flight Job is deleted.
        await asyncio.to_thread(kubernetes.client.BatchV1Api(op.api).delete_namespaced_job,
                                "ident-preflight", NS)
        await eventually(lambda: _assert(_phase(cluster) == "Validating"))
        cluster.objects["v1/pods", NS, "ident-preflight-x7k2p"] = _preflight_pod(GOOD)
        await _patch_job(op, "ident-preflight", {"status": {"succeeded": 1}}, status=True)
        await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
        assert _status(cluster)["preflight"]["passed"] is True
    finally:
        await op.stop()
    from test_chart import _rules, render
    from tools import helm

    calls = _operator_calls(cluster)
    allowed = _rules(next(d for d in render(str(helm())) if d["kind"] == "ClusterRole"))
    denied = {c for c in calls if c[2] not in allowed.get((c[0], c[1]), set())}
    assert not denied, f"the chart's RBAC would refuse {sorted(denied)}"
    assert {("batch", "jobs", "delete"), ("", "configmaps", "patch")} <= calls


async def test_a_stopped_job_told_to_skip_its_pre_flight_trains_from_its_new_spec(cluster):
    op = await _preflight_operator(cluster)
    try:
        await op.create(_job())
        await eventually(lambda: cluster.objects[JOB, NS, "ident-preflight"])
        cluster.objects["v1/pods", NS, "ident-preflight-x7k2p"] = _preflight_pod(
            {"passed": False, "reason": "DataError", "field": None, "rows": 10,
             "message": "7 of 10 rows are invalid"}, exit_code=2)
        await _patch_job(op, "ident-preflight", {"status": {"failed": 1}}, status=True)
        await eventually(lambda: _assert(_phase(cluster) == "Failed"))
        await asyncio.to_thread(op.custom.patch_namespaced_custom_object, "kubetune.io",
                                "v1alpha1", NS, "finetunejobs", "ident",
                                {"spec": {"preflight": "skip",
                                          "training": {"maxInvalidFraction": 0.8}}})
        await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
        # Its pods read the new spec, and the old spec's report is not shown as this one's.
        assert "maxInvalidFraction: 0.8" in cluster.objects[CM, NS, "ident-config"]["data"][
            "job.yaml"]
        await eventually(lambda: _assert(_phase(cluster) == "Queued"))
        assert "preflight" not in _status(cluster) and "failure" not in _status(cluster)
    finally:
        await op.stop()


async def test_a_job_being_deleted_gets_no_child_made_again(cluster):
    """Foreground deletion (Argo CD's prune): the job stays until its children are gone;
    their going makes nothing again."""
    op = await _preflight_operator(cluster)
    try:
        body = _job()
        body["metadata"]["finalizers"] = ["e2e.kubetune.io/hold"]  # it stays, being deleted
        await op.create(body)
        await eventually(lambda: cluster.objects[JOB, NS, "ident-preflight"])
        await asyncio.to_thread(op.custom.delete_namespaced_custom_object, "kubetune.io",
                                "v1alpha1", NS, "finetunejobs", "ident")
        await eventually(lambda: cluster.objects[FTJ, NS, "ident"]["metadata"][
            "deletionTimestamp"])
        batch = kubernetes.client.BatchV1Api(op.api)  # the garbage collector's part
        await asyncio.to_thread(batch.delete_namespaced_job, "ident-preflight", NS)
        await asyncio.sleep(1.5)  # re-checked by now
        assert not exists(cluster, (JOB, NS, "ident-preflight"))
    finally:
        await op.stop()


async def test_spec_preflight_skip_and_a_cpu_job_go_straight_to_training(cluster):
    op = await _preflight_operator(cluster)
    try:
        await op.create(_job(preflight="skip"))
        await eventually(lambda: cluster.objects[PTJ, NS, "ident"])
        await op.create(_job("cpu", resources={"nodes": 1, "gpusPerNode": 0}))
        await eventually(lambda: cluster.objects[PTJ, NS, "cpu"])
        assert not exists(cluster, (JOB, NS, "ident-preflight"))
        assert not exists(cluster, (JOB, NS, "cpu-preflight"))
    finally:
        await op.stop()
