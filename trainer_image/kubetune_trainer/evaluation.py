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

    from kubetune_trainer.data.templates import Renderer

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


def lm_eval(settings: Any, written: dict[str, str], ctx: Any, root: Path, *, log=print
            ) -> dict[str, float]:
    """evaluation.lmEval: lm-evaluation-harness on the final model (the merged or whole
    model, else base + adapter), its tasks found in ``include`` (run from that directory, so
    a task's relative ``data_files`` are read from there). Scores as lmeval_TASK_METRIC; the
    full results in lm_eval_results.json."""
    import contextlib
    import os

    from kubetune.errors import KubetuneError

    from kubetune_trainer.sources import resolve

    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise KubetuneError(f"needs the lm-eval package in the trainer ({err})",
                            field="spec.evaluation.lmEval") from None
    model_args: dict[str, Any] = {"dtype": "float32"}
    if path := written.get("merged_model") or written.get("model"):
        model_args["pretrained"] = path
    else:
        adapter = Path(written["adapter"])
        base = json.loads((adapter / "adapter_config.json").read_text())
        model_args.update(pretrained=base["base_model_name_or_path"], peft=str(adapter),
                          tokenizer=str(adapter))
    include = None
    if settings.include:
        include = resolve(settings.include, ctx, field="spec.evaluation.lmEval.include",
                          kind="dataset")
        if not include.is_dir():
            raise KubetuneError(f"{settings.include} is not a directory of task YAML files",
                                field="spec.evaluation.lmEval.include")
    manager = None
    if include:  # only the given directory when it has every task: indexing lm-eval's
        manager = TaskManager(include_path=str(include), include_defaults=False)  # own ~20 s
        if any(not manager.match_tasks([t]) for t in settings.tasks):
            manager = None
    manager = manager or TaskManager(include_path=str(include) if include else None)
    unknown = [t for t in settings.tasks if not manager.match_tasks([t])]
    if unknown:
        raise KubetuneError(f"unknown lm-eval task {', '.join(unknown)}" + (
            f" (not in {settings.include} nor built in)" if include else
            " (give include: a directory with its YAML)"), field="spec.evaluation.lmEval.tasks")
    log(f"evaluation: lm-eval {', '.join(settings.tasks)}")
    import torch

    with contextlib.chdir(include or os.getcwd()):
        out = simple_evaluate(
            model="hf", model_args=model_args, tasks=list(settings.tasks),
            task_manager=manager, limit=settings.limit, num_fewshot=settings.num_fewshot,
            batch_size=settings.batch_size, device="cuda" if torch.cuda.is_available()
            else "cpu", log_samples=False, verbosity="ERROR")
    results = out["results"] if out else {}
    tmp = root / "lm_eval_results.json.tmp"
    tmp.write_text(json.dumps({"results": results, "configs": out.get("configs") if out
                               else None}, indent=2, default=str))
    tmp.rename(root / "lm_eval_results.json")
    scores_: dict[str, float] = {}
    for task, metrics in results.items():
        for name, value in metrics.items():
            metric, _, filt = name.partition(",")
            if not isinstance(value, int | float) or isinstance(value, bool) or \
                    not math.isfinite(value) or metric in ("alias", "sample_len"):
                continue
            key = "_".join(p for p in (task, metric, "" if filt == "none" else filt) if p)
            scores_["lmeval_" + re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:96]] = float(value)
    return scores_
