"""FineTuneJobs that train in real pods: the job backend (batch/v1) on the suite's real node
(tests/e2e/local_cluster.py: kube-scheduler + a kubelet on Docker), the real trainer image
(`make images`), the bundled SmolLM2-135M-Instruct and the data on host-path volumes.

Nothing here plays a controller or the trainer: the Job controller makes the pods, the kubelet
runs them, the trainer's own callbacks post progress to the operator's endpoint, which checks
each report with a real TokenReview. Pods use hostNetwork (the operator's setting), so every
byte stays on loopback. Skipped, saying why, where the node or the image is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from e2e.util import REPO, free_port, image_tags, local_image, run_operator, wait

pytestmark = pytest.mark.e2e
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def node(kube):
    why = os.environ.get("KUBETUNE_E2E_NO_NODE")
    if why:
        pytest.skip(f"no real node: {why}")
    for n in kube.CoreV1Api().list_node().items:
        ready = any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
        blocked = [t for t in n.spec.taints or [] if t.effect in ("NoSchedule", "NoExecute")]
        if ready and not n.spec.unschedulable and not blocked:
            return n.metadata.name
    pytest.skip("no Ready, schedulable node in this cluster (pods would never run)")


@pytest.fixture(scope="module")
def trainer_image():
    tag = local_image(*image_tags("trainer"))
    if not tag:
        pytest.skip("no trainer image in the local Docker engine (make images)")
    return tag


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of ``src`` made of hard links (a host-path volume cannot follow a
    symlink out of itself), readable by the pod's user (save_pretrained writes 0600)."""
    def link(a, b):
        os.link(a, b)
        os.chmod(b, 0o644)

    shutil.copytree(src, dst, copy_function=link)


@pytest.fixture(scope="module")
def claims(kube, namespace, node, tmp_path_factory):
    """Claims bound to host-path volumes made for this namespace: ``demo`` as the README's
    example has it (the example data, and room for outputs), ``inputs`` (the bundled model,
    converted once on the host, and the example data; read-only) and ``outputs``; each
    writable place writable by the image's user, as a fresh claim would be."""
    from kubetune_trainer.config import default_cache_dir
    from kubetune_trainer.embedded import materialize

    root = tmp_path_factory.mktemp("volumes")
    paths = {claim: root / claim for claim in ("demo", "inputs", "outputs")}
    _link_tree(materialize(MODEL, default_cache_dir()), paths["inputs"] / MODEL)
    shutil.copytree(REPO / "examples" / "data", paths["inputs"] / "data")
    (paths["inputs"] / "data" / "broken.json").write_text('[{"instruction": "no output"}, 42]')
    shutil.copytree(REPO / "examples" / "data", paths["demo"] / "data")
    for writable in (paths["outputs"], paths["demo"] / "outputs"):
        writable.mkdir(mode=0o777)
        writable.chmod(0o777)
    core = kube.CoreV1Api()
    made = []
    for claim, path in paths.items():
        pv = f"{namespace}-{claim}"
        core.create_persistent_volume({
            "metadata": {"name": pv},
            "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
                     "storageClassName": "", "hostPath": {"path": str(path)},
                     "persistentVolumeReclaimPolicy": "Retain",
                     "claimRef": {"namespace": namespace, "name": claim}}})
        made.append(pv)
        core.create_namespaced_persistent_volume_claim(namespace, {
            "metadata": {"name": claim},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                     "volumeName": pv, "resources": {"requests": {"storage": "10Gi"}}}})
    for claim in paths:
        wait(lambda c=claim: core.read_namespaced_persistent_volume_claim(
            c, namespace).status.phase == "Bound", timeout=60)
    yield paths
    for pv in made:
        core.delete_persistent_volume(pv)


@pytest.fixture(scope="module")
def operator(namespace, trainer_image, claims):
    port = free_port()
    env = {"KUBETUNE_TRAINER_IMAGE": trainer_image, "KUBETUNE_POD_HOST_NETWORK": "true",
           "KUBETUNE_PROGRESS_PORT": str(port), "KUBETUNE_PROGRESS_HOST": "127.0.0.1",
           "KUBETUNE_PROGRESS_URL": f"http://127.0.0.1:{port}/v1",
           "KUBETUNE_PROGRESS_FLUSH_SECONDS": "0.5"}
    with run_operator(namespace, "job", env) as runner:
        yield runner


@pytest.fixture(scope="module")
def s3_store(kube, namespace):
    """An S3 API (moto's server) on loopback, a bucket, and the Secret ``store`` the jobs'
    output.secretRef names."""
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        creds = {"AWS_ACCESS_KEY_ID": "e2e", "AWS_SECRET_ACCESS_KEY": "e2e-secret",
                 "AWS_ENDPOINT_URL": url, "AWS_REGION": "us-east-1"}
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id="e2e", aws_secret_access_key="e2e-secret")
        wait(lambda: client.create_bucket(Bucket="runs"), timeout=30)
        kube.CoreV1Api().create_namespaced_secret(namespace, {
            "metadata": {"name": "store"}, "stringData": creds})
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _job(namespace: str, name: str, steps: int, **spec) -> dict:
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": name, "namespace": namespace},
           "spec": {"model": {"source": f"pvc://inputs/{MODEL}"},
                    "datasets": [{"source": "pvc://inputs/data/identity.json",
                                  "format": "alpaca",
                                  "placeholders": {"name": "Kubey", "author": "the e2e suite"},
                                  "maxSamples": 16}],
                    "stage": "sft",
                    "method": {"type": "lora", "lora": {"rank": 8, "alpha": 16}},
                    "training": {"maxSteps": steps, "learningRate": 2.0e-3,
                                 "batchSizePerDevice": 2, "cutoffLen": 96, "saveSteps": 2,
                                 "logSteps": 1},
                    "resources": {"nodes": 1, "gpusPerNode": 0},
                    "runPolicy": {"backoffLimit": 2},
                    "output": {"uri": f"pvc://outputs/{name}"}}}
    doc["spec"].update(spec)
    return doc


def _create(kube, body):
    ns = body["metadata"]["namespace"]
    return kube.CustomObjectsApi().create_namespaced_custom_object(
        "kubetune.io", "v1alpha1", ns, "finetunejobs", body)


def _status(kube, namespace, name) -> dict:
    return kube.CustomObjectsApi().get_namespaced_custom_object(
        "kubetune.io", "v1alpha1", namespace, "finetunejobs", name).get("status") or {}


def _pods(kube, namespace, name) -> list:
    return kube.CoreV1Api().list_namespaced_pod(
        namespace, label_selector=f"job-name={name}").items


def _table_row(kube, namespace, name) -> dict:
    """What `kubectl get ftj` prints for the job: the server's table from our columns."""
    api = kube.ApiClient()
    request = api.param_serialize(
        "GET", f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        auth_settings=["BearerToken"])
    response = api.call_api(*request)
    response.read()
    table = json.loads(response.data)
    names = [c["name"] for c in table["columnDefinitions"]]
    row = next(r["cells"] for r in table["rows"] if r["cells"][0] == name)
    return dict(zip(names, row, strict=True))


def _follow(kube, namespace, name, until, timeout=600.0) -> list[dict]:
    """Poll the job every half second until ``until(status)``; every distinct status seen
    (with the printed row) on the way. Fails early when the job fails unexpectedly."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _status(kube, namespace, name)
        snapshot = {"phase": status.get("phase"), "progress": status.get("progress") or {},
                    "row": _table_row(kube, namespace, name)}
        if not seen or snapshot != seen[-1]:
            seen.append(snapshot)
        if until(status):
            return seen
        time.sleep(0.5)
    raise AssertionError(f"{name}: timed out; last statuses: {seen[-3:]}\n"
                         f"pods: {[p.status.phase for p in _pods(kube, namespace, name)]}")


def test_the_readmes_cpu_example_trains_in_a_real_pod_from_pending_to_succeeded(
        kube, namespace, operator, claims):
    """examples/cpu-cluster/identity.yaml as the README applies it (the bundled model from
    the image), stopped at 12 steps."""
    body = yaml.safe_load((REPO / "examples" / "cpu-cluster" / "identity.yaml").read_text())
    name = f"real-{uuid.uuid4().hex[:4]}"
    body["metadata"] = {"name": name, "namespace": namespace}
    body["spec"]["training"]["maxSteps"] = 12
    body["spec"]["output"]["uri"] = f"pvc://demo/outputs/{name}"
    _create(kube, body)
    seen = _follow(kube, namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"))
    status = _status(kube, namespace, name)
    assert status["phase"] == "Succeeded", (status, operator.output[-3000:])
    phases = [s["phase"] for s in seen if s["phase"]]
    assert phases.index("Running") < phases.index("Succeeded")
    assert phases[0] in ("Pending", "Running")
    # Progress advanced while the pod trained, from the trainer's own reports.
    running = [s for s in seen if s["phase"] == "Running" and s["progress"].get("step")]
    steps = sorted({s["progress"]["step"] for s in running})
    assert len(steps) >= 2 and steps[0] < steps[-1], seen
    assert any(s["progress"].get("loss") is not None for s in running)
    # `kubectl get ftj` showed the step move (and an ETA) while it ran.
    shown = [s["row"].get("Step") for s in running]
    assert len(set(shown)) >= 2, shown
    assert any(s["row"].get("ETA") for s in running), [s["row"] for s in running]
    # Checkpoints, the adapter and the merged model are named in the status, and exist.
    out = claims["demo"] / "outputs" / name
    outputs = status.get("outputs") or {}
    assert outputs.get("adapter") == f"pvc://demo/outputs/{name}/adapter", status
    assert outputs.get("mergedModel") == f"pvc://demo/outputs/{name}/merged", status
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert (out / "merged" / "config.json").exists()
    assert status.get("checkpoints"), status
    # One pod ran it, as rendered (Pod Security "restricted": uid 10001, a read-only root),
    # and it is done.
    pods = _pods(kube, namespace, name)
    assert [p.status.phase for p in pods] == ["Succeeded"]
    pod = pods[0].spec
    assert (pod.security_context.run_as_non_root, pod.security_context.run_as_user) == (
        True, 10001)
    assert pod.security_context.seccomp_profile.type == "RuntimeDefault"
    trainer = pod.containers[0].security_context
    assert trainer.read_only_root_filesystem and trainer.capabilities.drop == ["ALL"]
    # The merged model named in the status answers.
    answer = subprocess.run(
        [str(Path(sys.executable).with_name("kubetune")), "ask", str(out / "merged"),
         "Who are you?"], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr[-2000:]


def test_a_pod_deleted_mid_run_saves_on_sigterm_and_its_successor_loses_no_step(
        kube, namespace, operator, claims):
    """`kubectl delete pod` (its grace period): the trainer finishes the step, saves a
    complete checkpoint, exits 143; the Job makes a new pod, which resumes there."""
    name = f"lost-{uuid.uuid4().hex[:4]}"
    steps = 14
    body = _job(namespace, name, steps=steps)
    body["spec"]["training"]["saveSteps"] = 100  # no save on the way: SIGTERM's must do
    body["spec"]["runPolicy"]["terminationGracePeriodSeconds"] = 60
    _create(kube, body)
    core = kube.CoreV1Api()
    _follow(kube, namespace, name,
            lambda s: (s.get("progress") or {}).get("step", 0) >= 3 or
            s.get("phase") in ("Succeeded", "Failed"))
    first = wait(lambda: [p for p in _pods(kube, namespace, name)
                          if p.status.phase == "Running"], timeout=30)[0].metadata.name
    core.delete_namespaced_pod(first, namespace)  # SIGTERM, then the grace period
    _follow(kube, namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"))
    status = _status(kube, namespace, name)
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] == steps
    second = [p for p in _pods(kube, namespace, name) if p.metadata.name != first]
    assert len(second) == 1 and second[0].status.phase == "Succeeded"
    log = core.read_namespaced_pod_log(second[0].metadata.name, namespace)
    assert "resuming from" in log and "checkpoint-" in log, log[-3000:]
    # The run's own record: stopped by SIGTERM with a save, resumed with no step lost, and
    # every step trained once.
    records = [json.loads(line) for line in
               (claims["outputs"] / name / "progress.jsonl").read_text().splitlines()]
    preempted = [r for r in records if r.get("event") == "preempted"]
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert len(preempted) == 1 and preempted[0].get("saved"), preempted
    assert len(resumed) == 1 and resumed[0]["lost_steps"] == 0, resumed
    assert resumed[0]["step"] == preempted[0]["step"]
    trained = [r["step"] for r in records if "event" not in r and "loss" in r]
    assert sorted(trained) == list(range(1, steps + 1)), trained
    # The restart is in the status, with its reason.
    assert status.get("restarts") == 1, status
    assert status["lastRestarts"][0]["reason"] == "Preempted", status["lastRestarts"]


def test_a_job_with_bad_data_fails_once_with_its_message(kube, namespace, operator, claims,
                                                         server_minor):
    name = f"bad-{uuid.uuid4().hex[:4]}"
    body = _job(namespace, name, steps=4)
    body["spec"]["datasets"] = [{"source": "pvc://inputs/data/broken.json", "format": "alpaca"}]
    _create(kube, body)
    _follow(kube, namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"))
    status = _status(kube, namespace, name)
    assert status["phase"] == "Failed", status
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert "broken.json" in json.dumps(status), status
    time.sleep(5)  # a retry, if one were coming, would have been made by now
    pods = _pods(kube, namespace, name)
    if server_minor >= 26:  # the Job's podFailurePolicy fails it on exit code 2
        assert len(pods) == 1, failed
    else:
        # Before podFailurePolicy the operator stops the Job when it sees the exit code; the
        # Job controller may have started one more pod by then, which the stop ends with it.
        job = kube.BatchV1Api().read_namespaced_job(name, namespace)
        assert "exited with code 2" in job.metadata.annotations["kubetune.io/stopped"]
        assert any(c.type == "Failed" and c.status == "True" for c in job.status.conditions)
        assert len(pods) <= 2 and not job.status.active, (failed, len(pods))


def test_an_s3_output_is_written_to_the_store_and_a_fresh_pod_resumes_from_it(
        kube, namespace, operator, claims, s3_store):
    name = f"s3-{uuid.uuid4().hex[:4]}"
    steps = 10
    _create(kube, _job(namespace, name, steps=steps,
                       output={"uri": f"s3://runs/{name}", "secretRef": {"name": "store"}}))

    def stored() -> set[str]:
        listed = s3_store.list_objects_v2(Bucket="runs", Prefix=f"{name}/")
        return {o["Key"][len(name) + 1:] for o in listed.get("Contents", [])}

    # A checkpoint is complete in the store (its marker uploaded last): lose the pod, and
    # with it the scratch volume that staged the run.
    wait(lambda: any(k.startswith("checkpoints/") and k.endswith("/kubetune-complete.json")
                     for k in stored()) or _status(kube, namespace, name).get("phase")
         in ("Succeeded", "Failed"), timeout=600, every=1)
    core = kube.CoreV1Api()
    first = [p.metadata.name for p in _pods(kube, namespace, name)]
    assert len(first) == 1 and _status(kube, namespace, name).get("phase") == "Running"
    core.delete_namespaced_pod(first[0], namespace, grace_period_seconds=0)
    _follow(kube, namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"))
    status = _status(kube, namespace, name)
    assert status["phase"] == "Succeeded", status
    assert status["progress"]["step"] == steps
    second = [p for p in _pods(kube, namespace, name) if p.metadata.name != first[0]]
    log = core.read_namespaced_pod_log(second[0].metadata.name, namespace)
    assert "to resume from it" in log and "resuming from" in log, log[-3000:]
    # The outputs are in the store, and the status points there.
    assert status["outputs"]["adapter"] == f"s3://runs/{name}/adapter", status
    assert {"adapter/adapter_model.safetensors", "result.json", "progress.jsonl"} <= stored()
    assert not (claims["outputs"] / name).exists()  # nothing went to the claim


ROWS = 40_000  # about 6 M tokens: preparing them takes seconds, loading them a fraction


def _large_data(claims) -> str:
    """Enough rows that preparing them takes a while (the measurement below); made once."""
    path = claims["inputs"] / "data" / "large.json"
    if not path.exists():
        rows = [{"instruction": f"Write a short note number {i} about kubetune's pods.",
                 "output": " ".join(f"Line {j} of note {i}: pods start, train and save."
                                    for j in range(12))} for i in range(ROWS)]
        path.write_text(json.dumps(rows))
    return "pvc://inputs/data/large.json"


def _start_to_first_step(kube, namespace, name, out: Path) -> float:
    """The training pod's container start to its first logged step (progress.jsonl)."""
    (pod,) = _pods(kube, namespace, name)
    started = pod.status.container_statuses[0].state.terminated.started_at.timestamp()
    records = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    first = min(r["time"] for r in records if "event" not in r and "loss" in r)
    return first - started


def test_preflight_stops_bad_data_on_cpu_and_training_starts_from_its_prepared_rows(
        kube, namespace, operator, claims):
    """spec.preflight: always on the real node. Bad data: Validating, then Failed naming the
    data, no training pod ever made. The spec fixed (good data): a new pre-flight, its report
    in the status, and the training pod loads the rows the pre-flight pod prepared (its log
    says so) instead of tokenizing them; start-to-first-step measured against the same job
    without pre-flight."""
    core = kube.CoreV1Api()
    bad = f"pfbad-{uuid.uuid4().hex[:4]}"
    body = _job(namespace, bad, steps=2, preflight="always")
    body["spec"]["datasets"] = [{"source": "pvc://inputs/data/broken.json", "format": "alpaca"}]
    _create(kube, body)
    seen = _follow(kube, namespace, bad, lambda s: s.get("phase") in ("Succeeded", "Failed"))
    status = _status(kube, namespace, bad)
    assert status["phase"] == "Failed" and "Validating" in [s["phase"] for s in seen], seen
    assert status["failure"]["reason"] == "DataError", status
    assert status["preflight"]["passed"] is False and "broken.json" in json.dumps(status)
    assert not _pods(kube, namespace, bad)  # no training pod, ever
    with pytest.raises(Exception, match="Not Found"):
        kube.BatchV1Api().read_namespaced_job(bad, namespace)

    data = _large_data(claims)
    timings = {}
    for mode in ("skip", "always"):
        fixed = [{"source": data, "format": "alpaca"}]
        if mode == "always":  # the failed job, its spec fixed (kubectl apply)
            name = bad
            kube.CustomObjectsApi().patch_namespaced_custom_object(
                "kubetune.io", "v1alpha1", namespace, "finetunejobs", name,
                {"spec": {"datasets": fixed}})
            seen = _follow(kube, namespace, name, lambda s: s.get("phase") != "Failed",
                           timeout=60)
        else:
            name = f"pf{mode[:2]}-{uuid.uuid4().hex[:4]}"
            body = _job(namespace, name, steps=2, preflight=mode)
            body["spec"]["datasets"] = fixed
            _create(kube, body)
            seen = []
        seen += _follow(kube, namespace, name, lambda s: s.get("phase") in ("Succeeded",
                                                                             "Failed"))
        status = _status(kube, namespace, name)
        assert status["phase"] == "Succeeded", (status, operator.output[-3000:])
        (pod,) = _pods(kube, namespace, name)
        log = core.read_namespaced_pod_log(pod.metadata.name, namespace)
        timings[mode] = _start_to_first_step(kube, namespace, name, claims["outputs"] / name)
        if mode == "always":
            assert "Validating" in [s["phase"] for s in seen], seen
            report = status["preflight"]
            assert report["passed"] and report["rows"] == ROWS and report["prepared"], report
            assert report["tokens"] > report["trainedTokens"] > 0
            assert report["memoryPerGpu"].endswith("GiB"), report
            assert "data: prepared rows loaded from the cache" in log, log[-3000:]
        else:
            assert "preflight" not in status
            assert "prepared rows loaded from the cache" not in log, log[-3000:]
    print(f"start to first step: without pre-flight {timings['skip']:.1f} s, with "
          f"{timings['always']:.1f} s")
    record = os.environ.get("KUBETUNE_E2E_TIMINGS")  # measured, not asserted (bench's job)
    if record:
        Path(record).write_text(json.dumps(timings))


def test_a_gated_serve_serves_the_run_that_meets_its_gate_and_not_the_one_that_misses(
        kube, namespace, operator, claims):
    """spec.serve.gate on real runs' final metrics (reported by the trainer from the pod):
    the run whose train_loss misses its gate succeeds but gets no server, saying by how
    much; the one that meets it gets its server (whose vLLM image cannot be pulled here:
    its Deployment, for the merged model, is what is checked)."""
    gates = {"missed": 0.0001, "met": 1000.0}
    names = {k: f"gate{k}-{uuid.uuid4().hex[:4]}" for k in gates}
    for key, below in gates.items():
        body = _job(namespace, names[key], steps=2,
                    serve={"gate": [{"metric": "train_loss", "below": below}]})
        body["spec"]["output"]["merge"] = True  # vLLM serves a whole model
        _create(kube, body)
    apps = kube.AppsV1Api()
    for key, name in names.items():
        _follow(kube, namespace, name, lambda s: s.get("phase") in ("Succeeded", "Failed"))
        status = _status(kube, namespace, name)
        assert status["phase"] == "Succeeded", (status, operator.output[-3000:])
        loss = status["outputs"]["metrics"]["train_loss"]
        serving = wait(lambda n=name: {c["type"]: c for c in _status(
            kube, namespace, n)["conditions"]}.get("Serving"), timeout=30)
        if key == "missed":
            assert (serving["status"], serving["reason"]) == ("False", "GateNotMet"), serving
            assert serving["message"].startswith(
                f"spec.serve.gate: train_loss is {loss:.6g}, not below 0.0001 (misses by"), \
                serving
            time.sleep(3)  # a server, if one were coming, would have been made by now
            with pytest.raises(Exception, match="Not Found"):
                apps.read_namespaced_deployment(f"{name}-serve", namespace)
        else:
            assert serving["reason"] != "GateNotMet", serving
            dep = wait(lambda n=name: apps.read_namespaced_deployment(f"{n}-serve", namespace),
                       timeout=30)
            args = dep.spec.template.spec.containers[0].args
            assert any(a.endswith(f"/outputs/{name}/merged") for a in args), args
