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
    "spec.training": api.TrainingSpec,
    "spec.preference": api.PreferenceSpec,
    "spec.rewards[]": api.RewardSpec,
    "spec.resources": api.ResourcesSpec,
    "spec.output": api.OutputSpec,
}
SPEC_BASE = {"model": {"source": "m"}, "datasets": [{"source": "d.json"}]}
CASES = {
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
        {**SPEC_BASE, "output": {"uri": "o", "merge": True}, "method": {"type": "qlora"}},
        {**SPEC_BASE, "output": {"uri": "o"}, "stage": "ppo"},
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
        {"type": "qlora", "lora": {}},
    ],
    "spec.training": [
        {}, {"evalSteps": 5}, {"evalSteps": 5, "evalSplit": 0.1},
        {"evalSteps": 5, "evalSplit": 0.0}, {"evalSplit": 0.1},
        {"packing": True, "cutoffLen": 131072}, {"packing": True, "cutoffLen": 131073},
        {"packing": False, "cutoffLen": 131073}, {"packing": True},
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


def test_transition_rules_refuse_changes_and_allow_the_same_value():
    rule = "self == oldSelf"
    assert cel.evaluate(rule, {"self": "hf://a/b", "oldSelf": "hf://a/b"}) is True
    assert cel.evaluate(rule, {"self": "hf://a/c", "oldSelf": "hf://a/b"}) is False
    assert cel.evaluate(rule, {"self": 2, "oldSelf": 1}) is False
