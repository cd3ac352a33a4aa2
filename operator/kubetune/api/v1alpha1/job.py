"""FineTuneJob: the object, its metadata rules and every rule by path (ALL_RULES)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kubetune.api.v1alpha1._base import (
    _DNS_LABEL,
    LABEL_VALUE,
    QUALIFIED_NAME,
    Rule,
    _enforce,
    _Model,
)
from kubetune.api.v1alpha1.evaluation import _LM_EVAL_RULES
from kubetune.api.v1alpha1.method import _METHOD_RULES, _QUANT_RULES
from kubetune.api.v1alpha1.output import _OUTPUT_RULES
from kubetune.api.v1alpha1.preference import _PREFERENCE_RULES
from kubetune.api.v1alpha1.resources import _RESOURCE_RULES, _SCHEDULING_RULES, _TOLERATION_RULES
from kubetune.api.v1alpha1.rl import _REWARD_RULES
from kubetune.api.v1alpha1.serve import _GATE_RULES, _SERVE_RULES
from kubetune.api.v1alpha1.sources import _DATASET_RULES, _MODEL_RULES
from kubetune.api.v1alpha1.spec import _SPEC_RULES, FineTuneJobSpec
from kubetune.api.v1alpha1.status import FineTuneJobStatus
from kubetune.api.v1alpha1.tracking import _TRACKING_RULES
from kubetune.api.v1alpha1.trainer import _ENV_VAR_RULES, _TRAINER_RULES
from kubetune.api.v1alpha1.training import _OPTIMIZER_RULES, _TRAINING_RULES

NAME_PATTERN = "^[a-z]([-a-z0-9]*[a-z0-9])?$"
_NAME_RULES = (
    Rule(
        cel="!has(self.metadata.name) || (size(self.metadata.name) <= 50 && "
        f"self.metadata.name.matches('{NAME_PATTERN}'))",
        message="metadata.name must be at most 50 lower-case letters, digits and '-', "
        "starting with a letter (the PyTorchJob's pods and Services are named after it)",
        check=lambda m: len(m.name) <= 50 and re.fullmatch(NAME_PATTERN, m.name) is not None,
    ),
)


class ObjectMeta(BaseModel):
    """What kubetune reads of the metadata; the API server checks the rest itself (the same
    rules for namespace and labels are applied here so validate and render agree with it)."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: Annotated[str, Field(min_length=1)]
    namespace: Annotated[
        str | None, Field(max_length=63, pattern=f"^{_DNS_LABEL}$")] = None
    labels: dict[str, str] | None = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        for key, value in (self.labels or {}).items():
            if len(key) > 317 or not re.fullmatch(QUALIFIED_NAME, key):
                raise ValueError(f"metadata.labels: {key!r} is not a label key "
                                 "([prefix/]name, name up to 63 letters, digits, '-', '_', '.')")
            if not re.fullmatch(LABEL_VALUE, value):
                raise ValueError(f"metadata.labels.{key}: {value!r} is not a label value (up "
                                 "to 63 letters, digits, '-', '_', '.', alphanumeric at both "
                                 "ends)")
        return _enforce(self, _NAME_RULES)


class FineTuneJob(_Model):
    api_version: Literal["kubetune.io/v1alpha1"]
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


ALL_RULES = {
    "metadata": _NAME_RULES,
    "spec": _SPEC_RULES,
    "spec.model": _MODEL_RULES,
    "spec.datasets[]": _DATASET_RULES,
    "spec.scheduling": _SCHEDULING_RULES,
    "spec.scheduling.tolerations[]": _TOLERATION_RULES,
    "spec.trainer": _TRAINER_RULES,
    "spec.trainer.env[]": _ENV_VAR_RULES,
    "spec.method": _METHOD_RULES,
    "spec.method.quantization": _QUANT_RULES,
    "spec.preference": _PREFERENCE_RULES,
    "spec.rewards[]": _REWARD_RULES,
    "spec.training": _TRAINING_RULES,
    "spec.training.optimizer": _OPTIMIZER_RULES,
    "spec.resources": _RESOURCE_RULES,
    "spec.output": _OUTPUT_RULES,
    "spec.training.tracking": _TRACKING_RULES,
    "spec.evaluation.lmEval": _LM_EVAL_RULES,
    "spec.serve": _SERVE_RULES,
    "spec.serve.gate[]": _GATE_RULES,
}
