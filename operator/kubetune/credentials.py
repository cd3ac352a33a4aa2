"""Which Secret keys reach the trainer, under which variable names (pure; no I/O but
``lookup``).

Every ``secretRef`` of the job (model, each data set, the output, the trackers) becomes
environment variables of the trainer: in a cluster as ``secretKeyRef`` env (``k8s_env``), and
locally (``kubetune run``) read by ``lookup`` from the environment or from a directory laid out
as Kubernetes mounts a Secret: ``$KUBETUNE_SECRETS_DIR/<secret name>/<key>`` (default
``~/.config/kubetune/secrets``). Two sources with different Secrets get different variables
(``KUBETUNE_DATASET_<i>_…``), so each download uses its own credential.

By scheme: hf:// and https:// read a bearer token from the reference's ``key``; s3:// reads the
Secret's keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (optionally AWS_ENDPOINT_URL,
AWS_REGION, AWS_SESSION_TOKEN); gs:// reads a service-account JSON key from ``key``; the
trackers read WANDB_API_KEY and MLFLOW_TRACKING_TOKEN/USERNAME/PASSWORD (each optional).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

S3_REQUIRED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_SESSION_TOKEN")
TRACKING_KEYS = ("WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD")
DEFAULT_SECRETS_DIR = "~/.config/kubetune/secrets"


@dataclass(frozen=True)
class SecretEnv:
    """One variable of the trainer, from one key of one Secret."""

    env: str
    secret: str
    key: str
    optional: bool
    field: str  # the secretRef it comes from, e.g. spec.datasets[1].secretRef


@dataclass(frozen=True)
class SourceSecret:
    """The credential of one source (or the output): its scheme and variables."""

    scheme: str
    field: str
    secret: str
    variables: tuple[SecretEnv, ...]

    def get(self, key: str) -> str | None:
        """The value of the Secret's ``key`` (s3://), None when it has none."""
        return next((lookup(v) for v in self.variables if v.key == key), None)

    def token(self) -> str | None:
        """The bearer token or key file (hf://, https://, gs://)."""
        return lookup(self.variables[0]) if self.scheme != "s3" else None

    def require(self, key: str | None = None) -> str:
        """Like ``get`` (``token`` when ``key`` is None), or an error naming the field."""
        var = self.variables[0] if key is None else next(v for v in self.variables
                                                         if v.key == key)
        value = lookup(var)
        if not value:
            from kubetune.errors import KubetuneError

            raise KubetuneError(f"{where(var)} is missing or empty", field=self.field)
        return value


def _scheme(uri: str | None) -> str:
    return uri.partition("://")[0] if uri and "://" in uri else ""


def source_secret(uri: str | None, ref: Any, *, prefix: str, field: str,
                  token_env: str | None = None) -> SourceSecret | None:
    """``ref`` (a SecretKeyRef) for ``uri`` as variables named ``prefix_…``."""
    if ref is None:
        return None
    scheme = _scheme(uri)
    if scheme == "s3":
        variables = tuple(SecretEnv(f"{prefix}_{k}", ref.name, k, k in S3_OPTIONAL, field)
                          for k in (*S3_REQUIRED, *S3_OPTIONAL))
    else:
        variables = (SecretEnv(token_env or f"{prefix}_TOKEN", ref.name, ref.key, False,
                               field),)
    return SourceSecret(scheme, field, ref.name, variables)


def model_secret(spec: Any) -> SourceSecret | None:
    m = spec.model
    # HF_TOKEN is what huggingface_hub reads: the model's Hub token keeps that name.
    return source_secret(m.source, m.secret_ref, prefix="KUBETUNE_MODEL",
                         field="spec.model.secretRef",
                         token_env="HF_TOKEN" if _scheme(m.source) == "hf" else None)


def dataset_env_prefix(at: str, i: int) -> str:
    """KUBETUNE_DATASET_<i> for spec.datasets[i], KUBETUNE_EVAL_DATASET_<i> for
    spec.evalDatasets[i]."""
    return f"KUBETUNE_{'EVAL_' if at.endswith('evalDatasets') else ''}DATASET_{i}"


def dataset_secret(spec: Any, i: int, at: str = "spec.datasets") -> SourceSecret | None:
    d = (spec.eval_datasets if at.endswith("evalDatasets") else spec.datasets)[i]
    return source_secret(d.source, d.secret_ref, prefix=dataset_env_prefix(at, i),
                         field=f"{at}[{i}].secretRef")


def output_secret(spec: Any) -> SourceSecret | None:
    return source_secret(spec.output.uri, spec.output.secret_ref, prefix="KUBETUNE_OUTPUT",
                         field="spec.output.secretRef")


def tracking_variables(spec: Any) -> tuple[SecretEnv, ...]:
    tracking = spec.training.tracking
    if tracking is None or tracking.secret_ref is None:
        return ()
    return tuple(SecretEnv(k, tracking.secret_ref.name, k, True,
                           "spec.training.tracking.secretRef") for k in TRACKING_KEYS)


def secret_env(spec: Any) -> list[SecretEnv]:
    """Every variable the job's Secret references set, in a stable order."""
    found = [model_secret(spec), *(dataset_secret(spec, i) for i in range(len(spec.datasets))),
             *(dataset_secret(spec, i, "spec.evalDatasets")
               for i in range(len(spec.eval_datasets or []))),
             output_secret(spec)]
    out = [v for s in found if s is not None for v in s.variables]
    return out + list(tracking_variables(spec))


def k8s_env(spec: Any) -> list[dict[str, Any]]:
    """The variables as a container's ``env`` entries (Secret references only)."""
    env = []
    for v in secret_env(spec):
        ref: dict[str, Any] = {"name": v.secret, "key": v.key}
        if v.optional:
            ref["optional"] = True
        env.append({"name": v.env, "valueFrom": {"secretKeyRef": ref}})
    return env


def secrets_dir() -> Path:
    return Path(os.environ.get("KUBETUNE_SECRETS_DIR") or DEFAULT_SECRETS_DIR).expanduser()


def lookup(var: SecretEnv) -> str | None:
    """The value: the variable (set from the Secret in a pod), else the local Secret file."""
    value = os.environ.get(var.env)
    if value:
        return value
    path = secrets_dir() / var.secret / var.key
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def where(var: SecretEnv) -> str:
    """Where a missing value was looked for (for messages; never the value)."""
    return (f"Secret {var.secret!r} key {var.key} (locally: variable {var.env} or the file "
            f"{secrets_dir() / var.secret / var.key})")
