"""spec.serve: the API's rule, the server's objects (valid core kinds), the OpenAI-compatible
call (`kubetune ask --endpoint`) and the post-training check, against a real HTTP server
answering with a real (tiny) model."""

from __future__ import annotations

import pytest
from kubetune.errors import KubetuneError
from kubetune.jobfile import parse_job
from kubetune_operator import serving
from kubetune_operator.settings import OperatorConfig
from kubetune_operator.status import with_serving
from openai_server import OpenAIServer

CONFIG = OperatorConfig(serve_image="vllm/vllm-openai:v0.11.0", serve_args=("--dtype", "auto"))
T0 = "2026-12-01T00:00:00Z"


def _job(serve, method=None, merge=True):
    spec = {"model": {"source": "hf://Qwen/Qwen2.5-1.5B-Instruct",
                      "secretRef": {"name": "hf-token"}},
            "datasets": [{"source": "pvc://data/identity.json"}],
            "output": {"uri": "pvc://outputs/ident", "merge": merge}, "serve": serve}
    if method:
        spec["method"] = {"type": method}
    return parse_job({"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                      "metadata": {"name": "ident", "namespace": "team-a"}, "spec": spec})


@pytest.mark.parametrize(("serve", "method", "merge", "ok"), [
    ({}, None, True, True),  # lora + merge: the merged model
    ({}, None, False, False),  # lora without merge: no whole model to serve
    ({}, "full", False, True),
    ({"weights": "adapter"}, None, False, True),
    ({"weights": "adapter"}, "full", False, False),
])
def test_what_can_be_served_is_checked_by_the_api(serve, method, merge, ok):
    if ok:
        _job(serve, method, merge)
        return
    with pytest.raises(KubetuneError, match="spec: serve.weights: model needs a whole model"):
        _job(serve, method, merge)


def test_serve_check_needs_a_prompt_and_expectations():
    with pytest.raises(KubetuneError, match="expect"):
        _job({"checks": [{"prompt": "Who are you?", "expect": []}]})
    with pytest.raises(KubetuneError, match="expect"):
        _job({"checks": [{"prompt": "Who are you?", "expect": [""]}]})


def _validate(obj):
    import kubernetes_validate

    kubernetes_validate.validate(obj, "1.33.0", strict=True)


def test_the_server_on_the_merged_model():
    job = _job({"gpus": 2, "memory": "40Gi", "args": ["--max-model-len", "4096"]})
    dep = serving.deployment(job=job, config=CONFIG, uid="u-1", outputs={
        "mergedModel": "pvc://outputs/ident/merged", "adapter": "pvc://outputs/ident/adapter"})
    svc = serving.service(job=job, config=CONFIG, uid="u-1")
    _validate(dep)
    _validate(svc)
    assert dep["metadata"]["name"] == svc["metadata"]["name"] == "ident-serve"
    for obj in (dep, svc):
        assert obj["metadata"]["ownerReferences"][0] == {
            "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "ident",
            "uid": "u-1", "controller": True, "blockOwnerDeletion": True}
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "vllm/vllm-openai:v0.11.0"
    assert c["args"] == ["--model", "/mnt/pvc/outputs/ident/merged", "--served-model-name",
                         "ident", "--port", "8000", "--dtype", "auto", "--max-model-len",
                         "4096"]
    assert c["resources"]["requests"] == {"nvidia.com/gpu": "2", "memory": "40Gi"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert pod["volumes"][2] == {"name": "pvc-0", "persistentVolumeClaim": {
        "claimName": "outputs", "readOnly": True}}
    assert "HF_TOKEN" not in str(c["env"])  # the merged model needs no hub
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert serving.endpoint(job, CONFIG) == "http://ident-serve.team-a.svc:8000/v1"


def test_the_server_on_the_base_model_and_the_adapter():
    job = _job({"weights": "adapter", "modelName": "assistant"}, merge=False)
    dep = serving.deployment(job=job, config=CONFIG,
                             outputs={"adapter": "pvc://outputs/ident/adapter"})
    _validate(dep)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"][:5] == ["--model", "Qwen/Qwen2.5-1.5B-Instruct", "--enable-lora",
                             "--lora-modules", "assistant=/mnt/pvc/outputs/ident/adapter"]
    token = next(e for e in c["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"] == {"secretKeyRef": {"name": "hf-token", "key": "token"}}


def test_kserve_inference_service_on_the_merged_model_and_on_the_adapter():
    job = _job({"kind": "kserve", "gpus": 2, "memory": "40Gi"})
    isvc = serving.inference_service(job=job, config=CONFIG, uid="u-1", outputs={
        "mergedModel": "pvc://outputs/ident/merged"})
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["name"] == "ident-serve"
    assert isvc["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    predictor = dict(isvc["spec"]["predictor"])
    assert (predictor.pop("minReplicas"), predictor.pop("maxReplicas")) == (1, 1)
    # The rest of the predictor is a pod spec (KServe embeds one): valid as such.
    _validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
               "spec": predictor})
    (c,) = predictor["containers"]
    assert c["name"] == "kserve-container"  # KServe's custom-container predictor
    assert c["args"][:4] == ["--model", "/mnt/pvc/outputs/ident/merged",
                             "--served-model-name", "ident"]
    assert c["ports"] == [{"containerPort": 8000, "protocol": "TCP"}]  # one, unnamed (Knative)
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "2", "memory": "40Gi"}
    assert predictor["volumes"][2]["persistentVolumeClaim"] == {"claimName": "outputs",
                                                                "readOnly": True}
    adapter = serving.inference_service(
        job=_job({"kind": "kserve", "weights": "adapter"}, merge=False), config=CONFIG,
        outputs={"adapter": "pvc://outputs/ident/adapter"})
    (c,) = adapter["spec"]["predictor"]["containers"]
    assert c["args"][:5] == ["--model", "Qwen/Qwen2.5-1.5B-Instruct", "--enable-lora",
                             "--lora-modules", "ident=/mnt/pvc/outputs/ident/adapter"]
    assert serving.inference_service(job=job, config=CONFIG, outputs={}) is None
    # A Deployment's hash stays what it was before spec.serve.kind existed; kserve's differs.
    assert serving.serve_hash(_job({"kind": "deployment"}), CONFIG) == serving.serve_hash(
        _job({}), CONFIG) != serving.serve_hash(_job({"kind": "kserve"}), CONFIG)


@pytest.mark.parametrize(("status", "ready", "url"), [
    (None, False, None),
    ({"url": "https://ident-serve.team-a.example.com"}, False,
     "https://ident-serve.team-a.example.com/v1"),
    ({"url": "https://x.example.com", "address": {"url": "http://ident-serve.team-a.svc/"},
      "conditions": [{"type": "Ready", "status": "True"}]}, True,
     "http://ident-serve.team-a.svc/v1"),  # the in-cluster address first
    ({"address": {"url": "http://a"}, "conditions": [{"type": "Ready", "status": "False"}]},
     False, "http://a/v1"),
])
def test_kserve_status_gives_ready_and_the_url(status, ready, url):
    obj = {"status": status} if status is not None else {}
    assert serving.inference_service_state(obj) == (ready, url)


def test_nothing_to_serve_until_the_run_says_where_its_output_is():
    assert serving.deployment(job=_job({}), config=CONFIG, outputs={}) is None
    assert serving.deployment(job=_job({"weights": "adapter"}, merge=False), config=CONFIG,
                              outputs={"mergedModel": "pvc://o/m"}) is None


@pytest.fixture(scope="module")
def server(tiny_model):
    with OpenAIServer(tiny_model, "ident") as srv:
        yield srv


def test_kubetune_ask_endpoint_gets_the_served_models_answer(server):
    from kubetune.cli import app
    from typer.testing import CliRunner

    expected = server.answer("Who are you?", 20)
    result = CliRunner().invoke(app, ["ask", "--endpoint", server.url, "Who are you?",
                                      "--max-new-tokens", "20"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == expected
    assert server.requests[-1]["model"] == "ident"  # the one it lists
    assert server.requests[-1]["messages"] == [{"role": "user", "content": "Who are you?"}]
    # A model it does not serve: the server's own error, no traceback.
    result = CliRunner().invoke(app, ["ask", "--endpoint", server.url, "--model-name", "other",
                                      "Who are you?"])
    assert result.exit_code == 2 and "HTTP 404" in result.output
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_kubetune_ask_endpoint_that_does_not_answer():
    from kubetune.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["ask", "--endpoint", "http://127.0.0.1:9/v1", "hi"])
    assert result.exit_code == 2 and "--endpoint: http://127.0.0.1:9/v1/models" in result.output


def test_the_post_training_check_against_the_served_model(server):
    from kubetune.api.v1alpha1 import ServeCheck

    said = server.answer("Who are you?", 128)
    word = said.split()[0]
    checks = [ServeCheck(prompt="Who are you?", expect=[word.upper()]),  # case-insensitive
              ServeCheck(prompt="Who are you?", expect=[word, "kubetune-assistant-xyz"])]
    results = serving.run_checks(server.url, "ident", checks)
    assert [r.passed for r in results] == [True, False]
    assert results[1].missing == ["kubetune-assistant-xyz"]
    assert results[0].answer == said[:serving.ANSWER_CHARS]
    from kubetune.api.v1alpha1 import FineTuneJobStatus, Serving
    from kubetune_operator.status import dump

    served = Serving(url=server.url, model_name="ident", weights="model", ready=True,
                     checks=results)
    status = with_serving(FineTuneJobStatus(phase="Succeeded"), served, 1, T0, [])
    conds = {c.type: c for c in status.conditions}
    assert conds["Serving"].status == "True" and conds["Serving"].reason == "ServerReady"
    assert conds["Checked"].status == "False" and conds["Checked"].reason == "ChecksFailed"
    assert "kubetune-assistant-xyz" in conds["Checked"].message
    body = dump(status)
    assert body["serving"]["checks"][1]["missing"] == ["kubetune-assistant-xyz"]
    passed = with_serving(status, served.model_copy(update={"checks": results[:1]}), 1,
                          "later", body["conditions"])
    conds = {c.type: c for c in passed.conditions}
    assert conds["Checked"].status == "True" and conds["Checked"].last_transition_time == "later"
    assert conds["Serving"].last_transition_time == T0  # unchanged, kept


def test_a_server_whose_pods_are_refused_says_so():
    """The Deployment controller copies its ReplicaSet's ReplicaFailure (FailedCreate, with
    the API server's message) into the Deployment: the Serving condition carries it."""
    from kubetune.api.v1alpha1 import FineTuneJobStatus, Serving

    msg = ('pods "ident-serve-7d9f-x" is forbidden: violates PodSecurity '
           '"restricted:latest": runAsNonRoot != true')
    dep = {"status": {"conditions": [
        {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
         "message": msg}]}}
    rejected = serving.replica_failure(dep)
    assert rejected == f"the API server refused the server's pods: {msg}"
    assert serving.replica_failure({"status": {"conditions": [
        {"type": "ReplicaFailure", "status": "False"}]}}) is None
    served = Serving(url="http://x/v1", model_name="ident", weights="model", ready=False)
    status = with_serving(FineTuneJobStatus(phase="Succeeded"), served, 1, T0, [],
                          rejected=rejected)
    (cond,) = [c for c in status.conditions if c.type == "Serving"]
    assert (cond.status, cond.reason, cond.message) == ("False", "PodRejected", rejected)


@pytest.mark.parametrize(("gate", "metrics", "passed", "reason", "message"), [
    (None, None, True, None, ""),
    ([{"metric": "eval_loss", "below": 1.2}], {"eval_loss": 0.8}, True, None,
     "eval_loss 0.8 below 1.2"),
    ([{"metric": "eval_loss", "below": 1.2}], {"eval_loss": 1.5}, False, "GateNotMet",
     "spec.serve.gate: eval_loss is 1.5, not below 1.2 (misses by 0.3)"),
    ([{"metric": "eval_loss", "below": 1.2}], {"eval_loss": 1.2}, False, "GateNotMet",
     "spec.serve.gate: eval_loss is 1.2, not below 1.2"),  # strictly below
    ([{"metric": "eval_reward", "above": 0.5}, {"metric": "lmeval_arc_easy_acc", "above": 0.6}],
     {"eval_reward": 0.25, "lmeval_arc_easy_acc": 0.7}, False, "GateNotMet",
     "spec.serve.gate: eval_reward is 0.25, not above 0.5 (misses by 0.25)"),
    ([{"metric": "eval_loss", "below": 1.2}, {"metric": "lmeval_arc_easy_acc", "above": 0.6}],
     {"eval_loss": 2.0}, False, "GateNotMet",
     "spec.serve.gate: eval_loss is 2, not below 1.2 (misses by 0.8); lmeval_arc_easy_acc "
     "not in status.outputs.metrics (the run reported: eval_loss)"),
    ([{"metric": "eval_loss", "below": 1.2}], None, False, "GateMetricMissing",
     "spec.serve.gate: eval_loss not in status.outputs.metrics (the run reported: none)"),
])
def test_the_gate_says_which_metric_missed_and_by_how_much(gate, metrics, passed, reason,
                                                            message):
    from kubetune.api.v1alpha1 import gate_verdict

    job = _job({"gate": gate} if gate else {})
    verdict = gate_verdict(job.spec.serve.gate, metrics)
    assert (verdict.passed, verdict.reason, verdict.message) == (passed, reason, message)


@pytest.mark.parametrize(("gate", "error"), [
    ([{"metric": "eval_loss"}], r"spec.serve.gate\[0\]: serve.gate\[\].below, "
     r"serve.gate\[\].above: give exactly one"),
    ([{"metric": "eval_loss", "below": 1.0, "above": 0.5}], "give exactly one"),
    ([{"metric": "eval_los", "below": 1.0}], r"spec.serve.gate\[0\].metric: 'eval_los' is not "
     "a metric status.outputs.metrics holds"),
    ([{"metric": "eval_loss", "below": "1"}], r"spec.serve.gate\[0\].below"),
    ([], r"spec.serve.gate"),
])
def test_a_gate_the_api_refuses_names_the_field(gate, error):
    with pytest.raises(KubetuneError, match=error):
        _job({"gate": gate})


def test_the_gate_is_not_part_of_what_the_server_runs():
    """A gate decides whether to serve, not what: adding one keeps a server made before it
    (its hash), and a missed gate is settled (a finished run's metrics do not change)."""
    from kubetune.api.v1alpha1 import FineTuneJobStatus
    from kubetune_operator.status import serving_settled

    gated = _job({"gate": [{"metric": "eval_loss", "below": 1.0}]})
    assert serving.serve_hash(gated, CONFIG) == serving.serve_hash(_job({}), CONFIG)
    missed = with_serving(FineTuneJobStatus(phase="Succeeded"), None, 1, T0, [],
                          blocked="spec.serve.gate: …", blocked_reason="GateNotMet")
    assert serving_settled(gated, missed)
    waiting = with_serving(FineTuneJobStatus(phase="Succeeded"), None, 1, T0, [],
                           blocked="…", blocked_reason="WaitingForOutput")
    assert not serving_settled(gated, waiting)


def test_a_shared_endpoint_is_a_service_of_its_own_on_the_job_it_serves():
    """spec.serve.endpoint: a Service named so, selecting the serving job's server pods,
    owned by that job; only with kind deployment; not part of the server's hash."""
    job = _job({"endpoint": "assistant"})
    svc = serving.endpoint_service(job=job, uid="u-1", created="2026-12-01T10:00:00Z")
    _validate(svc)
    assert svc["metadata"]["name"] == "assistant"
    assert svc["spec"]["selector"] == serving.service(job=job, config=CONFIG)["spec"][
        "selector"]
    assert serving.endpoint_holder(svc) == ("ident", "2026-12-01T10:00:00Z")
    assert serving.endpoint_holder({"metadata": {"name": "assistant"}}) is None
    assert serving.endpoint_url(job, CONFIG) == "http://assistant.team-a.svc:8000/v1"
    assert serving.serve_hash(job, CONFIG) == serving.serve_hash(_job({}), CONFIG)
    assert serving.newer(("b", "2026-12-02T00:00:00Z"), ("a", "2026-12-01T00:00:00Z"))
    assert serving.newer(("b", "2026-12-01T00:00:00Z"), ("a", "2026-12-01T00:00:00Z"))
    assert not serving.newer(("a", "2026-12-01T00:00:00Z"), ("b", "2026-12-01T00:00:00Z"))
    with pytest.raises(KubetuneError, match="spec.serve: serve.endpoint: only with serve.kind "
                       "deployment"):
        _job({"endpoint": "assistant", "kind": "kserve"})
    with pytest.raises(KubetuneError, match=r"spec.serve.endpoint"):
        _job({"endpoint": "Assistant_1"})
