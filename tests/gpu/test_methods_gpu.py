"""Method options that only run on a CUDA GPU (skipped elsewhere, with the reason):
flash-attention 2, Liger kernels, LoftQ initialisation, AdaLomo, TRL's activation offload, and
torch.compile (possible on CPU, but inductor's first compile takes minutes there).

    pytest -m gpu tests/gpu/test_methods_gpu.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import tiny_spec, write_job

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]
IDENTITY = {"source": str(REPO / "examples" / "data" / "identity.json"),
            "placeholders": {"name": "Kubey", "author": "Ops"}}


def _needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"needs the {package} package (trainer image)")


@pytest.fixture
def seen(monkeypatch):
    from kubetune_trainer import model as model_mod

    real, box = model_mod.finish_setup, {}

    def spy(trainer, spec, root, *, main):
        box["trainer"] = trainer
        real(trainer, spec, root, main=main)

    monkeypatch.setattr(model_mod, "finish_setup", spy)
    return box


def _run(tiny_model, tmp_path, **training_or_method):
    from kubetune.jobfile import load_job
    from kubetune_trainer.config import RunContext
    from kubetune_trainer.train import run

    training = {"maxSteps": 5, "saveSteps": 5, **training_or_method.pop("training", {})}
    spec = tiny_spec(tiny_model, [IDENTITY], tmp_path / "out", training=training,
                     **training_or_method)
    spec["resources"] = {"gpusPerNode": 1}
    result = run(load_job(write_job(tmp_path / "job.yaml", spec)), RunContext(
        base_dir=tmp_path), log=print)
    assert result["global_step"] == 5
    return result


@_needs("flash_attn")
def test_flash_attention_2_is_what_auto_picks_and_trains(tiny_model, tmp_path, seen):
    _run(tiny_model, tmp_path, training={"precision": "bf16"})
    assert seen["trainer"].model.config._attn_implementation == "flash_attention_2"


@_needs("liger_kernel")
def test_liger_kernels_patch_the_model(tiny_model, tmp_path, seen):
    _run(tiny_model, tmp_path, training={"boosters": {"liger": True}})
    assert seen["trainer"].args.use_liger_kernel
    norm = seen["trainer"].model.get_base_model().model.norm
    assert "Liger" in type(norm).__name__


def test_loftq_initialises_the_adapter(tiny_model, tmp_path, seen):
    _run(tiny_model, tmp_path, method={"type": "lora", "lora": {"rank": 8, "init": "loftq"}})
    assert seen["trainer"].model.peft_config["default"].init_lora_weights == "loftq"


def test_adalomo_trains_the_full_model(tiny_model, tmp_path, seen):
    _run(tiny_model, tmp_path, method={"type": "full"},
         training={"optimizer": {"name": "adalomo"}})
    assert type(seen["trainer"].optimizer.optimizer).__name__ == "AdaLomo"


def test_activation_offload_trains(tiny_model, tmp_path, seen):
    _run(tiny_model, tmp_path, training={"gradientCheckpointing": True,
                                         "boosters": {"activationOffload": True}})
    assert seen["trainer"].args.activation_offloading


def test_torch_compile_trains(tiny_model, tmp_path, seen):
    """training.boosters.torchCompile: dynamo compiles the model and it trains."""
    import torch._dynamo

    torch._dynamo.utils.counters.clear()
    _run(tiny_model, tmp_path, training={"precision": "bf16",
                                         "boosters": {"torchCompile": True}})
    assert seen["trainer"].args.torch_compile
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
