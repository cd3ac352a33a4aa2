"""The API models, the generated CRD, and the messages a user gets for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubetune.api import v1alpha1 as api
from kubetune.api.crd import finetunejob_crd, render_yaml
from kubetune.errors import KubetuneError
from kubetune.jobfile import load_job, parse_job

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "kubetune.io_finetunejobs.yaml"

FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const", "discriminator",
             "uniqueItems", "default", "examples", "prefixItems"}


def test_committed_crd_matches_the_models():
    assert CRD_FILE.read_text() == render_yaml(), "crds/ drifted from the models: run make crds"


def _walk(node, path="$"):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def test_crd_schema_is_structural():
    schema = finetunejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        # "properties" maps field names; those names are not schema keywords.
        if path.endswith(".properties"):
            continue
        bad = FORBIDDEN & set(node)
        assert not bad, f"{path} has {bad}"
        assert node.get("additionalProperties") is not False, path
        if "properties" in node or "items" in node:
            assert node.get("type") in ("object", "array"), f"{path} lacks a type"
        if "nullable" in node or "description" in node or "minimum" in node:
            assert "type" in node or "x-kubernetes-preserve-unknown-fields" in node, path


def test_crd_carries_cel_rules_and_printer_columns():
    crd = finetunejob_crd()
    version = crd["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert any("output.merge" in r for r in rules)
    method = spec["properties"]["method"]
    assert {r["message"] for r in method["x-kubernetes-validations"]} == {
        r.message for r in api.ALL_RULES["spec.method"]}
    assert [c["name"] for c in version["additionalPrinterColumns"]][:3] == [
        "Phase", "Progress", "Loss"]
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    assert version["subresources"] == {"status": {}}
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"][
        "conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def _job(**spec):
    base = {"model": {"source": "embedded://smollm2-135m-instruct"},
            "datasets": [{"source": "data/identity.json"}], "output": {"uri": "out"}}
    base.update(spec)
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "j"}, "spec": base}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"trainng": {}}, "spec.trainng: unknown field 'trainng'"),
        ({"training": {"learningRat": 1e-4}}, "spec.training.learningRat: unknown field"),
        ({"stage": "sfft"}, "spec.stage: 'sfft' is not allowed; expected 'pt', 'sft'"),
        ({"method": {"type": "full", "lora": {"rank": 8}}},
         "method.lora is only used when method.type is lora or qlora"),
        ({"method": {"type": "full"}, "output": {"uri": "o", "merge": True}},
         "output.merge needs method.type lora or qlora"),
        ({"training": {"batchSizePerDevice": 0}},
         "spec.training.batchSizePerDevice: Input should be greater than or equal to 1"),
        ({"training": {"evalSteps": 10}}, "training.evalSteps needs training.evalSplit > 0"),
        ({"resources": {"nodes": 2, "gpusPerNode": 0}}, "resources.nodes > 1 needs"),
        ({"datasets": []}, "spec.datasets: List should have at least 1 item"),
        ({"model": {"source": "ftp://x/y"}}, "spec.model.source: 'ftp://x/y' is not a source"),
        ({"datasets": [{"source": "d/dataset_info.json", "entries": ["a"], "format": "alpaca"}]},
         "entries picks data sets from a dataset_info.json registry"),
    ],
)
def test_bad_input_names_the_field(spec, message):
    with pytest.raises(KubetuneError) as err:
        parse_job(_job(**spec))
    assert message in str(err.value)


def test_rules_have_python_checks_that_agree_with_their_messages():
    # Every CEL rule in the CRD has the same message as the Python check that enforces it.
    crd_rules = {
        r["message"] for _, node in _walk(finetunejob_crd())
        for r in node.get("x-kubernetes-validations", []) if "oldSelf" not in r["rule"]}
    py_rules = {r.message for rules in api.ALL_RULES.values() for r in rules}
    assert crd_rules == py_rules


def test_defaults_are_applied_by_the_models():
    spec = parse_job(_job()).spec
    assert spec.stage == "sft" and spec.method.type == "lora"
    assert spec.method.lora_or_default().target_modules == ["all-linear"]
    assert spec.training.max_invalid_fraction == 0.01


@pytest.mark.parametrize("path", sorted((REPO / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_examples_are_valid(path):
    job = load_job(path)
    assert job.kind == "FineTuneJob"


def test_load_job_errors(tmp_path):
    with pytest.raises(KubetuneError, match="no such file"):
        load_job(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed")
    with pytest.raises(KubetuneError, match="not valid YAML"):
        load_job(bad)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"kind": "ConfigMap"}))
    with pytest.raises(KubetuneError, match="expected exactly one FineTuneJob, found 0"):
        load_job(other)


def test_identity_fields_are_immutable_but_suspend_is_not():
    schema = finetunejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    immutable = sorted(
        path.removeprefix("$.properties.").replace(".properties.", ".")
        for path, node in _walk(schema)
        for r in node.get("x-kubernetes-validations", []) if r["rule"] == "self == oldSelf")
    assert immutable == ["spec.method.type", "spec.model.source", "spec.output.uri",
                         "spec.resources.gpusPerNode", "spec.resources.nodes", "spec.stage"]
    assert "x-kubernetes-validations" not in schema["properties"]["spec"]["properties"][
        "suspend"]


@pytest.mark.parametrize("name", ["Upper", "9lives", "a" * 51, "trailing-"])
def test_job_names_that_would_break_the_pytorchjob_are_refused(name):
    doc = _job()
    doc["metadata"]["name"] = name
    with pytest.raises(KubetuneError, match="metadata.name must be at most 50"):
        parse_job(doc)


def test_name_rule_in_cel_agrees():
    import cel

    rule = api.ALL_RULES["metadata"][0]
    for name, ok in [("ident", True), ("a" * 50, True), ("a" * 51, False), ("Bad", False),
                     ("x-", False)]:
        assert cel.evaluate(rule.cel, {"self": {"metadata": {"name": name}}}) is ok, name
