"""What only matters in a cluster, on top of the API's own rules. Pure: no I/O.

The reconciler turns a problem into the ``Stalled``/``InvalidSpec`` condition (and makes no
children); ``kubetune render`` refuses the same job with the same message.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.jobfile import format_validation_error, validate_job
from kubetune.urls import redact
from pydantic import ValidationError

from kubetune_operator.apiserver import CURRENT, ApiServer
from kubetune_operator.backends import Backend

CLUSTER_SOURCES = ("pvc://", "hf://", "https://", "http://", "s3://", "gs://", "embedded://")
# Object stores too: the pod stages the run on its scratch volume and uploads from there; a
# new pod resumes from the newest checkpoint in the store (hf://: from its staging only).
CLUSTER_OUTPUTS = ("pvc://", "s3://", "gs://", "hf://")


def cluster_problem(job: FineTuneJob, backend: Backend | None = None,
                    server: ApiServer = CURRENT, queued: bool = False) -> str | None:
    """Why ``job`` cannot run in a cluster (naming the field), or None. ``server``: what the
    API server can do; ``queued``: the job goes through a Kueue queue."""
    spec = job.spec
    fields = [("spec.model.source", spec.model.source)] * bool(spec.model.source) + [
        (f"spec.datasets[{i}].source", d.source) for i, d in enumerate(spec.datasets)]
    for field, uri in fields:
        if not uri.startswith(CLUSTER_SOURCES):
            return (f"{field}: {redact(uri)!r} is a local path, which has no meaning in a "
                    "cluster; use pvc://CLAIM/path, hf://, https://, s3:// or gs://")
    out = spec.output.uri
    if not out.startswith(CLUSTER_OUTPUTS):
        return (f"spec.output.uri: {redact(out)!r} is a local path, which has no meaning in a "
                "cluster; use pvc://CLAIM/path, s3://BUCKET/path, gs://BUCKET/path or "
                "hf://ORG/NAME")
    if spec.serve is not None and out.startswith(("s3://", "gs://")):
        return (f"spec.serve: the server reads the weights from the job's volume claim or "
                f"the Hub, not from {out.split(':')[0]}://; write the output to pvc:// or "
                "hf:// to serve it, or turn serve off")
    return backend.refuses(job, server, queued) if backend is not None else None


def validate(body: dict[str, Any], backend: Backend | None = None,
             server: ApiServer = CURRENT, queued: bool = False
             ) -> tuple[FineTuneJob | None, str | None]:
    """Parse a FineTuneJob as read from the API with the API models, then the cluster rules.

    Returns (job, None) or (None, message naming the field).
    """
    doc = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
           "metadata": {"name": body["metadata"]["name"],
                        "namespace": body["metadata"].get("namespace")},
           "spec": body.get("spec") or {}}
    try:
        job = validate_job(doc)  # as the CLI reads a file: camelCase only, strict
    except ValidationError as err:
        return None, format_validation_error(err)
    problem = cluster_problem(job, backend, server, queued)
    return (None, problem) if problem else (job, None)
