"""Prometheus metrics of the operator, on their own port (KUBETUNE_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter("kubetune_reconciles", "FineTuneJob reconciles, by result.", ["result"],
                     registry=REGISTRY)
RECONCILE_SECONDS = Histogram("kubetune_reconcile_seconds", "Time one reconcile takes.",
                              registry=REGISTRY)
CHILDREN_CREATED = Counter("kubetune_children_created", "Objects created, by kind.", ["kind"],
                           registry=REGISTRY)
PROGRESS_REPORTS = Counter("kubetune_progress_reports", "Progress reports, by HTTP status.",
                           ["code"], registry=REGISTRY)
PROGRESS_FIELDS_DROPPED = Counter(
    "kubetune_progress_fields_dropped",
    "Report fields dropped before they reach a status (NaN, out of range, wrong type), and "
    "snapshots dropped after the API server refused them, by field and reason.",
    ["field", "reason"], registry=REGISTRY)
STATUS_PATCHES = Counter("kubetune_progress_status_patches",
                         "Status patches written by the progress flusher, by result.",
                         ["result"], registry=REGISTRY)
JOBS = Gauge("kubetune_jobs", "FineTuneJobs seen by this replica, by phase.", ["phase"],
             registry=REGISTRY)

_phases: dict[tuple[str, str], str] = {}


def observe_phase(namespace: str, name: str, phase: str | None) -> None:
    """Track each job's last phase; the gauge counts jobs per phase."""
    key = (namespace, name)
    old = _phases.pop(key, None)
    if old is not None:
        JOBS.labels(old).dec()
    if phase is not None:
        _phases[key] = phase
        JOBS.labels(phase).inc()


def serve(port: int) -> None:
    start_http_server(port, registry=REGISTRY)
