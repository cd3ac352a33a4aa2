"""FineTuneSweep: the API model and CRD, trial generation (grid, random, maxTrials), each
trial's FineTuneJob, the median stopping rule, and the best trial."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from kubetune import sweep as sw
from kubetune.api import v1alpha1 as api
from kubetune.api.crd import finetunesweep_crd
from kubetune.errors import KubetuneError

TEMPLATE = {"model": {"source": "embedded://smollm2-135m-instruct"},
            "datasets": [{"source": "data/identity.json"}], "output": {"uri": "out/sweep"}}


def _sweep(name="lr", template=None, **spec) -> dict:
    body = {"template": copy.deepcopy(template or TEMPLATE),
            "parameters": [{"path": "training.learningRate",
                            "values": [1e-4, 3e-4, 1e-3]}],
            "objective": {"metric": "eval_loss"}}
    body.update(spec)
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
            "metadata": {"name": name}, "spec": body}


def _params(*ps) -> list[api.ParameterSpec]:
    return [api.ParameterSpec.model_validate(p, by_alias=True) for p in ps]


# --------------------------------------------------------------------------- the API


def test_a_sweep_parses_with_its_defaults():
    s = sw.parse_sweep(_sweep())
    assert s.spec.algorithm.type == "grid"
    assert (s.spec.max_trials, s.spec.parallelism) == (16, 1)
    assert s.spec.objective.direction == "minimize"
    assert s.spec.early_stopping is None and s.spec.promote is None


@pytest.mark.parametrize(("change", "message"), [
    ({"parameters": [{"path": "training.learningRate"}]}, "give values or range"),
    ({"parameters": [{"path": "training.learningRate", "values": [1e-4],
                      "range": {"min": 1e-5, "max": 1e-3}}]}, "give values or range"),
    ({"parameters": [{"path": "training.learningRate",
                      "range": {"min": 0, "max": 1e-3, "scale": "log"}}]}, "log scale"),
    ({"parameters": [{"path": "training.learningRate", "range": {"min": 1, "max": 1}}]},
     "min must be below max"),
    ({"parameters": [{"path": "Training.lr", "values": [1]}]}, "does not match"),
    ({"parameters": [{"path": "training.epochs", "values": [1.0]},
                     {"path": "training.epochs", "values": [2.0]}]}, "each path at most once"),
    ({"parallelism": 4, "maxTrials": 2}, "parallelism is at most maxTrials"),
    ({"algorithm": {"type": "bayes"}}, "algorithm.type"),
    ({"template": {**TEMPLATE, "serve": {"weights": "adapter"}}},
     "promote serves the best one"),
    ({"template": {**TEMPLATE, "suspend": True}}, "suspend the sweep"),
    ({"objetive": {"metric": "x"}}, "did you mean 'objective'"),
])
def test_bad_sweeps_are_refused_naming_the_field(change, message):
    with pytest.raises(KubetuneError, match=message):
        sw.parse_sweep(_sweep(**change))


def test_the_template_is_a_finetunejob_spec_with_its_rules():
    bad = {**TEMPLATE, "training": {"learningRate": 2.0}}
    with pytest.raises(KubetuneError, match="spec.template.training.learningRate"):
        sw.parse_sweep(_sweep(template=bad))


def test_a_sweep_name_leaves_room_for_the_trial_number():
    with pytest.raises(KubetuneError, match="at most 46"):
        sw.parse_sweep(_sweep(name="a" * 47))
    assert sw.parse_sweep(_sweep(name="a" * 46))


def test_the_crd_names_columns_and_rules():
    crd = finetunesweep_crd()
    assert crd["metadata"]["name"] == "finetunesweeps.kubetune.io"
    assert crd["spec"]["names"]["shortNames"] == ["fts"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Done"] == ".status.done" and columns["Best"] == ".status.best.value"
    schema = version["schema"]["openAPIV3Schema"]
    status = schema["properties"]["status"]["properties"]
    assert {"done", "best", "trials", "conditions", "observedGeneration"} <= set(status)
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    spec = schema["properties"]["spec"]
    assert spec["properties"]["algorithm"]["properties"]["type"]["enum"] == list(
        api.ALGORITHMS)
    # the template is the FineTuneJob spec, its CEL rules included
    template = spec["properties"]["template"]
    assert any("output.merge" in r["rule"] for r in template["x-kubernetes-validations"])
    assert {r["message"] for r in spec["x-kubernetes-validations"]} == {
        r.message for r in api.SWEEP_RULES["spec"]}


def test_what_trials_are_planned_from_cannot_change():
    spec = finetunesweep_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"]["spec"]["properties"]
    for field in ("template", "parameters", "algorithm"):
        rules = spec[field]["x-kubernetes-validations"]
        assert {"rule": "self == oldSelf", "message": f"spec.{field} cannot change after the "
                "sweep is created (its trials are planned from it); create a new "
                "FineTuneSweep"} in rules
    # the template keeps the FineTuneJob spec's own rules beside it
    assert len(spec["template"]["x-kubernetes-validations"]) == len(api.ALL_RULES["spec"]) + 1


def test_trials_do_not_inherit_the_gitops_tools_labels():
    doc = _sweep()
    doc["metadata"]["labels"] = {"app.kubernetes.io/instance": "ml", "team": "a",
                                 "kustomize.toolkit.fluxcd.io/name": "jobs",
                                 "kueue.x-k8s.io/queue-name": "q"}
    labels = sw.plan(sw.parse_sweep(doc))[0].job.metadata.labels
    assert labels["team"] == "a" and labels["kueue.x-k8s.io/queue-name"] == "q"
    assert "app.kubernetes.io/instance" not in labels
    assert "kustomize.toolkit.fluxcd.io/name" not in labels


def test_every_algorithm_the_crd_names_is_implemented():
    assert set(api.ALGORITHMS) == set(sw.ALGORITHMS)


# --------------------------------------------------------------------------- values


def test_grid_points_of_a_log_range_are_tidy_and_include_both_ends():
    (p,) = _params({"path": "training.learningRate",
                    "range": {"min": 1e-5, "max": 1e-3, "scale": "log", "count": 3}})
    assert sw.grid_values(p) == [1e-5, 1e-4, 1e-3]
    (p,) = _params({"path": "training.epochs", "range": {"min": 1, "max": 2, "count": 5}})
    assert sw.grid_values(p) == [1.0, 1.25, 1.5, 1.75, 2.0]


def test_an_integer_range_has_no_repeats():
    (p,) = _params({"path": "method.lora.rank",
                    "range": {"min": 4, "max": 64, "scale": "log", "count": 9,
                              "integer": True}})
    values = sw.grid_values(p)
    assert values[0] == 4 and values[-1] == 64 and len(set(values)) == len(values)
    assert all(type(v) is int for v in values)


def test_grid_is_every_combination_in_order_up_to_max_trials():
    ps = _params({"path": "training.learningRate", "values": [1e-4, 1e-3]},
                 {"path": "method.lora.rank", "values": [8, 16, 32]})
    trials = sw.grid(ps, 100, 0)
    assert len(trials) == 6
    assert trials[0] == {"training.learningRate": 1e-4, "method.lora.rank": 8}
    assert trials[1] == {"training.learningRate": 1e-4, "method.lora.rank": 16}
    assert trials[5] == {"training.learningRate": 1e-3, "method.lora.rank": 32}
    assert sw.grid(ps, 4, 0) == trials[:4]


def test_random_is_max_trials_draws_the_same_for_a_seed():
    ps = _params({"path": "training.learningRate",
                  "range": {"min": 1e-5, "max": 1e-2, "scale": "log"}},
                 {"path": "method.lora.rank", "values": [8, 16, 32]})
    a, b = sw.random_search(ps, 20, 7), sw.random_search(ps, 20, 7)
    assert a == b and len(a) == 20
    assert a != sw.random_search(ps, 20, 8)
    lrs = [t["training.learningRate"] for t in a]
    assert all(1e-5 <= x <= 1e-2 for x in lrs)
    # log-uniform: about half the draws below the geometric middle (~3e-4), not ~3 %
    assert 4 <= sum(x < 10 ** -3.5 for x in lrs) <= 16
    assert {t["method.lora.rank"] for t in a} <= {8, 16, 32}


# --------------------------------------------------------------------------- trials


def test_plan_makes_validated_trials_with_their_own_output_and_labels():
    doc = _sweep(parameters=[{"path": "training.learningRate", "values": [1e-4, 3e-4]},
                             {"path": "method.lora.targetModules",
                              "values": [["q_proj", "v_proj"]]}])
    doc["metadata"].update(namespace="ml", labels={"team": "a"})
    trials = sw.plan(sw.parse_sweep(doc))
    assert [t.name for t in trials] == ["lr-0", "lr-1"]
    job = trials[1].job
    assert job.spec.training.learning_rate == 3e-4
    assert job.spec.method.lora.target_modules == ["q_proj", "v_proj"]
    assert job.spec.output.uri == "out/sweep/lr-1"
    assert job.metadata.namespace == "ml"
    labels = job.metadata.labels
    assert labels["team"] == "a" and labels[sw.SWEEP_LABEL] == "lr"
    assert labels[sw.TRIAL_LABEL] == "1"
    assert labels["sweep.kubetune.io/training.learningRate"] == "0.0003"
    assert labels["sweep.kubetune.io/method.lora.targetModules"].startswith("h-")
    # the template itself is untouched
    assert trials[0].job.spec.method.lora.target_modules != ["x"]


def test_a_list_item_path_and_an_hf_output():
    template = {**TEMPLATE, "output": {"uri": "hf://org/model"}}
    doc = _sweep(template=template,
                 parameters=[{"path": "datasets[0].maxSamples", "values": [10]}])
    (trial,) = sw.plan(sw.parse_sweep(doc))
    assert trial.job.spec.datasets[0].max_samples == 10
    assert trial.job.spec.output.uri == "hf://org/model-0"


def test_an_invalid_combination_is_refused_naming_the_parameter():
    doc = _sweep(parameters=[{"path": "training.learningRate", "values": [1e-4, 2.0]}])
    with pytest.raises(KubetuneError) as e:
        sw.plan(sw.parse_sweep(doc))
    text = str(e.value)
    assert "trial lr-1 (training.learningRate=2.0)" in text
    assert "spec.training.learningRate" in text


def test_a_cross_field_rule_broken_by_a_combination_is_refused():
    doc = _sweep(parameters=[{"path": "method.type", "values": ["lora", "full"]},
                             {"path": "output.merge", "values": [True]}])
    with pytest.raises(KubetuneError, match=r"(?s)trial lr-1 \(method.type=\"full\", "
                       r"output.merge=true\).*output.merge needs method.type lora"):
        sw.plan(sw.parse_sweep(doc))


def test_an_integer_field_given_floats_is_refused():
    doc = _sweep(parameters=[{"path": "method.lora.rank", "range": {"min": 4, "max": 8}}])
    with pytest.raises(KubetuneError, match="method.lora.rank"):
        sw.plan(sw.parse_sweep(doc))
    doc["spec"]["parameters"][0]["range"]["integer"] = True
    assert [t.job.spec.method.lora.rank for t in sw.plan(sw.parse_sweep(doc))] == [4, 6, 8]


def test_promote_is_held_to_the_serve_rules_of_every_trial():
    doc = _sweep(promote={"weights": "model"})  # lora without output.merge: no whole model
    with pytest.raises(KubetuneError,
                       match=r"(?s)spec.promote: trial lr-0.*serve.weights: model needs"):
        sw.plan(sw.parse_sweep(doc))
    doc["spec"]["template"]["output"]["merge"] = True
    trials = sw.plan(sw.parse_sweep(doc))
    assert trials and all(t.job.spec.serve is None for t in trials)


def test_a_missing_list_item_is_named():
    doc = _sweep(parameters=[{"path": "datasets[3].evalSplit", "values": [0.1]}])
    with pytest.raises(KubetuneError, match=r"datasets\[3\].evalSplit: the template has no"):
        sw.plan(sw.parse_sweep(doc))


def test_a_sweep_file_is_read_with_the_job_files_checks(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(_sweep()))
    assert sw.load_sweep(f).metadata.name == "lr"
    f.write_text("a: &x 1\nb: *x\n")
    with pytest.raises(KubetuneError, match="anchors"):
        sw.load_sweep(f)


# --------------------------------------------------------------------------- objective


def test_objective_at_a_step_or_final():
    logged = sw.observations([{"step": 2, "loss": 3.0}, {"step": 2, "eval_loss": 2.5},
                              {"step": 4, "eval_loss": 2.0}, {"event": "checkpoint"},
                              {"step": 5, "metrics": {"eval_loss": 1.9}}], "eval_loss")
    assert logged == {2: 2.5, 4: 2.0, 5: 1.9}
    assert sw.objective_value("eval_loss", 2, None, logged) == 2.5
    assert sw.objective_value("eval_loss", 3, None, logged) is None
    assert sw.objective_value("eval_loss", None, {"eval_loss": 1.8}, logged) == 1.8
    assert sw.objective_value("eval_loss", None, {}, logged) == 1.9
    assert sw.objective_value("loss", None, {"train_loss": 2.2}, {}) == 2.2
    assert sw.objective_value("loss", None, {}, {}) is None


def test_best_index_by_direction():
    assert sw.best_index([3.0, None, 1.0, 1.0], "minimize") == 2
    assert sw.best_index([3.0, None, 1.0], "maximize") == 0
    assert sw.best_index([None, None], "minimize") is None


def test_median_rule_stops_a_trial_worse_than_the_median_at_the_same_step():
    completed = [{1: 3.0, 2: 2.0, 3: 1.0}, {1: 3.2, 2: 2.4, 3: 1.5}, {1: 3.1, 2: 2.2}]
    # at step 2 the median is 2.2: 2.5 is worse (minimize)
    assert sw.median_stops({1: 3.0, 2: 2.5}, completed, direction="minimize", min_steps=1,
                           min_trials=1) == 2
    assert sw.median_stops({1: 3.0, 2: 2.1}, completed, direction="minimize", min_steps=1,
                           min_trials=1) is None
    # not before minSteps
    assert sw.median_stops({1: 9.0}, completed, direction="minimize", min_steps=2,
                           min_trials=1) is None
    # step 3 has two completed values (median 1.25), minTrials 3 asks for three
    assert sw.median_stops({3: 2.0}, completed, direction="minimize", min_steps=1,
                           min_trials=3) is None
    assert sw.median_stops({3: 2.0}, completed, direction="minimize", min_steps=1,
                           min_trials=2) == 3
    # maximize: lower is worse
    assert sw.median_stops({2: 2.1}, completed, direction="maximize", min_steps=1,
                           min_trials=1) == 2
    # no completed trial yet: nothing is stopped
    assert sw.median_stops({2: 99.0}, [], direction="minimize", min_steps=1,
                           min_trials=1) is None


# --------------------------------------------------------------------------- kubetune sweep


def _sweep_file(tmp_path, tiny_model, parameters, **spec) -> Path:
    from conftest import LF_DATA, tiny_spec

    identity = {"source": str(LF_DATA / "identity.json"),
                "placeholders": {"name": "Kubey", "author": "Ops"}}
    template = tiny_spec(tiny_model, [identity], tmp_path / "out", **spec.pop("template", {}))
    doc = _sweep(template=template, parameters=parameters, **spec)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_a_learning_rate_sweep_here_picks_the_lowest_eval_loss(tiny_model, tmp_path, lf_data):
    import json

    from kubetune.cli import app
    from typer.testing import CliRunner

    rates = [3e-3, 1e-2, 1e-5, 3e-4]  # the best neither first nor last
    path = _sweep_file(tmp_path, tiny_model,
                       [{"path": "training.learningRate", "values": rates}],
                       template={"training": {"maxSteps": 4, "evalSplit": 0.2,
                                              "evalSteps": 2, "saveSteps": 4}})
    res = CliRunner().invoke(app, ["sweep", str(path)])
    assert res.exit_code == 0, res.output
    # each trial's own result.json, in its own folder
    results = {f"lr-{i}": json.loads((tmp_path / "out" / f"lr-{i}" / "result.json").read_text())
               for i in range(4)}
    losses = {name: r["metrics"]["eval_loss"] for name, r in results.items()}
    assert len(set(losses.values())) == 4  # the rates made a difference
    lowest = min(losses, key=losses.get)
    assert f"best: {lowest} (eval_loss {losses[lowest]:.4f})" in res.output
    row = next(line for line in res.output.splitlines() if "(best)" in line)
    assert f"* {lowest}" in row and f"{losses[lowest]:.4f}" in row
    summary = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert f"results: {(tmp_path / 'out' / 'sweep.json').resolve()}" in res.output
    assert summary["best"] == lowest
    assert [t["value"] for t in summary["trials"]] == [losses[f"lr-{i}"] for i in range(4)]
    assert summary["trials"][0]["output"] == str((tmp_path / "out" / "lr-0").resolve())
    for i, rate in enumerate(rates):  # the table: each trial with its rate and value
        line = next(line for line in res.output.splitlines()
                    if f" lr-{i} " in line and "│" in line)
        assert sw.show(rate) in line and f"{losses[f'lr-{i}']:.4f}" in line


def test_the_median_rule_stops_a_trial_behind_the_completed_ones(tiny_model, tmp_path,
                                                                  lf_data):
    from kubetune.sweep_local import best, run_sweep
    from kubetune_trainer.config import RunContext

    # the first trial learns; the second barely moves, so its loss at step 2 is above the
    # first's (at step 1 both have the untrained model's loss: equal is not worse)
    path = _sweep_file(tmp_path, tiny_model,
                       [{"path": "training.learningRate", "values": [1e-2, 1e-7]}],
                       objective={"metric": "loss"},
                       earlyStopping={"minSteps": 2},
                       template={"training": {"maxSteps": 5, "saveSteps": 5}})
    s = sw.load_sweep(path)
    first, second = run_sweep(s, RunContext(base_dir=tmp_path), log=lambda *_: None)
    assert first.state == "succeeded" and first.steps == 5
    assert second.state == "stopped" and second.stopped_at == 2 and second.steps == 2
    assert second.logged[2] > first.logged[2]
    assert best([first, second], "minimize") is first


# --------------------------------------------------------------------------- CEL


_T = {"model": {"source": "m"}, "datasets": [{"source": "d.json"}], "output": {"uri": "o"}}
_P = [{"path": "training.learningRate", "values": [0.001]}]
_O = {"metric": "eval_loss"}
SWEEP_CEL_CASES = {
    "spec": (api.FineTuneSweepSpec, [
        {"template": _T, "parameters": _P, "objective": _O},
        {"template": {**_T, "serve": {"weights": "adapter"}}, "parameters": _P, "objective": _O},
        {"template": {**_T, "suspend": True}, "parameters": _P, "objective": _O},
        {"template": {**_T, "suspend": False}, "parameters": _P, "objective": _O},
        {"template": _T, "parameters": _P * 2, "objective": _O},
        {"template": _T, "parameters": [*_P, {"path": "training.epochs", "values": [1.0]}],
         "objective": _O},
        {"template": _T, "parameters": _P, "objective": _O, "parallelism": 3, "maxTrials": 2},
        {"template": _T, "parameters": _P, "objective": _O, "parallelism": 2, "maxTrials": 2},
        {"template": _T, "parameters": _P, "objective": _O, "parallelism": 1},
    ]),
    "spec.parameters[]": (api.ParameterSpec, [
        {"path": "a", "values": [1]}, {"path": "a", "range": {"min": 1.0, "max": 2.0}},
        {"path": "a"}, {"path": "a", "values": [1], "range": {"min": 1.0, "max": 2.0}},
    ]),
    "spec.parameters[].range": (api.RangeSpec, [
        {"min": 1.0, "max": 2.0}, {"min": 2.0, "max": 1.0}, {"min": 1.0, "max": 1.0},
        {"min": 0.0, "max": 1.0, "scale": "log"}, {"min": -1.0, "max": 1.0, "scale": "linear"},
        {"min": 1e-5, "max": 1e-3, "scale": "log"},
    ]),
}


@pytest.mark.parametrize("path", list(SWEEP_CEL_CASES))
def test_sweep_cel_and_python_agree(path):
    import cel
    from pydantic import ValidationError

    model, cases = SWEEP_CEL_CASES[path]
    verdicts = set()
    for obj in cases:
        try:
            model.model_validate(obj, by_alias=True)
            broken = ""
        except ValidationError as err:
            broken = str(err)
        for rule in api.SWEEP_RULES[path]:
            got = cel.evaluate(rule.cel, {"self": obj})
            assert isinstance(got, bool), f"{rule.cel} on {obj} gave {got!r}"
            assert got == (rule.message not in broken), f"{rule.cel} on {obj}"
            verdicts.add(got)
    assert verdicts == {True, False}


def test_the_sweep_name_rule_in_cel():
    import cel

    (rule,) = api.SWEEP_RULES["metadata"]
    for name, ok in (("lr", True), ("a" * 46, True), ("a" * 47, False), ("Lr", False)):
        assert cel.evaluate(rule.cel, {"self": {"metadata": {"name": name}}}) is ok, name


def test_range_points_are_readable():
    (p,) = _params({"path": "training.learningRate",
                    "range": {"min": 1e-4, "max": 3e-3, "scale": "log", "count": 4}})
    assert sw.grid_values(p) == [1e-4, 3.11e-4, 9.65e-4, 3e-3]
    (p,) = _params({"path": "preference.beta", "range": {"min": 0.0, "max": 1.0, "count": 4}})
    assert sw.grid_values(p) == [0.0, 0.333333, 0.666667, 1.0]


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "examples" /
                                         "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_example_sweeps_plan_valid_trials(path):
    trials = sw.plan(sw.load_sweep(path))
    assert trials and all(t.job.kind == "FineTuneJob" for t in trials)


def test_a_failed_trial_is_listed_and_the_others_go_on(tmp_path, monkeypatch):
    import kubetune_trainer.train
    from kubetune.sweep_local import best, run_sweep, table
    from kubetune_trainer.config import RunContext
    from rich.console import Console

    def fake_train(job, ctx, *, log, callbacks):
        rate = job.spec.training.learning_rate
        if rate == 3e-4:
            raise KubetuneError("the data set ran dry", field="spec.datasets[0]")
        return {"progress": str(tmp_path / job.metadata.name / "progress.jsonl"),
                "global_step": 6, "metrics": {"eval_loss": rate * 1000}}

    monkeypatch.setattr(kubetune_trainer.train, "run", fake_train)
    s = sw.parse_sweep(_sweep())
    results = run_sweep(s, RunContext(base_dir=tmp_path), log=lambda *_: None)
    assert [r.state for r in results] == ["succeeded", "failed", "succeeded"]
    assert "the data set ran dry" in results[1].error
    assert best(results, "minimize").name == "lr-0"
    console = Console(record=True, width=120)
    console.print(table(s, results))
    text = console.export_text()
    assert "failed: spec.datasets[0]: the data set ran dry" in text and "* lr-0" in text


def test_kubetune_sweep_plan_lists_the_trials_and_trains_nothing(tmp_path):
    from kubetune.cli import app
    from typer.testing import CliRunner

    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(_sweep(algorithm={"type": "random", "seed": 3}, maxTrials=5,
                                       parameters=[{"path": "training.learningRate",
                                                    "range": {"min": 1e-5, "max": 1e-3,
                                                              "scale": "log"}}])))
    res = CliRunner().invoke(app, ["sweep", "--plan", str(f)])
    assert res.exit_code == 0, res.output
    assert "5 trials (random), every spec valid" in res.output
    assert "lr-4" in res.output and "out/sweep/lr-4" in res.output
    assert not (tmp_path / "out").exists()
    f.write_text(yaml.safe_dump(_sweep(parameters=[{"path": "training.learningRate",
                                                    "values": [1e-4, 2.0]}])))
    res = CliRunner().invoke(app, ["sweep", "--plan", str(f)])
    assert res.exit_code == 2 and "trial lr-1 (training.learningRate=2.0)" in res.output


def test_random_draws_no_trial_twice():
    ps = _params({"path": "method.lora.rank", "values": [8, 16]},
                 {"path": "training.epochs", "values": [1.0]})
    trials = sw.random_search(ps, 5, 0)
    assert sorted(t["method.lora.rank"] for t in trials) == [8, 16]
