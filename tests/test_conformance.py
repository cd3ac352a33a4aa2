"""LLaMA-Factory's demo data, unchanged: every entry loads and trains 2 steps in its stage."""

from __future__ import annotations

import json

import pytest
from conftest import LF_DATA, tiny_spec, write_job
from kubetune.api.v1alpha1 import DatasetSpec
from kubetune.jobfile import load_job
from kubetune_trainer.config import RunContext
from kubetune_trainer.data.loading import load_examples
from kubetune_trainer.train import run


def _entries() -> list[tuple[str, str]]:
    info_file = LF_DATA / "dataset_info.json"
    if not info_file.exists():
        return []
    out = []
    for name, info in json.loads(info_file.read_text()).items():
        columns = info.get("columns", {})
        if info.get("ranking"):
            stage = "dpo"
        elif "kto_tag" in columns:
            stage = "kto"
        elif "response" not in columns and info.get("formatting", "alpaca") == "alpaca" \
                and "prompt" in columns:
            stage = "pt"  # text-only corpora (c4, wiki)
        else:
            stage = "sft"
        out.append((name, stage))
    return out


ENTRIES = _entries()


def test_the_conformance_registry_is_present(lf_data):
    assert len(ENTRIES) >= 8


@pytest.mark.parametrize(("entry", "stage"), ENTRIES, ids=[e for e, _ in ENTRIES])
def test_entry_loads_without_bad_rows(entry, stage, lf_data):
    ds = DatasetSpec(source=str(lf_data / "dataset_info.json"), entries=[entry])
    examples, report = load_examples([ds], stage, RunContext(), max_invalid_fraction=0.0)
    assert report.bad == 0 and len(examples) == report.total > 0
    if stage in ("dpo",):
        assert all(ex["chosen"] and ex["rejected"] for ex in examples)
    if stage == "kto":
        assert {ex["label"] for ex in examples} == {True, False}
    if entry.startswith("glaive"):
        assert any(ex.get("tools") for ex in examples)
        assert any(m["role"] == "tool" for ex in examples for m in ex["messages"])


@pytest.mark.parametrize(("entry", "stage"), ENTRIES, ids=[e for e, _ in ENTRIES])
def test_entry_trains_two_steps(entry, stage, tiny_model, tmp_path, lf_data):
    preference = stage in ("dpo", "kto")  # long multi-turn rows: a longer cutoff
    spec = tiny_spec(tiny_model, [{"source": str(lf_data / "dataset_info.json"),
                                   "entries": [entry], "maxSamples": 64}],
                     tmp_path / "out", stage=stage,
                     training={"maxSteps": 2, "saveSteps": 2, "cutoffLen": 512 if preference
                               else 96, "maxInvalidFraction": 0.0, "batchSizePerDevice": 2})
    result = run(load_job(write_job(tmp_path / "job.yaml", spec)), RunContext(),
                 log=lambda *_: None)
    assert result["global_step"] == 2
    assert result["metrics"]["train_loss"] > 0
    if preference:
        assert result["data"]["examples"] > 0
    else:
        assert result["data"]["trained_tokens"] > 0
