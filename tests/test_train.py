"""Real training steps on the tiny model: SFT/PT with lora, full and freeze; resume; merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LF_DATA, kill_after_checkpoint, tiny_spec, write_job
from kubetune.errors import KubetuneError
from kubetune.jobfile import load_job
from kubetune_trainer.config import RunContext
from kubetune_trainer.progress import COMPLETE_MARKER, read_progress
from kubetune_trainer.train import run

IDENTITY = {"source": str(LF_DATA / "identity.json"),
            "placeholders": {"name": "Kubey", "author": "Ops"}}


def _run(tmp_path: Path, spec: dict, name="job"):
    job = load_job(write_job(tmp_path / f"{name}.yaml", spec, name=name))
    return run(job, RunContext(base_dir=tmp_path), log=lambda *_: None)


def _steps(out: Path) -> list[dict]:
    """The per-step progress records (not the checkpoint/resume events)."""
    return [r for r in read_progress(out / "progress.jsonl") if "loss" in r and "event" not in r]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _steps(out)]


@pytest.fixture
def needs_lf(lf_data):
    return lf_data


@pytest.mark.usefixtures("needs_lf")
def test_lora_sft_lowers_the_loss_and_writes_everything(tiny_model, tmp_path):
    out = tmp_path / "out"
    result = _run(tmp_path, tiny_spec(tiny_model, [IDENTITY], out,
                                      training={"maxSteps": 30, "saveSteps": 10,
                                                "learningRate": 2e-2}))
    losses = _losses(out)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses  # nats
    assert result["global_step"] == 30
    assert Path(result["adapter"], "adapter_config.json").exists()
    assert "merged_model" not in result  # merge not asked for
    assert json.loads((out / "result.json").read_text())["adapter"] == result["adapter"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpts = sorted(out.glob("checkpoints/checkpoint-*/" + COMPLETE_MARKER))
    assert [p.parent.name for p in ckpts] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    record = _steps(out)[-1]
    assert record["step"] == 30 and record["total_steps"] == 30 and record["percent"] == 100.0
    for key in ("eta_seconds", "learning_rate", "tokens_per_second", "epoch"):
        assert record[key] is not None, key


@pytest.mark.usefixtures("needs_lf")
def test_merged_model_generates_like_base_plus_adapter(tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    spec = tiny_spec(tiny_model, [IDENTITY], out, training={"maxSteps": 8})
    spec["output"]["merge"] = True
    result = _run(tmp_path, spec)
    tok = AutoTokenizer.from_pretrained(result["merged_model"])
    merged = AutoModelForCausalLM.from_pretrained(result["merged_model"]).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with_adapter = PeftModel.from_pretrained(base, result["adapter"]).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "Who are you?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        a = merged(**ids).logits
        b = with_adapter(**ids).logits
        assert torch.allclose(a, b, atol=1e-4)
        gen_a = merged.generate(**ids, max_new_tokens=12, do_sample=False)
        gen_b = with_adapter.generate(**ids, max_new_tokens=12, do_sample=False)
    assert gen_a.tolist() == gen_b.tolist()
    # And training changed something: the merged model is not the base model.
    pristine = AutoModelForCausalLM.from_pretrained(tiny_model).eval()  # peft patched `base`
    with torch.no_grad():
        assert not torch.allclose(a, pristine(**ids).logits, atol=1e-4)


@pytest.mark.usefixtures("needs_lf")
def test_freeze_trains_only_the_last_layer(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    spec = tiny_spec(tiny_model, [IDENTITY], out, training={"maxSteps": 4},
                     method={"type": "freeze", "freeze": {"trainableLayers": 1}})
    result = _run(tmp_path, spec)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(result["model"]).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed), changed


@pytest.mark.usefixtures("needs_lf")
def test_full_fine_tune_saves_a_whole_model(tiny_model, tmp_path):
    out = tmp_path / "out"
    result = _run(tmp_path, tiny_spec(tiny_model, [IDENTITY], out, training={"maxSteps": 3},
                                      method={"type": "full"}))
    assert Path(result["model"], "model.safetensors").exists()
    assert Path(result["model"], "tokenizer.json").exists()


def test_pretraining_on_plain_text_with_packing(tiny_model, tmp_path, lf_data):
    out = tmp_path / "out"
    spec = tiny_spec(tiny_model, [{"source": str(lf_data / "dataset_info.json"),
                                   "entries": ["wiki_demo"]}], out, stage="pt",
                     training={"maxSteps": 20, "packing": True, "cutoffLen": 64})
    result = _run(tmp_path, spec)
    losses = _losses(out)
    assert result["data"]["sequences"] > 100  # long articles became many blocks
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses


def test_unimplemented_stage_is_refused_before_anything_loads(tiny_model, tmp_path):
    spec = tiny_spec(tiny_model, [{"source": "nothing.json"}], tmp_path / "out", stage="ppo")
    with pytest.raises(KubetuneError, match="^spec.stage: ppo is not available in this version"):
        _run(tmp_path, spec)


def test_missing_model_is_a_clear_error(tmp_path, lf_data):
    spec = tiny_spec(tmp_path / "no-model", [IDENTITY], tmp_path / "out")
    with pytest.raises(KubetuneError, match="spec.model.source: no model at"):
        _run(tmp_path, spec)


def test_eval_split_reports_eval_loss(tiny_model, tmp_path, lf_data):
    out = tmp_path / "out"
    result = _run(tmp_path, tiny_spec(tiny_model, [IDENTITY], out, training={
        "maxSteps": 4, "evalSplit": 0.2, "evalSteps": 2}))
    assert "eval_loss" in result["metrics"]
    assert any("eval_loss" in r for r in read_progress(out / "progress.jsonl"))


def test_killed_run_resumes_from_the_last_complete_checkpoint(tiny_model, tmp_path, lf_data):
    """SIGKILL mid-run, restart: same steps, same learning rate and losses as a clean run."""
    training = {"maxSteps": 160, "saveSteps": 20, "batchSizePerDevice": 2, "cutoffLen": 64,
                "logSteps": 1, "learningRate": 2e-3}
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    _run(tmp_path, tiny_spec(tiny_model, [IDENTITY], ref_out, training=training), name="ref")
    reference = {r["step"]: r for r in _steps(ref_out)}

    job = write_job(tmp_path / "job.yaml", tiny_spec(tiny_model, [IDENTITY], out,
                                                     training=training))
    cmd = [sys.executable, "-m", "kubetune_trainer.train", str(job)]
    done = kill_after_checkpoint(cmd, out, 40, 160)
    # What a crash during a save leaves: a newer checkpoint directory without its marker.
    (out / "checkpoints" / "checkpoint-9999").mkdir()

    subprocess.run(cmd, check=True, capture_output=True)
    result = json.loads((out / "result.json").read_text())
    resumed_at = done[-1]
    assert result["resumed_from"].endswith(f"checkpoint-{resumed_at}")
    assert result["global_step"] == 160
    records = read_progress(out / "progress.jsonl")
    resumed = [r for r in records if r.get("event") == "resumed"]
    assert [r["step"] for r in resumed] == [resumed_at]
    steps = [r["step"] for r in _steps(out)]
    assert steps == list(range(1, 161))  # each step logged once
    # result.json's train_loss is the whole run's (logSteps 1: the mean of every step's loss),
    # not only the part after the restart, which is kept apart.
    losses = _losses(out)
    assert result["metrics"]["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result["metrics"]["train_loss_since_resume"] == pytest.approx(
        sum(losses[resumed_at:]) / len(losses[resumed_at:]), rel=1e-5)
    after = {r["step"]: r for r in _steps(out) if r["step"] > resumed_at}
    for step in list(after)[:5]:
        assert after[step]["learning_rate"] == pytest.approx(reference[step]["learning_rate"])
        assert after[step]["loss"] == pytest.approx(reference[step]["loss"], abs=1e-3)


def test_the_loss_plot_takes_logged_steps_not_checkpoint_events(tmp_path):
    from kubetune_trainer.progress import loss_points, plot_loss

    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
               {"event": "checkpoint", "step": 2, "loss": 2.0, "path": "c2"},
               {"event": "resumed", "step": 2, "total_steps": 3},
               {"step": 3, "loss": 1.0, "eval_loss": 1.5}]
    train, evals = loss_points(records)
    assert train == [(1, 3.0), (2, 2.0), (3, 1.0)] and evals == [(3, 1.5)]
    path = tmp_path / "progress.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_loss(path, tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.usefixtures("needs_lf")
def test_the_last_step_is_logged_when_log_steps_does_not_divide_it(tiny_model, tmp_path,
                                                                   capsys):
    """3 steps logged every 2: steps 1, 2 and 3 reach the progress lines, progress.jsonl and
    the plot's points (step 3 was left out: transformers logs every logSteps steps only)."""
    from kubetune_trainer.progress import loss_points

    out = tmp_path / "out"
    result = _run(tmp_path, tiny_spec(tiny_model, [IDENTITY], out,
                                      training={"maxSteps": 3, "logSteps": 2, "saveSteps": 10}))
    assert result["global_step"] == 3
    assert [r["step"] for r in _steps(out)] == [1, 2, 3]
    printed = [line.split()[1] for line in capsys.readouterr().err.splitlines()
               if line.startswith("step ")]
    assert printed == ["1/3", "2/3", "3/3"]
    train, _ = loss_points(read_progress(out / "progress.jsonl"))
    assert [step for step, _ in train] == [1, 2, 3]
    finished = [r for r in read_progress(out / "progress.jsonl") if r.get("event") == "finished"]
    assert len(finished) == 1 and finished[0]["step"] == 3


def test_the_loss_plot_has_whole_steps_on_its_x_axis():
    from kubetune_trainer.progress import loss_figure

    records = [{"step": s, "loss": 3.0 - 0.1 * s,
                "metrics": {"rewards/margins": 0.1 * s}} for s in range(1, 6)]
    fig = loss_figure(records)
    try:
        for ax in fig.axes:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
