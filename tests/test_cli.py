"""The kubetune command as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LF_DATA, QWEN2_72B, tiny_spec, write_job
from kubetune.cli import app
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_validate_a_good_job_checks_the_data_too(tiny_model, tmp_path, lf_data):
    job = write_job(tmp_path / "j.yaml", tiny_spec(
        tiny_model, [{"source": str(LF_DATA / "dataset_info.json"),
                      "entries": ["alpaca_en_demo", "glaive_toolcall_en_demo"]}],
        tmp_path / "out"))
    res = runner.invoke(app, ["validate", str(job)])
    assert res.exit_code == 0, res.output
    assert "schema and rules OK" in res.output
    assert "1299 of 1299 rows usable" in res.output
    assert "memory: about " in res.output and "GiB per GPU" in res.output
    assert "template renders" in res.output
    assert not (tmp_path / "out").exists()  # validate writes nothing


def test_validate_names_the_bad_field(tmp_path):
    job = write_job(tmp_path / "j.yaml", {"model": {"source": "m"}, "datasets": [
        {"source": "d.json", "fromat": "alpaca"}], "output": {"uri": "o"}})
    res = runner.invoke(app, ["validate", str(job)])
    assert res.exit_code == 2
    assert "spec.datasets[0].fromat: unknown field 'fromat'; did you mean 'format'?" in res.output


def test_validate_reports_bad_data(tmp_path, tiny_model):
    (tmp_path / "d.json").write_text(json.dumps([{"instruction": "only a question"}]))
    job = write_job(tmp_path / "j.yaml", tiny_spec(tiny_model, [{"source": "d.json"}],
                                                   tmp_path / "out"))
    res = runner.invoke(app, ["validate", str(job)])
    assert res.exit_code == 2
    assert "does not end with an assistant turn" in res.output


def test_run_prints_where_everything_went(tiny_model, tmp_path, lf_data):
    job = write_job(tmp_path / "j.yaml", tiny_spec(
        tiny_model, [{"source": str(LF_DATA / "identity.json")}], "out",
        training={"maxSteps": 2, "saveSteps": 2}))
    res = runner.invoke(app, ["run", str(job)])
    assert res.exit_code == 0, res.output
    assert "done in" in res.output and "adapter" in res.output
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()


def test_crds_prints_the_committed_crd():
    res = runner.invoke(app, ["crds"])
    assert res.exit_code == 0
    assert res.output == (REPO / "crds" / "kubetune.io_finetunejobs.yaml").read_text()


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from kubetune.cli import app; "
            "CliRunner().invoke(app, ['--help']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False"


def test_render_prints_the_children_the_operator_would_create():
    import yaml

    res = runner.invoke(app, ["render", str(REPO / "examples" / "assistant-identity.yaml"),
                              "-n", "ml", "--image", "reg/trainer:1"])
    assert res.exit_code == 0, res.output
    docs = list(yaml.safe_load_all(res.stdout))  # the objects; notes go to stderr
    # The pre-flight Job (a GPU job: checked on CPU first), then the training object.
    assert [d["kind"] for d in docs] == ["ConfigMap", "Job", "PyTorchJob"]
    assert all(d["metadata"]["namespace"] == "ml" for d in docs)
    assert docs[1]["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "kubetune-preflight"]
    master = docs[2]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert master["containers"][0]["image"] == "reg/trainer:1"


def test_render_refuses_what_the_operator_would_refuse():
    res = runner.invoke(app, ["render", str(REPO / "examples" / "identity.yaml")])
    assert res.exit_code == 2
    assert "spec.datasets[0].source: 'data/identity.json' is a local path" in res.output


def test_render_accepts_every_implemented_stage_and_refuses_a_planned_one(tmp_path):
    import yaml
    from kubetune.api.stages import IMPLEMENTED_STAGES, STAGES

    doc = yaml.safe_load((REPO / "examples" / "assistant-dpo.yaml").read_text())
    for stage in STAGES:
        doc["spec"]["stage"] = stage
        doc["spec"].pop("preference", None)
        if stage == "grpo":
            doc["spec"]["rewards"] = [{"type": "exactMatch", "column": "answer"}]
        else:
            doc["spec"].pop("rewards", None)
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(doc))
        res = runner.invoke(app, ["render", str(path)])
        if stage in IMPLEMENTED_STAGES:
            assert res.exit_code == 0, res.output
            cm = next(yaml.safe_load_all(res.stdout))
            assert f"stage: {stage}" in next(iter(cm["data"].values()))
        else:
            assert res.exit_code == 2
            assert f"spec.stage: {stage} is not available in this version" in res.output


def test_validate_reads_preference_data_and_counts_bad_pairs(tmp_path, tiny_model):
    rows = [{"prompt": f"Q{i}", "chosen": "Yes.", "rejected": "No."} for i in range(10)]
    rows.append({"prompt": "Q", "chosen": "Same.", "rejected": "Same."})
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    job = write_job(tmp_path / "j.yaml", tiny_spec(
        tiny_model, [{"source": "pairs.json"}], tmp_path / "out", stage="dpo",
        training={"maxInvalidFraction": 0.2, "cutoffLen": 64}))
    res = runner.invoke(app, ["validate", str(job)])
    assert res.exit_code == 0, res.output
    assert "10 of 11 rows usable" in res.output
    assert "chosen and rejected are the same answer" in res.output
    assert "stage dpo: the first 11 rows give 10 training rows" in res.output


def test_examples_say_truly_whether_a_cluster_takes_them():
    """An example whose header offers `kubectl apply` renders for a cluster; the others
    say they are local."""
    for path in sorted((REPO / "examples").glob("*.yaml")):
        header = "".join(line for line in path.read_text().splitlines(keepends=True)
                         if line.startswith("#"))
        res = runner.invoke(app, ["render", str(path)])
        if "kubectl apply" in header:
            assert res.exit_code == 0, (path.name, res.output)
        else:
            assert res.exit_code == 2 and "local" in header, path.name


def test_status_without_a_kubeconfig_says_what_is_missing_in_one_line(tmp_path, monkeypatch):
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    res = runner.invoke(app, ["status", "my-job"])
    assert res.exit_code == 2
    assert res.output.splitlines() == [
        f"error: no Kubernetes configuration: KUBECONFIG is not set and {tmp_path}/.kube/config "
        "does not exist (and not running in a cluster)"]

    (tmp_path / "broken").write_text("clusters: [")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "broken"))
    res = runner.invoke(app, ["status", "my-job"])
    assert res.exit_code == 2
    assert len(res.output.splitlines()) == 1
    assert res.output.startswith(f"error: cannot use KUBECONFIG={tmp_path}/broken: ")


def test_an_unexpected_error_is_one_line_and_the_traceback_goes_to_a_log(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "cache"))
    res = runner.invoke(app, ["crds", "--out", str(tmp_path / "no" / "such" / "dir.yaml")])
    assert res.exit_code == 1
    first, second = res.output.splitlines()
    assert first == ("error: FileNotFoundError: [Errno 2] No such file or directory: "
                     f"'{tmp_path}/no/such/dir.yaml'")
    log = Path(second.removeprefix("  the full traceback is in "))
    assert log.parent == tmp_path / "cache" / "kubetune" / "logs"
    text = log.read_text()
    assert text.startswith("kubetune ") and "Traceback (most recent call last)" in text
    assert "FileNotFoundError" in text


def test_misspelled_and_snake_case_keys_get_a_suggestion(tmp_path):
    import yaml

    doc = yaml.safe_load((REPO / "examples" / "assistant-dpo.yaml").read_text())
    doc["spec"]["trainig"] = doc["spec"].pop("training")
    doc["spec"]["model"]["secret_ref"] = doc["spec"]["model"].pop("secretRef")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2
    assert "spec.trainig: unknown field 'trainig'; did you mean 'training'?" in res.output
    assert "spec.model.secret_ref: unknown field 'secret_ref'; did you mean 'secretRef'?" in \
        res.output


def test_init_writes_starters_that_validate_and_render(tmp_path, monkeypatch):
    from kubetune.cli import STARTER_HELP

    monkeypatch.chdir(tmp_path)
    for kind in STARTER_HELP:
        out = tmp_path / kind / "finetune.yaml"
        out.parent.mkdir()
        res = runner.invoke(app, ["init", kind, "--out", str(out)])
        assert res.exit_code == 0, res.output
        text = out.read_text()
        assert text.startswith("# ") and "kind: FineTuneJob" in text  # commented, a job
        if kind == "local":  # runs as written: its data is there and validates
            assert (out.parent / "data.json").exists()
            res = runner.invoke(app, ["validate", str(out), "--no-data"])
        else:  # a cluster job: what the operator would create
            res = runner.invoke(app, ["render", str(out)])
        assert res.exit_code == 0, (kind, res.output)
    again = runner.invoke(app, ["init", "local", "--out", str(tmp_path / "local" /
                                                            "finetune.yaml")])
    assert again.exit_code == 2 and "already exist" in again.output
    assert runner.invoke(app, ["init", "nope"]).exit_code == 2


def test_run_in_a_log_prints_one_line_per_step_and_no_library_noise(tiny_model, tmp_path):
    """What a pod log or CI shows (no terminal): our lines, not progress bars or warnings."""
    import subprocess
    import sys

    job = write_job(tmp_path / "j.yaml", tiny_spec(
        tiny_model, [{"source": str(LF_DATA / "identity.json")}], tmp_path / "out",
        training={"maxSteps": 4, "logSteps": 1}))
    proc = subprocess.run([sys.executable, "-m", "kubetune.cli", "run", str(job)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("step ")] == [
        "1/4", "2/4", "3/4", "4/4"]
    for noise in ("Loading weights", "Writing model", "it/s]", "FutureWarning", "[WARNING]",
                  "{'loss'", "Adding EOS", "[transformers]"):
        assert not any(noise in line for line in lines), (noise, lines)
    assert any(line.startswith("done in ") for line in lines)


def test_ask_in_a_pipe_prints_the_answer_and_no_library_noise(tiny_model):
    """`kubetune ask` (not on a terminal): no "Loading weights" bar, no DeepSpeed notice."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "kubetune.cli", "ask", str(tiny_model),
                           "Who are you?", "--max-new-tokens", "4"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for noise in ("Loading weights", "it/s]", "Setting accelerator", "[WARNING]"):
        assert noise not in proc.stderr, (noise, proc.stderr)


def test_run_on_a_terminal_shows_the_bar_without_raw_log_dicts(tiny_model, tmp_path):
    import shutil
    import subprocess
    import sys

    if shutil.which("script") is None:
        pytest.skip("needs util-linux `script` for a pseudo-terminal")
    job = write_job(tmp_path / "j.yaml", tiny_spec(
        tiny_model, [{"source": str(LF_DATA / "identity.json")}], tmp_path / "out",
        training={"maxSteps": 4, "logSteps": 1}))
    log = tmp_path / "tty.log"
    command = f"stty cols 120 rows 40; {sys.executable} -m kubetune.cli run {job}"
    proc = subprocess.run(["script", "-qec", command, str(log)], capture_output=True,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, log.read_text()[-2000:]
    screen = log.read_text(errors="replace")
    assert "4/4 [" in screen  # transformers' bar reached the last step
    for noise in ("{'loss'", "{'train_runtime'", "FutureWarning", "[WARNING]"):
        assert noise not in screen, noise


def test_the_pipeline_example_renders_and_its_later_jobs_name_the_first(tmp_path):
    import yaml

    folder = REPO / "examples" / "pipeline"
    names = {}
    for path in sorted(folder.glob("*.yaml")):
        res = runner.invoke(app, ["render", str(path)])
        assert res.exit_code == 0, (path.name, res.output)
        doc = yaml.safe_load(path.read_text())
        names[doc["metadata"]["name"]] = doc["spec"]["model"].get("fromJob")
    assert names == {"assistant-sft": None, "assistant-dpo": "assistant-sft",
                     "assistant-grpo": "assistant-sft"}


def _big_job(tmp_path, tiny_model, **resources):
    """The issue's example: Qwen2-72B (its config.json, with the tiny model's tokenizer: no
    weights are read), full fine-tune, batch 64 × 32k tokens, one GPU."""
    import shutil

    model = tmp_path / "qwen2-72b"
    model.mkdir()
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, model / f.name)
    (model / "config.json").write_text(json.dumps(QWEN2_72B))
    return write_job(tmp_path / "big.yaml", tiny_spec(
        model, [{"source": str(LF_DATA / "identity.json")}], tmp_path / "out",
        method={"type": "full"}, resources={"gpusPerNode": 1, **resources},
        training={"batchSizePerDevice": 64, "cutoffLen": 32768}))


@pytest.mark.usefixtures("lf_data")
def test_validate_refuses_a_job_that_cannot_fit_its_gpu(tmp_path, tiny_model):
    job = _big_job(tmp_path, tiny_model, gpuMemory="80Gi")
    for args in ([], ["--no-data"]):
        res = runner.invoke(app, ["validate", str(job), *args])
        assert res.exit_code == 2, res.output
        assert "spec.resources: about " in res.output and "does not fit in 80 GiB" in res.output
        assert "cheapest fixes: training.gradientCheckpointing: true → " in res.output
    # Without resources.gpuMemory: --gpu-memory (the chart's value for the GPU type) decides.
    (tmp_path / "b").mkdir()
    job = _big_job(tmp_path / "b", tiny_model)
    res = runner.invoke(app, ["validate", str(job), "--no-data"])
    assert res.exit_code == 0 and "the GPU's memory is unknown" in res.output, res.output
    res = runner.invoke(app, ["validate", str(job), "--no-data", "--gpu-memory", "141Gi"])
    assert res.exit_code == 2 and "does not fit in 141 GiB" in res.output, res.output
    res = runner.invoke(app, ["estimate", str(job), "--gpu-memory", "80"])
    assert res.exit_code == 2 and "activations" in res.output, res.output


def test_render_refuses_what_the_operator_would_refuse_for_memory(tmp_path, hub):
    import yaml

    doc = yaml.safe_load((REPO / "examples" / "assistant-identity.yaml").read_text())
    doc["spec"].update(model={"source": "hf://Qwen/Qwen2-72B"}, method={"type": "full"},
                       output={"uri": "pvc://outputs/big"},
                       training={"batchSizePerDevice": 64, "cutoffLen": 32768},
                       resources={"gpusPerNode": 1, "gpuMemory": "80Gi"})
    job = tmp_path / "big.yaml"
    job.write_text(yaml.safe_dump(doc))
    res = runner.invoke(app, ["render", str(job)])
    assert res.exit_code == 2 and "does not fit in 80 GiB" in res.output, res.output
    assert "kind: PyTorchJob" not in res.output
    doc["spec"]["resources"] = {"nodes": 4, "gpusPerNode": 8, "strategy": "zero3"}
    doc["spec"]["training"] = {"batchSizePerDevice": 1, "cutoffLen": 4096,
                               "gradientCheckpointing": True}
    job.write_text(yaml.safe_dump(doc))
    res = runner.invoke(app, ["render", str(job), "--gpu-memory", "80Gi"])
    assert res.exit_code == 0, res.output
    assert "--strategy" in res.output and "zero3" in res.output


def test_a_bad_output_uri_says_what_is_wrong(tmp_path):
    for uri, said in [
            ("gs://b/o", "spec.output.uri: 'gs://b/o': the bucket name 'b' is 1 character "
             "long; gs:// bucket names are 3 to 63 characters"),
            ("s3://" + "b" * 64 + "/o", "is 64 characters long; s3:// bucket names are 3 to "
             "63 characters"),
            ("gs://My_Bucket/o", "'My_Bucket' is not a bucket name"),
            ("ftp://host/o", "ftp:// is not a place kubetune writes outputs to; an output is "
             "a local path, pvc://CLAIM/path")]:
        job = write_job(tmp_path / "j.yaml", {"model": {"source": "m"},
                                              "datasets": [{"source": "d.json"}],
                                              "output": {"uri": uri}})
        res = runner.invoke(app, ["validate", str(job), "--no-data"])
        assert res.exit_code == 2, res.output
        assert said in " ".join(res.output.split()), res.output
        assert "not a source" not in res.output


def test_render_says_why_memory_is_not_estimated(tmp_path, hub):
    import yaml

    # A model from another job: not "read from the Hub only" (it is no hf:// model at all).
    res = runner.invoke(app, ["render", str(REPO / "examples" / "pipeline" / "3-grpo.yaml")])
    assert res.exit_code == 0, res.output
    assert "memory: not estimated (the model comes from FineTuneJob 'assistant-sft'" in \
        " ".join(res.output.split()), res.output
    assert "from the Hub only" not in res.output
    # An hf:// model whose config.json cannot be fetched: the reason, not a guess.
    doc = yaml.safe_load((REPO / "examples" / "assistant-identity.yaml").read_text())
    doc["spec"]["model"] = {"source": "hf://Qwen/NotThere"}
    job = tmp_path / "j.yaml"
    job.write_text(yaml.safe_dump(doc))
    res = runner.invoke(app, ["render", str(job)])
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "memory: not estimated (the model's config.json was not read: http://127.0.0.1:" \
        in said and "/Qwen/NotThere/resolve/main/config.json: HTTP Error 404" in said, said


def test_init_reports_on_stdout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["init"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ["wrote finetune.yaml", "wrote data.json",
                                       "next: edit finetune.yaml, then `kubetune validate "
                                       "finetune.yaml` and `kubetune run finetune.yaml`"]
    assert res.stderr == ""


def test_help_keeps_sentences_whole(monkeypatch):
    """--help wraps to the terminal; the docstrings' own line breaks no longer cut sentences
    ("its data, without / training")."""
    monkeypatch.setenv("COLUMNS", "200")
    res = runner.invoke(app, ["--help"])
    assert "its data, without training; and whether it fits" in res.output, res.output
    res = runner.invoke(app, ["validate", "--help"])
    assert "its data, without training; and whether it fits" in res.output, res.output
