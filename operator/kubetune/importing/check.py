"""``kubetune import --check``: the same config through the tool's own loader, where the tool
is installed, and its resolved hyper-parameters compared with the job's.

Nothing here is pretended: a tool that is not installed is said to be so and skipped. The
loader runs in a separate process (``_resolve.py``) with the Python of the tool's own
environment (``--check-python``; by default kubetune's, where TRL comes with the trainer
extra), since each tool pins its own transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune.importing import Context, Imported

MODULES = {"llamafactory": "llamafactory", "axolotl": "axolotl", "trl": "trl"}
RESOLVE = Path(__file__).with_name("_resolve.py")


def compare(tool: str, config: Path, imported: Imported, ctx: Context,
            python: Path | None = None) -> list[str]:
    """Lines for stderr: what the tool's own loader resolved, compared with the job."""
    module = MODULES[tool]
    if python is None:
        if importlib.util.find_spec(module) is None:
            return [f"--check: {module} is not installed here: skipped (nothing was "
                    f"compared); install {tool} here, or give --check-python with the Python "
                    "of an environment that has it"]
        python = Path(sys.executable)
    answer = _run(python, tool, config, ctx)
    if "error" in answer:
        if answer.get("missing"):
            return [f"--check: {answer['error']}: skipped (nothing was compared)"]
        return [f"--check: {tool}'s own loader did not resolve {config.name}: "
                f"{answer['error']}"]
    resolved = answer["resolved"]
    resolved["precision"] = ("bf16" if resolved.get("bf16") or resolved.get("pure_bf16")
                             else "fp16" if resolved.get("fp16") else "fp32")
    from kubetune.jobfile import parse_job

    # the job as kubetune reads it: its defaults filled in
    spec = parse_job(imported.job).spec.model_dump(by_alias=True, mode="json")
    agree, differ = [], []
    optimizer = str(_get(spec, "training.optimizer.name"))
    for name, path, how in PAIRS[tool]:
        if name not in resolved or (name.startswith(_OPTIMIZER_KEYS) and not optimizer.startswith(
                name.split("_")[0])):
            continue  # galore_rank for a job without GaLore, …
        want = how(resolved[name]) if how else resolved[name]
        have = _get(spec, path)
        if want is _SKIP or (have is None and path.startswith(
                ("method.", "preference.", "training.optimizer."))):
            continue  # a section the job does not have (no adapter, no preference stage)
        if _same(want, have):
            agree.append(name)
        else:
            differ.append(f"{name}: {tool} {want!r}, job {path} {have!r}")
    lines = [f"--check: {tool} {answer['version']} resolved {config.name} with its own "
             f"loader: {len(agree)} hyper-parameters agree ({', '.join(agree)})"]
    if differ:
        lines.append(f"--check: {len(differ)} differ:")
        lines += [f"  {d}" for d in differ]
    return lines


def _run(python: Path, tool: str, config: Path, ctx: Context) -> dict[str, Any]:
    """The resolver in the tool's environment, from the tool's working folder (its relative
    paths: DeepSpeed configs, dataset_dir)."""
    cmd = [str(python), str(RESOLVE), tool, str(config.absolute()), ctx.stage or "sft"]
    try:
        done = subprocess.run(cmd, cwd=ctx.base_dir, capture_output=True, text=True,
                              timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except (OSError, subprocess.TimeoutExpired) as err:
        return {"error": f"{python} could not run the loader: {err}"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    tail = " ".join((done.stderr or done.stdout).split())[-300:]
    return {"error": f"{python} exited {done.returncode} without an answer: {tail}"}


_SKIP = object()
_OPTIMIZER_KEYS = ("galore_", "apollo_", "badam_")


def _get(spec: dict[str, Any], path: str) -> Any:
    node: Any = spec
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
        except (TypeError, ValueError):
            return False
    return a == b


def _enum(value: Any) -> Any:
    return getattr(value, "value", value)


def _steps(value: Any) -> Any:
    return None if value is None or value <= 0 else value


def _warmup(value: Any) -> Any:
    """transformers 5: warmup_steps below 1 is a ratio; other step counts are not compared."""
    return value if isinstance(value, float) and 0 < value < 1 else _SKIP


_HF: list[tuple[str, str, Callable[[Any], Any] | None]] = [
    ("learning_rate", "training.learningRate", None),
    ("num_train_epochs", "training.epochs", None),
    ("max_steps", "training.maxSteps", _steps),
    ("lr_scheduler_type", "training.lrScheduler", _enum),
    ("warmup_steps", "training.warmupRatio", _warmup),
    ("weight_decay", "training.weightDecay", lambda v: _SKIP if v == 0 else v),
    ("max_grad_norm", "training.maxGradNorm", lambda v: _SKIP if v == 1 else v),
    ("per_device_train_batch_size", "training.batchSizePerDevice", None),
    ("gradient_accumulation_steps", "training.gradientAccumulation", None),
    ("seed", "training.seed", lambda v: _SKIP if v == 42 else v),
    ("logging_steps", "training.logSteps", None),
    ("save_steps", "training.saveSteps", None),
    ("gradient_checkpointing", "training.gradientCheckpointing", None),
    ("precision", "training.precision", None),
]


PAIRS: dict[str, list[tuple[str, str, Callable[[Any], Any] | None]]] = {
    "trl": _HF + [
        ("max_length", "training.cutoffLen", None),
        ("packing", "training.packing", None),
        ("beta", "preference.beta", None),
        ("desirable_weight", "preference.desirableWeight", lambda v: _SKIP if v == 1 else v),
        ("undesirable_weight", "preference.undesirableWeight",
         lambda v: _SKIP if v == 1 else v),
        ("model.use_peft", "method.type", lambda v: "lora" if v else "full"),
        ("model.lora_r", "method.lora.rank", None),
        ("model.lora_alpha", "method.lora.alpha", None),
        ("model.lora_dropout", "method.lora.dropout", None),
        ("model.load_in_4bit", "method.quantization.bits", lambda v: 4 if v else _SKIP),
    ],
    "llamafactory": [p for p in _HF if p[0] != "gradient_checkpointing"] + [
        # LLaMA-Factory turns checkpointing on itself, outside TrainingArguments
        ("disable_gradient_checkpointing", "training.gradientCheckpointing", lambda v: not v),
        ("cutoff_len", "training.cutoffLen", None),
        ("packing", "training.packing", bool),
        ("train_on_prompt", "training.trainOnPrompt", None),
        ("val_size", "training.evalSplit", None),
        ("finetuning_type", "method.type", None),
        ("lora_rank", "method.lora.rank", None),
        ("lora_alpha", "method.lora.alpha", None),
        ("lora_dropout", "method.lora.dropout", None),
        ("use_dora", "method.lora.dora", None),
        ("freeze_trainable_layers", "method.freeze.trainableLayers", None),
        ("quantization_bit", "method.quantization.bits", None),
        ("galore_rank", "training.optimizer.rank", None),
        ("galore_scale", "training.optimizer.scale", None),
        ("apollo_rank", "training.optimizer.rank", None),
        ("apollo_scale", "training.optimizer.scale", None),
        ("badam_switch_interval", "training.optimizer.switchEvery", None),
        ("pref_beta", "preference.beta", None),
        ("kto_chosen_weight", "preference.desirableWeight", None),
        ("simpo_gamma", "preference.simpoGamma", None),
    ],
    "axolotl": [
        ("learning_rate", "training.learningRate", None),
        ("num_epochs", "training.epochs", None),
        ("micro_batch_size", "training.batchSizePerDevice", None),
        ("gradient_accumulation_steps", "training.gradientAccumulation", None),
        ("sequence_len", "training.cutoffLen", None),
        ("sample_packing", "training.packing", lambda v: bool(v)),
        ("lr_scheduler", "training.lrScheduler", _enum),
        ("lora_r", "method.lora.rank", None),
        ("lora_alpha", "method.lora.alpha", None),
    ],
}
