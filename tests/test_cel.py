"""The CRD's CEL rules, evaluated by a real CEL engine, agree with the Python checks.

The API server evaluates these rules on the object as sent (no defaults filled in): a rule
that touches an absent field errors there, so every case below also runs with fields absent.
"""

from __future__ import annotations

import cel  # common-expression-language: Rust CEL bindings, in the dev extra
import pytest
from kubetune.api import v1alpha1 as api
from pydantic import ValidationError

MODELS = {
    "spec": api.FineTuneJobSpec,
    "spec.model": api.ModelSpec,
    "spec.scheduling": api.SchedulingSpec,
    "spec.scheduling.tolerations[]": api.Toleration,
    "spec.trainer": api.TrainerSpec,
    "spec.trainer.env[]": api.EnvVar,
    "spec.datasets[]": api.DatasetSpec,
    "spec.method": api.MethodSpec,
    "spec.method.quantization": api.QuantizationSpec,
    "spec.training.optimizer": api.OptimizerSpec,
    "spec.training": api.TrainingSpec,
    "spec.preference": api.PreferenceSpec,
    "spec.rewards[]": api.RewardSpec,
    "spec.resources": api.ResourcesSpec,
    "spec.output": api.OutputSpec,
    "spec.serve.gate[]": api.GateCondition,
    "spec.serve": api.ServeSpec,
}
SPEC_BASE = {"model": {"source": "m"}, "datasets": [{"source": "d.json"}]}
_S = {**SPEC_BASE, "output": {"uri": "o"}}
_CPU, _TWO = {"gpusPerNode": 0}, {"gpusPerNode": 2}
METHOD_SPEC_CASES = [  # the method/optimizer/booster rules across sections, both ways
    {**_S, "method": {"lora": {"loraPlusLrRatio": 16.0}}},
    {**_S, "method": {"lora": {"loraPlusLrRatio": 16.0}},
     "training": {"optimizer": {"name": "galore"}}},
    {**_S, "method": {"type": "full"}, "training": {"optimizer": {"name": "galore"}}},
    {**_S, "method": {"type": "freeze"}, "training": {"optimizer": {"name": "apollo"}}},
    {**_S, "training": {"optimizer": {"name": "apollo"}}},
    {**_S, "method": {"type": "full"}, "training": {"optimizer": {"name": "badam"}}},
    {**_S, "method": {"type": "freeze"}, "training": {"optimizer": {"name": "badam"}}},
    {**_S, "method": {"type": "full"}, "training": {"optimizer": {"name": "badam"}},
     "resources": _TWO},
    {**_S, "method": {"type": "full"}, "training": {"optimizer": {"name": "badam"}},
     "resources": {"nodes": 2, "gpusPerNode": 1}},
    {**_S, "method": {"type": "full"}, "training": {"optimizer": {"name": "badam"}},
     "resources": {"gpusPerNode": 2, "strategy": "zero3"}},
    {**_S, "method": {"type": "full"}, "training": {"optimizer": {"name": "galore"}},
     "resources": {"gpusPerNode": 2, "strategy": "zero2"}},
    {**_S, "method": {"type": "full"}, "training": {"optimizer": {"name": "apollo"}},
     "resources": {"gpusPerNode": 2, "strategy": "ddp"}},
    {**_S, "method": {"lora": {"init": "pissa"}}, "resources": {"strategy": "zero3"}},
    {**_S, "method": {"lora": {"init": "olora"}}, "resources": {"strategy": "zero2"}},
    {**_S, "method": {"lora": {"init": "default"}}, "resources": {"strategy": "fsdp2"}},
    {**_S, "method": {"quantization": {"bits": 8}}, "resources": {"strategy": "fsdp2"}},
    {**_S, "method": {"quantization": {"bits": 4}}, "resources": {"strategy": "zero3"}},
    {**_S, "method": {"quantization": {}}, "resources": {"strategy": "zero3-offload"}},
    {**_S, "method": {"type": "full"}, "training": {"optimizer": {"name": "lomo"}},
     "resources": {"strategy": "zero2"}},
    {**_S, "method": {"type": "full"}, "training": {"optimizer": {"name": "muon"}}},
    {**_S, "method": {"type": "freeze", "spectrum": {}}, "resources": {"strategy": "zero3"}},
    {**_S, "method": {"type": "freeze", "spectrum": {}}, "resources": {"strategy": "fsdp2"}},
    {**_S, "training": {"optimizer": {"name": "muon"}}},
    {**_S, "method": {"type": "freeze"}, "training": {"optimizer": {"name": "muon"}},
     "resources": {"strategy": "fsdp2"}},
    {**_S, "method": {"type": "full"}, "training": {"optimizer": {"name": "lomo"}},
     "resources": {"strategy": "fsdp2"}},
    {**_S, "method": {"type": "full"}, "resources": _TWO,
     "training": {"optimizer": {"name": "galore", "layerwise": True}}},
    {**_S, "method": {"type": "full"}, "resources": {"gpusPerNode": 1},
     "training": {"optimizer": {"name": "galore", "layerwise": True}}},
    {**_S, "training": {"boosters": {"liger": True}}},
    {**_S, "training": {"boosters": {"liger": True}}, "resources": _CPU},
    {**_S, "training": {"boosters": {"liger": False}}, "resources": _CPU},
    {**_S, "training": {"boosters": {"attention": "flash_attention_2"}}, "resources": _CPU},
    {**_S, "training": {"boosters": {"attention": "sdpa"}}, "resources": _CPU},
    {**_S, "method": {"lora": {"init": "loftq"}}, "resources": _CPU},
    {**_S, "method": {"type": "full"}, "training": {"optimizer": {"name": "adalomo"}},
     "resources": _CPU},
    {**_S, "method": {"type": "full"}, "training": {"optimizer": {"name": "lomo"}},
     "resources": _CPU},
    {**_S, "method": {"lora": {"init": "loftq"}}},
    {**_S, "method": {"lora": {"init": "pissa"}}, "resources": _CPU},
    {**_S, "resources": _CPU, "training": {"boosters": {"activationOffload": True},
                                           "gradientCheckpointing": True}},
    {**_S, "stage": "cpo", "training": {"boosters": {"activationOffload": True},
                                        "gradientCheckpointing": True}},
    {**_S, "stage": "dpo", "training": {"boosters": {"activationOffload": True},
                                        "gradientCheckpointing": True}},
    {**_S, "training": {"boosters": {"activationOffload": True},
                        "gradientCheckpointing": True}},
]
CASES = {
    "spec.serve": [
        {"endpoint": "assistant"},
        {"endpoint": "assistant", "kind": "deployment"},
        {"endpoint": "assistant", "kind": "kserve"},
        {"kind": "kserve"},
        {"args": ["--api-key=sk-abcdefghijklmnopqrstuvwxyz0123456789"]},
        {"image": "vllm/vllm-openai:v0.11.0"},
    ],
    "spec.serve.gate[]": [
        {"metric": "eval_loss", "below": 1.2},
        {"metric": "lmeval_arc_easy_acc", "above": 0.5},
        {"metric": "eval_loss"},
        {"metric": "eval_reward", "below": 1.0, "above": 0.0},
    ],
    "spec": [
        {**SPEC_BASE, "output": {"uri": "o"}},
        {**SPEC_BASE, "output": {"uri": "o"}, "serve": {}},
        {**SPEC_BASE, "output": {"uri": "o", "merge": True}, "serve": {}},
        {**SPEC_BASE, "output": {"uri": "o"}, "serve": {"weights": "model"},
         "method": {"type": "full"}},
        {**SPEC_BASE, "output": {"uri": "o"}, "serve": {"weights": "adapter"}},
        {**SPEC_BASE, "output": {"uri": "o"}, "serve": {"weights": "adapter"},
         "method": {"type": "freeze"}},
        {**SPEC_BASE, "output": {"uri": "o"}, "serve": {"weights": "adapter"}, "method": {}},
        {**SPEC_BASE, "output": {"uri": "o", "merge": True}},
        {**SPEC_BASE, "output": {"uri": "o", "merge": True}, "method": {}},
        {**SPEC_BASE, "output": {"uri": "o", "merge": True}, "method": {"type": "full"}},
        {**SPEC_BASE, "output": {"uri": "o", "merge": False}, "method": {"type": "freeze"}},
        {**SPEC_BASE, "output": {"uri": "o", "merge": True},
         "method": {"type": "lora", "quantization": {}}},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "ppo"},
        {**SPEC_BASE, "output": {"uri": "o"}, "training": {"evalSteps": 5}},
        {**SPEC_BASE, "output": {"uri": "o"}, "training": {"evalSteps": 5, "evalSplit": 0.1}},
        {**SPEC_BASE, "output": {"uri": "o"}, "training": {"evalSteps": 5},
         "evalDatasets": [{"source": "held.json"}]},
        {**SPEC_BASE, "output": {"uri": "o"}, "training": {"evalSteps": 5, "evalSplit": 0.0},
         "evalDatasets": [{"source": "held.json"}]},
        {**SPEC_BASE, "output": {"uri": "o"}, "evaluation": {"predict": True}},
        {**SPEC_BASE, "output": {"uri": "o"}, "evaluation": {"predict": True},
         "training": {"evalSplit": 0.1}},
        {**SPEC_BASE, "output": {"uri": "o"}, "evaluation": {"predict": True},
         "training": {"evalSplit": 0.1}, "stage": "dpo"},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "grpo"},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "grpo",
         "rewards": [{"type": "regex", "pattern": "^x"}], "grpo": {"numGenerations": 4}},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "grpo",
         "rewards": [{"type": "regex", "pattern": "^x"}], "grpo": {"numGenerations": 3}},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "grpo",
         "rewards": [{"type": "regex", "pattern": "^x"}],
         "training": {"batchSizePerDevice": 2, "gradientAccumulation": 3},
         "grpo": {"numGenerations": 6}},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "sft",
         "rewards": [{"type": "regex", "pattern": "^x"}]},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "dpo", "preference": {}},
        {**SPEC_BASE, "output": {"uri": "o"}, "preference": {"beta": 0.2}},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "rm", "preference": {"beta": 0.2}},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "dpo",
         "preference": {"lossType": ["sigmoid", "sft"], "lossWeights": [1.0, 0.5],
                        "precomputeRefLogProbs": True}},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "dpo", "preference": {
            "lossType": ["simpo"]}},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "cpo", "preference": {
            "lossType": ["simpo"], "simpoGamma": 0.5, "cpoAlpha": 0.0}},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "cpo", "preference": {
            "lossType": ["simpo", "hinge"]}},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "orpo", "preference": {
            "desirableWeight": 2.0}},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "kto", "preference": {
            "desirableWeight": 2.0, "precomputeRefLogProbs": False}},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "kto",
         "training": {"batchSizePerDevice": 1}},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "sft",
         "training": {"batchSizePerDevice": 1}},
        *METHOD_SPEC_CASES,
    ],
    "spec.model": [
        {"source": "hf://a/b"}, {"source": "https://me:pw@host/m"},
        {"source": "https://host/m?sig=1"}, {"source": "https://host/m?x=1&Token=2"},
        {"source": "pvc://m/a@b"}, {"source": "https://host/m?tokens=1"},
        {"fromJob": "sft"}, {}, {"fromJob": "sft", "source": "hf://a/b"},
    ],
    "spec.scheduling": [
        {}, {"nodeSelector": {"gpu": "a"}}, {"nodeSelector": {"example.com/gpu": "a"}},
        {"nodeSelector": {"bad key": "a"}}, {"nodeSelector": {"-x": "a"}},
    ],
    "spec.scheduling.tolerations[]": [
        {"key": "k"}, {"operator": "Exists"}, {}, {"key": "", "operator": "Equal"},
        {"operator": "Exists", "value": "v"}, {"key": "k", "value": "v"},
        {"key": "k", "tolerationSeconds": 5}, {"key": "k", "effect": "NoExecute",
                                              "tolerationSeconds": 5},
    ],
    "spec.trainer": [
        {}, {"env": [{"name": "A", "value": "1"}]}, {"env": [{"name": "HF_TOKEN", "value": "1"}]},
        {"env": [{"name": "KUBETUNE_X", "value": "1"}]},
        {"env": [{"name": "MY_TOKEN", "value": "1"}]},
        {"env": [{"name": "MY_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s"}}}]},
        {"env": [{"name": "AWS_ACCESS_KEY_ID", "value": "1"}]},
        {"env": [{"name": "aws_secret_access_key", "value": "1"}]},
        {"env": [{"name": "SSL_KEY_FILE", "value": "/k"}]},
        {"env": [{"name": "MAX_TOKENS", "value": "1"}]},
        {"env": [{"name": "PRIVATE_KEY", "value": "1"}]},
    ],
    "spec.trainer.env[]": [
        {"name": "A", "value": "1"}, {"name": "A"},
        {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}},
        {"name": "A", "value": "", "valueFrom": {"secretKeyRef": {"name": "s"}}},
    ],
    "spec.rewards[]": [
        {"type": "exactMatch", "column": "answer"}, {"type": "exactMatch"},
        {"type": "regex", "pattern": "^a", "column": "answer"}, {"type": "length", "target": 9},
        {"type": "python", "function": "m:f", "path": "pvc://c/r"},
        {"type": "rewardModel"}, {"type": "json", "jsonSchema": {"type": "object"}},
        {"type": "rewardModel", "fromJob": "rm"}, {"type": "rewardModel", "source": "m"},
        {"type": "rewardModel", "fromJob": "rm", "source": "m"}, {"type": "regex",
                                                                  "pattern": "x", "fromJob": "a"},
        {"type": "numeric", "column": "a", "tolerance": 0.1, "normalize": True},
    ],
    "spec.preference": [
        {}, {"lossType": ["sigmoid"]}, {"lossWeights": [1.0]},
        {"lossType": ["sigmoid", "sft"], "lossWeights": [1.0]},
        {"lossType": ["sigmoid", "sft"], "lossWeights": [1.0, 0.2]},
        {**SPEC_BASE, "output": {"uri": "o"}, "evaluation": {"lmEval": {"tasks": ["t"]}}},
        {**SPEC_BASE, "output": {"uri": "o"}, "evaluation": {"lmEval": {"tasks": ["t"]}},
         "stage": "rm"},
        {**SPEC_BASE, "output": {"uri": "o"}, "evaluation": {}, "stage": "rm"},
        {**SPEC_BASE, "output": {"uri": "o"}, "evaluation": {"predict": True},
         "evalDatasets": [{"source": "e.json"}]},
        {**SPEC_BASE, "output": {"uri": "o"}, "evaluation": {"predict": True},
         "evalDatasets": [{"source": "e.json"}], "resources": {"strategy": "zero3"}},
        {**SPEC_BASE, "output": {"uri": "o"}, "evaluation": {"predict": True},
         "evalDatasets": [{"source": "e.json"}], "resources": {"strategy": "zero2"}},
        {**SPEC_BASE, "output": {"uri": "o"}, "evalDatasets": [{"source": "e.json"}],
         "training": {"evalSplit": 0.1}},
        {**SPEC_BASE, "output": {"uri": "o"}, "evalDatasets": [{"source": "e.json"}],
         "training": {"evalSplit": 0.0}},
    ],
    "spec.output": [
        {"uri": "o"}, {"uri": "s3://bkt/o", "secretRef": {"name": "s"}},
        {"uri": "pvc://c/o", "secretRef": {"name": "s"}},
        {"uri": "hf://org/name", "secretRef": {"name": "s", "key": "token"}},
        {"uri": "gs://bkt/o"},
    ],
    "spec.datasets[]": [
        {"source": "d.json"},
        {"source": "r/dataset_info.json", "entries": ["a"]},
        {"source": "r/dataset_info.json", "entries": ["a"], "format": "alpaca"},
        {"source": "r/dataset_info.json", "entries": ["a"], "columns": {"prompt": "q"}},
        {"source": "d.json", "format": "alpaca", "tags": {"role_tag": "role"}},
        {"source": "r/dataset_info.json", "entries": ["a"], "columns": {}},
        {"source": "https://u@host/d.json"},
    ],
    "spec.method": [
        {}, {"type": "lora"}, {"lora": {"rank": 4}}, {"type": "full", "lora": {"rank": 4}},
        {"type": "freeze", "freeze": {}}, {"freeze": {}}, {"type": "lora", "freeze": {}},
        {"type": "lora", "quantization": {"bits": 4}},
        {"type": "full", "quantization": {}}, {"quantization": {}}, {"spectrum": {}},
        {"type": "freeze", "spectrum": {"topFraction": 0.5}},
        {"type": "freeze", "spectrum": {}, "freeze": {}},
        {"quantization": {}, "lora": {"init": "pissa"}}, {"lora": {"init": "pissa"}},
        {"quantization": {}, "lora": {"init": "eva"}}, {"quantization": {}, "lora": {}},
        {"type": "lora", "quantization": {"bits": 8}, "lora": {"init": "loftq"}},
    ],
    "spec.method.quantization": [
        {}, {"bits": 8}, {"bits": 4, "type": "fp4", "doubleQuant": False},
        {"bits": 8, "type": "nf4"}, {"bits": 8, "doubleQuant": True}, {"type": "nf4"},
    ],
    "spec.training.optimizer": [
        {}, {"name": "adamw"}, {"name": "galore", "targetModules": ["attn"], "rank": 8,
                                "updateInterval": 2, "scale": 0.5, "layerwise": True},
        {"name": "apollo", "rank": 4}, {"rank": 4}, {"name": "adamw", "layerwise": False},
        {"name": "badam", "switchMode": "random", "switchEvery": 2}, {"switchEvery": 2},
        {"name": "galore", "switchMode": "fixed"}, {"name": "badam", "scale": 0.5},
    ],
    "spec.training": [
        {}, {"evalSteps": 5}, {"evalSteps": 5, "evalSplit": 0.1},
        {"evalSteps": 5, "evalSplit": 0.0}, {"evalSplit": 0.1},
        {"packing": True, "cutoffLen": 131072}, {"packing": True, "cutoffLen": 131073},
        {"packing": False, "cutoffLen": 131073}, {"packing": True},
        {"boosters": {"activationOffload": True}},
        {"boosters": {"activationOffload": True}, "gradientCheckpointing": True},
        {"boosters": {"activationOffload": False}, "gradientCheckpointing": False},
        {"optimizer": {"name": "galore", "layerwise": True}, "gradientAccumulation": 2},
        {"optimizer": {"name": "galore", "layerwise": True}, "gradientAccumulation": 1},
        {"optimizer": {"name": "galore", "layerwise": True}},
        {"optimizer": {"name": "galore", "layerwise": False}, "gradientAccumulation": 4},
        {"optimizer": {"name": "lomo"}, "gradientAccumulation": 4},
        {"optimizer": {"name": "adalomo"}, "gradientAccumulation": 1}, {"optimizer": {}},
    ],
    "spec.resources": [
        {}, {"nodes": 2}, {"nodes": 2, "gpusPerNode": 0}, {"nodes": 1, "gpusPerNode": 0},
        {"gpusPerNode": 8, "nodes": 4},
        {"gpuMemory": "80Gi"}, {"gpuMemory": "80Gi", "gpusPerNode": 0},
        {"gpuMemory": "24G", "gpusPerNode": 2, "strategy": "zero3-offload"},
        {"strategy": "fsdp2"}, {"strategy": "fsdp2", "gpusPerNode": 0},
        {"strategy": "zero3", "gpusPerNode": 0},
    ],
}


def _python_verdict(path: str, obj: dict, rule: api.Rule) -> bool:
    try:
        MODELS[path].model_validate(obj)
    except ValidationError as err:
        return rule.message not in str(err)
    return True


def _cel_value(value):
    # JSON numbers in a `type: number` field are CEL doubles on the API server.
    if isinstance(value, dict):
        return {k: _cel_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cel_value(v) for v in value]
    return value


@pytest.mark.parametrize("path", list(CASES))
def test_cel_and_python_agree(path):
    rules = api.ALL_RULES[path]
    verdicts = set()
    for obj in CASES[path]:
        for rule in rules:
            got = cel.evaluate(rule.cel, {"self": _cel_value(obj)})
            assert isinstance(got, bool), f"{rule.cel} on {obj} gave {got!r}"
            assert got == _python_verdict(path, obj, rule), f"{rule.cel} on {obj}"
            verdicts.add(got)
    assert verdicts == {True, False}, "the cases never exercise both outcomes"


NEW_RULES = [(path, rule) for path, rules in api.ALL_RULES.items() for rule in rules
             if any(w in rule.message for w in ("method.", "training.optimizer",
                                                 "training.boosters"))]


@pytest.mark.parametrize(("path", "rule"), NEW_RULES, ids=[r.message[:40] for _, r in NEW_RULES])
def test_each_method_rule_is_exercised_both_ways(path, rule):
    got = {cel.evaluate(rule.cel, {"self": _cel_value(obj)}) for obj in CASES[path]}
    assert got == {True, False}, rule.message


def test_transition_rules_refuse_changes_and_allow_the_same_value():
    rule = "self == oldSelf"
    assert cel.evaluate(rule, {"self": "hf://a/b", "oldSelf": "hf://a/b"}) is True
    assert cel.evaluate(rule, {"self": "hf://a/c", "oldSelf": "hf://a/b"}) is False
    assert cel.evaluate(rule, {"self": 2, "oldSelf": 1}) is False
