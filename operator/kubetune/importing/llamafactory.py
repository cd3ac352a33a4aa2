"""LLaMA-Factory (`llamafactory-cli train CONFIG.yaml`) → FineTuneJob.

Key names and defaults are LLaMA-Factory 0.9.5's (``hparams/``) and transformers'
``Seq2SeqTrainingArguments``; ``dataset`` names resolve through ``dataset_dir``'s
dataset_info.json as LLaMA-Factory resolves them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from kubetune.importing import (
    Context,
    Draft,
    Entry,
    Imported,
    ImportProblem,
    Lost,
    Refuse,
    Same,
    Step,
    To,
    apply_table,
    did_you_mean,
    finish,
    flag,
    integer,
    job_name,
    known_keys,
    names_list,
    nested_keys,
    number,
    positive_or_unset,
    value_of,
)
from kubetune.importing.peer_keys import LLAMAFACTORY, TRANSFORMERS

MULTIMODAL = ("kubetune trains text-only causal language models: images, videos and audio "
              "(and their processors and towers) have no equivalent")
PPO = ("ppo is not available: TRL 1.16 (kubetune's pinned version) has no PPO trainer; use "
       "stage grpo with a rewardModel reward (spec.rewards) instead")

# Groups of LLaMA-Factory's options the table below does not list, and why they carry over
# to nothing.
_GROUP_REASONS = {
    "DataArguments": "a data option kubetune does not have",
    "FreezeArguments": "read with finetuning_type freeze",
    "LoraArguments": "a LoRA option kubetune does not have",
    "OFTArguments": "OFT adapters: kubetune trains LoRA, full or freeze",
    "RLHFArguments": "a PPO/reference-model option: kubetune's reference is the starting model",
    "GaloreArguments": "a GaLore option kubetune does not have",
    "ApolloArguments": "an APOLLO option kubetune does not have",
    "BAdamArgument": "a BAdam option kubetune does not have",
    "SwanLabArguments": "SwanLab is not one of kubetune's trackers (tensorboard, wandb, "
                        "mlflow)",
    "FinetuningArguments": "a LLaMA-Factory training option kubetune does not have",
    "BaseModelArguments": "a model-loading option kubetune does not have",
    "QuantizationArguments": "a quantization option kubetune does not have",
    "ProcessorArguments": MULTIMODAL,
    "ExportArguments": "export (llamafactory-cli export), not training",
    "VllmArguments": "inference engine settings (chat, api, eval), not training",
    "SGLangArguments": "inference engine settings (chat, api, eval), not training",
    "KTransformersArguments": "KTransformers inference/training backend: not in kubetune",
    "ModelArguments": "set by the trainer from the training precision",
    "RayArguments": "Ray launch settings: on Kubernetes the operator starts the pods",
    "ProfilerArguments": "the torch profiler is not wired into kubetune's trainer",
    "Fp8Arguments": "FP8 training is not in kubetune",
    "TrainingArguments": "kubetune resumes into the output and never overwrites it",
    "GeneratingArguments": "kubetune's evaluation.predict decodes greedily",
}
KNOWN = {**{k: "a transformers TrainingArguments option kubetune sets itself or does not "
            "expose" for k in TRANSFORMERS}, **known_keys(LLAMAFACTORY, _GROUP_REASONS)}

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
              "adamw_8bit": "adamw_8bit", "adamw_bnb_8bit": "adamw_8bit",
              "paged_adamw_8bit": "paged_adamw_8bit", "paged_adamw_32bit": "paged_adamw_32bit",
              "adafactor": "adafactor"}
TRACKERS = ("tensorboard", "wandb", "mlflow")
_STRATEGY = "spec.resources.strategy"


def _scheduler(value: Any) -> str:
    if value not in SCHEDULERS:
        raise ValueError(f"{value!r}: kubetune's schedules are {', '.join(SCHEDULERS)} (the "
                         "run would follow another curve)")
    return value


def _optimizer(value: Any) -> str:
    if value not in OPTIMIZERS:
        raise ValueError(f"{value!r} has no kubetune equivalent; kubetune's optimizers: "
                         + ", ".join(sorted(OPTIMIZERS)) + " (and galore, apollo, badam, "
                         "muon through use_galore, use_apollo, use_badam, use_muon)")
    return OPTIMIZERS[value]


def _attention(value: Any) -> str:
    table = {"auto": "auto", "fa2": "flash_attention_2", "sdpa": "sdpa", "disabled": "eager"}
    if value not in table:
        raise ValueError(f"{value!r}: one of {', '.join(table)}")
    return table[value]


KEYS: dict[str, Entry] = {
    # model
    "model_name_or_path": Step("spec.model.source"),
    "model_revision": To("model.revision"),
    "trust_remote_code": To("model.trustRemoteCode", flag),
    "hf_hub_token": Refuse("a credential in the config: put the token in a Secret and set "
                           "spec.model.secretRef (kubetune never stores a token in a job)"),
    "adapter_name_or_path": Refuse("training on top of an existing adapter is not in "
                                   "kubetune: merge it into the model first "
                                   "(llamafactory-cli export) and import the merged model"),
    "flash_attn": To("training.boosters.attention", _attention),
    "enable_liger_kernel": To("training.boosters.liger", flag),
    "disable_gradient_checkpointing": Step("spec.training.gradientCheckpointing"),
    "use_unsloth": Lost("Unsloth's kernels are not in kubetune (Liger is: "
                        "training.boosters.liger)", (None, False)),
    "rope_scaling": Lost("kubetune trains at the model's own context length", (None,)),
    # method
    "stage": Step("spec.stage (and spec.preference.lossType)"),
    "do_train": Same("kubetune's jobs always train"),
    "finetuning_type": Step("spec.method.type"),
    "lora_rank": To("method.lora.rank", integer),
    "lora_alpha": To("method.lora.alpha", integer),
    "lora_dropout": To("method.lora.dropout", number),
    "lora_target": Step("spec.method.lora.targetModules"),
    "additional_target": To("method.lora.modulesToSave", names_list),
    "use_dora": To("method.lora.dora", flag),
    "use_rslora": To("method.lora.rslora", flag),
    "pissa_init": Step("spec.method.lora.init"),
    "pissa_convert": Same("kubetune always saves a PiSSA/OLoRA adapter converted to apply to "
                          "the original base"),
    "pissa_iter": Lost("kubetune uses PEFT's PiSSA initialisation as it is", (None, 16)),
    "loraplus_lr_ratio": To("method.lora.loraPlusLrRatio", number),
    "freeze_trainable_layers": To("method.freeze.trainableLayers", integer),
    "freeze_trainable_modules": To("method.freeze.trainableModules", names_list),
    "freeze_extra_modules": To("method.freeze.extraModules", names_list),
    "quantization_bit": Step("spec.method.quantization.bits"),
    "quantization_method": Step("spec.method.quantization (bitsandbytes)"),
    "quantization_type": To("method.quantization.type"),
    "double_quantization": To("method.quantization.doubleQuant", flag),
    "use_galore": Step("spec.training.optimizer.name galore"),
    "galore_layerwise": Step("spec.training.optimizer.layerwise"),
    "galore_target": Step("spec.training.optimizer.targetModules"),
    "galore_rank": Step("spec.training.optimizer.rank"),
    "galore_update_interval": Step("spec.training.optimizer.updateInterval"),
    "galore_scale": Step("spec.training.optimizer.scale"),
    "use_apollo": Step("spec.training.optimizer.name apollo"),
    "apollo_layerwise": Step("spec.training.optimizer.layerwise"),
    "apollo_target": Step("spec.training.optimizer.targetModules"),
    "apollo_rank": Step("spec.training.optimizer.rank"),
    "apollo_update_interval": Step("spec.training.optimizer.updateInterval"),
    "apollo_scale": Step("spec.training.optimizer.scale"),
    "use_badam": Step("spec.training.optimizer.name badam"),
    "badam_mode": Refuse("kubetune's BAdam switches blocks of layers; ratio mode is not in it",
                         (None, "layer")),
    "badam_switch_mode": Step("spec.training.optimizer.switchMode"),
    "badam_switch_interval": Step("spec.training.optimizer.switchEvery"),
    "use_muon": Step("spec.training.optimizer.name muon"),
    "optim": Step("spec.training.optimizer.name"),
    "use_adam_mini": Refuse("Adam-mini is not one of kubetune's optimizers"),
    "use_llama_pro": Refuse("LLaMA Pro (block expansion) is not in kubetune"),
    "use_dft_loss": Refuse("the DFT loss is not in kubetune"),
    "use_asft_loss": Refuse("the ASFT loss is not in kubetune"),
    "use_eaft_loss": Refuse("the EAFT loss is not in kubetune"),
    "train_from_scratch": Refuse("kubetune fine-tunes a model's weights; it does not start "
                                 "from a random initialisation"),
    "freeze_vision_tower": Lost(MULTIMODAL, (None, True)),
    "freeze_multi_modal_projector": Lost(MULTIMODAL, (None, True)),
    "freeze_language_model": Refuse(MULTIMODAL),
    "image_max_pixels": Refuse(MULTIMODAL, (None,)),
    "image_min_pixels": Refuse(MULTIMODAL, (None,)),
    "video_max_pixels": Refuse(MULTIMODAL, (None,)),
    "video_min_pixels": Refuse(MULTIMODAL, (None,)),
    "video_fps": Refuse(MULTIMODAL, (None,)),
    "video_maxlen": Refuse(MULTIMODAL, (None,)),
    "media_dir": Refuse(MULTIMODAL, (None,)),
    # preference stages
    "pref_beta": To("preference.beta", number),
    "pref_loss": Step("spec.stage / spec.preference.lossType"),
    "pref_ftx": Step("spec.preference.lossType sft / cpoAlpha"),
    "pref_bco_weight": Step("spec.preference.lossType bco_pair"),
    "dpo_label_smoothing": Step("spec.preference.labelSmoothing"),
    "kto_chosen_weight": Step("spec.preference.desirableWeight"),
    "kto_rejected_weight": Step("spec.preference.undesirableWeight"),
    "simpo_gamma": Step("spec.preference.simpoGamma"),
    "ref_model": Refuse("kubetune's reference model is the starting model (with LoRA: the "
                        "adapter switched off); another reference is not in kubetune"),
    "reward_model": Refuse(PPO),
    # data
    "dataset": Step("spec.datasets"),
    "dataset_dir": Step("spec.datasets[].source"),
    "eval_dataset": Step("spec.evalDatasets"),
    "template": Step("spec.template"),
    "cutoff_len": To("training.cutoffLen", integer),
    "max_samples": Step("spec.datasets[].maxSamples"),
    "train_on_prompt": To("training.trainOnPrompt", flag),
    "mask_history": To("training.maskHistory", flag),
    "packing": To("training.packing", flag),
    "neat_packing": Step("spec.training.packing"),
    "val_size": Step("spec.training.evalSplit"),
    "preprocessing_num_workers": To("training.preprocessingWorkers", integer),
    "overwrite_cache": Same("kubetune keys prepared rows by their content: a change is never "
                            "served from a stale cache"),
    "mix_strategy": Lost("kubetune concatenates the data sets", (None, "concat")),
    "streaming": Lost("kubetune reads the data sets whole", (None, False)),
    "tokenized_path": Lost("kubetune caches prepared rows itself (KUBETUNE_CACHE)", (None,)),
    "default_system": Lost("kubetune's templates take the system prompt from the rows", (None,)),
    "enable_thinking": Lost("kubetune renders rows as they are", (None, True)),
    # training
    "learning_rate": To("training.learningRate", number),
    "num_train_epochs": To("training.epochs", number),
    "max_steps": To("training.maxSteps", positive_or_unset),
    "lr_scheduler_type": To("training.lrScheduler", _scheduler),
    "warmup_ratio": To("training.warmupRatio", number),
    "warmup_steps": Step("spec.training.warmupRatio"),
    "weight_decay": To("training.weightDecay", number),
    "max_grad_norm": To("training.maxGradNorm", number),
    "per_device_train_batch_size": To("training.batchSizePerDevice", integer),
    "gradient_accumulation_steps": To("training.gradientAccumulation", integer),
    "seed": To("training.seed", integer),
    "bf16": Step("spec.training.precision"),
    "fp16": Step("spec.training.precision"),
    "pure_bf16": Step("spec.training.precision"),
    "neftune_noise_alpha": To("training.boosters.neftuneAlpha", number),
    "torch_compile": To("training.boosters.torchCompile", flag),
    "gradient_checkpointing": To("training.gradientCheckpointing", flag),
    "deepspeed": Step(_STRATEGY),
    "fsdp": Step(_STRATEGY),
    "fsdp_config": Step(_STRATEGY),
    "logging_steps": To("training.logSteps", integer),
    "save_steps": To("training.saveSteps", integer),
    "save_total_limit": To("training.saveTotalLimit", integer),
    "eval_steps": To("training.evalSteps", integer),
    "eval_strategy": Step("spec.training.evalSteps"),
    "per_device_eval_batch_size": Lost("kubetune evaluates with training.batchSizePerDevice",
                                       (None,)),
    "do_eval": Same("kubetune evaluates whenever there are held-out rows (val_size, "
                    "eval_dataset)"),
    "do_predict": Step("spec.evaluation.predict"),
    "predict_with_generate": Step("spec.evaluation.predict"),
    "max_new_tokens": To("evaluation.maxNewTokens", integer),
    "output_dir": Step("spec.output.uri"),
    "overwrite_output_dir": Same("kubetune resumes into its output and never deletes it"),
    "resume_from_checkpoint": Same("kubetune resumes from the newest complete checkpoint in "
                                   "its output by itself"),
    "plot_loss": Same("kubetune always writes loss.png"),
    "report_to": Step("spec.training.reportTo"),
    "run_name": To("training.tracking.runName", str),
    "save_only_model": Lost("kubetune's checkpoints always hold what a resume needs",
                            (None, False)),
    "ddp_timeout": Lost("set by kubetune's launcher", (None,)),
    "dataloader_num_workers": Lost("kubetune's trainer picks its data loader workers",
                                   (None, 0)),
    "push_to_hub": Lost("set spec.output.uri to hf://ORG/NAME to push the result", (None, False)),
    "hub_model_id": Lost("set spec.output.uri to hf://ORG/NAME to push the result", (None,)),
}

# LLaMA-Factory's defaults where kubetune's differ (written out when the config leaves them).
DEFAULTS = {
    "training.learningRate": (5e-5, "transformers' default"),
    "training.lrScheduler": ("linear", "transformers' default; kubetune's is cosine"),
    "training.warmupRatio": (0.0, "transformers' default"),
    "training.batchSizePerDevice": (8, "transformers' default; kubetune's is 4"),
    "training.cutoffLen": (2048, "LLaMA-Factory's default"),
    "training.logSteps": (500, "transformers' default; kubetune's is 10"),
    "training.saveSteps": (500, "transformers' default; kubetune's is 100"),
    "training.gradientCheckpointing": (True, "LLaMA-Factory turns it on unless "
                                       "disable_gradient_checkpointing"),
    "training.precision": ("fp32", "neither bf16 nor fp16: transformers trains in fp32; "
                           "kubetune's auto would pick bf16 on a GPU"),
    "template": ("auto", "no template: LLaMA-Factory uses the tokenizer's chat template"),
}


def convert(config: dict[str, Any], ctx: Context) -> Imported:
    draft = Draft("llamafactory", ctx)
    _refuse_first(config)
    apply_table(draft, config, KEYS, KNOWN, f"{ctx.config_path.name} (llamafactory)")
    _model(draft, config)
    stage = _stage(draft, config)
    _method(draft, config)
    _optimizer_keys(draft, config)
    _data(draft, config, stage)
    _training(draft, config, stage)
    for path, (value, why) in DEFAULTS.items():
        draft.default(path, value, why)
    draft.default("training.packing", stage == "pt", "LLaMA-Factory packs pt rows, not others")
    if value_of(config, "packing", False, flag) or value_of(config, "neat_packing", False, flag):
        # LLaMA-Factory packs rows of cutoff_len - 1 when packing is asked for in the config
        # (DataArguments.__post_init__; not for pt's implicit packing)
        cutoff = draft.get("training.cutoffLen") - 1
        draft.set("training.cutoffLen", cutoff)
        draft.mapped[:] = [m for m in draft.mapped if m[0] != "cutoff_len"]
        if "cutoff_len" in config:
            draft.map("cutoff_len", f"spec.training.cutoffLen {cutoff} (LLaMA-Factory packs "
                      "rows of cutoff_len - 1)")
        else:
            draft.defaults[:] = [d for d in draft.defaults if d[0] != "training.cutoffLen"]
            draft.defaults.append(("training.cutoffLen", cutoff, "LLaMA-Factory's 2048, less "
                                   "1 when packing"))
    if draft.get("method.type", "lora") == "lora":
        rank = draft.get("method.lora.rank", 8)
        draft.default("method.lora.rank", 8, "LLaMA-Factory's lora_rank; kubetune's is 16")
        draft.default("method.lora.alpha", 2 * rank, "LLaMA-Factory: lora_alpha = 2 x rank")
        draft.default("method.lora.targetModules", ["all-linear"], "lora_target all")
    return finish(draft, job_name(ctx), config)


def _refuse_first(config: dict[str, Any]) -> None:
    if config.get("stage") == "ppo":
        raise ImportProblem(f"stage: 'ppo': {PPO}")
    template = str(config.get("template") or "")
    if re.search(r"(^|_)(vl|vl_\w+|llava\w*|mllama|paligemma\w*|pixtral|minicpm_[vo]|"
                 r"audio|omni|video\w*|intern_vl|glm4v|kimi_vl)$", template) or re.search(
                     r"llava|_vl$|vl$", template):
        raise ImportProblem(f"template: {template!r} is a multimodal template: {MULTIMODAL}")


def _model(draft: Draft, config: dict[str, Any]) -> None:
    source = config.get("model_name_or_path")
    if not source:
        raise ImportProblem("model_name_or_path is missing: the model to fine-tune")
    draft.set("model.source", draft.source(source, "spec.model.source", "model"))
    draft.map("model_name_or_path", "spec.model.source")
    if draft.get("model.revision") == "main":
        draft.drop("model.revision")


def _stage(draft: Draft, config: dict[str, Any]) -> str:
    stage = config.get("stage") or "sft"
    if stage not in ("pt", "sft", "rm", "dpo", "kto"):
        raise ImportProblem(f"stage: {stage!r}: llamafactory's stages are pt, sft, rm, ppo, dpo, "
                            "kto" + did_you_mean(str(stage), frozenset(
                                ("pt", "sft", "rm", "dpo", "kto"))))
    loss = config.get("pref_loss") or "sigmoid"
    ftx = value_of(config, "pref_ftx", 0.0, number)
    if stage == "dpo" and loss == "orpo":
        stage = "orpo"
    elif stage == "dpo" and loss == "simpo":
        stage = "cpo"
        draft.set("preference.lossType", ["simpo"])
        draft.set("preference.cpoAlpha", ftx)
        draft.set("preference.simpoGamma", value_of(config, "simpo_gamma", 0.5, number))
        draft.map("simpo_gamma", "spec.preference.simpoGamma")
        draft.map("pref_ftx", "spec.preference.cpoAlpha (LLaMA-Factory's SimPO adds pref_ftx x "
                  "the SFT loss, as CPO's alpha)")
    elif stage == "dpo":
        losses, weights = [loss], [1.0]
        if loss not in ("sigmoid", "hinge", "ipo", "kto_pair", "bco_pair", "sppo_hard",
                        "nca_pair"):
            raise ImportProblem(f"pref_loss: {loss!r} has no kubetune equivalent")
        bco = value_of(config, "pref_bco_weight", 0.0, number)
        if bco > 0:
            losses.append("bco_pair")
            weights.append(bco)
            draft.map("pref_bco_weight", "spec.preference.lossType bco_pair with its weight")
        if ftx > 0:
            losses.append("sft")
            weights.append(ftx)
            draft.map("pref_ftx", "spec.preference.lossType sft with its weight")
        draft.set("preference.lossType", losses)
        if len(losses) > 1:
            draft.set("preference.lossWeights", weights)
        if "dpo_label_smoothing" in config:
            draft.set("preference.labelSmoothing",
                      value_of(config, "dpo_label_smoothing", 0.0, number))
            draft.map("dpo_label_smoothing", "spec.preference.labelSmoothing")
    elif stage == "kto":
        for key, field in (("kto_chosen_weight", "desirableWeight"),
                           ("kto_rejected_weight", "undesirableWeight")):
            if key in config:
                draft.set(f"preference.{field}", value_of(config, key, 1.0, number))
                draft.map(key, f"spec.preference.{field}")
    if "pref_loss" in config:
        draft.map("pref_loss", f"spec.stage {stage}"
                  + (f", spec.preference.lossType {loss}" if stage == "dpo" else ""))
    _unused_here(draft, config, stage)
    draft.set("stage", stage)
    draft.map("stage", f"spec.stage {stage}")
    if stage in ("dpo", "kto", "orpo", "cpo"):
        draft.default("preference.beta", 0.1, "LLaMA-Factory's pref_beta")
    else:
        draft.drop("preference")
    return stage


def _unused_here(draft: Draft, config: dict[str, Any], stage: str) -> None:
    """Preference keys the chosen stage does not read: LLaMA-Factory ignores them too."""
    used = {"dpo": ("pref_beta", "pref_ftx", "pref_bco_weight", "dpo_label_smoothing", "pref_loss"),
            "orpo": ("pref_beta", "pref_loss"), "cpo": ("pref_beta", "pref_loss", "pref_ftx",
                                                        "simpo_gamma"),
            "kto": ("pref_beta", "kto_chosen_weight", "kto_rejected_weight", "pref_ftx")
            }.get(stage, ())
    for key in ("pref_beta", "pref_ftx", "pref_bco_weight", "dpo_label_smoothing",
                "kto_chosen_weight", "kto_rejected_weight", "simpo_gamma", "pref_loss"):
        if key in config and key not in used:
            draft.same.append((key, f"not read by stage {stage} (LLaMA-Factory ignores it too)"))
            draft.mapped[:] = [m for m in draft.mapped if m[0] != key]
    if stage == "kto" and value_of(config, "pref_ftx", 0.0, number) > 0:
        draft.lose("pref_ftx", "kubetune's KTO has no added SFT loss")


def _method(draft: Draft, config: dict[str, Any]) -> None:
    kind = config.get("finetuning_type") or "lora"
    if kind not in ("lora", "full", "freeze"):
        raise ImportProblem(f"finetuning_type: {kind!r}: kubetune trains lora, full or freeze"
                            + (" (OFT adapters are not in it)" if kind == "oft" else ""))
    draft.set("method.type", kind)
    if "finetuning_type" in config:
        draft.map("finetuning_type", f"spec.method.type {kind}")
    if kind != "lora":
        for key in [k for k, _ in draft.mapped if k.startswith(("lora_", "use_dora", "use_rslora",
                                                               "loraplus", "additional_target"))]:
            draft.same.append((key, f"not read with finetuning_type {kind}"))
        draft.mapped[:] = [m for m in draft.mapped if not m[1].startswith("spec.method.lora")]
        draft.drop("method.lora")
    if kind != "freeze":
        draft.mapped[:] = [m for m in draft.mapped if not m[1].startswith("spec.method.freeze")]
        draft.drop("method.freeze")
    if kind == "lora":
        if "lora_target" in config:
            targets = value_of(config, "lora_target", ["all"], names_list)
            draft.set("method.lora.targetModules",
                      ["all-linear"] if targets == ["all"] else targets)
            draft.map("lora_target", "spec.method.lora.targetModules")
        if value_of(config, "pissa_init", False, flag):
            draft.set("method.lora.init", "pissa")
            draft.map("pissa_init", "spec.method.lora.init pissa")
    bits = value_of(config, "quantization_bit", None, integer)
    method = config.get("quantization_method") or "bnb"
    if method not in ("bnb", "bitsandbytes"):
        raise ImportProblem(f"quantization_method: {method!r}: kubetune quantizes with "
                            "bitsandbytes (bnb) only")
    if bits is not None:
        if bits not in (4, 8) or kind != "lora":
            raise ImportProblem(f"quantization_bit: {bits}: kubetune loads a LoRA base in 4 or "
                                "8 bits (bitsandbytes)" + ("" if kind == "lora" else
                                                          f"; finetuning_type is {kind}"))
        draft.set("method.quantization.bits", bits)
        draft.map("quantization_bit", "spec.method.quantization.bits")
        if "quantization_method" in config:
            draft.map("quantization_method", "spec.method.quantization (bitsandbytes)")
        if bits == 4:
            draft.default("method.quantization.type", "nf4", "LLaMA-Factory's quantization_type")
            draft.default("method.quantization.doubleQuant", True,
                          "LLaMA-Factory's double_quantization")
        else:
            draft.drop("method.quantization.type")
            draft.drop("method.quantization.doubleQuant")
    else:
        draft.drop("method.quantization")
        for key in ("quantization_method", "quantization_type", "double_quantization"):
            if key in config:
                draft.same.append((key, "not read without quantization_bit"))
        draft.mapped[:] = [m for m in draft.mapped
                           if not m[1].startswith("spec.method.quantization")]
    if "disable_gradient_checkpointing" in config:
        draft.set("training.gradientCheckpointing",
                  not value_of(config, "disable_gradient_checkpointing", False, flag))
        draft.map("disable_gradient_checkpointing", "spec.training.gradientCheckpointing (not)")


# (use_ key, kubetune name, option prefix, LLaMA-Factory's defaults: rank, interval, scale)
_LOW_RANK = (("use_galore", "galore", "galore", 16, 200, 2.0),
             ("use_apollo", "apollo", "apollo", 16, 200, 32.0))


def _optimizer_keys(draft: Draft, config: dict[str, Any]) -> None:
    chosen = []
    if "optim" in config:
        draft.set("training.optimizer.name", value_of(config, "optim", "adamw", _optimizer))
        draft.map("optim", "spec.training.optimizer.name")
    for use, name, prefix, rank, interval, scale in _LOW_RANK:
        if not value_of(config, use, False, flag):
            for key in [k for k in config if k.startswith(prefix + "_")]:
                draft.same.append((key, f"not read without {use}"))
            continue
        chosen.append(use)
        layerwise = value_of(config, f"{prefix}_layerwise", False, flag)
        if config.get("optim") in ("adamw_8bit", "adamw_bnb_8bit") and name == "galore":
            name = "galore_8bit"
        opt = {"name": name, "rank": value_of(config, f"{prefix}_rank", rank, integer),
               "updateInterval": value_of(config, f"{prefix}_update_interval", interval,
                                          integer),
               "scale": value_of(config, f"{prefix}_scale", scale, number)}
        target = value_of(config, f"{prefix}_target", ["all"], names_list)
        opt["targetModules"] = ["attn", "mlp"] if target == ["all"] else target
        if layerwise:
            opt["layerwise"] = True
        draft.set("training.optimizer", opt)
        draft.map(use, f"spec.training.optimizer.name {name}")
        for key in ("rank", "update_interval", "scale", "target", "layerwise"):
            if f"{prefix}_{key}" in config:
                draft.map(f"{prefix}_{key}", "spec.training.optimizer")
        for key in [k for k in config if k.startswith(prefix + "_") and k not in (
                f"{prefix}_{x}" for x in ("rank", "update_interval", "scale", "target",
                                          "layerwise"))]:
            draft.lose(key, f"kubetune uses {name}'s own default for it")
        draft.defaults.append(("training.optimizer", opt, f"LLaMA-Factory's {prefix} defaults "
                               f"(rank {rank}, interval {interval}, scale {scale}, target all "
                               "linear layers)"))
    if value_of(config, "use_badam", False, flag):
        chosen.append("use_badam")
        opt = {"name": "badam", "switchMode": config.get("badam_switch_mode") or "ascending",
               "switchEvery": value_of(config, "badam_switch_interval", 50, integer)}
        draft.set("training.optimizer", opt)
        draft.map("use_badam", "spec.training.optimizer.name badam")
        for key in ("badam_switch_mode", "badam_switch_interval"):
            if key in config:
                draft.map(key, "spec.training.optimizer")
        for key in [k for k in config if k.startswith("badam_") and k not in (
                "badam_switch_mode", "badam_switch_interval", "badam_mode")]:
            draft.lose(key, "kubetune uses BAdam's own default for it")
    else:
        for key in ("badam_switch_mode", "badam_switch_interval"):
            if key in config:
                draft.same.append((key, "not read without use_badam"))
    if value_of(config, "use_muon", False, flag):
        chosen.append("use_muon")
        draft.set("training.optimizer", {"name": "muon"})
        draft.map("use_muon", "spec.training.optimizer.name muon")
    if len(chosen) > 1:
        raise ImportProblem(f"{' and '.join(chosen)}: one optimizer at a time")


def _registry(draft: Draft, config: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """dataset_info.json of dataset_dir (read where LLaMA-Factory reads it)."""
    folder = draft.ctx.base_dir / str(config.get("dataset_dir") or "data")
    path = folder / "dataset_info.json"
    try:
        registry = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImportProblem(f"dataset: {path} not found: LLaMA-Factory resolves dataset names "
                            "through dataset_dir's dataset_info.json (run from the folder "
                            "llamafactory-cli runs in, or give --base-dir)") from None
    except (OSError, ValueError) as err:
        raise ImportProblem(f"{path}: cannot be read: {err}") from None
    if not isinstance(registry, dict):
        raise ImportProblem(f"{path}: not a JSON object of named data sets")
    return registry, path


def _datasets(draft: Draft, config: dict[str, Any], key: str, where: str) -> list[dict]:
    names = value_of(config, key, [], names_list)
    if not names:
        return []
    if str(config.get("dataset_dir")) == "ONLINE":
        out = [{"source": f"hf://{n}"} for n in names]
        draft.map(key, f"{where} (hf://, dataset_dir ONLINE)")
        return out
    registry, path = _registry(draft, config)
    local: list[str] = []
    out: list[dict[str, Any]] = []
    for name in names:
        if name not in registry:
            raise ImportProblem(f"{key}: {name!r} is not in {path}" + did_you_mean(
                name, frozenset(registry)))
        info = registry[name]
        if not isinstance(info, dict):
            raise ImportProblem(f"{path}: {name!r} is not an object")
        columns = info.get("columns") or {}
        media = sorted(set(columns) & {"images", "videos", "audios"})
        if media:
            raise ImportProblem(f"{key}: {name!r} has {', '.join(media)}: {MULTIMODAL}")
        if "file_name" in info and "hf_hub_url" not in info and "cloud_file_name" not in info:
            local.append(name)
            continue
        hub = info.get("hf_hub_url") or info.get("cloud_file_name")
        if not hub:
            raise ImportProblem(f"{key}: {name!r} loads from "
                                f"{', '.join(k for k in info if k.endswith('_url')) or 'nothing'}"
                                ": kubetune reads hf://, s3://, gs:// or local files")
        entry: dict[str, Any] = {"source": hub if "://" in hub else f"hf://{hub}"}
        if info.get("formatting"):
            entry["format"] = info["formatting"]
        for k in ("columns", "tags"):
            if info.get(k):
                entry[k] = {a: str(b) for a, b in info[k].items()}
        if info.get("ranking"):
            entry["ranking"] = True
        if info.get("num_samples"):
            entry["maxSamples"] = info["num_samples"]
        for k in ("subset", "folder"):
            if info.get(k):
                draft.lose(f"{key}: {name}.{k}", "kubetune reads the repository's default "
                           "configuration")
        if info.get("split", "train") != "train":
            draft.lose(f"{key}: {name}.split", "kubetune reads the train split")
        out.append(entry)
    if local:
        source = draft.source(str(path), f"{where}[{len(out)}].source", "dataset registry "
                              "(dataset_info.json and the files it names)", hub=False)
        out.insert(0, {"source": source, "entries": local})
    draft.map(key, where + " (through " + path.name + ")")
    if "dataset_dir" in config:
        draft.map("dataset_dir", f"{where}[].source")
    return out


def _data(draft: Draft, config: dict[str, Any], stage: str) -> None:
    datasets = _datasets(draft, config, "dataset", "spec.datasets")
    if not datasets:
        raise ImportProblem("dataset is missing: the data set names to train on")
    evals = _datasets(draft, config, "eval_dataset", "spec.evalDatasets")
    limit = value_of(config, "max_samples", None, integer)
    if limit is not None:
        for d in datasets + evals:
            d["maxSamples"] = limit
        draft.map("max_samples", "spec.datasets[].maxSamples (per data set, as LLaMA-Factory)")
    draft.set("datasets", datasets)
    if evals:
        draft.set("evalDatasets", evals)
    if config.get("template") is not None:
        template = str(config["template"])
        if template in ("chatml", "llama3", "alpaca"):
            draft.set("template", template)
            draft.map("template", f"spec.template {template}")
        else:
            draft.set("template", "auto")
            draft.lose("template", f"LLaMA-Factory's {template!r} template is not one of "
                       "kubetune's (chatml, llama3, alpaca): spec.template auto uses the "
                       "tokenizer's own chat template, the model family's format")
    if value_of(config, "neat_packing", False, flag):
        draft.set("training.packing", True)
        draft.map("neat_packing", "spec.training.packing (kubetune's packing never lets "
                  "attention cross samples)")
    elif value_of(config, "packing", False, flag) and stage != "pt":
        draft.lose("packing", "LLaMA-Factory's plain packing lets attention cross samples; "
                   "kubetune's packing never does (as neat_packing)")
    val = value_of(config, "val_size", 0.0, number)
    if val >= 1:
        raise ImportProblem(f"val_size: {val:g} rows: kubetune holds out a fraction "
                            "(training.evalSplit) or evalDatasets")
    if val > 0:
        draft.set("training.evalSplit", val)
        draft.map("val_size", "spec.training.evalSplit")


def _training(draft: Draft, config: dict[str, Any], stage: str,
              output_default: str | None = None) -> None:
    """transformers' TrainingArguments keys (LLaMA-Factory's and TRL's)."""
    bf16 = value_of(config, "bf16", False, flag) or value_of(config, "pure_bf16", False, flag)
    fp16 = value_of(config, "fp16", False, flag)
    if bf16 or fp16 or config.get("bf16") is not None or config.get("fp16") is not None:
        draft.set("training.precision", "bf16" if bf16 else "fp16" if fp16 else "fp32")
        for key in ("bf16", "fp16", "pure_bf16"):
            if key in config:
                draft.map(key, "spec.training.precision")
    if value_of(config, "pure_bf16", False, flag):
        draft.lose("pure_bf16", "kubetune trains in bf16 mixed precision (fp32 master weights)")
    warmup = value_of(config, "warmup_steps", 0, number)
    if warmup > 0:
        steps = draft.get("training.maxSteps")
        if 0 < warmup < 1:
            draft.set("training.warmupRatio", warmup)
            draft.map("warmup_steps", "spec.training.warmupRatio (a fraction)")
        elif steps:
            draft.set("training.warmupRatio", round(warmup / steps, 6))
            draft.map("warmup_steps", f"spec.training.warmupRatio = {warmup:g} / max_steps")
        else:
            draft.lose("warmup_steps", f"kubetune's warm-up is a fraction of the steps "
                       f"(training.warmupRatio): set it to {warmup:g} / your total steps")
    _strategy(draft, config)
    _evaluation(draft, config)
    _output(draft, config, output_default)


def _strategy(draft: Draft, config: dict[str, Any]) -> None:
    ds = config.get("deepspeed")
    if ds:
        strategy, how = deepspeed_strategy(draft, ds)
        draft.set("resources.strategy", strategy)
        draft.map("deepspeed", f"{_STRATEGY} {strategy} ({how})")
    if config.get("fsdp"):
        if ds:
            raise ImportProblem("deepspeed and fsdp: one strategy at a time")
        draft.set("resources.strategy", "fsdp2")
        draft.map("fsdp", f"{_STRATEGY} fsdp2")
        if config.get("fsdp_config"):
            draft.lose("fsdp_config", "kubetune's FSDP2 wraps each decoder layer itself")
    draft.moves.append(("spec.resources", "nodes 1, gpusPerNode 1", f"{draft.tool} takes the "
                        "GPUs from its launcher (torchrun, accelerate): set the job's nodes and "
                        "GPUs"))


def deepspeed_strategy(draft: Draft, ds: Any) -> tuple[str, str]:
    """A DeepSpeed config (a file, or its name, or the config itself inline) as ZeRO stage
    and offload; an inline config's keys are each accounted for."""
    if isinstance(ds, dict):
        zero = ds.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
        off = any((zero.get(k) or {}).get("device") in ("cpu", "nvme")
                  for k in ("offload_optimizer", "offload_param"))
        strategy = "ddp" if stage < 2 else f"zero{stage}" + ("-offload" if off else "")
        _deepspeed_keys(draft, ds, strategy)
        return strategy, f"ZeRO stage {stage}" + (", offload" if off else "")
    path = draft.ctx.base_dir / str(ds)
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
        zero = conf.get("zero_optimization") or {}
        stage = int(zero.get("stage", 0))
        off = any((zero.get(k) or {}).get("device") in ("cpu", "nvme")
                  for k in ("offload_optimizer", "offload_param"))
        how = f"{path.name}: ZeRO stage {stage}" + (", offload" if off else "")
    except (OSError, ValueError, AttributeError, TypeError):
        m = re.search(r"z(?:ero)?[_-]?([0-3])", path.name)
        if not m:
            raise ImportProblem(f"deepspeed: {ds}: not readable here, and its name does not "
                                "say the ZeRO stage (ds_z2_config.json, …)") from None
        stage, off = int(m.group(1)), "offload" in path.name
        how = f"ZeRO stage {stage}{', offload' if off else ''} from the file name; {path} is "\
              "not here to read"
    if stage in (0, 1):
        return "ddp", how + " (stage 0/1 shard nothing kubetune's ddp keeps)"
    return f"zero{stage}" + ("-offload" if off else ""), how


def _deepspeed_keys(draft: Draft, ds: dict[str, Any], strategy: str) -> None:
    """An inline DeepSpeed config: the ZeRO stage and offload devices pick the strategy; the
    rest kubetune's own DeepSpeed config for that strategy sets."""
    read = ("deepspeed.zero_optimization.stage",
            "deepspeed.zero_optimization.offload_optimizer.device",
            "deepspeed.zero_optimization.offload_param.device")
    for path, value in nested_keys({"deepspeed": ds}):
        if path in read:
            draft.map(path, f"spec.resources.strategy {strategy}")
        elif not isinstance(value, dict) or not value:
            draft.same.append((path, "kubetune writes the DeepSpeed config for "
                               f"{strategy} itself (batch sizes, precision and the optimizer "
                               "from the job's fields)"))


def _evaluation(draft: Draft, config: dict[str, Any]) -> None:
    predict = value_of(config, "predict_with_generate", False, flag) or value_of(
        config, "do_predict", False, flag)
    if predict:
        draft.set("evaluation.predict", True)
        for key in ("do_predict", "predict_with_generate"):
            if key in config:
                draft.map(key, "spec.evaluation.predict")
    elif "max_new_tokens" in config:
        draft.drop("evaluation")
        draft.mapped[:] = [m for m in draft.mapped if m[0] != "max_new_tokens"]
        draft.same.append(("max_new_tokens", "not read without do_predict"))
    held_out = draft.has("training.evalSplit") or draft.has("evalDatasets")
    strategy = config.get("eval_strategy")
    if strategy not in (None, "no", "steps"):
        draft.lose("eval_strategy", f"{strategy!r}: kubetune evaluates every "
                   "training.evalSteps steps")
    elif strategy == "no" and held_out:
        draft.lose("eval_strategy", "'no': kubetune evaluates whenever rows are held out")
    elif strategy == "steps" and not held_out:
        draft.lose("eval_strategy", "'steps', but no rows are held out here: kubetune "
                   "evaluates on training.evalSplit or evalDatasets (a file or folder); set one")
    elif strategy is not None:
        draft.same.append(("eval_strategy", "kubetune evaluates every evalSteps steps when "
                           "rows are held out"))
    if draft.has("training.evalSteps") and not held_out:
        draft.drop("training.evalSteps")
        draft.mapped[:] = [m for m in draft.mapped if m[0] != "eval_steps"]
        draft.same.append(("eval_steps", "no held-out rows: nothing to evaluate"))
    if predict and not held_out:
        draft.drop("evaluation")
        draft.lose("do_predict", "kubetune predicts on held-out rows: set val_size or "
                   "eval_dataset")
    trackers = value_of(config, "report_to", [], names_list)
    kept = [t for t in trackers if t in TRACKERS]
    if "all" in trackers:
        kept = list(TRACKERS)
    if kept:
        draft.set("training.reportTo", kept)
        draft.map("report_to", "spec.training.reportTo")
    other = [t for t in trackers if t not in (*TRACKERS, "none", "all")]
    if other:
        draft.lose("report_to", f"{', '.join(other)}: kubetune reports to tensorboard, wandb "
                   "and mlflow")
    elif not kept and "report_to" in config:
        draft.same.append(("report_to", "none"))


def _output(draft: Draft, config: dict[str, Any], default: str | None = None) -> None:
    out = config.get("output_dir") or default
    if not out:
        raise ImportProblem("output_dir is missing: where the result goes")
    draft.set("output.uri", draft.output(out))
    if config.get("output_dir"):
        draft.map("output_dir", "spec.output.uri")
    else:
        draft.defaults.append(("output.uri", out, f"{draft.tool}'s default output_dir"))
