"""The model side of a run: tokenizer, precision, loading, and the method as a table.

A recipe says which head it trains (``causal``: a language model; ``reward``: one score per
sequence); the method (full / freeze / lora, the base optionally quantized: QLoRA) says how the
weights are loaded, which of them train, and what a run saves. ``finish_setup`` does what must
wait for the trainer's (PEFT) model: EVA/PiSSA initialisation bookkeeping and the optimizers
that transformers' ``optim`` names do not cover (LoRA+, BAdam).
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


def _freeze(model: Any, spec: FineTuneJobSpec) -> None:
    if spec.method.spectrum is not None:
        from kubetune_trainer.spectrum import apply_spectrum

        apply_spectrum(model, spec)
    else:
        apply_freeze(model, spec)


def _prepare_lora(model: Any, spec: FineTuneJobSpec) -> None:
    if spec.method.quantization is not None:  # QLoRA: norms in fp32, inputs require grad
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.training.gradient_checkpointing)


METHODS: dict[str, Method] = {
    "full": Method(adapter=False),
    "freeze": Method(adapter=False, prepare=_freeze),
    "lora": Method(adapter=True, prepare=_prepare_lora),
}


def method(spec: FineTuneJobSpec) -> Method:
    return METHODS[spec.method.type]


def attention(spec: FineTuneJobSpec) -> str:
    """training.boosters.attention as transformers' attn_implementation: auto is
    flash_attention_2 where flash-attn is installed and a GPU runs, else sdpa."""
    import importlib.util

    want = spec.training.boosters.attention
    if want != "auto":
        return want
    if has_cuda() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def quantization_config(spec: FineTuneJobSpec, dtype: Any) -> Any:
    """method.quantization as a bitsandbytes config (None when the base is not quantized)."""
    q = spec.method.quantization
    if q is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if q.compute_dtype == "auto" else {
        "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[q.compute_dtype]
    from kubetune.strategy import STRATEGIES, strategy_of

    # ZeRO-3 and FSDP shard the 4-bit weights too: stored in the compute dtype's words
    # (transformers' FSDP-QLoRA recipe).
    sharded = STRATEGIES[strategy_of(spec)].shard_weights
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type(),
                              bnb_4bit_use_double_quant=q.double(),
                              bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=compute if sharded else torch.uint8)


def load_model(model_path: Path, spec: FineTuneJobSpec, *, head: str = "causal",
               pad_token_id: int | None = None) -> Any:
    """The model to train: a causal LM, or (``head="reward"``) a one-score sequence classifier
    on the same backbone, its new head initialised by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    m = method(spec)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.model.trust_remote_code,
                              "attn_implementation": attention(spec)}
    kwargs["dtype"] = torch.bfloat16 if precision(spec)["bf16"] else torch.float32
    quant = quantization_config(spec, kwargs["dtype"])
    if quant is not None:
        kwargs["quantization_config"] = quant
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


# method.lora.init → LoraConfig.init_lora_weights (PiSSA by fast randomized SVD, 16 iterations)
LORA_INITS: dict[str, Any] = {"default": True, "gaussian": "gaussian", "pissa": "pissa_niter_16",
                              "olora": "olora", "loftq": "loftq", "eva": "eva"}
CONVERTED_INITS = ("pissa", "olora")  # saved as a plain LoRA of the original base


def peft_config(spec: FineTuneJobSpec, *, head: str = "causal") -> Any:
    """The LoRA adapter for method.type lora (None otherwise). A reward model's score head is
    new, so it trains in full and is saved with the adapter."""
    if not method(spec).adapter:
        return None
    from peft import LoraConfig

    lo = spec.method.lora_or_default()
    targets = lo.target_modules
    extra: dict[str, Any] = {}
    if lo.init == "loftq":
        from peft import LoftQConfig

        extra["loftq_config"] = LoftQConfig(loftq_bits=4)
    elif lo.init == "eva":
        from peft import EvaConfig

        extra["eva_config"] = EvaConfig()
    to_save = [*lo.modules_to_save, *(["score"] if head == "reward" else [])]
    return LoraConfig(
        r=lo.rank, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
        use_dora=lo.dora, use_rslora=lo.rslora, init_lora_weights=LORA_INITS[lo.init],
        task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM",
        modules_to_save=to_save or None,
        target_modules="all-linear" if targets == ["all-linear"] else targets, **extra)


def initial_adapter_dir(root: Path) -> Path:
    """Where a PiSSA/OLoRA run keeps its adapter as initialised (to convert the result)."""
    return root / "adapter-init"


def finish_setup(trainer: Any, spec: FineTuneJobSpec, root: Path, *, main: bool) -> None:
    """What needs the trainer's model: EVA's data-driven init, the PiSSA/OLoRA initial adapter
    (rank 0 saves it), and the LoRA+ / BAdam / Muon optimizers."""
    lo = spec.method.lora
    if method(spec).adapter and lo is not None and lo.init == "eva":
        from peft import initialize_lora_eva_weights

        initialize_lora_eva_weights(trainer.model, dataloader=trainer.get_train_dataloader())
    if main and method(spec).adapter and lo is not None and lo.init in CONVERTED_INITS:
        trainer.model.save_pretrained(str(initial_adapter_dir(root)))  # before any step
    opt = spec.training.optimizer
    if lo is not None and lo.lora_plus_lr_ratio is not None:
        from peft.optimizers import create_loraplus_optimizer
        from transformers import Trainer

        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
        kwargs.pop("lr", None)
        trainer.optimizer = create_loraplus_optimizer(
            trainer.model, cls, lr=trainer.args.learning_rate,
            loraplus_lr_ratio=lo.lora_plus_lr_ratio, weight_decay=trainer.args.weight_decay,
            **kwargs)
    elif opt.name == "badam":
        trainer.optimizer = _badam(trainer, opt)
    elif opt.name == "muon":
        from transformers import Trainer

        from kubetune_trainer.muon import MuonWithAdamW

        _, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
        kwargs.pop("lr", None)
        trainer.optimizer = MuonWithAdamW(
            list(trainer.model.named_parameters()), lr=trainer.args.learning_rate,
            weight_decay=trainer.args.weight_decay, adamw=kwargs,
            decay=set(trainer.get_decay_parameter_names(trainer.model)))


def _badam(trainer: Any, opt: Any) -> Any:
    """BAdam (as LLaMA-Factory builds it): AdamW over every parameter, wrapped by a
    BlockOptimizer that trains one decoder block at a time."""
    from badam import BAdamCallback, BlockOptimizer
    from transformers import Trainer

    model = trainer.model
    decay = set(trainer.get_decay_parameter_names(model))
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay and p.requires_grad],
         "weight_decay": trainer.args.weight_decay},
        {"params": [p for n, p in model.named_parameters()
                    if n not in decay and p.requires_grad], "weight_decay": 0.0},
    ]
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    trainer.add_callback(BAdamCallback)
    return BlockOptimizer(base_optimizer=cls(groups, **kwargs),
                          named_parameters_list=list(model.named_parameters()),
                          switch_block_every=opt.switch_every or 50,
                          switch_mode=opt.switch_mode or "ascending", verbose=0)


def optimizer_args(spec: FineTuneJobSpec) -> dict[str, Any]:
    """training.optimizer as TrainingArguments fields (optim, optim_target_modules,
    optim_args)."""
    from kubetune.api.v1alpha1.training import LOW_RANK_OPTIMIZERS, OPTIM_NAMES

    o = spec.training.optimizer
    name = OPTIM_NAMES[o.name]
    if o.name not in LOW_RANK_OPTIMIZERS:
        return {"optim": name}
    if o.layerwise:
        name += "_layerwise"
    args = {"rank": o.rank or 16, "update_proj_gap": o.update_interval or 200}
    if o.scale is not None:
        args["scale"] = o.scale
    return {"optim": name, "optim_target_modules": o.target_modules or ["attn", "mlp"],
            "optim_args": ",".join(f"{k}={v}" for k, v in args.items())}


def booster_args(spec: FineTuneJobSpec) -> dict[str, Any]:
    """training.boosters and gradient checkpointing as TrainingArguments / TRL fields."""
    b, t = spec.training.boosters, spec.training
    args: dict[str, Any] = {
        "activation_checkpointing": t.gradient_checkpointing,  # TRL defaults it on
        "use_liger_kernel": b.liger,
        "neftune_noise_alpha": b.neftune_alpha,
        "torch_compile": b.torch_compile,
    }
    if t.gradient_checkpointing:  # re-entrant checkpointing breaks frozen-input layers
        args["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    if b.activation_offload:  # only the TRL configs that have it (the API checks the stage)
        args["activation_offloading"] = True
    return args


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
    lora the adapter (fp32) plus its states; the tokenizer files come with each."""
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
    if kind == "freeze" and spec.method.spectrum is not None:
        return params * width + _spectrum_params(shapes, spec.method.spectrum.top_fraction) \
            * width * ADAM_STATES + tokenizer
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
    saved = _modules_params(shapes, lo.modules_to_save, _config(model_path))
    return adapter * 4 * (1 + ADAM_STATES) + saved * width * (1 + ADAM_STATES) + tokenizer


def _spectrum_params(shapes: dict[str, list[int]], top_fraction: float) -> int:
    """Parameters Spectrum trains: of each module type's decoder-layer weight matrices the
    top fraction (at least one, as ``spectrum.select`` picks), counted at the largest."""
    import math

    from kubetune_trainer.spectrum import _LAYER

    by_type: dict[str, list[int]] = {}
    for name, shape in shapes.items():
        m = _LAYER.match(name)
        if m is not None and len(shape) == 2:
            by_type.setdefault(m["module"], []).append(math.prod(shape))
    return sum(sum(sorted(sizes, reverse=True)[:max(1, round(top_fraction * len(sizes)))])
               for sizes in by_type.values())


def _modules_params(shapes: dict[str, list[int]], modules: list[str],
                    config: dict[str, Any]) -> int:
    """Parameters of lora.modulesToSave: PEFT trains and saves a whole copy of each module
    whose name ends with one of them (a tied lm_head: a copy of the embeddings' size)."""
    import math

    total, found = 0, set()
    for name, shape in shapes.items():
        module = name.rsplit(".", 1)[0]
        for target in modules:
            if module == target or module.endswith(f".{target}"):
                total += math.prod(shape)
                found.add(target)
    if "lm_head" in modules and "lm_head" not in found and config.get("tie_word_embeddings",
                                                                      True):
        total += sum(math.prod(s) for n, s in shapes.items() if n.endswith("embed_tokens.weight"))
    return total


def _config(model_path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads((model_path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data.get("text_config", data) if isinstance(data, dict) else {}
