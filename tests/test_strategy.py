"""resources.strategy end to end on CPU: a FineTuneJob run by `kubetune run --nproc 2` through
the trainer image's launcher (accelerate + DeepSpeed, gloo), saved as a whole model and
resumed at its checkpoint's step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import LF_DATA, tiny_spec, write_job
from kubetune.cli import app
from typer.testing import CliRunner


def _run(job: Path, nproc: int = 2):
    return CliRunner().invoke(app, ["run", str(job), "--nproc", str(nproc)])


def _progress(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.usefixtures("lf_data")
def test_zero3_full_fine_tune_on_two_processes_saves_a_whole_model_and_resumes(
        tiny_model, tmp_path, monkeypatch):
    """ZeRO-3 shards the weights over 2 processes: the saved model must be the gathered whole
    (not the empty placeholders a rank holds), and a second run resumes the DeepSpeed
    checkpoint at its step. (The first run compiles DeepSpeed's CPU ops, ~1.5 min, cached in
    ~/.cache/kubetune/torch_extensions.)"""
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR",
                       str(Path.home() / ".cache" / "kubetune" / "torch_extensions"))
    out = tmp_path / "out"
    spec = tiny_spec(tiny_model, [{"source": str(LF_DATA / "identity.json")}], out,
                     method={"type": "full"}, resources={"gpusPerNode": 0, "strategy": "zero3"},
                     training={"maxSteps": 2, "saveSteps": 2, "batchSizePerDevice": 2,
                               "precision": "fp32"})
    job = write_job(tmp_path / "job.yaml", spec)
    first = _run(job)
    assert first.exit_code == 0, first.output
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 2
    assert any(p.name.startswith("global_step") for p in (out / "checkpoints" / "checkpoint-2")
               .iterdir()), "not a DeepSpeed checkpoint"

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    trained = AutoModelForCausalLM.from_pretrained(result["model"])
    for (name, a), b in zip(base.state_dict().items(), trained.state_dict().values(),
                            strict=True):
        assert a.shape == b.shape, name  # gathered, not a rank's empty partition
    moved = [n for (n, a), b in zip(base.state_dict().items(), trained.state_dict().values(),
                                    strict=True) if not torch.equal(a, b)]
    assert len(moved) > len(base.state_dict()) // 2, "the saved weights did not train"

    spec["training"]["maxSteps"] = 4
    write_job(job, spec)
    second = _run(job)
    assert second.exit_code == 0, second.output
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"].endswith("checkpoint-2") and result["global_step"] == 4
    records = _progress(out)
    assert [r["step"] for r in records if r.get("event") == "resumed"] == [2]
    logged = [r["step"] for r in records if "loss" in r and "event" not in r]
    assert logged == [1, 2, 3, 4]  # each step once: the resumed run went on from step 3
    assert yaml.safe_load(job.read_text())["spec"]["resources"]["strategy"] == "zero3"
