"""Preference rows → the text columns TRL's preference trainers read.

The chat template (with tools and system prompts, as for sft) renders the prompt up to the
assistant's turn; each answer is the rest of the conversation as the template renders it. TRL
tokenizes these strings itself, so two details are settled here: an answer ends exactly with
the EOS text (TRL appends EOS to one that does not, which would add a second end marker after
a template's trailing newline), and a prompt does not start with BOS text when the tokenizer
adds BOS itself.
"""

from __future__ import annotations

from typing import Any

from kubetune_trainer.data.templates import Renderer


class TextPairs:
    def __init__(self, tokenizer: Any, template: str) -> None:
        self.renderer = Renderer(tokenizer, template)
        self.eos = tokenizer.eos_token or ""
        bos = tokenizer.bos_token
        adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [
            tokenizer.bos_token_id]
        self.strip_bos = bos if adds_bos else None

    def _prompt(self, text: str) -> str:
        if self.strip_bos and text.startswith(self.strip_bos):
            return text[len(self.strip_bos):]
        return text

    def _answer(self, text: str) -> str:
        trimmed = text.rstrip()
        return trimmed if self.eos and trimmed.endswith(self.eos) else text

    def pair(self, example: dict[str, Any]) -> dict[str, str]:
        prompt, chosen = self.renderer.prompt_and_answer(example, example["chosen"])
        _, rejected = self.renderer.prompt_and_answer(example, example["rejected"])
        return {"prompt": self._prompt(prompt), "chosen": self._answer(chosen),
                "rejected": self._answer(rejected)}

    def single(self, example: dict[str, Any]) -> dict[str, Any]:
        prompt, completion = self.renderer.prompt_and_answer(example, example["completion"])
        return {"prompt": self._prompt(prompt), "completion": self._answer(completion),
                "label": bool(example["label"])}


def preference_data(examples: list[dict[str, Any]], tokenizer: Any, template: str | None,
                    spec: Any, *, unpaired: bool = False, log=print) -> Any:
    """Rendered rows, shuffled and split into train and eval as ``training.evalSplit`` asks."""
    import datasets
    from kubetune.errors import KubetuneError

    from kubetune_trainer.data.prepared import Data, split

    if template is None:
        raise KubetuneError(f"stage {spec.stage} needs conversations with a prompt",
                            field="spec.datasets")
    text = TextPairs(tokenizer, template)
    rows = [text.single(ex) if unpaired else text.pair(ex) for ex in examples]
    t = spec.training
    rows, too_long = _fitting(rows, tokenizer, t.cutoff_len)
    if too_long:
        log(f"data: {too_long} of {too_long + len(rows)} rows are longer than "
            f"training.cutoffLen ({t.cutoff_len} tokens) and are left out")
    if not rows:
        raise KubetuneError(f"no row fits within {t.cutoff_len} tokens; raise it",
                            field="spec.training.cutoffLen")
    train_idx, eval_idx = split(len(rows), t.eval_split, t.seed)

    def columns(idx: list[int]) -> dict[str, list[Any]]:
        return {k: [rows[i][k] for i in idx] for k in rows[0]}

    stats: dict[str, Any] = {"examples": len(rows), "too_long": too_long}
    if unpaired:
        stats["desirable"] = sum(r["label"] for r in rows)
        stats["undesirable"] = len(rows) - stats["desirable"]
        log(f"data: {len(rows)} answers ({stats['desirable']} desirable, "
            f"{stats['undesirable']} undesirable)")
    else:
        log(f"data: {len(rows)} preference pairs")
    ev = datasets.Dataset.from_dict(columns(eval_idx)) if eval_idx else None
    return Data(datasets.Dataset.from_dict(columns(train_idx)), ev, stats)


def _fitting(rows: list[dict[str, Any]], tokenizer: Any, cutoff: int
             ) -> tuple[list[dict[str, Any]], int]:
    """Rows whose prompt with its longest answer (and an EOS) fits ``cutoff`` tokens. Cutting
    a preference row would compare truncated answers, so a row that does not fit is left out
    (by every preference stage alike; TRL's trainers each differ here)."""
    answers = [k for k in ("chosen", "rejected", "completion") if k in rows[0]] if rows else []
    texts = [r["prompt"] + r[k] for r in rows for k in answers]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    per_row = len(answers)
    keep = [r for i, r in enumerate(rows)
            if max(lengths[i * per_row:(i + 1) * per_row]) + 1 <= cutoff]
    return keep, len(rows) - len(keep)


def prepare_pairs(examples: list[dict[str, Any]], tokenizer: Any, template: str | None,
                  spec: Any, log=print) -> Any:
    """The ``prepare`` of every recipe that trains on pairs (rm, dpo, orpo, cpo)."""
    return preference_data(examples, tokenizer, template, spec, log=log)
