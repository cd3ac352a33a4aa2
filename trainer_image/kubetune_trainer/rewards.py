"""Reward functions for online RL (grpo), declared in the spec so most users write no code.

Each built-in takes TRL's reward-function call — ``f(prompts=…, completions=…,
completion_ids=…, **dataset_columns)`` — and returns one float per completion. ``guarded``
wraps any of them (and a user's ``module:function``) so that a reward that raises, returns the
wrong number of values or a non-number fails the run with the function's name and the row,
not a stack dump from inside the trainer.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

from kubetune.errors import KubetuneError

RewardFn = Callable[..., list[float | None]]


class RewardError(KubetuneError):
    reason = "RewardError"


# ------------------------------------------------------------------------ answers

_BOXED = re.compile(r"\\boxed\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _text(completion: Any) -> str:
    """A completion as text: TRL passes a string, or for conversational prompts a list of
    messages whose last is the assistant's."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        return content if isinstance(content, str) else ""
    return ""


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}``, braces balanced."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer(text: str) -> str:
    """What a completion answers: the last <answer>…</answer>, else the last \\boxed{…}, else
    the whole text."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1]
    boxed = _last_boxed(text)
    return boxed if boxed is not None else text


def normalize(text: str) -> str:
    """Case, width, spacing and trailing punctuation do not count."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(".!?;:, ").strip()


def _number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        value = float(found[-1].replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _column(kwargs: dict[str, Any], column: str, n: int) -> list[Any]:
    values = kwargs.get(column)
    if values is None:
        raise RewardError(f"the data has no column {column!r} for this reward; columns: "
                          f"{sorted(k for k in kwargs if isinstance(kwargs[k], list))}",
                          field="spec.rewards")
    if len(values) != n:
        raise RewardError(f"column {column!r} has {len(values)} values for {n} completions",
                          field="spec.rewards")
    return list(values)


# ------------------------------------------------------------------------ built-ins


def exact_match(column: str, *, normalized: bool = True) -> RewardFn:
    def reward(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        gold = _column(kwargs, column, len(completions))
        norm = normalize if normalized else (lambda s: s.strip())
        return [1.0 if norm(final_answer(_text(c))) == norm(str(g)) else 0.0
                for c, g in zip(completions, gold, strict=True)]
    return reward


def numeric_match(column: str, *, tolerance: float = 1e-6) -> RewardFn:
    def reward(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        gold = _column(kwargs, column, len(completions))
        out: list[float | None] = []
        for c, g in zip(completions, gold, strict=True):
            want = g if isinstance(g, int | float) and not isinstance(g, bool) \
                else _number(str(g))
            got = _number(final_answer(_text(c)))
            ok = want is not None and got is not None and \
                abs(got - want) <= tolerance * max(1.0, abs(want))
            out.append(1.0 if ok else 0.0)
        return out
    return reward


def math_match(column: str) -> RewardFn:
    """Mathematical equivalence with math-verify (LaTeX, fractions, sets, …)."""
    from math_verify import parse, verify

    def reward(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        gold = _column(kwargs, column, len(completions))
        out: list[float | None] = []
        for c, g in zip(completions, gold, strict=True):
            g_text = str(g)
            parsed_gold = parse(g_text if "$" in g_text or "\\" in g_text else f"${g_text}$")
            out.append(1.0 if parsed_gold and verify(parsed_gold, parse(_text(c))) else 0.0)
        return out
    return reward


def regex_match(pattern: str) -> RewardFn:
    """1 when the completion matches the pattern anywhere (anchor it with ^…$ for its shape,
    e.g. ``^<think>.*?</think>\\s*<answer>.*?</answer>$``)."""
    compiled = re.compile(pattern, re.S)

    def reward(completions: Sequence[Any], **_: Any) -> list[float | None]:
        return [1.0 if compiled.search(_text(c)) else 0.0 for c in completions]
    return reward


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def json_valid(schema: dict[str, Any] | None = None) -> RewardFn:
    """1 when the answer (fences stripped) is JSON that fits ``schema`` (any JSON without)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema) if schema else None

    def reward(completions: Sequence[Any], **_: Any) -> list[float | None]:
        out: list[float | None] = []
        for c in completions:
            text = final_answer(_text(c)).strip()
            fenced = _FENCE.match(text)
            try:
                value = json.loads(fenced.group(1) if fenced else text)
            except (ValueError, RecursionError):
                out.append(0.0)
                continue
            out.append(1.0 if validator is None or validator.is_valid(value) else 0.0)
        return out
    return reward


def length_target(target: int) -> RewardFn:
    """1 at ``target`` completion tokens, falling linearly to 0 at 0 and at twice the target."""
    def reward(completions: Sequence[Any], completion_ids: Sequence[Sequence[int]] | None = None,
               **_: Any) -> list[float | None]:
        lengths = [len(ids) for ids in completion_ids] if completion_ids is not None \
            else [len(_text(c).split()) for c in completions]
        return [max(0.0, 1.0 - abs(n - target) / target) for n in lengths]
    return reward


# ------------------------------------------------------------------------ the guard


def guarded(name: str, fn: RewardFn) -> RewardFn:
    """Check what a reward returns; name the reward and the row when it fails."""
    def reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
               ) -> list[float | None]:
        try:
            values = list(fn(prompts=prompts, completions=completions, **kwargs))
        except RewardError:
            raise
        except Exception as err:
            row = _failing_row(fn, prompts, completions, kwargs)
            raise RewardError(f"reward {name} raised {type(err).__name__}: {err}" + row,
                              field="spec.rewards") from None
        if len(values) != len(completions):
            raise RewardError(f"reward {name} returned {len(values)} values for "
                              f"{len(completions)} completions", field="spec.rewards")
        for i, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise RewardError(f"reward {name} returned {v!r} for row {i} (prompt "
                                  f"{_snippet(prompts[i])}); rewards must be finite numbers "
                                  "or None", field="spec.rewards")
        return [None if v is None else float(v) for v in values]

    reward.__name__ = name  # TRL logs rewards/<name>/mean and /std
    return reward


def _snippet(value: Any, limit: int = 80) -> str:
    text = json.dumps(_text(value), ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failing_row(fn: RewardFn, prompts: Sequence[Any], completions: Sequence[Any],
                 kwargs: dict[str, Any]) -> str:
    """Call row by row to say which one fails (the batch call only says that one did)."""
    for i in range(len(completions)):
        row_kwargs = {k: [v[i]] if isinstance(v, list) and len(v) == len(completions) else v
                      for k, v in kwargs.items()}
        try:
            fn(prompts=[prompts[i]], completions=[completions[i]], **row_kwargs)
        except Exception:
            return f" on row {i} (prompt {_snippet(prompts[i])}, completion " \
                   f"{_snippet(completions[i])})"
    return ""


def load_entry_point(spec: str, search_path: str | None = None) -> RewardFn:
    """``module:function`` from the image, or from ``search_path`` (a mounted directory)."""
    import importlib
    import sys

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"{spec!r} is not module:function", field="spec.rewards")
    if search_path:
        if search_path not in sys.path:
            sys.path.insert(0, search_path)
        loaded = sys.modules.get(module_name.split(".")[0])
        if loaded is not None and not str(getattr(loaded, "__file__", "") or ""
                                          ).startswith(search_path):
            for name in [m for m in sys.modules if m == module_name.split(".")[0]
                         or m.startswith(module_name.split(".")[0] + ".")]:
                del sys.modules[name]  # same name imported from elsewhere: take this one
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise RewardError(f"cannot import {module_name!r} for reward {spec}: "
                          f"{type(err).__name__}: {err}", field="spec.rewards") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"{module_name!r} has no function {attr!r}", field="spec.rewards")
    return fn
