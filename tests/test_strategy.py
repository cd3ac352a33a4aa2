"""resources.strategy end to end on CPU: a FineTuneJob run by `kubetune run --nproc 2` through
the trainer image's launcher (accelerate + DeepSpeed, gloo), saved as a whole model and
resumed at its checkpoint's step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import LF_DATA, free_port, tiny_spec, write_job
from kubetune.cli import app
from typer.testing import CliRunner


def _run(job: Path, nproc: int = 2):
    return CliRunner().invoke(app, ["run", str(job), "--nproc", str(nproc)])


@pytest.fixture(autouse=True)
def _op_cache(monkeypatch):
    # DeepSpeed compiles its CPU ops on first use: once, into the shared cache.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR",
                       str(Path.home() / ".cache" / "kubetune" / "torch_extensions"))


def _progress(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.usefixtures("lf_data")
def test_zero3_full_fine_tune_on_two_processes_saves_a_whole_model_and_resumes(
        tiny_model, tmp_path, capfd):
    """ZeRO-3 shards the weights over 2 processes: the saved model must be the gathered whole
    (not the empty placeholders a rank holds), and a second run resumes the DeepSpeed
    checkpoint at its step. (The first run compiles DeepSpeed's CPU ops, ~1.5 min, cached in
    ~/.cache/kubetune/torch_extensions.)"""
    import torch
    from transformers import AutoModelForCausalLM

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
    said = capfd.readouterr()
    assert "zero3: the weights loaded sharded over 2 processes" in said.out + said.err
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


@pytest.mark.slow
@pytest.mark.usefixtures("lf_data")
def test_zero3_lora_saves_the_whole_adapter_and_merges_it(tiny_model, tmp_path):
    """Under ZeRO-3 a rank holds a shard of the adapter too: the saved adapter must be the
    gathered one (PEFT alone would write empty tensors), and the merged model the base plus
    exactly that adapter."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    spec = tiny_spec(tiny_model, [{"source": str(LF_DATA / "identity.json")}], out,
                     resources={"gpusPerNode": 0, "strategy": "zero3"},
                     training={"maxSteps": 2, "saveSteps": 2, "batchSizePerDevice": 2,
                               "precision": "fp32"})
    spec["output"]["merge"] = True
    res = _run(write_job(tmp_path / "job.yaml", spec))
    assert res.exit_code == 0, res.output
    result = json.loads((out / "result.json").read_text())
    tensors = load_file(Path(result["adapter"]) / "adapter_model.safetensors")
    assert tensors and all(t.dim() == 2 and t.numel() > 0 for t in tensors.values())
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # it trained
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                         result["adapter"]).merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(result["merged_model"]).state_dict()
    assert expected.keys() == merged.keys()
    assert all(torch.allclose(expected[k], merged[k], atol=1e-6) for k in merged)


def test_fsdp2_on_cpu_is_refused_not_run_as_ddp(tiny_model, tmp_path):
    """accelerate runs FSDP on GPUs only: the API refuses fsdp2 without GPUs, and a trainer
    that is handed it anyway (here, a CPU machine) says so instead of training as DDP."""
    from kubetune.api.v1alpha1 import ResourcesSpec
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="fsdp2 needs resources.gpusPerNode > 0"):
        ResourcesSpec.model_validate({"strategy": "fsdp2", "gpusPerNode": 0})


@pytest.mark.slow
@pytest.mark.usefixtures("lf_data")
def test_two_nodes_run_zero3_from_the_pods_command(tiny_model, tmp_path):
    """What each pod of a 2-node PyTorchJob runs, as the operator renders it (kubetune-launch
    JOB --pvc-root … --strategy zero3, topology from the PET_* variables), here as two local
    "nodes" of one process: one DeepSpeed job over both (accelerate's default for several
    machines, pdsh over SSH, would fail in pods)."""
    import os
    import subprocess
    import sys

    from kubetune.jobfile import load_job
    from kubetune_operator.backends import children
    from kubetune_operator.settings import OperatorConfig

    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_spec(
        tiny_model, [{"source": str(LF_DATA / "identity.json")}], out, method={"type": "full"},
        resources={"gpusPerNode": 0, "strategy": "zero3"},
        training={"maxSteps": 2, "saveSteps": 2, "batchSizePerDevice": 2, "precision": "fp32"}))
    # The pods' command for the same job on 2 nodes of 1 GPU (a CPU job runs on one node).
    on_gpus = load_job(job)
    on_gpus.spec.resources = on_gpus.spec.resources.model_copy(
        update={"nodes": 2, "gpus_per_node": 1})
    pod = children(job=on_gpus, config=OperatorConfig())[-1]["spec"][
        "pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    args = [str(job) if a.endswith("job.yaml") else str(tmp_path / "pvc") if a == "/mnt/pvc"
            else a for a in pod["args"]]
    assert args[-2:] == ["--strategy", "zero3"]
    port = free_port()  # both "nodes" meet there
    procs = [subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer.launch", *args],
        env={**os.environ, "PET_NNODES": "2", "PET_NODE_RANK": str(rank), "RANK": str(rank),
             "PET_NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "--deepspeed_multinode_launcher standard" in outputs[0]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 2
    assert (Path(result["model"]) / "model.safetensors").exists()
