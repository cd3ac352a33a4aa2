"""Built-in rewards for grpo, on the edge cases a policy will find: empty, unicode, huge,
malformed; and the guard that names a failing reward and its row."""

from __future__ import annotations

import pytest
from kubetune_trainer import rewards as r

HUGE = "word " * 50_000


def test_final_answer_prefers_answer_tags_then_the_last_boxed():
    assert r.final_answer("x <answer> 4 </answer> y <answer>5</answer>") == "5"
    assert r.final_answer("so \\boxed{\\frac{1}{2}} and \\boxed{x^{2}}") == "x^{2}"
    assert r.final_answer("\\boxed{unclosed") == "\\boxed{unclosed"
    assert r.final_answer("") == ""


def test_exact_match_normalises_case_space_width_and_trailing_punctuation():
    fn = r.exact_match("answer")
    got = fn(completions=["  PARIS. ", "<answer>ｐａｒｉｓ</answer>", "Paris, France", "", HUGE],
             answer=["Paris"] * 5)
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0]
    strict = r.exact_match("answer", normalized=False)
    assert strict(completions=["paris"], answer=["Paris"]) == [0.0]


def test_exact_match_reads_conversational_completions():
    fn = r.exact_match("answer")
    assert fn(completions=[[{"role": "assistant", "content": "42"}], []],
              answer=["42", "42"]) == [1.0, 0.0]


def test_numeric_match_takes_the_last_number_and_a_relative_tolerance():
    fn = r.numeric_match("answer", tolerance=1e-3)
    got = fn(completions=["3 apples, then 1,234.5", "\\boxed{-2e3}", "none", "٣", "1e999",
                          "10000.5"],
             answer=["1234.5", -2000, "7", "3", "1", 10000])
    assert got == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]  # Arabic-Indic ٣ is 3


def test_math_match_accepts_equivalent_forms():
    fn = r.math_match("answer")
    got = fn(completions=["The answer is $\\frac{1}{2}$", "\\boxed{0.5}", "\\boxed{1/3}", "",
                          "{{{{"],
             answer=["0.5", "\\frac{1}{2}", "0.5", "0.5", "1"])
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_regex_match_checks_a_shape():
    fn = r.regex_match(r"^<think>.*?</think>\s*<answer>.*?</answer>$")
    got = fn(completions=["<think>a\nb</think> <answer>1</answer>", "<answer>1</answer>", "",
                          "<think>ü</think><answer>é</answer>", HUGE])
    assert got == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_json_valid_with_and_without_a_schema():
    schema = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
    fn = r.json_valid(schema)
    got = fn(completions=['{"name": "x"}', '```json\n{"name": "x"}\n```', '{"name": 1}',
                          "{not json", "", "[" * 100_000])
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert r.json_valid()(completions=["[1, 2]", "nope"]) == [1.0, 0.0]


def test_length_target_peaks_at_the_target():
    fn = r.length_target(10)
    assert fn(completions=["a"] * 4, completion_ids=[[1] * 10, [1] * 5, [], [1] * 40]) == [
        1.0, 0.5, 0.0, 0.0]


def test_guard_names_the_reward_and_the_row_that_raised():
    def picky(prompts, completions, **_):
        return [1.0 / len(c) for c in completions]  # ZeroDivisionError on an empty one

    fn = r.guarded("picky", picky)
    assert fn.__name__ == "picky"
    assert fn(prompts=["p", "q"], completions=["ab", "a"]) == [0.5, 1.0]
    with pytest.raises(r.RewardError, match=r"reward picky raised ZeroDivisionError: .* on row 1 "
                                            r"\(prompt \"second\", completion \"\"\)"):
        fn(prompts=["first", "second"], completions=["ok", ""])


@pytest.mark.parametrize(("returned", "message"), [
    ([1.0], "returned 1 values for 2 completions"),
    ([1.0, float("nan")], "returned nan for row 1"),
    ([1.0, "1"], "returned '1' for row 1"),
    ([True, 1.0], "returned True for row 0"),
])
def test_guard_refuses_what_the_trainer_cannot_use(returned, message):
    fn = r.guarded("bad", lambda prompts, completions, **_: returned)
    with pytest.raises(r.RewardError, match=message):
        fn(prompts=["p", "q"], completions=["a", "b"])
    assert r.guarded("none", lambda prompts, completions, **_: [None, 2])(
        prompts=["p", "q"], completions=["a", "b"]) == [None, 2.0]


def test_a_missing_column_is_named():
    with pytest.raises(r.RewardError, match="no column 'answer'"):
        r.exact_match("answer")(completions=["x"], solution=["x"])


def test_entry_point_from_a_mounted_directory(tmp_path):
    (tmp_path / "myrewards.py").write_text(
        "def brevity(prompts, completions, **kw):\n"
        "    return [1.0 / (1 + len(c)) for c in completions]\n")
    fn = r.load_entry_point("myrewards:brevity", str(tmp_path))
    assert fn(prompts=["p"], completions=["abc"]) == [0.25]
    with pytest.raises(r.RewardError, match="has no function 'nope'"):
        r.load_entry_point("myrewards:nope", str(tmp_path))
    with pytest.raises(r.RewardError, match="cannot import 'missing_mod'"):
        r.load_entry_point("missing_mod:f")
    with pytest.raises(r.RewardError, match="is not module:function"):
        r.load_entry_point("justamodule")
