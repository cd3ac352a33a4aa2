"""FineTuneSweep in the operator: ``decide`` (pure) on synthetic trials, then the real kopf
operator against kmock: trials created as owned FineTuneJobs, never more than parallelism,
suspend, early stopping on synthetic metrics, promotion, the status."""

from __future__ import annotations

import copy

import pytest
from kubetune import sweep as sw
from kubetune.api import v1alpha1 as api
from kubetune_operator import sweeps
from test_operator import cluster, exists  # noqa: F401  (cluster: the kmock fixture)

NS = "team-a"
NOW = "2026-12-07T12:00:00Z"
TEMPLATE = {"model": {"source": "embedded://smollm2-135m-instruct"},
            "datasets": [{"source": "pvc://data/identity.json"}],
            "output": {"uri": "pvc://out/sweep", "merge": True}}


def _sweep(name="lr", **spec) -> dict:
    body = {"template": copy.deepcopy(TEMPLATE),
            "parameters": [{"path": "training.learningRate",
                            "values": [1e-4, 3e-4, 1e-3, 3e-3]}],
            "objective": {"metric": "eval_loss"}, "parallelism": 2}
    body.update(spec)
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 3,
                         "labels": {"kueue.x-k8s.io/queue-name": "team-a"}},
            "spec": body}


def _made(decision) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in decision.create}


def _trial(doc, phase=None, step=None, value=None, final=None, **spec):
    t = copy.deepcopy(doc)
    t["spec"].update(spec)
    status = {}
    if phase:
        status["phase"] = phase
    if step is not None:
        status["progress"] = {"step": step, "metrics": {"eval_loss": value}}
    if final is not None:
        status["outputs"] = {"metrics": {"eval_loss": final}}
    t["status"] = status
    return t


def _converged(raw, trials):
    """The sweep as the next converge reads it: the status written."""
    d = sweeps.decide(raw, trials, NOW)
    raw = {**raw, "status": d.status.model_dump(mode="json", by_alias=True, exclude_none=True)}
    return d, raw


def test_the_first_converge_creates_parallelism_trials_owned_and_labelled():
    d = sweeps.decide(_sweep(), {}, NOW)
    made = _made(d)
    assert list(made) == ["lr-0", "lr-1"]
    t = made["lr-1"]
    assert t["metadata"]["namespace"] == NS
    owner = t["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("FineTuneSweep", "uid-lr", True)
    labels = t["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "team-a"  # queued like any job
    assert labels[sw.SWEEP_LABEL] == "lr" and labels[sw.TRIAL_LABEL] == "1"
    assert labels["sweep.kubetune.io/training.learningRate"] == "0.0003"
    assert t["spec"]["training"]["learningRate"] == 3e-4
    assert t["spec"]["output"]["uri"] == "pvc://out/sweep/lr-1"
    s = d.status
    assert (s.done, s.trials_total, s.observed_generation) == ("0/4", 4, 3)
    assert [r.name for r in s.trials] == ["lr-0", "lr-1"]
    conds = {c.type: c for c in s.conditions}
    assert conds["Ready"].status == "True" and conds["Reconciling"].status == "True"
    assert all(c.observed_generation == 3 for c in s.conditions)


def test_never_more_than_parallelism_in_flight():
    raw = _sweep()
    first = _made(sweeps.decide(raw, {}, NOW))
    trials = {n: _trial(t, "Running") for n, t in first.items()}
    assert not sweeps.decide(raw, trials, NOW).create  # two running: none more
    trials["lr-0"] = _trial(first["lr-0"], "Succeeded", final=2.0)
    d = sweeps.decide(raw, trials, NOW)
    assert list(_made(d)) == ["lr-2"]
    trials["lr-2"] = _trial(_made(d)["lr-2"], "Failed")
    assert list(_made(sweeps.decide(raw, trials, NOW))) == ["lr-3"]


def test_an_invalid_combination_stalls_the_sweep_and_creates_nothing():
    raw = _sweep(parameters=[{"path": "training.learningRate", "values": [1e-4, 2.0]}])
    d = sweeps.decide(raw, {}, NOW)
    assert not d.create
    conds = {c.type: c for c in d.status.conditions}
    assert conds["Stalled"].status == "True" and conds["Stalled"].reason == "InvalidSpec"
    assert "trial lr-1 (training.learningRate=2.0)" in conds["Stalled"].message
    assert conds["Ready"].status == "False"


def test_suspend_creates_none_and_suspends_the_trials_in_flight_then_resumes_them():
    raw = _sweep()
    first = _made(sweeps.decide(raw, {}, NOW))
    trials = {"lr-0": _trial(first["lr-0"], "Running"),
              "lr-1": _trial(first["lr-1"], "Succeeded", final=1.0)}
    held = _sweep(suspend=True)
    d = sweeps.decide(held, trials, NOW)
    assert not d.create and d.patch == {"lr-0": {"spec": {"suspend": True}}}
    assert {c.type: c.reason for c in d.status.conditions}["Ready"] == "Suspended"
    trials["lr-0"] = _trial(first["lr-0"], "Suspended", suspend=True)
    d = sweeps.decide(raw, trials, NOW)
    assert d.patch == {"lr-0": {"spec": {"suspend": False}}}


def test_the_median_rule_stops_a_trial_behind_the_completed_ones():
    raw = _sweep(earlyStopping={"minSteps": 20}, parallelism=1,
                 parameters=[{"path": "training.learningRate", "values": [1e-3, 1e-5, 3e-4]}])
    made = _made(sweeps.decide(raw, {}, NOW))
    # lr-0 reports eval_loss at steps 10, 20, 30 and succeeds
    trials = {}
    for step, value in ((10, 3.0), (20, 2.0), (30, 1.5)):
        trials["lr-0"] = _trial(made["lr-0"], "Running", step, value)
        _, raw = _converged(raw, trials)
    trials["lr-0"] = _trial(made["lr-0"], "Succeeded", 30, 1.5, final=1.4)
    d, raw = _converged(raw, trials)
    assert [r.step for r in d.status.trials[0].observations] == [10, 20, 30]
    assert d.status.best.name == "lr-0" and d.status.best.value == 1.4
    made.update(_made(d))
    # lr-1 is behind, but before minSteps it goes on
    trials["lr-1"] = _trial(made["lr-1"], "Running", 10, 9.0)
    d, raw = _converged(raw, trials)
    assert not d.patch
    # at step 25 it is worse than lr-0 was by step 25 (2.0, its report at 20)
    trials["lr-1"] = _trial(made["lr-1"], "Running", 25, 2.5)
    d, raw = _converged(raw, trials)
    assert d.patch == {"lr-1": {"metadata": {"annotations": {sweeps.STOPPED_EARLY: "true"}},
                                "spec": {"suspend": True}}}
    row = d.status.trials[1]
    assert (row.phase, row.stopped_early, row.value) == ("Stopped", True, 2.5)
    assert list(_made(d)) == ["lr-2"]  # its place goes to the next trial
    # the stopped trial, now suspended and annotated, stays stopped and is never resumed
    stopped = _trial(made["lr-1"], "Suspended", 25, 2.5, suspend=True)
    stopped["metadata"]["annotations"] = {sweeps.STOPPED_EARLY: "true"}
    trials["lr-1"] = stopped
    d, raw = _converged(raw, trials)
    assert "lr-1" not in d.patch and d.status.trials[1].phase == "Stopped"


def test_completion_best_and_promotion():
    promote = {"weights": "model", "checks": [{"prompt": "Who are you?", "expect": ["Kubey"]}]}
    raw = _sweep(promote=promote, parallelism=4, objective={"metric": "eval_loss"})
    made = _made(sweeps.decide(raw, {}, NOW))
    finals = {"lr-0": 2.0, "lr-1": 1.2, "lr-2": 1.5}
    trials = {n: _trial(made[n], "Succeeded", final=v) for n, v in finals.items()}
    trials["lr-3"] = _trial(made["lr-3"], "Running")
    d = sweeps.decide(raw, trials, NOW)
    assert d.status.best.name == "lr-1" and not d.patch  # not promoted before the end
    assert d.status.done == "3/4"
    trials["lr-3"] = _trial(made["lr-3"], "Failed")
    d = sweeps.decide(raw, trials, NOW)
    assert d.patch == {"lr-1": {"spec": {"serve": promote}}}
    conds = {c.type: c for c in d.status.conditions}
    assert conds["Succeeded"].status == "True" and conds["Ready"].status == "True"
    assert conds["Reconciling"].status == "False" and "lr-1" in conds["Succeeded"].message
    assert d.status.best.parameters == {"training.learningRate": "0.0003"}
    # promoted: nothing more to do
    trials["lr-1"]["spec"]["serve"] = promote
    assert not sweeps.decide(raw, trials, NOW).patch


def test_promotion_is_held_to_the_gate_the_trial_is_served_under():
    """promote.gate travels to the best trial's spec.serve (its serving applies it); the
    sweep's Promoted condition says the same verdict: the best trial missed it, or passed."""
    promote = {"gate": [{"metric": "eval_loss", "below": 1.0}]}
    raw = _sweep(promote=promote, parallelism=4, objective={"metric": "eval_loss"})
    made = _made(sweeps.decide(raw, {}, NOW))
    finals = {"lr-0": 2.0, "lr-1": 1.2, "lr-2": 1.5, "lr-3": 1.3}
    trials = {n: _trial(made[n], "Succeeded", final=v) for n, v in finals.items()}
    d = sweeps.decide(raw, trials, NOW)
    assert d.patch == {"lr-1": {"spec": {"serve": promote}}}  # the gate goes with it
    conds = {c.type: c for c in d.status.conditions}
    assert conds["Succeeded"].status == "True"  # the sweep did its part
    assert (conds["Promoted"].status, conds["Promoted"].reason) == ("False", "GateNotMet")
    assert conds["Promoted"].message == ("trial lr-1 is not served: spec.serve.gate: "
                                         "eval_loss is 1.2, not below 1 (misses by 0.2)")
    trials["lr-1"] = _trial(made["lr-1"], "Succeeded", final=0.8)
    conds = {c.type: c for c in sweeps.decide(raw, trials, NOW).status.conditions}
    assert (conds["Promoted"].status, conds["Promoted"].reason) == ("True", "Promoted")
    assert "gate passed: eval_loss 0.8 below 1" in conds["Promoted"].message


def test_a_sweep_whose_trials_all_failed_is_stalled():
    raw = _sweep(parallelism=4)
    made = _made(sweeps.decide(raw, {}, NOW))
    trials = {n: _trial(t, "Failed") for n, t in made.items()}
    conds = {c.type: c for c in sweeps.decide(raw, trials, NOW).status.conditions}
    assert conds["Stalled"].status == "True" and conds["Succeeded"].status == "False"


def test_transition_times_are_kept_while_a_condition_holds():
    raw = _sweep()
    d, raw = _converged(raw, {})
    later = sweeps.decide(raw, {}, "2026-12-07T13:00:00Z")
    assert {c.last_transition_time for c in later.status.conditions} == {NOW}


@pytest.mark.parametrize("algorithm", [{"type": "grid"}, {"type": "random", "seed": 5}])
def test_grid_and_random_sweeps_create_their_planned_trials(algorithm):
    raw = _sweep(algorithm=algorithm, maxTrials=3, parallelism=3, parameters=[
        {"path": "training.learningRate", "range": {"min": 1e-5, "max": 1e-3,
                                                    "scale": "log"}}])
    made = _made(sweeps.decide(raw, {}, NOW))
    planned = sw.plan(sw.parse_sweep({k: v for k, v in raw.items()}))
    assert [t["spec"]["training"]["learningRate"] for t in made.values()] == [
        p.parameters["training.learningRate"] for p in planned]


# --------------------------------------------------------------------------- kmock

FTS = "kubetune.io/v1alpha1/finetunesweeps"


def _cluster_sweep(name="lr", **spec):
    from test_operator import _job

    body = {"template": _job()["spec"],
            "parameters": [{"path": "training.learningRate", "values": [1e-4, 3e-4, 1e-3]}],
            "objective": {"metric": "eval_loss"}, "parallelism": 2,
            "earlyStopping": {"minSteps": 10},
            "promote": {"weights": "adapter"}}
    body["template"].pop("serve", None)
    body.update(spec)
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneSweep",
            "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}", "generation": 1,
                         "resourceVersion": "1"},
            "spec": body}


async def test_the_operator_runs_a_sweep_against_kmock(cluster, tmp_path,  # noqa: F811
                                                       monkeypatch):
    import asyncio

    from test_operator import FTJ, PTJ, Operator, _assert, eventually

    cluster.resources[FTS] = cluster.ResourceInfo(
        kind="FineTuneSweep", singular="finetunesweep", namespaced=True,
        subresources={"status"}, verbs={"get", "list", "watch", "create", "patch", "delete"})
    op = Operator(cluster)
    await op.start()
    try:
        def status():
            return cluster.objects[FTS, NS, "lr"]["status"]

        def trial(name):
            return cluster.objects[FTJ, NS, name]

        async def set_trial_status(name, st):
            if st.get("phase") == "Succeeded":  # as Kubeflow's controller would say it too:
                # the job's own reconcile (e.g. after promotion) reads its phase from there
                await asyncio.to_thread(
                    op.custom.patch_namespaced_custom_object_status, "kubeflow.org", "v1", NS,
                    "pytorchjobs", name, {"status": {"conditions": [
                        {"type": "Succeeded", "status": "True", "reason": "Done",
                         "message": "done"}]}})
            await asyncio.to_thread(op.custom.patch_namespaced_custom_object_status,
                                    "kubetune.io", "v1alpha1", NS, "finetunejobs", name,
                                    {"status": st})

        await asyncio.to_thread(op.custom.create_namespaced_custom_object, "kubetune.io",
                                "v1alpha1", NS, "finetunesweeps", _cluster_sweep())
        await eventually(lambda: _assert(status()["done"] == "0/3"))
        first = await eventually(lambda: trial("lr-1"))
        assert not exists(cluster, (FTJ, NS, "lr-2"))  # parallelism 2
        assert first["metadata"]["ownerReferences"][0]["uid"] == "uid-lr"
        assert first["metadata"]["labels"]["kubetune.io/sweep"] == "lr"
        assert first["spec"]["training"]["learningRate"] == 3e-4
        await eventually(lambda: cluster.objects[PTJ, NS, "lr-0"])  # trained like any job

        # lr-0 reports its eval loss, then succeeds
        await set_trial_status("lr-0", {"progress": {"step": 10, "metrics": {"eval_loss": 2.0}}})
        await eventually(lambda: _assert(status()["trials"][0]["observations"] == [
            {"step": 10, "value": 2.0}]))
        await set_trial_status("lr-0", {"phase": "Succeeded", "progress": {
            "step": 20, "metrics": {"eval_loss": 1.5}}, "outputs": {"metrics": {
                "eval_loss": 1.4}}})
        await eventually(lambda: _assert(status()["best"]["name"] == "lr-0"))
        await eventually(lambda: trial("lr-2"))  # its place taken by the next

        # lr-1 is behind lr-0 at step 10: stopped (suspended, annotated)
        await set_trial_status("lr-1", {"phase": "Running", "progress": {
            "step": 12, "metrics": {"eval_loss": 5.0}}})
        await eventually(lambda: _assert(trial("lr-1")["spec"]["suspend"] is True))
        assert trial("lr-1")["metadata"]["annotations"]["kubetune.io/stopped-early"] == "true"
        await eventually(lambda: _assert(status()["trials"][1]["stoppedEarly"] is True))

        # lr-2 succeeds worse than lr-0: the sweep is done, lr-0 promoted
        await set_trial_status("lr-2", {"phase": "Succeeded", "outputs": {"metrics": {
            "eval_loss": 1.9}}})
        await eventually(lambda: _assert(status()["done"] == "3/3"))
        await eventually(lambda: _assert(trial("lr-0")["spec"].get("serve") == {
            "weights": "adapter"}))
        conds = {c["type"]: c for c in status()["conditions"]}
        assert conds["Succeeded"]["status"] == "True" and conds["Ready"]["status"] == "True"
        assert conds["Ready"]["observedGeneration"] == 1
        assert status()["best"] == {"name": "lr-0", "parameters": {
            "training.learningRate": "0.0001"}, "value": 1.4}
        assert "serve" not in trial("lr-2")["spec"]

        # kubetune status --sweep: the trials, their values, the best
        import yaml
        from kubetune.cli import app
        from typer.testing import CliRunner

        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "k",
            "clusters": [{"name": "k", "cluster": {"server": str(cluster.url)}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "k", "context": {"cluster": "k", "user": "u",
                                                   "namespace": NS}}]}))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        res = await asyncio.to_thread(CliRunner().invoke, app, ["status", "--sweep", "lr"])
        assert res.exit_code == 0, res.output
        lines = res.output.splitlines()
        assert "trials ended: 3/3" in lines[0] and "minimize eval_loss" in lines[0]
        assert any("* lr-0" in x and "0.0001" in x and "1.4" in x for x in lines), res.output
        assert any("lr-1" in x and "stopped early" in x for x in lines), res.output
        assert "best: lr-0 (eval_loss 1.4)" in res.output
        res = await asyncio.to_thread(CliRunner().invoke, app, ["status", "--sweep", "nope"])
        assert res.exit_code == 2 and "no FineTuneSweep 'nope'" in res.output

        # every call it made is one the chart's ClusterRole allows
        from test_chart import _rules, render
        from test_operator import _operator_calls
        from tools import helm

        calls = _operator_calls(cluster)
        allowed = _rules(next(d for d in render(str(helm())) if d["kind"] == "ClusterRole"))
        denied = {c for c in calls if c[2] not in allowed.get((c[0], c[1]), set())}
        assert not denied, f"the chart's RBAC would refuse {sorted(denied)}"
        assert {("kubetune.io", "finetunesweeps", "watch"),
                ("kubetune.io", "finetunesweeps/status", "patch"),
                ("kubetune.io", "finetunejobs", "create")} <= calls
    finally:
        await op.stop()


def test_observations_are_kept_for_the_median_rule_only_and_bounded():
    assert sweeps.thin(list(range(1, 101)), 32) == list(range(4, 101, 4))
    assert sweeps.thin([1, 2, 3], 32) == [1, 2, 3]
    raw = _sweep(earlyStopping={"minSteps": 1000}, parallelism=1)
    made = _made(sweeps.decide(raw, {}, NOW))
    trials = {}
    for step in range(1, 101):
        trials["lr-0"] = _trial(made["lr-0"], "Running", step, 3.0 - step / 100)
        d, raw = _converged(raw, trials)
    steps = [o.step for o in d.status.trials[0].observations]
    assert len(steps) <= api.MAX_OBSERVATIONS and steps[-1] == 100 and steps[0] < 10
    trials["lr-0"] = _trial(made["lr-0"], "Failed", 100, 2.0)
    assert not sweeps.decide(raw, trials, NOW).status.trials[0].observations
    # without early stopping nothing is kept
    plain = _sweep()
    made = _made(sweeps.decide(plain, {}, NOW))
    d = sweeps.decide(plain, {"lr-0": _trial(made["lr-0"], "Running", 5, 2.0)}, NOW)
    assert not d.status.trials[0].observations


async def test_suspend_reaches_the_trials_and_a_deleted_sweep_makes_none(cluster):  # noqa: F811
    import asyncio

    from test_operator import FTJ, Operator, _assert, eventually

    cluster.resources[FTS] = cluster.ResourceInfo(
        kind="FineTuneSweep", singular="finetunesweep", namespaced=True,
        subresources={"status"}, verbs={"get", "list", "watch", "create", "patch", "delete"})
    op = Operator(cluster)
    await op.start()
    try:
        def patch_sweep(spec):
            return asyncio.to_thread(op.custom.patch_namespaced_custom_object, "kubetune.io",
                                     "v1alpha1", NS, "finetunesweeps", "lr", {"spec": spec})

        await asyncio.to_thread(op.custom.create_namespaced_custom_object, "kubetune.io",
                                "v1alpha1", NS, "finetunesweeps",
                                _cluster_sweep(earlyStopping=None, promote=None))
        await eventually(lambda: cluster.objects[FTJ, NS, "lr-1"])
        await patch_sweep({"suspend": True})
        await eventually(lambda: _assert(all(
            cluster.objects[FTJ, NS, n]["spec"].get("suspend") is True for n in ("lr-0",
                                                                                 "lr-1"))))
        await eventually(lambda: _assert(cluster.objects[FTS, NS, "lr"]["status"]["conditions"][
            0]["reason"] == "Suspended"))
        await patch_sweep({"suspend": False})
        await eventually(lambda: _assert(all(
            cluster.objects[FTJ, NS, n]["spec"].get("suspend") is False for n in ("lr-0",
                                                                                 "lr-1"))))
        await asyncio.to_thread(op.custom.delete_namespaced_custom_object, "kubetune.io",
                                "v1alpha1", NS, "finetunesweeps", "lr")
        # a trial ending after its sweep is gone: nothing new (kmock has no garbage collector)
        await asyncio.to_thread(op.custom.patch_namespaced_custom_object_status, "kubetune.io",
                                "v1alpha1", NS, "finetunejobs", "lr-0",
                                {"status": {"phase": "Succeeded"}})
        await asyncio.sleep(1)
        assert not exists(cluster, (FTJ, NS, "lr-2"))
        assert op.thread.is_alive()
    finally:
        await op.stop()


class _FakeApi:
    """SweepApi's calls on dicts: the converge's I/O without a server."""

    def __init__(self, sweep, jobs=None):
        self.sweep, self.jobs, self.patched = sweep, dict(jobs or {}), []

    def get(self, ns, name):
        return copy.deepcopy(self.sweep)

    def trials(self, ns, name, uid):
        return {n: j for n, j in self.jobs.items()
                if any(o["uid"] == uid for o in j["metadata"].get("ownerReferences") or [])}

    def create(self, body):
        name = body["metadata"]["name"]
        if name in self.jobs:
            return any(o["uid"] == body["metadata"]["ownerReferences"][0]["uid"]
                       for o in self.jobs[name]["metadata"].get("ownerReferences") or [])
        self.jobs[name] = body
        return True

    def patch_trial(self, ns, name, patch):
        self.patched.append((name, patch))

    def patch_status(self, ns, name, status):
        self.sweep["status"] = {k: v for k, v in status.items() if v is not None}


def test_a_trial_name_taken_by_another_job_stalls_the_sweep_until_it_is_gone():
    foreign = {"metadata": {"name": "lr-0", "ownerReferences": []}, "spec": {}}
    api = _FakeApi(_sweep(), {"lr-0": foreign})
    sweeps.SweepController(api).converge(NS, "lr", NOW)
    conds = {c["type"]: c for c in api.sweep["status"]["conditions"]}
    assert conds["Stalled"]["status"] == "True" and conds["Stalled"]["reason"] == "NameTaken"
    assert "FineTuneJob lr-0 exists" in conds["Stalled"]["message"]
    assert [t["name"] for t in api.sweep["status"]["trials"]] == ["lr-1"]
    del api.jobs["lr-0"]  # gone: the next converge makes it and goes on
    sweeps.SweepController(api).converge(NS, "lr", NOW)
    conds = {c["type"]: c for c in api.sweep["status"]["conditions"]}
    assert conds["Stalled"]["status"] == "False" and "lr-0" in api.jobs
    assert api.jobs["lr-0"]["metadata"]["ownerReferences"][0]["uid"] == "uid-lr"


def test_a_converge_writes_the_status_only_when_it_changed():
    api = _FakeApi(_sweep())
    sweeps.SweepController(api).converge(NS, "lr", NOW)
    first = copy.deepcopy(api.sweep["status"])
    writes = []
    api.patch_status = lambda ns, name, status: writes.append(status)
    sweeps.SweepController(api).converge(NS, "lr", "2026-12-07T13:00:00Z")
    assert api.sweep["status"] == first and not writes


def test_an_objective_at_a_step_is_read_from_the_reports_around_it():
    raw = _sweep(objective={"metric": "eval_loss", "step": 20}, parallelism=1)
    made = _made(sweeps.decide(raw, {}, NOW))
    trials = {}
    for step, value in ((10, 3.0), (18, 2.2), (26, 1.9)):  # no report at step 20 itself
        trials["lr-0"] = _trial(made["lr-0"], "Running", step, value)
        _, raw = _converged(raw, trials)
    trials["lr-0"] = _trial(made["lr-0"], "Succeeded", 30, 1.5, final=1.4)
    d, raw = _converged(raw, trials)
    assert d.status.trials[0].value == 2.2  # the value it had reached by step 20
    assert d.status.best.value == 2.2
