"""Numbers too long to read, keys that are not strings, and --no-data: one line naming the
field, no raw exception, no network."""

from __future__ import annotations

import time

import pytest
import yaml
from fuzz_jobs import base_job
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
