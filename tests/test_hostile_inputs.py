"""Numbers too long to read, keys that are not strings, and --no-data: one line naming the
field, no raw exception, no network."""

from __future__ import annotations

import os
import time

import pytest
import yaml
from fuzz_jobs import base_job
from hypothesis import given, settings
from hypothesis import strategies as st
from kubetune.cli import app
from kubetune.errors import KubetuneError
from kubetune.jobfile import load_job
from typer.testing import CliRunner

runner = CliRunner()


@pytest.mark.parametrize(("where", "text"), [
    ("spec.training.maxSteps", "    maxSteps: " + "9" * 5000),
    ("spec.training.learningRate", "    learningRate: 1." + "0" * 5000),
    ("spec.training.maxSteps", "    maxSteps: -" + "1" * 80),
])
def test_a_number_too_long_to_read_is_refused_naming_the_field(tmp_path, where, text):
    doc = yaml.safe_dump(base_job(), sort_keys=False).replace("  training:\n",
                                                               f"  training:\n{text}\n", 1)
    path = tmp_path / "job.yaml"
    path.write_text(doc)
    with pytest.raises(KubetuneError, match=f"{where}: a number of .* too long"):
        load_job(path)
    res = runner.invoke(app, ["validate", "--no-data", str(path)])
    assert res.exit_code == 2 and "Traceback" not in res.output and "ValueError" not in res.output


@pytest.mark.parametrize("key", ["1", "yes", "null", "1.5"])
def test_keys_that_are_not_strings_are_refused_with_the_line(tmp_path, key):
    doc = yaml.safe_dump(base_job(), sort_keys=False).replace("spec:\n", f"spec:\n  {key}: x\n")
    path = tmp_path / "job.yaml"
    path.write_text(doc)
    with pytest.raises(KubetuneError,
                       match="line [0-9]+, column 3: mapping keys must be plain strings"):
        load_job(path)


@pytest.mark.parametrize("source", ["https://127.0.0.1:9/m", "s3://bucket-1/m", "gs://b-1/x",
                                    "hf://Org/never-fetched"])
def test_no_data_never_touches_the_network(tmp_path, source):
    doc = base_job()
    doc["spec"]["model"] = {"source": source}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    start = time.monotonic()
    res = runner.invoke(app, ["validate", "--no-data", str(path)])
    assert res.exit_code == 0, res.output
    assert "not estimated" in res.output and time.monotonic() - start < 5


# ------------------------------------------------------------------ hf:// repository ids

@pytest.mark.parametrize("source", ["hf://-/-", "hf://a--b/c", "hf://org/name.git", "hf://org",
                                    "hf://.org/name", "hf://org/" + "n" * 97])
def test_an_hf_repo_id_the_hub_refuses_is_refused_alike_everywhere(tmp_path, source):
    from fuzz_jobs import Server
    from kubetune.api.crd import finetunejob_crd
    from kubetune.jobfile import parse_job
    from kubetune_operator.validation import validate as cluster_validate

    doc = base_job()
    doc["spec"]["model"] = {"source": source}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    messages = []
    for args in (["validate", "--no-data"], ["validate"], ["render"]):
        res = runner.invoke(app, [*args, str(path)])
        assert res.exit_code == 2, (args, res.output)
        messages.append(res.output)
    with pytest.raises(KubetuneError) as err:
        parse_job(doc)
    messages.append(str(err.value))
    messages.append(cluster_validate(doc)[1])
    messages.append(Server(finetunejob_crd()).verdict(doc["spec"]))
    for message in messages:
        assert "spec.model.source: an hf:// location is hf://ORG/NAME" in message, message
        assert "HFValidationError" not in message and "Traceback" not in message


_HF_PART = st.text("ab_-.", min_size=1, max_size=5) | st.sampled_from(["Qwen", "a" * 96,
                                                                     "a" * 97, "x.git"])


@settings(max_examples=int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "200")), deadline=None,
          derandomize=True, database=None)
@given(_HF_PART, _HF_PART, st.sampled_from(["", "/", "/x.json", "/.git"]))
def test_fuzz_hf_ids_the_rule_lets_through_the_hub_client_takes_and_cel_agrees(org, name, sub):
    import cel
    from huggingface_hub.utils import validate_repo_id
    from kubetune import urls
    from kubetune.api.v1alpha1._base import hf_rule

    value = f"hf://{org}/{name}{sub}"
    rule = hf_rule("source", "f")
    ours = not urls.hf_problem(value)
    assert (cel.evaluate(rule.cel, {"self": {"source": value}}) is True) == ours, value
    if ours:
        validate_repo_id(f"{org}/{name}")  # never an HFValidationError


# ------------------------------------------------------------------ integers bounded

def test_every_integer_of_the_spec_is_bounded_and_status_counts_are_not_negative():
    """Steps, ranks, counts, seconds, ids: each integer the user writes has a minimum and a
    maximum (a list of one-off bounds cannot keep up with new fields); what the operator
    writes (steps, generations, restarts) is never negative."""
    from kubetune.api.crd import finetunejob_crd

    root = finetunejob_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    found: dict[str, dict] = {}

    def walk(schema: dict, path: str) -> None:
        if schema.get("type") == "integer" and "enum" not in schema:
            found[path] = schema
        for key, sub in schema.get("properties", {}).items():
            walk(sub, f"{path}.{key}")
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], f"{path}[]")
        if isinstance(schema.get("additionalProperties"), dict):
            walk(schema["additionalProperties"], f"{path}{{}}")

    walk(root, "")
    spec = {p: s for p, s in found.items() if p.startswith(".spec.")}
    assert len(spec) > 30, sorted(spec)
    assert not [p for p, s in spec.items() if "minimum" not in s or "maximum" not in s]
    assert not [p for p, s in found.items() if "minimum" not in s]


def test_the_trainer_refuses_a_bad_hf_repo_id_itself(tmp_path):
    """A spec read without the models (an old ConfigMap): one line, not HFValidationError."""
    from kubetune.errors import SourceError
    from kubetune_trainer.config import RunContext
    from kubetune_trainer.sources import resolve

    with pytest.raises(SourceError, match="spec.model.source: an hf:// location"):
        resolve("hf://-/-", RunContext(cache_dir=tmp_path), field="spec.model.source")


# ------------------------------------------------------------------ a network that fails

@pytest.fixture
def closed_port():
    """A loopback port nothing listens on (bound, then let go)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["https", "gs", "s3"])
def test_a_network_failure_is_one_line_after_one_retry_in_seconds(tmp_path, monkeypatch,
                                                                  closed_port, scheme):
    """Validate with data reaches for the model: an unreachable host (here a closed loopback
    port; offline, no name resolves) is one line naming the field, after a second try."""
    endpoint = f"http://127.0.0.1:{closed_port}"
    source = {"https": f"https://127.0.0.1:{closed_port}/m", "gs": "gs://bucket-1/never",
              "s3": "s3://bucket-1/never"}[scheme]
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "d.json").write_text('[{"instruction": "q", "output": "a"}]')
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "net"},
           "spec": {"model": {"source": source}, "datasets": [{"source": "d.json"}],
                    "output": {"uri": "out"}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    start = time.monotonic()
    res = runner.invoke(app, ["validate", str(path)])
    took = time.monotonic() - start
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: spec.model.source: {source}: 127.0.0.1:{closed_port} cannot be "
                      "reached: [Errno 111] Connection refused (tried twice, 1 s apart, 5 s "
                      "each); check the network and proxy settings, or copy it to a pvc:// or "
                      "local path"], res.output
    assert "Traceback" not in res.output and 1 <= took < 10, took


def test_an_unreachable_hub_is_one_line_in_seconds(tmp_path, monkeypatch, closed_port):
    """hf:// is left to the Hub client (it falls back to its cache): still one line."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "d.json").write_text('[{"instruction": "q", "output": "a"}]')
    doc = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": "net"},
           "spec": {"model": {"source": "hf://Org/never-fetched"},
                    "datasets": [{"source": "d.json"}], "output": {"uri": "out"}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    start = time.monotonic()
    res = runner.invoke(app, ["validate", str(path)])
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert errors[0].startswith("error: spec.model.source: hf://Org/never-fetched is not in the "
                                "local cache and the Hub cannot be reached"), errors
    assert "Traceback" not in res.output and time.monotonic() - start < 10


# ------------------------------------------------------------------ a long single line

@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_a_line_longer_than_the_limit_is_refused_with_its_size_in_bounded_memory(
        tmp_path, monkeypatch, suffix):
    """KUBETUNE_MAX_LINE_MB (8 by default) lowered to 64 KiB: a 5 MB line is counted in
    pieces, never held (a 50 MB line took 6.5 GB to tokenize); lines up to the limit load."""
    import json
    import tracemalloc

    from kubetune.api.v1alpha1 import DatasetSpec
    from kubetune.errors import DataError
    from kubetune_trainer.config import RunContext
    from kubetune_trainer.data.loading import load_examples

    limit = 64 * 1024
    monkeypatch.setenv("KUBETUNE_MAX_LINE_MB", "0.0625")

    def write(name: str, lines: list[bytes]) -> str:
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(b"\n".join(lines) + b"\n")
        return str(path)

    def load(path: str):
        return load_examples([DatasetSpec(source=path)], "pt", RunContext(),
                             max_invalid_fraction=1.0)

    ok = json.dumps({"text": "x" * (limit - 12)}).encode() if suffix == ".jsonl" else \
        b"x" * limit
    assert len(ok) <= limit
    fits = write("fits", [b'{"text": "a"}' if suffix == ".jsonl" else b"a", ok])
    examples, _ = load(fits)
    assert len(examples) == 2
    big = 5 * 1024 * 1024
    long = write("long", [ok, b"y" * big, ok])
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as err:
            load(long)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"long{suffix}: line 2 is {big:,} bytes, longer than a row may be ({limit:,} bytes, " \
           "KUBETUNE_MAX_LINE_MB=0.0625); it was not read" in str(err.value)
    assert peak < big / 5, peak  # about 0.4 MB here
    monkeypatch.setenv("KUBETUNE_MAX_LINE_MB", "0")
    with pytest.raises(DataError, match="KUBETUNE_MAX_LINE_MB='0' is not a size"):
        load(fits)


@pytest.mark.parametrize("uri", ["gs://bucket-1/out", "s3://bucket-1/out"])
def test_an_unreachable_output_store_is_one_line_in_seconds(monkeypatch, closed_port, uri):
    from kubetune.errors import OutputError
    from kubetune.jobfile import parse_job
    from kubetune_trainer.storage import Store

    endpoint = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    doc = base_job()
    doc["spec"]["output"] = {"uri": uri}
    store = Store.for_output(parse_job(doc).spec)
    start = time.monotonic()
    with pytest.raises(OutputError) as err:
        store.check()
    assert str(err.value) == (f"spec.output.uri: {uri}: 127.0.0.1:{closed_port} cannot be "
                              "reached: [Errno 111] Connection refused (tried twice, 1 s apart, "
                              "5 s each); check the network and proxy settings")
    assert time.monotonic() - start < 10
