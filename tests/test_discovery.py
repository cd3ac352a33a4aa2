"""Which kinds the API server serves (``discovery.Served``) and what a job then says (pure)."""

from __future__ import annotations

import logging

from kubetune_operator.backends import backend_named
from kubetune_operator.discovery import Served, backend_need, kueue_need
from kubetune_operator.status import Observed, reduce_status

PTJ = backend_need(backend_named("PyTorchJob"))


class Discovery:
    """An API server's discovery: group/version -> plurals, counted per ask."""

    def __init__(self, **served: frozenset[str]) -> None:
        self.served = {k.replace("_", "."): v for k, v in served.items()}
        self.asked: list[str] = []

    def __call__(self, api_version: str) -> frozenset[str] | None:
        self.asked.append(api_version)
        return self.served.get(api_version)


def test_a_missing_kind_is_asked_once_logged_once_and_found_by_refresh(caplog):
    caplog.set_level(logging.INFO, logger="kubetune.operator")
    api = Discovery()
    served = Served(api)
    assert all(served.missing(PTJ) for _ in range(50))  # fifty jobs' converges
    assert api.asked == ["kubeflow.org/v1"] and served.waiting("kubeflow.org/v1")
    assert served.refresh() == [] and len(api.asked) == 2  # one ask per re-check
    said = [r.getMessage() for r in caplog.records if "not served" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("PyTorchJob (kubeflow.org/v1 pytorchjobs)")
    api.served["kubeflow.org/v1"] = frozenset({"pytorchjobs", "tfjobs"})
    assert served.refresh() == ["kubeflow.org/v1"]
    assert not served.missing(PTJ) and served.served(PTJ) and not served.waiting("kubeflow.org/v1")
    assert served.refresh() == [] and len(api.asked) == 3  # nothing missing: nothing asked


def test_a_group_served_without_the_kind_is_missing_and_forget_asks_again():
    api = Discovery(kubeflow_org_v1=frozenset({"tfjobs"}))
    served = Served(api)
    assert served.missing(PTJ) and served.waiting("kubeflow.org/v1")
    api.served["kubeflow.org/v1"] = frozenset({"tfjobs", "pytorchjobs"})
    assert served.refresh() == ["kubeflow.org/v1"]
    del api.served["kubeflow.org/v1"]  # the CRD deleted later: a create answers 404
    assert not served.missing(PTJ)  # still believed, until forgotten
    served.forget("kubeflow.org/v1")
    assert served.missing(PTJ)


def test_the_builtin_job_backend_needs_no_add_on():
    assert backend_need(backend_named("Job")) is None
    assert backend_need(backend_named("TrainJob")).reason == "TrainJobNotInstalled"


def test_a_missing_kind_is_pending_and_stalled_not_failed():
    kueue = kueue_need("team-a", from_default=False)
    status = reduce_status(Observed(generation=1, backend=backend_named("PyTorchJob"),
                                    missing=(kueue.reason, kueue.message)), {},
                           "2026-12-07T10:00:00Z")
    conds = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Pending"
    assert conds["Stalled"]["status"] == "True" and conds["Stalled"]["reason"] == \
        "KueueNotInstalled"
    assert "kueue.x-k8s.io/queue-name=team-a" in conds["Stalled"]["message"]
    # kstatus reads Reconciling first: False, so the job reads as stalled, not in progress.
    assert conds["Reconciling"]["status"] == "False"
    assert conds["Reconciling"]["reason"] == "KueueNotInstalled"
    assert conds["Ready"]["status"] == "False"
    assert "Failed" not in conds and "Succeeded" not in conds
