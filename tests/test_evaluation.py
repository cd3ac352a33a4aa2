"""After the last step: perplexity, and predict-with-generate scored with ROUGE and BLEU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import LF_DATA, tiny_spec, write_job
from kubetune.jobfile import load_job
from kubetune_trainer.config import RunContext
from kubetune_trainer.evaluation import perplexity, scores
from kubetune_trainer.train import run


def test_scores_are_100_for_the_reference_and_0_for_nothing_in_common():
    same = scores([("The capital of France is Paris.", "The capital of France is Paris.")])
    assert same == {"predict_rouge1": 100.0, "predict_rouge2": 100.0, "predict_rougeL": 100.0,
                    "predict_bleu4": 100.0}
    none = scores([("zebra umbrella", "The capital of France is Paris.")])
    assert none["predict_rouge1"] == 0.0 and none["predict_bleu4"] < 20


def test_chinese_is_segmented_into_words_before_rouge():
    half = scores([("北京是中国的首都", "北京是中国的首都城市")])
    assert 50 < half["predict_rouge1"] < 100  # words shared, not characters dropped
    assert scores([("", "北京")])["predict_rouge1"] == 0.0


def test_perplexity_is_exp_of_the_eval_loss():
    assert perplexity({"eval_loss": 2.0}) == {"eval_perplexity": pytest.approx(math.e ** 2)}
    assert perplexity({"eval_loss": float("nan")}) == {} and perplexity({}) == {}


def test_predict_answers_held_out_prompts_and_scores_them(tiny_model, tmp_path):
    out = tmp_path / "out"
    spec = tiny_spec(tiny_model, [{"source": str(LF_DATA / "identity.json"),
                                   "placeholders": {"name": "Kubey", "author": "Ops"}}], out,
                     training={"maxSteps": 4, "evalSplit": 0.1},
                     evaluation={"predict": True, "maxSamples": 4, "maxNewTokens": 8})
    result = run(load_job(write_job(tmp_path / "j.yaml", spec)), RunContext(base_dir=tmp_path),
                 log=lambda *_: None)
    rows = [json.loads(line) for line in Path(result["predictions"]).read_text().splitlines()]
    assert len(rows) == 4 and all(set(r) == {"prompt", "label", "prediction"} for r in rows)
    assert all(r["prompt"].endswith("<|im_start|>assistant\n") and r["label"] for r in rows)
    metrics = result["metrics"]
    for key in ("predict_rouge1", "predict_rouge2", "predict_rougeL", "predict_bleu4"):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["predict_samples"] == 4.0
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


TINY_TASK = """task: kubetune_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: tiny.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_scores_the_final_model_on_a_local_task(tiny_model, tmp_path):
    """A task defined beside the job (YAML + JSONL, no download), run by lm-evaluation-harness
    on base + adapter; the scores reach result.json and what the status keeps."""
    from kubetune_trainer.outputs import final_metrics

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(TINY_TASK)
    rows = [{"question": "Who are you?", "choices": ["I am Kubey.", "A cat."], "answer": 0},
            {"question": "Who made you?", "choices": ["Ops.", "Nobody."], "answer": 0},
            {"question": "What is 2+2?", "choices": ["3", "4"], "answer": 1}]
    (tasks / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    spec = tiny_spec(tiny_model, [{"source": str(LF_DATA / "identity.json"),
                                   "placeholders": {"name": "Kubey", "author": "Ops"}}], out,
                     training={"maxSteps": 2},
                     evaluation={"lmEval": {"tasks": ["kubetune_tiny"], "include": "tasks",
                                            "batchSize": 2}})
    result = run(load_job(write_job(tmp_path / "j.yaml", spec)), RunContext(base_dir=tmp_path),
                 log=lambda *_: None)
    acc = result["metrics"]["lmeval_kubetune_tiny_acc"]
    assert acc in (0.0, 1 / 3, 2 / 3, 1.0)  # 3 questions
    assert "lmeval_kubetune_tiny_acc_stderr" in result["metrics"]
    assert final_metrics(result["metrics"])["lmeval_kubetune_tiny_acc"] == acc
    full = json.loads((out / "lm_eval_results.json").read_text())
    assert full["results"]["kubetune_tiny"]["acc,none"] == acc


@pytest.mark.slow  # lm-eval indexes its built-in tasks (~20 s)
def test_lm_eval_names_an_unknown_task(tiny_model, tmp_path):
    from kubetune.api.v1alpha1 import LmEvalSpec
    from kubetune.errors import KubetuneError
    from kubetune_trainer.evaluation import lm_eval

    (tmp_path / "tasks").mkdir()
    settings = LmEvalSpec.model_validate({"tasks": ["no_such_task_x"], "include": "tasks"})
    with pytest.raises(KubetuneError) as err:
        lm_eval(settings, {"model": str(tiny_model)}, RunContext(base_dir=tmp_path), tmp_path)
    assert err.value.field == "spec.evaluation.lmEval.tasks"
    assert "no_such_task_x" in err.value.message


def test_eval_datasets_are_held_out_as_given(tiny_model, tmp_path):
    """evalDatasets: eval loss and perplexity on a separate file, none of it trained on,
    evaluated every training.evalSteps steps too."""
    rows = json.loads((LF_DATA / "identity.json").read_text())
    (tmp_path / "train.json").write_text(json.dumps(rows[:-6]))
    (tmp_path / "held.json").write_text(json.dumps(rows[-6:]))
    def ph():
        return {"placeholders": {"name": "Kubey", "author": "Ops"}}
    out = tmp_path / "out"
    spec = tiny_spec(tiny_model, [{"source": "train.json", **ph()}], out,
                     training={"maxSteps": 2, "saveSteps": 2, "evalSteps": 1},
                     evalDatasets=[{"source": "held.json", **ph()}])
    result = run(load_job(write_job(tmp_path / "j.yaml", spec)), RunContext(base_dir=tmp_path),
                 log=lambda *_: None)
    assert result["data"]["eval_rows"] == 6 and result["data"]["rows"] == len(rows) - 6
    assert result["metrics"]["eval_perplexity"] == pytest.approx(
        math.exp(result["metrics"]["eval_loss"]))
    records = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert {r["step"] for r in records if "eval_loss" in r and "event" not in r} == {1, 2}
