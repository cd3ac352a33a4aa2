"""``kubetune import --check``: the same config through the tool's own loader, where the tool
is installed, and its resolved hyper-parameters compared with the job's.

Nothing here is pretended: a tool that is not installed is said to be so and skipped. The
loaders are imported only here (each costs seconds: torch, transformers).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune.importing import Context, Imported

MODULES = {"llamafactory": "llamafactory", "axolotl": "axolotl", "trl": "trl"}


def compare(tool: str, config: Path, imported: Imported, ctx: Context) -> list[str]:
    module = MODULES[tool]
    if importlib.util.find_spec(module) is None:
        return [f"--check: {module} is not installed here: skipped (nothing was compared); "
                f"install {tool} in this environment to compare its resolved "
                "hyper-parameters with the job's"]
    try:
        resolved, version = RESOLVERS[tool](config, ctx)
    except Exception as err:  # the tool's own loader refused or failed: say so, in one line
        text = " ".join(str(err).split())[:300]
        return [f"--check: {tool}'s own loader did not resolve {config.name}: "
                f"{type(err).__name__}: {text}"]
    from kubetune.jobfile import parse_job

    # the job as kubetune reads it: its defaults filled in
    spec = parse_job(imported.job).spec.model_dump(by_alias=True, mode="json")
    agree, differ = [], []
    for name, path, how in PAIRS[tool]:
        if name not in resolved:
            continue
        want = how(resolved[name]) if how else resolved[name]
        have = _get(spec, path)
        if want is _SKIP or (have is None and path.startswith(("method.", "preference."))):
            continue  # a section the job does not have (no adapter, no preference stage)
        if _same(want, have):
            agree.append(name)
        else:
            differ.append(f"{name}: {tool} {want!r}, job {path} {have!r}")
    lines = [f"--check: {tool} {version} resolved {config.name} with its own loader: "
             f"{len(agree)} hyper-parameters agree ({', '.join(agree)})"]
    if differ:
        lines.append(f"--check: {len(differ)} differ:")
        lines += [f"  {d}" for d in differ]
    return lines


_SKIP = object()


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


def _precision(args: Any) -> str:
    return "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(
        args, "fp16", False) else "fp32"


# --------------------------------------------------------------------------- TRL


def _trl(config: Path, ctx: Context) -> tuple[dict[str, Any], str]:
    import dataclasses

    import trl
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    command = ctx.stage or "sft"
    configs = {"sft": "SFTConfig", "dpo": "DPOConfig", "kto": "KTOConfig",
               "reward": "RewardConfig"}
    if command == "orpo":
        from trl.experimental.orpo import ORPOConfig as cls
    else:
        cls = getattr(trl, configs[command])
    import warnings

    import torch

    parser = TrlParser((ScriptArguments, cls, ModelConfig, DatasetMixtureConfig))
    # transformers refuses bf16 on a machine without a GPU unless use_cpu: the device is not
    # a hyper-parameter, so resolve as the GPU machine would.
    extra = [] if torch.cuda.is_available() else ["--use_cpu", "true"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, training, model, _ = parser.parse_args_and_config(["--config", str(config), *extra])
    resolved = {f.name: getattr(training, f.name) for f in dataclasses.fields(training)}
    resolved.update({f"model.{f.name}": getattr(model, f.name)
                     for f in dataclasses.fields(model)})
    resolved["precision"] = _precision(training)
    return resolved, trl.__version__


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
    "llamafactory": _HF + [
        ("cutoff_len", "training.cutoffLen", None),
        ("lora_rank", "method.lora.rank", None),
        ("lora_alpha", "method.lora.alpha", None),
        ("finetuning_type", "method.type", None),
        ("pref_beta", "preference.beta", None),
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


# --------------------------------------------------------------------------- the others
# (not installed where this was written: these run only where the tool is, and a failure
# of their loader is reported as such, never as agreement)


def _llamafactory(config: Path, ctx: Context) -> tuple[dict[str, Any], str]:
    import dataclasses

    import llamafactory
    import yaml
    from llamafactory.hparams import get_train_args

    args = get_train_args(yaml.safe_load(config.read_text()))
    resolved: dict[str, Any] = {}
    for part in args:
        if dataclasses.is_dataclass(part):
            resolved.update({f.name: getattr(part, f.name) for f in dataclasses.fields(part)})
    resolved["precision"] = _precision(args[2])
    return resolved, getattr(llamafactory, "__version__", "?")


def _axolotl(config: Path, ctx: Context) -> tuple[dict[str, Any], str]:
    import axolotl
    from axolotl.cli.config import load_cfg

    cfg = load_cfg(str(config))
    return dict(cfg), getattr(axolotl, "__version__", "?")


RESOLVERS: dict[str, Callable[[Path, Context], tuple[dict[str, Any], str]]] = {
    "trl": _trl, "llamafactory": _llamafactory, "axolotl": _axolotl}
