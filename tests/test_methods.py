"""Every method option reaches the trainer and trains the tiny model for 5 steps on CPU.

Each run goes through ``kubetune_trainer.train.run`` (the trainer image's code path); a spy on
``model.finish_setup`` keeps the built TRL trainer so the test can look at what it really got
(its arguments, PEFT config, optimizer, model) while training and after.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import free_port, tiny_spec, write_job
from kubetune.errors import KubetuneError
from kubetune.jobfile import load_job
from kubetune_trainer.config import RunContext

REPO = Path(__file__).resolve().parents[1]
IDENTITY = {"source": str(REPO / "examples" / "data" / "identity.json"),
            "placeholders": {"name": "Kubey", "author": "Ops"}}
PROMPT = [{"role": "user", "content": "Who are you?"}]


class Seen:
    trainer = None
    during: dict = {}


@pytest.fixture
def seen(monkeypatch):
    """The trainer the run built, and what a callback saw at the first step."""
    from kubetune_trainer import model as model_mod
    from transformers import TrainerCallback

    real = model_mod.finish_setup
    box = Seen()
    box.during = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            if state.global_step == 1:
                emb = box.trainer.model.get_input_embeddings()
                box.during["embedding_hooks"] = [getattr(h, "__name__", "")
                                                 for h in emb._forward_hooks.values()]
                box.during["optimizer"] = optimizer

    def spy(trainer, spec, root, *, main):
        box.trainer = trainer
        real(trainer, spec, root, main=main)
        trainer.add_callback(Probe())

    monkeypatch.setattr(model_mod, "finish_setup", spy)
    return box


def _run(tmp_path: Path, spec: dict, name: str = "job") -> dict:
    from kubetune_trainer.train import run

    job = load_job(write_job(tmp_path / f"{name}.yaml", spec, name=name))
    return run(job, RunContext(base_dir=tmp_path), log=lambda *_: None)


def _spec(tiny_model: Path, out: Path, *, method: dict | None = None, training=None,
          **kw) -> dict:
    t = {"maxSteps": 5, "saveSteps": 5, "learningRate": 1e-2}
    t.update(training or {})
    spec = tiny_spec(tiny_model, [IDENTITY], out, training=t, **kw)
    if method is not None:
        spec["method"] = method
    return spec


def _ids(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)


def _logits(model, ids):
    import torch

    model.eval()
    with torch.no_grad():
        return model(**ids).logits.float()


def _trained_steps(result: dict) -> None:
    assert result["global_step"] == 5
    assert result["metrics"]["train_loss"] > 0


# ------------------------------------------------------------------------------ LoRA variants

LORA = {"rank": 8, "alpha": 16}
LORA_CASES = {
    "dora": {"dora": True},
    "rslora": {"rslora": True},
    "gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
    "eva": {"init": "eva"},
    "loraplus": {"loraPlusLrRatio": 16.0},
    "modules_to_save": {"modulesToSave": ["embed_tokens"]},
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_variant_reaches_peft_and_the_saved_adapter_applies_to_the_original_base(
        case, tiny_model, tmp_path, seen):
    """The option is in the trained model's PEFT config (or optimizer); the adapter as saved,
    loaded onto the untouched base, gives the trained model's logits (PiSSA/OLoRA rewrote
    the base in memory: their adapter is saved converted)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    result = _run(tmp_path, _spec(tiny_model, out,
                                  method={"type": "lora", "lora": {**LORA, **LORA_CASES[case]}}))
    _trained_steps(result)
    trainer = seen.trainer
    cfg = trainer.model.peft_config["default"]
    if case == "dora":
        assert cfg.use_dora
        assert any("lora_magnitude_vector" in n for n, _ in trainer.model.named_parameters())
    elif case == "rslora":
        assert cfg.use_rslora
        q = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
        assert q.scaling["default"] == pytest.approx(16 / 8 ** 0.5)
    elif case in ("gaussian", "olora", "eva"):
        assert cfg.init_lora_weights == case
    elif case == "pissa":
        assert cfg.init_lora_weights == "pissa_niter_16"
    elif case == "loraplus":  # B matrices in their own group at 16 × the learning rate
        lrs = sorted({g["lr"] for g in seen.during["optimizer"].param_groups if g["params"]})
        assert lrs[-1] == pytest.approx(16 * lrs[0])
    elif case == "modules_to_save":
        assert "embed_tokens" in cfg.modules_to_save
        saved = json.loads(Path(result["adapter"], "adapter_config.json").read_text())
        assert "embed_tokens" in saved["modules_to_save"]
    if case in ("pissa", "olora"):  # converted: a rank-2r plain LoRA of the original base
        saved = json.loads(Path(result["adapter"], "adapter_config.json").read_text())
        assert saved["r"] == 16 and saved["init_lora_weights"] is True

    ids = _ids(Path(result["adapter"]))
    trained = _logits(trainer.model, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    reloaded = _logits(PeftModel.from_pretrained(base, result["adapter"]), ids)
    pristine = _logits(AutoModelForCausalLM.from_pretrained(tiny_model), ids)
    assert torch.allclose(trained, reloaded, atol=1e-4), (trained - reloaded).abs().max()
    assert not torch.allclose(trained, pristine, atol=1e-3)  # and it did learn something


def test_pissa_restarts_on_the_same_residual_base(tiny_model, tmp_path, seen):
    """A restarted PiSSA run makes the same initial adapter (so the same residual base) as
    the first start: its checkpoints stay valid and the converted adapter stays right."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "out"
    spec = _spec(tiny_model, out, method={"type": "lora", "lora": {**LORA, "init": "pissa"}},
                 training={"maxSteps": 5, "saveSteps": 3})
    _run(tmp_path, spec)
    first = load_file(out / "adapter-init" / "adapter_model.safetensors")
    spec["training"]["maxSteps"] = 6  # resumes from checkpoint-5, one more step
    result = _run(tmp_path, spec)
    assert result["resumed_from"].endswith("checkpoint-5") and result["global_step"] == 6
    again = load_file(out / "adapter-init" / "adapter_model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


# ------------------------------------------------------------------------------ QLoRA


def test_qlora_trains_in_4_bits_and_merges_to_full_precision(tiny_model, tmp_path, seen):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    spec = _spec(tiny_model, out, method={
        "type": "lora", "lora": LORA,
        "quantization": {"bits": 4, "type": "nf4", "doubleQuant": True}})
    spec["output"]["merge"] = True
    result = _run(tmp_path, spec)
    _trained_steps(result)
    q = seen.trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q).__name__ == "Linear4bit" and q.weight.quant_type == "nf4"
    assert q.compute_dtype == torch.float32  # computeDtype auto: the training precision
    assert seen.trainer.model.config.quantization_config.bnb_4bit_use_double_quant

    merged_dir = Path(result["merged_model"])
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    with safe_open(str(merged_dir / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert w.dtype == torch.float32 and w.shape == (64, 64)  # full precision, not packed
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = _ids(merged_dir)
    with torch.no_grad():
        gen = merged.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 8


def test_quantization_settings_map_to_bitsandbytes(tiny_model):
    import torch
    from kubetune.api.v1alpha1 import FineTuneJobSpec
    from kubetune_trainer.model import quantization_config

    def config(quant, **resources):
        spec = FineTuneJobSpec.model_validate(_spec(tiny_model, Path("o"), method={
            "type": "lora", "quantization": quant}, resources={"gpusPerNode": 2, **resources}))
        return quantization_config(spec, torch.float32)

    c = config({"bits": 4, "type": "fp4", "doubleQuant": False, "computeDtype": "bf16"})
    assert c.load_in_4bit and c.bnb_4bit_quant_type == "fp4"
    assert not c.bnb_4bit_use_double_quant and c.bnb_4bit_compute_dtype == torch.bfloat16
    assert c.bnb_4bit_quant_storage == torch.uint8
    # sharded weights (ZeRO-3 / FSDP2): the packed 4-bit weights stored in the compute dtype
    assert config({}, strategy="zero3").bnb_4bit_quant_storage == torch.float32
    assert config({"bits": 8}).load_in_8bit


def test_8_bit_base_with_fp4_is_refused_and_8_bit_trains(tiny_model, tmp_path, seen):
    with pytest.raises(KubetuneError, match="apply to 4 bits only"):
        load_job(write_job(tmp_path / "bad.yaml", _spec(tiny_model, tmp_path / "x", method={
            "type": "lora", "quantization": {"bits": 8, "type": "fp4"}})))
    result = _run(tmp_path, _spec(tiny_model, tmp_path / "out", method={
        "type": "lora", "lora": LORA, "quantization": {"bits": 8}}))
    _trained_steps(result)
    q = seen.trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q).__name__ == "Linear8bitLt"


# ------------------------------------------------------------------------------ optimizers

OPTIMIZER_CASES = {  # spec, method, the optimizer class's module and name
    "adamw_8bit": ({"name": "adamw_8bit"}, "lora", "bitsandbytes.optim.adamw.AdamW"),
    "paged_adamw_8bit": ({"name": "paged_adamw_8bit"}, "lora",
                         "bitsandbytes.optim.adamw.AdamW"),
    "adafactor": ({"name": "adafactor"}, "lora", "transformers.optimization.Adafactor"),
    "galore": ({"name": "galore", "rank": 4, "updateInterval": 2,
                "targetModules": ["self_attn", "mlp"]}, "full", "galore_torch.adamw.AdamW"),
    "galore_layerwise": ({"name": "galore", "rank": 4, "layerwise": True}, "full",
                         "LayerWiseDummyOptimizer"),
    "apollo": ({"name": "apollo", "rank": 4, "updateInterval": 2}, "full", "apollo_torch"),
    "badam": ({"name": "badam", "switchEvery": 2, "switchMode": "ascending"}, "full",
              "badam.block_optim.BlockOptimizer"),
    "lomo": ({"name": "lomo"}, "full", "lomo_optim.lomo.Lomo"),
    "muon": ({"name": "muon"}, "full", "kubetune_trainer.muon.MuonWithAdamW"),
}


@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_optimizer_reaches_the_trainer(case, tiny_model, tmp_path, seen):
    import torch
    from transformers import AutoModelForCausalLM

    opt, method, cls = OPTIMIZER_CASES[case]
    out = tmp_path / "out"
    result = _run(tmp_path, _spec(tiny_model, out, method={"type": method},
                                  training={"optimizer": opt, "learningRate": 1e-3}))
    _trained_steps(result)
    optimizer = seen.during["optimizer"]
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    kind = type(inner)
    assert cls in f"{kind.__module__}.{kind.__name__}"
    if case in ("adamw_8bit", "paged_adamw_8bit"):
        assert inner.args.optim_bits == 8 and inner.is_paged == case.startswith("paged")
    if case == "galore":
        assert seen.trainer.args.optim == "galore_adamw"
        assert seen.trainer.args.optim_target_modules == ["self_attn", "mlp"]
        assert "rank=4" in seen.trainer.args.optim_args
    if method == "full":  # it trained the weights
        base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
        tuned = AutoModelForCausalLM.from_pretrained(result["model"]).state_dict()
        assert any(not torch.equal(base[k], tuned[k]) for k in base)


# ------------------------------------------------------------------------------ spectrum


def test_spectrum_trains_only_the_top_snr_matrices_and_caches_the_scan(
        tiny_model, tmp_path, seen, monkeypatch):
    import torch
    from kubetune_trainer import spectrum
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    spec = _spec(tiny_model, out, method={"type": "freeze", "spectrum": {"topFraction": 0.5}})
    result = _run(tmp_path, spec)
    _trained_steps(result)
    cached = list((tmp_path / "cache" / "spectrum").glob("*.json"))
    assert len(cached) == 1
    snrs = json.loads(cached[0].read_text())["snr"]
    assert set(snrs) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    # two layers, top half: the higher-SNR layer of each of the 7 module types
    chosen = set(spectrum.select(snrs, 0.5))
    assert len(chosen) == 7
    for scores in snrs.values():
        best = max(scores, key=scores.get)
        assert best in chosen
    trainable = {n for n, p in seen.trainer.model.named_parameters() if p.requires_grad}
    assert trainable == chosen
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(result["model"]).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == chosen

    # The second time the scan comes from the cache (no SVD at all) ...
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    monkeypatch.setattr(spectrum, "snr", lambda w: pytest.fail("scanned again"))
    assert spectrum.cached_scan(model, tiny_model, None, log=lambda *_: None) == snrs
    # ... and another revision of the weights is a new key.
    assert spectrum.model_key(tiny_model, None) != spectrum.model_key(tiny_model, "v2")


def test_snr_separates_a_low_rank_signal_from_noise():
    import torch
    from kubetune_trainer.spectrum import snr

    def unit(w):  # Spectrum divides the ratio by the largest singular value: compare alike
        return w / torch.linalg.svdvals(w)[0]

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(128, 96, generator=g)
    signal = noise + 3 * torch.randn(128, 4, generator=g) @ torch.randn(4, 96, generator=g)
    assert snr(unit(signal)) > 2 * snr(unit(noise))


# ------------------------------------------------------------------------------ boosters


def test_boosters_reach_the_trainer(tiny_model, tmp_path, seen):
    """NEFTune's hook is on the embeddings while training, the attention kernel is the one
    asked for, gradient checkpointing is on."""
    out = tmp_path / "out"
    result = _run(tmp_path, _spec(tiny_model, out, training={
        "gradientCheckpointing": True,
        "boosters": {"neftuneAlpha": 5.0, "attention": "eager"}}))
    _trained_steps(result)
    t = seen.trainer
    assert t.args.neftune_noise_alpha == 5.0
    assert "neftune_post_forward_hook" in seen.during["embedding_hooks"]
    assert t.model.config._attn_implementation == "eager"
    assert t.model.is_gradient_checkpointing


def test_attention_auto_is_sdpa_on_cpu(tiny_model, tmp_path):
    from kubetune.api.v1alpha1 import FineTuneJobSpec
    from kubetune_trainer.model import attention, load_model

    spec = FineTuneJobSpec.model_validate(_spec(tiny_model, tmp_path))
    assert attention(spec) == "sdpa"
    assert load_model(tiny_model, spec).config._attn_implementation == "sdpa"


def test_torch_compile_reaches_the_training_arguments(tiny_model, tmp_path):
    """The flag reaches transformers (which compiles the model as it prepares it). Compiling
    for real is tests/gpu's: inductor's first compile of even the tiny model takes minutes
    on 2 CPU cores."""
    from kubetune.api.v1alpha1 import FineTuneJobSpec
    from kubetune_trainer.model import booster_args

    spec = FineTuneJobSpec.model_validate(_spec(tiny_model, tmp_path / "out",
                                                training={"boosters": {"torchCompile": True}}))
    assert booster_args(spec)["torch_compile"] is True


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize(("spec_part", "message"), [
    ({"method": {"type": "lora", "lora": {"init": "loftq"}}}, "loftq needs a CUDA GPU"),
    ({"training": {"boosters": {"liger": True}}}, "liger needs a CUDA GPU"),
    ({"method": {"type": "full"}, "training": {"optimizer": {"name": "adalomo"}}},
     "adalomo needs a CUDA GPU"),
    ({"training": {"gradientCheckpointing": True, "boosters": {"activationOffload": True}}},
     "activation offload needs a CUDA GPU"),
    ({"training": {"boosters": {"attention": "flash_attention_2"}}},
     "flash_attention_2 needs"),
])
def test_gpu_only_options_are_refused_before_the_model_loads(spec_part, message, tiny_model,
                                                              tmp_path):
    spec = _spec(tiny_model, tmp_path / "out", **{k: v for k, v in spec_part.items()
                                                  if k != "training"},
                 training=spec_part.get("training"))
    spec["resources"] = {"gpusPerNode": 1}  # the API allows it; this machine has no GPU
    with pytest.raises(KubetuneError, match=message):
        _run(tmp_path, spec)
    spec["resources"] = {"gpusPerNode": 0}  # and with no GPU asked for, the API refuses it
    with pytest.raises(KubetuneError, match="gpusPerNode > 0"):
        load_job(write_job(tmp_path / "cpu.yaml", spec))


def test_estimate_reads_quantization_and_spectrum():
    from kubetune.estimate import estimate
    from test_estimate import LLAMA2_7B, _spec

    lora = estimate(LLAMA2_7B, _spec(method={"type": "lora"}))
    q4 = estimate(LLAMA2_7B, _spec(method={"type": "lora", "quantization": {"bits": 4}}))
    q8 = estimate(LLAMA2_7B, _spec(method={"type": "lora", "quantization": {"bits": 8}}))
    assert q4.parts["weights"] < q8.parts["weights"] < lora.parts["weights"]
    quarter = estimate(LLAMA2_7B, _spec(method={"type": "freeze",
                                                "spectrum": {"topFraction": 0.25}}))
    full = estimate(LLAMA2_7B, _spec(method={"type": "full"}))
    assert 0.2 * full.trainable < quarter.trainable < 0.26 * full.trainable


@pytest.mark.slow
def test_pissa_and_lora_plus_in_two_processes(tiny_model, tmp_path):
    """Under torchrun (DDP, gloo): rank 0 keeps the initial adapter, LoRA+'s optimizer is
    the one DDP steps, and the converted adapter is written once."""
    import os
    import subprocess
    import sys

    from test_launch import _env

    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", _spec(tiny_model, out, method={
        "type": "lora", "lora": {**LORA, "init": "pissa", "loraPlusLrRatio": 16.0}},
        training={"batchSizePerDevice": 2}))
    env = {**os.environ, **_env(1, 0, 2), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "kubetune-launch"), str(job)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_step"] == 5
    saved = json.loads(Path(result["adapter"], "adapter_config.json").read_text())
    assert saved["r"] == 16 and (out / "adapter-init" / "adapter_model.safetensors").exists()


def test_muon_optimizer_state_survives_a_restart(tiny_model, tmp_path, seen):
    """Muon + AdamW save one state dict and a restarted run loads it back into both."""
    out = tmp_path / "out"
    spec = _spec(tiny_model, out, method={"type": "full"},
                 training={"optimizer": {"name": "muon"}, "maxSteps": 3, "saveSteps": 3,
                           "learningRate": 1e-3})
    _run(tmp_path, spec)
    first = seen.trainer.optimizer.optimizer
    assert first.muon.state and first.adamw.state  # both halves stepped
    spec["training"]["maxSteps"] = 5
    result = _run(tmp_path, spec)
    assert result["resumed_from"].endswith("checkpoint-3") and result["global_step"] == 5
    opt = seen.trainer.optimizer.optimizer
    assert {id(g) for g in opt.param_groups} == {
        id(g) for g in [*opt.muon.param_groups, *opt.adamw.param_groups]}
    muon_params = [p for g in opt.muon.param_groups for p in g["params"]]
    assert all(p.ndim == 2 for p in muon_params) and len(muon_params) == 14  # 7 per layer


def test_checkpoint_size_counts_what_spectrum_and_modules_to_save_train(tiny_model, tmp_path,
                                                                        monkeypatch):
    """The pre-flight's checkpoint size: all weights plus AdamW's two states for the matrices
    Spectrum really trains (not a freeze's share of layers); LoRA's adapter plus a whole copy
    (and its states) of every lora.modulesToSave module, a tied lm_head included."""
    import math

    from kubetune.api.v1alpha1 import FineTuneJobSpec
    from kubetune_trainer.model import checkpoint_bytes, weight_shapes
    from kubetune_trainer.spectrum import apply_spectrum
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "cache"))
    params = sum(math.prod(s) for s in weight_shapes(tiny_model).values())
    tokenizer = sum(f.stat().st_size for f in tiny_model.glob("tokenizer*"))

    def spec(method: dict) -> FineTuneJobSpec:
        return FineTuneJobSpec.model_validate({
            "model": {"source": str(tiny_model)}, "datasets": [{"source": "d.json"}],
            "output": {"uri": "o"}, "method": method, "training": {"precision": "fp32"}})

    sp = spec({"type": "freeze", "spectrum": {"topFraction": 0.5}})
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    apply_spectrum(model, sp, log=lambda *_: None)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert checkpoint_bytes(tiny_model, sp) == params * 4 + trained * 4 * 2 + tokenizer
    assert checkpoint_bytes(tiny_model, spec({"type": "freeze"})) != \
        checkpoint_bytes(tiny_model, sp)

    plain = spec({"type": "lora", "lora": {"rank": 8, "targetModules": ["q_proj", "v_proj"]}})
    saving = spec({"type": "lora", "lora": {"rank": 8, "targetModules": ["q_proj", "v_proj"],
                                            "modulesToSave": ["embed_tokens", "lm_head"]}})
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(
        r=8, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]))
    copies = sum(p.numel() for n, p in peft.named_parameters()
                 if p.requires_grad and "modules_to_save" in n)
    assert copies > 0
    assert checkpoint_bytes(tiny_model, saving) - checkpoint_bytes(tiny_model, plain) == \
        copies * 4 * 3
