"""spec.output: where the run writes its results."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, model_validator

from kubetune.api.v1alpha1._base import (
    OUTPUT_PATTERN,
    Rule,
    _enforce,
    _rules,
    _Spec,
    hf_rule,
    immutable,
    url_rule,
)
from kubetune.api.v1alpha1.sources import SecretKeyRef

SHARD_SIZE = "^[1-9][0-9]{0,5}(KB|MB|GB|KiB|MiB|GiB)$"

_OUTPUT_RULES = (
    Rule(
        cel="!has(self.secretRef) || self.uri.startsWith('s3://') || "
        "self.uri.startsWith('gs://') || self.uri.startsWith('hf://')",
        message="output.secretRef is for s3://, gs:// and hf:// outputs (a local or pvc:// "
        "output needs no credentials)",
        check=lambda o: o.secret_ref is None or o.uri.startswith(("s3://", "gs://", "hf://")),
        field_path=".secretRef",
    ),
    url_rule("uri", "spec.output.uri", "spec.output.secretRef"),
    hf_rule("uri", "spec.output.uri"),
)


class OutputSpec(_Spec):
    """Where the run writes checkpoints, progress, the adapter and the model."""

    model_config = ConfigDict(json_schema_extra=_rules(*_OUTPUT_RULES))

    uri: Annotated[
        str,
        Field(
            min_length=1,
            max_length=2048,
            pattern=OUTPUT_PATTERN,
            json_schema_extra=immutable("spec.output.uri"),
            description="Where checkpoints, adapter, merged model, result.json and the loss "
            "plot go: a local path, pvc://CLAIM/path, s3://BUCKET/path or gs://BUCKET/path "
            "(staged on the pod's disk, uploaded as each is complete; a restarted run resumes "
            "from the newest complete checkpoint in the store), or hf://ORG/NAME (the final "
            "adapter or model is pushed to that Hub repository with a model card).",
        ),
    ]
    secret_ref: Annotated[
        SecretKeyRef | None,
        Field(description="Credentials for an s3://, gs:// or hf:// output. s3://: the "
              "Secret's keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally "
              "AWS_ENDPOINT_URL, AWS_REGION, AWS_SESSION_TOKEN); key is not used. gs://: key "
              "holds a service-account JSON key. hf://: key holds a Hub token with write "
              "access."),
    ] = None
    merge: Annotated[
        bool, Field(description="Also save base + adapter merged into one model (LoRA).")
    ] = False
    max_shard_size: Annotated[
        str,
        Field(pattern=SHARD_SIZE, max_length=12,
              description="Merged and whole models are saved as safetensors shards of at "
              "most this size, e.g. 5GB or 500MB."),
    ] = "5GB"
    private: Annotated[
        bool, Field(description="hf:// outputs: create the Hub repository private.")
    ] = True

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _OUTPUT_RULES)
