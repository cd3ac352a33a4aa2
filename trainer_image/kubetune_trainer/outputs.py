"""Where a run writes, and how: every output appears whole or not at all.

Each directory is written as ``NAME.partial`` and then swapped in; each file as ``NAME.tmp``
and renamed. A run killed half-way leaves the previous output (or none), never half of one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.errors import KubetuneError

from kubetune_trainer.config import RunContext
from kubetune_trainer.sources import resolve, split_uri

RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.jsonl"
STATUS_KEYS = {"adapter": "adapter", "merged_model": "mergedModel", "model": "model"}


@dataclass(frozen=True)
class Layout:
    """Where a run writes, under the job's output location."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def progress(self) -> Path:
        return self.root / PROGRESS_FILE

    @property
    def result(self) -> Path:
        return self.root / RESULT_FILE


def output_root(spec: FineTuneJobSpec, ctx: RunContext) -> Path:
    scheme, _ = split_uri(spec.output.uri)
    if scheme not in ("", "file", "pvc"):
        raise KubetuneError(f"{scheme}:// outputs are not supported yet; use a local path or "
                            "pvc://CLAIM/path", field="spec.output.uri")
    return resolve(spec.output.uri, ctx, field="spec.output.uri", kind="output")


def staging(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def swap_in(staged: Path, target: Path) -> None:
    """Replace ``target`` by the fully written ``staged`` directory."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staged.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def replace_dir(target: Path, write: Callable[[Path], Any]) -> Path:
    """Write into a fresh staging directory, then swap it in."""
    tmp = staging(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    swap_in(tmp, target)
    return target


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.rename(path)


def save_whole_model(trainer: Any, out: Layout) -> None:
    """Every rank calls this (ZeRO-3/FSDP gather the weights); rank 0 writes the staging dir."""
    trainer.save_model(str(staging(out.model)))
    trainer.accelerator.wait_for_everyone()


def save(trainer: Any, tokenizer: Any, spec: FineTuneJobSpec, out: Layout, *, adapter: bool,
         head: str) -> dict[str, str]:
    """Rank 0, after ``save_whole_model`` on every rank for whole-model methods. Returns what
    was written: adapter (+ merged_model), or model."""
    model = trainer.model
    model.config.use_cache = True
    written: dict[str, str] = {}

    def with_tokenizer(obj: Any) -> Callable[[Path], None]:
        return lambda p: (obj.save_pretrained(p), tokenizer.save_pretrained(p))

    if adapter:
        written["adapter"] = str(replace_dir(out.adapter, with_tokenizer(model)))
        if spec.output.merge:
            merged = _merge_full_precision(model, head) if spec.method.type == "qlora" \
                else model.merge_and_unload()
            written["merged_model"] = str(replace_dir(out.merged, with_tokenizer(merged)))
    else:
        tokenizer.save_pretrained(staging(out.model))
        swap_in(staging(out.model), out.model)
        written["model"] = str(out.model)
    return written


def _merge_full_precision(model: Any, head: str) -> Any:
    """QLoRA: merge the adapter into an unquantized copy of the base model."""
    import tempfile

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base_path = model.peft_config["default"].base_model_name_or_path
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        if head == "reward":
            base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=1)
        else:
            base = AutoModelForCausalLM.from_pretrained(base_path)
        return PeftModel.from_pretrained(base, tmp).merge_and_unload()


def status_outputs(spec: FineTuneJobSpec, written: dict[str, str]) -> dict[str, str]:
    """The same outputs as URIs under spec.output.uri, keyed as in the FineTuneJob status."""
    base = spec.output.uri.rstrip("/")
    return {STATUS_KEYS[k]: f"{base}/{Path(v).name}" for k, v in written.items()}
