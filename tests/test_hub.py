"""hf://ORG/NAME outputs without the network: the upload plan and the model card."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard
from kubetune.api.v1alpha1 import FineTuneJobSpec
from kubetune_trainer.hub import plan
from kubetune_trainer.outputs import Layout


def _spec(**output):
    return FineTuneJobSpec.model_validate({
        "model": {"source": "hf://Qwen/Qwen2.5-0.5B"},
        "datasets": [{"source": "hf://org/identity/data.json"}, {"source": "local.json"}],
        "method": {"type": "lora", "lora": {"rank": 8, "alpha": 16}},
        "training": {"learningRate": 2e-4, "maxSteps": 10},
        "output": {"uri": "hf://my-org/my-model", **output}})


def test_plan_pushes_the_adapter_with_result_plot_and_card_private_by_default(tmp_path):
    out = Layout(tmp_path)
    (out.adapter).mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        (out.adapter / name).write_text("x")
    result = {"global_step": 10, "metrics": {"train_loss": 1.25, "eval_perplexity": 3.5}}
    out.result.write_text(json.dumps(result))
    (tmp_path / "loss.png").write_bytes(b"png")
    p = plan(_spec(), out, result, {"adapter": str(out.adapter)})
    assert p.repo_id == "my-org/my-model" and p.private is True
    assert set(p.files) == {"adapter_config.json", "adapter_model.safetensors",
                            "tokenizer.json", "result.json", "loss.png"}
    card = ModelCard(p.card)
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B"
    assert card.data.datasets == ["org/identity"] and card.data.library_name == "peft"
    assert {"kubetune", "sft", "lora"} <= set(card.data.tags)
    for text in ("| learning_rate | 0.0002 |", "| lora_rank | 8 |", "| train_loss | 1.25 |",
                 "| eval_perplexity | 3.5 |", "`local.json`"):
        assert text in card.text


def test_plan_prefers_the_merged_model_and_honours_private_false(tmp_path):
    out = Layout(tmp_path)
    for d in (out.adapter, out.merged):
        d.mkdir()
        (d / "config.json" if d == out.merged else d / "adapter_config.json").write_text("{}")
    p = plan(_spec(private=False, merge=True), out, {"metrics": {}},
             {"adapter": str(out.adapter), "merged_model": str(out.merged)})
    assert p.private is False and set(p.files) == {"config.json"}
    assert ModelCard(p.card).data.library_name == "transformers"


def test_the_status_points_at_the_repository_for_the_pushed_model():
    from kubetune_trainer.outputs import status_outputs

    written = {"adapter": "/s/adapter", "merged_model": "/s/merged"}
    assert status_outputs(_spec(merge=True), written) == {"mergedModel": "hf://my-org/my-model"}
    assert status_outputs(_spec(), {"adapter": "/s/adapter"}) == {
        "adapter": "hf://my-org/my-model"}
