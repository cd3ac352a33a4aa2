"""No credential leaves the spec: one rule for every URL-valued field (kubetune.urls), the same
verdict from the CLI and the CRD's CEL, and every message path walked with a planted value."""

from __future__ import annotations

import copy
import os
import re

import pytest
import yaml
from fuzz_jobs import (
    PLANTED,
    Server,
    base_job,
    clean_urls,
    credential_env,
    credential_url_shapes,
    credential_urls,
    credential_values,
)
from hypothesis import HealthCheck, given, settings
from kubetune import urls
from kubetune.api.crd import finetunejob_crd
from kubetune.cli import app
from kubetune.errors import KubetuneError
from kubetune.jobfile import parse_job
from kubetune_operator.validation import validate as cluster_validate
from typer.testing import CliRunner

SERVER = Server(finetunejob_crd())
# `make test` runs 100 cases per generator; `make fuzz` sets KUBETUNE_FUZZ_EXAMPLES higher.
FUZZ = settings(max_examples=int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "100")),
                derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
runner = CliRunner()


def _cel(rule: str, value: str) -> bool:
    import cel

    return cel.evaluate(rule, {"self": {"source": value}}) is True


URL_RULE = urls.CLEAN_URL


@FUZZ
@given(credential_urls())
def test_fuzz_every_credential_shape_is_refused_and_redacted_by_the_one_rule(url):
    assert urls.url_problem(url) is not None, url
    assert re.fullmatch(URL_RULE, url) is None, url  # what the CRD's CEL rule matches
    assert PLANTED not in urls.redact(url), urls.redact(url)
    assert PLANTED not in urls.redact_text(f"failed: {url}: 403")
    assert PLANTED not in urls.scrub(f"denied {url.split('://', 1)[1]}", url)


@FUZZ
@given(clean_urls())
def test_fuzz_clean_urls_pass_unchanged(url):
    assert urls.url_problem(url) is None, url
    assert re.fullmatch(URL_RULE, url) is not None, url
    if "@" not in url:  # an @ in the path: redact hides what is before it, to be safe
        assert urls.redact(url) == url


@pytest.mark.parametrize("url", [*credential_url_shapes().values(), "https://h/m?download=1",
                                 "s3://b/x", "hf://Org/name", "file:///tmp/x", "https://h:443"])
def test_the_crd_cel_rule_agrees_with_the_python_rule(url):
    from kubetune.api.v1alpha1._base import url_rule

    rule = url_rule("source", "f", "s")
    assert _cel(rule.cel, url) == rule.check(type("O", (), {"source": url})()), url


# ------------------------------------------------------------------- every URL-valued field

def _set(spec: dict, field: str, value: str) -> None:
    """spec.a.b[0].c = value, creating what is missing."""
    node: dict = spec
    parts = field.removeprefix("spec.").split(".")
    for part in parts[:-1]:
        name, _, index = part.partition("[")
        node = node[name][int(index[:-1])] if index else node.setdefault(name, {})
    node[parts[-1]] = value


def _grpo(spec: dict) -> None:
    spec["stage"] = "grpo"
    spec["rewards"] = [{"type": "rewardModel", "source": "pvc://rm/model"},
                       {"type": "python", "function": "m:f", "path": "pvc://code/rewards"}]


# field → (scheme and host of its URL, what the message must name, how to prepare the spec)
URL_FIELDS = {
    "spec.model.source": ("https", "spec.model.source", None),
    "spec.datasets[0].source": ("https", "source", None),
    "spec.evalDatasets[0].source": ("s3", "source", "eval"),
    "spec.output.uri": ("s3", "spec.output.uri", None),
    "spec.training.tracking.uri": ("https", "training.tracking.uri", None),
    "spec.rewards[0].source": ("hf", "rewards[].source", "grpo"),
    "spec.rewards[1].path": ("https", "rewards[].path", "grpo"),
    "spec.evaluation.lmEval.include": ("gs", "evaluation.lmEval.include", "lmeval"),
}


def _job(field: str, value: str) -> dict:
    doc = base_job()
    spec = doc["spec"]
    prepare = URL_FIELDS[field][2] if field in URL_FIELDS else None
    if prepare == "eval":
        spec["evalDatasets"] = [{"source": "pvc://data/eval.json"}]
        spec["training"].pop("evalSplit", None)
    if prepare == "grpo":
        _grpo(spec)
    if prepare == "lmeval":
        spec["evaluation"] = {"lmEval": {"tasks": ["arc_easy"]}}
    _set(spec, field, value)
    return doc


CASES = [(field, shape, url) for field, (scheme, _, _) in URL_FIELDS.items()
         for shape, url in credential_url_shapes(
             "bucket-1" if scheme in ("s3", "gs") else "Org" if scheme == "hf" else
             "host.example", scheme).items()]
IMAGES = {"userinfo": f"user:{PLANTED}@registry.example/trainer:1",
          "userinfo-digest": f"u:{PLANTED}@registry.example/t@sha256:{'a' * 64}",
          "query": f"registry.example/trainer:1?token={PLANTED}",
          "pct": f"u%3A{PLANTED}%40registry.example/t:1"}
CASES += [(field, shape, image) for field in ("spec.trainer.image", "spec.serve.image")
          for shape, image in IMAGES.items()]
CASES += [("spec.output.uri", "file-userinfo", f"file://u:{PLANTED}@host/out")]


def _walk_messages(doc: dict, tmp_path) -> list[str]:
    """Every way a refusal reaches a person: parse_job, validate, render, the operator."""
    out = []
    with pytest.raises(KubetuneError) as err:
        parse_job(copy.deepcopy(doc))
    out.append(str(err.value))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    for args in (["validate", "--no-data", str(path)], ["validate", str(path)],
                 ["render", str(path)]):
        res = runner.invoke(app, args)
        assert res.exit_code != 0, (args, res.output)
        out.append(res.output)
    job, problem = cluster_validate(copy.deepcopy(doc))
    assert job is None and problem
    out.append(problem)
    return out


@pytest.mark.parametrize(("field", "shape", "value"), CASES,
                         ids=[f"{f}-{s}" for f, s, _ in CASES])
def test_a_planted_credential_is_refused_naming_the_field_and_never_printed(
        field, shape, value, tmp_path):
    doc = _job(field, value)
    if field == "spec.serve.image":
        doc["spec"]["serve"] = {"image": value}
    named = URL_FIELDS[field][1] if field in URL_FIELDS else field.removeprefix("spec.")
    for message in _walk_messages(doc, tmp_path):
        assert PLANTED not in message and PLANTED.lower() not in message.lower(), message
        assert named in " ".join(message.split()), (named, message)


def test_messages_that_quote_a_url_quote_it_redacted():
    from kubetune.jobfile import output_uri_problem
    from kubetune_trainer.storage import store_error

    bad = f"s3://u:{PLANTED}@bucket/out"
    assert PLANTED not in output_uri_problem(bad)
    assert PLANTED not in str(store_error(OSError(f"denied {bad}"), urls.redact(bad),
                                          field="f", secret_field=None))
    # a pattern mismatch quotes the redacted value
    doc = base_job()
    doc["spec"]["datasets"][0]["source"] = f"https://h/d.json?x={PLANTED} x"
    with pytest.raises(KubetuneError) as err:
        parse_job(doc)
    assert PLANTED not in str(err.value) and "spec.datasets[0].source" in str(err.value)


# ------------------------------------------------------------------- env values, serve.args

@FUZZ
@given(credential_env())
def test_fuzz_a_credential_in_trainer_env_is_refused_by_the_cli_and_the_crd(entry):
    doc = base_job()
    doc["spec"]["trainer"] = {"env": [entry]}
    with pytest.raises(KubetuneError) as err:
        parse_job(copy.deepcopy(doc))
    assert PLANTED not in str(err.value) and "trainer.env" in str(err.value)
    assert SERVER.verdict(doc["spec"]) is not None


ENV_CASES = [{"name": n, "value": PLANTED} for n in (
    "db.password", "S3_SECRETKEY", "GITHUB_PAT", "AZURE_STORAGE_CONNECTION_STRING", "hfToken2")]
ENV_CASES += [{"name": "SETTING", "value": v} for v in credential_values().values()]


@pytest.mark.parametrize("entry", ENV_CASES, ids=[e["name"] + "=" + e["value"][:12]
                                                  for e in ENV_CASES])
def test_a_credential_in_trainer_env_is_never_printed_on_any_message_path(entry, tmp_path):
    doc = base_job()
    doc["spec"]["trainer"] = {"env": [entry]}
    for message in _walk_messages(doc, tmp_path):
        assert PLANTED not in message and "trainer.env" in message, message


@pytest.mark.parametrize("shape", sorted(credential_values()))
def test_a_credential_in_serve_args_is_refused_naming_the_field(shape, tmp_path):
    value = credential_values()[shape]
    doc = base_job()
    doc["spec"]["serve"] = {"args": ["--max-model-len", "4096", value]}
    for message in _walk_messages(doc, tmp_path):
        assert PLANTED not in message and "serve.args" in message, message
    assert SERVER.verdict(doc["spec"]) is not None


@pytest.mark.parametrize("value", ["offline", "/mnt/pvc/cache/my_experiment_run_2024", "0,1",
                                   "expandable_segments:True", "https://mirror.example/hub",
                                   "meta-llama/Llama-3.1-8B-Instruct", "--tokenizer=x"])
def test_ordinary_values_pass(value):
    doc = base_job()
    doc["spec"]["trainer"] = {"env": [{"name": "SETTING", "value": value}]}
    doc["spec"]["serve"] = {"args": [value]}
    parse_job(copy.deepcopy(doc))
    assert SERVER.verdict(doc["spec"]) is None


def test_plain_env_values_and_serve_args_stay_out_of_the_config_map():
    from kubetune_operator import builders

    doc = base_job()
    doc["spec"]["trainer"] = {"env": [
        {"name": "MODE", "value": "plain-Setting-1"},
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "w", "key": "k"}}}]}
    doc["spec"]["serve"] = {"args": ["--max-model-len", "4096"]}
    job = parse_job(doc)
    text = builders.config_map(job=job)["data"]["job.yaml"]
    assert "plain-Setting-1" not in text and "max-model-len" not in text
    again = parse_job(yaml.safe_load(text))  # the trainer still reads it
    assert again.spec.trainer.env[0].name == "WANDB_API_KEY"
