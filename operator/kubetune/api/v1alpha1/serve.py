"""spec.serve: after a successful run, an OpenAI-compatible server on what it produced, a gate
on the run's final metrics it must pass first, and a post-training check of a few prompts
against it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from kubetune import urls
from kubetune.api.stages import GATE_METRIC_PATTERN
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


_GATE_RULES = (
    Rule(
        cel="has(self.below) != has(self.above)",
        message="serve.gate[].below, serve.gate[].above: give exactly one (the metric must "
        "be below that value, or above it)",
        check=lambda g: (g.below is None) != (g.above is None),
    ),
)


class GateCondition(_Spec):
    """One condition on a final metric of the run (status.outputs.metrics)."""

    model_config = ConfigDict(json_schema_extra=_rules(*_GATE_RULES))

    metric: Annotated[str, Field(pattern=GATE_METRIC_PATTERN, max_length=128, description=(
        "A name in status.outputs.metrics: train_loss, eval_loss, eval_perplexity, "
        "predict_rouge1/2/L, predict_bleu4, lmeval_TASK_METRIC, or the stage's eval metric "
        "(e.g. eval_rewards/accuracies, eval_reward)."))]
    below: Annotated[float | None, Field(description=(
        "The metric must be strictly below this (e.g. eval_loss)."))] = None
    above: Annotated[float | None, Field(description=(
        "The metric must be strictly above this (e.g. an lmeval_ score, a reward mean)."))
    ] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _GATE_RULES)


@dataclass(frozen=True)
class GateVerdict:
    """spec.serve.gate against the run's final metrics: passed, or why not (a condition's
    reason and message)."""

    passed: bool
    reason: str | None = None  # GateNotMet, GateMetricMissing
    message: str = ""


def gate_verdict(gate: list[GateCondition] | None, metrics: Mapping[str, float] | None
                 ) -> GateVerdict:
    """Every condition of ``gate`` against ``metrics`` (status.outputs.metrics): each one
    missed is said with its value and by how much; a metric the run did not report misses
    too (GateMetricMissing, when nothing was below or above its bound)."""
    if not gate:
        return GateVerdict(True)
    have = dict(metrics or {})
    missed, absent, met = [], [], []
    for c in gate:
        value = have.get(c.metric)
        if value is None or not math.isfinite(value):
            absent.append(c.metric)
            continue
        bound, ok = ((c.below, value < c.below) if c.below is not None
                     else (c.above, value > c.above))
        word = "below" if c.below is not None else "above"
        if ok:
            met.append(f"{c.metric} {value:.6g} {word} {bound:.6g}")
        else:
            by = abs(value - bound)
            missed.append(f"{c.metric} is {value:.6g}, not {word} {bound:.6g}"
                          + (f" (misses by {by:.6g})" if by else ""))
    if not missed and not absent:
        return GateVerdict(True, message="; ".join(met))
    parts = list(missed)
    if absent:
        reported = ", ".join(sorted(have)) or "none"
        parts.append(f"{', '.join(absent)} not in status.outputs.metrics (the run reported: "
                     f"{reported})")
    return GateVerdict(False, "GateNotMet" if missed else "GateMetricMissing",
                       "spec.serve.gate: " + "; ".join(parts))


_SERVE_RULES = (
    image_rule("image", "serve.image", "the operator's service account"),
    Rule(
        cel="!has(self.endpoint) || !has(self.kind) || self.kind == 'deployment'",
        message="serve.endpoint: only with serve.kind deployment (a KServe "
        "InferenceService has its own address)",
        check=lambda s: s.endpoint is None or s.kind == "deployment",
        field_path=".endpoint",
    ),
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
    endpoint: Annotated[str | None, Field(
        max_length=63, pattern="^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$", description=(
            "A Service of this name in the job's namespace, shared by the jobs that name it: "
            "it serves the newest of them (by creation time) whose gate passed, and moves "
            "to a newer one only once that one's server is ready (the old server is removed "
            "then). Its URL: http://ENDPOINT.NAMESPACE.svc:8000/v1. Default: none (the "
            "job's own NAME-serve only)."))] = None
    gate: Annotated[list[GateCondition] | None, Field(
        min_length=1, max_length=16, description="Conditions on the run's final metrics "
        "(status.outputs.metrics), all of which must hold before the model is served; a "
        "run that misses one succeeds but is not served (the Serving condition, reason "
        "GateNotMet or GateMetricMissing, says which metric missed and by how much).")
    ] = None
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
