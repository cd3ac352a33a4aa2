"""FineTuneJob, kubetune.io/v1alpha1: the typed API and the single source of the CRD.

Field names are snake_case here and camelCase on the wire. Cross-field rules live in
``RULES``: each is a CEL rule for the API server *and* a Python check for ``kubetune validate``
and the trainer, with one message for both.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from kubetune.api.stages import IMPLEMENTED_STAGES, STAGES

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
OUTPUT_PATTERN = f"^(pvc://{_CLAIM}(/[^{_SPACE}]*)?|file://[^{_SPACE}]+|[^:{_SPACE}]+)$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$"
# Credentials written into a URL: user-info, or a token/signature in the query.
URL_USERINFO = "^[A-Za-z0-9+.-]+://[^/?#]*@"
URL_SECRET_QUERY = ("(?i)[?&;](access_token|id_token|token|sig|signature|x-amz-signature|"
                    "x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential|"
                    "api_key|apikey|key|password|passwd|pwd|secret|client_secret|auth)=")
# Templates the trainer ships (kubetune_trainer/data/preprocess.py NAMED_TEMPLATES), and auto.
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


# --------------------------------------------------------------------------- model & data


class SecretKeyRef(_Spec):
    """A key of a Secret in the job's namespace. Only the reference is ever stored."""

    name: Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
                               description="Secret name (a DNS-1123 subdomain).")]
    key: Annotated[str, Field(min_length=1, max_length=253, pattern="^[-._a-zA-Z0-9]+$",
                              description="Key inside the Secret.")] = "token"


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


def _no_credentials_in_url(owner: str) -> tuple[Rule, ...]:
    return (
        Rule(
            cel=f"!has(self.source) || !self.source.matches('{URL_USERINFO}')",
            message=f"{owner}.source: a user name or password in the URL would be stored and "
            "printed in the clear; put the token in a Secret and name it in secretRef",
            check=lambda o: o.source is None or re.search(URL_USERINFO, o.source) is None,
            field_path=".source",
        ),
        Rule(
            cel=f"!has(self.source) || !self.source.matches('{URL_SECRET_QUERY}')",
            message=f"{owner}.source: a token or signature in the URL's query would be stored "
            "and printed in the clear; put it in a Secret and name it in secretRef",
            check=lambda o: o.source is None or re.search(URL_SECRET_QUERY, o.source) is None,
            field_path=".source",
        ),
    )


_MODEL_RULES = (
    *_no_credentials_in_url("model"),
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
        Field(description="Secret holding an access token (hf://, s3://, gs://, https://)."),
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
    *_no_credentials_in_url("datasets[]"),
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
    secret_ref: Annotated[SecretKeyRef | None, Field(description="Access token Secret.")] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _DATASET_RULES)


# --------------------------------------------------------------------------- method


Stage = enum.StrEnum("Stage", {s: s for s in STAGES})

_NOT_YET = sorted(set(STAGES) - IMPLEMENTED_STAGES)
STAGE_MESSAGE = (
    f"spec.stage: {' and '.join(_NOT_YET)} is not available in this version of kubetune ("
    + "; ".join(f"{s}: {STAGES[s].summary}" for s in _NOT_YET)
    + f"); implemented: {', '.join(s for s in STAGES if s in IMPLEMENTED_STAGES)}"
)
_STAGE_RULE = Rule(
    cel="!has(self.stage) || self.stage in [" + ", ".join(
        f"'{s}'" for s in STAGES if s in IMPLEMENTED_STAGES) + "]",
    message=STAGE_MESSAGE,
    check=lambda s: s.stage in IMPLEMENTED_STAGES,
    field_path=".stage",
)


class MethodType(enum.StrEnum):
    full = "full"
    freeze = "freeze"
    lora = "lora"
    qlora = "qlora"


class LoraSpec(_Spec):
    """LoRA adapter settings (method.type lora or qlora)."""

    rank: Annotated[int, Field(ge=1, le=1024, description="LoRA rank r.")] = 16
    alpha: Annotated[int, Field(ge=1, le=65536,
                                description="LoRA alpha (scale = alpha / rank).")] = 32
    dropout: Annotated[float, Field(ge=0, lt=1, description="Dropout on the adapter's input.")
                       ] = 0.0
    target_modules: Annotated[
        list[Annotated[str, _str()]],
        Field(
            min_length=1,
            max_length=256,
            description='Module names to adapt, e.g. [q_proj, v_proj]; ["all-linear"] for all.',
        ),
    ] = ["all-linear"]


class FreezeSpec(_Spec):
    """Which layers train (method.type freeze); the rest stay frozen."""

    trainable_layers: Annotated[
        int,
        Field(ge=-4096, le=4096,
              description="Train the last N decoder layers (a negative N: the first |N|)."),
    ] = 2
    trainable_modules: Annotated[
        list[Annotated[str, _str()]],
        Field(max_length=256,
              description='Module name parts to train inside those layers, or ["all"].'),
    ] = ["all"]
    extra_modules: Annotated[
        list[Annotated[str, _str()]],
        Field(max_length=256, description="Other modules to train too, e.g. [embed_tokens].")
    ] = []


_METHOD_RULES = (
    Rule(
        cel="!has(self.type) || self.type in ['lora', 'qlora'] || !has(self.lora)",
        message="method.lora is only used when method.type is lora or qlora",
        check=lambda m: m.type in ("lora", "qlora") or m.lora is None,
    ),
    Rule(
        cel="(has(self.type) && self.type == 'freeze') || !has(self.freeze)",
        message="method.freeze is only used when method.type is freeze",
        check=lambda m: m.type == "freeze" or m.freeze is None,
    ),
)


class MethodSpec(_Spec):
    """How the weights train: all of them, some layers, or a LoRA adapter."""

    model_config = ConfigDict(json_schema_extra=_rules(*_METHOD_RULES))

    type: Annotated[
        MethodType,
        Field(description="full, freeze, lora or qlora.",
              json_schema_extra=immutable("spec.method.type"), **_ENUM),
    ] = MethodType.lora
    lora: LoraSpec | None = None
    freeze: FreezeSpec | None = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _METHOD_RULES)

    def lora_or_default(self) -> LoraSpec:
        return self.lora or LoraSpec()

    def freeze_or_default(self) -> FreezeSpec:
        return self.freeze or FreezeSpec()


# --------------------------------------------------------------------------- training


class Precision(enum.StrEnum):
    auto = "auto"  # bf16 where the GPU supports it, fp32 on CPU
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class LrScheduler(enum.StrEnum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"


PACKED_CUTOFF_MAX = 131072
_TRAINING_RULES = (
    Rule(
        cel="!has(self.evalSteps) || (has(self.evalSplit) && self.evalSplit > 0.0)",
        message="training.evalSteps needs training.evalSplit > 0 (there is nothing to evaluate)",
        check=lambda t: t.eval_steps is None or t.eval_split > 0,
    ),
    Rule(
        cel="!has(self.packing) || !self.packing || !has(self.cutoffLen) "
        f"|| self.cutoffLen <= {PACKED_CUTOFF_MAX}",
        message=f"training.cutoffLen with packing is at most {PACKED_CUTOFF_MAX} tokens (every "
        "packed row is that long)",
        check=lambda t: not t.packing or t.cutoff_len <= PACKED_CUTOFF_MAX,
        field_path=".cutoffLen",
    ),
)


class TrainingSpec(_Spec):
    """Hyper-parameters, evaluation and checkpoints."""

    model_config = ConfigDict(json_schema_extra=_rules(*_TRAINING_RULES))

    epochs: Annotated[float, Field(gt=0, le=1000, description="Passes over the data.")] = 3.0
    max_steps: Annotated[
        int | None, Field(ge=1, le=10**9, description="Stop after this many optimizer steps.")
    ] = None
    learning_rate: Annotated[
        float | None,
        Field(gt=0, lt=1, description="Peak learning rate. Default by stage: 1e-4 for pt and "
              "sft, 1e-5 for rm, 5e-6 for dpo, kto, orpo and cpo."),
    ] = None
    lr_scheduler: Annotated[LrScheduler, Field(
        description="Learning-rate schedule after warm-up: cosine, linear, constant or "
        "constant_with_warmup.", **_ENUM)] = LrScheduler.cosine
    warmup_ratio: Annotated[float, Field(ge=0, lt=1, description="Fraction of the steps spent "
                                         "raising the learning rate from 0.")] = 0.0
    weight_decay: Annotated[float, Field(ge=0, le=10, description="AdamW weight decay.")] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0, le=10000, description="Gradients are clipped "
                                          "to this norm.")] = 1.0
    batch_size_per_device: Annotated[int, Field(ge=1, le=4096, description="Rows per GPU (or "
                                                "CPU process) per forward pass.")] = 4
    gradient_accumulation: Annotated[int, Field(ge=1, le=4096, description="Forward passes per "
                                                "optimizer step; the global batch is "
                                                "batchSizePerDevice × this × GPUs.")] = 1
    cutoff_len: Annotated[
        int, Field(ge=8, le=1048576,
                   description="Tokens per sample (and per packed row); longer is cut.")
    ] = 2048
    packing: Annotated[
        bool, Field(description="Pack samples into full rows; attention never crosses samples.")
    ] = False
    train_on_prompt: Annotated[
        bool, Field(description="Also compute loss on system/user/tool turns.")
    ] = False
    mask_history: Annotated[
        bool, Field(description="Compute loss on the last assistant turn only.")
    ] = False
    max_invalid_fraction: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description="Fail when more than this fraction of rows does not fit its format.",
        ),
    ] = 0.01
    eval_split: Annotated[
        float, Field(ge=0, lt=1, description="Fraction of rows held out for evaluation.")
    ] = 0.0
    eval_steps: Annotated[int | None, Field(ge=1, le=10**9, description="Evaluate every N "
                                            "steps (default: saveSteps); needs evalSplit.")] = None
    save_steps: Annotated[int, Field(ge=1, le=10**9,
                                     description="Checkpoint every N steps.")] = 100
    save_total_limit: Annotated[
        int | None, Field(ge=1, le=10**6, description="Keep at most N checkpoints.")
    ] = 3
    log_steps: Annotated[int, Field(ge=1, le=10**9, description="Report progress (loss, "
                                    "step, ETA) every N steps.")] = 10
    seed: Annotated[int, Field(ge=0, le=2**32 - 1,
                               description="Random seed, 0 to 4294967295.")] = 42
    precision: Annotated[Precision, Field(
        description="auto (bf16 on GPUs that have it, else fp32), bf16, fp16 or fp32.",
        **_ENUM)] = Precision.auto
    gradient_checkpointing: Annotated[bool, Field(
        description="Recompute activations in the backward pass: less memory, ~20 % slower."
    )] = False
    preprocessing_workers: Annotated[
        int | None, Field(ge=1, le=1024,
                          description="Processes for data preparation (default: CPUs).")
    ] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _TRAINING_RULES)


# --------------------------------------------------------------------------- preference


DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
              "sigmoid_norm")
CPO_LOSSES = ("sigmoid", "hinge", "ipo", "simpo")
_STAGES_WITH_REFERENCE = ("dpo", "kto")


def _cel_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{i}'" for i in items) + "]"


_PREFERENCE_RULES = (
    Rule(
        cel="!has(self.lossWeights) || (has(self.lossType) "
        "&& size(self.lossWeights) == size(self.lossType))",
        message="preference.lossWeights needs one weight per entry of preference.lossType",
        check=lambda p: p.loss_weights is None or (
            p.loss_type is not None and len(p.loss_weights) == len(p.loss_type)),
    ),
)


class PreferenceSpec(_Spec):
    """How a preference stage weighs chosen against rejected answers. Each field says which
    stages read it; setting one for another stage is refused."""

    model_config = ConfigDict(json_schema_extra=_rules(*_PREFERENCE_RULES))

    beta: Annotated[
        float | None,
        Field(gt=0, le=100, description="dpo, kto, cpo: strength of the pull towards the "
              "reference (lower: further from it); orpo: weight of the odds-ratio term "
              "(lambda). Default 0.1 (cpo with simpo: 2.0)."),
    ] = None
    loss_type: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=32)]] | None,
        Field(min_length=1, max_length=8,
              description="dpo: one or more of " + ", ".join(DPO_LOSSES) + " (combined with "
              "lossWeights; e.g. [sigmoid, sft] adds the SFT loss on chosen answers, as RPO "
              "does). cpo: exactly one of " + ", ".join(CPO_LOSSES) + ". Default: sigmoid."),
    ] = None
    loss_weights: Annotated[
        list[Annotated[float, Field(ge=0, le=1000)]] | None,
        Field(min_length=1, max_length=8,
              description="dpo: a weight per lossType entry (default 1 each)."),
    ] = None
    label_smoothing: Annotated[
        float | None,
        Field(ge=0, le=0.5, description="dpo (sigmoid, robust), cpo: probability that a pair "
              "is labelled the wrong way round (conservative DPO). Default 0."),
    ] = None
    precompute_ref_log_probs: Annotated[
        bool | None,
        Field(description="dpo, kto: compute the reference model's log-probabilities once "
              "before training (saves memory for full fine-tuning). Default false."),
    ] = None
    desirable_weight: Annotated[
        float | None, Field(gt=0, le=100, description="kto: weight of desirable answers "
                            "(default 1; raise it when they are rarer than undesirable ones).")
    ] = None
    undesirable_weight: Annotated[
        float | None, Field(gt=0, le=100, description="kto: weight of undesirable answers "
                            "(default 1).")
    ] = None
    simpo_gamma: Annotated[
        float | None, Field(ge=0, le=100, description="cpo with lossType simpo: target reward "
                            "margin (default 0.5).")
    ] = None
    cpo_alpha: Annotated[
        float | None, Field(ge=0, le=100, description="cpo: weight of the SFT term on chosen "
                            "answers (default 1; SimPO proper uses 0).")
    ] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _PREFERENCE_RULES)


def _only_for(field: str, stages: tuple[str, ...], attr: str) -> Rule:
    cel_field = "self.preference." + field
    return Rule(
        cel=f"!has(self.preference) || !has({cel_field}) || "
        f"(has(self.stage) && self.stage in {_cel_list(stages)})",
        message=f"preference.{field} is only read by stage {' or '.join(stages)}",
        check=lambda s: s.preference is None or getattr(s.preference, attr) is None
        or s.stage in stages,
    )


_PREFERENCE_SPEC_RULES = (
    Rule(
        cel="!has(self.preference) || (has(self.stage) && self.stage in "
        "['rm', 'dpo', 'kto', 'orpo', 'cpo'])",
        message="preference is only read by the preference stages rm, dpo, kto, orpo and cpo",
        check=lambda s: s.preference is None or s.stage in ("rm", "dpo", "kto", "orpo", "cpo"),
    ),
    _only_for("beta", ("dpo", "kto", "orpo", "cpo"), "beta"),
    _only_for("lossType", ("dpo", "cpo"), "loss_type"),
    _only_for("lossWeights", ("dpo",), "loss_weights"),
    _only_for("labelSmoothing", ("dpo", "cpo"), "label_smoothing"),
    _only_for("precomputeRefLogProbs", _STAGES_WITH_REFERENCE, "precompute_ref_log_probs"),
    _only_for("desirableWeight", ("kto",), "desirable_weight"),
    _only_for("undesirableWeight", ("kto",), "undesirable_weight"),
    _only_for("simpoGamma", ("cpo",), "simpo_gamma"),
    _only_for("cpoAlpha", ("cpo",), "cpo_alpha"),
    Rule(
        cel="!has(self.preference) || !has(self.preference.lossType) || !has(self.stage) "
        f"|| self.stage != 'dpo' || self.preference.lossType.all(l, l in {_cel_list(DPO_LOSSES)})",
        message="preference.lossType for dpo takes " + ", ".join(DPO_LOSSES),
        check=lambda s: s.preference is None or s.preference.loss_type is None
        or s.stage != "dpo" or all(x in DPO_LOSSES for x in s.preference.loss_type),
    ),
    Rule(
        cel="!has(self.preference) || !has(self.preference.lossType) || !has(self.stage) "
        "|| self.stage != 'cpo' || (size(self.preference.lossType) == 1 && "
        f"self.preference.lossType[0] in {_cel_list(CPO_LOSSES)})",
        message="preference.lossType for cpo takes exactly one of " + ", ".join(CPO_LOSSES),
        check=lambda s: s.preference is None or s.preference.loss_type is None
        or s.stage != "cpo" or (len(s.preference.loss_type) == 1
                                and s.preference.loss_type[0] in CPO_LOSSES),
    ),
    Rule(
        cel="!has(self.stage) || self.stage != 'kto' || !has(self.training) || "
        "!has(self.training.batchSizePerDevice) || self.training.batchSizePerDevice > 1",
        message="stage kto needs training.batchSizePerDevice of at least 2 (its KL estimate "
        "pairs each answer with another prompt of the same batch)",
        check=lambda s: s.stage != "kto" or s.training.batch_size_per_device > 1,
    ),
)


# --------------------------------------------------------------------------- evaluation


class EvaluationSpec(_Spec):
    """What runs after the last step, on the held-out rows (training.evalSplit)."""

    predict: Annotated[
        bool, Field(description="Generate an answer to each held-out prompt (greedy) and "
                    "score it against the reference answer: ROUGE-1/2/L and BLEU-4 (x100), "
                    "written with the answers to generated_predictions.jsonl.")
    ] = False
    max_samples: Annotated[
        int, Field(ge=1, le=100_000, description="Held-out prompts answered at most.")
    ] = 64
    max_new_tokens: Annotated[
        int, Field(ge=1, le=32768, description="Tokens generated per answer at most.")
    ] = 256


_EVALUATION_SPEC_RULES = (
    Rule(
        cel="!has(self.evaluation) || !has(self.evaluation.predict) || "
        "!self.evaluation.predict || (has(self.training) && has(self.training.evalSplit) && "
        "self.training.evalSplit > 0.0 && (!has(self.stage) || self.stage == 'sft'))",
        message="evaluation.predict needs stage sft and training.evalSplit > 0 (the held-out "
        "conversations it answers)",
        check=lambda s: s.evaluation is None or not s.evaluation.predict or (
            s.training.eval_split > 0 and s.stage == "sft"),
    ),
)


# --------------------------------------------------------------------------- online RL


class RewardType(enum.StrEnum):
    exact_match = "exactMatch"  # the answer equals a column (normalised)
    numeric = "numeric"  # the answer's last number equals a column's, within tolerance
    math = "math"  # mathematically equivalent to a column (math-verify)
    regex = "regex"  # the completion matches a pattern (a format, e.g. <think>…</think>)
    json = "json"  # the answer is JSON (valid against jsonSchema when given)
    length = "length"  # close to target completion tokens
    reward_model = "rewardModel"  # a reward model's score (e.g. an rm job's output)
    python = "python"  # module:function, called with TRL's reward-function arguments


# What each reward type reads; any other of these fields is refused for it.
_REWARD_FIELDS = {
    "column": ("exactMatch", "numeric", "math"),
    "normalize": ("exactMatch",),
    "tolerance": ("numeric",),
    "pattern": ("regex",),
    "jsonSchema": ("json",),
    "target": ("length",),
    "source": ("rewardModel",),
    "fromJob": ("rewardModel",),
    "function": ("python",),
    "path": ("python",),
}
_REWARD_NEEDS = {"exactMatch": "column", "numeric": "column", "math": "column",
                 "regex": "pattern", "length": "target", "python": "function"}


def _reward_rules() -> tuple[Rule, ...]:
    rules = []
    for wire, types in _REWARD_FIELDS.items():
        attr = re.sub(r"(?<!^)(?=[A-Z])", "_", wire).lower()
        rules.append(Rule(
            cel=f"!has(self.{wire}) || self.type in {_cel_list(types)}",
            message=f"rewards[].{wire} is only read by type {' or '.join(types)}",
            check=lambda r, a=attr, t=types: getattr(r, a) is None or r.type in t))
    for type_, wire in _REWARD_NEEDS.items():
        attr = re.sub(r"(?<!^)(?=[A-Z])", "_", wire).lower()
        rules.append(Rule(
            cel=f"self.type != '{type_}' || has(self.{wire})",
            message=f"a reward of type {type_} needs {wire}",
            check=lambda r, a=attr, t=type_: r.type != t or getattr(r, a) is not None))
    return tuple(rules)


_REWARD_RULES = (
    *_reward_rules(),
    Rule(
        cel="self.type != 'rewardModel' || has(self.source) != has(self.fromJob)",
        message="a reward of type rewardModel needs exactly one of source and fromJob",
        check=lambda r: r.type != "rewardModel" or (r.source is None) != (r.from_job is None),
    ),
)


class RewardSpec(_Spec):
    """One reward for grpo; the run maximises the weighted sum of all of them."""

    model_config = ConfigDict(json_schema_extra=_rules(*_REWARD_RULES))

    type: Annotated[RewardType, Field(description="exactMatch, numeric, math, regex, json, "
                                      "length, rewardModel or python.", **_ENUM)]
    name: Annotated[
        str | None,
        _str("^[A-Za-z][A-Za-z0-9_]*$", 40, description="Name in metrics (rewards/NAME/mean); "
             "default: the type and its index."),
    ] = None
    weight: Annotated[float, Field(ge=-100, le=100, description="Weight in the sum.")] = 1.0
    column: Annotated[
        str | None, _str("^[A-Za-z_][A-Za-z0-9_]*$", 64, description="exactMatch, numeric, "
                         "math: the data column with the right answer (e.g. answer).")
    ] = None
    normalize: Annotated[
        bool | None, Field(description="exactMatch: ignore case, spacing, width and trailing "
                           "punctuation (default true).")
    ] = None
    tolerance: Annotated[
        float | None, Field(ge=0, le=1, description="numeric: relative tolerance (default "
                            "1e-6).")
    ] = None
    pattern: Annotated[
        str | None, _str(TEXT, 1024, min_length=1, description="regex: a Python regular "
                         "expression, searched with DOTALL; anchor it with ^…$ for a shape.")
    ] = None
    json_schema: Annotated[
        dict[str, Any] | None,
        Field(description="json: a JSON Schema the answer must satisfy (any JSON without).",
              json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}),
    ] = None
    target: Annotated[
        int | None, Field(ge=1, le=1_000_000, description="length: completion tokens that "
                          "score 1 (0 at none and at twice as many).")
    ] = None
    source: Annotated[
        str | None, _str(SOURCE_PATTERN, 2048, description="rewardModel: the reward model "
                         f"(e.g. an rm job's output/model): {SOURCE_HELP}.")
    ] = None
    from_job: Annotated[
        str | None, _str("^[a-z]([-a-z0-9]*[a-z0-9])?$", 50, description="rewardModel: the "
                         "rm FineTuneJob (in this namespace) whose model scores, instead of "
                         "source; this job waits for it as for model.fromJob.")
    ] = None
    function: Annotated[
        str | None, _str("^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$", 256,
                         description="python: module:function, called as TRL calls reward "
                         "functions (prompts, completions, completion_ids, data columns).")
    ] = None
    path: Annotated[
        str | None, _str(SOURCE_PATTERN, 2048, description="python: a directory to import the "
                         "module from (e.g. pvc://CLAIM/rewards or a ConfigMap mount); default: "
                         "the trainer image.")
    ] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _REWARD_RULES)


GRPO_LOSSES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo")


class GrpoSpec(_Spec):
    """Generation and loss for grpo."""

    num_generations: Annotated[
        int, Field(ge=2, le=256, description="Completions sampled per prompt (a group). "
                   "batchSizePerDevice × gradientAccumulation × GPUs must divide by it.")
    ] = 8
    max_completion_len: Annotated[
        int, Field(ge=1, le=131072, description="Tokens generated per completion at most.")
    ] = 256
    temperature: Annotated[float, Field(gt=0, le=10, description="Sampling temperature.")] = 1.0
    beta: Annotated[
        float, Field(ge=0, le=100, description="KL penalty towards the starting model (0: "
                     "none, and no reference copy is kept).")
    ] = 0.0
    loss_type: Annotated[
        Literal[GRPO_LOSSES],  # type: ignore[valid-type]
        Field(description="How token losses are averaged: " + ", ".join(GRPO_LOSSES) + "."),
    ] = "dapo"
    vllm: Annotated[
        bool, Field(description="Generate with vLLM (colocate mode) when the trainer image has "
                    "it and a GPU is there; otherwise transformers generates.")
    ] = True


_RL_SPEC_RULES = (
    Rule(
        cel="!has(self.stage) || self.stage != 'grpo' || (has(self.rewards) "
        "&& size(self.rewards) > 0)",
        message="stage grpo needs at least one reward in rewards",
        check=lambda s: s.stage != "grpo" or bool(s.rewards),
    ),
    Rule(
        cel="(has(self.stage) && self.stage == 'grpo') || (!has(self.rewards) && !has(self.grpo))",
        message="rewards and grpo are only read by stage grpo",
        check=lambda s: s.stage == "grpo" or (s.rewards is None and s.grpo is None),
    ),
    Rule(
        cel="!has(self.stage) || self.stage != 'grpo' || "
        "((has(self.training) && has(self.training.batchSizePerDevice) ? "
        "self.training.batchSizePerDevice : 4) * (has(self.training) && "
        "has(self.training.gradientAccumulation) ? self.training.gradientAccumulation : 1)) % "
        "(has(self.grpo) && has(self.grpo.numGenerations) ? self.grpo.numGenerations : 8) == 0",
        message="stage grpo needs training.batchSizePerDevice × training.gradientAccumulation "
        "to be a multiple of grpo.numGenerations (each prompt's completions form one group)",
        check=lambda s: s.stage != "grpo" or (
            s.training.batch_size_per_device * s.training.gradient_accumulation
        ) % s.grpo_or_default().num_generations == 0,
    ),
)


# --------------------------------------------------------------------------- where it runs


_RESOURCE_RULES = (
    Rule(
        cel="!has(self.nodes) || self.nodes == 1 || !has(self.gpusPerNode) "
        "|| self.gpusPerNode > 0",
        message="resources.nodes > 1 needs resources.gpusPerNode > 0",
        check=lambda r: r.nodes == 1 or r.gpus_per_node > 0,
    ),
)


class ResourcesSpec(_Spec):
    """Machines and GPUs: one training process per GPU."""

    model_config = ConfigDict(json_schema_extra=_rules(*_RESOURCE_RULES))

    nodes: Annotated[
        int, Field(ge=1, le=1024, description="Machines (PyTorchJob replicas).",
                   json_schema_extra=immutable("spec.resources.nodes"))
    ] = 1
    gpus_per_node: Annotated[
        int, Field(ge=0, le=64, description="GPUs per machine; one training process each.",
                   json_schema_extra=immutable("spec.resources.gpusPerNode"))
    ] = 1
    cpu: Annotated[
        str | None, Field(pattern=QUANTITY, max_length=64,
                          description="CPU request and limit per node.")
    ] = None
    memory: Annotated[
        str | None, Field(pattern=QUANTITY, max_length=64,
                          description="Memory request and limit per node.")
    ] = None
    shared_memory: Annotated[
        str, Field(pattern=QUANTITY, max_length=64,
                   description="Size of /dev/shm (data loader workers, NCCL).")
    ] = "8Gi"

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _RESOURCE_RULES)


class OutputSpec(_Spec):
    """Where the run writes checkpoints, progress, the adapter and the model."""

    uri: Annotated[
        str,
        Field(
            min_length=1,
            max_length=2048,
            pattern=OUTPUT_PATTERN,
            json_schema_extra=immutable("spec.output.uri"),
            description="Where checkpoints, adapter and merged model go: a local path or "
            "pvc://CLAIM/path (object stores are planned).",
        ),
    ]
    merge: Annotated[
        bool, Field(description="Also save base + adapter merged into one model (LoRA).")
    ] = False


_SCHEDULING_RULES = (
    Rule(
        cel="!has(self.nodeSelector) || self.nodeSelector.all(k, size(k) <= 317 && "
        f"k.matches('{QUALIFIED_NAME}'))",
        message="scheduling.nodeSelector: each key must be a label key ([prefix/]name: name "
        "up to 63 letters, digits, '-', '_', '.')",
        check=lambda s: s.node_selector is None or all(
            len(k) <= 317 and re.fullmatch(QUALIFIED_NAME, k) for k in s.node_selector),
    ),
)


_TOLERATION_RULES = (  # what the API server checks in a Pod (ValidateTolerations)
    Rule(
        cel="(has(self.key) && self.key != '') || (has(self.operator) "
        "&& self.operator == 'Exists')",
        message="scheduling.tolerations[]: a toleration without key needs operator Exists",
        check=lambda t: bool(t.key) or t.operator == "Exists",
    ),
    Rule(
        cel="!has(self.operator) || self.operator != 'Exists' || !has(self.value) "
        "|| self.value == ''",
        message="scheduling.tolerations[]: operator Exists takes no value",
        check=lambda t: t.operator != "Exists" or not t.value,
    ),
    Rule(
        cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        message="scheduling.tolerations[]: tolerationSeconds needs effect NoExecute",
        check=lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
    ),
)


class Toleration(_Spec):
    """A pod toleration, as in a Pod spec."""

    model_config = ConfigDict(json_schema_extra=_rules(*_TOLERATION_RULES))

    key: Annotated[str | None, Field(max_length=317, pattern=f"^$|{QUALIFIED_NAME}",
                                     description="The taint key (empty: every key).")] = None
    operator: Annotated[Literal["Exists", "Equal"] | None,
                        Field(description="Exists or Equal (default).")] = None
    value: Annotated[str | None, Field(max_length=63, pattern=LABEL_VALUE,
                                       description="The taint value, with Equal.")] = None
    effect: Annotated[
        Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None,
        Field(description="The taint effect to tolerate (empty: all).")
    ] = None
    toleration_seconds: Annotated[int | None, Field(
        ge=0, le=10**10, description="With NoExecute: how long the pod stays after the taint "
        "appears.")] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _TOLERATION_RULES)


class SchedulingSpec(_Spec):
    """Where the training pods may run; copied onto every replica of the PyTorchJob."""

    model_config = ConfigDict(json_schema_extra=_rules(*_SCHEDULING_RULES))

    node_selector: Annotated[
        Annotated[Annotated[dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]],
                            Field(max_length=64)],
                  BeforeValidator(_drop_nulls)] | None,
        Field(description="Node labels the pods need (label values)."),
    ] = None
    tolerations: Annotated[
        list[Toleration] | None, Field(max_length=64,
                                       description="Pod tolerations, as in a Pod spec.")
    ] = None
    affinity: Annotated[
        dict[str, Any] | None, Field(description="Pod affinity, as in a Pod spec.")
    ] = None
    priority_class_name: Annotated[
        str | None, Field(max_length=253, pattern=DNS_SUBDOMAIN,
                          description="A PriorityClass (a DNS-1123 subdomain).")
    ] = None

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _SCHEDULING_RULES)


class RunPolicySpec(_Spec):
    """How long the run may take, how often its pods may restart, and cleanup."""

    active_deadline_seconds: Annotated[
        int | None, Field(ge=1, le=10**10, description="Fail the run after this long.")
    ] = None
    backoff_limit: Annotated[
        int, Field(ge=0, le=100, description="Pod restarts before the run fails; each restart "
                   "resumes from the last checkpoint.")
    ] = 3
    ttl_seconds_after_finished: Annotated[
        int | None, Field(ge=0, le=INT32_MAX,
                          description="Delete the PyTorchJob this long after it ends "
                          "(the FineTuneJob and its outputs stay).")
    ] = None


# Variables the operator, the PyTorchJob controller or the launcher set: a job cannot
# override them (a second HF_TOKEN would replace the Secret's, KUBEFLOW_TRAINER_SERVER_URL
# would send the pod's service-account token elsewhere).
RESERVED_ENV = ("HF_HOME", "HF_TOKEN", "TOKENIZERS_PARALLELISM", "MASTER_ADDR", "MASTER_PORT",
                "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK",
                "PYTHONUNBUFFERED")
RESERVED_ENV_PREFIXES = ("KUBETUNE_", "KUBEFLOW_", "PET_")
# Names that hold a credential: a plain value would sit in the ConfigMap and the PyTorchJob.
SECRET_ENV_NAME = ("(?i)((^|_)(TOKEN|SECRET|PASSWORD|PASSWD|PWD|CREDENTIALS?|APIKEY)(_|$)|"
                   "(^|_)(API|ACCESS|SECRET|PRIVATE|SIGNING|ENCRYPTION|ACCOUNT)_KEY(_|$)|"
                   "(^|_)KEY$)")
NOT_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "GOOGLE_APPLICATION_CREDENTIALS")
_NOT_SECRET_SUFFIX = "(?i)_(FILE|PATH|DIR|ID)$"


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
)
_TRAINER_RULES = (
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

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        if self.env is not None:
            names = [e.name for e in self.env]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"trainer.env: {', '.join(twice)} given more than once")
        return _enforce(self, _TRAINER_RULES)


# --------------------------------------------------------------------------- the spec


_SPEC_RULES = (
    _STAGE_RULE,
    *_EVALUATION_SPEC_RULES,
    *_PREFERENCE_SPEC_RULES,
    *_RL_SPEC_RULES,
    Rule(
        cel="!has(self.output.merge) || !self.output.merge || !has(self.method) "
        "|| !has(self.method.type) || self.method.type in ['lora', 'qlora']",
        message="output.merge needs method.type lora or qlora (full and freeze already "
        "save a whole model)",
        check=lambda s: not s.output.merge or s.method.type in ("lora", "qlora"),
    ),
)


class FineTuneJobSpec(_Spec):
    """What to fine-tune, on which data, how, and where the result goes."""

    model_config = ConfigDict(json_schema_extra=_rules(*_SPEC_RULES))

    model: ModelSpec
    datasets: Annotated[list[DatasetSpec], Field(
        min_length=1, max_length=64, description="The training data: every data set's rows, "
        "mixed (evalSplit holds some out).")]
    stage: Annotated[
        Stage,
        Field(description="What to train: " + "; ".join(
            f"{k}: {v.summary}" + ("" if v.implemented else " (planned)")
            for k, v in STAGES.items()) + ".",
            json_schema_extra=immutable("spec.stage"), **_ENUM),
    ] = Stage.sft
    preference: Annotated[
        PreferenceSpec | None,
        Field(description="Settings of the preference stages (rm, dpo, kto, orpo, cpo)."),
    ] = None
    rewards: Annotated[
        list[RewardSpec] | None,
        Field(min_length=1, max_length=16, description="grpo: what a completion scores; the "
              "run maximises their weighted sum."),
    ] = None
    grpo: Annotated[GrpoSpec | None, Field(description="grpo: generation and loss.")] = None
    evaluation: Annotated[
        EvaluationSpec | None, Field(description="After the last step: answers to held-out "
                                     "prompts, scored (predict).")
    ] = None
    method: MethodSpec = MethodSpec()
    template: Annotated[
        Literal[TEMPLATES],  # type: ignore[valid-type]
        Field(
            description='"auto" (the tokenizer\'s chat template) or a named one: chatml, '
            "llama3, alpaca.",
        ),
    ] = "auto"
    training: TrainingSpec = TrainingSpec()
    resources: ResourcesSpec = ResourcesSpec()
    output: OutputSpec
    scheduling: SchedulingSpec | None = None
    run_policy: RunPolicySpec = RunPolicySpec()
    trainer: TrainerSpec | None = None
    suspend: Annotated[
        bool, Field(description="Stop the pods; set back to false to resume from the last "
                    "checkpoint.")
    ] = False

    @model_validator(mode="after")
    def _cross_field_rules(self) -> Any:
        return _enforce(self, _SPEC_RULES)

    def learning_rate(self) -> float:
        """training.learningRate, or the stage's usual one."""
        return self.training.learning_rate or STAGES[self.stage].learning_rate

    def preference_or_default(self) -> PreferenceSpec:
        return self.preference or PreferenceSpec()

    def grpo_or_default(self) -> GrpoSpec:
        return self.grpo or GrpoSpec()


# --------------------------------------------------------------------------- status


def _d(text: str) -> Any:
    return Field(description=text)


class Condition(_Model):
    """A kstatus-style condition: Ready, Reconciling, Stalled, Succeeded, Queued."""

    type: Annotated[str, _d("Ready, Reconciling, Stalled, Succeeded or Queued.")]
    status: Annotated[Literal["True", "False", "Unknown"], _d("True, False or Unknown.")]
    reason: Annotated[str | None, _d("A CamelCase reason, e.g. WaitingForAdmission.")] = None
    message: Annotated[str | None, _d("What a person should know.")] = None
    observed_generation: Annotated[
        int | None, _d("The metadata.generation this condition was computed for.")] = None
    last_transition_time: Annotated[str | None, _d("When status last changed (RFC 3339).")
                                    ] = None


class Progress(_Model):
    """The latest progress the trainer reported."""

    step: Annotated[int | None, _d("Optimizer steps done.")] = None
    total_steps: Annotated[int | None, _d("Optimizer steps in the whole run.")] = None
    steps: Annotated[str | None, _d('step/totalSteps, e.g. "120/400" (for kubectl get).')
                     ] = None
    percent: Annotated[float | None, _d("Share of the steps done, 0–100.")] = None
    eta_seconds: Annotated[float | None, _d("Estimated seconds until the last step.")] = None
    eta: Annotated[str | None, _d('The same, for people, e.g. "1h05m" (for kubectl get).')
                   ] = None
    loss: Annotated[float | None, _d("Training loss at the last logged step.")] = None
    learning_rate: Annotated[float | None, _d("Learning rate at the last logged step.")
                             ] = None
    tokens_per_second: Annotated[float | None, _d("Training throughput, all GPUs together.")
                                 ] = None
    epoch: Annotated[float | None, _d("Passes over the data so far (fractional).")] = None
    metrics: Annotated[
        dict[str, float] | None,
        Field(description="What the stage logs beside the loss, latest value each: for "
              "preference stages rewards/chosen, rewards/rejected, rewards/margins, "
              "rewards/accuracies, kl (kto), accuracy (rm); for grpo reward, "
              "rewards/NAME/mean and completion lengths; eval_ first for evaluation."),
    ] = None
    updated_at: Annotated[str | None, _d("When the trainer sent this (RFC 3339).")] = None


class Checkpoint(_Model):
    """A complete checkpoint a restarted run can resume from."""

    step: Annotated[int, _d("The step it was saved at.")]
    loss: Annotated[float | None, _d("Training loss then.")] = None
    uri: Annotated[str, _d("Where it is, under spec.output.uri.")]


class Outputs(_Model):
    """What the run produced, as URIs under spec.output.uri."""

    adapter: Annotated[str | None, _d("The LoRA adapter (lora, qlora).")] = None
    merged_model: Annotated[str | None, _d("Base + adapter merged into one model "
                                           "(output.merge).")] = None
    model: Annotated[str | None, Field(description="The whole model (full, freeze).")] = None
    metrics: Annotated[
        dict[str, float] | None,
        Field(description="Final metrics of the run: train_loss, eval_loss, eval_perplexity, "
              "the stage's eval metrics (e.g. eval_accuracy for rm, eval_rewards/accuracies "
              "for dpo) and with evaluation.predict predict_rouge1/2/L and predict_bleu4."),
    ] = None


class Failure(_Model):
    """Why a run failed, kept after its pods are gone."""

    reason: Annotated[str, _d("A CamelCase reason, e.g. OOMKilled, DataError, InvalidSpec.")]
    message: Annotated[str | None, _d("What went wrong, naming the field when a field did.")
                       ] = None
    exit_code: Annotated[int | None, _d("The training container's exit code.")] = None
    pod: Annotated[str | None, _d("The pod that failed.")] = None
    log_tail: Annotated[str | None, Field(description="Last lines of the failing log.")] = None


class FineTuneJobStatus(_Model):
    """What the operator observed; written only by the operator."""

    phase: Annotated[
        Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"] | None,
        _d("Pending, Queued, Running, Succeeded, Failed or Suspended; the conditions say why."),
    ] = None
    observed_generation: Annotated[int | None, _d("The metadata.generation the status is "
                                                  "for.")] = None
    conditions: Annotated[list[Condition], _d("Ready, Reconciling, Stalled, Succeeded, "
                                               "Queued.")] = []
    progress: Annotated[Progress | None, _d("The latest progress the trainer reported.")
                        ] = None
    checkpoints: Annotated[list[Checkpoint], _d("Complete checkpoints, oldest first, as many "
                                                "as training.saveTotalLimit keeps.")] = []
    outputs: Annotated[Outputs | None, _d("What the run produced.")] = None
    failure: Annotated[Failure | None, _d("Why the run failed, kept after its pods are gone."
                                          )] = None


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
    "spec.preference": _PREFERENCE_RULES,
    "spec.rewards[]": _REWARD_RULES,
    "spec.training": _TRAINING_RULES,
    "spec.resources": _RESOURCE_RULES,
}
