"""spec.training.reportTo and spec.training.tracking: experiment trackers."""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import Field

from kubetune.api.v1alpha1._base import NO_CONTROL, _Spec, _str
from kubetune.api.v1alpha1.sources import SecretKeyRef


class Tracker(enum.StrEnum):
    tensorboard = "tensorboard"  # event files under the output (runs/)
    wandb = "wandb"
    mlflow = "mlflow"


class TrackingSpec(_Spec):
    """Settings of the trackers named in training.reportTo."""

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
