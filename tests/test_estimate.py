"""The memory estimate's arithmetic against published figures, and `kubetune estimate`."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_spec, write_job
from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.cli import app
from kubetune.estimate import GIB, estimate, fits, gpu_memory_for, parameters, parse_quantity
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
    assert "does not fit in 24 GiB" in res.output and "(QLoRA: " in res.output
    assert "training.gradientCheckpointing: true" in res.output
    assert estimate(LLAMA2_7B, _spec()).total / GIB < 24  # LoRA by default fits


def _model_states(est) -> float:
    return est.parts["weights"] + est.parts.get("gathered", 0) + est.parts["gradients"] \
        + est.parts["optimizer"]


# A 7.5 B-parameter decoder, the ZeRO paper's running example (Rajbhandari et al. 2020,
# figure 1): Llama-2-7B's layers, 36 of them, and a 51200-token tied vocabulary.
ZERO_7_5B = {**LLAMA2_7B, "num_hidden_layers": 36, "vocab_size": 51200,
             "tie_word_embeddings": True}


def test_zero_paper_figures_for_7_5b_parameters_on_64_gpus():
    """Mixed-precision Adam is 16 bytes per parameter (2 weights + 2 gradients + 12 fp32
    master copy and moments): 120 GB for 7.5 B under data parallelism; ZeRO-2 (P_os+g) keeps
    2Ψ + 14Ψ/N = 16.6 GB, ZeRO-3 (P_os+g+p) 16Ψ/N = 1.9 GB, on N = 64 (GB = 1e9)."""
    psi, _ = parameters(ZERO_7_5B)
    assert psi == pytest.approx(7.5e9, rel=0.001)
    on_64 = {"nodes": 8, "gpusPerNode": 8}

    def states(strategy: str) -> float:
        est = estimate(ZERO_7_5B, _spec(method={"type": "full"}, training={"precision": "bf16"},
                                        resources={**on_64, "strategy": strategy}))
        assert est.world_size == 64
        return (_model_states(est) - est.parts.get("gathered", 0)) / psi

    ddp = estimate(ZERO_7_5B, _spec(method={"type": "full"}, training={"precision": "bf16"},
                                    resources={**on_64, "strategy": "zero2"}))
    assert ddp.parts["optimizer"] * 64 / psi == pytest.approx(12)  # K = 12 for mixed precision
    assert states("zero2") == pytest.approx(2 + 14 / 64)
    assert states("zero2") * 7.5 == pytest.approx(16.6, abs=0.1)  # the paper's 16.6 GB
    assert states("zero3") == pytest.approx(16 / 64)
    assert states("zero3") * 7.5 == pytest.approx(1.9, abs=0.05)  # the paper's 1.9 GB
    # One process: ZeRO shards nothing, so mixed-precision Adam is the whole 16 bytes.
    one = estimate(ZERO_7_5B, _spec(method={"type": "full"}, training={"precision": "bf16"},
                                    resources={"strategy": "zero2"}))
    assert _model_states(one) / psi == pytest.approx(16)


def test_offload_moves_optimizer_state_and_weights_to_cpu_and_fsdp2_shards_like_zero3():
    full = {"method": {"type": "full"}, "training": {"precision": "bf16"}}
    z2 = estimate(LLAMA2_7B, _spec(**full, resources={"gpusPerNode": 8, "strategy": "zero2"}))
    z2o = estimate(LLAMA2_7B, _spec(**full, resources={"gpusPerNode": 8,
                                                        "strategy": "zero2-offload"}))
    # ZeRO-Offload: optimizer state and gradients in CPU memory, the 16-bit weights on the GPU
    assert z2o.parts["optimizer"] == 0 and z2o.parts["gradients"] == 0
    assert z2o.offloaded == pytest.approx(z2.parts["optimizer"] + z2.parts["gradients"])
    assert z2o.parts["weights"] == z2.parts["weights"]
    z3o = estimate(LLAMA2_7B, _spec(**full, resources={"strategy": "zero3-offload"}))
    total, per_layer = parameters(LLAMA2_7B)
    assert z3o.parts["weights"] == 0 and z3o.parts["optimizer"] == 0
    assert z3o.parts["gathered"] == pytest.approx(2 * per_layer * 2)  # two layers in bf16
    assert z3o.offloaded == pytest.approx(total * 16)  # one GPU: all of it in CPU RAM
    fsdp = estimate(LLAMA2_7B, _spec(**full, resources={"gpusPerNode": 8, "strategy": "fsdp2"}))
    ddp = estimate(LLAMA2_7B, _spec(**full, resources={"gpusPerNode": 8}))
    for part in ("weights", "gradients", "optimizer"):
        assert fsdp.parts[part] == pytest.approx(ddp.parts[part] / 8)
    assert fsdp.parts["activations"] == ddp.parts["activations"]  # not sharded by any


def test_72b_full_fine_tune_of_64_by_32k_on_one_gpu_is_refused_with_fixes_that_fit():
    """The issue's example: refused, with the numbers, and the fixes computed for this job."""
    qwen2_72b = {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                 "num_key_value_heads": 8, "intermediate_size": 29568, "vocab_size": 152064,
                 "tie_word_embeddings": False}
    assert parameters(qwen2_72b)[0] == pytest.approx(72.7e9, rel=0.001)  # published: 72.7 B
    spec = _spec(method={"type": "full"}, training={"batchSizePerDevice": 64,
                                                    "cutoffLen": 32768})
    verdict = fits(qwen2_72b, spec, parse_quantity("80Gi"))
    assert verdict.fits is False and verdict.estimate.total > 1000 * GIB
    msg = verdict.message()
    assert "does not fit in 80 GiB" in msg and "weights 135.4" in msg  # 72.7 B × 2 bytes
    assert verdict.fixes[0].startswith("training.gradientCheckpointing: true → ")
    assert verdict.fixes[-1].startswith("all of these together → ")
    # A sharded one on 4 × 8 H100s with checkpointing fits.
    fixed = _spec(method={"type": "full"}, training={"batchSizePerDevice": 1,
                                                     "cutoffLen": 4096,
                                                     "gradientCheckpointing": True},
                  resources={"nodes": 4, "gpusPerNode": 8, "strategy": "zero3"})
    assert fits(qwen2_72b, fixed, parse_quantity("80Gi")).fits is True
    assert fits(qwen2_72b, fixed, None).fits is None  # unknown memory: no verdict


def test_eight_bit_adam_keeps_2_bytes_of_state_per_parameter():
    spec = _spec(method={"type": "full"}, training={"precision": "bf16"})
    total, _ = parameters(LLAMA2_7B)
    adam = estimate(LLAMA2_7B, spec)
    spec8 = _spec(method={"type": "full"}, training={"precision": "bf16",
                                                     "optimizer": {"name": "adamw_8bit"}})
    assert estimate(LLAMA2_7B, spec8).parts["optimizer"] == pytest.approx(2 * total)
    assert adam.parts["optimizer"] == pytest.approx(4 * total)  # two bf16 moments


def test_gpu_memory_comes_from_the_job_then_the_operators_table_by_product():
    table = {"default": "80Gi", "NVIDIA-A100-SXM4-40GB": "40Gi"}
    assert gpu_memory_for(_spec(), table) == 80 * GIB
    assert gpu_memory_for(_spec(resources={"gpuMemory": "141Gi"}), table) == 141 * GIB
    a100 = _spec(scheduling={"nodeSelector": {"nvidia.com/gpu.product":
                                              "NVIDIA-A100-SXM4-40GB"}})
    assert gpu_memory_for(a100, table) == 40 * GIB
    assert gpu_memory_for(_spec(), {}) is None  # unknown: no refusal
    assert gpu_memory_for(_spec(resources={"gpusPerNode": 0}), table) is None  # CPU only
    assert parse_quantity("40G") == 40e9 and parse_quantity("81920Mi") == 80 * GIB
    with pytest.raises(ValueError, match="not a quantity"):
        parse_quantity("80 GB")


@pytest.fixture
def weights_hub(tmp_path, monkeypatch):
    """A real HTTP server answering the Hub's API for one model repository (config,
    tokenizer and a weights file), recording every request."""
    import hashlib
    import http.server
    import threading

    from conftest import QWEN2_72B

    files = {"config.json": json.dumps(QWEN2_72B).encode(), "tokenizer_config.json": b"{}",
             "model-00001-of-00031.safetensors": b"\0" * 4096}

    class Seen(list):
        gated = False  # True: 401 to a request without a token, as for a gated model

    sha, seen = "c" * 40, Seen()

    class Hub(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self, head: bool) -> None:
            seen.append(self.path)
            path = self.path.split("?")[0]
            headers = {"Content-Type": "application/json"}
            if seen.gated and not self.headers.get("Authorization"):
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if "/tree/" in path:
                body = json.dumps([{"type": "file", "path": f, "size": len(b),
                                    "oid": hashlib.sha1(b).hexdigest()}
                                   for f, b in files.items()]).encode()
            elif path.startswith("/api/models/"):
                body = json.dumps({"id": "Qwen/Qwen2-72B", "sha": sha, "siblings": [
                    {"rfilename": f} for f in files]}).encode()
            elif "/resolve/" in path and path.rsplit("/", 1)[1] in files:
                body = files[path.rsplit("/", 1)[1]]
                headers = {"X-Repo-Commit": sha,
                           "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}
            else:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def do_GET(self):
            self._answer(False)

        def do_HEAD(self):
            self._answer(True)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    from huggingface_hub import constants  # read from the environment when first imported

    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "cache"))
    yield seen
    server.shutdown()


def test_estimate_of_an_hf_model_fetches_its_config_never_its_weights(tmp_path, weights_hub):
    job = write_job(tmp_path / "big.yaml", {
        "model": {"source": "hf://Qwen/Qwen2-72B"}, "datasets": [{"source": "d.json"}],
        "method": {"type": "full"}, "resources": {"gpusPerNode": 1, "gpuMemory": "80Gi"},
        "training": {"batchSizePerDevice": 64, "cutoffLen": 32768}, "output": {"uri": "o"}})
    res = CliRunner().invoke(app, ["estimate", str(job)])
    assert res.exit_code == 2, res.output
    assert "does not fit in 80 GiB" in res.output and "weights          135.42 GiB" in res.output
    fetched = [p for p in weights_hub if "/resolve/" in p]
    assert any(p.endswith("/config.json") for p in fetched)
    assert not any("safetensors" in p for p in fetched), fetched


def _job_with_a_token(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_SECRETS_DIR", str(tmp_path / "no-secrets"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return write_job(tmp_path / "big.yaml", {
        "model": {"source": "hf://Qwen/Qwen2-72B", "secretRef": {"name": "hf-token"}},
        "datasets": [{"source": "d.json"}], "method": {"type": "full"},
        "resources": {"gpusPerNode": 1, "gpuMemory": "80Gi"}, "output": {"uri": "o"}})


def test_estimate_of_a_public_hf_model_needs_no_local_secret(tmp_path, weights_hub,
                                                             monkeypatch):
    """The model names a Secret for the cluster; here it is absent, and a public model's
    config.json needs no token (examples/assistant-identity.yaml)."""
    res = CliRunner().invoke(app, ["estimate", str(_job_with_a_token(tmp_path, monkeypatch))])
    assert res.exit_code == 2 and "does not fit in 80 GiB" in res.output, res.output
    assert "secretRef" not in res.output


def test_estimate_of_a_gated_hf_model_asks_for_the_missing_secret(tmp_path, weights_hub,
                                                                  monkeypatch):
    weights_hub.gated = True
    res = CliRunner().invoke(app, ["estimate", str(_job_with_a_token(tmp_path, monkeypatch))])
    assert res.exit_code == 2, res.output
    assert "spec.model.secretRef: hf://Qwen/Qwen2-72B: the Hub answered 401 without a " \
        "token; Secret 'hf-token' key token" in " ".join(res.output.split()), res.output
