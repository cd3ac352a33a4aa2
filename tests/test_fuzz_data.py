"""Fuzzing data files (seeded, bounded): any row of any shape is a normalized example, a counted
bad row or one DataError, never another exception; whatever is kept has the normalized shape.

`make test` runs a few hundred cases; `make fuzz` sets KUBETUNE_FUZZ_EXAMPLES higher.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubetune.api.stages import STAGES as ALL_STAGES
from kubetune.api.v1alpha1 import DatasetSpec
from kubetune.errors import KubetuneError
from kubetune_trainer.config import RunContext
from kubetune_trainer.data.formats import CONVERTERS, BadRow, Layout, check_for_stage
from kubetune_trainer.data.loading import UNEXPECTED, load_examples

EXAMPLES = int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_CHEAP = settings(FUZZ, max_examples=5 * EXAMPLES)  # no files: five times the cases
# One stage per kind of rows: sft, pt, dpo, kto, and any new kind when it lands.
STAGES = ("sft", "pt", "dpo", "kto")
STAGES += tuple({s.rows: n for n, s in sorted(ALL_STAGES.items())
                 if s.rows not in {ALL_STAGES[k].rows for k in STAGES}}.values())
ROLES = {"system", "user", "assistant", "tool"}
KEYS = ["instruction", "input", "output", "history", "system", "conversations", "messages",
        "role", "content", "from", "value", "tool_calls", "prompt", "completion", "chosen",
        "rejected", "label", "kto_tag", "text", "tools", "type", "function",
        "preferred_output", "non_preferred_output"]

# Leaves include what breaks printers and parsers: markup, control characters, huge ints.
texts = st.one_of(st.sampled_from(["", " ", "q", "a", "[/]", "[link=x][red]y", "\x1b[31m",
                                   "human", "gpt", "system", "user", "assistant", "tool",
                                   "observation", "function_call", "text", '{"name": "f"}',
                                   "[]", "5", "null"]),
                  st.text(max_size=12))
leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=10**30),
                   st.floats(allow_nan=True, allow_infinity=True), texts)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=6))
values = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)), max_leaves=24)
# A wrong type where a right one belongs: what a careless export produces.
odd = st.one_of(leaves, st.lists(leaves, max_size=2), st.dictionaries(keys, leaves, max_size=2))
words = st.one_of(st.sampled_from(["q", "a", "hi there", "[/]", "[link=x][red]y", "\x1b[31m",
                                   "{{name}}"]), st.text(min_size=1, max_size=8))
DELETE = object()


@st.composite
def _chat(draw, shape: str = "messages", end: str = "assistant") -> list[dict[str, Any]]:
    """A well-formed conversation: OpenAI messages or ShareGPT turns."""
    n = draw(st.integers(1, 3))
    roles = (["user", "assistant"] * n)[: 2 * n - (end != "assistant")]
    tags = {"user": "human", "assistant": "gpt", "system": "system"}
    if draw(st.booleans()):
        roles = ["system", *roles]
    if shape == "sharegpt":
        return [{"from": tags[r], "value": draw(words)} for r in roles]
    out: list[dict[str, Any]] = [{"role": r, "content": draw(words)} for r in roles]
    if end == "assistant" and draw(st.booleans()):
        out[-1]["tool_calls"] = [{"function": {"name": draw(words), "arguments": {}}}]
    return out


tools = st.lists(st.fixed_dictionaries({"name": words, "parameters": st.just({})}), max_size=2)
answer = st.one_of(words, words.map(lambda w: [{"role": "assistant", "content": w}]))
VALID = {  # per format: a row that fits (columns as LLaMA-Factory and TRL name them)
    "alpaca": st.fixed_dictionaries(
        {"instruction": words, "output": words},
        optional={"input": words, "system": words, "chosen": words, "rejected": words,
                  "history": st.lists(st.tuples(words, words).map(list), max_size=2)}),
    "sharegpt": st.fixed_dictionaries({"conversations": _chat("sharegpt")},
                                      optional={"tools": tools.map(json.dumps)}),
    "messages": st.fixed_dictionaries({"messages": _chat()}, optional={"tools": tools}),
    "promptCompletion": st.fixed_dictionaries(
        {"prompt": st.one_of(words, _chat(end="user")), "completion": answer},
        optional={"label": st.booleans(), "system": words}),
    "text": st.fixed_dictionaries({"text": words}),
    "preference": st.one_of(
        st.fixed_dictionaries({"prompt": st.one_of(words, _chat(end="user")),
                               "chosen": answer, "rejected": answer}),
        st.tuples(_chat(end="user"), words, words).map(lambda t: {
            "chosen": [*t[0], {"role": "assistant", "content": t[1]}],
            "rejected": [*t[0], {"role": "assistant", "content": t[2] + "!"}]})),
    "openaiPreference": st.fixed_dictionaries({
        "input": st.fixed_dictionaries({"messages": _chat(end="user")},
                                       optional={"tools": tools}),
        "preferred_output": answer, "non_preferred_output": answer}),
}


def _paths(value: Any, at: tuple = ()) -> list[tuple]:
    found = [at] if at else []
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found += _paths(v, (*at, k))
    return found


@st.composite
def _row_for(draw, fmt: str) -> Any:
    """A row of ``fmt`` with up to three things wrong anywhere in it: a value of the wrong
    type, a missing key, an extra key of another format."""
    row = draw(VALID[fmt])
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
        paths = _paths(row)
        if not paths or not isinstance(row, dict):
            break
        path = draw(st.sampled_from(paths))
        parent = row
        for k in path[:-1]:
            parent = parent[k]
        new = draw(st.sampled_from([None, 5, True, "", [], {}, ["x"], {"x": 1}, DELETE])
                   | odd | values)
        if new is DELETE and isinstance(parent, dict):
            del parent[path[-1]]
        elif new is not DELETE:
            parent[path[-1]] = new
    if isinstance(row, dict) and draw(st.booleans()):
        row.update(draw(st.dictionaries(st.sampled_from(KEYS), values, max_size=2)))
    return row


formats = st.sampled_from(sorted(CONVERTERS))
rows = st.one_of(formats.flatmap(_row_for), values)  # any format, or not an object at all

def _assert_normalized(example: dict[str, Any]) -> None:
    if "text" in example:
        assert set(example) == {"text"} and isinstance(example["text"], str)
        return
    msgs = example["messages"]
    assert isinstance(msgs, list)
    for m in msgs:
        assert set(m) == {"role", "content"}, m
        assert m["role"] in ROLES and isinstance(m["content"], str), m
    tools = example.get("tools")
    assert tools is None or isinstance(json.loads(tools), list), tools
    for key in ("chosen", "rejected", "completion"):
        assert key not in example or isinstance(example[key], str), example
    assert "label" not in example or isinstance(example["label"], bool), example


@FUZZ_CHEAP
@given(data=st.data(), fmt=formats, ranking=st.booleans(), stage=st.sampled_from(STAGES))
def test_fuzz_converters_raise_only_bad_row(data, fmt, ranking, stage):
    """Every converter checks shapes itself: nothing but BadRow (the loader's last-resort guard
    must never be what catches a row)."""
    row = data.draw(_row_for(fmt), label="row")
    layout = Layout.build(fmt, None, None, ranking)
    try:
        shaped = check_for_stage(CONVERTERS[fmt](row, layout), stage)
    except BadRow as err:
        assert str(err).strip()
        return
    for example in shaped:
        _assert_normalized(example)


@FUZZ
@given(data=st.data(), row_fmt=formats, suffix=st.sampled_from([".jsonl", ".json"]),
       declare=st.booleans(),
       junk=st.lists(st.sampled_from(["{", "[[[[", "\udcff", '{"text": 1e999}', "9" * 5000,
                                      "[" * 5000]), max_size=2))
def test_fuzz_data_files_give_examples_bad_rows_or_one_message(data, row_fmt, suffix, declare,
                                                              junk):
    data = data.draw(st.lists(st.one_of(_row_for(row_fmt), rows), min_size=1, max_size=6),
                     label="rows")
    fmt = row_fmt if declare else None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d{suffix}"
        if suffix == ".jsonl":
            lines = [json.dumps(r) for r in data] + junk
            path.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape"))
        else:
            path.write_text(json.dumps(data))
        spec = DatasetSpec.model_validate({"source": path.name, "format": fmt})
        for stage in STAGES:
            try:
                examples, report = load_examples([spec], stage, RunContext(base_dir=Path(tmp)),
                                                 max_invalid_fraction=1.0)
            except KubetuneError as err:  # DataError: one message naming what is wrong
                assert str(err).strip()
                continue
            assert not any(r.startswith(UNEXPECTED) for r in report.reasons), report.summary()
            assert report.kept + report.bad == report.total
            for example in examples:
                _assert_normalized(example)


# ------------------------------------------------------------------------ paths out of the data

PLANTED = "Pl4nt3dS3cr3t"  # what the files outside the data folder hold
OUTCOMES: list[str] = []
_LINK_NAMES = ["l.json", "l.jsonl", "l.txt", "sub/l.json", "ldir", "sub/ldir"]
_TARGETS = ["abs-file", "abs-txt", "abs-dir", "rel-file", "rel-dir", "passwd", "inside-file",
            "inside-dir", "chain", "dangling"]
_SEGMENTS = ["..", ".", "", "sub", "ok.json", "l.json", "l.txt", "ldir", "x.json", "outside",
             "secret.json"]
paths = st.one_of(
    st.lists(st.sampled_from(_SEGMENTS), min_size=1, max_size=5).map("/".join),
    st.sampled_from(["OUT/secret.json", "OUT/secret.txt", "OUT/dir", "/etc/passwd",
                     "ldir/s.json", "sub/ldir/s.json", "ldir/../ok.json"]))


def _tree(root: Path, links: list[tuple[str, str]]) -> Path:
    """root/outside (the planted rows), root/claims/data (the data folder, with links)."""
    out = root / "outside"
    (out / "dir").mkdir(parents=True)
    secret = [{"instruction": PLANTED, "output": PLANTED}]
    (out / "secret.json").write_text(json.dumps(secret))
    (out / "dir" / "s.json").write_text(json.dumps(secret))
    (out / "secret.txt").write_text(f"{PLANTED}\n")
    data = root / "claims" / "data"
    (data / "sub").mkdir(parents=True)
    (data / "ok.json").write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    (data / "sub" / "ok.json").write_text(json.dumps([{"instruction": "q2", "output": "a2"}]))
    target = {"abs-file": out / "secret.json", "abs-txt": out / "secret.txt",
              "abs-dir": out / "dir", "rel-file": Path("../../../outside/secret.json"),
              "rel-dir": Path("../../../outside/dir"), "passwd": Path("/etc/passwd"),
              "inside-file": Path("ok.json"), "inside-dir": Path("sub"), "chain": Path("l.json"),
              "dangling": Path("nowhere.json")}
    for name, kind in links:
        link = data / name
        if not link.parent.is_dir() or link.exists() or link.is_symlink():
            continue
        os.symlink(target[kind], link)
    return data


@settings(FUZZ, max_examples=max(EXAMPLES // 2, 30))
@given(links=st.lists(st.tuples(st.sampled_from(_LINK_NAMES), st.sampled_from(_TARGETS)),
                      max_size=3),
       how=st.sampled_from(["dir", "registry", "pvc"]), path=paths)
def test_fuzz_nothing_outside_the_data_folder_is_read(links, how, path):
    """Links (absolute, relative, chained, dangling, to files and directories) inside a data
    folder, and paths (``..``, absolute, through links) in dataset_info.json or after
    pvc://CLAIM/: what is loaded, reported or said never holds a byte from outside."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = _tree(root, links)
        path = path.replace("OUT", str(root / "outside"))
        ctx = RunContext(base_dir=root, pvc_root=root / "claims")
        if how == "dir":
            spec = {"source": str(data)}
        elif how == "registry":
            (data / "dataset_info.json").write_text(json.dumps({"e": {"file_name": path}}))
            spec = {"source": str(data / "dataset_info.json"), "entries": ["e"]}
        else:
            spec = {"source": f"pvc://data/{path.lstrip('/')}", "format": "alpaca"}
        try:
            examples, report = load_examples([DatasetSpec.model_validate(spec)], "sft", ctx,
                                             max_invalid_fraction=1.0)
        except KubetuneError as err:
            said = str(err)
            OUTCOMES.append("outside" if "outside" in said else "refused")
        else:
            said = json.dumps(examples) + report.summary()
            OUTCOMES.append("read")
        assert PLANTED not in said and "root:x:0" not in said, (spec, links, said[:300])


def test_fuzz_paths_covered_both_ways():
    # Runs after the fuzz above (file order): paths were read, and refused as outside.
    if OUTCOMES:
        assert OUTCOMES.count("read") >= len(OUTCOMES) // 10, Counter(OUTCOMES)
        assert OUTCOMES.count("outside") >= len(OUTCOMES) // 10, Counter(OUTCOMES)
