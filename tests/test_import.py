"""`kubetune import`: LLaMA-Factory, Axolotl and TRL configs (written here, in the style of
each tool's published examples) become FineTuneJobs that the project's own parser accepts;
every input key is accounted for; what kubetune cannot train is refused with the reason."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import LF_DATA
from kubetune.cli import app
from kubetune.importing import Context, ImportProblem, convert, is_leaf, nested_keys, within
from kubetune.jobfile import load_job
from typer.testing import CliRunner

runner = CliRunner()


def _get(doc: dict[str, Any], path: str) -> Any:
    node: Any = doc
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _import(tool: str, text: str, tmp_path: Path, stage: str | None = None):
    """Import ``text`` as the tool's config from a working folder whose data/ is the
    conformance copy of LLaMA-Factory's demo data (read there, never copied), write the job
    and read it back with the project's loader."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    if not (work / "data").exists():
        (work / "data").symlink_to(LF_DATA, target_is_directory=True)
    config = work / f"{tool}.yaml"
    config.write_text(text)
    ctx = Context(config_path=config, base_dir=work, out_dir=tmp_path / "job", stage=stage)
    imported = convert(tool, yaml.safe_load(text), ctx)
    out = tmp_path / "job" / "finetune.yaml"
    out.parent.mkdir(exist_ok=True)
    out.write_text(imported.text())
    job = load_job(out)  # the project's own parser accepts it
    return imported, job, out


def _accounted(imported, text: str) -> None:
    """Every key of the config is in the report: mapped, the same, lost or left empty; a key
    inside a value (``datasets[0].type``, ``deepspeed.zero_optimization.stage``) under its
    dotted path, or below a key listed as a whole (the same, lost or left empty)."""
    report = imported.report()
    empty = next((line for line in report if line.startswith("Left empty")), "")
    listed = {e.strip() for e in empty.partition("): ")[2].split(",") if e.strip()}
    section, whole, named = "", set(listed), set(listed)
    for line in report:
        if not line.startswith("  "):
            section = line
            continue
        name = line[2:].split(" -> ")[0].split(": ")[0]
        named.add(name)
        if section.startswith(("Same", "No equivalent")):
            whole.add(name)
    config = yaml.safe_load(text)
    for key in config:
        assert key in named, (key, report)
    for path, value in nested_keys(config):
        assert path in named or not is_leaf(value) or any(
            within(path, w) for w in whole), (path, report)
    # each key has its own reason, not the catch-all for nested keys no step read
    assert not [line for line in report if "import does not use it" in line], report


# --------------------------------------------------------------------------- LLaMA-Factory

LF_SFT = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
"""


def lf(body: str, head: str = "model_name_or_path: Qwen/Qwen2.5-7B-Instruct\n") -> str:
    return head + body + "output_dir: saves/qwen2.5-7b/run\n"


LF_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "lora_sft": (LF_SFT, {
        "spec.model.source": "hf://meta-llama/Meta-Llama-3-8B-Instruct",
        "spec.datasets.0.entries": ["identity", "alpaca_en_demo"],
        "spec.datasets.0.maxSamples": 1000, "spec.method.lora.rank": 8,
        "spec.method.lora.alpha": 16, "spec.method.lora.targetModules": ["all-linear"],
        "spec.template": "llama3", "spec.training.learningRate": 1e-4,
        "spec.training.warmupRatio": 0.1, "spec.training.precision": "bf16",
        "spec.training.gradientCheckpointing": True, "spec.training.packing": False}),
    "defaults_written_out": (lf("stage: sft\ndataset: alpaca_en_demo\n"), {
        "spec.training.learningRate": 5e-5, "spec.training.lrScheduler": "linear",
        "spec.training.warmupRatio": 0.0, "spec.training.batchSizePerDevice": 8,
        "spec.training.cutoffLen": 2048, "spec.training.packing": False,
        "spec.template": "auto", "spec.training.precision": "fp32",
        "spec.method.type": "lora", "spec.method.lora.rank": 8}),
    "full_deepspeed_z3": (lf("stage: sft\nfinetuning_type: full\ndataset: alpaca_en_demo\n"
                             "template: qwen\ndeepspeed: examples/deepspeed/ds_z3_config.json\n"
                             "bf16: true\nlearning_rate: 1.0e-5\n"), {
        "spec.method.type": "full", "spec.resources.strategy": "zero3",
        "spec.template": "auto"}),
    "full_deepspeed_z3_offload": (lf("finetuning_type: full\ndataset: alpaca_en_demo\n"
                                     "deepspeed: examples/deepspeed/ds_z3_offload_config.json\n"),
                                  {"spec.resources.strategy": "zero3-offload"}),
    "full_deepspeed_z2_file": (lf("finetuning_type: full\ndataset: alpaca_en_demo\n"
                                  "deepspeed: ds.json\n"),
                               {"spec.resources.strategy": "zero2-offload"}),
    "full_deepspeed_inline": (lf("finetuning_type: full\ndataset: alpaca_en_demo\n"
                                 "deepspeed:\n  train_batch_size: auto\n  zero_optimization:\n"
                                 "    stage: 3\n    offload_optimizer:\n      device: cpu\n"
                                 "      pin_memory: true\n"),
                              {"spec.resources.strategy": "zero3-offload"}),
    "full_fsdp": (lf("finetuning_type: full\ndataset: alpaca_en_demo\nfsdp: full_shard "
                     "auto_wrap\n"), {"spec.resources.strategy": "fsdp2"}),
    "freeze": (lf("finetuning_type: freeze\nfreeze_trainable_layers: 4\n"
                  "freeze_trainable_modules: all\nfreeze_extra_modules: embed_tokens\n"
                  "dataset: identity\n"), {
        "spec.method.type": "freeze", "spec.method.freeze.trainableLayers": 4,
        "spec.method.freeze.trainableModules": ["all"],
        "spec.method.freeze.extraModules": ["embed_tokens"]}),
    "qlora_4bit": (lf("quantization_bit: 4\nquantization_method: bnb\nfinetuning_type: lora\n"
                      "lora_rank: 16\nlora_alpha: 32\nlora_dropout: 0.05\n"
                      "lora_target: q_proj,v_proj\ndataset: alpaca_en_demo\n"), {
        "spec.method.quantization": {"bits": 4, "type": "nf4", "doubleQuant": True},
        "spec.method.lora.targetModules": ["q_proj", "v_proj"],
        "spec.method.lora.dropout": 0.05}),
    "qlora_8bit": (lf("quantization_bit: 8\ndataset: alpaca_en_demo\n"),
                   {"spec.method.quantization": {"bits": 8}}),
    "dpo": (lf("stage: dpo\ndo_train: true\nfinetuning_type: lora\npref_beta: 0.1\n"
               "pref_loss: sigmoid\ndataset: dpo_en_demo\ntemplate: llama3\nlearning_rate: "
               "5.0e-6\n"), {
        "spec.stage": "dpo", "spec.preference.beta": 0.1,
        "spec.preference.lossType": ["sigmoid"], "spec.datasets.0.entries": ["dpo_en_demo"]}),
    "dpo_with_sft_loss": (lf("stage: dpo\npref_ftx: 0.5\ndataset: dpo_en_demo\n"), {
        "spec.preference.lossType": ["sigmoid", "sft"],
        "spec.preference.lossWeights": [1.0, 0.5], "spec.training.learningRate": 5e-5}),
    "orpo": (lf("stage: dpo\npref_loss: orpo\npref_beta: 0.2\ndataset: dpo_en_demo\n"),
             {"spec.stage": "orpo", "spec.preference.beta": 0.2}),
    "simpo": (lf("stage: dpo\npref_loss: simpo\nsimpo_gamma: 0.8\ndataset: dpo_en_demo\n"), {
        "spec.stage": "cpo", "spec.preference.lossType": ["simpo"],
        "spec.preference.simpoGamma": 0.8, "spec.preference.cpoAlpha": 0.0}),
    "kto": (lf("stage: kto\npref_beta: 0.1\nkto_chosen_weight: 1.5\ndataset: kto_en_demo\n"
               "per_device_train_batch_size: 2\n"), {
        "spec.stage": "kto", "spec.preference.desirableWeight": 1.5,
        "spec.datasets.0.entries": ["kto_en_demo"]}),
    "reward_model": (lf("stage: rm\ndataset: dpo_en_demo\nlearning_rate: 1.0e-5\n"),
                     {"spec.stage": "rm"}),
    "pretrain": (lf("stage: pt\ndataset: c4_demo,wiki_demo\ncutoff_len: 1024\n"), {
        "spec.stage": "pt", "spec.training.packing": True,
        "spec.datasets.0.entries": ["c4_demo", "wiki_demo"]}),
    "galore": (lf("finetuning_type: full\nuse_galore: true\ngalore_layerwise: true\n"
                  "galore_target: mlp,self_attn\ngalore_rank: 128\ngalore_scale: 2.0\n"
                  "per_device_train_batch_size: 1\ngradient_accumulation_steps: 1\n"
                  "dataset: alpaca_en_demo\n"), {
        "spec.training.optimizer": {"name": "galore", "rank": 128, "updateInterval": 200,
                                    "scale": 2.0, "targetModules": ["mlp", "self_attn"],
                                    "layerwise": True}}),
    "apollo": (lf("finetuning_type: full\nuse_apollo: true\napollo_rank: 32\n"
                  "dataset: alpaca_en_demo\n"), {
        "spec.training.optimizer.name": "apollo", "spec.training.optimizer.scale": 32.0}),
    "badam": (lf("finetuning_type: full\nuse_badam: true\nbadam_mode: layer\n"
                 "badam_switch_mode: descending\nbadam_switch_interval: 20\n"
                 "dataset: alpaca_en_demo\n"), {
        "spec.training.optimizer": {"name": "badam", "switchMode": "descending",
                                    "switchEvery": 20}}),
    "lora_variants": (lf("use_dora: true\nlora_rank: 16\nloraplus_lr_ratio: 16.0\n"
                         "additional_target: embed_tokens,lm_head\ndataset: identity\n"
                         "neftune_noise_alpha: 5\nflash_attn: sdpa\nenable_liger_kernel: true\n"),
                      {"spec.method.lora.dora": True, "spec.method.lora.loraPlusLrRatio": 16.0,
                       "spec.method.lora.modulesToSave": ["embed_tokens", "lm_head"],
                       "spec.training.boosters": {"attention": "sdpa", "liger": True,
                                                  "neftuneAlpha": 5.0}}),
    "pissa": (lf("pissa_init: true\npissa_convert: true\ndataset: identity\n"),
              {"spec.method.lora.init": "pissa"}),
    "eval_and_predict": (lf("dataset: alpaca_en_demo\nval_size: 0.1\neval_strategy: steps\n"
                            "eval_steps: 50\nper_device_eval_batch_size: 1\n"
                            "predict_with_generate: true\nmax_new_tokens: 128\n"), {
        "spec.training.evalSplit": 0.1, "spec.training.evalSteps": 50,
        "spec.evaluation": {"predict": True, "maxNewTokens": 128}}),
    "eval_dataset": (lf("dataset: alpaca_en_demo\neval_dataset: identity\n"),
                     {"spec.evalDatasets.0.entries": ["identity"]}),
    "neat_packing_and_trackers": (lf("dataset: alpaca_en_demo\nneat_packing: true\n"
                                     "report_to: [wandb, tensorboard]\nrun_name: first\n"), {
        "spec.training.packing": True, "spec.training.cutoffLen": 2047,
        "spec.training.reportTo": ["wandb", "tensorboard"],
        "spec.training.tracking.runName": "first"}),
    "local_model": (lf("dataset: alpaca_en_demo\n", "model_name_or_path: /models/llama3-8b\n"),
                    {"spec.model.source": "/models/llama3-8b"}),
}


@pytest.mark.parametrize("case", sorted(LF_CASES))
def test_llamafactory_config_becomes_a_job_kubetune_accepts(case, tmp_path):
    text, want = LF_CASES[case]
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "ds.json").write_text(json.dumps({"zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    imported, job, out = _import("llamafactory", text, tmp_path)
    doc = yaml.safe_load(out.read_text())
    for path, value in want.items():
        assert _get(doc, path) == value, (path, imported.text())
    _accounted(imported, text)
    assert out.read_text().startswith("# Imported from llamafactory.yaml")
    assert job.spec.output.uri == "../work/saves/qwen2.5-7b/run" or case == "lora_sft"


def test_llamafactory_registry_entries_resolve_to_the_conformance_files(tmp_path):
    from kubetune_trainer.config import RunContext
    from kubetune_trainer.data.loading import plan

    _, job, out = _import("llamafactory", LF_SFT, tmp_path)
    parts = plan(job.spec.datasets, RunContext(base_dir=out.parent, pvc_root=tmp_path))
    assert [p.name for p in parts] == ["identity", "alpaca_en_demo"]
    assert [f.name for p in parts for f in p.paths] == ["identity.json", "alpaca_en_demo.json"]
    assert parts[0].paths[0].resolve() == (LF_DATA / "identity.json").resolve()


LF_REFUSED = {
    "ppo": (lf("stage: ppo\nreward_model: saves/llama3-8b/lora/reward\n"
               "dataset: identity\n"), "ppo is not available: TRL 1.16"),
    "multimodal_template": (lf("template: qwen2_vl\nimage_max_pixels: 262144\n"
                               "dataset: identity\n"), "multimodal template"),
    "multimodal_keys": (lf("template: llama3\nimage_max_pixels: 262144\n"
                           "dataset: identity\n"), "text-only"),
    "oft": (lf("finetuning_type: oft\ndataset: identity\n"), "OFT adapters are not in it"),
    "unknown_dataset": (lf("dataset: alpaca_en_dem\n"), "did you mean 'alpaca_en_demo'?"),
    "unknown_key": (lf("dataset: identity\nlearning_rat: 1.0e-4\n"),
                    "did you mean 'learning_rate'?"),
    "token_in_config": (lf("dataset: identity\nhf_hub_token: hf_xxx\n"), "spec.model.secretRef"),
    "other_schedule": (lf("dataset: identity\nlr_scheduler_type: polynomial\n"),
                       "kubetune's schedules are"),
}


@pytest.mark.parametrize("case", sorted(LF_REFUSED))
def test_llamafactory_refusals_say_why(case, tmp_path):
    text, reason = LF_REFUSED[case]
    with pytest.raises(ImportProblem, match=None) as err:
        _import("llamafactory", text, tmp_path)
    assert reason in str(err.value), str(err.value)


def test_llamafactory_lists_what_has_no_equivalent(tmp_path):
    text = lf("dataset: identity\nuse_unsloth: true\npacking: true\nwarmup_steps: 20\n"
              "ddp_timeout: 9000\nswanlab_project: x\n")
    imported, _, out = _import("llamafactory", text, tmp_path)
    lost = dict(imported.draft.lost)
    assert "Unsloth" in lost["use_unsloth"]
    assert "attention cross samples" in lost["packing"]
    assert "20 / your total steps" in lost["warmup_steps"]
    assert "SwanLab" in lost["swanlab_project"]
    head = out.read_text().split("apiVersion")[0]
    assert "# No equivalent in kubetune" in head and "#   use_unsloth: " in head
    assert "spec.output.uri" in head and "pvc://CLAIM" in head


# --------------------------------------------------------------------------- Axolotl


def ax(body: str, head: str = "base_model: NousResearch/Meta-Llama-3.1-8B\n") -> str:
    return head + body + "learning_rate: 0.0002\noutput_dir: ./outputs/out\n"


AX_ALPACA = "datasets:\n  - path: tatsu-lab/alpaca\n    type: alpaca\n"
AX_CHAT = ("datasets:\n  - path: fozziethebeat/alpaca_messages_2k_test\n"
           "    type: chat_template\n    field_messages: messages\n"
           "    message_property_mappings:\n      role: role\n      content: content\n"
           "chat_template: llama3\n")
AX_DPO = ("datasets:\n  - path: Intel/orca_dpo_pairs\n    split: train\n"
          "    type: chatml.intel\n")
AX_LORA = """\
base_model: NousResearch/Meta-Llama-3.1-8B
load_in_8bit: true
load_in_4bit: false
datasets:
  - path: mlabonne/FineTome-100k
    type: chat_template
    split: train
    field_messages: conversations
    message_property_mappings:
      role: from
      content: value
chat_template: llama3
dataset_prepared_path: last_run_prepared
val_set_size: 0.05
output_dir: ./outputs/lora-out
sequence_len: 4096
sample_packing: true
eval_sample_packing: false
pad_to_sequence_len: true
adapter: lora
lora_model_dir:
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
wandb_project: llama-3.1-lora
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 4
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
bf16: auto
tf32: false
gradient_checkpointing: true
resume_from_checkpoint:
logging_steps: 1
flash_attention: true
warmup_ratio: 0.1
evals_per_epoch: 4
saves_per_epoch: 1
weight_decay: 0.0
special_tokens:
  pad_token: <|end_of_text|>
"""

AX_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "lora_chat": (AX_LORA, {
        "spec.method.quantization": {"bits": 8}, "spec.method.lora.rank": 32,
        "spec.method.lora.targetModules": ["all-linear"], "spec.datasets.0.format": "sharegpt",
        "spec.datasets.0.columns": {"messages": "conversations"},
        "spec.datasets.0.tags.role_tag": "from", "spec.template": "llama3",
        "spec.training.optimizer.name": "adamw_8bit", "spec.training.reportTo": ["wandb"],
        "spec.training.tracking.project": "llama-3.1-lora", "spec.training.cutoffLen": 4096,
        "spec.training.evalSplit": 0.05, "spec.training.precision": "auto"}),
    "defaults_written_out": (ax(AX_ALPACA), {
        "spec.training.epochs": 1.0, "spec.training.batchSizePerDevice": 1,
        "spec.training.cutoffLen": 512, "spec.training.warmupRatio": 0.03,
        "spec.training.lrScheduler": "cosine", "spec.method.type": "full",
        "spec.datasets.0.format": "alpaca"}),
    "qlora": (ax(AX_ALPACA + "adapter: qlora\nload_in_4bit: true\nlora_r: 16\n"
                 "lora_alpha: 32\nlora_target_modules:\n  - q_proj\n  - k_proj\n"), {
        "spec.method.quantization": {"bits": 4, "type": "nf4", "doubleQuant": True},
        "spec.method.lora.targetModules": ["q_proj", "k_proj"]}),
    "lora_default_targets": (ax(AX_ALPACA + "adapter: lora\n"), {
        "spec.method.lora": {"rank": 8, "alpha": 8, "targetModules": ["q_proj", "v_proj"]}}),
    "full_deepspeed_zero3": (ax(AX_ALPACA + "deepspeed: deepspeed_configs/zero3_bf16.json\n"
                                "bf16: true\n"),
                             {"spec.resources.strategy": "zero3",
                              "spec.training.precision": "bf16"}),
    "full_deepspeed_offload": (ax(AX_ALPACA + "deepspeed: deepspeed_configs/"
                                  "zero3_bf16_cpuoffload_all.json\n"),
                               {"spec.resources.strategy": "zero3-offload"}),
    "full_deepspeed_zero2_inline": (ax(AX_ALPACA + "deepspeed:\n  zero_optimization:\n"
                                       "    stage: 2\n"), {"spec.resources.strategy": "zero2"}),
    "fsdp2": (ax(AX_ALPACA + "fsdp_version: 2\nfsdp_config:\n  offload_params: false\n"
                 "  auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"),
              {"spec.resources.strategy": "fsdp2"}),
    "spectrum_freeze": (ax(AX_CHAT + "plugins:\n  - axolotl.integrations.spectrum."
                           "SpectrumPlugin\nspectrum_top_fraction: 0.5\n"
                           "spectrum_model_name: meta-llama/Meta-Llama-3.1-8B\n"), {
        "spec.method.type": "freeze", "spec.method.spectrum.topFraction": 0.5,
        "spec.datasets.0.format": "messages"}),
    "dpo": (ax(AX_DPO + "rl: dpo\nrl_beta: 0.1\nadapter: lora\nlora_target_linear: true\n"), {
        "spec.stage": "dpo", "spec.preference": {"beta": 0.1, "lossType": ["sigmoid"]},
        "spec.datasets.0.format": "preference",
        "spec.datasets.0.columns": {"prompt": "question", "system": "system"},
        "spec.template": "chatml"}),
    "ipo": (ax(AX_DPO + "rl: ipo\n"), {"spec.preference.lossType": ["ipo"]}),
    "orpo": (ax("rl: orpo\norpo_alpha: 0.1\nchat_template: chatml\ndatasets:\n"
                "  - path: argilla/ultrafeedback-binarized-preferences-cleaned\n"
                "    type: chat_template.argilla\n"), {
        "spec.stage": "orpo", "spec.preference.beta": 0.1,
        "spec.datasets.0.columns": {"prompt": "instruction", "chosen": "chosen_response",
                                    "rejected": "rejected_response"}}),
    "simpo": (ax(AX_DPO + "rl: simpo\nrl_beta: 2.0\nsimpo_gamma: 0.5\ncpo_alpha: 0.0\n"), {
        "spec.stage": "cpo", "spec.preference": {"beta": 2.0, "lossType": ["simpo"],
                                                "simpoGamma": 0.5, "cpoAlpha": 0.0}}),
    "kto": (ax("rl: kto\nrl_beta: 0.1\nkto_desirable_weight: 1.33\nmicro_batch_size: 2\n"
               "datasets:\n  - path: argilla/kto-mix-15k\n    type: chatml.argilla\n"), {
        "spec.stage": "kto", "spec.preference.desirableWeight": 1.33,
        "spec.datasets.0.format": "promptCompletion",
        "spec.datasets.0.columns": {"prompt": "instruction", "completion": "completion",
                                    "kto_tag": "label"}}),
    "reward_model": (ax("reward_model: true\nchat_template: llama3\ndatasets:\n"
                        "  - path: argilla/distilabel-intel-orca-dpo-pairs\n"
                        "    type: bradley_terry.chat_template\n"), {
        "spec.stage": "rm", "spec.datasets.0.format": "preference"}),
    "pretrain": (ax("pretraining_dataset:\n  - path: allenai/c4\n    name: en\n"
                    "    type: pretrain\nmax_steps: 1000\nwarmup_steps: 100\n"), {
        "spec.stage": "pt", "spec.datasets.0.format": "text",
        "spec.training.warmupRatio": 0.1, "spec.training.maxSteps": 1000}),
    "galore": (ax(AX_ALPACA + "optimizer: galore_adamw_layerwise\noptim_target_modules:\n"
                  "  - mlp\n  - self_attn\noptim_args: rank=128, update_proj_gap=200, "
                  "scale=0.25\ngradient_accumulation_steps: 1\n"), {
        "spec.training.optimizer": {"name": "galore", "layerwise": True,
                                    "targetModules": ["mlp", "self_attn"], "rank": 128,
                                    "updateInterval": 200, "scale": 0.25}}),
    "galore_args_mapping": (ax(AX_ALPACA + "optimizer: galore_adamw\noptim_args:\n"
                               "  rank: 64\n  scale: 0.5\n  proj_type: std\n"), {
        "spec.training.optimizer": {"name": "galore", "rank": 64, "scale": 0.5}}),
    "boosters": (ax(AX_ALPACA + "plugins:\n  - axolotl.integrations.liger.LigerPlugin\n"
                    "liger_rope: true\nliger_rms_norm: true\nliger_glu_activation: true\n"
                    "liger_fused_linear_cross_entropy: true\nneftune_noise_alpha: 5\n"
                    "torch_compile: true\nsdp_attention: true\n"), {
        "spec.training.boosters": {"attention": "sdpa", "liger": True, "neftuneAlpha": 5.0,
                                   "torchCompile": True}}),
    "local_data_and_tests": (ax("datasets:\n  - path: data/alpaca_en_demo.json\n"
                                "    ds_type: json\n    type: alpaca\n"
                                "test_datasets:\n  - path: data/identity.json\n"
                                "    ds_type: json\n    type: alpaca\n    split: train\n"
                                "eval_steps: 20\n"), {
        "spec.datasets.0.source": "../work/data/alpaca_en_demo.json",
        "spec.evalDatasets.0.source": "../work/data/identity.json",
        "spec.training.evalSteps": 20}),
    "user_defined": (ax("datasets:\n  - path: repo/data\n    type:\n"
                        "      field_instruction: question\n      field_output: answer\n"
                        "      format: '[INST] {instruction} [/INST]'\n"), {
        "spec.datasets.0.format": "alpaca",
        "spec.datasets.0.columns": {"prompt": "question", "response": "answer"}}),
    "nested_keys": (ax("datasets:\n  - path: mlabonne/FineTome-100k\n    type: chat_template\n"
                       "    split: train\n    name: default\n    shards: 4\n"
                       "    field_messages: conversations\n    drop_system_message: true\n"
                       "    roles_to_train: [assistant]\n    train_on_eos: turn\n"
                       "    field_chosen: chosen\n"
                       "    message_property_mappings:\n      role: from\n      content: value\n"
                       "      weight: w\n    roles:\n      user: [human, user]\n"
                       "      assistant: [gpt]\n      tool: [tool]\n"
                       "test_datasets:\n  - path: data/identity.json\n    ds_type: json\n"
                       "    type: alpaca\n    trust_remote_code: false\n    revision:\n"
                       "deepspeed:\n  train_micro_batch_size_per_gpu: auto\n"
                       "  zero_optimization:\n    stage: 3\n    offload_param:\n"
                       "      device: cpu\n    overlap_comm: true\n"
                       "trl:\n  beta: 0.2\n  use_vllm: false\n"), {
        "spec.datasets.0.tags": {"role_tag": "from", "content_tag": "value",
                                 "user_tag": "human", "assistant_tag": "gpt",
                                 "system_tag": "system"},
        "spec.resources.strategy": "zero3-offload"}),
    "pretrain_nested": (ax("pretraining_dataset:\n  - path: allenai/c4\n    name: en\n"
                           "    text_column: content\n    skip: 10\n    split: train\n"
                           "max_steps: 100\n"), {
        "spec.stage": "pt", "spec.datasets.0.columns": {"prompt": "content"}}),
    "dpo_user_defined": (ax("rl: dpo\ndatasets:\n  - path: repo/prefs\n    split: train\n"
                            "    type:\n      field_prompt: question\n"
                            "      field_chosen: good\n      field_rejected: bad\n"
                            "      prompt_format: '{prompt}'\n      chosen_format: '{chosen}'\n"), {
        "spec.datasets.0.format": "preference",
        "spec.datasets.0.columns": {"prompt": "question", "chosen": "good",
                                    "rejected": "bad"}}),
    "kto_user_defined": (ax("rl: kto\nmicro_batch_size: 2\n"
                            "datasets:\n  - path: repo/kto\n    type:\n"
                            "      field_prompt: q\n      field_completion: a\n"
                            "      field_label: ok\n      completion_format: '{completion}'\n"), {
        "spec.datasets.0.format": "promptCompletion",
        "spec.datasets.0.columns": {"prompt": "q", "completion": "a", "kto_tag": "ok"}}),
    "dpo_chat_template_default": (ax("rl: dpo\nchat_template: chatml\ndatasets:\n"
                                     "  - path: repo/chat-prefs\n"
                                     "    type: chat_template.default\n"
                                     "    field_messages: conversation\n"
                                     "    field_chosen: chosen\n    field_rejected: rejected\n"
                                     "    message_property_mappings:\n      role: role\n"
                                     "      content: content\n"), {
        "spec.datasets.0.format": "preference",
        "spec.datasets.0.columns": {"prompt": "conversation", "chosen": "chosen",
                                    "rejected": "rejected"}}),
    "lm_eval_and_mlflow": (ax(AX_ALPACA + "lm_eval_tasks:\n  - arc_easy\nuse_mlflow: true\n"
                              "mlflow_experiment_name: axo\n"), {
        "spec.evaluation.lmEval": {"tasks": ["arc_easy"], "batchSize": 8},
        "spec.training.reportTo": ["mlflow"], "spec.training.tracking.experiment": "axo"}),
}


@pytest.mark.parametrize("case", sorted(AX_CASES))
def test_axolotl_config_becomes_a_job_kubetune_accepts(case, tmp_path):
    text, want = AX_CASES[case]
    imported, job, out = _import("axolotl", text, tmp_path)
    doc = yaml.safe_load(out.read_text())
    for path, value in want.items():
        assert _get(doc, path) == value, (path, imported.text())
    _accounted(imported, text)
    assert job.spec.model.source.startswith("hf://")


def test_axolotl_nested_keys_have_their_own_reasons(tmp_path):
    text = AX_CASES["nested_keys"][0]
    imported, _, _ = _import("axolotl", text, tmp_path)
    report = "\n".join(imported.report())
    for line in ("  datasets[0].shards: kubetune reads every row",
                 "  datasets[0].message_property_mappings.weight: kubetune reads a message's "
                 "role and content only",
                 "  datasets[0].roles.user -> spec.datasets[0].tags.user_tag 'human' (the first "
                 "name",
                 "  datasets[0].roles.tool: kubetune's sharegpt tags",
                 "  deepspeed.zero_optimization.stage -> spec.resources.strategy zero3-offload",
                 "  deepspeed.zero_optimization.overlap_comm: kubetune writes the DeepSpeed",
                 "  trl.beta: not read by stage sft", "  trl.use_vllm: false: off",
                 "  test_datasets[0].ds_type -> spec.evalDatasets[0].source",
                 "  datasets[0].field_chosen: not read by a 'chat_template' data set"):
        assert line in report, (line, report)
    assert "test_datasets[0].revision" in next(
        line for line in imported.report() if line.startswith("Left empty"))


AX_REFUSED = {
    "ppo": (ax(AX_ALPACA + "rl: ppo\n"), "ppo is not available"),
    "grpo": (ax(AX_ALPACA + "rl: grpo\ntrl:\n  beta: 0.001\n  reward_funcs: [r.f]\n"),
             "write spec.rewards"),
    "multimodal": (ax("processor_type: AutoProcessor\nchat_template: qwen2_vl\n"
                      "datasets:\n  - path: HuggingFaceH4/llava-instruct-mix-vsft\n"
                      "    type: chat_template\n"), "multimodal"),
    "multimodal_processor": (ax(AX_CHAT + "processor_type: AutoProcessor\n"), "text-only"),
    "unfrozen_parameters": (ax(AX_ALPACA + "unfrozen_parameters:\n  - ^lm_head.weight$\n"),
                            "method.spectrum"),
    "unknown_key": (ax(AX_ALPACA + "micro_batchsize: 2\n"),
                    "did you mean 'micro_batch_size'?"),
    "unknown_dataset_key": (ax("datasets:\n  - path: x/y\n    type: alpaca\n    shard: 2\n"),
                            "datasets[0]: unknown key 'shard'; did you mean 'shards'?"),
    "unknown_test_dataset_key": (ax(AX_ALPACA + "test_datasets:\n  - path: x/z\n"
                                    "    type: alpaca\n    data_file: a.json\n"),
                                 "test_datasets[0]: unknown key 'data_file'; did you mean "
                                 "'data_files'?"),
    "unknown_user_defined_key": (ax("datasets:\n  - path: x/y\n    type:\n"
                                    "      field_instructions: q\n"),
                                 "datasets[0].type: unknown key 'field_instructions'; did you "
                                 "mean 'field_instruction'?"),
    "unknown_rl_dataset_key": (ax("rl: dpo\ndatasets:\n  - path: Intel/orca_dpo_pairs\n"
                                  "    type: chatml.intel\n    field_chose: c\n"),
                               "did you mean 'field_chosen'?"),
    "unknown_pretraining_key": (ax("pretraining_dataset:\n  - path: allenai/c4\n"
                                   "    text_colum: text\n"),
                                "pretraining_dataset[0]: unknown key 'text_colum'; did you "
                                "mean 'text_column'?"),
    "unknown_trl_key": (ax(AX_DPO + "rl: dpo\ntrl:\n  beta: 0.1\n  use_vlm: false\n"),
                        "trl: unknown key 'use_vlm'; did you mean 'use_vllm'?"),
    "unknown_fsdp_config_key": (ax(AX_ALPACA + "fsdp_version: 2\nfsdp_config:\n"
                                   "  offload_param: true\n"),
                                "did you mean 'offload_params'?"),
    "unknown_dataset_type": (ax("datasets:\n  - path: x/y\n    type: input_output\n"),
                             "no kubetune equivalent"),
    "qlora_without_4bit": (ax(AX_ALPACA + "adapter: qlora\n"), "load_in_4bit"),
}


@pytest.mark.parametrize("case", sorted(AX_REFUSED))
def test_axolotl_refusals_say_why(case, tmp_path):
    text, reason = AX_REFUSED[case]
    with pytest.raises(ImportProblem) as err:
        _import("axolotl", text, tmp_path)
    assert reason in str(err.value), str(err.value)


# --------------------------------------------------------------------------- TRL

TRL_SFT = """\
# trl sft --config sft.yaml
model_name_or_path: Qwen/Qwen2-0.5B
dataset_name: trl-lib/Capybara
learning_rate: 2.0e-4
num_train_epochs: 1
packing: true
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
gradient_checkpointing: true
eos_token: <|im_end|>
logging_steps: 25
use_peft: true
lora_r: 32
lora_alpha: 16
output_dir: Qwen2-0.5B-SFT
"""


def trl(body: str) -> str:
    return "model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct\n" + body


TRL_CASES: dict[str, tuple[str | None, str, dict[str, Any]]] = {
    "sft_lora": ("sft", TRL_SFT, {
        "spec.method.lora": {"rank": 32, "alpha": 16, "dropout": 0.05,
                             "targetModules": ["q_proj", "v_proj"]},
        "spec.training.packing": True, "spec.training.learningRate": 2e-4,
        "spec.datasets.0.source": "hf://trl-lib/Capybara"}),
    "sft_defaults_written_out": (None, trl("dataset_name: trl-lib/Capybara\n"), {
        "spec.method.type": "full", "spec.training.learningRate": 2e-5,
        "spec.training.lrScheduler": "linear", "spec.training.batchSizePerDevice": 8,
        "spec.training.cutoffLen": 1024, "spec.training.gradientCheckpointing": True,
        "spec.training.trainOnPrompt": True, "spec.training.precision": "bf16",
        "spec.output.uri": "../work/trainer_output"}),
    "sft_assistant_only": ("sft", trl("dataset_name: trl-lib/Capybara\n"
                                      "assistant_only_loss: true\nmax_length: 4096\n"), {
        "spec.training.trainOnPrompt": False, "spec.training.cutoffLen": 4096}),
    "sft_qlora": ("sft", trl("dataset_name: trl-lib/Capybara\nuse_peft: true\n"
                             "load_in_4bit: true\nbnb_4bit_quant_type: nf4\n"
                             "use_bnb_nested_quant: true\nlora_target_modules: all-linear\n"), {
        "spec.method.quantization": {"bits": 4, "type": "nf4", "doubleQuant": True},
        "spec.method.lora.targetModules": ["all-linear"]}),
    "sft_qlora_defaults": ("sft", trl("dataset_name: trl-lib/Capybara\nuse_peft: true\n"
                                      "load_in_4bit: true\n"), {
        "spec.method.quantization.doubleQuant": False}),
    "sft_full_deepspeed": ("sft", trl("dataset_name: trl-lib/Capybara\nbf16: true\n"
                                      "deepspeed: zero3.json\n"),
                           {"spec.resources.strategy": "zero3", "spec.method.type": "full"}),
    "sft_full_deepspeed_offload": ("sft", trl("dataset_name: trl-lib/Capybara\n"
                                              "deepspeed: ds_zero2_offload.json\n"),
                                   {"spec.resources.strategy": "zero2-offload"}),
    "sft_full_deepspeed_inline": ("sft", trl("dataset_name: trl-lib/Capybara\ndeepspeed:\n"
                                             "  zero_optimization:\n    stage: 2\n"
                                             "  bf16:\n    enabled: auto\n"),
                                  {"spec.resources.strategy": "zero2"}),
    "sft_fsdp": ("sft", trl("dataset_name: trl-lib/Capybara\nfsdp: full_shard auto_wrap\n"
                            "fsdp_config:\n  fsdp_version: 2\n"),
                 {"spec.resources.strategy": "fsdp2"}),
    "sft_galore": ("sft", trl("dataset_name: trl-lib/Capybara\noptim: galore_adamw\n"
                              "optim_target_modules: [attn, mlp]\n"
                              "optim_args: rank=64, update_proj_gap=100, scale=0.25\n"), {
        "spec.training.optimizer": {"name": "galore", "targetModules": ["attn", "mlp"],
                                    "rank": 64, "updateInterval": 100, "scale": 0.25}}),
    "sft_dora_boosters": ("sft", trl("dataset_name: trl-lib/Capybara\nuse_peft: true\n"
                                     "use_dora: true\nuse_liger_kernel: true\n"
                                     "attn_implementation: flash_attention_2\n"
                                     "neftune_noise_alpha: 5\n"), {
        "spec.method.lora.dora": True,
        "spec.training.boosters": {"attention": "flash_attention_2", "liger": True,
                                   "neftuneAlpha": 5.0}}),
    "sft_mixture_local": ("sft", trl("datasets:\n  - path: json\n"
                                     "    data_files: data/alpaca_en_demo.json\n"
                                     "  - path: trl-lib/tldr\n    split: train\n"
                                     "test_split_size: 0.05\neval_strategy: steps\n"
                                     "eval_steps: 100\n"), {
        "spec.datasets.0.source": "../work/data/alpaca_en_demo.json",
        "spec.datasets.1.source": "hf://trl-lib/tldr", "spec.training.evalSplit": 0.05,
        "spec.training.evalSteps": 100}),
    "dpo": ("dpo", trl("dataset_name: trl-lib/ultrafeedback_binarized\nlearning_rate: 5.0e-7\n"
                       "beta: 0.1\nloss_type: sigmoid\nmax_length: 1024\n"
                       "per_device_train_batch_size: 2\ngradient_accumulation_steps: 8\n"
                       "output_dir: Qwen2-0.5B-DPO\nremove_unused_columns: false\n"), {
        "spec.stage": "dpo", "spec.preference": {"beta": 0.1, "lossType": ["sigmoid"]},
        "spec.training.learningRate": 5e-7}),
    "dpo_defaults": ("dpo", trl("dataset_name: trl-lib/ultrafeedback_binarized\n"), {
        "spec.training.learningRate": 1e-6, "spec.preference.beta": 0.1}),
    "dpo_rpo_lora": ("dpo", trl("dataset_name: trl-lib/ultrafeedback_binarized\n"
                                "loss_type: [sigmoid, sft]\nloss_weights: [1.0, 1.0]\n"
                                "use_peft: true\nlora_r: 16\n"), {
        "spec.preference.lossType": ["sigmoid", "sft"],
        "spec.preference.lossWeights": [1.0, 1.0], "spec.method.type": "lora"}),
    "kto": ("kto", trl("dataset_name: trl-lib/kto-mix-14k\nbeta: 0.1\n"
                       "desirable_weight: 1.0\nundesirable_weight: 1.5\n"
                       "per_device_train_batch_size: 16\n"), {
        "spec.stage": "kto", "spec.preference.undesirableWeight": 1.5}),
    "reward": ("reward", trl("dataset_name: trl-lib/ultrafeedback_binarized\n"
                             "use_peft: true\nlora_task_type: SEQ_CLS\nmax_length: 2048\n"), {
        "spec.stage": "rm", "spec.training.learningRate": 1e-4}),
    "orpo": ("orpo", trl("dataset_name: trl-lib/ultrafeedback_binarized\nbeta: 0.1\n"
                         "learning_rate: 8.0e-6\n"), {"spec.stage": "orpo"}),
    "warmup_steps_with_max_steps": ("sft", trl("dataset_name: trl-lib/Capybara\n"
                                               "max_steps: 1000\nwarmup_steps: 50\n"
                                               "lr_scheduler_type: cosine\n"), {
        "spec.training.warmupRatio": 0.05, "spec.training.lrScheduler": "cosine"}),
    "trackers": ("sft", trl("dataset_name: trl-lib/Capybara\nreport_to: [wandb, trackio]\n"
                            "run_name: sft-1\n"), {
        "spec.training.reportTo": ["wandb"], "spec.training.tracking.runName": "sft-1"}),
    "local_model_fp16": ("sft", trl("dataset_name: trl-lib/Capybara\nfp16: true\n").replace(
        "Qwen/Qwen2.5-0.5B-Instruct", "./checkpoints/base"), {
        "spec.model.source": "../work/checkpoints/base", "spec.training.precision": "fp16"}),
}


@pytest.mark.parametrize("case", sorted(TRL_CASES))
def test_trl_config_becomes_a_job_kubetune_accepts(case, tmp_path):
    stage, text, want = TRL_CASES[case]
    imported, job, out = _import("trl", text, tmp_path, stage=stage)
    doc = yaml.safe_load(out.read_text())
    for path, value in want.items():
        assert _get(doc, path) == value, (path, imported.text())
    _accounted(imported, text)


TRL_REFUSED = {
    "ppo": ("ppo", trl("dataset_name: trl-lib/x\n"), "ppo is not available"),
    "grpo": ("grpo", trl("dataset_name: trl-lib/x\n"), "write spec.rewards"),
    "dpo_key_in_sft": ("sft", trl("dataset_name: trl-lib/x\nbeta: 0.1\n"),
                       "an option of trl dpo"),
    "unknown_key": ("sft", trl("dataset_name: trl-lib/x\nlearning_rte: 1.0e-5\n"),
                    "did you mean 'learning_rate'?"),
    "multimodal": ("sft", trl("dataset_name: HuggingFaceH4/llava-instruct-mix-vsft\n"
                              "image_max_pixels: 1024\n"), "text-only"),
    "stage_typo": ("sfft", trl("dataset_name: trl-lib/x\n"), "did you mean 'sft'?"),
    "quantized_full": ("sft", trl("dataset_name: trl-lib/x\nload_in_4bit: true\n"),
                       "use_peft: true"),
}


@pytest.mark.parametrize("case", sorted(TRL_REFUSED))
def test_trl_refusals_say_why(case, tmp_path):
    stage, text, reason = TRL_REFUSED[case]
    with pytest.raises(ImportProblem) as err:
        _import("trl", text, tmp_path, stage=stage)
    assert reason in str(err.value), str(err.value)


# --------------------------------------------------------------------------- the command


def test_the_command_writes_a_job_that_validate_accepts(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(LF_DATA, target_is_directory=True)
    (work / "train.yaml").write_text(LF_SFT)
    monkeypatch.chdir(work)
    res = runner.invoke(app, ["import", "llamafactory", "train.yaml", "-o", "k8s/job.yaml"])
    assert res.exit_code == 0, res.output
    assert "No equivalent in kubetune" in res.output and "ddp_timeout" in res.output
    assert "copy it to a volume claim" in res.output
    res = runner.invoke(app, ["validate", "--no-data", "k8s/job.yaml"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["import", "llamafactory", "train.yaml", "-o", "k8s/job.yaml"])
    assert res.exit_code == 2 and "already exists" in res.output


def test_the_command_prints_to_stdout_and_errors_in_one_line(tmp_path):
    config = tmp_path / "ax.yaml"
    config.write_text(ax(AX_ALPACA))
    res = runner.invoke(app, ["import", "axolotl", str(config)])
    assert res.exit_code == 0, res.output
    assert "kind: FineTuneJob" in res.output
    config.write_text(ax(AX_ALPACA + "lr_sheduler: cosine\n"))
    res = runner.invoke(app, ["import", "axolotl", str(config)])
    assert res.exit_code == 2
    assert "did you mean 'lr_scheduler'?" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["import", "axolotol", str(config)])
    assert res.exit_code == 2 and "did you mean 'axolotl'?" in res.output


def test_check_says_plainly_when_the_tool_is_not_installed(tmp_path, monkeypatch):
    import importlib.util

    for tool, module, text in (("llamafactory", "llamafactory", LF_SFT),
                               ("axolotl", "axolotl", ax(AX_ALPACA))):
        if importlib.util.find_spec(module) is not None:
            continue  # installed: --check compares (not the case on this machine)
        work = tmp_path / tool
        work.mkdir()
        (work / "data").symlink_to(LF_DATA, target_is_directory=True)
        (work / "c.yaml").write_text(text)
        monkeypatch.chdir(work)
        res = runner.invoke(app, ["import", tool, "c.yaml", "--check", "-o", "j.yaml"])
        assert res.exit_code == 0, res.output
        assert f"--check: {module} is not installed here: skipped" in res.output


@pytest.mark.slow
def test_check_compares_with_trl_s_own_loader(tmp_path, monkeypatch):
    """TRL is installed (the trainer extra): its parser resolves the same config, and every
    hyper-parameter kubetune reads agrees (defaults included)."""
    pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    for stage, text, _ in (TRL_CASES["sft_defaults_written_out"], TRL_CASES["dpo"]):
        (tmp_path / "c.yaml").write_text(text)
        res = runner.invoke(app, ["import", "trl", "c.yaml", "--check",
                                  "--stage", stage or "sft"])
        assert res.exit_code == 0, res.output
        assert "--check: trl " in res.output and "agree" in res.output, res.output
        assert "hyper-parameters agree" in res.output and " differ:" not in res.output


LF_PYTHON = os.environ.get("KUBETUNE_LLAMAFACTORY_PYTHON")


@pytest.mark.slow
@pytest.mark.skipif(not LF_PYTHON, reason="KUBETUNE_LLAMAFACTORY_PYTHON (the Python of a venv "
                    "with llamafactory) is not set: LLaMA-Factory is not a kubetune dependency")
@pytest.mark.parametrize("case", sorted(LF_CASES))
def test_check_compares_with_llamafactory_s_own_loader(case, tmp_path, monkeypatch):
    """Opt-in: every LLaMA-Factory config above, resolved by LLaMA-Factory's get_train_args
    in its own environment, agrees with the job on every compared hyper-parameter."""
    text, _ = LF_CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    (work / "data").symlink_to(LF_DATA, target_is_directory=True)
    (work / "ds.json").write_text(json.dumps({"zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    (work / "examples" / "deepspeed").mkdir(parents=True)
    for stage, offload in ((3, False), (3, True)):  # the files the configs name
        zero = {"stage": stage} | ({"offload_param": {"device": "cpu"}} if offload else {})
        (work / "examples" / "deepspeed" / f"ds_z{stage}{'_offload' if offload else ''}"
         "_config.json").write_text(json.dumps({"zero_optimization": zero}))
    (work / "c.yaml").write_text(text)
    monkeypatch.chdir(work)
    res = runner.invoke(app, ["import", "llamafactory", "c.yaml", "--check-python", LF_PYTHON])
    assert res.exit_code == 0, res.output
    if "distribution was not found" in res.output:
        pytest.skip("an optional package of LLaMA-Factory's is missing in its environment")
    if "to launch DeepSpeed training" in res.output:  # said as such by --check
        pytest.skip("LLaMA-Factory resolves a DeepSpeed config only inside a torchrun launch")
    assert "hyper-parameters agree" in res.output and " differ:" not in res.output, res.output


@pytest.mark.slow
def test_the_key_lists_match_the_installed_transformers_and_trl():
    import dataclasses

    import transformers
    import trl as trl_package
    from kubetune.importing.peer_keys import TRANSFORMERS, TRL

    assert {f.name for f in dataclasses.fields(
        transformers.Seq2SeqTrainingArguments)} == TRANSFORMERS
    for group, cls in (("sft", trl_package.SFTConfig), ("dpo", trl_package.DPOConfig),
                       ("kto", trl_package.KTOConfig), ("reward", trl_package.RewardConfig),
                       ("model", trl_package.ModelConfig),
                       ("script", trl_package.ScriptArguments)):
        own = {f.name for f in dataclasses.fields(cls)} - (
            TRANSFORMERS if group not in ("model", "script") else set())
        assert own == set(TRL[group].split()), group
