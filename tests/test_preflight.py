"""The pre-flight pod's program (kubetune-preflight), run here as the pod runs it: every row
checked and prepared where the training pods read them, the memory and time estimated, the
report in the termination message; and the time estimate alone."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_spec, write_job
from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.estimate import training_time
from kubetune_trainer import preflight
from kubetune_trainer.config import RunContext
from kubetune_trainer.data import preprocess
from kubetune_trainer.recipes import recipe
from kubetune_trainer.train import prepare_data

ROWS = [{"instruction": f"Say {i}.", "output": f"{i} it is."} for i in range(40)]


@pytest.fixture
def pod(tmp_path, monkeypatch, tiny_model):
    """The pod's environment: prepared rows on the 'output volume', a termination log."""
    monkeypatch.setenv("KUBETUNE_PREPARED_DIR", str(tmp_path / "volume" / ".prepared"))
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "scratch"))
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))

    def run(rows, gpu_memory=None, **changes):
        (tmp_path / "d.json").write_text(json.dumps(rows))
        spec = tiny_spec(tiny_model, [{"source": str(tmp_path / "d.json")}], tmp_path / "out",
                         **changes)
        job = write_job(tmp_path / "job.yaml", spec)
        if gpu_memory is not None:
            monkeypatch.setenv("KUBETUNE_GPU_MEMORY", str(gpu_memory))
        code = preflight.main([str(job)])
        return code, json.loads((tmp_path / "termination-log").read_text())["preflight"], spec
    return run


def test_a_good_job_is_reported_and_its_rows_wait_for_the_training_pods(pod, tmp_path, tiny_model,
                                                                        monkeypatch):
    code, report, spec = pod(ROWS + [{"instruction": "", "output": ""}],
                             training={"cutoffLen": 128, "packing": False,
                                                 "maxInvalidFraction": 0.1})
    assert code == 0 and report["passed"] is True
    assert (report["rows"], report["badRows"]) == (41, 1) and report["badReasons"]
    assert report["sequences"] == 40 and report["tokens"] > report["trainedTokens"] > 0
    assert report["prepared"] is True
    p = report["rowLengthPercentiles"]
    assert 0 < p["p50"] <= p["p90"] <= p["p99"] <= p["max"] <= 128
    assert report["memoryPerGpu"].endswith("GiB")
    assert report["estimatedSeconds"] is None and "GPU type is unknown" in report["assumptions"]
    # A training pod with the same volume: the rows come from there, nothing is tokenized.
    calls = []
    monkeypatch.setattr(preprocess, "tokenize_to_files",
                        lambda *a, **k: calls.append(1))
    from transformers import AutoTokenizer

    lines: list[str] = []
    ctx = RunContext(base_dir=tmp_path, cache_dir=tmp_path / "other-scratch")
    parsed = FineTuneJobSpec.model_validate(spec)
    data = prepare_data(parsed, ctx, AutoTokenizer.from_pretrained(tiny_model),
                        recipe("sft"), log=lines.append)
    assert not calls and data.stats["cached"] is True
    assert lines[-1].startswith("data: prepared rows loaded from the cache")


def test_bad_data_stops_the_job_naming_the_field(pod):
    code, report, _ = pod([{"instruction": "", "output": ""}] * 10)
    assert code == 2 and report["passed"] is False
    assert report["reason"] == "DataError" and "no usable rows" in report["message"]


def test_a_model_that_does_not_fit_stops_the_job_naming_resources(pod):
    code, report, _ = pod(ROWS, gpu_memory=2**20, resources={"gpusPerNode": 1})
    assert code == 2 and report["passed"] is False and report["field"] == "spec.resources"
    assert "GiB" in report["message"]


def test_training_time_from_tokens_parameters_and_the_gpu():
    base = tiny_spec("m", [{"source": "d.json"}], "out", training={"epochs": 2.0})
    del base["training"]["maxSteps"]
    spec = FineTuneJobSpec.model_validate({
        **base,
        "resources": {"gpusPerNode": 8},
        "method": {"type": "full"},
        "scheduling": {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}})
    seconds, assumed = training_time(8_000_000_000, 100_000_000, 50_000, spec)
    # 6 × 8e9 × 1e8 tokens × 2 epochs over 8 × 989e12 × 0.4 FLOP/s
    assert seconds == pytest.approx(6 * 8e9 * 2e8 / (8 * 989e12 * 0.4), rel=0.01)
    assert "MFU 40%" in assumed and "H100" in assumed
    lora = spec.model_copy(update={"method": FineTuneJobSpec.model_validate(
        {**tiny_spec("m", [{"source": "d.json"}], "out")}).method})
    assert training_time(8_000_000_000, 100_000_000, 50_000, lora)[0] == pytest.approx(
        seconds * 4 / 6, rel=0.01)
