"""Data: every row format, the bad-row report, and one clear message per broken input."""

from __future__ import annotations

import json
import os
import re
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


def test_text_file_rows_are_its_non_blank_lines_read_as_a_stream(tmp_path):
    (tmp_path / "c.txt").write_bytes("\ufeffone\r\ntwo\rthree\n\n  \nfour".encode())
    ds = DatasetSpec(source="c.txt")
    examples, report = load_examples([ds], "pt", RunContext(base_dir=tmp_path),
                                     max_invalid_fraction=0.0)
    assert [ex["text"] for ex in examples] == ["one", "two", "three", "four"]
    assert report.total == 4
    # Past the rows read ahead to learn the layout: still the field and the line.
    (tmp_path / "c.txt").write_bytes(b"fine\n" * 150 + b"\xff broken\n")
    with pytest.raises(DataError) as err:
        load_examples([ds], "pt", RunContext(base_dir=tmp_path), max_invalid_fraction=0.0)
    assert err.value.field == "spec.datasets[0].source"
    assert "line 151 is not UTF-8" in str(err.value)


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


# --- hostile and careless data files: a counted bad row or one message, never a traceback ---

GOOD_CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize(("row", "reason"), [
    ({"prompt": "q", "completion": ["a", "b"]}, "completion must be a string or a list of"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]},
                   {"role": "assistant", "content": "a"}]}, "a text part's text must be a"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a", "tool_calls": 5}]},
     "message 1 tool_calls must be a list, got int"),
    ({"messages": [{"role": ["user"], "content": "q"}]}, "message 0 has role ['user']"),
    ({"conversations": [{"from": ["human"], "value": "q"}]}, "turn 0 has role ['human']"),
    ({"conversations": [{"from": "system", "value": ""}]}, "the conversation has only a system"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "tools": "5"}, "tools must be a JSON list of tool definitions, got int"),
], ids=["completion-strings", "part-text-int", "tool-calls-int", "role-list", "from-list",
        "only-system", "tools-int"])
def test_malformed_rows_are_counted_with_their_reason(tmp_path, row, reason):
    good = {"prompt": {"prompt": "q", "completion": "a"},
            "conversations": {"conversations": [{"from": "human", "value": "q"},
                                                {"from": "gpt", "value": "a"}]}}
    first = next((v for k, v in good.items() if k in row), GOOD_CHAT)  # sets the format
    examples, report = _load(tmp_path, [first, row], name="d.jsonl", max_bad=1.0)
    assert len(examples) == 1 and report.bad == 1
    assert reason in report.summary()


def test_deeply_nested_json_is_one_message_and_a_deep_jsonl_line_a_bad_row(tmp_path):
    (tmp_path / "d.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="d.json: JSON nested too deeply"):
        load_examples([DatasetSpec(source="d.json")], "sft", RunContext(base_dir=tmp_path),
                      max_invalid_fraction=1.0)
    (tmp_path / "d.jsonl").write_text(json.dumps(GOOD_CHAT) + "\n" + "[" * 100_000 + "\n")
    _, report = load_examples([DatasetSpec(source="d.jsonl")], "sft",
                              RunContext(base_dir=tmp_path), max_invalid_fraction=1.0)
    assert report.bad == 1 and "line 2 is nested too deeply" in report.summary()


def test_not_utf8_names_the_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(json.dumps(GOOD_CHAT).encode() + b"\n{\"text\": \"\xff\"}\n")
    with pytest.raises(DataError, match=r"d.jsonl: line 2 is not UTF-8 text"):
        load_examples([DatasetSpec(source="d.jsonl")], "sft", RunContext(base_dir=tmp_path),
                      max_invalid_fraction=1.0)


@pytest.mark.parametrize(("content", "message"), [
    ("instruction,output\nq,a\nq,a,extra,more\n", "Expected 2 fields in line 3"),
    ('\x00\x01 garbage "unterminated\n,,,\n', "not a readable CSV file"),
], ids=["ragged", "garbage"])
def test_broken_csv_is_one_message_naming_the_file(tmp_path, content, message):
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_examples([DatasetSpec(source="d.csv", format="alpaca")], "sft",
                      RunContext(base_dir=tmp_path), max_invalid_fraction=1.0)
    assert "d.csv" in str(err.value) and err.value.field == "spec.datasets[0].source"


@pytest.mark.parametrize(("registry", "message"), [
    ([], "must be a JSON object of named entries, got list"),
    ({"x": "file_name"}, "'x' must be an object, got str"),
    ({"x": {"file_name": 5}}, "file_name must be a non-empty string, got 5"),
    ({"x": {"file_name": "d.json", "columns": ["prompt"]}}, "columns must be an object"),
    ({"x": {"file_name": "d.json", "columns": {"prompt": 5}}}, "columns must map names to"),
    ({"x": {"file_name": "d.json", "tags": {"role_tag": ["from"]}}}, "tags must map names to"),
    ({"x": {"file_name": "d.json", "num_samples": "5"}}, "num_samples must be a positive"),
    ({"x": {"file_name": "d.json", "formatting": ["alpaca"]}}, "formatting must be a string"),
    ("[1, 2", "not JSON: Expecting"),
], ids=["list", "entry-str", "file-name-int", "columns-list", "column-int", "tags-list",
        "num-samples-str", "formatting-list", "not-json"])
def test_malformed_registry_is_one_message(tmp_path, registry, message):
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    text = registry if isinstance(registry, str) else json.dumps(registry)
    (tmp_path / "dataset_info.json").write_text(text)
    ds = DatasetSpec(source="dataset_info.json", entries=["x"])
    with pytest.raises(DataError, match=re.escape(message)) as err:
        load_examples([ds], "sft", RunContext(base_dir=tmp_path), max_invalid_fraction=1.0)
    assert err.value.field.startswith("spec.datasets[0]")


@pytest.mark.parametrize("inside_dir", [False, True])
def test_a_fifo_is_refused_not_opened(tmp_path, inside_dir):
    folder = tmp_path / "parts" if inside_dir else tmp_path
    folder.mkdir(exist_ok=True)
    (folder / "a.json").write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    os.mkfifo(folder / "b.jsonl")  # opening it for reading would block forever
    source = "parts" if inside_dir else "b.jsonl"
    with pytest.raises(DataError, match="b.jsonl is not a regular file"):
        load_examples([DatasetSpec(source=source)], "sft", RunContext(base_dir=tmp_path),
                      max_invalid_fraction=1.0)


@pytest.mark.parametrize("text", ["[/] oops", "[link=https://evil.example][red]click here"])
def test_bad_rows_are_shown_verbatim_not_as_markup(tmp_path, tiny_model, text):
    from conftest import tiny_spec, write_job
    from kubetune.cli import app
    from typer.testing import CliRunner

    rows = [{"instruction": "q", "output": "a"}] * 3 + [{"instruction": text, "output": 5}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    job = write_job(tmp_path / "j.yaml", tiny_spec(tiny_model, [{"source": "d.json"}],
                                                   tmp_path / "out",
                                                   training={"maxInvalidFraction": 0.5}))
    res = CliRunner().invoke(app, ["validate", str(job)])
    assert res.exit_code == 0, res.output
    assert json.dumps(text) in res.output  # the row as written, markup and all
