"""The preference stages (rm, dpo, kto, orpo, cpo/simpo): real steps on the tiny model, the
data formats they read, their metrics in progress.jsonl and result.json, and resume."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kill_after_checkpoint, tiny_spec, write_job
from kubetune.api.stages import IMPLEMENTED_STAGES, STAGES
from kubetune.errors import KubetuneError
from kubetune.jobfile import load_job
from kubetune_trainer.config import RunContext
from kubetune_trainer.progress import read_progress
from kubetune_trainer.train import run


def easy_pairs(n: int = 64) -> list[dict]:
    """A preference anyone can learn: answer the sum, never shrug."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.",
                     "rejected": "I do not know, sorry. Ask someone else about that."})
    return rows


@pytest.fixture
def easy(tmp_path) -> Path:
    path = tmp_path / "easy.json"
    path.write_text(json.dumps(easy_pairs()))
    return path


def _run(tmp_path: Path, spec: dict, name: str = "job") -> dict:
    job = load_job(write_job(tmp_path / f"{name}.yaml", spec, name=name))
    return run(job, RunContext(base_dir=tmp_path), log=lambda *_: None)


def _records(out: Path) -> list[dict]:
    return [r for r in read_progress(out / "progress.jsonl") if "event" not in r and "loss" in r]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _metric(records: list[dict], key: str) -> list[float]:
    return [r["metrics"][key] for r in records if key in r.get("metrics", {})]


# stage -> (extra spec, the progress metric that must rise, or None: the loss must fall)
STAGE_CASES = {
    "dpo": ({}, "rewards/margins"),
    "kto": ({}, None),
    "rm": ({}, "margin"),
    "orpo": ({}, "rewards/margins"),
    "cpo": ({"preference": {"lossType": ["simpo"], "cpoAlpha": 0.0}}, "rewards/margins"),
}


def test_every_implemented_stage_has_a_recipe_and_a_case_here():
    from kubetune_trainer.recipes import recipe

    for stage in IMPLEMENTED_STAGES:
        module = recipe(stage)
        assert module.HEAD in ("causal", "reward") and callable(module.build)
    # pt/sft: test_train.py; grpo: test_grpo.py
    assert set(STAGE_CASES) == {s for s in IMPLEMENTED_STAGES
                                if STAGES[s].rows in ("pairs", "unpaired")}


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("stage", list(STAGE_CASES))
def test_stage_trains_and_moves_its_metric(stage, method, easy, tiny_model, tmp_path):
    extra, rising = STAGE_CASES[stage]
    out = tmp_path / "out"
    spec = tiny_spec(tiny_model, [{"source": str(easy)}], out, stage=stage,
                     method={"type": method}, **extra,
                     training={"maxSteps": 12, "saveSteps": 5, "cutoffLen": 64,
                               "learningRate": 5e-3 if method == "lora" else 1e-3,
                               "evalSplit": 0.25, "evalSteps": 12})
    result = _run(tmp_path, spec)
    records = _records(out)
    assert result["global_step"] == 12 and len(records) >= 12
    # by step, not as strings (10, 12, 5)
    assert [int(p.rsplit("-", 1)[1]) for p in result["checkpoints"]] == [5, 10, 12]
    if rising:
        values = _metric(records, rising)
        assert len(values) >= 10, records[-1]
        assert _mean(values[-3:]) > _mean(values[:3]), values
    losses = [r["loss"] for r in records]
    assert _mean(losses[-3:]) < _mean(losses[:3]), losses
    metrics = result["metrics"]
    key = "eval_accuracy" if stage == "rm" else "eval_rewards/accuracies"
    if stage != "kto":  # kto logs no accuracy; its eval margin is in eval_rewards/margins
        assert metrics[key] >= 0.75, metrics
    produced = result["adapter"] if method == "lora" else result["model"]
    assert Path(produced, "tokenizer.json").exists()
    if stage == "rm" and method == "full":
        config = json.loads(Path(produced, "config.json").read_text())
        assert config["architectures"] == ["LlamaForSequenceClassification"]
        assert config["num_labels"] == 1 if "num_labels" in config else \
            len(config["id2label"]) == 1


def test_dpo_loss_family_and_weights_reach_the_trainer(easy, tiny_model, tmp_path):
    """[sigmoid, sft] with weights: the SFT term makes the loss differ from plain sigmoid."""
    losses = {}
    for name, pref in {"plain": {}, "rpo": {"lossType": ["sigmoid", "sft"],
                                            "lossWeights": [1.0, 1.0], "beta": 0.1}}.items():
        out = tmp_path / name
        _run(tmp_path, tiny_spec(tiny_model, [{"source": str(easy)}], out, stage="dpo",
                                 preference=pref, training={"maxSteps": 2, "saveSteps": 2,
                                                            "cutoffLen": 64}), name=name)
        losses[name] = _records(out)[0]["loss"]
    assert losses["plain"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference
    assert losses["rpo"] > losses["plain"] + 1.0  # plus the NLL of the chosen answers


def test_experimental_trainers_keep_the_fields_we_set():
    """ORPO and CPO live in trl.experimental: an upgrade that renames what we pass fails here."""
    import dataclasses
    import inspect

    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig

    orpo = {f.name for f in dataclasses.fields(ORPOConfig)}
    cpo = {f.name: f for f in dataclasses.fields(CPOConfig)}
    assert {"beta", "max_length"} <= orpo
    assert {"beta", "max_length", "loss_type", "cpo_alpha", "simpo_gamma",
            "label_smoothing"} <= set(cpo)
    assert '"simpo"' in inspect.getsource(CPOTrainer)


# ---------------------------------------------------------------------------- data formats

FORMATS = {
    "trl-explicit-text": ("dpo", [{"prompt": "What is 2 plus 2?", "chosen": "4.",
                                   "rejected": "No idea."}] * 8),
    "trl-explicit-conversational": ("dpo", [{
        "prompt": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "What is 2 plus 2?"}],
        "chosen": [{"role": "assistant", "content": "4."}],
        "rejected": [{"role": "assistant", "content": "No idea."}]}] * 8),
    "trl-implicit": ("dpo", [{
        "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "user", "content": "Hi?"},
                     {"role": "assistant", "content": "Go away."}]}] * 8),
    "trl-unpaired": ("kto", [{"prompt": "What is 2 plus 2?", "completion": "4.", "label": True},
                             {"prompt": "What is 2 plus 3?", "completion": "7.",
                              "label": False}] * 4),
    "openai-preference": ("dpo", [{
        "input": {"messages": [{"role": "user", "content": "Hello, how is the weather?"}],
                  "tools": [], "parallel_tool_calls": True},
        "preferred_output": [{"role": "assistant", "content": "Sunny, 21 degrees."}],
        "non_preferred_output": [{"role": "assistant", "content": "Weather is weather."}]}] * 8),
    "paired-for-kto": ("kto", [{"prompt": "What is 2 plus 2?", "chosen": "4.",
                                "rejected": "No idea."}] * 4),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_format_loads_and_trains_two_steps(name, tiny_model, tmp_path):
    stage, rows = FORMATS[name]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = tiny_spec(tiny_model, [{"source": str(data)}], tmp_path / "out", stage=stage,
                     training={"maxSteps": 2, "saveSteps": 2, "cutoffLen": 96,
                               "maxInvalidFraction": 0.0, "batchSizePerDevice": 2})
    result = _run(tmp_path, spec)
    assert result["global_step"] == 2 and result["data"]["bad_rows"] == 0
    expected = len(rows) * (2 if name == "paired-for-kto" else 1)
    assert result["data"]["examples"] == expected


def test_preference_rows_render_with_the_template_and_end_on_eos(tiny_model):
    from kubetune_trainer.data.preference import TextPairs
    from kubetune_trainer.data.templates import resolve_template
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    pairs = TextPairs(tok, resolve_template(tok, "auto"))
    row = pairs.pair({"messages": [{"role": "system", "content": "S"},
                                   {"role": "user", "content": "Q"}],
                      "tools": None, "chosen": "Yes.", "rejected": "No."})
    assert row["prompt"] == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
                             "<|im_start|>assistant\n")
    # TRL appends EOS to an answer that does not end with it: ours do, so it adds nothing.
    assert row["chosen"] == "Yes.<|im_end|>" and row["rejected"] == "No.<|im_end|>"


# ---------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_dpo_killed_mid_run_resumes_at_the_same_step(easy, tiny_model, tmp_path):
    out = tmp_path / "out"
    spec = tiny_spec(tiny_model, [{"source": str(easy)}], out, stage="dpo",
                     training={"maxSteps": 120, "saveSteps": 10, "cutoffLen": 64,
                               "batchSizePerDevice": 2, "learningRate": 1e-3})
    cmd = [sys.executable, "-m", "kubetune_trainer.train",
           str(write_job(tmp_path / "job.yaml", spec))]
    done = kill_after_checkpoint(cmd, out, 20, 120)
    subprocess.run(cmd, check=True, capture_output=True)
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"].endswith(f"checkpoint-{done[-1]}")
    assert result["global_step"] == 120
    records = read_progress(out / "progress.jsonl")
    assert [r["step"] for r in records if r.get("event") == "resumed"] == [done[-1]]
    steps = [r["step"] for r in records if "event" not in r and "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 120  # continued, nothing logged twice
    assert steps[steps.index(done[-1]) + 1] == done[-1] + 1


def test_a_pipeline_sft_then_dpo_from_its_merged_model_runs_locally(easy, tiny_model, tmp_path):
    """spec.model.fromJob, with `kubetune run`: the dpo job starts from the sft job's merged
    model, found through the sft job file beside it."""
    sft = tiny_spec(tiny_model, [{"source": str(tmp_path / "chat.json")}],
                    tmp_path / "out-sft", training={"maxSteps": 2, "saveSteps": 2,
                                                    "cutoffLen": 64})
    (tmp_path / "chat.json").write_text(json.dumps([
        {"instruction": r["prompt"], "output": r["chosen"]} for r in easy_pairs(16)]))
    sft["output"]["merge"] = True
    dpo = tiny_spec(tiny_model, [{"source": str(easy)}], tmp_path / "out-dpo", stage="dpo",
                    training={"maxSteps": 2, "saveSteps": 2, "cutoffLen": 64})
    dpo["model"] = {"fromJob": "sft"}
    write_job(tmp_path / "dpo.yaml", dpo, name="dpo")
    with pytest.raises(KubetuneError, match=r"spec.model.fromJob: 'sft' \(sft.yaml\) has not "
                                            r"finished here"):
        write_job(tmp_path / "sft.yaml", sft, name="sft")
        run(load_job(tmp_path / "dpo.yaml"), RunContext(base_dir=tmp_path), log=lambda *_: None)
    run(load_job(tmp_path / "sft.yaml"), RunContext(base_dir=tmp_path), log=lambda *_: None)
    result = run(load_job(tmp_path / "dpo.yaml"), RunContext(base_dir=tmp_path),
                 log=lambda *_: None)
    assert result["global_step"] == 2 and result["base_model"] == "fromJob sft"
    adapter = json.loads(Path(result["adapter"], "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "out-sft" / "merged")


def test_dpo_full_with_reference_log_probs_computed_once(easy, tiny_model, tmp_path):
    """precomputeRefLogProbs: the reference is scored before training (no copy kept);
    at step 1 policy == reference, so the sigmoid loss is log 2."""
    out = tmp_path / "out"
    result = _run(tmp_path, tiny_spec(tiny_model, [{"source": str(easy)}], out, stage="dpo",
                                      method={"type": "full"},
                                      preference={"precomputeRefLogProbs": True},
                                      training={"maxSteps": 3, "saveSteps": 3, "cutoffLen": 64,
                                                "learningRate": 1e-3}))
    losses = [r["loss"] for r in _records(out)]
    assert result["global_step"] == 3
    assert losses[0] == pytest.approx(0.6931, abs=1e-3) and losses[-1] < losses[0]
