"""Chat template, loss mask, cut-off and packing, on the tiny model's real tokenizer."""

from __future__ import annotations

import pytest
from kubetune.errors import KubetuneError
from kubetune_trainer.data.preprocess import IGNORE, Options, pack, tokenize
from kubetune_trainer.data.templates import resolve_template

CONV = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a color."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one."},
    {"role": "assistant", "content": "Green."}], "tools": None}


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _trained_text(tok, ids, labels):
    return tok.decode([int(i) for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])


def test_loss_only_on_assistant_turns(tok):
    out = tokenize([CONV], tok, resolve_template(tok, "auto"), Options("sft", 256))
    text = _trained_text(tok, out.input_ids[0], out.labels[0])
    assert text == "Blue.<|im_end|>\nGreen.<|im_end|>\n"


def test_mask_history_trains_the_last_answer_only(tok):
    out = tokenize([CONV], tok, resolve_template(tok, "auto"),
                   Options("sft", 256, mask_history=True))
    assert _trained_text(tok, out.input_ids[0], out.labels[0]) == "Green.<|im_end|>\n"


def test_train_on_prompt_trains_everything(tok):
    out = tokenize([CONV], tok, resolve_template(tok, "auto"),
                   Options("sft", 256, train_on_prompt=True))
    assert out.labels[0].tolist() == out.input_ids[0].tolist()


def test_named_template(tok):
    out = tokenize([CONV], tok, resolve_template(tok, "llama3"), Options("sft", 256))
    full = tok.decode(out.input_ids[0])
    assert full.count("<|start_header_id|>assistant<|end_header_id|>") == 2
    assert _trained_text(tok, out.input_ids[0], out.labels[0]) == "Blue.<|eot_id|>Green.<|eot_id|>"


def test_unknown_template_names_the_field(tok):
    with pytest.raises(KubetuneError, match="spec.template: unknown template 'vicuna'; use"):
        resolve_template(tok, "vicuna")


def test_tools_go_into_the_system_turn_when_the_template_ignores_them(tok):
    ex = {**CONV, "tools": '[{"name": "paint"}]'}
    out = tokenize([ex], tok, resolve_template(tok, "auto"), Options("sft", 256))
    full = tok.decode(out.input_ids[0])
    assert "<tools>\n[{\"name\": \"paint\"}]\n</tools>" in full
    assert full.index("<tools>") < full.index("Name a color.")


def test_cutoff_truncates_and_drops_rows_with_no_answer_left(tok):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200},
                                {"role": "assistant", "content": "ok"}]}
    out = tokenize([CONV, long_prompt], tok, resolve_template(tok, "auto"), Options("sft", 40))
    assert out.stats.dropped_too_long == 1
    assert all(len(ids) <= 40 for ids in out.input_ids)


def test_pretraining_text_is_split_into_blocks_not_cut(tok):
    text = {"text": "The quick brown fox jumps over the lazy dog. " * 30}
    out = tokenize([text], tok, None, Options("pt", 32))
    assert len(out.input_ids) > 3 and all(len(b) <= 32 for b in out.input_ids)
    assert sum(len(b) for b in out.input_ids) == len(tok(text["text"])["input_ids"]) + 1
    assert out.input_ids[-1][-1] == tok.eos_token_id


def test_parallel_tokenization_gives_the_same_result(tok):
    examples = [CONV] * 1100
    tmpl = resolve_template(tok, "auto")
    serial = tokenize(examples, tok, tmpl, Options("sft", 256))
    parallel = tokenize(examples, tok, tmpl, Options("sft", 256), workers=2)
    assert [a.tolist() for a in serial.input_ids] == [a.tolist() for a in parallel.input_ids]
    assert [a.tolist() for a in serial.labels] == [a.tolist() for a in parallel.labels]


def test_tokenizing_workers_die_of_sigterm_whatever_their_parent_does_with_it(tok):
    """The pool ends its workers with SIGTERM (after it took their queue's lock); a worker
    that inherited training's SIGTERM handler (a flag) or SIG_IGN lived on, and the pool
    waited for it forever (seen: a hung suite)."""
    import multiprocessing
    import signal

    from kubetune_trainer.data.preprocess import _init_worker

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with multiprocessing.get_context("fork").Pool(
                1, _init_worker, (tok, None, Options("sft", 64), None)) as pool:
            assert pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_packing_fills_rows_and_restarts_positions():
    ids = [[1] * 5, [2] * 3, [3] * 4, [4] * 6]
    rows = pack(ids, ids, 8)
    # Best fit, longest first: 6 | 5 | 4, then 3 joins the 5 (tightest fit).
    assert sorted(len(r) for r in rows["input_ids"]) == [4, 6, 8]
    assert sorted(sum((r.tolist() for r in rows["input_ids"]), [])) == sorted(sum(ids, []))
    for r_ids, r_pos, r_lab in zip(rows["input_ids"], rows["position_ids"], rows["labels"],
                                   strict=True):
        starts = [i for i, p in enumerate(r_pos) if p == 0]
        assert all(r_lab[s] == IGNORE for s in starts)  # no target across a boundary
        assert len(r_ids) <= 8


def test_packed_samples_do_not_attend_to_each_other(tiny_model):
    """A sample's logits are the same alone and packed behind another sample."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model.config.use_cache = False
    a, b = list(range(10, 30)), list(range(40, 52))
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([b])).logits[0]
        packed = model(input_ids=torch.tensor([a + b]),
                       position_ids=torch.tensor([list(range(len(a))) + list(range(len(b)))])
                       ).logits[0, len(a):]
        leaky = model(input_ids=torch.tensor([a + b])).logits[0, len(a):]
    assert torch.allclose(alone, packed, atol=1e-5)
    assert not torch.allclose(alone, leaky, atol=1e-3)


def _reference(examples, tok, template, opts):
    """The first algorithm, kept as the oracle: render every prefix of every conversation,
    tokenize with all offsets, and train on tokens whose first character is in an answer."""
    import numpy as np
    from kubetune_trainer.data.preprocess import mask_from_offsets

    def render(msgs, gen):
        return tok.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                       add_generation_prompt=gen)

    out = []
    for ex in examples:
        msgs = ex["messages"]
        text = render(msgs, False)
        spans = [(len(render(msgs[:i], True)) if i else 0, len(render(msgs[: i + 1], False)))
                 for i, m in enumerate(msgs) if m["role"] == "assistant"]
        spans = spans[-1:] if opts.mask_history else spans
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int32)
        starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64)
        labels = ids if opts.train_on_prompt else mask_from_offsets(ids, starts, spans)
        ids, labels = ids[: opts.cutoff_len], labels[: opts.cutoff_len]
        if (labels != IGNORE).any():
            out.append((ids.tolist(), labels.tolist()))
    return out


@pytest.mark.parametrize("template", ["auto", "llama3", "alpaca"])
@pytest.mark.parametrize("opts", [Options("sft", 512), Options("sft", 512, mask_history=True),
                                  Options("sft", 64, train_on_prompt=True)],
                         ids=["all-turns", "mask-history", "train-on-prompt"])
def test_masks_equal_the_render_every_prefix_reference(tok, lf_data, template, opts):
    """On LLaMA-Factory's demo conversations (single- and multi-turn, tools): the fast path
    (fewer renders, two token look-ups per answer) gives exactly the reference's tokens."""
    from kubetune.api.v1alpha1 import DatasetSpec
    from kubetune_trainer.config import RunContext
    from kubetune_trainer.data.loading import load_examples

    ds = DatasetSpec(source=str(lf_data / "dataset_info.json"),
                     entries=["alpaca_en_demo", "alpaca_zh_demo", "glaive_toolcall_en_demo",
                              "identity"], placeholders={"name": "K", "author": "A"})
    examples, _ = load_examples([ds], "sft", RunContext(), max_invalid_fraction=0)
    examples = [ex for ex in examples[::7] if not ex.get("tools")] + \
        [ex for ex in examples if ex.get("tools")][:40]
    tmpl = resolve_template(tok, template)
    # Tools go into the system turn for templates that ignore them: render them the same way.
    from kubetune_trainer.data.templates import Renderer

    r = Renderer(tok, tmpl)
    flat = [{"messages": r._with_tools(ex)[0]} for ex in examples]
    got = tokenize(examples, tok, tmpl, opts)
    want = _reference(flat, tok, tmpl, opts)
    assert len(want) > 300
    assert [(a.tolist(), b.tolist()) for a, b in zip(got.input_ids, got.labels,
                                                     strict=True)] == want


def test_packed_rows_are_their_bins_samples_end_to_end():
    """numpy assembly of the packed rows equals concatenating each bin's samples."""
    import numpy as np
    from kubetune_trainer.data.preprocess import bins

    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 500, rng.integers(1, 300)).astype(np.int32) for _ in range(400)]
    labels = [np.where(rng.random(len(x)) < 0.5, x, IGNORE).astype(np.int32) for x in ids]
    rows = pack(ids, labels, 512)
    members = bins(np.array([len(x) for x in ids]), 512)
    assert sorted(i for m in members for i in m) == list(range(len(ids)))
    assert len(rows["input_ids"]) == len(members)
    for m, r_ids, r_lab, r_pos in zip(members, rows["input_ids"], rows["labels"],
                                      rows["position_ids"], strict=True):
        assert r_ids.tolist() == np.concatenate([ids[i] for i in m]).tolist()
        assert r_pos.tolist() == [p for i in m for p in range(len(ids[i]))]
        want = np.concatenate([labels[i] for i in m])
        want[r_pos == 0] = IGNORE
        assert r_lab.tolist() == want.tolist() and len(r_ids) <= 512


def test_tiktoken_gives_the_tokenizers_own_ids_and_labels(tok, lf_data):
    """A byte-level BPE tokenizer is encoded by tiktoken (a third of the CPU) only when
    that reproduces it: same ids and labels as the tokenizer itself on real conversations."""
    from kubetune.api.v1alpha1 import DatasetSpec
    from kubetune_trainer.config import RunContext
    from kubetune_trainer.data import fastbpe, preprocess, templates
    from kubetune_trainer.data.loading import load_examples

    ds = DatasetSpec(source=str(lf_data / "dataset_info.json"),
                     entries=["alpaca_zh_demo", "glaive_toolcall_en_demo"])
    examples, _ = load_examples([ds], "sft", RunContext(), max_invalid_fraction=0)
    tmpl = resolve_template(tok, "auto")
    fast = fastbpe.for_tokenizer(tok)
    assert fast is not None
    texts = [templates.Renderer(tok, tmpl).render(ex, "none")[0] for ex in examples]
    assert [ids.tolist() for ids, _ in fast.encode(texts)] == \
        tok(texts, add_special_tokens=False)["input_ids"]
    opts = Options("sft", 512)
    with_fast = preprocess._tokenize_chunk(examples, tok, tmpl, opts, fast)
    without = preprocess._tokenize_chunk(examples, tok, tmpl, opts)
    assert preprocess._same(with_fast, without) and with_fast.stats == without.stats
    assert preprocess._fast_encoder(examples[:64], tok, tmpl, opts)[0] is fast


def test_tokenizers_tiktoken_cannot_reproduce_keep_their_own_encoder(tiny_model, tmp_path):
    from kubetune_trainer.data import fastbpe
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert fastbpe.for_tokenizer(tok) is None


@pytest.mark.parametrize("workers", [1, 2])
def test_streamed_rows_equal_the_in_memory_rows_and_read_ahead_is_bounded(
        tok, lf_data, tmp_path, workers):
    """tokenize_to_files + write_rows (what sft runs) give the rows tokenize + pack/table
    give in memory, while reading at most a few chunks of examples ahead of what is written."""
    import numpy as np
    import pyarrow as pa
    from kubetune.api.v1alpha1 import DatasetSpec
    from kubetune_trainer.config import RunContext
    from kubetune_trainer.data import preprocess
    from kubetune_trainer.data.loading import load_examples

    ds = DatasetSpec(source=str(lf_data / "dataset_info.json"),
                     entries=["alpaca_en_demo", "alpaca_zh_demo", "glaive_toolcall_en_demo"])
    examples, _ = load_examples([ds], "sft", RunContext(), max_invalid_fraction=0)
    assert len(examples) > 4 * preprocess.CHUNK
    tmpl, opts = resolve_template(tok, "auto"), Options("sft", 256)
    written = []  # bytes of token ids on disk when each example is read

    def stream():
        for ex in examples:
            path = tmp_path / "sequences.ids"
            written.append(path.stat().st_size if path.exists() else 0)
            yield ex

    seqs = preprocess.tokenize_to_files(stream(), tok, tmpl, opts, tmp_path, workers=workers)
    # Chunks are written while later ones are read: not every example first, then the rows.
    assert written[4 * preprocess.CHUNK] > 0
    want = tokenize(examples, tok, tmpl, opts)
    assert seqs.stats == want.stats and seqs.sources.tolist() == want.sources
    order = np.random.default_rng(0).permutation(len(want.input_ids))
    for pack_to in (None, 256):
        preprocess.write_rows(seqs, order, tmp_path / "rows.arrow", pack_to=pack_to)
        got = pa.ipc.open_stream(pa.memory_map(str(tmp_path / "rows.arrow"))).read_all()
        ids, labels = [want.input_ids[i] for i in order], [want.labels[i] for i in order]
        expected = preprocess.packed_table(ids, labels, 256) if pack_to else \
            preprocess.table(ids, labels)
        assert got.to_pydict() == expected.to_pydict()


def test_compiled_template_falls_back_to_transformers_when_they_differ(tok):
    """The compiled template renders without apply_chat_template's conversions; where those
    matter (apply_chat_template drops keys that are None) the renderer uses apply_chat_template."""
    from kubetune_trainer.data.templates import Renderer

    template = ("{% for m in messages %}{{ m.role }}{% if m.name is defined %}({{ m.name }})"
                "{% endif %}: {{ m.content }}\n{% endfor %}")
    plain = Renderer(tok, template)
    plain.render({"messages": CONV["messages"]})
    assert plain._compiled is not None  # same text: the compiled path stays
    named = Renderer(tok, template)
    messages = [{"role": "user", "content": "Hi", "name": None},
                {"role": "assistant", "content": "Hello"}]
    text, _ = named.render({"messages": messages})
    assert text == "user: Hi\nassistant: Hello\n"
    assert named._compiled is None
