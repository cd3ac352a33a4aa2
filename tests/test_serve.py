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
