"""After the last step: the fine-tuned model answers the held-out prompts (predict with
generate), scored against the reference answers with ROUGE-1/2/L and BLEU-4 as LLaMA-Factory
reports them (x100; Chinese text segmented with jieba), through rouge-score and sacrebleu.

Writes ``generated_predictions.jsonl`` (prompt, label, prediction per line) in the output.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

PREDICTIONS_FILE = "generated_predictions.jsonl"
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def perplexity(metrics: dict[str, float]) -> dict[str, float]:
    """eval_perplexity = exp(eval_loss), where the loss is a mean token cross-entropy."""
    loss = metrics.get("eval_loss")
    if loss is None or not math.isfinite(loss) or loss > 700:
        return {}
    return {"eval_perplexity": math.exp(loss)}


class _Words:
    """rouge-score's tokenizer interface: words, or jieba's segments for Chinese text."""

    def tokenize(self, text: str) -> list[str]:
        if _CJK.search(text):
            import jieba

            return [t for t in jieba.lcut(text) if t.strip()]
        return re.findall(r"\w+", text.lower())


def scores(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 and sentence BLEU-4 (smoothed) over (prediction, label) pairs."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Words())
    totals = {"predict_rouge1": 0.0, "predict_rouge2": 0.0, "predict_rougeL": 0.0,
              "predict_bleu4": 0.0}
    for prediction, label in pairs:
        r = scorer.score(label, prediction)
        totals["predict_rouge1"] += r["rouge1"].fmeasure * 100
        totals["predict_rouge2"] += r["rouge2"].fmeasure * 100
        totals["predict_rougeL"] += r["rougeL"].fmeasure * 100
        zh = bool(_CJK.search(label))
        totals["predict_bleu4"] += sacrebleu.sentence_bleu(
            prediction, [label], tokenize="zh" if zh else "13a",
            smooth_method="add-k").score
    return {k: round(v / max(1, len(pairs)), 4) for k, v in totals.items()}


def predict(model: Any, tokenizer: Any, template: str, examples: list[dict[str, Any]],
            out: Path, *, max_samples: int, max_new_tokens: int) -> dict[str, float]:
    """Greedy answers to the held-out prompts (each conversation up to its last answer)."""
    import torch

    from kubetune_trainer.data.preprocess import Renderer

    renderer = Renderer(tokenizer, template)
    model.eval()
    model.config.use_cache = True
    pairs: list[tuple[str, str]] = []
    rows = []
    device = next(model.parameters()).device
    for ex in examples[:max_samples]:
        msgs = ex.get("messages") or []
        if not msgs or msgs[-1]["role"] != "assistant":
            continue
        prompt = renderer.prompt({**ex, "messages": msgs[:-1]})
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        prediction = tokenizer.decode(gen[0, ids["input_ids"].shape[1]:],
                                      skip_special_tokens=True).strip()
        label = msgs[-1]["content"]
        pairs.append((prediction, label))
        rows.append({"prompt": prompt, "label": label, "prediction": prediction})
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.rename(out)
    return {**scores(pairs), "predict_samples": float(len(pairs))}
