"""training.reportTo: TensorBoard, W&B and MLflow through transformers' own callbacks.

``session`` sets what those callbacks read (variables, restored afterwards), starts the MLflow
run itself so that its URL is known, and at the end logs the final metrics (eval, predict,
lm-eval) to each tracker and returns the run URL for the status. Credentials come only from
``training.tracking.secretRef`` (``kubetune.credentials``): in a pod they are already in the
environment; locally they are read from the Secret directory into it for the run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.credentials import lookup, tracking_variables


@dataclass
class Session:
    report_to: list[str]
    run_name: str
    url: str | None = None
    _mlflow_run: Any = None
    env: dict[str, str] = field(default_factory=dict)

    def finish(self, metrics: dict[str, float]) -> str | None:
        """Log the run's final metrics and close the trackers' runs; returns the run URL."""
        final = {f"final/{k}": v for k, v in metrics.items()}
        if self._mlflow_run is not None:
            import mlflow

            mlflow.log_metrics({k.replace("/", "_"): v for k, v in final.items()})
            mlflow.end_run()
        if "wandb" in self.report_to:
            import wandb

            if wandb.run is not None:
                wandb.run.summary.update(final)
                self.url = self.url or wandb.run.url  # None offline
                wandb.finish()
        return self.url


def _namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    try:
        return path.read_text().strip() or "kubetune"
    except OSError:
        return "kubetune"


@contextlib.contextmanager
def session(spec: Any, job_name: str, root: Path, *, main: bool) -> Iterator[Session]:
    """Around the whole run: the trackers' settings in the environment (restored after)."""
    report = list(spec.training.report_to or [])
    t = spec.training.tracking
    s = Session(report, (t.run_name if t and t.run_name else None) or job_name)
    if not report:
        yield s
        return
    env: dict[str, str] = {}
    for var in tracking_variables(spec):  # locally: from the Secret directory
        if (value := lookup(var)) and var.env not in os.environ:
            env[var.env] = value
    if "tensorboard" in report:
        env["TENSORBOARD_LOGGING_DIR"] = str(root / "runs")
    if "wandb" in report:
        env["WANDB_PROJECT"] = (t.project if t and t.project else None) or _namespace()
        env["WANDB_DIR"] = str(root)
        env.setdefault("WANDB_SILENT", "true")
    if "mlflow" in report:
        uri = (t.uri if t and t.uri else None) or os.environ.get("MLFLOW_TRACKING_URI") or \
            (root / "mlruns").as_uri()
        env["MLFLOW_TRACKING_URI"] = uri
        env["MLFLOW_EXPERIMENT_NAME"] = (t.experiment if t and t.experiment else None) or \
            _namespace()
        # An unreachable server fails the run in seconds, not after MLflow's 7 retries.
        for k, v in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"),
                     ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
            if k not in os.environ:
                env[k] = v
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import importlib.util

        if "mlflow" in report and main and importlib.util.find_spec("mlflow"):
            s._mlflow_run, s.url = _start_mlflow(env["MLFLOW_TRACKING_URI"],
                                                 env["MLFLOW_EXPERIMENT_NAME"], s.run_name)
        yield s
    finally:
        if s._mlflow_run is not None:  # failed before finish(): close it as failed
            import mlflow

            if mlflow.active_run() is not None:
                mlflow.end_run(status="FAILED")
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _start_mlflow(uri: str, experiment: str, run_name: str) -> tuple[Any, str | None]:
    """Start the run transformers' MLflowCallback then logs into (it uses an active run)."""
    import mlflow
    from kubetune.errors import KubetuneError

    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name=run_name)
    except Exception as err:  # connection, auth and server errors: many types
        text = " ".join(str(err).split())[:500]
        raise KubetuneError(f"MLflow at {uri}: {type(err).__name__}: {text}",
                            field="spec.training.tracking") from None
    url = None
    if uri.startswith(("http://", "https://")):
        url = f"{uri.rstrip('/')}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    return run, url
