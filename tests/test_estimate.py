"""The memory estimate's arithmetic against published figures, and `kubetune estimate`."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_spec, write_job
from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.cli import app
from kubetune.estimate import GIB, estimate, parameters
from typer.testing import CliRunner

# Llama-2-7B's config (published): 6.74 B parameters.
LLAMA2_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
             "tie_word_embeddings": False}


def _spec(**changes) -> FineTuneJobSpec:
    doc = {"model": {"source": "m"}, "datasets": [{"source": "d.json"}],
           "output": {"uri": "o"}, "training": {"batchSizePerDevice": 1, "cutoffLen": 512}}
    for key, value in changes.items():
        doc[key] = {**doc.get(key, {}), **value}
    return FineTuneJobSpec.model_validate(doc)


def test_parameter_count_matches_the_published_llama2_7b():
    total, _ = parameters(LLAMA2_7B)
    assert total == pytest.approx(6.738e9, rel=0.001)


def test_full_fp32_adam_is_16_bytes_per_parameter_and_bf16_half_of_it():
    total, _ = parameters(LLAMA2_7B)
    for precision, per_param in (("fp32", 16), ("bf16", 8)):
        est = estimate(LLAMA2_7B, _spec(method={"type": "full"},
                                        training={"precision": precision}))
        states = est.parts["weights"] + est.parts["gradients"] + est.parts["optimizer"]
        assert states == pytest.approx(per_param * total)


def test_lora_trains_a_fraction_and_qlora_loads_the_base_in_4_bits():
    lora = estimate(LLAMA2_7B, _spec(method={"type": "lora", "lora": {"rank": 16}}))
    assert lora.trainable == pytest.approx(40.0e6, rel=0.01)  # r16 on all 7 linears, 32 layers
    qlora = estimate(LLAMA2_7B, _spec(method={"type": "lora", "quantization": {"bits": 4},
                                              "lora": {"rank": 16}}))
    assert qlora.parts["weights"] < lora.parts["weights"] / 3.5
    assert qlora.total < lora.total < estimate(LLAMA2_7B, _spec(method={"type": "full"})).total


def test_gradient_checkpointing_cuts_activations():
    base = {"batchSizePerDevice": 8, "cutoffLen": 4096}
    plain = estimate(LLAMA2_7B, _spec(training=base))
    ckpt = estimate(LLAMA2_7B, _spec(training={**base, "gradientCheckpointing": True}))
    assert ckpt.parts["activations"] < plain.parts["activations"] / 8


def test_kubetune_estimate_refuses_what_does_not_fit_with_fixes(tiny_model, tmp_path):
    job = write_job(tmp_path / "j.yaml", tiny_spec(tiny_model, [{"source": "d.json"}],
                                                   tmp_path / "out"))
    runner = CliRunner()
    ok = runner.invoke(app, ["estimate", str(job), "--gpu-memory", "80"])
    assert ok.exit_code == 0, ok.output
    assert "weights" in ok.output and "GiB per GPU" in ok.output
    big = tmp_path / "config.json"
    big.write_text(json.dumps(LLAMA2_7B))
    full = write_job(tmp_path / "full.yaml", tiny_spec(
        tiny_model, [{"source": "d.json"}], tmp_path / "out", method={"type": "full"},
        training={"batchSizePerDevice": 8, "cutoffLen": 4096}))
    res = runner.invoke(app, ["estimate", str(full), "--config", str(big), "--gpu-memory", "24"])
    assert res.exit_code == 2
    assert "does not fit in 24 GiB" in res.output and "method.type: lora" in res.output
    assert "training.gradientCheckpointing: true" in res.output
    assert estimate(LLAMA2_7B, _spec()).total / GIB < 24  # LoRA by default fits
