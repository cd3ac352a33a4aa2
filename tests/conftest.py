"""Shared fixtures: a tiny random Llama with a locally trained tokenizer, job files, data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Before torch is imported anywhere: tiny models on 2 cores are fastest single-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE = Path(os.environ.get("KUBETUNE_CONFORMANCE", REPO.parent / "shared" / "conformance"))
LF_DATA = CONFORMANCE / "llama-factory-data"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    texts = []
    for name in ("alpaca_en_demo.json", "identity.json"):
        path = LF_DATA / name
        if path.exists():
            for row in json.loads(path.read_text()):
                texts.append(" ".join(str(v) for v in row.values() if isinstance(v, str)))
    texts.append("The quick brown fox jumps over the lazy dog. " * 20)
    return texts


def build_tiny_model(target: Path) -> Path:
    """A 2-layer random Llama (initializer_range 0.1 so LoRA moves the loss) + BPE tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None,
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
        tie_word_embeddings=True, initializer_range=0.1,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(target)
    fast.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def lf_data() -> Path:
    if not (LF_DATA / "dataset_info.json").exists():
        pytest.skip(f"conformance data not found at {LF_DATA} (set KUBETUNE_CONFORMANCE)")
    return LF_DATA


def free_port() -> str:
    """A local TCP port nobody listens on now (for MASTER_PORT: fixed ones collide when
    suites run side by side)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def write_job(path: Path, spec: dict, name: str = "test-job") -> Path:
    import yaml

    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": name}, "spec": spec}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def tiny_spec(model: Path, datasets: list[dict], out: Path, **overrides) -> dict:
    """A spec that trains the tiny model for a few seconds."""
    training = {"maxSteps": 6, "learningRate": 5e-3, "batchSizePerDevice": 4,
                "cutoffLen": 128, "saveSteps": 3, "logSteps": 1, "seed": 1}
    training.update(overrides.pop("training", {}))
    spec = {"model": {"source": str(model)}, "datasets": datasets, "stage": "sft",
            "method": {"type": "lora", "lora": {"rank": 8, "alpha": 16}},
            "training": training, "resources": {"gpusPerNode": 0},
            "output": {"uri": str(out)}}
    spec.update(overrides)
    return spec


def kill_after_checkpoint(cmd: list[str], out: Path, step: int, total: int) -> list[int]:
    """Start a training run, SIGKILL it once checkpoint ``step`` is complete; returns the
    complete checkpoints' steps."""
    import signal
    import subprocess
    import time

    from kubetune_trainer.progress import COMPLETE_MARKER

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / f"checkpoint-{step}" / COMPLETE_MARKER).exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.parent.name.split("-")[1])
                  for p in out.glob("checkpoints/checkpoint-*/" + COMPLETE_MARKER))
    assert done and done[-1] < total, "the run finished before it was killed"
    return done


# Qwen2-72B's published config.json (72.7 B parameters).
QWEN2_72B = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 8192,
             "intermediate_size": 29568, "num_attention_heads": 64, "num_hidden_layers": 80,
             "num_key_value_heads": 8, "vocab_size": 152064, "tie_word_embeddings": False,
             "torch_dtype": "bfloat16"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A real HTTP server answering the Hub's resolve URLs for hf://Qwen/Qwen2-72B's
    config.json (what the operator and `kubetune render` read of an hf:// model)."""
    import functools
    import http.server
    import threading

    from kubetune_operator import admission

    root = tmp_path / "hub"
    (root / "Qwen" / "Qwen2-72B" / "resolve" / "main").mkdir(parents=True)
    (root / "Qwen" / "Qwen2-72B" / "resolve" / "main" / "config.json").write_text(
        json.dumps(QWEN2_72B))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    admission._CONFIGS.clear()
    yield root
    server.shutdown()
    admission._CONFIGS.clear()
