"""training.reportTo: one tiny run reports to TensorBoard (event files read back with
tensorboard's own reader), a real `mlflow server` started here (metrics and params read back
with MlflowClient) and W&B in offline mode (its run files written)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import LF_DATA, tiny_spec, write_job
from kubetune.jobfile import load_job
from kubetune_trainer.config import RunContext


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--default-artifact-root", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("mlflow server did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.slow
def test_one_run_reports_to_tensorboard_mlflow_and_wandb(tiny_model, tmp_path, mlflow_server,
                                                         monkeypatch):
    from kubetune_trainer.train import run

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "out"
    spec = tiny_spec(tiny_model, [{"source": str(LF_DATA / "identity.json"),
                                   "placeholders": {"name": "Kubey", "author": "Ops"}}], out,
                     training={"maxSteps": 4, "evalSplit": 0.1,
                               "reportTo": ["tensorboard", "mlflow", "wandb"],
                               "tracking": {"uri": mlflow_server, "experiment": "kubetune-test",
                                            "project": "kubetune-test"}})
    result = run(load_job(write_job(tmp_path / "j.yaml", spec, name="tracked")),
                 RunContext(base_dir=tmp_path), log=lambda *_: None)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p.parent for p in (out / "runs").rglob("events.out.tfevents.*")]
    assert events, "TensorBoard event files under the output's runs/"
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert len(acc.Scalars("train/loss")) == 4

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("kubetune-test")
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert mlrun.info.run_name == "tracked"  # the job's name
    assert mlrun.data.params["learning_rate"] == "0.005"
    assert len(client.get_metric_history(mlrun.info.run_id, "loss")) == 4
    assert mlrun.data.metrics["final_train_loss"] == pytest.approx(
        result["metrics"]["train_loss"])
    assert "final_eval_perplexity" in mlrun.data.metrics
    assert result["tracking_url"] == (f"{mlflow_server}/#/experiments/{exp.experiment_id}"
                                      f"/runs/{mlrun.info.run_id}")

    offline = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0

    # Run again (a restart after the end: resumes at step 4, trains nothing): the same runs.
    again = run(load_job(tmp_path / "j.yaml"), RunContext(base_dir=tmp_path),
                log=lambda *_: None)
    assert again["resumed_from"].endswith("checkpoint-4")
    assert again["tracking_url"] == result["tracking_url"]
    assert len(client.search_runs([exp.experiment_id])) == 1
    wandb_ids = {p.name.split("-")[-1].removesuffix(".wandb")
                 for p in (out / "wandb").glob("offline-run-*/run-*.wandb")}
    assert len(wandb_ids) == 1, wandb_ids


def test_an_unreachable_mlflow_server_is_one_line_naming_the_field(tmp_path, monkeypatch):
    from kubetune.api.v1alpha1 import FineTuneJobSpec
    from kubetune.errors import KubetuneError
    from kubetune_trainer.tracking import session

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = FineTuneJobSpec.model_validate({
        "model": {"source": "m"}, "datasets": [{"source": "d.json"}], "output": {"uri": "o"},
        "training": {"reportTo": ["mlflow"], "tracking": {"uri": f"http://127.0.0.1:{port}"}}})
    with pytest.raises(KubetuneError) as err, session(spec, "j", tmp_path) as trackers:
        trackers.start(tmp_path)
    assert err.value.field == "spec.training.tracking"
    assert f"127.0.0.1:{port}" in err.value.message and "\n" not in err.value.message
    assert "MLFLOW_TRACKING_URI" not in os.environ or os.environ["MLFLOW_TRACKING_URI"] != \
        f"http://127.0.0.1:{port}", "the environment is restored"
