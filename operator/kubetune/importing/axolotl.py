"""Axolotl (`axolotl train CONFIG.yaml`) → FineTuneJob.

Key names and defaults are Axolotl 0.19.0's (``utils/schemas/``, and the liger, spectrum,
cut_cross_entropy and lm_eval plugins' arguments).
"""

from __future__ import annotations

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
    account,
    apply_table,
    did_you_mean,
    finish,
    flag,
    integer,
    job_name,
    known_keys,
    names_list,
    number,
    positive_or_unset,
    value_of,
)
from kubetune.importing.llamafactory import MULTIMODAL, PPO, SCHEDULERS, deepspeed_strategy
from kubetune.importing.peer_keys import (
    AXOLOTL,
    AXOLOTL_DATASET,
    AXOLOTL_DATASET_TYPE,
    AXOLOTL_FSDP,
    AXOLOTL_PRETRAINING_DATASET,
    AXOLOTL_TRL,
)

_GROUP_REASONS = {
    "ModelInputConfig": "a model-loading option kubetune does not have",
    "ModelOutputConfig": "an output option kubetune does not have",
    "LoraConfig": "a LoRA option kubetune does not have",
    "ReLoRAConfig": "ReLoRA is not in kubetune",
    "JaggedLRConfig": "jagged learning-rate restarts are not in kubetune",
    "HyperparametersConfig": "an optimizer/schedule option kubetune does not have",
    "WandbConfig": "a W&B option kubetune does not have (project and run name are mapped)",
    "MLFlowConfig": "an MLflow option kubetune does not have",
    "CometConfig": "Comet is not one of kubetune's trackers (tensorboard, wandb, mlflow)",
    "TrackioConfig": "Trackio is not one of kubetune's trackers (tensorboard, wandb, mlflow)",
    "OpenTelemetryConfig": "the operator exports its own metrics (Prometheus)",
    "LISAConfig": "LISA is not in kubetune",
    "GradioConfig": "the Gradio demo is not training",
    "RayConfig": "Ray launch settings: on Kubernetes the operator starts the pods",
    "MultiModalConfig": MULTIMODAL,
    "RemappedParameters": "a model-loading override kubetune does not have",
    "DeprecatedParameters": "deprecated in Axolotl; kubetune has no equivalent",
    "AxolotlInputConfig": "an Axolotl option kubetune does not have",
}
KNOWN = known_keys(AXOLOTL, _GROUP_REASONS)

OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
              "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit",
              "paged_adamw_8bit": "paged_adamw_8bit", "paged_adamw_32bit": "paged_adamw_32bit",
              "adafactor": "adafactor", "galore_adamw": "galore",
              "galore_adamw_8bit": "galore_8bit", "galore_adamw_layerwise": "galore",
              "galore_adamw_8bit_layerwise": "galore_8bit", "apollo_adamw": "apollo",
              "apollo_adamw_layerwise": "apollo", "lomo": "lomo", "adalomo": "adalomo",
              "muon": "muon"}
ATTENTION = (("flash_attention", "flash_attention_2"), ("sdp_attention", "sdpa"),
             ("eager_attention", "eager"))
LIGER = ("liger_rope", "liger_rms_norm", "liger_glu_activation", "liger_swiglu",
         "liger_layer_norm", "liger_cross_entropy", "liger_fused_linear_cross_entropy")
_NOT_SFT_DATA = ("Axolotl prompt strategy with no kubetune equivalent: convert the rows to "
                 "alpaca, messages or sharegpt")


def _scheduler(value: Any) -> str:
    if value not in SCHEDULERS:
        raise ValueError(f"{value!r}: kubetune's schedules are {', '.join(SCHEDULERS)}")
    return value


KEYS: dict[str, Entry] = {
    # model
    "base_model": Step("spec.model.source"),
    "revision_of_model": To("model.revision"),
    "model_revision": To("model.revision"),
    "trust_remote_code": To("model.trustRemoteCode", flag),
    "model_type": Same("kubetune loads causal language models with AutoModelForCausalLM"),
    "tokenizer_type": Same("kubetune loads the model's own tokenizer (AutoTokenizer)"),
    "base_model_config": Lost("kubetune reads the model's own config", (None,)),
    "tokenizer_config": Lost("kubetune reads the model's own tokenizer", (None,)),
    "processor_type": Refuse(MULTIMODAL, (None,)),
    "image_size": Refuse(MULTIMODAL, (None,)),
    "image_resize_algorithm": Refuse(MULTIMODAL, (None,)),
    "hf_use_auth_token": Same("kubetune reads Hub tokens from spec.model.secretRef / "
                              "datasets[].secretRef (a Secret)"),
    "strict": Same("kubetune refuses unknown keys always"),
    "special_tokens": Lost("kubetune does not add or change special tokens", (None, {})),
    # method
    "adapter": Step("spec.method.type (lora; qlora: + quantization)"),
    "load_in_4bit": Step("spec.method.quantization.bits 4"),
    "load_in_8bit": Step("spec.method.quantization.bits 8"),
    "lora_r": To("method.lora.rank", integer),
    "lora_alpha": To("method.lora.alpha", integer),
    "lora_dropout": To("method.lora.dropout", number),
    "lora_target_modules": Step("spec.method.lora.targetModules"),
    "lora_target_linear": Step("spec.method.lora.targetModules all-linear"),
    "lora_modules_to_save": To("method.lora.modulesToSave", names_list),
    "peft_use_dora": To("method.lora.dora", flag),
    "peft_use_rslora": To("method.lora.rslora", flag),
    "peft_init_lora_weights": Step("spec.method.lora.init"),
    "loraplus_lr_ratio": To("method.lora.loraPlusLrRatio", number),
    "lora_fan_in_fan_out": Lost("PEFT finds Conv1D layers itself", (None, False)),
    "lora_model_dir": Refuse("training on top of an existing adapter is not in kubetune: merge "
                             "it into the model first and import the merged model", (None, "")),
    "merge_lora": Lost("set spec.output.merge: true to save base + adapter merged",
                       (None, False)),
    "unfrozen_parameters": Refuse("regexes over parameter names are not in kubetune: its "
                                  "freeze trains the last N layers (method.freeze) or the "
                                  "layers with the best signal-to-noise ratio "
                                  "(method.spectrum, the Spectrum plugin's "
                                  "spectrum_top_fraction)", (None, [])),
    "spectrum_top_fraction": Step("spec.method.spectrum.topFraction"),
    "spectrum_model_name": Same("kubetune scans the model it trains"),
    "plugins": Step("spec.training.boosters (liger) / spec.method.spectrum"),
    # stages
    "rl": Step("spec.stage"),
    "reward_model": Step("spec.stage rm"),
    "process_reward_model": Refuse("process reward models are not in kubetune (stage rm "
                                   "trains an outcome reward model)"),
    "rl_beta": Step("spec.preference.beta"),
    "orpo_alpha": Step("spec.preference.beta (ORPO's lambda)"),
    "simpo_gamma": Step("spec.preference.simpoGamma"),
    "cpo_alpha": Step("spec.preference.cpoAlpha"),
    "kto_desirable_weight": Step("spec.preference.desirableWeight"),
    "kto_undesirable_weight": Step("spec.preference.undesirableWeight"),
    "dpo_label_smoothing": Step("spec.preference.labelSmoothing"),
    "dpo_loss_type": Step("spec.preference.lossType"),
    "dpo_loss_weights": Step("spec.preference.lossWeights"),
    "precompute_ref_log_probs": Step("spec.preference.precomputeRefLogProbs"),
    "trl": Step("spec.preference.beta"),
    # data
    "datasets": Step("spec.datasets"),
    "test_datasets": Step("spec.evalDatasets"),
    "pretraining_dataset": Step("spec.datasets (stage pt)"),
    "chat_template": Step("spec.template"),
    "chat_template_jinja": Refuse("a custom Jinja chat template is not in kubetune: save it as "
                                  "the tokenizer's chat_template and use spec.template auto",
                                  (None, "")),
    "default_system_message": Lost("kubetune takes the system prompt from the rows", (None,)),
    "sequence_len": To("training.cutoffLen", integer),
    "sample_packing": To("training.packing", flag),
    "eval_sample_packing": Same("kubetune evaluates held-out rows unpacked"),
    "pad_to_sequence_len": Same("padding changes memory, not what trains"),
    "train_on_inputs": To("training.trainOnPrompt", flag),
    "val_set_size": Step("spec.training.evalSplit"),
    "dataset_prepared_path": Same("kubetune caches prepared rows itself (KUBETUNE_CACHE)"),
    "dataset_processes": To("training.preprocessingWorkers", integer),
    "dataset_num_proc": To("training.preprocessingWorkers", integer),
    "shuffle_merged_datasets": Lost("kubetune always shuffles the merged data sets", (None, True)),
    # training
    "learning_rate": To("training.learningRate", number),
    "num_epochs": To("training.epochs", number),
    "max_steps": To("training.maxSteps", positive_or_unset),
    "micro_batch_size": To("training.batchSizePerDevice", integer),
    "gradient_accumulation_steps": To("training.gradientAccumulation", integer),
    "lr_scheduler": To("training.lrScheduler", _scheduler),
    "warmup_ratio": To("training.warmupRatio", number),
    "warmup_steps": Step("spec.training.warmupRatio"),
    "weight_decay": To("training.weightDecay", number),
    "max_grad_norm": To("training.maxGradNorm", number),
    "optimizer": Step("spec.training.optimizer.name"),
    "optim_args": Step("spec.training.optimizer"),
    "optim_target_modules": Step("spec.training.optimizer.targetModules"),
    "seed": To("training.seed", integer),
    "bf16": Step("spec.training.precision"),
    "fp16": Step("spec.training.precision"),
    "tf32": Lost("kubetune leaves TF32 matmuls to PyTorch's default", (None, False, "auto")),
    "gradient_checkpointing": To("training.gradientCheckpointing", flag),
    "gradient_checkpointing_kwargs": Lost("kubetune picks the checkpointing variant", (None,)),
    "activation_offloading": To("training.boosters.activationOffload", flag),
    "flash_attention": Step("spec.training.boosters.attention"),
    "sdp_attention": Step("spec.training.boosters.attention"),
    "eager_attention": Step("spec.training.boosters.attention"),
    "xformers_attention": Lost("xformers is not in kubetune: attention auto picks flash-"
                               "attention 2 or SDPA", (None, False)),
    "neftune_noise_alpha": To("training.boosters.neftuneAlpha", number),
    "torch_compile": Step("spec.training.boosters.torchCompile"),
    "deepspeed": Step("spec.resources.strategy"),
    "fsdp": Step("spec.resources.strategy fsdp2"),
    "fsdp_config": Step("spec.resources.strategy fsdp2"),
    "fsdp_version": Step("spec.resources.strategy fsdp2"),
    "logging_steps": To("training.logSteps", integer),
    "save_steps": To("training.saveSteps", integer),
    "saves_per_epoch": Lost("kubetune checkpoints every training.saveSteps steps", (None,)),
    "save_total_limit": To("training.saveTotalLimit", integer),
    "eval_steps": To("training.evalSteps", integer),
    "evals_per_epoch": Lost("kubetune evaluates every training.evalSteps steps", (None,)),
    "output_dir": Step("spec.output.uri"),
    "resume_from_checkpoint": Same("kubetune resumes from the newest complete checkpoint in "
                                   "its output by itself"),
    "auto_resume_from_checkpoints": Same("kubetune always resumes from its newest complete "
                                         "checkpoint"),
    "wandb_project": Step("spec.training.reportTo wandb, tracking.project"),
    "wandb_name": To("training.tracking.runName", str),
    "wandb_entity": Lost("W&B's entity comes from the Secret's account (WANDB_ENTITY)", (None,)),
    "wandb_watch": Lost("gradient watching is not in kubetune", (None, "false", False)),
    "wandb_log_model": Lost("kubetune does not upload checkpoints to W&B", (None, "false",
                                                                          False)),
    "use_wandb": Step("spec.training.reportTo wandb"),
    "use_mlflow": Step("spec.training.reportTo mlflow"),
    "mlflow_tracking_uri": Step("spec.training.tracking.uri"),
    "mlflow_experiment_name": To("training.tracking.experiment", str),
    "mlflow_run_name": To("training.tracking.runName", str),
    "use_tensorboard": Step("spec.training.reportTo tensorboard"),
    "hub_model_id": Lost("set spec.output.uri to hf://ORG/NAME to push the result", (None,)),
    "push_dataset_to_hub": Lost("kubetune does not push data sets", (None,)),
    "lm_eval_tasks": Step("spec.evaluation.lmEval.tasks"),
    "lm_eval_batch_size": Step("spec.evaluation.lmEval.batchSize"),
    "lm_eval_post_train": Same("kubetune runs lm-eval after training"),
    "lm_eval_model": Lost("kubetune evaluates the model it trained", (None,)),
    "cut_cross_entropy": Lost("Cut Cross-Entropy is not in kubetune (Liger's fused linear "
                              "cross-entropy is: training.boosters.liger)", (None, False)),
    **{k: Step("spec.training.boosters.liger") for k in LIGER},
}
KNOWN.update({k: "a Liger kernel switch: kubetune's training.boosters.liger turns on all "
              "of them" for k in ("liger_rms_norm_gated", "liger_use_token_scaling",
                                  "liger_kernel_impl")})

# Axolotl's defaults where kubetune's differ (written out when the config leaves them).
DEFAULTS = {
    "training.epochs": (1.0, "Axolotl's num_epochs"),
    "training.batchSizePerDevice": (1, "Axolotl's micro_batch_size; kubetune's is 4"),
    "training.cutoffLen": (512, "Axolotl's sequence_len; kubetune's is 2048"),
    "training.lrScheduler": ("cosine", "Axolotl's lr_scheduler"),
    "training.packing": (False, "Axolotl's sample_packing"),
    "template": ("auto", "Axolotl's chat_template tokenizer_default"),
}


def convert(config: dict[str, Any], ctx: Context) -> Imported:
    draft = Draft("axolotl", ctx)
    _refuse_first(config)
    apply_table(draft, config, KEYS, KNOWN, f"{ctx.config_path.name} (axolotl)")
    source = config.get("base_model")
    if not source:
        raise ImportProblem("base_model is missing: the model to fine-tune")
    draft.set("model.source", draft.source(source, "spec.model.source", "model"))
    draft.map("base_model", "spec.model.source")
    if draft.get("model.revision") == "main":
        draft.drop("model.revision")
    stage = _stage(draft, config)
    _method(draft, config)
    _data(draft, config, stage)
    _training(draft, config)
    if "learning_rate" not in config:
        raise ImportProblem("learning_rate is missing (Axolotl requires it)")
    for path, (value, why) in DEFAULTS.items():
        draft.default(path, value, why)
    if "warmup_ratio" not in config and "warmup_steps" not in config:
        draft.default("training.warmupRatio", 0.03, "Axolotl warms up over 3 % of the steps "
                      "(at most 100 steps) when neither warmup key is set")
    return finish(draft, job_name(ctx), config)


def _refuse_first(config: dict[str, Any]) -> None:
    rl = config.get("rl")
    if rl == "ppo":
        raise ImportProblem(f"rl: 'ppo': not an Axolotl rl type, and {PPO}")
    if rl in ("grpo", "gdpo", "ebft"):
        raise ImportProblem(f"rl: {rl!r}: Axolotl's {rl} takes its rewards and data "
                            "transforms as Python functions from your code, which an import "
                            "cannot carry: write spec.rewards (stage grpo) by hand")
    template = str(config.get("chat_template") or "")
    if template in ("llava", "qwen2_vl", "pixtral", "llama3_2_vision"):
        raise ImportProblem(f"chat_template: {template!r} is a multimodal template: "
                            f"{MULTIMODAL}")
    for d in config.get("datasets") or []:
        if isinstance(d, dict) and {"field_images", "images"} & set(d):
            raise ImportProblem(f"datasets: {d.get('path')!r} has images: {MULTIMODAL}")


def _stage(draft: Draft, config: dict[str, Any]) -> str:
    rl = config.get("rl")
    reward = value_of(config, "reward_model", False, flag)
    stages = {None: "sft", "dpo": "dpo", "ipo": "dpo", "orpo": "orpo", "kto": "kto",
              "simpo": "cpo"}
    if rl not in stages:
        raise ImportProblem(f"rl: {rl!r}: Axolotl's rl types kubetune trains are "
                            + ", ".join(str(k) for k in stages if k) + did_you_mean(
                                str(rl), frozenset(str(k) for k in stages if k)))
    stage = "rm" if reward else stages[rl]
    if reward and rl:
        raise ImportProblem("reward_model and rl: one stage at a time")
    if config.get("pretraining_dataset") or (config.get("datasets") and all(
            isinstance(d, dict) and d.get("type") == "completion"
            for d in config["datasets"])):
        if stage != "sft":
            raise ImportProblem("completion/pretraining data with rl or reward_model: kubetune "
                                "trains text with stage pt only")
        stage = "pt"
    draft.set("stage", stage)
    if rl:
        draft.map("rl", f"spec.stage {stage}")
    if reward:
        draft.map("reward_model", "spec.stage rm")
    trl = config.get("trl") or {}
    if not isinstance(trl, dict):
        raise ImportProblem("trl: a mapping of TRL settings")
    beta = config.get("rl_beta", trl.get("beta"))
    if stage == "orpo":
        beta = config.get("orpo_alpha", beta)
    pref: dict[str, Any] = {}
    if stage in ("dpo", "kto", "orpo", "cpo"):
        pref["beta"] = number(beta) if beta is not None else (2.0 if stage == "cpo" else 0.1)
        for key in ("rl_beta", "orpo_alpha"):
            if key in config and (key != "orpo_alpha" or stage == "orpo"):
                draft.map(key, "spec.preference.beta")
        if "beta" in trl:
            draft.map("trl.beta", "spec.preference.beta")
    for key in trl:
        if key != "beta" and trl[key] not in (None, False):
            draft.lose(f"trl.{key}", "an online-RL (GRPO) setting: not read by stage "
                       f"{stage}")
        elif trl[key] is False:
            draft.same.append((f"trl.{key}", "false: off"))
    account(draft, "trl", trl, {k: "not read by stage " + stage for k in AXOLOTL_TRL},
            what="trl")
    if stage == "dpo":
        losses = value_of(config, "dpo_loss_type", ["ipo"] if rl == "ipo" else ["sigmoid"],
                          names_list)
        pref["lossType"] = losses
        if "dpo_loss_type" in config:
            draft.map("dpo_loss_type", "spec.preference.lossType")
        if config.get("dpo_loss_weights") is not None:
            pref["lossWeights"] = [number(w) for w in config["dpo_loss_weights"]]
            draft.map("dpo_loss_weights", "spec.preference.lossWeights")
        if config.get("dpo_label_smoothing") is not None:
            pref["labelSmoothing"] = number(config["dpo_label_smoothing"])
            draft.map("dpo_label_smoothing", "spec.preference.labelSmoothing")
    if stage == "cpo":
        pref["lossType"] = ["simpo"]
        pref["simpoGamma"] = value_of(config, "simpo_gamma", 0.5, number)
        pref["cpoAlpha"] = value_of(config, "cpo_alpha", 1.0, number)
        for key in ("simpo_gamma", "cpo_alpha"):
            if key in config:
                draft.map(key, f"spec.preference.{'simpoGamma' if 'gamma' in key else 'cpoAlpha'}")
    if stage == "kto":
        for key, field in (("kto_desirable_weight", "desirableWeight"),
                           ("kto_undesirable_weight", "undesirableWeight")):
            if config.get(key) is not None:
                pref[field] = number(config[key])
                draft.map(key, f"spec.preference.{field}")
    if stage in ("dpo", "kto") and config.get("precompute_ref_log_probs") is not None:
        pref["precomputeRefLogProbs"] = flag(config["precompute_ref_log_probs"])
        draft.map("precompute_ref_log_probs", "spec.preference.precomputeRefLogProbs")
    for key in ("rl_beta", "orpo_alpha", "simpo_gamma", "cpo_alpha", "kto_desirable_weight",
                "kto_undesirable_weight", "dpo_label_smoothing", "dpo_loss_type",
                "dpo_loss_weights", "precompute_ref_log_probs"):
        if config.get(key) is not None and key not in [k for k, _ in draft.mapped]:
            draft.same.append((key, f"not read by stage {stage} (Axolotl ignores it too)"))
    if pref:
        draft.set("preference", pref)
    return stage


def _method(draft: Draft, config: dict[str, Any]) -> None:
    adapter = config.get("adapter") or None
    four, eight = (value_of(config, "load_in_4bit", False, flag),
                   value_of(config, "load_in_8bit", False, flag))
    spectrum = "spectrum_top_fraction" in config or any(
        "spectrum" in str(p).lower() for p in config.get("plugins") or [])
    if adapter not in (None, "lora", "qlora"):
        raise ImportProblem(f"adapter: {adapter!r}: kubetune trains lora and qlora adapters "
                            "(or the whole model without adapter)")
    if adapter is None:
        kind = "freeze" if spectrum else "full"
        draft.set("method.type", kind)
        if kind == "freeze":
            draft.set("method.spectrum.topFraction",
                      value_of(config, "spectrum_top_fraction", 0.5, number))
            draft.map("spectrum_top_fraction" if "spectrum_top_fraction" in config
                      else "plugins", "spec.method.spectrum.topFraction")
            if "spectrum_top_fraction" not in config:
                draft.defaults.append(("method.spectrum.topFraction", 0.5,
                                       "the Spectrum plugin's default"))
        draft.drop("method.lora")
        lora = [k for k in config if k.startswith(("lora_", "peft_", "loraplus"))]
        for key in lora:
            draft.same.append((key, "not read without adapter"))
        draft.mapped[:] = [m for m in draft.mapped if not m[1].startswith("spec.method.lora")]
        if four or eight:
            raise ImportProblem("load_in_4bit/load_in_8bit without adapter: quantized "
                                "weights cannot train in full; kubetune quantizes the base of "
                                "a LoRA adapter (adapter: qlora or lora)")
        return
    draft.set("method.type", "lora")
    draft.map("adapter", f"spec.method.type lora{' + quantization' if adapter == 'qlora' else ''}")
    if adapter == "qlora" and not four:
        raise ImportProblem("adapter: qlora needs load_in_4bit: true (as Axolotl requires)")
    if four and eight:
        raise ImportProblem("load_in_4bit and load_in_8bit: one at a time")
    if four or eight:
        draft.set("method.quantization", {"bits": 4, "type": "nf4", "doubleQuant": True}
                  if four else {"bits": 8})
        draft.map("load_in_4bit" if four else "load_in_8bit", "spec.method.quantization")
    for key in ("load_in_4bit", "load_in_8bit"):
        if key in config and not config[key]:
            draft.same.append((key, "false"))
    if "lora_r" not in config:
        draft.default("method.lora.rank", 8, "PEFT's default r (Axolotl passes none)")
    if "lora_alpha" not in config:
        draft.default("method.lora.alpha", 8, "PEFT's default lora_alpha (Axolotl passes none)")
    if value_of(config, "lora_target_linear", False, flag):
        draft.set("method.lora.targetModules", ["all-linear"])
        draft.map("lora_target_linear", "spec.method.lora.targetModules all-linear")
    elif config.get("lora_target_modules"):
        draft.set("method.lora.targetModules", names_list(config["lora_target_modules"]))
        draft.map("lora_target_modules", "spec.method.lora.targetModules")
    else:
        draft.default("method.lora.targetModules", ["q_proj", "v_proj"],
                      "no lora_target_modules: PEFT's default for Llama-family models")
    if "lora_target_linear" in config and not config["lora_target_linear"]:
        draft.same.append(("lora_target_linear", "false"))
    if config.get("lora_target_linear") and config.get("lora_target_modules"):
        draft.same.append(("lora_target_modules", "lora_target_linear adapts every linear "
                           "layer, these included"))
    init = config.get("peft_init_lora_weights")
    if init not in (None, True):
        inits = {"gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": "loftq",
                 "eva": "eva"}
        name = str(init).split("_niter_")[0].lower()
        if name not in inits:
            raise ImportProblem(f"peft_init_lora_weights: {init!r}: kubetune's inits are "
                                + ", ".join(inits))
        draft.set("method.lora.init", inits[name])
        draft.map("peft_init_lora_weights", "spec.method.lora.init")


def _template(draft: Draft, value: Any, key: str) -> None:
    template = str(value)
    if template in ("chatml", "llama3", "alpaca"):
        draft.set("template", template)
        draft.map(key, f"spec.template {template}")
    elif template == "tokenizer_default" or template.startswith("tokenizer_default_fallback_"):
        draft.set("template", "auto")
        draft.map(key, "spec.template auto (the tokenizer's chat template)")
    else:
        draft.set("template", "auto")
        draft.lose(key, f"Axolotl's {template!r} template is not one of kubetune's (chatml, "
                   "llama3, alpaca): spec.template auto uses the tokenizer's own chat "
                   "template, the model family's format")


# Axolotl dataset types → kubetune format and columns (LLaMA-Factory column roles).
SFT_TYPES: dict[str, tuple[str, dict[str, str]]] = {
    "alpaca": ("alpaca", {}),
    "alpaca_chat": ("alpaca", {}),
    "alpaca_w_system": ("alpaca", {}),
    "sharegpt": ("sharegpt", {}),
    "completion": ("text", {"prompt": "text"}),
}
PAIR_TYPES: dict[str, dict[str, str]] = {  # after the template prefix (chatml., llama3.)
    "intel": {"prompt": "question", "system": "system"},
    "prompt_pairs": {"prompt": "prompt"},
    "argilla": {"prompt": "instruction", "chosen": "chosen_response",
                "rejected": "rejected_response"},
    "ultra": {"prompt": "prompt"},
    "default": {},  # chat_template.default: field_messages, field_chosen, field_rejected
}
KTO_TYPES: dict[str, dict[str, str]] = {
    "argilla": {"prompt": "instruction", "completion": "completion", "kto_tag": "label"},
    "intel": {"prompt": "question", "completion": "completion", "kto_tag": "label"},
    "ultra": {"prompt": "prompt", "completion": "completion", "kto_tag": "label"},
}
_DATASET_KEYS = frozenset().union(*(t.split() for t in AXOLOTL_DATASET.values()))
_TYPE_KEYS = frozenset().union(*(t.split() for t in AXOLOTL_DATASET_TYPE.values()))
_ROWS = "kubetune reads every row of the data set (training.maxSamples caps the count)"
_AS_IS = "kubetune reads the rows' own messages as they are"
_TURNS = "kubetune trains on the assistant turns (training.trainOnPrompt: on every turn)"
_STEPWISE = "process reward (stepwise) data is not in kubetune"
_SYNTHETIC = "synthetic data is not in kubetune"
# Why a data set entry's key has no equivalent (what the import does not read otherwise).
_DATASET_REASONS = {
    "name": "kubetune reads the data set's default configuration",
    "shards": _ROWS, "shards_idx": _ROWS, "preprocess_shards": _ROWS,
    "conversation": "a FastChat conversation style: kubetune renders rows with spec.template",
    "input_format": "kubetune renders rows with spec.template",
    "input_transform": "kubetune does not run Python transforms on the rows",
    "field_human": "kubetune reads alpaca, messages, sharegpt or preference columns",
    "field_model": "kubetune reads alpaca, messages, sharegpt or preference columns",
    "chat_template_jinja": "a custom Jinja chat template is not in kubetune: spec.template "
                           "auto uses the tokenizer's own",
    "drop_system_message": _AS_IS, "field_tools": _AS_IS, "field_thinking": _AS_IS,
    "template_thinking_key": _AS_IS, "split_thinking": _AS_IS,
    "message_field_training": _TURNS, "message_field_training_detail": _TURNS,
    "train_on_eot": _TURNS, "roles_to_train": _TURNS, "train_on_eos": _TURNS,
    "logprobs_field": "distillation from stored log-probabilities is not in kubetune",
    "temperature": "distillation from stored log-probabilities is not in kubetune",
    "trust_remote_code": "kubetune does not run a data set's loading script",
    "split": "kubetune reads the train split",
    "step_separator": _STEPWISE, "max_completion_length": _STEPWISE,
    "train_on_last_step_only": _STEPWISE,
    "length": _SYNTHETIC, "sequence_length": _SYNTHETIC, "min_input_id": _SYNTHETIC,
    "max_input_id": _SYNTHETIC, "seed": _SYNTHETIC,
}
# false is Axolotl's default and what kubetune does
_OFF = frozenset(("trust_remote_code", "drop_system_message", "split_thinking",
                  "train_on_last_step_only"))
_TYPE_REASONS = {k: "a column this stage's user_defined format does not read" if k.startswith(
    "field_") else "kubetune renders rows with spec.template" for k in _TYPE_KEYS}
_PRETRAINING_REASONS = {
    "name": _DATASET_REASONS["name"], "skip": _ROWS, "split": _DATASET_REASONS["split"],
    "trust_remote_code": _DATASET_REASONS["trust_remote_code"],
}


def _unknown(where: str, d: dict[str, Any], known: frozenset[str]) -> None:
    unknown = [k for k in d if k not in known]
    if unknown:
        raise ImportProblem(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                            + ", ".join(f"{k!r}{did_you_mean(str(k), known)}"
                                        for k in unknown))


def _dataset(draft: Draft, d: Any, i: int, stage: str, where: str, label: str
             ) -> dict[str, Any]:
    """One data set entry (``label``: its place in the config, for the report)."""
    key = label
    if not isinstance(d, dict) or not d.get("path"):
        raise ImportProblem(f"{key}: a data set needs path")
    _unknown(key, d, _DATASET_KEYS)
    if isinstance(d.get("type"), dict):
        _unknown(f"{key}.type", d["type"], _TYPE_KEYS)
    path = str(d["path"])
    local = draft.ctx.base_dir / path
    data_files = d.get("data_files")
    if data_files and not local.exists():
        files = names_list(data_files)
        if len(files) != 1:
            raise ImportProblem(f"{key}.data_files: kubetune reads one file or folder per "
                                "data set: give each file its own entry")
        path = files[0]
    hub = d.get("ds_type") is None and not local.exists()
    out: dict[str, Any] = {"source": draft.source(path, f"spec.{where.split(':')[0]}[{i}]"
                                                  ".source", "data set", hub=hub)}
    draft.map(f"{key}.path", f"spec.{where}[{i}].source")
    kind = d.get("type")
    prefix, _, variant = str(kind or "").partition(".")
    read: tuple[str, ...] = ()  # the entry's column keys this type reads
    if stage in ("dpo", "orpo", "cpo", "rm"):
        if kind == "bradley_terry.chat_template" or (stage == "rm" and kind in (None, "")):
            out["format"] = "preference"
        elif isinstance(kind, dict):  # user_defined: the columns in the type
            out["format"] = "preference"
            out["columns"] = _user_defined(draft, kind, key, where, i, (
                ("field_prompt", "prompt"), ("field_chosen", "chosen"),
                ("field_rejected", "rejected"), ("field_system", "system")))
        elif variant in PAIR_TYPES or kind in ("chat_template.default",):
            cols = dict(PAIR_TYPES.get(variant, {}))
            read = ("field_messages", "field_prompt", "field_chosen", "field_rejected",
                    "field_system")
            for field, role in (("field_messages", "prompt"), ("field_prompt", "prompt"),
                                ("field_chosen", "chosen"), ("field_rejected", "rejected"),
                                ("field_system", "system")):
                if d.get(field):
                    cols[role] = str(d[field])
            out["format"] = "preference"
            if cols:
                out["columns"] = cols
            if isinstance(d.get("message_property_mappings"), dict):
                draft.same.append((f"{key}.message_property_mappings", "kubetune reads each "
                                   "message's 'role' and 'content' (each key below)"))
            for prop, name in (d.get("message_property_mappings") or {}).items():
                if prop in ("role", "content") and prop == name:
                    draft.same.append((f"{key}.message_property_mappings.{prop}",
                                       f"{prop!r}: kubetune reads each message's {prop!r}"))
                else:
                    draft.lose(f"{key}.message_property_mappings.{prop}", "kubetune reads "
                               "the messages' own 'role' and 'content'")
            if prefix in ("chatml", "llama3") and not draft.has("template"):
                draft.set("template", prefix)
        else:
            raise ImportProblem(f"{key}.type: {kind!r}: a preference dataset type kubetune "
                                "reads is chatml.intel, chatml.prompt_pairs, chatml.argilla, "
                                "chatml.ultra (or llama3.*), chat_template.default, "
                                "user_defined or bradley_terry.chat_template")
    elif stage == "kto" and isinstance(kind, dict):  # user_defined: the columns in the type
        out["format"] = "promptCompletion"
        out["columns"] = _user_defined(draft, kind, key, where, i, (
            ("field_prompt", "prompt"), ("field_completion", "completion"),
            ("field_label", "kto_tag"), ("field_system", "system")))
    elif stage == "kto":
        if variant not in KTO_TYPES and prefix != "user_defined":
            raise ImportProblem(f"{key}.type: {kind!r}: a KTO dataset type kubetune reads is "
                                + ", ".join(f"chatml.{k}" for k in KTO_TYPES)
                                + " (or llama3.*), or user_defined")
        cols = dict(KTO_TYPES.get(variant, {}))
        read = ("field_prompt", "field_completion", "field_label", "field_system")
        for field, role in (("field_prompt", "prompt"), ("field_completion", "completion"),
                            ("field_label", "kto_tag"), ("field_system", "system")):
            if d.get(field):
                cols[role] = str(d[field])
        out["format"] = "promptCompletion"
        out["columns"] = cols
        if prefix in ("chatml", "llama3") and not draft.has("template"):
            draft.set("template", prefix)
    elif isinstance(kind, dict):  # user_defined prompt format
        out["format"] = "alpaca"
        out["columns"] = _user_defined(draft, kind, key, where, i, (
            ("field_instruction", "prompt"), ("field_input", "query"),
            ("field_output", "response"), ("field_system", "system")))
    elif kind == "chat_template" or str(kind).startswith("chat_template"):
        field = str(d.get("field_messages") or "messages")
        read = ("field_messages", "message_property_mappings", "message_field_role",
                "message_field_content")
        role = d.get("message_field_role")
        content = d.get("message_field_content")
        props = d.get("message_property_mappings") or {}
        role, content = props.get("role", role), props.get("content", content)
        roles = d.get("roles") or {}
        if role not in (None, "role") or content not in (None, "content") or roles:
            out["format"] = "sharegpt"
            out["columns"] = {"messages": field}
            # Axolotl accepts several names per role; kubetune one: the data's own names
            # (roles:), else ShareGPT's human/gpt under "from", OpenAI's names otherwise.
            sharegpt = role == "from"
            tags = {"role_tag": str(role or "role"), "content_tag": str(content or "content")}
            for name, tag, default in (("user", "user_tag", "human" if sharegpt else "user"),
                                       ("assistant", "assistant_tag",
                                        "gpt" if sharegpt else "assistant"),
                                       ("system", "system_tag", "system")):
                given = roles.get(name)
                tags[tag] = str(names_list(given)[0]) if given else default
            out["tags"] = tags
            if roles:
                draft.map(f"{key}.roles", f"spec.{where}[{i}].tags")
                for name, names in roles.items():
                    if name in ("user", "assistant", "system"):
                        draft.map(f"{key}.roles.{name}", f"spec.{where}[{i}].tags.{name}_tag "
                                  f"{tags[name + '_tag']!r}" + (
                                      " (the first name: kubetune reads one per role)"
                                      if len(names_list(names or [])) > 1 else ""))
                    else:
                        draft.lose(f"{key}.roles.{name}", "kubetune's sharegpt tags name "
                                   "the user, assistant and system roles only")
            for prop in props:
                if prop in ("role", "content"):
                    draft.map(f"{key}.message_property_mappings.{prop}",
                              f"spec.{where}[{i}].tags.{prop}_tag {tags[prop + '_tag']!r}")
            draft.lose(f"{key}.message_property_mappings", "Axolotl takes several names per "
                       f"role; kubetune reads one: user {tags['user_tag']!r}, assistant "
                       f"{tags['assistant_tag']!r}, system {tags['system_tag']!r} "
                       "(spec.datasets[].tags): check them against your rows")
        else:
            out["format"] = "messages"
            if field != "messages":
                out["columns"] = {"messages": field}
            for prop in props:
                if prop in ("role", "content"):
                    draft.same.append((f"{key}.message_property_mappings.{prop}",
                                       f"{prop!r}: the messages format reads {prop!r}"))
        for prop in props:
            if prop not in ("role", "content"):
                draft.lose(f"{key}.message_property_mappings.{prop}", "kubetune reads a "
                           "message's role and content only")
        if d.get("chat_template"):
            _template(draft, d["chat_template"], f"{key}.chat_template")
        trained = names_list(d.get("roles_to_train") or ["assistant"])
        if set(trained) - {"assistant", "gpt"}:
            draft.set("training.trainOnPrompt", True)
            draft.map(f"{key}.roles_to_train", "spec.training.trainOnPrompt")
        elif "roles_to_train" in d:
            draft.same.append((f"{key}.roles_to_train", "the assistant turns: what kubetune "
                               "trains on"))
    elif kind in SFT_TYPES or str(kind).split(":")[0] in SFT_TYPES:
        fmt, cols = SFT_TYPES[str(kind).split(":")[0]]
        out["format"] = fmt
        if d.get("field") and fmt == "text":
            cols = {"prompt": str(d["field"])}
            read = ("field",)
        if cols and fmt != "text" or cols.get("prompt", "text") != "text":
            out["columns"] = cols
        if ":" in str(kind):
            draft.lose(f"{key}.type", f"{kind!r}: the prompt style after ':' is "
                       "spec.template's job in kubetune")
    else:
        raise ImportProblem(f"{key}.type: {kind!r}: {_NOT_SFT_DATA}")
    if kind is not None:
        draft.map(f"{key}.type", f"spec.{where}[{i}].format")
    for f in read:
        if f in d:
            draft.map(f"{key}.{f}", f"spec.{where}[{i}]" + (
                ".tags" if f.startswith("message_") and "tags" in out else ".columns"
                if "columns" in out else f".format {out['format']}"))
    for f in ("ds_type", "data_files"):
        if f in d:
            draft.map(f"{key}.{f}", f"spec.{where}[{i}].source")
    if d.get("revision"):
        out["revision"] = str(d["revision"])
        draft.map(f"{key}.revision", f"spec.{where}[{i}].revision")
    if d.get("split") not in (None, "train"):
        draft.lose(f"{key}.split", "kubetune reads the train split")
    elif d.get("split") == "train":
        draft.same.append((f"{key}.split", "train: the split kubetune reads"))
    if d.get("train_on_eos") not in (None, "turn", "last"):
        draft.lose(f"{key}.train_on_eos", "kubetune trains on each assistant turn's end")
    elif d.get("train_on_eos") is not None:
        draft.same.append((f"{key}.train_on_eos", "kubetune trains on each assistant turn's "
                           "end"))
    # what no step above read: listed with the reason (a field_* this type does not use …)
    unread = f"not read by a {kind!r} data set in kubetune"
    account(draft, key, d, {k: _DATASET_REASONS.get(k, unread) for k in _DATASET_KEYS},
            check=False, off=_OFF)
    for k in ("message_property_mappings", "roles"):
        if isinstance(d.get(k), dict):
            account(draft, f"{key}.{k}", d[k], {c: unread for c in d[k]}, check=False)
    return out


def _user_defined(draft: Draft, kind: dict[str, Any], key: str, where: str, i: int,
                  fields: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """A ``type:`` given as a mapping (Axolotl's user_defined formats): its field_* keys
    name the columns; its format strings are spec.template's job in kubetune."""
    cols = {role: str(kind[f]) for f, role in fields if kind.get(f)}
    account(draft, f"{key}.type", kind, _TYPE_REASONS, {
        f: f"spec.{where}[{i}].columns.{role}" for f, role in fields if kind.get(f)})
    return cols


def _pretraining(draft: Draft, pre: Any, stage: str) -> list[dict[str, Any]]:
    """``pretraining_dataset`` (one entry or a list) as text data sets."""
    out = []
    for i, r in enumerate(pre if isinstance(pre, list) else [pre]):
        label = f"pretraining_dataset[{i}]" if isinstance(pre, list) else "pretraining_dataset"
        if not isinstance(r, dict):
            raise ImportProblem(f"{label}: a data set needs path")
        _unknown(label, r, AXOLOTL_PRETRAINING_DATASET)
        row = {"path": r.get("path"), "type": "completion", "field": r.get("text_column",
                                                                          "text")}
        if r.get("split"):
            row["split"] = r["split"]
        if r.get("data_files"):
            row["data_files"] = r["data_files"]
        out.append(_dataset(draft, row, i, stage, "datasets", label))
        draft.mapped[:] = [m for m in draft.mapped if m[0] != f"{label}.field"]
        account(draft, label, r, _PRETRAINING_REASONS, {
            "text_column": f"spec.datasets[{i}].columns.prompt (the text)",
            "type": f"spec.datasets[{i}].format text"}, check=False, off=_OFF)
    return out


def _data(draft: Draft, config: dict[str, Any], stage: str) -> None:
    rows = config.get("datasets") or []
    if config.get("pretraining_dataset"):
        draft.set("datasets", _pretraining(draft, config["pretraining_dataset"], stage))
        draft.map("pretraining_dataset", "spec.datasets (stage pt)")
    elif not rows:
        raise ImportProblem("datasets is missing: the data to train on")
    else:
        draft.set("datasets", [_dataset(draft, d, i, stage, "datasets", f"datasets[{i}]")
                               for i, d in enumerate(rows)])
        draft.map("datasets", "spec.datasets")
    tests = config.get("test_datasets") or []
    if tests:
        draft.set("evalDatasets", [_dataset(draft, d, i, stage, "evalDatasets",
                                            f"test_datasets[{i}]")
                                   for i, d in enumerate(tests)])
        draft.map("test_datasets", "spec.evalDatasets")
    if config.get("chat_template") is not None:
        _template(draft, config["chat_template"], "chat_template")
    val = value_of(config, "val_set_size", 0.0, number)
    if val >= 1:
        raise ImportProblem(f"val_set_size: {val:g}: kubetune holds out a fraction below 1")
    if val > 0:
        if tests:
            raise ImportProblem("val_set_size and test_datasets: kubetune holds out rows one "
                                "way (training.evalSplit or evalDatasets)")
        draft.set("training.evalSplit", val)
        draft.map("val_set_size", "spec.training.evalSplit")
    elif "val_set_size" in config:
        draft.same.append(("val_set_size", "0: no held-out rows"))
    if draft.has("training.evalSteps") and not (val > 0 or tests):
        draft.drop("training.evalSteps")
        draft.mapped[:] = [m for m in draft.mapped if m[0] != "eval_steps"]
        draft.same.append(("eval_steps", "no held-out rows: nothing to evaluate"))
    tasks = value_of(config, "lm_eval_tasks", [], names_list)
    if tasks:
        draft.set("evaluation.lmEval", {"tasks": tasks, "batchSize": value_of(
            config, "lm_eval_batch_size", 8, integer)})
        draft.map("lm_eval_tasks", "spec.evaluation.lmEval.tasks")
        if "lm_eval_batch_size" in config:
            draft.map("lm_eval_batch_size", "spec.evaluation.lmEval.batchSize")


def optimizer(draft: Draft, config: dict[str, Any], key: str = "optimizer") -> None:
    """transformers' ``optim`` names (Axolotl's ``optimizer``, TRL's ``optim``)."""
    name = config.get(key)
    if name is None:
        return
    if name not in OPTIMIZERS:
        raise ImportProblem(f"optimizer: {name!r} has no kubetune equivalent; kubetune's: "
                            + ", ".join(sorted(OPTIMIZERS)) + did_you_mean(
                                str(name), frozenset(OPTIMIZERS)))
    opt: dict[str, Any] = {"name": OPTIMIZERS[name]}
    draft.map(key, f"spec.training.optimizer.name {opt['name']}")
    if opt["name"] in ("galore", "galore_8bit", "apollo"):
        if name.endswith("layerwise"):
            opt["layerwise"] = True
        if config.get("optim_target_modules"):
            opt["targetModules"] = names_list(config["optim_target_modules"])
            draft.map("optim_target_modules", "spec.training.optimizer.targetModules")
        args = config.get("optim_args") or {}
        if isinstance(args, str):
            args = dict(part.split("=", 1) for part in args.replace(" ", "").split(",")
                        if "=" in part)
        nested = isinstance(config.get("optim_args"), dict)  # keys of its own in the report
        args = dict(args)
        for k, field, conv in (("rank", "rank", integer), ("update_proj_gap", "updateInterval",
                                                          integer), ("scale", "scale", number)):
            if k in args:
                opt[field] = conv(args.pop(k))
                if nested:
                    draft.map(f"optim_args.{k}", f"spec.training.optimizer.{field}")
        for k in args:
            draft.lose(f"optim_args.{k}", "kubetune uses the optimizer's own default")
        if config.get("optim_args"):
            draft.map("optim_args", "spec.training.optimizer")
    elif config.get("optim_args") or config.get("optim_target_modules"):
        draft.lose("optim_args", f"not read by {opt['name']} in kubetune")
    draft.set("training.optimizer", opt)


def _training(draft: Draft, config: dict[str, Any]) -> None:
    optimizer(draft, config)
    bf16, fp16 = config.get("bf16", "auto"), value_of(config, "fp16", False, flag)
    if fp16:
        draft.set("training.precision", "fp16")
        draft.map("fp16", "spec.training.precision fp16")
    elif bf16 == "auto" or bf16 is None:
        draft.set("training.precision", "auto")
        if "bf16" in config:
            draft.map("bf16", "spec.training.precision auto (bf16 where the GPU has it)")
    elif flag(bf16):
        draft.set("training.precision", "bf16")
        draft.map("bf16", "spec.training.precision bf16")
    else:
        draft.set("training.precision", "fp32")
        draft.map("bf16", "spec.training.precision fp32")
    for key, attention in ATTENTION:
        if value_of(config, key, False, flag):
            draft.set("training.boosters.attention", attention)
            draft.map(key, f"spec.training.boosters.attention {attention}")
        elif key in config:
            draft.same.append((key, "false"))
    liger = [k for k in LIGER if value_of(config, k, False, flag)]
    plugins = names_list(config.get("plugins") or [])
    if liger:
        draft.set("training.boosters.liger", True)
        for k in liger:
            draft.map(k, "spec.training.boosters.liger")
    for k in LIGER:
        if k in config and k not in liger:
            draft.same.append((k, "false"))
    for p in plugins:
        if p.endswith("LigerPlugin") or p.endswith("SpectrumPlugin"):
            draft.map(f"plugins: {p}", "spec.training.boosters.liger" if "Liger" in p
                      else "spec.method.spectrum")
        elif p.endswith("LMEvalPlugin"):
            draft.map(f"plugins: {p}", "spec.evaluation.lmEval")
        else:
            draft.lose(f"plugins: {p}", "an Axolotl plugin kubetune has no equivalent for")
    compile_ = config.get("torch_compile")
    if compile_ not in (None, False):
        draft.set("training.boosters.torchCompile", True)
        draft.map("torch_compile", "spec.training.boosters.torchCompile")
    warmup = value_of(config, "warmup_steps", 0, number)
    if warmup > 0:
        steps = draft.get("training.maxSteps")
        if steps:
            draft.set("training.warmupRatio", round(warmup / steps, 6))
            draft.map("warmup_steps", f"spec.training.warmupRatio = {warmup:g} / max_steps")
        else:
            draft.lose("warmup_steps", "kubetune's warm-up is a fraction of the steps "
                       f"(training.warmupRatio): set it to {warmup:g} / your total steps")
    _strategy(draft, config)
    _trackers(draft, config)
    out = config.get("output_dir") or "./model-out"
    draft.set("output.uri", draft.output(out))
    draft.map("output_dir", "spec.output.uri") if "output_dir" in config else \
        draft.defaults.append(("output.uri", out, "Axolotl's output_dir"))


def _strategy(draft: Draft, config: dict[str, Any]) -> None:
    ds = config.get("deepspeed")
    if ds:
        strategy, how = deepspeed_strategy(draft, ds)
        draft.set("resources.strategy", strategy)
        draft.map("deepspeed", f"spec.resources.strategy {strategy} ({how})")
    fsdp = config.get("fsdp") or config.get("fsdp_config") or config.get("fsdp_version")
    if fsdp:
        if ds:
            raise ImportProblem("deepspeed and fsdp: one strategy at a time")
        draft.set("resources.strategy", "fsdp2")
        for key in ("fsdp", "fsdp_config", "fsdp_version"):
            if key in config:
                draft.map(key, "spec.resources.strategy fsdp2 (kubetune wraps each decoder "
                          "layer; offload and state-dict settings are its own)")
        if isinstance(config.get("fsdp_config"), dict):
            why = ("kubetune's fsdp2 wraps each decoder layer and sets offload, state dict "
                   "and precision itself")
            known = {k: why for k in AXOLOTL_FSDP} | {f"fsdp_{k}": why for k in AXOLOTL_FSDP}
            account(draft, "fsdp_config", config["fsdp_config"], known, {
                k: "spec.resources.strategy fsdp2" for k in ("fsdp_version", "fsdp_fsdp_version")
                if str(config["fsdp_config"].get(k)) == "2"}, what="fsdp_config",
                off=frozenset(("offload_params", "fsdp_offload_params")))
    draft.moves.append(("spec.resources", "nodes 1, gpusPerNode 1", f"{draft.tool} takes the "
                        "GPUs from its launcher (torchrun, accelerate): set the job's nodes and "
                        "GPUs"))


def _trackers(draft: Draft, config: dict[str, Any]) -> None:
    trackers = []
    if config.get("wandb_project") or value_of(config, "use_wandb", False, flag):
        trackers.append("wandb")
        if config.get("wandb_project"):
            draft.set("training.tracking.project", str(config["wandb_project"]))
            draft.map("wandb_project", "spec.training.reportTo wandb, tracking.project")
        if "use_wandb" in config:
            draft.map("use_wandb", "spec.training.reportTo wandb")
    if config.get("mlflow_tracking_uri") or value_of(config, "use_mlflow", False, flag):
        trackers.append("mlflow")
        if config.get("mlflow_tracking_uri"):
            draft.set("training.tracking.uri", str(config["mlflow_tracking_uri"]))
            draft.map("mlflow_tracking_uri", "spec.training.tracking.uri")
        if "use_mlflow" in config:
            draft.map("use_mlflow", "spec.training.reportTo mlflow")
    if value_of(config, "use_tensorboard", False, flag):
        trackers.append("tensorboard")
        draft.map("use_tensorboard", "spec.training.reportTo tensorboard")
    if trackers:
        draft.set("training.reportTo", trackers)
    elif draft.has("training.tracking"):
        draft.drop("training.tracking")
        draft.mapped[:] = [m for m in draft.mapped if "tracking" not in m[1]]
        for key in ("wandb_name", "mlflow_experiment_name", "mlflow_run_name"):
            if key in config:
                draft.same.append((key, "no tracker is on"))

