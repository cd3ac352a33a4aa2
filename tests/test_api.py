"""The API models, the generated CRD, and the messages a user gets for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from kubetune.api import v1alpha1 as api
from kubetune.api.crd import finetunejob_crd, finetunesweep_crd, render_yaml
from kubetune.errors import KubetuneError
from kubetune.jobfile import load_job, parse_job

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "kubetune.io_finetunejobs.yaml"

FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const", "discriminator",
             "uniqueItems", "default", "examples", "prefixItems"}


def test_committed_crd_matches_the_models():
    assert CRD_FILE.read_text() == render_yaml(), "crds/ drifted from the models: run make crds"


def test_committed_sweep_crd_matches_the_models():
    assert (REPO / "crds" / "kubetune.io_finetunesweeps.yaml").read_text() == render_yaml(
        api.SWEEP_KIND), "crds/ drifted from the models: run make crds"


def _walk(node, path="$"):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


@pytest.mark.parametrize("crd", [finetunejob_crd, finetunesweep_crd])
def test_crd_schema_is_structural(crd):
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
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
    columns = {c["name"]: c for c in version["additionalPrinterColumns"] if not c.get("priority")}
    assert list(columns) == ["Phase", "Step", "Progress", "Loss", "ETA", "Age"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    for c in columns.values():  # each column reads a field the status really has
        node = version["schema"]["openAPIV3Schema"]
        for part in c["jsonPath"].strip(".").split("."):
            node = node["properties"][part] if part != "metadata" else {"properties": {
                "creationTimestamp": {}}}
        assert node is not None, c
    assert "steps" in status["properties"]["progress"]["properties"]
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
         "method.lora is only used when method.type is lora"),
        ({"method": {"type": "full"}, "output": {"uri": "o", "merge": True}},
         "output.merge needs method.type lora"),
        ({"training": {"batchSizePerDevice": 0}},
         "spec.training.batchSizePerDevice: Input should be greater than or equal to 1"),
        ({"training": {"evalSteps": 10}}, "training.evalSteps needs held-out rows to evaluate"),
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
    assert immutable == ["spec.method.type", "spec.model.fromJob", "spec.model.source",
                         "spec.output.uri",
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


# ------------------------------------------------------------------ as the API server reads


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        # snake_case is not the API's name: the server drops it, so the CLI refuses it
        ({"model": {"source": "hf://a/b", "secret_ref": {"name": "t"}}},
         "spec.model.secret_ref: unknown field"),
        ({"training": {"max_steps": 3}}, "spec.training.max_steps: unknown field"),
        # no coercion
        ({"training": {"maxSteps": "3"}}, "spec.training.maxSteps: Input should be a valid "
         "integer"),
        ({"output": {"uri": "o", "merge": "yes"}}, "spec.output.merge: Input should be a valid "
         "boolean"),
        ({"output": {"uri": "o", "merge": 1}}, "spec.output.merge: Input should be a valid "
         "boolean"),
        ({"training": {"seed": True}}, "spec.training.seed: Input should be a valid integer"),
        # numbers that JSON, int64 or a run cannot hold
        ({"training": {"maxSteps": 2**64}}, "spec.training.maxSteps: Input should be less"),
        ({"training": {"epochs": float("inf")}}, "spec.training.epochs: Input should be a "
         "finite number"),
        ({"training": {"weightDecay": float("nan")}}, "finite number"),
        ({"training": {"seed": -1}}, "spec.training.seed: Input should be greater than or "
         "equal to 0"),
        ({"training": {"seed": 2**32}}, "spec.training.seed: Input should be less than or "
         "equal to 4294967295"),
        ({"training": {"epochs": 1e9}}, "spec.training.epochs: Input should be less than or "
         "equal to 1000"),
        ({"training": {"weightDecay": 1e6}}, "spec.training.weightDecay: Input should be less"),
        ({"training": {"cutoffLen": 10**9}}, "spec.training.cutoffLen: Input should be less"),
        ({"training": {"cutoffLen": 262144, "packing": True}},
         "training.cutoffLen with packing is at most 131072"),
        # explicit {} counts as set, as CEL's has() says
        ({"datasets": [{"source": "r/dataset_info.json", "entries": ["a"], "columns": {}}]},
         "entries picks data sets from a dataset_info.json registry"),
        # patterns with the same meaning in Python and RE2
        ({"model": {"source": "hf://a/b\u00a0c"}}, "is not a source kubetune knows"),
        ({"model": {"source": "pvc://Bad_Claim/m"}}, "is not a source kubetune knows"),
        ({"output": {"uri": "pvc://" + "a" * 70 + "/o"}}, "is not a volume claim name"),
        ({"template": "vicuna"}, "spec.template: Input should be 'auto', 'chatml', 'llama3' "
         "or 'alpaca'"),
        ({"datasets": [{"source": "d.json", "revision": "main\x07"}]},
         "spec.datasets[0].revision: 'main\\x07' does not match"),
        ({"trainer": {"serviceAccountName": "Trainer_SA"}},
         "spec.trainer.serviceAccountName: 'Trainer_SA' does not match"),
        ({"scheduling": {"priorityClassName": "high priority"}}, "does not match"),
        ({"scheduling": {"nodeSelector": {"gpu": "a" * 64}}}, "spec.scheduling.nodeSelector.gpu"),
        ({"scheduling": {"nodeSelector": {"bad key!": "x"}}},
         "scheduling.nodeSelector: each key must be a label key"),
        ({"scheduling": {"tolerations": [{"effect": "NoSchedule"}]}},
         "a toleration without key needs operator Exists"),
        ({"model": {"source": "hf://a/b", "secretRef": {"name": "HF Token"}}},
         "spec.model.secretRef.name: 'HF Token' does not match"),
        # credentials in URLs
        ({"datasets": [{"source": "https://me:hunter2@example.com/d.json"}]},
         "datasets[].source: a user name, password or token in the URL"),
        ({"model": {"source": "https://example.com/m?token=abc"}},
         "spec.model.source: a user name, password or token in the URL"),
        ({"datasets": [{"source": "s3://b/d.json?X-Amz-Signature=abc"}]},
         "put it in a Secret and name it in datasets[].secretRef"),
    ],
)
def test_what_the_cluster_refuses_the_cli_refuses(spec, message):
    with pytest.raises(KubetuneError) as err:
        parse_job(_job(**spec))
    assert message in str(err.value)


def test_explicit_null_means_unset_as_on_the_api_server():
    job = parse_job(_job(training={"maxSteps": None, "epochs": None}, scheduling=None,
                         datasets=[{"source": "r/dataset_info.json", "entries": ["a"],
                                    "format": None, "columns": None}]))
    assert job.spec.training.max_steps is None and job.spec.training.epochs == 3.0
    assert job.spec.datasets[0].format is None
    with pytest.raises(KubetuneError, match="unknown field 'maxStep'"):
        parse_job(_job(training={"maxStep": None}))  # an unknown field stays unknown


def test_models_still_build_from_python_names():
    # Code builds models by field name; only user documents are held to the camelCase names.
    spec = api.DatasetSpec(source="d.json", max_samples=3)
    assert spec.max_samples == 3
    assert api.TrainingSpec(epochs=1).epochs == 1.0


def test_metadata_labels_and_namespace_follow_kubernetes_rules():
    doc = _job()
    doc["metadata"]["labels"] = {"team": "a b"}
    with pytest.raises(KubetuneError, match="metadata.labels.team: 'a b' is not a label value"):
        parse_job(doc)
    doc["metadata"] = {"name": "j", "namespace": "Team_A"}
    with pytest.raises(KubetuneError, match="metadata.namespace"):
        parse_job(doc)


def test_templates_are_the_ones_the_trainer_ships():
    from kubetune_trainer.data.templates import NAMED_TEMPLATES

    assert set(api.TEMPLATES) == {"auto", *NAMED_TEMPLATES}


# ------------------------------------------------------------------ trainer.env and secrets


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ([{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "t", "key": "k"}}}],
         "are set by kubetune and cannot be overridden"),
        ([{"name": "KUBEFLOW_TRAINER_SERVER_URL", "value": "https://evil.example"}],
         "are set by kubetune and cannot be overridden"),
        ([{"name": "PET_NNODES", "value": "4"}], "cannot be overridden"),
        ([{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}],
         "must come from a Secret: use valueFrom"),
        ([{"name": "WANDB_API_KEY", "value": "abc"}], "must come from a Secret"),
        ([{"name": "DB_PASSWORD", "value": "abc"}], "must come from a Secret"),
        ([{"name": "GITHUB_TOKEN", "value": "abc"}], "must come from a Secret"),
        ([{"name": "9LIVES", "value": "x"}], "spec.trainer.env[0].name: '9LIVES' does not match"),
        ([{"name": "A B", "value": "x"}], "does not match"),
        ([{"name": "X"}], "give each variable either value or valueFrom.secretKeyRef"),
        ([{"name": "X", "value": "1"}, {"name": "X", "value": "2"}], "X given more than once"),
        ({"X": "1"}, "spec.trainer.env: Input should be a valid list"),
    ],
)
def test_trainer_env_refusals_point_to_the_fix(env, message):
    with pytest.raises(KubetuneError) as err:
        parse_job(_job(trainer={"env": env}))
    assert message in str(err.value)


@pytest.mark.parametrize("name", ["AWS_ACCESS_KEY_ID", "TOKENIZERS_CACHE_X", "MAX_TOKENS",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "SSL_KEY_FILE",
                                  "WANDB_PROJECT", "my.var-1"])
def test_ordinary_names_take_plain_values(name):
    job = parse_job(_job(trainer={"env": [{"name": name, "value": "x"}]}))
    assert job.spec.trainer.env[0].value == "x"


# ------------------------------------------------------------------ the loader


def _write(tmp_path, data: bytes, name="job.yaml"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_loader_refuses_non_utf8_with_the_file_and_place(tmp_path):
    path = _write(tmp_path, yaml.safe_dump(_job()).replace("j\n", "j\xe9\n").encode("latin-1"))
    with pytest.raises(KubetuneError, match=r"job.yaml: not UTF-8 text \(byte \d+, line \d+\)"):
        load_job(path)


def test_loader_bounds_size_and_depth(tmp_path):
    with pytest.raises(KubetuneError, match="larger than 1024 KiB"):
        load_job(_write(tmp_path, b"#" * (1024 * 1024 + 1)))
    with pytest.raises(KubetuneError, match="nested more than 32 levels deep"):
        load_job(_write(tmp_path, b"a: " + b"[" * 500 + b"]" * 500))


def test_loader_refuses_aliases_fast(tmp_path):
    import time

    from fuzz_jobs import alias_bomb

    start = time.monotonic()
    with pytest.raises(KubetuneError, match="line 1, column 4: YAML anchors and aliases"):
        load_job(_write(tmp_path, alias_bomb().encode()))
    assert time.monotonic() - start < 0.5
    with pytest.raises(KubetuneError, match="anchors and aliases"):
        load_job(_write(tmp_path, b"a: &l [*l]\n"))


def test_loader_refuses_duplicate_keys_and_keeps_dates_as_text(tmp_path):
    text = yaml.safe_dump(_job(), sort_keys=False)
    with pytest.raises(KubetuneError, match="duplicate key 'kind'"):
        load_job(_write(tmp_path, (text + "kind: FineTuneJob\n").encode()))
    doc = _job(datasets=[{"source": "hf://a/b", "revision": "2024-01-01"}])
    text = yaml.safe_dump(doc).replace("'2024-01-01'", "2024-01-01")
    assert "revision: 2024-01-01\n" in text
    assert load_job(_write(tmp_path, text.encode())).spec.datasets[0].revision == "2024-01-01"


def test_loader_refuses_what_is_not_a_file(tmp_path):
    import os

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(KubetuneError, match="not a regular file"):
        load_job(fifo)


def test_loader_uses_libyaml_when_present():
    from kubetune import jobfile

    if getattr(yaml, "__with_libyaml__", False):
        assert issubclass(jobfile._JobLoader, yaml.CSafeLoader)


def test_every_field_of_the_api_has_a_description():
    """kubectl explain shows something for every field and block, never <empty>."""
    version = finetunejob_crd()["spec"]["versions"][0]
    missing = []

    def walk(node, path, is_field=True):
        # metadata: the API server refuses anything but its type (kubectl explains it itself)
        if is_field and path and path != "metadata" and not node.get("description"):
            missing.append(path)
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{path}.{key}" if path else key)
        if isinstance(node.get("items"), dict):
            walk(node["items"], path + "[]", is_field=False)

    walk(version["schema"]["openAPIV3Schema"], "")
    assert not missing, missing
