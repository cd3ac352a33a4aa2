"""tiktoken as the encoder of a plain GPT-2-style byte-level BPE tokenizer.

Tokenizing is most of data preparation's time, and tiktoken's BPE needs about a third of the
CPU of ``tokenizers`` for the same ids. It is used only for tokenizers it can reproduce: a
BPE model with no normalizer, the GPT-2 byte-level pre-tokenizer alone, no dropout, byte
fallback or word prefixes/suffixes, and added tokens without strip/single-word rules. Even
then ``tokenize`` checks its first chunk against the tokenizer itself (ids and labels) and
keeps the tokenizer when anything differs. Without tiktoken installed, nothing changes.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from typing import Any

import numpy as np

GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
                r"""|\s+""")
_SPECIAL = 1 << 30  # tiktoken ranks of added tokens: apart from the BPE ranks


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes, back to the bytes."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class FastBPE:
    """Encodes texts to the tokenizer's ids; ``starts`` gives each token's first byte."""

    def __init__(self, definition: dict[str, Any]) -> None:
        import tiktoken

        # Stand-in characters to the bytes they stand for (as latin-1 characters); any other
        # character becomes one latin-1 cannot encode, so a stray one fails loudly.
        table = {i: chr(256) for i in range(256)}
        table.update({ord(ch): chr(b) for ch, b in _byte_decoder().items()})
        model = definition["model"]

        def raw(token: str) -> bytes:
            return token.translate(table).encode("latin-1")

        ranks = {bytes([b]): b for b in range(256)}
        for i, merge in enumerate(model["merges"]):
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            ranks.setdefault(raw(a) + raw(b), 256 + i)
        added = {t["content"]: t["id"] for t in definition.get("added_tokens", [])}
        size = max([*model["vocab"].values(), *added.values()]) + 1
        self.to_id = np.zeros(len(ranks) + 256, dtype=np.int32)
        self.nbytes = np.zeros(len(ranks) + 256, dtype=np.int64)
        for token, i in model["vocab"].items():
            if token in added:
                continue
            r = ranks.get(raw(token))
            if r is None:
                raise ValueError(f"vocab token {token!r} has no merge")
            self.to_id[r], self.nbytes[r] = i, len(raw(token))
        self.added = added
        self.added_bytes = {i: len(t.encode()) for t, i in added.items()}
        self.enc = tiktoken.Encoding(
            "kubetune-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
            special_tokens={t: _SPECIAL + i for t, i in added.items()})
        self.size = size

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text: token ids (int32) and each token's first byte (int64), mapped for the
        whole batch at once (views into two arrays)."""
        ranks = [self.enc.encode(t, allowed_special="all") for t in texts]
        counts = np.fromiter(map(len, ranks), dtype=np.int64, count=len(ranks))
        r = np.fromiter(itertools.chain.from_iterable(ranks), dtype=np.int64,
                        count=int(counts.sum()))
        special = r >= _SPECIAL
        plain = np.where(special, 0, r)
        ids = np.where(special, r - _SPECIAL, self.to_id[plain]).astype(np.int32)
        lengths = self.nbytes[plain]
        if special.any():
            lengths[special] = [self.added_bytes[i] for i in (r[special] - _SPECIAL).tolist()]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        first = np.cumsum(counts) - counts  # each text's first token
        base = np.where(counts > 0, starts[np.minimum(first, max(len(r) - 1, 0))], 0) \
            if len(r) else np.zeros(len(counts), np.int64)
        starts -= np.repeat(base, counts)
        cuts = np.cumsum(counts)[:-1]
        return list(zip(np.split(ids, cuts), np.split(starts, cuts), strict=True))



def for_tokenizer(tokenizer: Any) -> FastBPE | None:
    """A FastBPE reproducing ``tokenizer``, or None (tiktoken missing or a tokenizer it
    cannot reproduce). Built once per tokenizer object."""
    cached = getattr(tokenizer, "_kubetune_fastbpe", False)
    if cached is not False:
        return cached
    fast = None
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        backend = None
    if backend is not None:
        d = json.loads(backend.to_str())
        m, pre = d.get("model") or {}, d.get("pre_tokenizer") or {}
        plain = (
            m.get("type") == "BPE" and d.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space") and not m.get("dropout")
            and not m.get("byte_fallback") and not m.get("continuing_subword_prefix")
            and not m.get("end_of_word_suffix")
            and not getattr(tokenizer, "split_special_tokens", False)
            and all(not (t.get("lstrip") or t.get("rstrip") or t.get("single_word"))
                    for t in d.get("added_tokens", [])))
        if plain:
            try:
                fast = FastBPE(d)
            except (ValueError, KeyError):
                fast = None
    with contextlib.suppress(AttributeError):
        tokenizer._kubetune_fastbpe = fast
    return fast
