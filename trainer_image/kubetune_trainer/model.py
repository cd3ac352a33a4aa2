"""The model side of a run: tokenizer, precision, loading, and the method as a table.

A recipe says which head it trains (``causal``: a language model; ``reward``: one score per
sequence); the method (full / freeze / lora / qlora) says how the weights are loaded, which of
them train, and what a run saves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune.errors import KubetuneError


@dataclass(frozen=True)
class Method:
    adapter: bool  # trains a PEFT adapter (saved on its own, mergeable)
    quantized: bool = False  # base weights loaded in 4 bits (bitsandbytes)
    prepare: Callable[[Any, FineTuneJobSpec], None] | None = None  # after loading


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def precision(spec: FineTuneJobSpec) -> dict[str, bool]:
    """TrainingArguments' bf16/fp16 flags for training.precision ("auto": bf16 on a GPU that
    has it, else fp32)."""
    import torch

    want = spec.training.precision
    if want == "auto":
        want = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": want == "bf16", "fp16": want == "fp16"}


def load_tokenizer(model_path: Path, spec: FineTuneJobSpec) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path,
                                        trust_remote_code=spec.model.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.is_fast:
        raise KubetuneError("the model needs a fast (Rust) tokenizer for answer masking",
                            field="spec.model.source")
    return tok


def _decoder_layers(model: Any) -> Any:
    import torch

    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise KubetuneError("cannot find the decoder layers for method.type freeze",
                        field="spec.method.type")


def apply_freeze(model: Any, spec: FineTuneJobSpec) -> None:
    """Train only the last (or first) N decoder layers, optionally only some modules."""
    fr = spec.method.freeze_or_default()
    layers = _decoder_layers(model)
    n = len(layers)
    if not 0 < abs(fr.trainable_layers) <= n:
        raise KubetuneError(f"trainableLayers must be between -{n} and {n} (not 0) for a "
                            f"{n}-layer model", field="spec.method.freeze.trainableLayers")
    picked = range(n - fr.trainable_layers, n) if fr.trainable_layers > 0 else \
        range(0, -fr.trainable_layers)
    for p in model.parameters():
        p.requires_grad_(False)
    hits = 0
    for i in picked:
        for name, p in layers[i].named_parameters():
            if "all" in fr.trainable_modules or any(m in name for m in fr.trainable_modules):
                p.requires_grad_(True)
                hits += 1
    extra = list(fr.extra_modules)
    if getattr(model.config, "num_labels", None) == 1 and hasattr(model, "score"):
        extra.append("score")  # a reward model's head is new: it must train
    for name, p in model.named_parameters():
        if any(m in name for m in extra):
            p.requires_grad_(True)
            hits += 1
    if hits == 0:
        raise KubetuneError(f"no parameter matches trainableModules {fr.trainable_modules}",
                            field="spec.method.freeze.trainableModules")


def _prepare_kbit(model: Any, spec: FineTuneJobSpec) -> None:
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=spec.training.gradient_checkpointing)


METHODS: dict[str, Method] = {
    "full": Method(adapter=False),
    "freeze": Method(adapter=False, prepare=apply_freeze),
    "lora": Method(adapter=True),
    "qlora": Method(adapter=True, quantized=True, prepare=_prepare_kbit),
}


def method(spec: FineTuneJobSpec) -> Method:
    return METHODS[spec.method.type]


def load_model(model_path: Path, spec: FineTuneJobSpec, *, head: str = "causal",
               pad_token_id: int | None = None) -> Any:
    """The model to train: a causal LM, or (``head="reward"``) a one-score sequence classifier
    on the same backbone, its new head initialised by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    m = method(spec)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.model.trust_remote_code}
    kwargs["dtype"] = torch.bfloat16 if precision(spec)["bf16"] else torch.float32
    if m.quantized:
        from kubetune.strategy import STRATEGIES, strategy_of
        from transformers import BitsAndBytesConfig

        # ZeRO-3 and FSDP shard the 4-bit weights too: stored in the compute dtype's words.
        storage = kwargs["dtype"] if STRATEGIES[strategy_of(spec)].shard_weights else None
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"],
            **({"bnb_4bit_quant_storage": storage} if storage is not None else {}))
    if head == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1,
                                                                   **kwargs)
        if pad_token_id is not None:  # the score is read at the last non-pad token
            model.config.pad_token_id = pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False  # training; also lets packed rows get block masks
    if m.prepare is not None:
        m.prepare(model, spec)
    return model


def peft_config(spec: FineTuneJobSpec, *, head: str = "causal") -> Any:
    """The LoRA adapter for lora/qlora (None otherwise). A reward model's score head is new,
    so it trains in full and is saved with the adapter."""
    if not method(spec).adapter:
        return None
    from peft import LoraConfig

    lo = spec.method.lora_or_default()
    targets = lo.target_modules
    return LoraConfig(
        r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
        task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM",
        modules_to_save=["score"] if head == "reward" else None,
        target_modules="all-linear" if targets == ["all-linear"] else targets)


ADAM_STATES = 2  # AdamW keeps two moments per trained parameter, in the parameter's dtype


def weight_shapes(model_path: Path) -> dict[str, list[int]]:
    """Tensor name → shape, from the safetensors headers alone (no weights are read)."""
    import json
    import struct

    shapes: dict[str, list[int]] = {}
    for f in sorted(model_path.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def checkpoint_bytes(model_path: Path, spec: FineTuneJobSpec) -> int | None:
    """About how many bytes one checkpoint of this run takes (None when the model is not in
    safetensors): full/freeze save the weights plus AdamW's states for the trained ones,
    lora/qlora the adapter (fp32) plus its states; the tokenizer files come with each."""
    import math

    try:
        shapes = weight_shapes(model_path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not shapes:
        return None
    width = 2 if precision(spec)["bf16"] else 4
    params = sum(math.prod(s) for s in shapes.values())
    tokenizer = sum(f.stat().st_size for f in model_path.glob("tokenizer*") if f.is_file())
    kind = spec.method.type
    if kind == "full":
        return params * width * (1 + ADAM_STATES) + tokenizer
    if kind == "freeze":
        layers = max(1, int(_config(model_path).get("num_hidden_layers") or 1))
        share = min(1.0, abs(spec.method.freeze_or_default().trainable_layers) / layers)
        return int(params * width * (1 + ADAM_STATES * share)) + tokenizer
    lo = spec.method.lora_or_default()
    targets = set(lo.target_modules)
    adapter = 0
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(shape) != 2 or parts[-1] != "weight" or len(parts) < 2:
            continue
        module = parts[-2]
        if "all-linear" in targets:
            hit = "layers" in name and "embed" not in module and module != "lm_head"
        else:
            hit = module in targets
        if hit:
            adapter += lo.rank * (shape[0] + shape[1])
    return adapter * 4 * (1 + ADAM_STATES) + tokenizer


def _config(model_path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data.get("text_config", data) if isinstance(data, dict) else {}
