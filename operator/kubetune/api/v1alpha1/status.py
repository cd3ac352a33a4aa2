"""FineTuneJobStatus: what the operator observed."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from kubetune.api.v1alpha1._base import _Model

# --------------------------------------------------------------------------- status


def _d(text: str) -> Any:
    return Field(description=text)


# Counts the operator writes (steps, generations, restarts) are never negative, as the progress
# endpoint keeps them (kubetune_operator.reporting; an integer field is int64 on the API server,
# and a maximum there is a float64, which cannot hold 2**63 - 1); an exit code is a container's
# int32.
def _count(text: str) -> Any:
    return Field(ge=0, description=text)


def _exit_code(text: str) -> Any:
    return Field(ge=-(2**31), le=2**31 - 1, description=text)


class Condition(_Model):
    """A kstatus-style condition: Ready, Reconciling, Stalled, Succeeded, Queued."""

    type: Annotated[str, _d("Ready, Reconciling, Stalled, Succeeded or Queued.")]
    status: Annotated[Literal["True", "False", "Unknown"], _d("True, False or Unknown.")]
    reason: Annotated[str | None, _d("A CamelCase reason, e.g. WaitingForAdmission.")] = None
    message: Annotated[str | None, _d("What a person should know.")] = None
    observed_generation: Annotated[
        int | None, _count("The metadata.generation this condition was computed for.")] = None
    last_transition_time: Annotated[str | None, _d("When status last changed (RFC 3339).")
                                    ] = None


class Progress(_Model):
    """The latest progress the trainer reported."""

    step: Annotated[int | None, _count("Optimizer steps done.")] = None
    total_steps: Annotated[int | None, _count("Optimizer steps in the whole run.")] = None
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

    step: Annotated[int, _count("The step it was saved at.")]
    loss: Annotated[float | None, _d("Training loss then.")] = None
    uri: Annotated[str, _d("Where it is, under spec.output.uri.")]


class Outputs(_Model):
    """What the run produced, as URIs under spec.output.uri."""

    adapter: Annotated[str | None, _d("The LoRA adapter (method.type lora).")] = None
    merged_model: Annotated[str | None, _d("Base + adapter merged into one model "
                                           "(output.merge).")] = None
    model: Annotated[str | None, Field(description="The whole model (full, freeze).")] = None
    tracking_url: Annotated[str | None, Field(description="The run in the tracker "
                                              "(training.reportTo: MLflow, W&B).")] = None
    metrics: Annotated[
        dict[str, float] | None,
        Field(description="Final metrics of the run: train_loss, eval_loss, eval_perplexity, "
              "the stage's eval metrics (e.g. eval_accuracy for rm, eval_rewards/accuracies "
              "for dpo), with evaluation.predict predict_rouge1/2/L and predict_bleu4, and with "
              "evaluation.lmEval lmeval_TASK_METRIC."),
    ] = None


class Failure(_Model):
    """Why a run failed, kept after its pods are gone."""

    reason: Annotated[str, _d("A CamelCase reason, e.g. OOMKilled, DataError, InvalidSpec.")]
    message: Annotated[str | None, _d("What went wrong, naming the field when a field did.")
                       ] = None
    exit_code: Annotated[int | None, _exit_code("The training container's exit code.")] = None
    pod: Annotated[str | None, _d("The pod that failed.")] = None
    log_tail: Annotated[str | None, Field(description="Last lines of the failing log.")] = None


class Restart(_Model):
    """One time a training pod ended before the run did and a new one took over."""

    at: Annotated[str, _d("When the pod's trainer ended (RFC 3339).")]
    reason: Annotated[
        Literal["Preempted", "Evicted", "OOMKilled", "NodeLost", "Error"],
        _d("Preempted (SIGTERM: Kueue, the scheduler, a deleted pod), Evicted (node pressure, "
           "a drain), OOMKilled, NodeLost or Error (any other retryable exit)."),
    ]
    pod: Annotated[str | None, _d("The pod that ended.")] = None
    exit_code: Annotated[int | None, _exit_code("Its trainer's exit code (143: stopped by SIGTERM "
                                        "after saving).")] = None
    from_step: Annotated[int | None, _count("The last step reported before it ended.")] = None
    to_step: Annotated[int | None, _count("The newest complete checkpoint then: where the next "
                                      "pod resumes.")] = None
    lost_steps: Annotated[int | None, _count("fromStep - toStep: steps trained again.")] = None
    message: Annotated[str | None, _d("The trainer's or the kubelet's own words.")] = None


class CheckResult(_Model):
    """One post-training check (spec.serve.checks[]) as asked of the served model."""

    prompt: Annotated[str, _d("What was asked.")]
    passed: Annotated[bool, _d("The answer held every expected substring.")]
    answer: Annotated[str | None, _d("The answer (its first 500 characters).")] = None
    missing: Annotated[list[str], _d("Expected substrings the answer lacked.")] = []


class Serving(_Model):
    """The server on the trained model (spec.serve)."""

    url: Annotated[str, _d("The OpenAI-compatible endpoint, in the cluster: "
                           "http://NAME-serve.NAMESPACE.svc:8000/v1 (kserve: the "
                           "InferenceService's address, plus /v1).")]
    model_name: Annotated[str, _d("The model name to ask for (the request's model).")]
    weights: Annotated[Literal["model", "adapter"], _d("What is served: the whole trained "
                                                       "model, or the base with the adapter.")]
    ready: Annotated[bool, _d("The server answers its readiness probe.")] = False
    endpoint: Annotated[str | None, _d("spec.serve.endpoint's URL, while that shared Service "
                                       "serves this job.")] = None
    checks: Annotated[list[CheckResult], _d("spec.serve.checks as answered, once ready.")] = []


class Preflight(_Model):
    """What the pre-flight pod found, before any GPU was asked for (spec.preflight)."""

    passed: Annotated[bool, _d("The data and the memory estimate passed: training starts.")]
    message: Annotated[str | None, _d("Why it did not pass (naming the field), or a summary."
                                      )] = None
    rows: Annotated[int | None, _count("Rows read from spec.datasets.")] = None
    bad_rows: Annotated[int | None, _count("Rows skipped as unusable.")] = None
    bad_reasons: Annotated[list[str], Field(max_length=5, description=(
        "The first reasons rows were skipped."))] = []
    sequences: Annotated[int | None, _count("Training sequences after templating.")] = None
    tokens: Annotated[int | None, _count("Tokens in the training sequences.")] = None
    trained_tokens: Annotated[int | None, _count("Tokens the loss is computed on (not masked)."
                                             )] = None
    truncated: Annotated[int | None, _count("Sequences cut at training.cutoffLen.")] = None
    row_length_percentiles: Annotated[
        dict[str, Annotated[int, Field(ge=0)]],
        _d("Tokens per prepared training row (packed rows when packing): p50, p90, p99, max."),
    ] = {}
    prepared: Annotated[bool, _d("The prepared rows were saved where the training pods read "
                                 "them (a pvc:// output), so they do not prepare them again."
                                 )] = False
    memory_per_gpu: Annotated[str | None, _d("Estimated peak memory per GPU, e.g. 21.4 GiB.")
                              ] = None
    gpu_memory: Annotated[str | None, _d("Memory of one GPU it was compared with.")] = None
    estimated_seconds: Annotated[float | None, _d("Estimated training time (all epochs).")
                                 ] = None
    estimated_time: Annotated[str | None, _d('The same, for people, e.g. "2h10m".')] = None
    assumptions: Annotated[str | None, _d("What the time estimate assumes (GPU peak, MFU).")
                           ] = None


class FineTuneJobStatus(_Model):
    """What the operator observed; written only by the operator."""

    phase: Annotated[
        Literal["Pending", "Validating", "Queued", "Running", "Succeeded", "Failed",
                "Suspended"] | None,
        _d("Pending, Validating (the pre-flight pod), Queued, Running, Succeeded, Failed or "
           "Suspended; the conditions say why."),
    ] = None
    observed_generation: Annotated[int | None, _count("The metadata.generation the status is "
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
    restarts: Annotated[int | None, _count("Times a training pod ended and the run went on in a "
                                       "new one, resuming from a checkpoint.")] = None
    last_restarts: Annotated[list[Restart], Field(max_length=5, description=(
        "The last few restarts, oldest first."))] = []
    serving: Annotated[Serving | None, _d("The server on the trained model (spec.serve).")
                       ] = None
    preflight: Annotated[Preflight | None, _d("What the pre-flight pod found (spec.preflight)."
                                              )] = None
