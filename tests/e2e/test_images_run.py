"""The images, run for real (`make images` builds them; skipped, saying so, without them): the
trainer trains the bundled model as uid 10001 on a read-only root filesystem, with only /tmp
and the output volume writable and no network; the operator image starts and answers its
health probe against this suite's API server."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from e2e.util import REPO, free_port, image_tags, local_image

pytestmark = pytest.mark.e2e


def _image(name: str) -> str:
    tag = local_image(*image_tags(name))
    if not tag:
        pytest.skip(f"no {name} image in the local Docker engine (make images)")
    return tag


def test_the_trainer_image_trains_the_bundled_model_as_non_root_on_a_read_only_root(tmp_path):
    image = _image("trainer")
    config = json.loads(subprocess.run(["docker", "image", "inspect", image], check=True,
                                       capture_output=True, text=True).stdout)[0]["Config"]
    assert config["User"] == "10001:10001" and config["Entrypoint"] == ["kubetune-launch"]
    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "image-check"},
           "spec": {"model": {"source": "embedded://smollm2-135m-instruct"},
                    "datasets": [{"source": "pvc://data/identity.json", "format": "alpaca",
                                  "placeholders": {"name": "Kubey", "author": "us"},
                                  "maxSamples": 8}],
                    "stage": "sft", "method": {"type": "lora", "lora": {"rank": 4}},
                    "training": {"maxSteps": 2, "batchSizePerDevice": 4, "cutoffLen": 96,
                                 "saveSteps": 1, "logSteps": 1},
                    "resources": {"gpusPerNode": 0},
                    "output": {"uri": "pvc://out/image-check"}}}
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "job.yaml").write_text(yaml.safe_dump(job))
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)  # the volume: writable by the image's user, as a claim would be
    run = subprocess.run([
        "docker", "run", "--rm", "--read-only", "--network", "none",
        "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--tmpfs", "/tmp:rw,exec,size=3g,mode=1777",
        "-e", "OMP_NUM_THREADS=2",
        "-v", f"{tmp_path / 'config'}:/etc/kubetune:ro",
        "-v", f"{REPO / 'examples' / 'data'}:/mnt/pvc/data:ro",
        "-v", f"{out}:/mnt/pvc/out",
        image, "/etc/kubetune/job.yaml", "--pvc-root", "/mnt/pvc"],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = out / "image-check"
    assert (written / "adapter" / "adapter_model.safetensors").exists(), \
        sorted(p.name for p in written.iterdir())
    assert (written / "checkpoints" / "checkpoint-2").is_dir()
    assert {p.stat().st_uid for p in written.rglob("*")} == {10001}
    steps = [json.loads(line)["step"] for line in
             (written / "progress.jsonl").read_text().splitlines() if '"step"' in line]
    assert steps and max(steps) == 2


def test_the_operator_image_answers_its_health_probe_against_the_api_server(
        kube, namespace):
    image = _image("operator")
    kubeconfig = Path(os.environ["KUBECONFIG"])
    port = free_port()
    name = f"kubetune-operator-check-{port}"
    subprocess.run([
        "docker", "run", "-d", "--name", name, "--network", "host", "--read-only",
        "--user", "10001:10001", "--cap-drop", "ALL",
        "-v", f"{kubeconfig}:/etc/kubetune/kubeconfig:ro",
        "-e", "KUBECONFIG=/etc/kubetune/kubeconfig",
        image, "run", "--module=kubetune_operator.handlers", "--standalone",
        "--namespace", namespace, f"--liveness=http://127.0.0.1:{port}/healthz"],
        check=True, capture_output=True)
    try:
        deadline, answer = time.monotonic() + 90, None
        while time.monotonic() < deadline and answer != 200:
            state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name],
                                   capture_output=True, text=True).stdout.strip()
            assert state == "true", subprocess.run(["docker", "logs", name],
                                                   capture_output=True, text=True).stderr[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",
                                            timeout=2) as reply:
                    answer = reply.status
            except OSError:
                time.sleep(1)
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
        assert answer == 200, logs.stdout[-2000:] + logs.stderr[-3000:]
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
