"""hf://ORG/NAME outputs: the final model pushed to the Hugging Face Hub with a model card.

``plan`` decides what goes where (pure: tested without the network); ``push`` creates the
repository (private unless output.private is false) and uploads the plan in one commit. The
push itself is not exercised by the tests (no network here). Checkpoints stay on the pod's
staging disk: the Hub is not a checkpoint store, so a restarted pod starts over unless the
staging directory survived (use s3:// or gs:// to resume across pods).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.credentials import output_secret
from kubetune.errors import OutputError

FIELD = "spec.output.uri"


@dataclass(frozen=True)
class Plan:
    repo_id: str
    private: bool
    files: dict[str, Path]  # path in the repository -> local file
    card: str  # README.md
    token_field: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def repo_id(uri: str) -> str:
    return uri.removeprefix("hf://").strip("/")


def _hub_id(source: str | None) -> str | None:
    if source and source.startswith("hf://"):
        return "/".join(source[5:].split("/")[:2])
    return None


def model_card(spec: Any, result: dict[str, Any], *, adapter: bool) -> str:
    """README.md with metadata (base model, data sets, library, tags) and a body that says
    method, hyper-parameters and metrics."""
    from huggingface_hub import ModelCard, ModelCardData

    base = _hub_id(spec.model.source)
    data = [d for d in (_hub_id(ds.source) for ds in spec.datasets) if d]
    meta = ModelCardData(
        base_model=base, datasets=data or None, library_name="peft" if adapter else
        "transformers", tags=["kubetune", spec.stage, spec.method.type],
        pipeline_tag="text-classification" if spec.stage == "rm" else "text-generation")
    t = spec.training
    hyper = {"stage": spec.stage, "method": spec.method.type,
             "learning_rate": spec.learning_rate(), "epochs": t.epochs,
             "max_steps": t.max_steps, "batch_size_per_device": t.batch_size_per_device,
             "gradient_accumulation": t.gradient_accumulation, "cutoff_len": t.cutoff_len,
             "lr_scheduler": t.lr_scheduler, "warmup_ratio": t.warmup_ratio, "seed": t.seed}
    if adapter and spec.method.lora:
        hyper.update(lora_rank=spec.method.lora.rank, lora_alpha=spec.method.lora.alpha)
    rows = "\n".join(f"| {k} | {v} |" for k, v in hyper.items() if v is not None)
    metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(result.get("metrics", {}
                                                                            ).items()))
    sources = "\n".join(f"- `{ds.source}`" for ds in spec.datasets)
    body = (f"# {repo_id(spec.output.uri).split('/')[-1]}\n\n"
            f"Fine-tuned from `{spec.model.source or spec.model.from_job}` with kubetune "
            f"({spec.stage}, {spec.method.type}), {result.get('global_step')} steps.\n\n"
            f"## Data\n\n{sources}\n\n## Hyper-parameters\n\n| name | value |\n|---|---|\n"
            f"{rows}\n\n## Metrics\n\n| name | value |\n|---|---|\n{metrics}\n")
    return str(ModelCard(f"---\n{meta.to_yaml()}\n---\n\n{body}"))


def plan(spec: Any, out: Any, result: dict[str, Any], written: dict[str, str]) -> Plan:
    """The merged model if there is one, else the adapter, else the whole model, at the
    repository's root; result.json, the loss plot and README.md beside it."""
    adapter = "merged_model" not in written and "adapter" in written
    model_dir = Path(written.get("merged_model") or written.get("adapter")
                     or written["model"])
    files = {p.relative_to(model_dir).as_posix(): p for p in sorted(model_dir.rglob("*"))
             if p.is_file()}
    for extra in (out.result, out.root / "loss.png"):
        if extra.exists():
            files[extra.name] = extra
    secret = output_secret(spec)
    return Plan(repo_id(spec.output.uri), spec.output.private, files,
                model_card(spec, result, adapter=adapter),
                secret.field if secret else None)


def push(p: Plan, *, spec: Any = None, log=print) -> str:
    """Create the repository and upload the plan in one commit (not run by the tests)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    secret = output_secret(spec) if spec is not None else None
    token = secret.require() if secret else None
    api = HfApi(token=token)
    try:
        api.create_repo(p.repo_id, private=p.private, exist_ok=True)
        ops = [CommitOperationAdd(path_in_repo=k, path_or_fileobj=str(v))
               for k, v in p.files.items()]
        ops.append(CommitOperationAdd(path_in_repo="README.md",
                                      path_or_fileobj=p.card.encode()))
        info = api.create_commit(p.repo_id, operations=ops,
                                 commit_message="kubetune: fine-tuned model")
    except Exception as exc:
        from kubetune_trainer.storage import store_error

        raise store_error(exc, f"pushing to hf://{p.repo_id}", field=FIELD,
                          secret_field=p.token_field, cls=OutputError) from None
    log(f"output: pushed to https://huggingface.co/{p.repo_id} ({len(ops)} files)")
    return str(getattr(info, "commit_url", ""))
