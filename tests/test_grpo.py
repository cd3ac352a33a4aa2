"""grpo on the tiny model, CPU: prompts, rewards declared in the spec (two built-ins and a
Python entry point from a directory), a format reward that rises, per-reward metrics, and a
failing reward that names itself and the row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LF_DATA, tiny_spec, write_job
from kubetune.api.v1alpha1 import DatasetSpec
from kubetune.errors import KubetuneError
from kubetune.jobfile import load_job
from kubetune_trainer.config import RunContext
from kubetune_trainer.data.loading import load_examples
from kubetune_trainer.progress import read_progress
from kubetune_trainer.train import run

REWARDS_PY = '''
def low_ids(prompts, completions, completion_ids, **kw):
    return [sum(i < 300 for i in ids) / max(1, len(ids)) for ids in completion_ids]


def picky(prompts, completions, answer, **kw):
    return [1.0 / (len(c) - len(c)) if int(a) % 4 == 0 else 0.0
            for c, a in zip(completions, answer)]
'''


@pytest.fixture
def prompts(tmp_path) -> Path:
    rows = [{"prompt": f"What is {a} plus {a}?", "answer": str(2 * a)} for a in range(1, 33)]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "myrewards.py").write_text(REWARDS_PY)
    return path


def _spec(tiny_model, prompts: Path, out: Path, rewards: list[dict], **training) -> dict:
    return tiny_spec(tiny_model, [{"source": str(prompts)}], out, stage="grpo",
                     method={"type": "full"}, rewards=rewards,
                     grpo={"numGenerations": 8, "maxCompletionLen": 16},
                     training={"maxSteps": 20, "saveSteps": 20, "batchSizePerDevice": 16,
                               "learningRate": 1e-2, "cutoffLen": 64, **training})


def _run(tmp_path: Path, spec: dict) -> dict:
    return run(load_job(write_job(tmp_path / "job.yaml", spec)), RunContext(base_dir=tmp_path),
               log=lambda *_: None)


def test_grpo_learns_a_format_reward_with_builtin_and_python_rewards(tiny_model, prompts,
                                                                     tmp_path):
    out = tmp_path / "out"
    rewards = [{"type": "regex", "pattern": "[0-9]", "name": "digit"},
               {"type": "exactMatch", "column": "answer"},
               {"type": "python", "function": "myrewards:low_ids", "path": "rewards",
                "name": "low", "weight": 0.5}]
    result = _run(tmp_path, _spec(tiny_model, prompts, out, rewards))
    assert result["global_step"] == 20
    records = [r for r in read_progress(out / "progress.jsonl") if "event" not in r
               and "loss" in r]
    digit = [r["metrics"]["rewards/digit/mean"] for r in records]
    assert sum(digit[-5:]) / 5 > sum(digit[:5]) / 5 + 0.2, digit  # learnt to write a digit
    last = records[-1]["metrics"]
    for key in ("rewards/exactMatch1/mean", "rewards/low/mean", "rewards/low/std", "reward",
                "completions/mean_length", "completions/clipped_ratio"):
        assert key in last, sorted(last)
    assert Path(result["model"], "model.safetensors").exists()


def test_a_failing_reward_names_itself_and_the_row(tiny_model, prompts, tmp_path):
    rewards = [{"type": "python", "function": "myrewards:picky", "path": "rewards",
                "name": "picky"}]
    spec = _spec(tiny_model, prompts, tmp_path / "out", rewards, maxSteps=4)
    with pytest.raises(KubetuneError, match=r"spec.rewards: reward picky raised "
                                            r"ZeroDivisionError: .* on row \d+ \(prompt "):
        _run(tmp_path, spec)


def test_grpo_with_lora_runs(tiny_model, prompts, tmp_path):
    spec = _spec(tiny_model, prompts, tmp_path / "out",
                 [{"type": "length", "target": 8}], maxSteps=2)
    spec["method"] = {"type": "lora"}
    assert _run(tmp_path, spec)["global_step"] == 2


def test_llama_factory_entries_read_as_prompts_with_their_answer(lf_data):
    ds = DatasetSpec(source=str(LF_DATA / "dataset_info.json"), entries=["alpaca_en_demo"],
                     max_samples=5)
    examples, report = load_examples([ds], "grpo", RunContext(), max_invalid_fraction=0.0)
    assert report.bad == 0 and len(examples) == 5
    for ex in examples:
        assert ex["messages"][-1]["role"] == "user"
        assert ex["columns"]["answer"].strip()  # the alpaca output, for an exactMatch reward


def test_a_reward_model_scores_the_completions(tiny_model, prompts, tmp_path):
    """rewardModel: a one-score model directory (what an rm job writes under model/)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(
        rm_dir)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(rm_dir)
    out = tmp_path / "out"
    spec = _spec(tiny_model, prompts, out, [{"type": "rewardModel", "source": "rm"}],
                 maxSteps=2)
    assert _run(tmp_path, spec)["global_step"] == 2
    last = [r for r in read_progress(out / "progress.jsonl") if "metrics" in r][-1]["metrics"]
    assert last["rewards/rm/std"] > 0  # the model's scores differ between completions


def test_the_reward_model_of_an_rm_job_beside_it(tiny_model, prompts, tmp_path):
    """rewards[].fromJob with `kubetune run`: an rm job's model scores the completions."""
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"prompt": f"Q{i}", "chosen": "Yes.", "rejected": "No."}
                                 for i in range(8)]))
    rm = tiny_spec(tiny_model, [{"source": str(pairs)}], tmp_path / "out-rm", stage="rm",
                   method={"type": "full"}, training={"maxSteps": 2, "saveSteps": 2,
                                                      "cutoffLen": 64})
    write_job(tmp_path / "rm.yaml", rm, name="rm")
    run(load_job(tmp_path / "rm.yaml"), RunContext(base_dir=tmp_path), log=lambda *_: None)
    out = tmp_path / "out"
    spec = _spec(tiny_model, prompts, out, [{"type": "rewardModel", "fromJob": "rm"}],
                 maxSteps=2)
    assert _run(tmp_path, spec)["global_step"] == 2
    last = [r for r in read_progress(out / "progress.jsonl") if "metrics" in r][-1]["metrics"]
    assert "rewards/model/mean" in last  # scored by out-rm/model


def test_builtin_rewards_take_the_documented_defaults():
    """normalize and tolerance left out: normalised matching, 1e-6 tolerance."""
    from kubetune.api.v1alpha1 import RewardSpec
    from kubetune_trainer.recipes.grpo import BUILTINS

    exact = BUILTINS["exactMatch"](RewardSpec(type="exactMatch", column="answer"))
    assert exact(completions=["  PARIS. "], answer=["Paris"]) == [1.0]
    numeric = BUILTINS["numeric"](RewardSpec(type="numeric", column="answer"))
    assert numeric(completions=["it is 42.0000000001", "41.9"], answer=["42", "42"]) == [1.0,
                                                                                       0.0]
