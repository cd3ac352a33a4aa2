"""training.reportTo: TensorBoard, W&B and MLflow through transformers' own callbacks.

``session`` sets what those callbacks read (variables, restored afterwards), starts the MLflow
run itself so that its URL is known, and at the end logs the final metrics (eval, predict,
lm-eval) to each tracker and returns the run URL for the status. The runs' ids are kept in
the output's tracking.json (uploaded with each checkpoint to a store), so a restarted run
continues the same MLflow and W&B runs. Credentials come only from
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

RUNS_FILE = "tracking.json"  # the trackers' run ids: a restarted run continues the same runs


@dataclass
class Session:
    report_to: list[str]
    run_name: str
    url: str | None = None
    _mlflow_run: Any = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self, root: Path) -> None:
        """Rank 0, once the output is in place (restored from a store): start the MLflow run,
        or continue the one in tracking.json; the same for W&B's run id."""
        import importlib.util
        import json

        path = root / RUNS_FILE
        try:
            runs = json.loads(path.read_text())
        except (OSError, ValueError):
            runs = {}
        if "mlflow" in self.report_to and importlib.util.find_spec("mlflow"):
            self._mlflow_run, self.url = _start_mlflow(
                os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_EXPERIMENT_NAME"],
                self.run_name, runs.get("mlflow"))
            runs["mlflow"] = self._mlflow_run.info.run_id
        if "wandb" in self.report_to and importlib.util.find_spec("wandb"):
            import uuid

            runs.setdefault("wandb", uuid.uuid4().hex[:12])
            os.environ["WANDB_RUN_ID"] = runs["wandb"]  # restored by session()
            os.environ["WANDB_RESUME"] = "allow"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(runs))
        tmp.rename(path)

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
def session(spec: Any, job_name: str, root: Path) -> Iterator[Session]:
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
    saved = {k: os.environ.get(k) for k in (*env, "WANDB_RUN_ID", "WANDB_RESUME")}
    os.environ.update(env)
    try:
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


def _start_mlflow(uri: str, experiment: str, run_name: str, run_id: str | None
                  ) -> tuple[Any, str | None]:
    """Start the run transformers' MLflowCallback then logs into (it uses an active run);
    ``run_id``: continue that run (a restart), when the server still has it."""
    import mlflow
    from kubetune.errors import KubetuneError

    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.set_experiment(experiment)
        run = None
        if run_id:
            with contextlib.suppress(mlflow.exceptions.MlflowException):
                run = mlflow.start_run(run_id=run_id)
        run = run or mlflow.start_run(run_name=run_name)
    except Exception as err:  # connection, auth and server errors: many types
        text = " ".join(str(err).split())[:500]
        raise KubetuneError(f"MLflow at {uri}: {type(err).__name__}: {text}",
                            field="spec.training.tracking") from None
    url = None
    if uri.startswith(("http://", "https://")):
        url = f"{uri.rstrip('/')}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    return run, url
