"""``kubetune validate``: everything a run would check before training, without training."""

from __future__ import annotations

from collections.abc import Iterator

from kubetune.api.v1alpha1 import FineTuneJob

from kubetune_trainer.config import RunContext


def preflight_all(job: FineTuneJob, ctx: RunContext) -> Iterator[str]:
    from kubetune.errors import KubetuneError

    from kubetune_trainer.data.loading import load_examples
    from kubetune_trainer.data.preprocess import Options, resolve_template, tokenize
    from kubetune_trainer.sources import resolve
    from kubetune_trainer.train import load_tokenizer, output_root, preflight

    spec = job.spec
    preflight(spec)
    yield f"output: {output_root(spec, ctx)}"
    examples, report = load_examples(spec.datasets, spec.stage, ctx,
                                     max_invalid_fraction=spec.training.max_invalid_fraction)
    yield f"data: {report.summary()}"
    model_path = resolve(spec.model.source, ctx, field="spec.model.source",
                         revision=spec.model.revision)
    if not (model_path / "config.json").exists():
        raise KubetuneError(f"no model at {model_path}", field="spec.model.source")
    tokenizer = load_tokenizer(model_path, spec)
    chat = any("messages" in ex for ex in examples)
    template = resolve_template(tokenizer, spec.template) if chat else None
    t = spec.training
    sample = tokenize(examples[:200], tokenizer, template,
                      Options(spec.stage, t.cutoff_len, t.train_on_prompt, t.mask_history))
    yield (f"model: {model_path}; template renders; first {sample.stats.examples} examples "
           f"give {sample.stats.trained_tokens} trained tokens")
