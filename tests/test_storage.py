"""Outputs and sources in an S3-compatible store: moto's server, started here, over HTTP, with
authentication on (an IAM user's keys; any other key is refused). Credentials reach the run
only by Secret reference: a Secret directory laid out as Kubernetes mounts one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import LF_DATA, tiny_spec, write_job
from kubetune.api.v1alpha1 import FineTuneJob, FineTuneJobSpec
from kubetune.credentials import dataset_secret, k8s_env
from kubetune.errors import KubetuneError
from kubetune.jobfile import load_job
from kubetune_trainer.config import RunContext
from kubetune_trainer.sources import resolve
from kubetune_trainer.storage import Store

BUCKET = "kubetune-out"
ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": "*", "Resource": "*"}]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto_server with authentication after the first 3 calls (which make an IAM user with
    an allow-all policy and its key), then a bucket made with that key."""
    import boto3

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    moto = Path(sys.executable).with_name("moto_server")
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="trainer")
        iam.put_user_policy(UserName="trainer", PolicyName="all", PolicyDocument=ALLOW_ALL)
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id=key["AccessKeyId"],
                              aws_secret_access_key=key["SecretAccessKey"])
        client.create_bucket(Bucket=BUCKET)
        # A second user may write anything but checkpoint-4 of jobs/a: a forbidden upload.
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                           aws_access_key_id=key["AccessKeyId"],
                           aws_secret_access_key=key["SecretAccessKey"])
        iam.create_user(UserName="limited")
        iam.put_user_policy(UserName="limited", PolicyName="p", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": "*", "Resource": "*"},
                {"Effect": "Deny", "Action": "s3:PutObject",
                 "Resource": f"arn:aws:s3:::{BUCKET}/jobs/a/checkpoints/checkpoint-4/*"}]}))
        limited = iam.create_access_key(UserName="limited")["AccessKey"]
        yield {"url": url, "id": key["AccessKeyId"], "secret": key["SecretAccessKey"],
               "client": client, "limited": limited}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _secret(root: Path, name: str, **keys: str) -> None:
    """A Secret as Kubernetes mounts it: one file per key."""
    (root / name).mkdir(parents=True, exist_ok=True)
    for k, v in keys.items():
        (root / name / k).write_text(v)


@pytest.fixture
def secrets(tmp_path, monkeypatch, s3):
    root = tmp_path / "secrets"
    _secret(root, "s3-creds", AWS_ACCESS_KEY_ID=s3["id"], AWS_SECRET_ACCESS_KEY=s3["secret"],
            AWS_ENDPOINT_URL=s3["url"], AWS_REGION="us-east-1")
    _secret(root, "s3-wrong", AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG",
            AWS_SECRET_ACCESS_KEY="wrong", AWS_ENDPOINT_URL=s3["url"])
    _secret(root, "s3-nowhere", AWS_ACCESS_KEY_ID=s3["id"], AWS_SECRET_ACCESS_KEY=s3["secret"],
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}")
    _secret(root, "s3-half", AWS_ACCESS_KEY_ID=s3["id"])
    _secret(root, "s3-limited", AWS_ACCESS_KEY_ID=s3["limited"]["AccessKeyId"],
            AWS_SECRET_ACCESS_KEY=s3["limited"]["SecretAccessKey"], AWS_ENDPOINT_URL=s3["url"])
    monkeypatch.setenv("KUBETUNE_SECRETS_DIR", str(root))
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    return root


def _spec(uri: str, secret: str | None, **extra) -> FineTuneJobSpec:
    out = {"uri": uri, **({"secretRef": {"name": secret}} if secret else {})}
    return FineTuneJobSpec.model_validate({"model": {"source": "m"}, "datasets": [
        {"source": "d.json"}], "output": out, **extra})


def _keys(s3, prefix: str) -> set[str]:
    found = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix):] for o in found}


@pytest.mark.slow
def test_run_uploads_and_a_fresh_pod_resumes_from_the_store(tiny_model, tmp_path, s3,
                                                            secrets):
    uri = f"s3://{BUCKET}/jobs/a"
    data = [{"source": str(LF_DATA / "identity.json"),
             "placeholders": {"name": "Kubey", "author": "Ops"}}]

    def job(steps: int, secret: str = "s3-creds") -> FineTuneJob:
        spec = tiny_spec(tiny_model, data, tmp_path / "unused", training={
            "maxSteps": steps, "saveSteps": 2, "saveTotalLimit": 2})
        spec["output"] = {"uri": uri, "secretRef": {"name": secret}, "merge": True,
                          "maxShardSize": "200KB"}
        return load_job(write_job(tmp_path / f"j{steps}.yaml", spec))

    # Uploading checkpoint-4 is forbidden: the run stops, naming the credentials' field;
    # checkpoint-2 stays in the store, complete.
    with pytest.raises(KubetuneError) as err:
        run_job(job(4, "s3-limited"), RunContext(base_dir=tmp_path, cache_dir=tmp_path / "p0"))
    assert err.value.field == "spec.output.secretRef" and "forbidden" in err.value.message
    assert "\n" not in err.value.message
    keys = _keys(s3, "jobs/a/")
    assert "checkpoints/checkpoint-2/kubetune-complete.json" in keys
    assert "checkpoints/checkpoint-4/kubetune-complete.json" not in keys
    assert "result.json" not in keys

    # A fresh pod with working credentials resumes from checkpoint-2 and finishes.
    first = run_job(job(4), RunContext(base_dir=tmp_path, cache_dir=tmp_path / "pod1"))
    assert first["resumed_from"].endswith("checkpoint-2") and first["global_step"] == 4
    keys = _keys(s3, "jobs/a/")
    assert {"checkpoints/checkpoint-4/kubetune-complete.json", "adapter/adapter_config.json",
            "result.json", "loss.png", "progress.jsonl"} <= keys
    assert "checkpoints/checkpoint-2/kubetune-complete.json" in keys
    shards = [k for k in keys if k.startswith("merged/") and k.endswith(".safetensors")]
    assert len(shards) > 1, "merged model in shards of output.maxShardSize"
    result = json.loads(s3["client"].get_object(Bucket=BUCKET, Key="jobs/a/result.json")
                        ["Body"].read())
    assert result["output_uri"] == uri and result["global_step"] == 4

    # A fresh pod: nothing staged locally; the store has checkpoint-4.
    second = run_job(job(6), RunContext(base_dir=tmp_path, cache_dir=tmp_path / "pod2"))
    assert second["resumed_from"].endswith("checkpoint-4") and second["global_step"] == 6
    keys = _keys(s3, "jobs/a/checkpoints/")
    assert "checkpoint-6/kubetune-complete.json" in keys
    assert not any(k.startswith("checkpoint-2/") for k in keys), "rotated out (limit 2)"
    steps = [json.loads(line).get("step") for line in s3["client"].get_object(
        Bucket=BUCKET, Key="jobs/a/progress.jsonl")["Body"].read().decode().splitlines()]
    assert 1 in steps and 6 in steps, "progress continues the first pod's history"


def run_job(job: FineTuneJob, ctx: RunContext) -> dict:
    from kubetune_trainer.train import run

    return run(job, ctx, log=lambda *_: None)


def test_store_check_passes_with_the_secrets_keys(s3, secrets):
    store = Store.for_output(_spec(f"s3://{BUCKET}/check", "s3-creds"))
    assert "writable" in store.check()
    assert _keys(s3, "check/") == set(), "the probe is removed"


@pytest.mark.parametrize(("secret", "uri", "field", "says"), [
    ("s3-wrong", f"s3://{BUCKET}/x", "spec.output.secretRef", "refused the credentials"),
    ("s3-creds", "s3://no-such-bucket/x", "spec.output.uri", "bucket does not exist"),
    ("s3-nowhere", f"s3://{BUCKET}/x", "spec.output.uri", "cannot be reached"),
    ("s3-half", f"s3://{BUCKET}/x", "spec.output.secretRef",
     "key AWS_SECRET_ACCESS_KEY (locally: variable KUBETUNE_OUTPUT_AWS_SECRET_ACCESS_KEY"),
])
def test_store_faults_are_one_line_naming_the_field(s3, secrets, secret, uri, field, says):
    t0 = time.time()
    with pytest.raises(KubetuneError) as err:
        Store.for_output(_spec(uri, secret)).check()
    assert err.value.field == field and says in err.value.message
    assert "\n" not in str(err.value) and s3["secret"] not in str(err.value)
    assert time.time() - t0 < 60


def test_trainer_exits_2_with_the_reason_in_the_termination_message(s3, secrets, tmp_path,
                                                                     monkeypatch):
    from kubetune_trainer.train import main

    term = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(term))
    path = write_job(tmp_path / "j.yaml", {
        "model": {"source": "m"}, "datasets": [{"source": "d.json"}],
        "output": {"uri": "s3://no-such-bucket/x", "secretRef": {"name": "s3-creds"}}})
    assert main([str(path)]) == 2
    msg = json.loads(term.read_text())
    assert msg["reason"] == "OutputError" and msg["field"] == "spec.output.uri"
    assert "bucket does not exist" in msg["message"]


def test_a_dataset_in_s3_is_read_with_its_own_secret(s3, secrets, tmp_path):
    body = (LF_DATA / "identity.json").read_bytes()
    s3["client"].put_object(Bucket=BUCKET, Key="data/identity.json", Body=body)
    spec = FineTuneJobSpec.model_validate({
        "model": {"source": "m"}, "output": {"uri": "o"}, "datasets": [
            {"source": "local.json"},
            {"source": f"s3://{BUCKET}/data/identity.json", "secretRef": {"name": "s3-creds"}},
            {"source": f"s3://{BUCKET}/data/identity.json",
             "secretRef": {"name": "s3-wrong"}}]})
    ctx = RunContext(base_dir=tmp_path, cache_dir=tmp_path / "cache")
    got = resolve(spec.datasets[1].source, ctx, field="spec.datasets[1].source",
                  kind="dataset", secret=dataset_secret(spec, 1))
    assert got.read_bytes() == body
    with pytest.raises(KubetuneError) as err:
        resolve(spec.datasets[2].source, RunContext(base_dir=tmp_path,
                                                    cache_dir=tmp_path / "c2"),
                field="spec.datasets[2].source", kind="dataset", secret=dataset_secret(spec, 2))
    assert err.value.field == "spec.datasets[2].secretRef"
    assert "refused the credentials" in err.value.message


def test_every_secret_ref_becomes_secret_key_ref_env_per_source():
    spec = FineTuneJobSpec.model_validate({
        "model": {"source": "hf://org/base", "secretRef": {"name": "hub"}},
        "datasets": [{"source": "s3://bkt/a.json", "secretRef": {"name": "team-a"}},
                     {"source": "https://h/b.json", "secretRef": {"name": "web", "key": "tok"}}],
        "output": {"uri": "s3://bkt/out", "secretRef": {"name": "team-b"}},
        "training": {"reportTo": ["mlflow"], "tracking": {"secretRef": {"name": "ml"}}}})
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in k8s_env(spec)}
    assert env["HF_TOKEN"] == {"name": "hub", "key": "token"}
    assert env["KUBETUNE_DATASET_0_AWS_ACCESS_KEY_ID"] == {"name": "team-a",
                                                           "key": "AWS_ACCESS_KEY_ID"}
    assert env["KUBETUNE_DATASET_0_AWS_REGION"] == {"name": "team-a", "key": "AWS_REGION",
                                                    "optional": True}
    assert env["KUBETUNE_DATASET_1_TOKEN"] == {"name": "web", "key": "tok"}
    assert env["KUBETUNE_OUTPUT_AWS_SECRET_ACCESS_KEY"]["name"] == "team-b"
    assert env["MLFLOW_TRACKING_TOKEN"] == {"name": "ml", "key": "MLFLOW_TRACKING_TOKEN",
                                            "optional": True}


def test_builders_render_the_output_secret_as_references_only():
    from kubetune_operator.backends import children
    from kubetune_operator.settings import OperatorConfig

    job = FineTuneJob.model_validate({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "ns"},
        "spec": {"model": {"source": "m"}, "datasets": [{"source": "d.json"}],
                 "output": {"uri": "s3://bkt/out", "secretRef": {"name": "team-b"}}}})
    cm, pf, pj = children(job=job, config=OperatorConfig(preflight="always"))
    for env in (pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
            "env"], pf["spec"]["template"]["spec"]["containers"][0]["env"]):  # + pre-flight
        refs = {e["name"] for e in env if "valueFrom" in e}
        assert {"KUBETUNE_OUTPUT_AWS_ACCESS_KEY_ID", "KUBETUNE_OUTPUT_AWS_SECRET_ACCESS_KEY"} \
            <= refs
        assert not any("value" in e for e in env if e["name"].startswith("KUBETUNE_OUTPUT_"))
    # No claim to share the prepared rows through: the pre-flight pod puts them in the store.
    assert {"name": "KUBETUNE_SHARE_PREPARED", "value": "1"} in pf["spec"]["template"]["spec"][
        "containers"][0]["env"]
    assert "team-b" in cm["data"]["job.yaml"] and "AWS_SECRET" not in cm["data"]["job.yaml"]



@pytest.mark.slow
def test_a_full_staging_disk_stops_the_run_and_a_fresh_pod_resumes_from_the_store(
        tiny_model, tmp_path, s3, secrets):
    """The staging disk (600 KiB tmpfs) takes one LoRA checkpoint of the tiny model, not two:
    the run stops with one line; checkpoint-3 is in the store, and a pod with a larger disk
    resumes from it."""
    from test_faults import _mount

    disk = tmp_path / "scratch"
    _mount(disk, "size=600k")
    try:
        spec = tiny_spec(tiny_model, [{"source": str(LF_DATA / "identity.json")}],
                         tmp_path / "unused")
        spec["output"] = {"uri": f"s3://{BUCKET}/jobs/full", "secretRef": {"name": "s3-creds"}}
        job = load_job(write_job(tmp_path / "j.yaml", spec))
        with pytest.raises(KubetuneError) as err:
            run_job(job, RunContext(base_dir=tmp_path, cache_dir=disk))
        assert err.value.field == "spec.output.uri" and "no space left" in err.value.message
        keys = _keys(s3, "jobs/full/checkpoints/")
        assert "checkpoint-3/kubetune-complete.json" in keys
        assert not any(k.startswith("checkpoint-6/") for k in keys)
        result = run_job(job, RunContext(base_dir=tmp_path, cache_dir=tmp_path / "big"))
        assert result["resumed_from"].endswith("checkpoint-3") and result["global_step"] == 6
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _two_nodes(job: Path, tmp_path: Path, pods: str) -> list[subprocess.CompletedProcess]:
    """The job on 2 "nodes": two `kubetune-launch` processes (1 process each, node ranks 0 and
    1, as a PyTorchJob's Master and Worker pods get them), each with its own scratch disk
    (KUBETUNE_CACHE: staging is per node)."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PET_NNODES": "2", "PET_NODE_RANK": str(rank),
               "PET_NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "KUBETUNE_CACHE": str(tmp_path / f"{pods}-node{rank}"),
               "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "kubetune" /
                                           "torch_extensions")}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kubetune_trainer.launch", str(job), "--strategy", "zero2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    done = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out))
    return done


@pytest.mark.slow
@pytest.mark.usefixtures("secrets")
def test_two_nodes_zero2_upload_every_nodes_part_and_resume_from_the_store(tiny_model,
                                                                         tmp_path, s3):
    """ZeRO-2 over 2 nodes: each rank writes its optimizer partition into its own node's
    staging. Both parts reach the store before the marker, and two fresh pods resume from it
    (each node downloads the whole checkpoint: DeepSpeed loads its own rank's partition)."""
    uri = f"s3://{BUCKET}/jobs/nodes"
    spec = tiny_spec(tiny_model, [{"source": str(LF_DATA / "identity.json")}], tmp_path / "x",
                     method={"type": "full"}, resources={"gpusPerNode": 0, "strategy": "zero2"},
                     training={"maxSteps": 2, "saveSteps": 2, "batchSizePerDevice": 2,
                               "precision": "fp32"})
    spec["output"] = {"uri": uri, "secretRef": {"name": "s3-creds"}}
    job = write_job(tmp_path / "job.yaml", spec)
    for run in _two_nodes(job, tmp_path, "first"):
        assert run.returncode == 0, run.stdout[-3000:]
    keys = _keys(s3, "jobs/nodes/checkpoints/checkpoint-2/")
    assert "kubetune-complete.json" in keys
    parts = sorted(k for k in keys if "optim_states" in k)
    assert len(parts) == 2 and any("rank_1" in k for k in parts), keys  # node 1's part too
    staged1 = next((tmp_path / "first-node1").rglob("checkpoint-2"))
    assert not (staged1 / "kubetune-complete.json").exists()  # only node 0 writes the marker
    assert any("rank_1" in p.name for p in staged1.rglob("*optim_states*"))
    assert not any("rank_1" in p.name for p in next(
        (tmp_path / "first-node0").rglob("checkpoint-2")).rglob("*optim_states*"))

    spec["training"]["maxSteps"] = 4
    write_job(job, spec)
    for run in _two_nodes(job, tmp_path, "second"):  # fresh pods: empty scratch disks
        assert run.returncode == 0, run.stdout[-3000:]
    result = json.loads(s3["client"].get_object(Bucket=BUCKET, Key="jobs/nodes/result.json")
                        ["Body"].read())
    assert result["resumed_from"].endswith("checkpoint-2") and result["global_step"] == 4
    assert result["world_size"] == 2
    for rank in (0, 1):  # each node downloaded the whole checkpoint, both partitions
        got = next((tmp_path / f"second-node{rank}").rglob("checkpoint-2"))
        assert len(list(got.rglob("*optim_states*"))) == 2
    assert "checkpoint-4/kubetune-complete.json" in _keys(s3, "jobs/nodes/checkpoints/")


def test_the_pre_flight_pod_shares_its_prepared_rows_through_an_object_store_output(
        tiny_model, tmp_path, s3, secrets, monkeypatch):
    """No claim to share: the pre-flight pod puts the rows in the output's store (meta.json
    last), and a training pod with an empty cache fetches them instead of tokenizing."""
    from kubetune_trainer import preflight
    from kubetune_trainer.data import preprocess
    from kubetune_trainer.recipes import recipe
    from kubetune_trainer.train import prepare_data
    from transformers import AutoTokenizer

    spec = tiny_spec(tiny_model, [{"source": str(LF_DATA / "identity.json")}], tmp_path / "x",
                     output={"uri": f"s3://{BUCKET}/jobs/pf", "secretRef": {"name": "s3-creds"}})
    path = write_job(tmp_path / "job.yaml", spec)
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "preflight-pod"))
    monkeypatch.setenv("KUBETUNE_SHARE_PREPARED", "1")
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))
    assert preflight.main([str(path)]) == 0
    report = json.loads((tmp_path / "termination-log").read_text())["preflight"]
    assert report["passed"] and report["prepared"], report
    shared = _keys(s3, "jobs/pf/.kubetune/prepared/")
    assert any(k.endswith("/meta.json") for k in shared) and len(shared) >= 2, shared

    monkeypatch.delenv("KUBETUNE_SHARE_PREPARED")
    calls, lines = [], []
    monkeypatch.setattr(preprocess, "tokenize_to_files", lambda *a, **k: calls.append(1))
    ctx = RunContext(base_dir=tmp_path, cache_dir=tmp_path / "training-pod")
    data = prepare_data(load_job(path).spec, ctx, AutoTokenizer.from_pretrained(tiny_model),
                        recipe("sft"), log=lines.append)
    assert not calls and len(data.train) > 0
    assert any(line.startswith(f"data: prepared rows fetched from s3://{BUCKET}/jobs/pf/")
               for line in lines), lines
