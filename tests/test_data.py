"""Data: every row format, the bad-row report, and one clear message per broken input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubetune.api.v1alpha1 import DatasetSpec
from kubetune.errors import DataError
from kubetune_trainer.config import RunContext
from kubetune_trainer.data.formats import BadRow, Layout, from_alpaca, from_sharegpt
from kubetune_trainer.data.loading import load_examples


def _load(tmp_path: Path, rows, stage="sft", max_bad=0.0, name="d.json", **spec):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    ds = DatasetSpec.model_validate({"source": name, **spec})
    return load_examples([ds], stage, RunContext(base_dir=tmp_path),
                         max_invalid_fraction=max_bad)


def test_alpaca_with_system_and_history():
    layout = Layout.build("alpaca", None, None, False)
    ex = from_alpaca({"instruction": "And 3+3?", "input": "", "output": "6",
                      "system": "Be brief.", "history": [["2+2?", "4"]]}, layout)
    assert ex["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]


def test_alpaca_input_is_appended_to_the_instruction():
    ex = from_alpaca({"instruction": "Sum:", "input": "1 2", "output": "3"},
                     Layout.build("alpaca", None, None, False))
    assert ex["messages"][0] == {"role": "user", "content": "Sum:\n1 2"}


def test_sharegpt_with_tools_function_call_and_observation():
    row = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "It is 21 degrees."}],
        "tools": '[{"name": "weather", "parameters": {}}]'}
    ex = from_sharegpt(row, Layout.build("sharegpt", None, None, False))
    roles = [m["role"] for m in ex["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert ex["messages"][1]["content"].startswith("<tool_call>\n{\"name\": \"weather\"")
    assert json.loads(ex["tools"])[0]["name"] == "weather"


def test_sharegpt_rejects_turns_out_of_order():
    row = {"conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]}
    with pytest.raises(BadRow, match="turn 0 has role 'gpt'; expected one of"):
        from_sharegpt(row, Layout.build("sharegpt", None, None, False))


def test_openai_messages_prompt_completion_and_text(tmp_path):
    msgs = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]}]
    examples, _ = _load(tmp_path, msgs)
    assert [m["role"] for m in examples[0]["messages"]] == ["system", "user", "assistant"]
    examples, _ = _load(tmp_path, [{"prompt": "q", "completion": "a"}], name="pc.jsonl")
    assert examples[0]["messages"][-1] == {"role": "assistant", "content": "a"}
    examples, _ = _load(tmp_path, [{"text": "plain words"}], stage="pt", name="t.jsonl")
    assert examples == [{"text": "plain words"}]


def test_explicit_format_and_columns(tmp_path):
    rows = [{"q": "hi", "a": "hello"}]
    examples, _ = _load(tmp_path, rows, format="alpaca",
                        columns={"prompt": "q", "response": "a"})
    assert examples[0]["messages"][-1]["content"] == "hello"


def test_placeholders_are_filled(tmp_path):
    rows = [{"instruction": "Who are you?", "output": "I am {{name}} by {{author}}."}]
    examples, _ = _load(tmp_path, rows, placeholders={"name": "Kubey", "author": "Ops"})
    assert examples[0]["messages"][-1]["content"] == "I am Kubey by Ops."


def test_bad_rows_fail_the_run_with_a_report(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)]
    rows += [{"instruction": "", "output": "no question"}, {"instruction": "no answer"}]
    with pytest.raises(DataError) as err:
        _load(tmp_path, rows, max_bad=0.1)
    text = str(err.value)
    assert "20.0% of rows do not fit their format" in text
    assert "training.maxInvalidFraction (10.0%)" in text
    assert "8 of 10 rows usable" in text
    assert "row 8: 'instruction' is empty or missing" in text
    assert "row 9: the conversation does not end with an assistant turn" in text


def test_a_few_bad_rows_within_the_limit_are_reported_and_skipped(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(9)] + [{"instruction": 1}]
    examples, report = _load(tmp_path, rows, max_bad=0.2)
    assert len(examples) == 9 and report.bad == 1
    assert "instruction must be a string" in report.summary()


def test_unparsable_jsonl_line_is_a_bad_row(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n')
    ds = DatasetSpec(source="x.jsonl")
    with pytest.raises(DataError, match="line 2 is not JSON"):
        load_examples([ds], "pt", RunContext(base_dir=tmp_path), max_invalid_fraction=0.0)


def test_missing_file(tmp_path):
    ds = DatasetSpec(source="nope.json")
    with pytest.raises(DataError) as err:
        load_examples([ds], "sft", RunContext(base_dir=tmp_path), max_invalid_fraction=0)
    assert err.value.field == "spec.datasets[0].source"
    assert "file not found" in str(err.value)


def test_wrong_column_is_one_message(tmp_path):
    rows = [{"question": "q", "answer": "a"}] * 5
    with pytest.raises(DataError) as err:
        _load(tmp_path, rows, format="alpaca")
    assert "column 'instruction' (prompt) is not in the data" in str(err.value)
    assert "['answer', 'question']" in str(err.value)
    assert err.value.field == "spec.datasets[0].columns"


def test_undetectable_format(tmp_path):
    with pytest.raises(DataError, match="cannot tell the format .* set format: alpaca"):
        _load(tmp_path, [{"foo": 1}])


def test_empty_dataset(tmp_path):
    with pytest.raises(DataError, match="d.json has no rows"):
        _load(tmp_path, [])


def test_registry_entry_that_does_not_exist(lf_data):
    ds = DatasetSpec(source=str(lf_data / "dataset_info.json"), entries=["nope"])
    with pytest.raises(DataError, match="'nope' is not in dataset_info.json; it has: "):
        load_examples([ds], "sft", RunContext(), max_invalid_fraction=0)


def test_pvc_sources_resolve_under_the_pvc_root(tmp_path):
    (tmp_path / "claims" / "data").mkdir(parents=True)
    (tmp_path / "claims" / "data" / "d.json").write_text(
        json.dumps([{"instruction": "q", "output": "a"}]))
    ds = DatasetSpec(source="pvc://data/d.json")
    examples, _ = load_examples([ds], "sft", RunContext(pvc_root=tmp_path / "claims"),
                                max_invalid_fraction=0)
    assert len(examples) == 1


def test_max_samples_counts_across_the_files_of_a_directory(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.json").write_text(json.dumps(
            [{"instruction": f"q{i}{j}", "output": "a"} for j in range(4)]))
    ds = DatasetSpec(source="parts", maxSamples=6)
    examples, report = load_examples([ds], "sft", RunContext(base_dir=tmp_path),
                                     max_invalid_fraction=0)
    assert len(examples) == 6 and report.total == 6


def test_preference_rows_that_cannot_train_are_counted_with_their_reason(tmp_path):
    rows = [{"prompt": "Q1", "chosen": "A", "rejected": "B"},
            {"prompt": "Q2", "chosen": "Same", "rejected": "Same"},
            {"prompt": "Q3", "chosen": "", "rejected": "B"},
            {"prompt": "Q4", "chosen": [{"role": "user", "content": "x"}], "rejected": "B"},
            {"prompt": "", "chosen": "A", "rejected": "B"}]
    examples, report = _load(tmp_path, rows, stage="dpo", max_bad=1.0)
    assert len(examples) == 1 and report.bad == 4
    assert set(report.reasons) == {"chosen and rejected are the same answer", "chosen is empty",
                                   "chosen must hold assistant messages only", "prompt is empty"}


def test_kto_rows_need_a_label_and_unpaired_rows_keep_theirs(tmp_path):
    rows = [{"prompt": "Q1", "completion": "A", "label": True},
            {"prompt": "Q2", "completion": "B", "label": "yes"},
            {"prompt": "Q3", "completion": "C"}]
    examples, report = _load(tmp_path, rows, stage="kto", max_bad=1.0)
    assert [(e["completion"], e["label"]) for e in examples] == [("A", True)]
    assert set(report.reasons) == {"label must be true or false, got 'yes'",
                                   "stage kto needs a label (kto_tag) or a chosen/rejected pair"}


def test_sft_refuses_preference_pairs_and_preference_stages_refuse_plain_chat(tmp_path):
    pairs = [{"prompt": "Q", "chosen": "A", "rejected": "B"}]
    with pytest.raises(DataError, match="trains on single answers; this row is a preference"):
        _load(tmp_path, pairs, stage="sft")
    chat = [{"messages": [{"role": "user", "content": "Q"},
                          {"role": "assistant", "content": "A"}]}]
    with pytest.raises(DataError, match="stage dpo needs chosen/rejected answers"):
        _load(tmp_path, chat, stage="dpo")


def test_alpaca_ranking_rows_are_detected_as_pairs(tmp_path):
    rows = [{"instruction": "Sum:", "input": "1 2", "chosen": "3", "rejected": "12",
             "system": "Be exact."}]
    examples, _ = _load(tmp_path, rows, stage="rm")
    assert examples == [{"messages": [{"role": "system", "content": "Be exact."},
                                      {"role": "user", "content": "Sum:\n1 2"}],
                         "tools": None, "chosen": "3", "rejected": "12"}]
