"""TRL (`trl sft|dpo|kto|reward --config CONFIG.yaml`) → FineTuneJob.

A TRL config does not say which trainer it is for (the command does): ``--stage`` names it.
Key names and defaults are TRL 1.16's (``ScriptArguments``, ``ModelConfig``,
``DatasetMixtureConfig`` and the trainer's config, over transformers' ``TrainingArguments``);
``kubetune import trl --check`` compares them with the installed TRL.
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
    job_name,
    names_list,
    number,
    value_of,
)
from kubetune.importing import llamafactory as lf
from kubetune.importing.axolotl import optimizer
from kubetune.importing.llamafactory import MULTIMODAL, PPO
from kubetune.importing.peer_keys import TRANSFORMERS, TRL

# `trl COMMAND` → (kubetune stage, the config class's group in peer_keys.TRL, learning rate)
STAGES = {"sft": ("sft", "sft", 2e-5), "dpo": ("dpo", "dpo", 1e-6),
          "kto": ("kto", "kto", 1e-6), "reward": ("rm", "reward", 1e-4),
          "orpo": ("orpo", "orpo", 1e-6)}
REFUSED = {"ppo": PPO,
           "grpo": "TRL's grpo takes its reward functions as Python callables, which an import "
                   "cannot carry: write spec.rewards (stage grpo) by hand",
           "rloo": "RLOO is not in kubetune (stage grpo is the closest)",
           "gkd": "GKD (distillation) is not in kubetune",
           "xpo": "XPO is not in kubetune", "nash_md": "Nash-MD is not in kubetune",
           "online_dpo": "online DPO is not in kubetune (stage grpo is the closest)",
           "cpo": "TRL's experimental cpo config is not imported: kubetune's stage cpo takes "
                  "beta, lossType, simpoGamma and cpoAlpha (write it by hand)"}

_HF_REASON = "a transformers TrainingArguments option kubetune sets itself or does not expose"

# transformers' TrainingArguments keys: as LLaMA-Factory's (the same argument class).
HF_KEYS: dict[str, Entry] = {k: v for k, v in lf.KEYS.items() if k in TRANSFORMERS}

KEYS: dict[str, Entry] = {
    **HF_KEYS,
    "optim": Step("spec.training.optimizer.name"),
    "optim_args": Step("spec.training.optimizer"),
    "optim_target_modules": Step("spec.training.optimizer.targetModules"),
    "use_liger_kernel": To("training.boosters.liger", flag),
    # ModelConfig
    "model_name_or_path": Step("spec.model.source"),
    "model_revision": To("model.revision"),
    "trust_remote_code": To("model.trustRemoteCode", flag),
    "dtype": Same("kubetune loads the weights in the training precision"),
    "torch_dtype": Same("kubetune loads the weights in the training precision"),
    "attn_implementation": Step("spec.training.boosters.attention"),
    "use_peft": Step("spec.method.type"),
    "lora_r": Step("spec.method.lora.rank"),
    "lora_alpha": Step("spec.method.lora.alpha"),
    "lora_dropout": Step("spec.method.lora.dropout"),
    "lora_target_modules": Step("spec.method.lora.targetModules"),
    "lora_modules_to_save": Step("spec.method.lora.modulesToSave"),
    "use_rslora": Step("spec.method.lora.rslora"),
    "use_dora": Step("spec.method.lora.dora"),
    "lora_task_type": Lost("kubetune trains causal language models (and rm's score head)",
                           (None, "CAUSAL_LM", "SEQ_CLS")),
    "lora_target_parameters": Refuse("LoRA on parameters (MoE experts) is not in kubetune",
                                     (None, [])),
    "load_in_4bit": Step("spec.method.quantization.bits 4"),
    "load_in_8bit": Step("spec.method.quantization.bits 8"),
    "bnb_4bit_quant_type": Step("spec.method.quantization.type"),
    "use_bnb_nested_quant": Step("spec.method.quantization.doubleQuant"),
    "bnb_4bit_quant_storage": Lost("kubetune stores 4-bit weights as bitsandbytes does by "
                                   "default", (None,)),
    # ScriptArguments, DatasetMixtureConfig
    "dataset_name": Step("spec.datasets"),
    "dataset_config": Lost("kubetune reads the data set's default configuration", (None,)),
    "dataset_train_split": Lost("kubetune reads the train split", (None, "train")),
    "dataset_test_split": Step("spec.training.evalSplit"),
    "dataset_streaming": Lost("kubetune reads the data sets whole", (None, False)),
    "ignore_bias_buffers": Same("a DDP workaround kubetune's launcher does not need"),
    "datasets": Step("spec.datasets"),
    "streaming": Lost("kubetune reads the data sets whole", (None, False)),
    "test_split_size": Step("spec.training.evalSplit"),
    # the trainers' configs
    "max_length": To("training.cutoffLen", lambda v: lf.integer(v)),
    "packing": To("training.packing", flag),
    "packing_strategy": Lost("kubetune packs best-fit, attention never crossing samples "
                             "(TRL's bfd)", (None, "bfd")),
    "padding_free": Same("kubetune's packed rows already carry no padding"),
    "eval_packing": Same("kubetune evaluates held-out rows unpacked"),
    "completion_only_loss": Step("spec.training.trainOnPrompt"),
    "assistant_only_loss": Step("spec.training.trainOnPrompt"),
    "dataset_text_field": Lost("kubetune reads a text column named text (or a format's "
                               "columns)", (None, "text")),
    "dataset_num_proc": To("training.preprocessingWorkers", lf.integer),
    "dataset_kwargs": Lost("kubetune prepares the rows itself", (None, {})),
    "chat_template_path": Refuse("a custom chat template is not in kubetune: save it as the "
                                 "tokenizer's chat_template and use spec.template auto",
                                 (None, "")),
    "eos_token": Lost("kubetune uses the tokenizer's own end-of-turn token", (None,)),
    "pad_token": Lost("kubetune uses the tokenizer's pad token (or its end token)", (None,)),
    "truncation_mode": Lost("kubetune keeps the start of a row", (None, "keep_start")),
    "activation_offloading": To("training.boosters.activationOffload", flag),
    "model_init_kwargs": Lost("kubetune loads the model itself", (None, {})),
    "disable_dropout": Same("kubetune runs TRL's trainer with its default (dropout off)"),
    "loss_type": Step("spec.preference.lossType"),
    "loss_weights": Step("spec.preference.lossWeights"),
    "beta": Step("spec.preference.beta"),
    "label_smoothing": Step("spec.preference.labelSmoothing"),
    "precompute_ref_log_probs": Step("spec.preference.precomputeRefLogProbs"),
    "desirable_weight": Step("spec.preference.desirableWeight"),
    "undesirable_weight": Step("spec.preference.undesirableWeight"),
    "center_rewards_coefficient": Refuse("reward centering is not in kubetune's rm stage"),
    "use_weighting": Refuse("WPO weighting is not in kubetune"),
    "sync_ref_model": Refuse("a synced reference (TR-DPO) is not in kubetune"),
    "f_divergence_type": Refuse("kubetune's DPO uses the reverse KL", (None, "reverse_kl")),
    "ld_alpha": Refuse("LD-DPO is not in kubetune"),
    "max_completion_length": Lost("kubetune cuts pairs at training.cutoffLen (longer pairs "
                                  "are left out)", (None,)),
}
KEYS["output_dir"] = Step("spec.output.uri")

_MODEL_KEYS = ("dtype", "torch_dtype")


def _known(group: str) -> dict[str, str]:
    """The keys `trl COMMAND` accepts, with the reason for those the table leaves out."""
    out = dict.fromkeys(TRANSFORMERS, _HF_REASON)
    for g in ("model", "script", "mixture", group):
        out.update(dict.fromkeys(TRL[g].split(), f"a TRL option kubetune does not have "
                                 f"(trl {group})"))
    return out


def convert(config: dict[str, Any], ctx: Context) -> Imported:
    command = ctx.stage or "sft"
    if command in REFUSED:
        raise ImportProblem(f"--stage {command}: {REFUSED[command]}")
    if command not in STAGES:
        raise ImportProblem(f"--stage {command!r}: the trl commands kubetune imports are "
                            + ", ".join(STAGES) + did_you_mean(command, frozenset(STAGES)))
    stage, group, lr = STAGES[command]
    known = _known(group)
    table = {k: v for k, v in KEYS.items() if k in known or k in _MODEL_KEYS}
    other = [k for k in config if k not in known and any(
        k in TRL[g].split() for g in TRL)]
    if other:
        owners = sorted({g for g in TRL for k in other if k in TRL[g].split()})
        raise ImportProblem(f"{', '.join(other)}: not an option of `trl {command}` (an option "
                            f"of trl {', '.join(owners)}): is the config for another trainer? "
                            "give it with --stage")
    draft = Draft("trl", ctx)
    if any(str(k).startswith(("image", "video")) for k in config) or config.get(
            "vision_model") is not None:
        raise ImportProblem(MULTIMODAL)
    apply_table(draft, config, table, known, f"{ctx.config_path.name} (trl {command})")
    source = config.get("model_name_or_path")
    if not source:
        raise ImportProblem("model_name_or_path is missing: the model to fine-tune")
    draft.set("model.source", draft.source(source, "spec.model.source", "model"))
    draft.map("model_name_or_path", "spec.model.source")
    if draft.get("model.revision") == "main":
        draft.drop("model.revision")
    draft.set("stage", stage)
    _method(draft, config)
    _data(draft, config)
    _preference(draft, config, stage)
    _loss_mask(draft, config, stage)
    optimizer(draft, config, "optim")
    lf._training(draft, config, stage, output_default="trainer_output")
    attention = config.get("attn_implementation")
    if attention:
        table_ = {"flash_attention_2": "flash_attention_2", "sdpa": "sdpa", "eager": "eager",
                  "kernels-community/flash-attn": "flash_attention_2"}
        if attention not in table_:
            draft.lose("attn_implementation", f"{attention!r}: kubetune's attention is auto, "
                       "sdpa, flash_attention_2 or eager")
        else:
            draft.set("training.boosters.attention", table_[attention])
            draft.map("attn_implementation", "spec.training.boosters.attention")
    defaults = {
        "training.learningRate": (lr, f"trl {command}'s default"),
        "training.lrScheduler": ("linear", "transformers' default; kubetune's is cosine"),
        "training.warmupRatio": (0.0, "transformers' default"),
        "training.batchSizePerDevice": (8, "transformers' default; kubetune's is 4"),
        "training.cutoffLen": (1024, f"trl {command}'s max_length; kubetune's is 2048"),
        "training.packing": (False, "TRL's default"),
        "training.saveSteps": (500, "transformers' default; kubetune's is 100"),
        "training.logSteps": (10, "TRL's default"),
        "training.gradientCheckpointing": (True, "TRL's default"),
        "training.precision": ("bf16", "TRL's configs train in bf16 unless fp16"),
        "template": ("auto", "TRL renders conversations with the tokenizer's chat template"),
    }
    for path, (value, why) in defaults.items():
        draft.default(path, value, why)
    if stage in ("dpo", "kto", "orpo"):
        draft.default("preference.beta", 0.1, f"trl {command}'s beta")
    return finish(draft, job_name(ctx), config)


def _method(draft: Draft, config: dict[str, Any]) -> None:
    peft = value_of(config, "use_peft", False, flag)
    four, eight = (value_of(config, "load_in_4bit", False, flag),
                   value_of(config, "load_in_8bit", False, flag))
    lora_keys = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                 "lora_modules_to_save", "use_rslora", "use_dora")
    if not peft:
        draft.set("method.type", "full")
        draft.defaults.append(("method.type", "full", "use_peft is off: TRL trains every "
                               "weight; kubetune's default is lora"))
        for key in (*lora_keys, "bnb_4bit_quant_type", "use_bnb_nested_quant"):
            if key in config:
                draft.same.append((key, "not read without use_peft"))
        if four or eight:
            raise ImportProblem("load_in_4bit/load_in_8bit without use_peft: quantized weights "
                                "cannot train in full; kubetune quantizes the base of a LoRA "
                                "adapter (use_peft: true)")
        return
    draft.set("method.type", "lora")
    draft.map("use_peft", "spec.method.type lora")
    lora = {"rank": value_of(config, "lora_r", 16, lf.integer),
            "alpha": value_of(config, "lora_alpha", 32, lf.integer),
            "dropout": value_of(config, "lora_dropout", 0.05, number),
            "targetModules": value_of(config, "lora_target_modules", ["q_proj", "v_proj"],
                                      names_list)}
    if lora["targetModules"] == ["all-linear"] or lora["targetModules"] == "all-linear":
        lora["targetModules"] = ["all-linear"]
    if "lora_target_modules" not in config:
        draft.defaults.append(("method.lora.targetModules", ["q_proj", "v_proj"],
                               "no lora_target_modules: PEFT's default for Llama-family "
                               "models"))
    if "lora_dropout" not in config:
        draft.defaults.append(("method.lora.dropout", 0.05, "TRL's lora_dropout"))
    if config.get("lora_modules_to_save"):
        lora["modulesToSave"] = names_list(config["lora_modules_to_save"])
    for key, field in (("use_rslora", "rslora"), ("use_dora", "dora")):
        if value_of(config, key, False, flag):
            lora[field] = True
    draft.set("method.lora", lora)
    for key in lora_keys:
        if key in config:
            draft.map(key, "spec.method.lora")
    if four and eight:
        raise ImportProblem("load_in_4bit and load_in_8bit: one at a time")
    if four:
        draft.set("method.quantization", {
            "bits": 4, "type": config.get("bnb_4bit_quant_type") or "nf4",
            "doubleQuant": value_of(config, "use_bnb_nested_quant", False, flag)})
        draft.map("load_in_4bit", "spec.method.quantization.bits 4")
        for key in ("bnb_4bit_quant_type", "use_bnb_nested_quant"):
            if key in config:
                draft.map(key, "spec.method.quantization")
        if "use_bnb_nested_quant" not in config:
            draft.defaults.append(("method.quantization.doubleQuant", False,
                                   "TRL's use_bnb_nested_quant; kubetune's is true"))
    elif eight:
        draft.set("method.quantization", {"bits": 8})
        draft.map("load_in_8bit", "spec.method.quantization.bits 8")


def _dataset(draft: Draft, d: dict[str, Any], where: str, key: str | None = None
             ) -> dict[str, Any]:
    path = str(d.get("path") or "")
    if not path:
        raise ImportProblem(f"{where}: a data set needs path")
    unknown = sorted(set(d) - {"path", "name", "data_dir", "data_files", "split", "columns",
                               "fraction"})
    if unknown:
        raise ImportProblem(f"{where}: unknown key {unknown[0]!r}" + did_you_mean(
            unknown[0], frozenset(("path", "name", "data_dir", "data_files", "split",
                                   "columns", "fraction"))))
    if path in ("json", "csv", "parquet", "text") and d.get("data_files"):
        files = names_list(d["data_files"])
        if len(files) != 1:
            raise ImportProblem(f"{where}.data_files: kubetune reads one file or folder per "
                                "data set: give each its own entry")
        source = draft.source(files[0], f"spec.{where}.source", "data set", hub=False)
        draft.map(f"{where}.data_files", f"spec.{where}.source (the {path} file)")
    else:
        source = draft.source(path, f"spec.{where}.source", "data set")
    draft.map(key or f"{where}.path", f"spec.{where}.source")
    for key, why in (("name", "kubetune reads the default configuration"),
                     ("data_dir", "point path at the folder instead"),
                     ("columns", "kubetune reads a format's columns"),
                     ("fraction", "use maxSamples for a count")):
        if d.get(key):
            draft.lose(f"{where}.{key}", why)
    if d.get("split") not in (None, "train"):
        draft.lose(f"{where}.split", "kubetune reads the train split")
    elif d.get("split") == "train":
        draft.same.append((f"{where}.split", "train: the split kubetune reads"))
    if key is None:  # what no step above read (data_files beside a Hub path, an empty name)
        account(draft, where, d, {
            "name": "kubetune reads the default configuration", "data_dir": "point path at "
            "the folder instead", "columns": "kubetune reads a format's columns",
            "fraction": "use maxSamples for a count", "data_files": "kubetune reads the "
            "repository at path (a file goes in path, or path json|csv|parquet with one "
            "data_files)"}, check=False)
    return {"source": source}


def _data(draft: Draft, config: dict[str, Any]) -> None:
    datasets = []
    if config.get("dataset_name"):
        datasets.append(_dataset(draft, {"path": config["dataset_name"]}, "datasets[0]",
                                 "dataset_name"))
    mixture = config.get("datasets") or []
    if not isinstance(mixture, list):
        raise ImportProblem("datasets: a list of {path, name, data_files, split, …}")
    for d in mixture:
        if not isinstance(d, dict):
            raise ImportProblem("datasets: each entry is a mapping with path")
        datasets.append(_dataset(draft, d, f"datasets[{len(datasets)}]"))
    if mixture:
        draft.map("datasets", "spec.datasets")
    if not datasets:
        raise ImportProblem("dataset_name (or datasets) is missing: the data to train on")
    draft.set("datasets", datasets)
    size = value_of(config, "test_split_size", None, number)
    if size is not None:
        if not 0 < size < 1:
            raise ImportProblem(f"test_split_size: {size:g}: kubetune holds out a fraction "
                                "between 0 and 1")
        draft.set("training.evalSplit", size)
        draft.map("test_split_size", "spec.training.evalSplit")
    if "dataset_test_split" in config:
        draft.lose("dataset_test_split", "kubetune cannot pick a Hub split to evaluate on: it "
                   "holds out training.evalSplit (test_split_size) or evalDatasets")


def _preference(draft: Draft, config: dict[str, Any], stage: str) -> None:
    pref: dict[str, Any] = {}
    if config.get("beta") is not None and stage in ("dpo", "kto", "orpo"):
        pref["beta"] = number(config["beta"])
        draft.map("beta", "spec.preference.beta")
    if stage == "dpo":
        if config.get("loss_type") is not None:
            pref["lossType"] = names_list(config["loss_type"])
            draft.map("loss_type", "spec.preference.lossType")
        if config.get("loss_weights") is not None:
            pref["lossWeights"] = [number(w) for w in config["loss_weights"]]
            draft.map("loss_weights", "spec.preference.lossWeights")
        if config.get("label_smoothing") is not None:
            pref["labelSmoothing"] = number(config["label_smoothing"])
            draft.map("label_smoothing", "spec.preference.labelSmoothing")
    if stage == "kto":
        if config.get("loss_type") not in (None, "kto"):
            raise ImportProblem(f"loss_type: {config['loss_type']!r}: kubetune's KTO has the "
                                "kto loss only")
        if "loss_type" in config:
            draft.map("loss_type", "spec.stage kto")
        for key, field in (("desirable_weight", "desirableWeight"),
                           ("undesirable_weight", "undesirableWeight")):
            if config.get(key) is not None:
                pref[field] = number(config[key])
                draft.map(key, f"spec.preference.{field}")
    if stage in ("dpo", "kto") and config.get("precompute_ref_log_probs") is not None:
        pref["precomputeRefLogProbs"] = flag(config["precompute_ref_log_probs"])
        draft.map("precompute_ref_log_probs", "spec.preference.precomputeRefLogProbs")
    if stage == "sft" and config.get("loss_type") not in (None, "nll"):
        raise ImportProblem(f"loss_type: {config['loss_type']!r}: kubetune's sft trains with "
                            "the nll loss")
    elif stage == "sft" and "loss_type" in config:
        draft.same.append(("loss_type", "nll, as kubetune's sft"))
    if pref:
        draft.set("preference", pref)


def _loss_mask(draft: Draft, config: dict[str, Any], stage: str) -> None:
    """TRL's SFT trains on every token of conversational rows unless assistant_only_loss, and
    on the completion only of prompt-completion rows unless completion_only_loss is false."""
    if stage != "sft":
        return
    assistant = value_of(config, "assistant_only_loss", False, flag)
    completion = value_of(config, "completion_only_loss", None, flag)
    if assistant:
        draft.set("training.trainOnPrompt", False)
        draft.map("assistant_only_loss", "spec.training.trainOnPrompt false")
    elif completion is False:
        draft.set("training.trainOnPrompt", True)
        draft.map("completion_only_loss", "spec.training.trainOnPrompt true")
    else:
        draft.default("training.trainOnPrompt", True, "TRL's sft trains on every token of "
                      "conversational rows (assistant_only_loss false); for prompt-completion "
                      "rows it trains on the completion only: set false for those")
        if "assistant_only_loss" in config:
            draft.same.append(("assistant_only_loss", "false"))
    if completion is not None and "completion_only_loss" not in [k for k, _ in draft.mapped]:
        draft.same.append(("completion_only_loss", f"{completion}: with the above"))
