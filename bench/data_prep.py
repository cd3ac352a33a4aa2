"""Data preparation throughput: kubetune vs LLaMA-Factory vs TRL, same rows, same run.

    make bench        # builds LLaMA-Factory's venv once, then runs this
    python bench/data_prep.py [--rows 10000 50000] [--workers 1 2] [--packing on off] [--reps 3]

Every peer starts from the same JSONL file (LLaMA-Factory's conformance conversations, cycled
to --rows rows, as OpenAI-style messages) and ends with tokenized, loss-masked rows (packed
into rows of at most --cutoff tokens, or not), using SmolLM2's tokenizer and chat template:

- kubetune: the trainer's own path, ``train.prepare_data`` with an empty cache: read and
  check rows → chat template + answer spans → tokenize → mask every assistant turn →
  pack (best-fit decreasing) → Arrow files in the prepared-data cache. "rerun" is the same
  call again: what a restarted run or another rank pays.
- LLaMA-Factory 0.9.5 (its own virtualenv, template smollm2, ShareGPT layout): ``get_dataset``
  with a fresh datasets cache (masks every assistant turn too; packing is its greedy knapsack).
- TRL 1.16: ``load_dataset("json")`` → SFTTrainer's own preparation (prompt/completion rows:
  only the last assistant turn is trained; BFD packing), timed as the trainer's construction
  on a tiny model so model set-up costs next to nothing.

Each run is its own process; peers are interleaved within every repetition (rotating who goes
first) so load from other processes falls on all of them alike. Peak memory is the process's
max RSS (workers included). Wall and CPU seconds are medians over --reps (CPU: the process
and its workers; steadier than wall time on a shared machine); ratios are peer / kubetune
(> 1: kubetune is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LF = Path(os.environ.get("KUBETUNE_CONFORMANCE", REPO.parent / "shared" / "conformance")) \
    / "llama-factory-data"
LF_VENV = Path(os.environ.get("KUBETUNE_BENCH_LF",
                              Path.home() / ".cache" / "kubetune" / "bench-lf"))
PEERS = ("kubetune", "llamafactory", "trl")


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


def _cpu() -> float:
    """CPU seconds of this process and its finished children (workers): under load from
    other processes, steadier than wall time."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _trained(labels) -> int:
    return sum(sum(1 for x in row if x != -100) for row in labels)


def side_kubetune(a: argparse.Namespace, tmp: Path) -> dict:
    from kubetune.api.v1alpha1 import FineTuneJobSpec
    from kubetune_trainer.config import RunContext
    from kubetune_trainer.recipes import recipe
    from kubetune_trainer.train import prepare_data
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    spec = FineTuneJobSpec.model_validate({
        "model": {"source": str(a.tokenizer)}, "stage": "sft",
        "datasets": [{"source": str(a.data), "format": "messages"}],
        "training": {"cutoffLen": a.cutoff, "packing": a.packing[0] == "on", "evalSplit": 0,
                     "preprocessingWorkers": a.workers[0], "maxInvalidFraction": 0},
        "resources": {"gpusPerNode": 0}, "output": {"uri": str(tmp / "out")}})
    ctx = RunContext(cache_dir=tmp / "cache")
    import datasets  # noqa: F401 - imported before the clock starts, as the peers' are
    t0, c0 = time.perf_counter(), _cpu()
    data = prepare_data(spec, ctx, tok, recipe("sft"), log=lambda *_: None)
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    t0 = time.perf_counter()
    again = prepare_data(spec, ctx, tok, recipe("sft"), log=lambda *_: None)
    rerun = time.perf_counter() - t0
    assert again.stats["cached"] and len(again.train) == len(data.train)
    return {"seconds": seconds, "cpu": cpu, "rerun": rerun, "rows_out": len(data.train),
            "tokens": data.stats["tokens"], "trained": data.stats["trained_tokens"]}


def side_llamafactory(a: argparse.Namespace, tmp: Path) -> dict:
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf")  # nothing cached from an earlier run
    info = {"rows": {"file_name": str(a.data), "formatting": "sharegpt",
                     "columns": {"messages": "messages"},
                     "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                              "assistant_tag": "assistant", "observation_tag": "tool",
                              "system_tag": "system"}}}
    (tmp / "dataset_info.json").write_text(json.dumps(info))
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args(dict(
        model_name_or_path=str(a.tokenizer), stage="sft", do_train=True,
        finetuning_type="lora", dataset="rows", dataset_dir=str(tmp), template="smollm2",
        cutoff_len=a.cutoff, packing=a.packing[0] == "on", overwrite_cache=True,
        preprocessing_num_workers=a.workers[0] if a.workers[0] > 1 else None,
        output_dir=str(tmp / "out"), report_to="none"))
    tm = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tm["tokenizer"], data_args)
    t0, c0 = time.perf_counter(), _cpu()
    dm = get_dataset(template, model_args, data_args, training_args, stage="sft", **tm)
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    ds = dm["train_dataset"]
    return {"seconds": seconds, "cpu": cpu, "rows_out": len(ds),
            "tokens": sum(len(x) for x in ds["input_ids"]), "trained": _trained(ds["labels"])}


def side_trl(a: argparse.Namespace, tmp: Path) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=32))
    workers = a.workers[0]
    t0, c0 = time.perf_counter(), _cpu()
    ds = datasets.load_dataset("json", data_files=str(a.data), split="train",
                               cache_dir=str(tmp / "cache"))

    def split(row):  # the last assistant turn is the completion
        return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}

    ds = ds.map(split, remove_columns=["messages"], num_proc=workers if workers > 1 else None)
    trainer = SFTTrainer(
        model=model, train_dataset=ds, processing_class=tok,
        args=SFTConfig(output_dir=str(tmp / "out"), max_length=a.cutoff,
                       packing=a.packing[0] == "on", packing_strategy="bfd",
                       completion_only_loss=True, dataset_num_proc=workers if workers > 1
                       else None, report_to="none", bf16=False, use_cpu=True,
                       activation_checkpointing=False))
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    prepared = trainer.train_dataset
    trained = _trained(prepared["labels"]) if "labels" in prepared.column_names else None
    return {"seconds": seconds, "cpu": cpu, "rows_out": len(prepared),
            "tokens": sum(len(x) for x in prepared["input_ids"]), "trained": trained}


def peak_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def run_side(peer: str, data: Path, rows: int, workers: int, packing: str,
             a: argparse.Namespace) -> dict:
    python = str(LF_VENV / "bin" / "python") if peer == "llamafactory" else sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if peer == "llamafactory":  # its own packages only, plus a torchaudio stub it imports
        env["PYTHONPATH"] = str(LF_VENV / "stub")
    proc = subprocess.run(
        [python, __file__, "--side", peer, "--data", str(data), "--tokenizer", str(a.tokenizer),
         "--cutoff", str(a.cutoff), "--workers", str(workers), "--packing", packing],
        capture_output=True, text=True, env=env, cwd=REPO)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{peer} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def _span(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:6.1f} ({min(values):.1f}–{max(values):.1f})"


def report(rows: int, workers: int, packing: str, results: dict[str, list[dict]]) -> str:
    lines = [f"\n{rows} rows, {workers} worker(s), packing {packing}:",
             f"  {'peer':13} {'wall s, median (min–max)':>26} {'CPU s, median':>14} "
             f"{'peak MiB':>9} {'rows out':>9} {'tokens':>10} {'trained':>9}  "
             "peer/kubetune (wall, CPU)"]
    ours = {k: statistics.median(r[k] for r in results["kubetune"]) for k in ("seconds", "cpu")}
    for peer, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("seconds", "cpu")}
        last = rs[-1]
        ratio = "" if peer == "kubetune" else \
            f"  {med['seconds'] / ours['seconds']:.2f}x, {med['cpu'] / ours['cpu']:.2f}x"
        lines.append(f"  {peer:13} {_span([r['seconds'] for r in rs]):>26} {med['cpu']:14.1f} "
                     f"{statistics.median(r['peak_mib'] for r in rs):9.0f} "
                     f"{last['rows_out']:9d} {last['tokens']:10d} "
                     f"{last['trained'] if last['trained'] is not None else '-':>9}{ratio}")
        if peer == "kubetune":
            lines.append(f"  {'  rerun':13} {_span([r['rerun'] for r in rs]):>26}"
                         "   (from the cache: a restart or another rank)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 50_000])
    p.add_argument("--cutoff", type=int, default=1024)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--packing", nargs="+", choices=["on", "off"], default=["on", "off"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    p.add_argument("--json", type=Path, help="also write every measurement here")
    p.add_argument("--side", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        with tempfile.TemporaryDirectory() as tmp:
            result = globals()[f"side_{a.side}"](a, Path(tmp))
        result["peak_mib"] = peak_mib()
        print("RESULT " + json.dumps(result))
        return
    a.packing = [x for x in ("on", "off") if x in a.packing]
    if "llamafactory" in a.peers and not (LF_VENV / "bin" / "python").exists():
        print(f"LLaMA-Factory venv not found at {LF_VENV} (make bench builds it): skipped")
        a.peers.remove("llamafactory")
    a.tokenizer = tokenizer_dir()  # convert the bundled model once, outside the timings
    everything = []
    print(f"data preparation, cutoff {a.cutoff}, medians of {a.reps} interleaved runs")
    for rows in a.rows:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "rows.jsonl"
            make_rows(rows, data)
            results: dict[tuple, dict[str, list[dict]]] = {}
            for rep in range(a.reps):
                for workers in a.workers:
                    for packing in a.packing:
                        k = rep % len(a.peers)
                        for peer in a.peers[k:] + a.peers[:k]:
                            r = run_side(peer, data, rows, workers, packing, a)
                            results.setdefault((workers, packing), {p: [] for p in a.peers}
                                               )[peer].append(r)
                            everything.append({"rows": rows, "workers": workers,
                                               "packing": packing, "peer": peer, **r})
            for (workers, packing), res in results.items():
                print(report(rows, workers, packing, res), flush=True)
    if a.json:
        a.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
