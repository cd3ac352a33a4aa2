"""The Argo CD health check (Lua), run by a real Lua interpreter (lupa)."""

from __future__ import annotations

from pathlib import Path

import lupa  # a real Lua interpreter (the dev extra)
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = (REPO / "charts" / "kubetune" / "files" / "argocd-health.lua").read_text()


def health(obj: dict) -> dict:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPT)
    return {"status": result["status"], "message": result["message"]}


def job(phase=None, generation=2, observed=2, conditions=(), progress=None):
    status = {"phase": phase, "observedGeneration": observed,
              "conditions": [{"type": t, "status": s, "reason": r, "message": m}
                             for t, s, r, m in conditions]}
    if progress:
        status["progress"] = progress
    return {"metadata": {"name": "j", "generation": generation},
            "status": status if phase or observed else None}


@pytest.mark.parametrize(("obj", "status", "message"), [
    (job("Pending", conditions=[("Ready", "False", "Creating", "creating the PyTorchJob")]),
     "Progressing", "pending: creating the PyTorchJob"),
    (job("Queued", conditions=[("Ready", "False", "WaitingForAdmission",
                                "waiting for Kueue to admit it from queue 'a'")]),
     "Progressing", "queued: waiting for Kueue"),
    (job("Validating", conditions=[("Ready", "False", "Validating", "the pre-flight pod")]),
     "Progressing", "validating: the pre-flight pod"),
    (job("Running", progress={"percent": 42.5}), "Progressing", "training 42.5%"),
    (job("Succeeded"), "Healthy", "training finished"),
    (job("Failed", conditions=[("Stalled", "True", "OOMKilled", "pod j-master-0 ran out")]),
     "Degraded", "OOMKilled: pod j-master-0 ran out"),
    (job("Pending", conditions=[("Stalled", "True", "PyTorchJobNotInstalled",
                                 "this cluster does not serve PyTorchJob")]),
     "Degraded", "PyTorchJobNotInstalled: this cluster does not serve PyTorchJob"),
    (job("Suspended"), "Suspended", "suspended"),
    (job("Running", generation=3, observed=2), "Unknown", "observe generation 3"),
    ({"metadata": {"name": "j", "generation": 1}}, "Unknown", "observe generation 1"),
])
def test_health(obj, status, message):
    got = health(obj)
    assert got["status"] == status
    assert got["message"].startswith(message) or message in got["message"], got


def test_the_gitops_example_carries_the_same_script():
    import yaml

    cm = yaml.safe_load((REPO / "examples" / "gitops" / "argocd-cm.yaml").read_text())
    assert cm["data"]["resource.customizations.health.kubetune.io_FineTuneJob"].strip() == \
        SCRIPT.strip()


SWEEP_SCRIPT = (REPO / "charts" / "kubetune" / "files" / "argocd-health-sweep.lua").read_text()


def sweep_health(obj: dict) -> dict:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SWEEP_SCRIPT)
    return {"status": result["status"], "message": result["message"]}


def sweep(conditions=(), done="1/4", best=None, suspend=False, generation=2, observed=2):
    status = {"observedGeneration": observed, "done": done,
              "conditions": [{"type": t, "status": s, "reason": r, "message": m}
                             for t, s, r, m in conditions]}
    if best:
        status["best"] = {"name": best, "value": 1.0, "parameters": {}}
    return {"metadata": {"name": "s", "generation": generation},
            "spec": {"suspend": suspend}, "status": status}


@pytest.mark.parametrize(("obj", "status", "message"), [
    (sweep([("Ready", "True", "TrialsRunning", "1/4 trials ended")], best="s-0"),
     "Progressing", "1/4 trials ended, best so far s-0"),
    (sweep([("Ready", "True", "Completed", "best: s-2 (eval_loss 1.2)"),
            ("Succeeded", "True", "Completed", "best: s-2 (eval_loss 1.2)")], done="4/4"),
     "Healthy", "sweep finished, best: s-2"),
    (sweep([("Stalled", "True", "InvalidSpec", "trial s-1 (x=2) is not a valid FineTuneJob")]),
     "Degraded", "InvalidSpec: trial s-1"),
    (sweep([("Stalled", "True", "NoTrialSucceeded", "no trial succeeded"),
            ("Succeeded", "False", "NoTrialSucceeded", "no trial succeeded")], done="4/4"),
     "Degraded", "NoTrialSucceeded"),
    (sweep([("Ready", "True", "Suspended", "suspended")], suspend=True), "Suspended",
     "suspended, 1/4 trials ended"),
    (sweep(generation=3, observed=2), "Unknown", "waiting for the kubetune operator to observe"),
])
def test_sweep_health(obj, status, message):
    got = sweep_health(obj)
    assert got["status"] == status
    assert got["message"].startswith(message), got


def test_the_gitops_example_carries_the_sweep_script():
    import yaml

    cm = yaml.safe_load((REPO / "examples" / "gitops" / "argocd-cm.yaml").read_text())
    assert cm["data"]["resource.customizations.health.kubetune.io_FineTuneSweep"].strip() == \
        SWEEP_SCRIPT.strip()
