"""spec.training.reportTo and spec.training.tracking: experiment trackers."""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from kubetune.api.v1alpha1._base import NO_CONTROL, _enforce, _rules, _Spec, _str, url_rule
from kubetune.api.v1alpha1.sources import SecretKeyRef


class Tracker(enum.StrEnum):
    tensorboard = "tensorboard"  # event files under the output (runs/)
    wandb = "wandb"
    mlflow = "mlflow"


_TRACKING_RULES = (url_rule("uri", "training.tracking.uri", "training.tracking.secretRef"),)


class TrackingSpec(_Spec):
    """Settings of the trackers named in training.reportTo."""

    model_config = ConfigDict(json_schema_extra=_rules(*_TRACKING_RULES))

    project: Annotated[str | None, _str(
        description="W&B project (default: the job's namespace, or kubetune).")] = None
    experiment: Annotated[str | None, _str(
        description="MLflow experiment (default: the job's namespace, or kubetune).")] = None
    uri: Annotated[str | None, _str(
        max_length=2048, pattern="^(https?|file)://[^\\x00-\\x20]+$",
        description="MLflow tracking server (http://, https:// or file://; default: "
        "MLFLOW_TRACKING_URI, else an mlruns directory under the output).")] = None
    run_name: Annotated[str | None, _str(
        pattern=NO_CONTROL, description="The run's name in the trackers (default: the job's "
        "name).")] = None
    secret_ref: Annotated[
        SecretKeyRef | None,
        Field(description="Secret with the trackers' credentials under the keys they read: "
              "WANDB_API_KEY; MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and "
              "MLFLOW_TRACKING_PASSWORD (each optional; key is not used)."),
    ] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _TRACKING_RULES)
