"""The Flux health expressions, evaluated by a real CEL engine on FineTuneJob statuses."""

from __future__ import annotations

from pathlib import Path

import cel
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = list(yaml.safe_load_all((REPO / "examples" / "gitops" / "flux.yaml").read_text()))
EXPRS = next(d for d in DOCS if d and d["kind"] == "Kustomization")["spec"][
    "healthCheckExprs"][0]


def _obj(phase, generation=1, observed=1, true=()):
    conds = [{"type": t, "status": "True" if t in true else "False"}
             for t in ("Ready", "Stalled", "Reconciling")]
    return {"metadata": {"name": "j", "generation": generation},
            "status": {"phase": phase, "observedGeneration": observed, "conditions": conds}}


def _verdict(obj):
    for key in ("inProgress", "failed", "current"):  # Flux's order
        if cel.evaluate(EXPRS[key], obj):
            return key
    return "inProgress"


@pytest.mark.parametrize(("obj", "want"), [
    (_obj("Pending", true={"Reconciling"}), "inProgress"),
    (_obj("Queued", true={"Reconciling"}), "inProgress"),
    (_obj("Running", true={"Ready"}), "current"),  # a long run is healthy, not pending
    (_obj("Succeeded", true={"Ready"}), "current"),
    (_obj("Failed", true={"Stalled"}), "failed"),
    (_obj("Running", generation=2, observed=1, true={"Ready"}), "inProgress"),
])
def test_flux_health(obj, want):
    assert _verdict(obj) == want


def test_gitops_examples_parse():
    for path in (REPO / "examples" / "gitops").glob("*.yaml"):
        assert all(isinstance(d, dict) and d.get("kind") for d in
                   yaml.safe_load_all(path.read_text()) if d is not None), path


def test_flux_waits_on_sweeps_by_the_same_conditions():
    exprs = next(d for d in DOCS if d and d["kind"] == "Kustomization")["spec"][
        "healthCheckExprs"]
    sweep = next(e for e in exprs if e["kind"] == "FineTuneSweep")
    assert {k: v for k, v in sweep.items() if k != "kind"} == {
        k: v for k, v in EXPRS.items() if k != "kind"}
