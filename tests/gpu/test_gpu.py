"""On a CUDA GPU (skipped elsewhere): precision, packing and training on the device.

    pytest -m gpu tests/gpu -s     # prints a throughput figure for a SmolLM2-sized model
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import tiny_spec, write_job

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]
IDENTITY = {"source": str(REPO / "examples" / "data" / "identity.json"),
            "placeholders": {"name": "Kubey", "author": "Ops"}}


def _run(tmp_path, spec):
    from kubetune.jobfile import load_job
    from kubetune_trainer.config import RunContext
    from kubetune_trainer.train import run

    return run(load_job(write_job(tmp_path / "job.yaml", spec)), RunContext(base_dir=tmp_path),
               log=print)


def test_auto_precision_is_bf16_and_lora_trains_on_the_gpu(tiny_model, tmp_path):
    from kubetune_trainer.progress import read_progress

    out = tmp_path / "out"
    spec = tiny_spec(tiny_model, [IDENTITY], out, training={
        "maxSteps": 30, "learningRate": 2e-2, "packing": True, "saveSteps": 30})
    spec["resources"] = {"gpusPerNode": 1}
    spec["output"]["merge"] = True
    result = _run(tmp_path, spec)
    losses = [r["loss"] for r in read_progress(out / "progress.jsonl")
              if "loss" in r and "event" not in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert Path(result["merged_model"], "model.safetensors").exists()
    from kubetune.jobfile import load_job
    from kubetune_trainer.model import precision

    assert precision(load_job(tmp_path / "job.yaml").spec) == {"bf16": True, "fp16": False}


def test_packed_samples_stay_apart_on_the_gpu(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).cuda().eval()
    model.config.use_cache = False
    a, b = list(range(10, 30)), list(range(40, 52))
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b]).cuda()).logits[0]
        packed = model(input_ids=torch.tensor([a + b]).cuda(), position_ids=torch.tensor(
            [list(range(len(a))) + list(range(len(b)))]).cuda()).logits[0, len(a):]
    assert torch.allclose(alone, packed, atol=1e-4)


def test_smollm2_sized_lora_throughput(tmp_path, tiny_model):
    """A random model with SmolLM2-135M's shape: tokens per second of LoRA SFT, bf16."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model_dir = tmp_path / "smol-shaped"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    spec = tiny_spec(model_dir, [IDENTITY] * 8, out, training={
        "maxSteps": 40, "batchSizePerDevice": 16, "cutoffLen": 512, "packing": True,
        "saveSteps": 1000, "logSteps": 10})
    spec["resources"] = {"gpusPerNode": 1}
    t0 = time.monotonic()
    result = _run(tmp_path, spec)
    seconds = time.monotonic() - t0
    tokens = result["metrics"].get("num_input_tokens_seen", 0)
    print(f"\nSmolLM2-shaped LoRA on {torch.cuda.get_device_name()}: "
          f"{result['metrics']['train_runtime']:.1f} s training, {tokens:.0f} tokens, "
          f"{tokens / result['metrics']['train_runtime']:.0f} tokens/s; whole run {seconds:.1f} s")
    assert result["global_step"] == 40


def test_fsdp2_trains_and_saves_a_whole_model(tiny_model, tmp_path):
    """resources.strategy fsdp2 through kubetune-launch (accelerate's FSDP2, one process per
    GPU; FSDP does not run on CPU, so this is the only place it runs for real)."""
    import json

    from kubetune.cli import app
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    out = tmp_path / "out"
    spec = tiny_spec(tiny_model, [IDENTITY], out, method={"type": "full"},
                     training={"maxSteps": 4, "saveSteps": 2})
    spec["resources"] = {"gpusPerNode": 1, "strategy": "fsdp2"}
    n = torch.cuda.device_count()
    res = CliRunner().invoke(app, ["run", str(write_job(tmp_path / "job.yaml", spec)),
                                   "--nproc", str(n)])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == n and result["global_step"] == 4
    trained = AutoModelForCausalLM.from_pretrained(result["model"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert all(a.shape == b.shape for a, b in zip(base.state_dict().values(),
                                                   trained.state_dict().values(), strict=True))
