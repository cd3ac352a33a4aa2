"""spec.model and spec.datasets: where the weights and the data come from."""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from kubetune.api.v1alpha1._base import (
    _ENUM,
    DNS_SUBDOMAIN,
    NO_CONTROL,
    SOURCE_HELP,
    SOURCE_PATTERN,
    Rule,
    StrMap,
    _enforce,
    _rules,
    _Spec,
    _str,
    hf_rule,
    immutable,
    url_rule,
)

# --------------------------------------------------------------------------- model & data


class SecretKeyRef(_Spec):
    """A key of a Secret in the job's namespace. Only the reference is ever stored."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                               description="Secret name (a DNS-1123 subdomain).")]
    key: Annotated[str, Field(min_length=1, max_length=253, pattern="^[-._a-zA-Z0-9]+$",
                              description="Key inside the Secret.")] = "token"


SECRET_REF_HELP = (
    "Credentials, by Secret reference. hf:// and https://: key holds a bearer token. s3://: "
    "the Secret's keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (optionally "
    "AWS_ENDPOINT_URL, AWS_REGION, AWS_SESSION_TOKEN); key is not used. gs://: key holds a "
    "service-account JSON key.")

Source = Annotated[
    str,
    Field(
        min_length=1,
        max_length=2048,
        pattern=SOURCE_PATTERN,
        description=f"Where it comes from: {SOURCE_HELP}. Credentials go in secretRef, never "
        "in the URL.",
    ),
]


_MODEL_RULES = (
    url_rule("source", "spec.model.source", "spec.model.secretRef"),
    hf_rule("source", "spec.model.source"),
    Rule(
        cel="has(self.source) != has(self.fromJob)",
        message="model needs exactly one of source (where the model is) and fromJob (the "
        "FineTuneJob whose result to start from)",
        check=lambda m: (m.source is None) != (m.from_job is None),
    ),
)


class ModelSpec(_Spec):
    """The model to start from."""

    model_config = ConfigDict(json_schema_extra=_rules(*_MODEL_RULES))

    source: Annotated[Source | None, Field(json_schema_extra=immutable("spec.model.source"))
                      ] = None
    from_job: Annotated[
        str | None,
        Field(max_length=50, pattern="^[a-z]([-a-z0-9]*[a-z0-9])?$",
              json_schema_extra=immutable("spec.model.fromJob"),
              description="Start from another FineTuneJob's result in this namespace (its "
              "merged model, or its whole model): the operator waits while that job runs "
              "(Reconciling, WaitingForJob) and stalls if it failed; `kubetune run` reads it "
              "from the job file of that name beside this one. Instead of source."),
    ] = None
    revision: Annotated[
        str | None, _str(description="Branch, tag or commit for hf:// sources.")
    ] = None
    secret_ref: Annotated[
        SecretKeyRef | None,
        Field(description=SECRET_REF_HELP),
    ] = None
    trust_remote_code: Annotated[
        bool, Field(description="Allow the model repository's own Python code to run.")
    ] = False

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _MODEL_RULES)


class DatasetFormat(enum.StrEnum):
    alpaca = "alpaca"  # instruction/input/output(/system/history)
    sharegpt = "sharegpt"  # conversations: [{from, value}] (+ tools), LLaMA-Factory tags
    messages = "messages"  # OpenAI chat: messages: [{role, content}]
    prompt_completion = "promptCompletion"  # prompt / completion strings
    text = "text"  # plain text (pre-training)
    preference = "preference"  # TRL: prompt / chosen / rejected (prompt implicit or explicit)
    openai_preference = "openaiPreference"  # input.messages / preferred_output / non_preferred…


_DATASET_RULES = (
    Rule(
        cel="!has(self.entries) || (!has(self.format) && !has(self.columns) && !has(self.tags))",
        message="entries picks data sets from a dataset_info.json registry, which already says "
        "their format, columns and tags: drop format, columns and tags, or drop entries",
        # has() on the API server: an empty map is set.
        check=lambda d: d.entries is None or (
            d.format is None and d.columns is None and d.tags is None),
    ),
    url_rule("source", "datasets[].source", "datasets[].secretRef"),
    hf_rule("source", "datasets[].source"),
)


class DatasetSpec(_Spec):
    """One data set: a file, a directory of files, or entries of a LLaMA-Factory
    dataset_info.json."""

    model_config = ConfigDict(json_schema_extra=_rules(*_DATASET_RULES))

    source: Source
    format: Annotated[
        DatasetFormat | None,
        Field(description="Row format; detected from the first row's keys when omitted.",
              **_ENUM),
    ] = None
    entries: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=256, pattern=NO_CONTROL)]] | None,
        Field(
            min_length=1,
            max_length=64,
            description="Names to load from a LLaMA-Factory dataset_info.json (the source).",
        ),
    ] = None
    columns: Annotated[
        StrMap | None,
        Field(description="Column names, as in LLaMA-Factory's dataset_info.json `columns`."),
    ] = None
    tags: Annotated[
        StrMap | None,
        Field(description="ShareGPT role/content tags, as in dataset_info.json `tags`."),
    ] = None
    ranking: Annotated[
        bool, Field(description="Rows are preference pairs (chosen/rejected columns beside an "
                    "alpaca or sharegpt prompt), for rm, dpo, kto, orpo and cpo. Detected when "
                    "the first row has both columns.")
    ] = False
    max_samples: Annotated[
        int | None, Field(ge=1, le=10**12,
                          description="Use at most this many rows from this source.")
    ] = None
    placeholders: Annotated[
        StrMap | None,
        Field(description="Replace {{key}} with the value in every text, e.g. name, author."),
    ] = None
    revision: Annotated[str | None, _str(description="Revision for hf:// data sets.")] = None
    secret_ref: Annotated[SecretKeyRef | None, Field(description=SECRET_REF_HELP)] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _DATASET_RULES)
