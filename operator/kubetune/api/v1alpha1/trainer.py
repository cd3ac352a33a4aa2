"""spec.trainer: the trainer container (image, env by Secret reference)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from kubetune import urls
from kubetune.api.v1alpha1._base import (
    _SPACE,
    DNS_SUBDOMAIN,
    ENV_NAME,
    INT32_MAX,
    TEXT,
    Rule,
    _cel_list,
    _enforce,
    _rules,
    _Spec,
    image_rule,
)
from kubetune.api.v1alpha1.sources import SecretKeyRef

# Variables the operator, the PyTorchJob controller or the launcher set: a job cannot
# override them (a second HF_TOKEN would replace the Secret's, KUBEFLOW_TRAINER_SERVER_URL
# would send the pod's service-account token elsewhere).
RESERVED_ENV = ("HF_HOME", "HF_TOKEN", "TOKENIZERS_PARALLELISM", "MASTER_ADDR", "MASTER_PORT",
                "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
                "PYTHONUNBUFFERED")
RESERVED_ENV_PREFIXES = ("KUBETUNE_", "KUBEFLOW_", "PET_")
# Names that hold a credential: a plain value would sit in the ConfigMap and the PyTorchJob.
# Words, in any case and between any of - . _ (or in camelCase), not only whole names. TOKEN
# ends the name or is followed by a separator, a digit or (camelCase) a capital: not TOKENIZERS.
SECRET_ENV_NAME = ("(?i)((^|[-._])(PASS|PAT|AUTH|BEARER|KEYS?|DSN)([-._]|$)|TOKEN([-._0-9]|$)|"
                   "(?-i:[Tt]oken[A-Z])|SECRET|PASSW|PWD|CREDENTIAL|APIKEY|"
                   "(API|ACCESS|PRIVATE|SIGNING|ENCRYPTION|ACCOUNT)[-._]?KEY|"
                   "CONNECTION[-._]?STRING|CONN[-._]?STR)")
NOT_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS")
_NOT_SECRET_SUFFIX = "(?i)[-._](FILE|PATH|DIR|ID)$"


def _secret_looking(name: str) -> bool:
    return (re.search(SECRET_ENV_NAME, name) is not None and name not in NOT_SECRET_ENV
            and re.search(_NOT_SECRET_SUFFIX, name) is None)


def _reserved(name: str) -> bool:
    return name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES)


_ENV_VAR_RULES = (
    Rule(
        cel="has(self.value) != has(self.valueFrom)",
        message="trainer.env[]: give each variable either value or valueFrom.secretKeyRef",
        check=lambda e: (e.value is None) != (e.value_from is None),
    ),
    Rule(
        cel=f"!has(self.value) || !{urls.credential_value_cel('self.value')}",
        message="trainer.env[].value: this value looks like a credential (a long random "
        "token, `Bearer …`, a connection string's password or key, a URL with a user name, "
        "query or fragment, --…key=/--…token=) and would be stored in the clear: put it in a "
        "Secret and use valueFrom: {secretKeyRef: {name: SECRET, key: KEY}}",
        check=lambda e: not urls.credential_value(e.value),
        field_path=".value",
    ),
)
_TRAINER_RULES = (
    image_rule("image", "trainer.image", "trainer.serviceAccountName"),
    Rule(
        cel="!has(self.env) || self.env.all(e, !(e.name in " + _cel_list(RESERVED_ENV)
        + ") && " + " && ".join(f"!e.name.startsWith('{p}')" for p in RESERVED_ENV_PREFIXES)
        + ")",
        message="trainer.env: " + ", ".join(RESERVED_ENV) + " and names starting with "
        + ", ".join(RESERVED_ENV_PREFIXES) + " are set by kubetune and cannot be overridden "
        "(a model token goes in model.secretRef, a data set's in datasets[].secretRef)",
        check=lambda t: t.env is None or not any(_reserved(e.name) for e in t.env),
        field_path=".env",
    ),
    Rule(
        cel="!has(self.env) || self.env.all(e, !has(e.value) || e.name in "
        f"{_cel_list(NOT_SECRET_ENV)} || e.name.matches('{_NOT_SECRET_SUFFIX}') || "
        f"!e.name.matches('{SECRET_ENV_NAME}'))",
        message="trainer.env: a variable named like a credential (*TOKEN*, *SECRET*, "
        "*PASSWORD*, *_KEY, ...) must come from a Secret: use valueFrom: {secretKeyRef: "
        "{name: SECRET, key: KEY}} instead of value",
        check=lambda t: t.env is None or not any(
            e.value is not None and _secret_looking(e.name) for e in t.env),
        field_path=".env",
    ),
)


class EnvVarSource(_Spec):
    secret_key_ref: Annotated[SecretKeyRef, Field(description="A key of a Secret in the "
                                                  "job's namespace.")]


class EnvVar(_Spec):
    """An environment variable of the training container: a value, or a Secret's key."""

    model_config = ConfigDict(json_schema_extra=_rules(*_ENV_VAR_RULES))

    name: Annotated[str, Field(min_length=1, max_length=256, pattern=ENV_NAME,
                               description="Letters, digits, '_', '-' and '.'; not a digit "
                               "first.")]
    value: Annotated[str | None, Field(max_length=32768, pattern=TEXT,
                                       description="A plain value (never a secret).")] = None
    value_from: Annotated[
        EnvVarSource | None,
        Field(description="For credentials: secretKeyRef {name, key}; only the reference is "
              "stored."),
    ] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _ENV_VAR_RULES)


class SecurityContext(_Spec):
    """Who a container runs as, for an image whose user is not the operator's (10001 unless
    the installation says otherwise). Pod Security "restricted" holds either way: never root,
    no privilege escalation, no capabilities, seccomp RuntimeDefault."""

    run_as_user: Annotated[int | None, Field(
        ge=1, le=INT32_MAX, description="The uid the container runs as (the image's user); "
        "not 0: root is refused (Pod Security \"restricted\"). Default: the operator's.")
    ] = None
    run_as_group: Annotated[int | None, Field(
        ge=0, le=INT32_MAX, description="Its gid, and the pod's fsGroup (volume claims are "
        "made writable for this group). Default: the operator's; runAsUser when that is set.")
    ] = None
    read_only_root_filesystem: Annotated[bool | None, Field(
        description="false: the image writes outside its volumes (/tmp, /dev/shm, caches "
        "under /tmp, the volume claims). Default: true (read-only).")] = None


class TrainerSpec(_Spec):
    """The training container: image, service account, environment."""

    model_config = ConfigDict(json_schema_extra=_rules(*_TRAINER_RULES))

    image: Annotated[
        str | None, Field(min_length=1, max_length=512, pattern=f"^[^{_SPACE}]+$",
                          description="Trainer image; default: the operator's.")
    ] = None
    service_account_name: Annotated[
        str | None, Field(max_length=253, pattern=DNS_SUBDOMAIN,
                          description="Service account of the training pods.")
    ] = None
    env: Annotated[
        list[EnvVar] | None,
        Field(max_length=128,
              description="Extra environment variables of the training container, as in a "
              "Pod: [{name, value}] or [{name, valueFrom: {secretKeyRef: {name, key}}}]; "
              "credentials only through secretKeyRef.",
              json_schema_extra={"x-kubernetes-list-type": "map",
                                 "x-kubernetes-list-map-keys": ["name"]}),
    ] = None
    security_context: Annotated[
        SecurityContext | None,
        Field(description="The uid/gid the training pods run as (an image with another user), "
              "and whether its root filesystem is writable; runAsNonRoot, seccomp "
              "RuntimeDefault and no privilege escalation or capabilities always hold."),
    ] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        if self.env is not None:
            names = [e.name for e in self.env]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"trainer.env: {', '.join(twice)} given more than once")
        return _enforce(self, _TRAINER_RULES)
