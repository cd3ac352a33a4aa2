"""Training speed: kubetune's trainer vs plain TRL SFTTrainer, same model, same rows, same run.

    make bench-train                                  # ~1B Llama-shaped model on a GPU
    python bench/train_speed.py --tiny                # a few-MB model on CPU: proves it runs
    python bench/train_speed.py [--methods lora full] [--steps 30] [--reps 3] [--peak-tflops X]

Both peers train a randomly initialised Llama-shaped model (hidden 2048, 16 layers, 32 heads,
8 KV heads, intermediate 5632, vocab 32000: ~1.1B parameters; ``--tiny``: hidden 128, 2
layers) with LoRA (rank 16, alpha 32, all linear layers) and in full, on the same synthetic
conversations (a JSONL file of OpenAI-style messages, answers of varied length):

- kubetune: a FineTuneJob run through ``kubetune_trainer.train.run``, the trainer image's own
  code path (method table, data preparation, boosters), in its best configuration: packing,
  attention auto (flash-attn where installed on a GPU, else sdpa), Liger kernels when
  installed on a GPU, precision auto.
- TRL: ``SFTTrainer`` with its defaults (no packing, its own precision and attention) on the
  same file, with the same batch size, maximum length, steps and LoRA settings.

Each run is its own process (peak memory is per run); peers are interleaved in every
repetition, rotating who goes first. Throughput counts trained (non-padding) tokens per
second over the steps after ``--warmup``, timed from the trainer's own step callbacks (the
same callback in both peers). MFU = 6·N·tokens/s over the GPU's peak dense bf16 FLOP/s (N:
all parameters of the model; n/a on CPU). Peak memory: torch.cuda.max_memory_allocated on a
GPU, the process's max RSS on CPU. Printed: medians over ``--reps`` and the ratios
kubetune/TRL (tokens/s: > 1 is kubetune faster; memory: < 1 is kubetune leaner).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PEERS = ("kubetune", "trl")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FULL = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 5632, "vocab_size": 32000}
TINY = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 256, "vocab_size": 2048}
LORA = {"rank": 16, "alpha": 32}
# Peak dense bf16 FLOP/s by GPU name (vendor data sheets; SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 125e12, "B200": 2250e12}
WORDS = ["model", "cluster", "node", "training", "adapter", "weight", "token", "batch", "step",
         "loss", "gradient", "optimizer", "schedule", "kernel", "memory", "throughput", "shard",
         "checkpoint", "resume", "dataset", "answer", "question", "runtime", "operator", "pod",
         "volume", "metric"]


# ---------------------------------------------------------------- inputs (made once per run)

def make_model(target: Path, shape: dict, *, bf16: bool) -> int:
    """A random Llama of ``shape`` with a byte-level BPE tokenizer; returns its parameters."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [" ".join(random.Random(i).choices(WORDS, k=64)) for i in range(500)],
        trainers.BpeTrainer(vocab_size=1000, special_tokens=specials,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                         bos_token_id=None)
    model = LlamaForCausalLM(config)
    if bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(target)
    fast.save_pretrained(target)
    return sum(p.numel() for p in model.parameters())


def make_rows(path: Path, n: int, max_words: int) -> None:
    """Conversations with answers from a few words to ``max_words``: uneven lengths, as real
    chat data has (what packing is for)."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            q = " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))
            a = " ".join(rng.choices(WORDS, k=rng.randint(10, max_words)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")


# ---------------------------------------------------------------- one run (its own process)

def _timer(record: list) -> object:
    """The same step clock in both peers: (time, tokens seen) at the end of every step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **_):
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            record.append((time.perf_counter(), int(state.num_input_tokens_seen)))

    return StepClock()


def _kubetune(a: argparse.Namespace, work: Path) -> None:
    import importlib.util

    import torch
    from kubetune.api.v1alpha1 import FineTuneJob
    from kubetune_trainer.config import RunContext
    from kubetune_trainer.train import run

    gpu = torch.cuda.is_available()
    boosters = {"attention": "auto"}
    if gpu and importlib.util.find_spec("liger_kernel"):
        boosters["liger"] = True
    method = {"type": "lora", "lora": LORA} if a.method == "lora" else {"type": "full"}
    job = FineTuneJob.model_validate({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "bench"},
        "spec": {"model": {"source": a.model}, "datasets": [{"source": a.data}],
                 "stage": "sft", "method": method,
                 "resources": {"gpusPerNode": 1 if gpu else 0},
                 "training": {"maxSteps": a.steps, "batchSizePerDevice": a.batch,
                              "cutoffLen": a.cutoff, "packing": True, "logSteps": 1,
                              "saveSteps": 10**9, "learningRate": 1e-4, "boosters": boosters},
                 "output": {"uri": str(work / "out")}}})
    run(job, RunContext(base_dir=work, cache_dir=work / "cache"), log=lambda *_: None)


def _trl(a: argparse.Namespace, work: Path) -> None:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = load_dataset("json", data_files=a.data, split="train")
    args = SFTConfig(output_dir=str(work / "out"), max_steps=a.steps,
                     per_device_train_batch_size=a.batch, max_length=a.cutoff,
                     learning_rate=1e-4, logging_steps=1, report_to="none",
                     include_num_input_tokens_seen="non_padding",
                     # TRL's default bf16 is refused on CPU: fp32 there, like kubetune's auto
                     **({} if torch.cuda.is_available() else {"bf16": False}))
    peft = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                      task_type="CAUSAL_LM") if a.method == "lora" else None
    SFTTrainer(model=a.model, args=args, train_dataset=rows, peft_config=peft).train()


def worker(a: argparse.Namespace) -> None:
    import torch
    import transformers.trainer as hf_trainer

    clock: list = []
    hf_trainer.DEFAULT_CALLBACKS.append(_timer(clock))  # every Trainer built here gets it
    with tempfile.TemporaryDirectory() as tmp:
        (_kubetune if a.worker == "kubetune" else _trl)(a, Path(tmp))
    warm = min(a.warmup, len(clock) - 2)
    (t0, n0), (t1, n1) = clock[warm], clock[-1]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(a.json).write_text(json.dumps({
        "tokens_per_s": (n1 - n0) / (t1 - t0), "steps": len(clock), "timed_steps":
        len(clock) - 1 - warm, "tokens": n1 - n0, "peak_bytes": peak}))


# ---------------------------------------------------------------- the comparison

def peak_flops(override: float | None) -> tuple[float | None, str]:
    import torch

    if not torch.cuda.is_available():
        return None, "cpu"
    name = torch.cuda.get_device_name()
    if override:
        return override * 1e12, name
    for key, flops in PEAK_BF16.items():
        if key in name:
            return flops, name
    return None, name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a few-MB model, short rows (CPU)")
    p.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--steps", type=int, help="optimizer steps per run (30; --tiny 8)")
    p.add_argument("--warmup", type=int, help="steps not timed (5; --tiny 2)")
    p.add_argument("--batch", type=int, help="rows per step (4)", default=4)
    p.add_argument("--cutoff", type=int, help="tokens per row at most (2048; --tiny 256)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s "
                   "when its name is not known here")
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.steps = a.steps or (8 if a.tiny else 30)
    a.warmup = a.warmup if a.warmup is not None else (2 if a.tiny else 5)
    a.cutoff = a.cutoff or (256 if a.tiny else 2048)
    if a.worker:
        return worker(a)

    import torch

    gpu = torch.cuda.is_available()
    flops, device = peak_flops(a.peak_tflops)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.time()
        n_params = make_model(root / "model", TINY if a.tiny else FULL, bf16=gpu)
        make_rows(root / "rows.jsonl", max(400, a.steps * a.batch * 8),
                  max_words=a.cutoff // 2)
        print(f"model: {n_params / 1e6:.1f}M parameters ({time.time() - t0:.0f}s to make); "
              f"device: {device}; {a.steps} steps ({a.warmup} untimed), batch {a.batch}, "
              f"cutoff {a.cutoff}, {a.reps} reps", flush=True)
        runs: dict[tuple[str, str], list[dict]] = {}
        for rep in range(a.reps):
            for i in range(len(PEERS)):
                peer = PEERS[(i + rep) % len(PEERS)]
                for method in a.methods:
                    out = root / f"{peer}-{method}-{rep}.json"
                    cmd = [sys.executable, __file__, "--worker", peer, "--method", method,
                           "--model", str(root / "model"), "--data", str(root / "rows.jsonl"),
                           "--json", str(out), "--steps", str(a.steps), "--warmup",
                           str(a.warmup), "--batch", str(a.batch), "--cutoff", str(a.cutoff)]
                    log = root / f"{peer}-{method}-{rep}.log"
                    with log.open("w") as f:
                        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"}
                                            ).returncode
                    if rc != 0:
                        sys.exit(f"{peer} {method} failed (rc {rc}):\n"
                                 + log.read_text()[-4000:])
                    r = json.loads(out.read_text())
                    runs.setdefault((peer, method), []).append(r)
                    print(f"rep {rep + 1} {peer:8} {method:4}: {r['tokens_per_s']:10.0f} "
                          f"tokens/s  peak {r['peak_bytes'] / 2**30:.2f} GiB "
                          f"({r['timed_steps']} steps timed)", flush=True)
    print()
    print(f"{'method':6} {'peer':9} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9}")
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("tokens_per_s", "peak_bytes")}
           for k, v in runs.items()}
    for method in a.methods:
        for peer in PEERS:
            m = med[(peer, method)]
            mfu = f"{6 * n_params * m['tokens_per_s'] / flops:.1%}" if flops else "n/a"
            print(f"{method:6} {peer:9} {m['tokens_per_s']:10.0f} {mfu:>7} "
                  f"{m['peak_bytes'] / 2**30:9.2f}")
        k, t = med[("kubetune", method)], med[("trl", method)]
        print(f"{method:6} {'ratio':9} {k['tokens_per_s'] / t['tokens_per_s']:9.2f}x "
              f"{'':>7} {k['peak_bytes'] / t['peak_bytes']:8.2f}x   (kubetune / TRL)")


if __name__ == "__main__":
    main()
