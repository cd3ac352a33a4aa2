"""Shared pieces of the API: constants and patterns, the strict base models, and ``Rule``
(one cross-field rule as CEL for the API server and a Python check, with one message)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "kubetune.io"
VERSION = "v1alpha1"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAMES = ["ftj"]
API_VERSION = f"{GROUP}/{VERSION}"

# Patterns are checked by Python's re, pydantic's Rust regex, Go's RE2 on the API server and
# the CEL engine: they use explicit character classes only (\s and \w differ between them, e.g.
# on a non-breaking space), and \xHH escapes or literal characters (Go has no \u).
_CONTROL = r"\x00-\x1f\x7f-\x9f"
_SPACE = r"\x00-\x20\x7f-\x9f" + "\u00a0\u1680\u2000-\u200b\u2028\u2029\u202f\u205f\u3000\ufeff"
NO_CONTROL = f"^[^{_CONTROL}]*$"  # names, ids: no control characters at all
TEXT = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"  # free text: tabs and line breaks allowed
_DNS_LABEL = "[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
# A DNS-1123 subdomain of at most 252 characters (Kubernetes allows 253): four labels at most.
DNS_SUBDOMAIN = f"^{_DNS_LABEL}([.][a-z0-9]([-a-z0-9]{{0,60}}[a-z0-9])?){{0,3}}$"
_CLAIM = DNS_SUBDOMAIN[1:-1]
LABEL_VALUE = "^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
QUALIFIED_NAME = (f"^({DNS_SUBDOMAIN[1:-1]}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$")
ENV_NAME = "^[-._a-zA-Z][-._a-zA-Z0-9]*$"  # what Kubernetes accepts as a variable name
# Where a model or data set comes from. A bare path is local (relative to the job file).
SOURCE_PATTERN = (f"^(pvc://{_CLAIM}(/[^{_SPACE}]*)?|(hf|s3|gs|https?|file|embedded)://"
                  f"[^{_SPACE}]+|[^:{_SPACE}]+)$")
OUTPUT_PATTERN = (f"^(pvc://{_CLAIM}(/[^{_SPACE}]*)?|file://[^{_SPACE}]+|(s3|gs)://[a-z0-9][-a-z0-9._]"
                  f"{{1,62}}(/[^{_SPACE}]*)?|hf://[A-Za-z0-9][-A-Za-z0-9_.]{{0,95}}/"
                  f"[A-Za-z0-9][-A-Za-z0-9_.]{{0,95}}|[^:{_SPACE}]+)$")
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$"
# Templates the trainer ships (kubetune_trainer/data/templates.py NAMED_TEMPLATES), and auto.
TEMPLATES = ("auto", "chatml", "llama3", "alpaca")
INT32_MAX = 2**31 - 1
SOURCE_HELP = (
    "a local path, pvc://CLAIM/path, hf://ORG/NAME, s3://, gs://, https://, file:// or "
    "embedded://NAME"
)


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        use_enum_values=True,
        validate_default=True,
    )


def _drop_nulls(data: Any) -> Any:
    """The API server prunes an explicit null in a non-nullable field: it means "not set"."""
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if v is not None}
    return data


class _Spec(_Model):
    """A part of the spec: read as the API server reads it. Strict types ("3" is not a number,
    "yes" not a bool), finite numbers, and an explicit null is the same as leaving the field
    out. User documents are validated by camelCase name only (kubetune.jobfile.validate_job)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = {f.alias or n for n, f in cls.model_fields.items()} | set(cls.model_fields)
            return {k: v for k, v in data.items() if v is not None or k not in known}
        return data


def _str(pattern: str = NO_CONTROL, max_length: int = 256, **kw: Any) -> Any:
    return Field(pattern=pattern, max_length=max_length, **kw)


# A string-to-string map whose null values mean "not set".
StrMap = Annotated[
    Annotated[dict[str, Annotated[str, Field(pattern=TEXT, max_length=4096)]],
              Field(max_length=256)],
    BeforeValidator(_drop_nulls),
]
# An enum field: matched against its values (strict mode would want the Python enum itself).
_ENUM = {"strict": False}


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: CEL for the API server, ``check`` for everything that runs Python."""

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None


def _rules(*rules: Rule) -> dict[str, Any]:
    return {"x-kubernetes-validations": [_cel(r) for r in rules]}


def _cel(rule: Rule) -> dict[str, str]:
    out = {"rule": rule.cel, "message": rule.message}
    if rule.field_path:
        out["fieldPath"] = rule.field_path
    return out


def _cel_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{i}'" for i in items) + "]"


def url_rule(attr: str, field: str, secret: str) -> Rule:
    """The one rule for a URL-valued field (``kubetune.urls``): no user-info, no fragment, no
    query but download/dl/raw. ``attr``: the Python name; the CEL name is its camelCase."""
    from kubetune import urls

    name = to_camel(attr)
    return Rule(
        cel=f"!has(self.{name}) || !self.{name}.matches('{urls.HAS_SCHEME}') || "
        f"self.{name}.matches('{urls.CLEAN_URL}')",
        message=urls.refusal(field, secret),
        check=lambda o: urls.url_problem(getattr(o, attr)) is None,
        field_path=f".{name}",
    )


def hf_rule(attr: str, field: str) -> Rule:
    """An hf:// value names a Hub repository id the Hub client accepts (``kubetune.urls``):
    validate, render, run and the API server refuse the same values, naming the field."""
    from kubetune import urls

    name = to_camel(attr)
    value = f"self.{name}"
    return Rule(
        cel=f"!has({value}) || !{value}.startsWith('hf://') || ({value}.matches("
        f"'{urls.HF_REPO}') && {value}.matches('{urls.HF_REPO_LENGTH}') && "
        f"!{value}.matches('{urls.HF_REPO_GIT}'))",
        message=urls.hf_message(field),
        check=lambda o: not urls.hf_problem(getattr(o, attr)),
        field_path=f".{name}",
    )


def image_rule(attr: str, field: str, service_account: str) -> Rule:
    """An image reference: nothing but a digest after an ``@`` (``kubetune.urls``)."""
    from kubetune import urls

    name = to_camel(attr)
    return Rule(
        cel=f"!has(self.{name}) || self.{name}.matches('{urls.CLEAN_IMAGE}')",
        message=urls.image_message(field, service_account),
        check=lambda o: urls.image_problem(getattr(o, attr)) is None,
        field_path=f".{name}",
    )


def immutable(path: str) -> dict[str, Any]:
    """A CEL transition rule: the API server refuses to change this field after creation."""
    return {"x-kubernetes-validations": [{
        "rule": "self == oldSelf",
        "message": f"{path} cannot change after the job is created; create a new FineTuneJob",
    }]}


def _enforce(obj: Any, rules: tuple[Rule, ...]) -> Any:
    broken = [rule.message for rule in rules if not rule.check(obj)]
    if broken:
        raise ValueError("; ".join(broken))
    return obj
