"""spec.serve: after a successful run, an OpenAI-compatible server on what it produced, and a
post-training check of a few prompts against it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from kubetune import urls
from kubetune.api.v1alpha1._base import (
    NO_CONTROL,
    QUANTITY,
    TEXT,
    Rule,
    _enforce,
    _rules,
    _Spec,
    _str,
    image_rule,
)
from kubetune.api.v1alpha1.trainer import SecurityContext


class ServeCheck(_Spec):
    """One prompt and what its answer must contain (the seeds' "who are you?", generalised)."""

    prompt: Annotated[str, Field(min_length=1, max_length=4096, pattern=TEXT,
                                 description="What to ask the served model (one user turn).")]
    expect: Annotated[list[Annotated[str, _str(TEXT, 1024, min_length=1)]], Field(
        min_length=1, max_length=16, description="Substrings the answer must all contain "
        "(case-insensitive).")]


_SERVE_RULES = (
    image_rule("image", "serve.image", "the operator's service account"),
    Rule(
        cel=f"!has(self.args) || self.args.all(a, !{urls.credential_value_cel('a')})",
        message="serve.args: an argument that looks like a credential (--api-key=…, "
        "--…token, a long random token, a URL with a user name, query or fragment) would be "
        "stored and printed in the clear; serve.args takes no credentials",
        check=lambda s: not any(urls.credential_value(a) for a in s.args or []),
        field_path=".args",
    ),
)


class ServeSpec(_Spec):
    """Serve the trained model once the run succeeds: a Deployment and a Service (or a KServe
    InferenceService) running an OpenAI-compatible server (vLLM by default). Removed with the
    job, or when unset."""

    model_config = ConfigDict(json_schema_extra=_rules(*_SERVE_RULES))

    kind: Annotated[Literal["deployment", "kserve"], Field(
        description="deployment: a Deployment and a Service; kserve: a KServe "
        "InferenceService (serving.kserve.io/v1beta1, whose CRD must be installed) with the "
        "same server as its predictor, its URL and Ready condition in status.serving.")
    ] = "deployment"
    weights: Annotated[Literal["model", "adapter"], Field(
        description="model: the whole trained model (output.merge for lora; full and "
        "freeze save one); adapter: the base model with the LoRA adapter on top (vLLM "
        "serves LoRA adapters natively).")] = "model"
    model_name: Annotated[str | None, _str(NO_CONTROL, 253, description=(
        "The model name clients ask for; default: the job's name."))] = None
    image: Annotated[str | None, _str(NO_CONTROL, 512, description=(
        "The server's image; default: the operator's (vLLM's OpenAI-compatible server)."))
    ] = None
    args: Annotated[list[Annotated[str, _str(TEXT, 1024)]] | None, Field(
        max_length=64, description="Extra server arguments, e.g. --max-model-len 4096.")] = None
    security_context: Annotated[SecurityContext | None, Field(
        description="The uid/gid the server runs as (an image with another user), and "
        "whether its root filesystem is writable; runAsNonRoot, seccomp RuntimeDefault and "
        "no privilege escalation or capabilities always hold.")] = None
    gpus: Annotated[int, Field(ge=0, le=64, description="GPUs the server requests.")] = 1
    memory: Annotated[str | None, Field(pattern=QUANTITY, max_length=32, description=(
        "Memory the server requests, e.g. 32Gi."))] = None
    checks: Annotated[list[ServeCheck] | None, Field(
        min_length=1, max_length=16, description="Prompts asked once the server is ready; "
        "the result is the Checked condition.")] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _SERVE_RULES)


SERVE_SPEC_RULE = Rule(
    cel="!has(self.serve) || (has(self.serve.weights) && self.serve.weights == 'adapter' ? "
        "(!has(self.method) || !has(self.method.type) || self.method.type == 'lora') : "
        "((has(self.method) && has(self.method.type) && self.method.type in "
        "['full', 'freeze']) || (has(self.output.merge) && self.output.merge)))",
    message="serve.weights: model needs a whole model (output.merge for lora; full and "
    "freeze save one); adapter needs method.type lora",
    check=lambda s: s.serve is None or (
        s.method.type == "lora" if s.serve.weights == "adapter"
        else s.method.type in ("full", "freeze") or s.output.merge),
)
