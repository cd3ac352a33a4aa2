"""Data preparation throughput: kubetune vs TRL's SFTTrainer, same rows, same run.

    make bench            # or: python bench/data_prep.py [--rows 50000] [--workers 2]

Both sides start from the same JSONL file (LLaMA-Factory conformance conversations, cycled to
--rows rows, as OpenAI-style messages) and end with packed, tokenized, loss-masked rows of
--cutoff tokens, using SmolLM2's tokenizer and chat template:

- kubetune: load_examples → chat template + answer spans → tokenize → mask → pack (BFD).
- TRL 1.16: load_dataset("json") → SFTTrainer's own preparation (prompt/completion
  conversational rows: chat template, tokenize, completion mask, BFD packing), timed as the
  trainer's construction on a tiny model so model set-up costs next to nothing.

Each side runs in its own process; peak memory is that process's max RSS (workers included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LF = Path(os.environ.get("KUBETUNE_CONFORMANCE", REPO.parent / "shared" / "conformance")) \
    / "llama-factory-data"


def make_rows(n: int, path: Path) -> None:
    from kubetune.api.v1alpha1 import DatasetSpec
    from kubetune_trainer.config import RunContext
    from kubetune_trainer.data.loading import load_examples

    specs = [DatasetSpec(source=str(LF / "dataset_info.json"),
                         entries=["alpaca_en_demo", "alpaca_zh_demo", "glaive_toolcall_en_demo",
                                  "identity"], placeholders={"name": "K", "author": "A"})]
    examples, _ = load_examples(specs, "sft", RunContext(), max_invalid_fraction=0)
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": examples[i % len(examples)]["messages"]},
                               ensure_ascii=False) + "\n")


def tokenizer_dir() -> Path:
    from kubetune_trainer.config import default_cache_dir
    from kubetune_trainer.embedded import materialize

    return materialize("smollm2-135m-instruct", default_cache_dir())


def side_kubetune(data: Path, cutoff: int, workers: int) -> dict:
    from kubetune.api.v1alpha1 import DatasetSpec
    from kubetune_trainer.config import RunContext
    from kubetune_trainer.data.loading import load_examples
    from kubetune_trainer.data.preprocess import Options, pack, resolve_template, tokenize
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    t0 = time.perf_counter()
    examples, _ = load_examples([DatasetSpec(source=str(data), format="messages")], "sft",
                                RunContext(), max_invalid_fraction=0)
    out = tokenize(examples, tok, resolve_template(tok, "auto"), Options("sft", cutoff),
                   workers=workers)
    rows = pack(out.input_ids, out.labels, cutoff)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows_in": len(examples), "rows_out": len(rows["input_ids"]),
            "tokens": out.stats.tokens, "trained_tokens": out.stats.trained_tokens}


def side_trl(data: Path, cutoff: int, workers: int) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=32))
    with tempfile.TemporaryDirectory() as out_dir:
        t0 = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=str(data), split="train",
                                   cache_dir=out_dir + "/cache")

        def split(row):  # the last assistant turn is the completion
            return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}

        ds = ds.map(split, remove_columns=["messages"], num_proc=workers)
        trainer = SFTTrainer(
            model=model, train_dataset=ds, processing_class=tok,
            args=SFTConfig(output_dir=out_dir, max_length=cutoff, packing=True,
                           packing_strategy="bfd", completion_only_loss=True,
                           dataset_num_proc=workers, report_to="none", bf16=False,
                           activation_checkpointing=False))
        seconds = time.perf_counter() - t0
        prepared = trainer.train_dataset
        tokens = sum(len(x) for x in prepared["input_ids"])
    return {"seconds": seconds, "rows_in": len(ds), "rows_out": len(prepared),
            "tokens": tokens}


def peak_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=50_000)
    p.add_argument("--cutoff", type=int, default=1024)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--side", choices=["kubetune", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.side:
        fn = side_kubetune if args.side == "kubetune" else side_trl
        result = fn(args.data, args.cutoff, args.workers)
        result["peak_mib"] = peak_mib()
        print("RESULT " + json.dumps(result))
        return
    tokenizer_dir()  # convert the bundled model once, outside the timings
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        make_rows(args.rows, data)
        results = {}
        for side in ("kubetune", "trl"):
            proc = subprocess.run(
                [sys.executable, __file__, "--side", side, "--data", str(data),
                 "--cutoff", str(args.cutoff), "--workers", str(args.workers)],
                capture_output=True, text=True, check=True)
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            results[side] = json.loads(line.removeprefix("RESULT "))
    ours, trl = results["kubetune"], results["trl"]
    print(f"data preparation, {args.rows} rows → packed rows of {args.cutoff} tokens, "
          f"{args.workers} worker(s)")
    print(f"{'':10} {'seconds':>8} {'rows/s':>9} {'packed rows':>12} {'tokens':>11} "
          f"{'peak MiB':>9}")
    for name, r in results.items():
        print(f"{name:10} {r['seconds']:8.1f} {r['rows_in'] / r['seconds']:9.0f} "
              f"{r['rows_out']:12d} {r['tokens']:11d} {r['peak_mib']:9.0f}")
    print(f"speed ratio kubetune/TRL: {trl['seconds'] / ours['seconds']:.2f}x "
          f"(>1 means kubetune is faster); memory ratio: "
          f"{ours['peak_mib'] / trl['peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
