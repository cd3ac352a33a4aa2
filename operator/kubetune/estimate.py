"""Per-GPU memory of a job, from the model's config.json alone (no weights, no torch).

What the trainer holds on each GPU:
- weights: parameters × bytes of the load dtype (bf16/fp16: 2, fp32: 4; 4-bit QLoRA ≈ 0.53);
- gradients and the optimizer's state for what trains (the whole model for full; the last
  layers for freeze; LoRA adapters, which PEFT keeps in fp32). Under ddp and fsdp2 they are in
  the trained weights' dtype (AdamW: two moments); DeepSpeed keeps an fp32 master copy and fp32
  moments for 16-bit weights: the ZeRO paper's mixed-precision Adam, 2 + 2 + 12 = 16 bytes per
  parameter (fp32 full fine-tuning is 16 bytes under every strategy: 4 + 4 + 8);
- the strategy (``kubetune.strategy``) divides by the number of processes N what it shards:
  zero2 the gradients and optimizer state, zero3 and fsdp2 the weights too (plus two layers
  gathered at a time); the offload strategies keep the optimizer state (zero3-offload also
  the weights) in CPU memory instead;
- activations per layer ≈ 34 × tokens × hidden bytes at 16 bits (Korthikanti et al. 2022, with
  fused attention: no seq² term); with gradient checkpointing the layer inputs only, plus one
  layer's worth; the logits (tokens × vocab, fp32, and their gradient);
- a fixed 1 GiB for the CUDA context and kernels, and 10 % for fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

GIB = 1024**3
_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Estimate:
    parts: dict[str, float] = field(default_factory=dict)  # bytes per GPU
    params: int = 0
    trainable: int = 0
    world_size: int = 1
    strategy: str = "ddp"
    offloaded: float = 0.0  # bytes per GPU's share kept in CPU memory instead

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def lines(self) -> list[str]:
        out = [f"{name:<14} {size / GIB:8.2f} GiB" for name, size in self.parts.items()]
        out.append(f"{'total':<14} {self.total / GIB:8.2f} GiB per GPU "
                   f"({self.params / 1e6:,.0f}M parameters, {self.trainable / 1e6:,.1f}M "
                   f"trained; {self.strategy} on {self.world_size} GPU"
                   f"{'s' if self.world_size > 1 else ''})")
        if self.offloaded:
            out.append(f"{'CPU memory':<14} {self.offloaded / GIB:8.2f} GiB per GPU "
                       "(offloaded: the node needs this per GPU in RAM)")
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


def world_size(spec: Any) -> int:
    r = spec.resources
    return r.nodes * max(r.gpus_per_node, 1)


def _optimizer_name(spec: Any) -> str:
    opt = spec.training.optimizer
    return str(opt.name if opt is not None else "adamw").lower()


def _optimizer_state_bytes(spec: Any, trained_width: float, deepspeed: bool) -> float:
    """Bytes of optimizer state per trained parameter for training.optimizer (AdamW when
    unset). GaLore/APOLLO (low-rank) and BAdam (one block at a time) keep less: counted as
    AdamW, an upper bound."""
    name = _optimizer_name(spec)
    if "8bit" in name:
        return 2.0  # two 8-bit moments (bitsandbytes)
    if name in ("lomo", "adalomo", "adafactor"):
        moments = 0  # fused into the backward pass, or factored: rows + columns only
    elif "sgd" in name:
        moments = 1
    else:
        moments = 2
    if "32bit" in name:
        return 4 + moments * 4 if deepspeed and trained_width == 2 else moments * 4.0
    if deepspeed and trained_width == 2:
        return 4 + moments * 4  # fp32 master copy and fp32 moments
    return moments * trained_width


def estimate(config: dict[str, Any], spec: Any, *, gpu: bool = True) -> Estimate:
    """Bytes per GPU for ``spec`` (a FineTuneJobSpec) on the model ``config``."""
    from kubetune.strategy import STRATEGIES, strategy_of

    s = _shape(config)
    total, per_layer = parameters(config)
    t, method = spec.training, spec.method.type
    plan = STRATEGIES[strategy_of(spec)]
    n = world_size(spec)
    width = 4 if t.precision == "fp32" or (t.precision == "auto" and not gpu) else 2
    est = Estimate(params=total, world_size=n, strategy=strategy_of(spec))
    base_width = _base_bytes(spec, width)
    weights = total * base_width
    est.parts["weights"] = 0.0 if plan.offload_weights else \
        weights / n if plan.shard_weights else weights
    if plan.shard_weights:  # ZeRO-3/FSDP gather a layer (and prefetch the next) to use it
        est.parts["gathered"] = 2 * per_layer * base_width
    if plan.offload_weights:
        est.offloaded += weights / n
    spectrum = spec.method.spectrum
    if method == "lora":
        lo = spec.method.lora_or_default()
        targets = _LORA_TARGETS if lo.target_modules == ["all-linear"] else \
            tuple(m for m in lo.target_modules if m in _LORA_TARGETS)
        shapes = _linear_shapes(s)
        est.trainable = s["layers"] * sum(lo.rank * (shapes[m][0] + shapes[m][1])
                                          for m in targets)
        trained_width = 4  # PEFT keeps adapters in fp32
    elif method == "freeze" and spectrum is not None:  # a share of every layer
        est.trainable = int(spectrum.top_fraction * s["layers"] * per_layer)
        trained_width = width
    elif method == "freeze":
        est.trainable = abs(spec.method.freeze_or_default().trainable_layers) * per_layer
        trained_width = width
    else:
        est.trainable, trained_width = total, width
    grads = est.trainable * trained_width
    grads = grads / n if plan.shard_grads else grads
    if plan.offload_optimizer:  # ZeRO-Offload: gradients go to the CPU optimizer as made
        est.parts["gradients"] = 0.0
        est.offloaded += grads
    else:
        est.parts["gradients"] = grads
    state = est.trainable * _optimizer_state_bytes(spec, trained_width,
                                                   plan.engine == "deepspeed")
    if plan.offload_optimizer:
        est.parts["optimizer"] = 0.0
        est.offloaded += state / n
    else:
        est.parts["optimizer"] = state / n if plan.shard_optimizer else state
    tokens = t.batch_size_per_device * t.cutoff_len
    act = 34 * tokens * s["hidden"] * width / 2
    est.parts["activations"] = (s["layers"] * 2 * tokens * s["hidden"] * width / 2 + act
                                if t.gradient_checkpointing else s["layers"] * act)
    est.parts["logits"] = tokens * s["vocab"] * 4 * 2
    est.parts["overhead"] = GIB + 0.1 * sum(est.parts.values())
    return est


def _base_bytes(spec: Any, width: float) -> float:
    """Bytes per base weight: method.quantization 4 bits ≈ 0.53 (NF4 with its constants),
    8 bits ≈ 1.03."""
    q = spec.method.quantization
    if q is not None:
        return 0.53 if q.bits == 4 else 1.03
    return width


def _quantized(spec: Any) -> bool:
    return spec.method.quantization is not None


_QLORA = {"method": {"type": "lora", "quantization": {"bits": 4}, "freeze": None,
                     "spectrum": None}}


def _variant(spec: Any, changes: dict[str, dict[str, Any]]) -> Any:
    """The spec with some fields changed (validated: a change the API refuses is no fix)."""
    doc = spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    for key, change in changes.items():
        doc[key] = {**doc.get(key, {}), **change}
    return type(spec).model_validate(doc)


def fix_options(spec: Any) -> list[tuple[str, dict[str, dict[str, Any]]]]:
    """Single changes that cut the memory, cheapest first (none that changes what is learned
    before one that does): (what to write, the change by spec section)."""
    from kubetune.strategy import strategy_of

    t, out = spec.training, []
    strategy, n = strategy_of(spec), world_size(spec)
    if not t.gradient_checkpointing:
        out.append(("training.gradientCheckpointing: true",
                    {"training": {"gradientCheckpointing": True}}))
    if t.batch_size_per_device > 1:
        b, acc = t.batch_size_per_device, t.gradient_accumulation
        out.append((f"training.batchSizePerDevice: 1 with gradientAccumulation {acc * b} "
                    "(the same global batch)",
                    {"training": {"batchSizePerDevice": 1,
                                  "gradientAccumulation": min(4096, acc * b)}}))
    if n > 1 and strategy in ("ddp", "zero2", "zero2-offload"):
        out.append((f"resources.strategy: zero3 (the weights sharded too, over {n} GPUs)",
                    {"resources": {"strategy": "zero3"}}))
    if strategy != "zero3-offload":
        out.append(("resources.strategy: zero3-offload (weights and optimizer state in CPU "
                    "memory; slower)", {"resources": {"strategy": "zero3-offload"}}))
    if spec.method.type in ("full", "freeze") and _optimizer_name(spec) == "adamw":
        out.append(("training.optimizer: {name: adamw_8bit} (2 bytes of state per parameter)",
                    {"training": {"optimizer": {"name": "adamw_8bit"}}}))
    if spec.method.type in ("full", "freeze", "lora") and not _quantized(spec):
        out.append(("method: {type: lora, quantization: {bits: 4}} (QLoRA: a LoRA adapter on "
                    "the base in 4 bits)", _QLORA))
    if t.cutoff_len > 512:
        out.append((f"training.cutoffLen: {t.cutoff_len // 2}",
                    {"training": {"cutoffLen": t.cutoff_len // 2}}))
    return out


def fixes(spec: Any, config: dict[str, Any] | None = None,
          limit: float | None = None) -> list[str]:
    """The cheapest changes that cut the estimate, each with what it comes to per GPU; with
    ``limit`` (bytes) the ones that fit on their own first, and when none does, all of them
    together."""
    options = fix_options(spec)
    if config is None:  # without the model's shape: the changes alone
        return [text for text, _ in options]
    sized = []
    for text, change in options:
        try:
            est = estimate(config, _variant(spec, change))
        except ValueError:  # the API refuses this change for this job: no fix
            continue
        if est.offloaded:
            text += f", {est.offloaded / GIB:.0f} GiB of CPU memory per GPU"
        sized.append((text, est.total))
    if limit is not None:
        sized.sort(key=lambda o: o[1] > limit)  # stable: the cheapest that fits first
    out = [f"{text} → {size / GIB:.1f} GiB" for text, size in sized]
    if limit is not None and sized and all(size > limit for _, size in sized):
        together: dict[str, dict[str, Any]] = {}
        for _, change in options:
            for key, part in change.items():
                together[key] = {**together.get(key, {}), **part}
        try:
            size = estimate(config, _variant(spec, together)).total
            out.append(f"all of these together → {size / GIB:.1f} GiB"
                       + ("" if size <= limit else ": still too much; more GPUs or a "
                          "smaller model"))
        except ValueError:
            pass
    return out


def parse_quantity(text: str) -> float:
    """Bytes in a Kubernetes quantity such as 80Gi, 40G or 81920Mi."""
    import re

    units = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "Ki": 2**10,
             "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a quantity such as 80Gi")
    return float(m.group(1)) * units[m.group(2) or ""]


GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set by NVIDIA's GPU feature discovery


def gpu_memory_for(spec: Any, table: dict[str, str] | None = None) -> float | None:
    """Bytes of one GPU: resources.gpuMemory, else the operator's table by the GPU product the
    job selects (scheduling.nodeSelector nvidia.com/gpu.product), else its "default"; None
    when unknown or the job uses no GPU."""
    r = spec.resources
    if not r.gpus_per_node:
        return None
    if getattr(r, "gpu_memory", None):
        return parse_quantity(r.gpu_memory)
    table = table or {}
    selector = (spec.scheduling.node_selector or {}) if spec.scheduling else {}
    value = table.get(selector.get(GPU_PRODUCT_LABEL, ""), table.get("default"))
    return parse_quantity(value) if value else None


@dataclass
class Verdict:
    """Whether a job fits its GPUs: ``fits`` is None when the GPU memory is unknown."""

    estimate: Estimate
    gpu_memory: float | None  # bytes per GPU
    fixes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.estimate.total <= self.gpu_memory

    def message(self) -> str:
        e = self.estimate
        need = (f"about {e.total / GIB:.1f} GiB per GPU ({e.strategy} on {e.world_size} "
                f"GPU{'s' if e.world_size > 1 else ''}: " + ", ".join(
                    f"{k} {v / GIB:.1f}" for k, v in e.parts.items() if v) + ")")
        if self.gpu_memory is None:
            return f"{need}; the GPU's memory is unknown (set resources.gpuMemory)"
        verdict = "fits in" if self.fits else "does not fit in"
        text = f"{need} {verdict} {self.gpu_memory / GIB:.0f} GiB"
        if not self.fits:
            text += "; cheapest fixes: " + "; ".join(self.fixes) if self.fixes else \
                "; nothing kubetune knows fits: more GPUs or a smaller model"
        return text


def fits(config: dict[str, Any], spec: Any, gpu_memory: float | None) -> Verdict:
    """The verdict for ``spec`` on the model ``config`` with ``gpu_memory`` bytes per GPU
    (None: unknown, no verdict). Pure: the operator and `kubetune validate` call it."""
    est = estimate(config, spec)
    verdict = Verdict(est, gpu_memory)
    if verdict.fits is False:
        verdict.fixes = fixes(spec, config, gpu_memory)
    return verdict


# Dense bf16 peak TFLOP/s by GPU product (the nvidia.com/gpu.product label holds the name):
# vendor data sheets, without sparsity. The first name found in the label wins.
PEAK_TFLOPS = (("B200", 2250.0), ("H200", 989.0), ("H100", 989.0), ("GH200", 989.0),
               ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 125.0),
               ("A10", 125.0), ("L4", 121.0), ("V100", 125.0), ("T4", 65.0))
MFU = 0.4  # model FLOPs utilisation assumed: what well-tuned fine-tuning reaches on these


def gpu_product(spec: Any) -> str | None:
    selector = (spec.scheduling.node_selector or {}) if spec.scheduling else {}
    return selector.get(GPU_PRODUCT_LABEL)


def training_time(params: int, tokens_per_epoch: int, sequences: int, spec: Any
                  ) -> tuple[float | None, str]:
    """(seconds, what it assumes) for the whole run: 6 FLOPs per parameter and token for full
    training, 4 when the base is frozen (lora, qlora, freeze: no weight gradients), on
    world_size GPUs at MFU of the product's peak. None when the GPU's peak is unknown."""
    product = gpu_product(spec) or ""
    peak = next((tf for name, tf in PEAK_TFLOPS if name.lower() in product.lower()), None)
    if peak is None or not spec.resources.gpus_per_node:
        return None, ("not estimated: the GPU type is unknown (scheduling.nodeSelector "
                      f"{GPU_PRODUCT_LABEL} names it)")
    t = spec.training
    n = world_size(spec)
    per_step = max(t.batch_size_per_device * t.gradient_accumulation * n, 1)
    steps_per_epoch = max(math.ceil(sequences / per_step), 1)
    steps = t.max_steps if t.max_steps else math.ceil(t.epochs * steps_per_epoch)
    tokens = tokens_per_epoch * steps / steps_per_epoch
    method = getattr(spec.method.type, "value", spec.method.type)
    flops_per_token = (6 if method == "full" else 4) * params
    seconds = flops_per_token * tokens / (n * peak * 1e12 * MFU)
    return round(seconds, 1), (f"{n} × {product} at {peak:g} TFLOP/s bf16, MFU {MFU:.0%}, "
                               f"{flops_per_token // params} FLOPs per parameter and token, "
                               f"{steps} steps")
