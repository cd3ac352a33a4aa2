"""Normalized examples → token ids and labels: loss mask, cut-off, packing.

Conversations are rendered by ``templates.Renderer``, which also gives the character span of
every assistant turn. Tokens whose first character falls inside an assistant span are trained
on: two token look-ups per span, not a walk over every token's offsets. Texts are tokenized in
batches, by tiktoken when it reproduces the tokenizer (``fastbpe``), and rows leave as Arrow
tables assembled with numpy (packed or not).

The trainer streams (``tokenize_to_files`` then ``write_rows``): examples are read a chunk at a
time, their tokens appended to two flat scratch files, and only each sequence's length and
source stay in memory; packing picks bins from the lengths and writes the Arrow rows a batch
at a time. Peak memory does not grow with the number of rows.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing
import os
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from kubetune.errors import DataError

from kubetune_trainer.data.templates import Renderer, no_template

IGNORE = -100
CHUNK = 512


@dataclass(frozen=True)
class Options:
    stage: str
    cutoff_len: int
    train_on_prompt: bool = False
    mask_history: bool = False


@dataclass
class Stats:
    examples: int = 0
    sequences: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0

    def add(self, other: Stats) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class Tokenized:
    """One int32 array per sequence: a tenth of the memory of Python int lists."""

    input_ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    sources: list[int] = field(default_factory=list)  # each sequence's example index

    def extend(self, other: Tokenized, offset: int = 0) -> None:
        self.input_ids += other.input_ids
        self.labels += other.labels
        self.sources += [i + offset for i in other.sources]
        self.stats.add(other.stats)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (from a worker process) as two flat arrays: one array per sequence would
        cost the parent more to unpickle than the worker took to tokenize."""
        lengths = np.fromiter(map(len, self.input_ids), dtype=np.int64,
                              count=len(self.input_ids))
        flat = [np.concatenate(x).astype(np.int32, copy=False) if x else np.zeros(0, np.int32)
                for x in (self.input_ids, self.labels)]
        return {"flat": flat, "lengths": lengths, "stats": self.stats, "sources": self.sources}

    def __setstate__(self, state: dict[str, Any]) -> None:
        cuts = np.cumsum(state["lengths"])[:-1]
        self.input_ids, self.labels = (list(np.split(x, cuts)) if len(state["lengths"]) else []
                                       for x in state["flat"])
        self.stats, self.sources = state["stats"], state["sources"]


def _starts(offsets: Any) -> np.ndarray:
    return np.fromiter((s for s, _ in offsets), dtype=np.int64, count=len(offsets))


def mask_from_offsets(ids: np.ndarray, starts: np.ndarray, spans: list[tuple[int, int]]
                      ) -> np.ndarray:
    """Labels: a token is trained on when its first character falls inside a span."""
    bounds = np.asarray(spans, dtype=np.int64).ravel()
    inside = (np.searchsorted(bounds, starts, side="right") % 2).astype(bool)
    return np.where(inside, ids, IGNORE).astype(np.int32)


def _tokens_before(enc: Any, char: int, n_chars: int) -> int | None:
    """How many tokens start before ``char`` (None: the encoding cannot say cheaply)."""
    if char >= n_chars:
        return len(enc.ids)
    t = enc.char_to_token(char)
    if t is None:  # e.g. whitespace a normalizer dropped: walk the offsets instead
        return None
    start, _ = enc.token_to_chars(t)
    return t if start >= char else t + 1


def _mask(ids: np.ndarray, enc: Any, n_chars: int, spans: list[tuple[int, int]],
          offsets: Any = None) -> np.ndarray:
    """The same labels as ``mask_from_offsets``, from two look-ups per span instead of
    a Python walk over every token's offsets (token starts are non-decreasing)."""
    if enc is not None:
        labels = np.full(len(ids), IGNORE, dtype=np.int32)
        for s, e in spans:
            lo, hi = _tokens_before(enc, s, n_chars), _tokens_before(enc, e, n_chars)
            if lo is None or hi is None:
                break
            labels[lo:hi] = ids[lo:hi]
        else:
            return labels
        offsets = enc.offsets
    return mask_from_offsets(ids, _starts(offsets), spans)


def _nbytes(text: str, chars: int) -> int:
    return len(text[:chars].encode("utf-8", "surrogatepass"))


def _encode(tokenizer: Any, texts: list[str]) -> tuple[list[list[int]], list[Any]]:
    """Token ids of each text and, from a Rust tokenizer, its Encoding (offsets stay on the
    Rust side until asked for); a Python tokenizer gives its offset lists instead."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens",
                                                              False))):
        # What tokenizer(texts) runs, minus building Python lists we do not need.
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], encodings
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)
    if getattr(enc, "encodings", None):  # the first call turns off a truncation set in
        return enc["input_ids"], enc.encodings  # tokenizer.json: the fast path from then on
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                    return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def _tokenize_chunk(examples: list[dict[str, Any]], tokenizer: Any, template: str | None,
                    opts: Options, fast: Any = None) -> Tokenized:
    out = Tokenized()
    out.stats.examples = len(examples)
    texts: list[str] = []
    spans: list[list[tuple[int, int]] | None] = []  # None: train on every token
    renderer = Renderer(tokenizer, template) if template else None
    trained_all = opts.train_on_prompt or opts.stage == "pt"
    which = "none" if trained_all else "last" if opts.mask_history else "all"
    for ex in examples:
        if "text" in ex:
            texts.append(ex["text"])
            spans.append(None)
            continue
        if renderer is None:  # a conversation, and no template to render it with
            raise no_template()
        text, sp = renderer.render(ex, which)
        texts.append(text)
        spans.append(None if trained_all else sp)
    if fast is not None:  # tiktoken: ids and byte starts; spans in bytes to match
        encoded = fast.encode(texts)
        all_ids = [ids for ids, _ in encoded]
        encodings = [starts for _, starts in encoded]
        spans = [None if sp is None else [(_nbytes(t, a), _nbytes(t, b)) for a, b in sp]
                 for t, sp in zip(texts, spans, strict=True)]
    else:
        all_ids, encodings = _encode(tokenizer, texts)
    eos = tokenizer.eos_token_id
    for n, (ex, ids, enc, text, sp) in enumerate(zip(examples, all_ids, encodings, texts,
                                                     spans, strict=True)):
        if "text" in ex:  # plain text: eos at the end, long texts cut into cutoffLen blocks
            arr = np.asarray([*ids, eos] if eos is not None else ids, dtype=np.int32)
            for start in range(0, len(arr), opts.cutoff_len):
                block = arr[start: start + opts.cutoff_len]
                if len(block) > 1:
                    out.input_ids.append(block)
                    out.labels.append(block)
                    out.sources.append(n)
                    out.stats.sequences += 1
                    out.stats.tokens += len(block)
                    out.stats.trained_tokens += len(block)
            continue
        ids = np.asarray(ids, dtype=np.int32)
        if sp is None:
            labels = ids
        elif isinstance(enc, np.ndarray):  # byte starts from tiktoken
            labels = mask_from_offsets(ids, enc, sp)
        elif isinstance(enc, list):  # offsets from a Python tokenizer
            labels = mask_from_offsets(ids, _starts(enc), sp)
        else:
            labels = _mask(ids, enc, len(text), sp)
        if len(ids) > opts.cutoff_len:
            out.stats.truncated += 1
            ids, labels = ids[: opts.cutoff_len], labels[: opts.cutoff_len]
        trained = int(np.count_nonzero(labels != IGNORE))
        if trained == 0:
            out.stats.dropped_too_long += 1
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.sources.append(n)
        out.stats.sequences += 1
        out.stats.tokens += len(ids)
        out.stats.trained_tokens += trained
    return out


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any, template: str | None, opts: Options, fast: Any) -> None:
    # A forked worker inherits its parent's SIGTERM handler (training's only raises a flag):
    # the pool ends its workers with SIGTERM, so they must die of it, or the pool waits forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tokenizer=tokenizer, template=template, opts=opts, fast=fast)


def _work(chunk: list[dict[str, Any]]) -> Tokenized:
    return _tokenize_chunk(chunk, _WORKER["tokenizer"], _WORKER["template"], _WORKER["opts"],
                           _WORKER["fast"])


def _same(a: Tokenized, b: Tokenized) -> bool:
    return a.sources == b.sources and all(
        np.array_equal(x, y) for x, y in zip(a.input_ids + a.labels, b.input_ids + b.labels,
                                             strict=True))


def _fast_encoder(chunk: list[dict[str, Any]], tokenizer: Any, template: str | None,
                  opts: Options) -> tuple[Any, Tokenized]:
    """tiktoken for this tokenizer when it gives exactly the tokenizer's own ids and labels
    on the first chunk (else None), and that chunk tokenized."""
    from kubetune_trainer.data import fastbpe

    reference = _tokenize_chunk(chunk, tokenizer, template, opts)
    fast = fastbpe.for_tokenizer(tokenizer)
    if fast is not None:
        try:
            same = _same(reference, _tokenize_chunk(chunk, tokenizer, template, opts, fast))
        except (UnicodeError, ValueError, IndexError):
            same = False
        fast = fast if same else None
    return fast, reference


def _parts(examples: Iterable[dict[str, Any]], tokenizer: Any, template: str | None,
           opts: Options, workers: int) -> Iterator[tuple[Tokenized, int]]:
    """The examples tokenized CHUNK at a time, in order, each part with the index of its first
    example. Examples are read as they are needed: with ``workers`` > 1 a process pool takes
    the chunks, at most two per worker in flight, so memory does not grow with the data."""
    it = iter(examples)
    chunks = iter(lambda: list(itertools.islice(it, CHUNK)), [])
    first = next(chunks, None)
    if first is None:
        return
    fast, done = _fast_encoder(first, tokenizer, template, opts)
    yield done, 0
    ahead = list(itertools.islice(chunks, 2))  # one chunk left is not worth a pool
    rest = itertools.chain(ahead, chunks)
    if workers <= 1 or len(ahead) < 2:
        for k, chunk in enumerate(rest, 1):
            yield _tokenize_chunk(chunk, tokenizer, template, opts, fast), k * CHUNK
        return
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, _init_worker, (tokenizer, template, opts, fast)) as pool:
        pending: collections.deque = collections.deque()
        for k, chunk in enumerate(rest, 1):
            pending.append((pool.apply_async(_work, (chunk,)), k * CHUNK))
            if len(pending) >= 2 * workers:
                result, offset = pending.popleft()
                yield result.get(), offset
        while pending:
            result, offset = pending.popleft()
            yield result.get(), offset


def _none_kept(opts: Options) -> DataError:
    return DataError(
        f"no example keeps a trained token within training.cutoffLen={opts.cutoff_len}; "
        "raise cutoffLen")


def tokenize(examples: Iterable[dict[str, Any]], tokenizer: Any, template: str | None,
             opts: Options, *, workers: int = 1) -> Tokenized:
    """Tokenize and mask every example, in memory; ``workers`` > 1 spreads chunks over
    processes."""
    result = Tokenized()
    for part, offset in _parts(examples, tokenizer, template, opts, workers):
        result.extend(part, offset)
    if not result.input_ids:
        raise _none_kept(opts)
    return result


@dataclass
class Sequences:
    """Tokenized sequences as two flat int32 files (ids, labels), end to end in the order of
    their examples; only each sequence's length and source example are held in memory."""

    ids: Path
    labels: Path
    lengths: np.ndarray
    sources: np.ndarray  # each sequence's example index
    stats: Stats

    def __post_init__(self) -> None:
        self.starts = np.cumsum(self.lengths) - self.lengths

    def gather(self, picked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ids and labels of the ``picked`` sequences, end to end, read into a fresh
        buffer (not mapped: pages of the files do not stay in this process's memory)."""
        lengths = self.lengths[picked]
        at = (np.cumsum(lengths) - lengths).tolist()
        spans = list(zip((self.starts[picked] * 4).tolist(), at, lengths.tolist(),
                         strict=True))
        out = []
        for path in (self.ids, self.labels):
            buf = np.empty(int(lengths.sum()), dtype=np.int32)
            view = memoryview(buf).cast("B")
            fd = os.open(path, os.O_RDONLY)
            try:
                for offset, a, n in spans:
                    if os.preadv(fd, [view[4 * a: 4 * (a + n)]], offset) != 4 * n:
                        raise OSError(f"{path}: short read (the file changed?)")
            finally:
                os.close(fd)
            out.append(buf)
        return out[0], out[1]


def tokenize_to_files(examples: Iterable[dict[str, Any]], tokenizer: Any,
                      template: str | None, opts: Options, workdir: Path, *,
                      workers: int = 1) -> Sequences:
    """``tokenize``, streamed: each chunk's tokens are appended to files under ``workdir`` as
    they are made, so memory stays flat in the number of examples."""
    lengths, sources, stats = [], [], Stats()
    ids_path, labels_path = workdir / "sequences.ids", workdir / "sequences.labels"
    with ids_path.open("wb") as ids_file, labels_path.open("wb") as labels_file:
        for part, offset in _parts(examples, tokenizer, template, opts, workers):
            stats.add(part.stats)
            if not part.input_ids:
                continue
            np.concatenate(part.input_ids).astype(np.int32, copy=False).tofile(ids_file)
            np.concatenate(part.labels).astype(np.int32, copy=False).tofile(labels_file)
            lengths.append(np.fromiter(map(len, part.input_ids), dtype=np.int64,
                                       count=len(part.input_ids)))
            sources.append(np.asarray(part.sources, dtype=np.int64) + offset)
    if not lengths:
        raise _none_kept(opts)
    return Sequences(ids_path, labels_path, np.concatenate(lengths), np.concatenate(sources),
                     stats)


ROWS_PER_WRITE = 1024


def write_rows(seqs: Sequences, order: np.ndarray, path: Path, *,
               pack_to: int | None = None) -> None:
    """The sequences ``order`` picks, in that order, to an Arrow file (packed into rows of at
    most ``pack_to`` tokens when given), a batch of rows at a time."""
    import pyarrow as pa

    order = np.asarray(order, dtype=np.int64)
    if pack_to:
        members = bins(seqs.lengths[order], pack_to)
        flat = order[np.fromiter(itertools.chain.from_iterable(members), dtype=np.int64,
                                 count=len(order))]
        per_row = np.fromiter(map(len, members), dtype=np.int64, count=len(members))
    else:
        flat, per_row = order, np.ones(len(order), dtype=np.int64)
    first = np.zeros(len(per_row) + 1, dtype=np.int64)
    np.cumsum(per_row, out=first[1:])  # each row's first sequence in `flat`
    names = ("input_ids", "labels", "position_ids")[: 3 if pack_to else 2]
    schema = pa.schema([(n, pa.list_(pa.int32())) for n in names])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as out:
        for r in range(0, len(per_row), ROWS_PER_WRITE):
            end = min(r + ROWS_PER_WRITE, len(per_row))
            picked = flat[first[r]: first[end]]
            ids, labs = seqs.gather(picked)
            seq_len = seqs.lengths[picked]
            if pack_to:
                out.write_table(_packed(ids, labs, seq_len,
                                        np.add.reduceat(seq_len, first[r:end] - first[r])))
            else:
                out.write_table(pa.table({"input_ids": _lists(ids, seq_len),
                                          "labels": _lists(labs, seq_len)}, schema=schema))


def _packed(ids: np.ndarray, labs: np.ndarray, seq_len: np.ndarray, row_len: np.ndarray
            ) -> Any:
    """Rows of ``row_len`` tokens from sequences laid end to end: positions restart at each
    sequence, whose first token is not a target."""
    import pyarrow as pa

    index = np.int32 if len(ids) < 2**31 else np.int64  # 4 bytes a token, not 8
    pos = np.arange(len(ids), dtype=index)
    pos -= np.repeat((np.cumsum(seq_len) - seq_len).astype(index), seq_len)
    pos = pos.astype(np.int32, copy=False)
    labs = np.array(labs, dtype=np.int32)  # our own copy to change
    labs[pos == 0] = IGNORE
    ids = np.asarray(ids, dtype=np.int32)
    return pa.table({"input_ids": _lists(ids, row_len), "labels": _lists(labs, row_len),
                     "position_ids": _lists(pos, row_len)})


def bins(lengths: np.ndarray, max_len: int) -> list[list[int]]:
    """Best-fit decreasing: sample indices per row of at most ``max_len`` tokens."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    out: list[list[int]] = []
    by_free: list[list[int]] = [[] for _ in range(max_len + 1)]  # free space -> bin ids
    has = np.zeros(max_len + 1, dtype=bool)  # by_free[f] is not empty
    for i in order.tolist():
        n = int(lengths[i])
        f = n + int(np.argmax(has[n:]))  # the tightest bin that still fits
        if has[f]:
            b = by_free[f].pop()
            has[f] = bool(by_free[f])
        else:
            b, f = len(out), max_len
            out.append([])
        out[b].append(i)
        if f - n:
            by_free[f - n].append(b)
            has[f - n] = True
    return out


def pack(input_ids: list, labels: list, max_len: int) -> dict[str, list[np.ndarray]]:
    """Best-fit-decreasing packing into rows of at most ``max_len`` tokens.

    Each sample's positions restart at 0: with no attention mask, transformers builds a
    block-diagonal causal mask from the position ids, so attention never crosses samples.
    The first token of every sample is not a target (it would be predicted from the previous
    sample).
    """
    table = packed_table(input_ids, labels, max_len)
    return {k: [np.asarray(x, np.int32) for x in table.column(k).to_numpy(zero_copy_only=False)]
            for k in ("input_ids", "labels", "position_ids")}


def _lists(values: np.ndarray, lengths: np.ndarray) -> Any:
    import pyarrow as pa

    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)) \
        if offsets[-1] >= 2**31 else \
        pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def table(input_ids: list, labels: list) -> Any:
    """One row per sequence, as an Arrow table (one copy of the tokens, no Python lists)."""
    import pyarrow as pa

    lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
    flat = (np.concatenate(input_ids) if input_ids else np.zeros(0, np.int32)).astype(np.int32)
    labs = (np.concatenate(labels) if labels else np.zeros(0, np.int32)).astype(np.int32)
    return pa.table({"input_ids": _lists(flat, lengths), "labels": _lists(labs, lengths)})


def dataset(arrow: Any) -> Any:
    """A datasets.Dataset over the table as it is. Without a fingerprint datasets would hash
    the whole table to make one: a transient copy as large as the data."""
    import secrets

    import datasets

    return datasets.Dataset(arrow, fingerprint=secrets.token_hex(8))


def packed_table(input_ids: list, labels: list, max_len: int) -> Any:
    """``pack`` as an Arrow table: bins chosen from the lengths, rows assembled with numpy."""
    lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
    members = bins(lengths, max_len)
    order = [i for row in members for i in row]
    flat = np.concatenate([np.asarray(input_ids[i], np.int32) for i in order]) \
        if order else np.zeros(0, np.int32)
    labs = np.concatenate([np.asarray(labels[i], np.int32) for i in order]) \
        if order else np.zeros(0, np.int32)
    row_len = np.fromiter((lengths[row].sum() for row in members), dtype=np.int64,
                          count=len(members))
    return _packed(flat, labs, lengths[order], row_len)


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))
