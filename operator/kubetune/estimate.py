"""Per-GPU memory of a job, from the model's config.json alone (no weights, no torch).

What the trainer holds on each GPU (data parallel: every GPU holds all of it):
- weights: parameters × bytes of the load dtype (bf16/fp16: 2, fp32: 4; 4-bit QLoRA ≈ 0.53);
- gradients and AdamW's two moments for what trains, in the trainable weights' dtype (the
  whole model for full; the last layers for freeze; LoRA adapters, which PEFT keeps in fp32);
  full fine-tuning in fp32 is the classic 16 bytes per parameter (4 + 4 + 8);
- activations per layer ≈ 34 × tokens × hidden bytes at 16 bits (Korthikanti et al. 2022, with
  fused attention: no seq² term); with gradient checkpointing the layer inputs only, plus one
  layer's worth; the logits (tokens × vocab, fp32, and their gradient);
- a fixed 1 GiB for the CUDA context and kernels, and 10 % for fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3
_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Estimate:
    parts: dict[str, float] = field(default_factory=dict)  # bytes per GPU
    params: int = 0
    trainable: int = 0

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def lines(self) -> list[str]:
        out = [f"{name:<14} {size / GIB:8.2f} GiB" for name, size in self.parts.items()]
        out.append(f"{'total':<14} {self.total / GIB:8.2f} GiB per GPU "
                   f"({self.params / 1e6:,.0f}M parameters, {self.trainable / 1e6:,.1f}M "
                   "trained)")
        return out


def _shape(config: dict[str, Any]) -> dict[str, int]:
    try:
        h, n_layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        shape = {"hidden": h, "layers": n_layers, "vocab": int(config["vocab_size"]),
                 "inter": int(config.get("intermediate_size") or 4 * h), "heads": heads,
                 "kv": int(config.get("num_key_value_heads") or heads),
                 "head_dim": int(config.get("head_dim") or h // heads),
                 "tied": int(bool(config.get("tie_word_embeddings", False)))}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"config.json lacks {err} (only decoder-only transformers with "
                         "hidden_size, num_hidden_layers, … are estimated)") from None
    return shape


def _linear_shapes(s: dict[str, int]) -> dict[str, tuple[int, int]]:
    h, q, kv = s["hidden"], s["heads"] * s["head_dim"], s["kv"] * s["head_dim"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, s["inter"]), "up_proj": (h, s["inter"]),
            "down_proj": (s["inter"], h)}


def parameters(config: dict[str, Any]) -> tuple[int, int]:
    """(all parameters, parameters per decoder layer)."""
    s = _shape(config)
    layer = sum(a * b for a, b in _linear_shapes(s).values()) + 2 * s["hidden"]
    embed = s["vocab"] * s["hidden"] * (1 if s["tied"] else 2)
    return embed + s["layers"] * layer + s["hidden"], layer


def estimate(config: dict[str, Any], spec: Any, *, gpu: bool = True) -> Estimate:
    """Bytes per GPU for ``spec`` (a FineTuneJobSpec) on the model ``config``."""
    s = _shape(config)
    total, per_layer = parameters(config)
    t, method = spec.training, spec.method.type
    quant = spec.method.quantization  # QLoRA: the frozen base in 4 (or 8) bits
    width = 4 if t.precision == "fp32" or (t.precision == "auto" and not gpu) else 2
    est = Estimate(params=total)
    est.parts["weights"] = total * (width if quant is None else 0.53 if quant.bits == 4 else 1.03)
    if method == "lora":
        lo = spec.method.lora_or_default()
        targets = _LORA_TARGETS if lo.target_modules == ["all-linear"] else \
            tuple(m for m in lo.target_modules if m in _LORA_TARGETS)
        shapes = _linear_shapes(s)
        est.trainable = s["layers"] * sum(lo.rank * (shapes[m][0] + shapes[m][1])
                                          for m in targets)
        trained_width = 4  # PEFT keeps adapters in fp32
    elif method == "freeze" and spec.method.spectrum is not None:  # a share of every layer
        est.trainable = int(spec.method.spectrum.top_fraction * s["layers"] * per_layer)
        trained_width = width
    elif method == "freeze":
        est.trainable = abs(spec.method.freeze_or_default().trainable_layers) * per_layer
        trained_width = width
    else:
        est.trainable, trained_width = total, width
    est.parts["gradients"] = est.trainable * trained_width
    est.parts["optimizer"] = est.trainable * trained_width * 2  # AdamW: two moments
    tokens = t.batch_size_per_device * t.cutoff_len
    act = 34 * tokens * s["hidden"] * width / 2
    est.parts["activations"] = (s["layers"] * 2 * tokens * s["hidden"] * width / 2 + act
                                if t.gradient_checkpointing else s["layers"] * act)
    est.parts["logits"] = tokens * s["vocab"] * 4 * 2
    est.parts["overhead"] = GIB + 0.1 * sum(est.parts.values())
    return est


def fixes(spec: Any) -> list[str]:
    """The cheapest changes that cut the estimate, for a job that does not fit."""
    t, out = spec.training, []
    if spec.method.type in ("full", "freeze"):
        out.append("method.type: lora (with method.quantization.bits 4: QLoRA)")
    elif spec.method.type == "lora" and spec.method.quantization is None:
        out.append("method.quantization: {bits: 4} (QLoRA: the base in 4 bits)")
    if not t.gradient_checkpointing:
        out.append("training.gradientCheckpointing: true")
    if t.batch_size_per_device > 1:
        out.append(f"training.batchSizePerDevice: {max(1, t.batch_size_per_device // 2)} "
                   "with gradientAccumulation doubled")
    out.append(f"training.cutoffLen below {t.cutoff_len}")
    return out
