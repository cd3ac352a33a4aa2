"""``kubetune sweep``: a FineTuneSweep's trials run here, one after another, each through the
same local run as ``kubetune run`` (in this process), with the median stopping rule applied
as the trial logs its objective; then a table of the results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune import sweep as sw
from kubetune.api.v1alpha1 import FineTuneSweep
from kubetune.errors import KubetuneError


@dataclass
class TrialResult:
    """How one trial went: its objective, where it stopped, what it wrote."""

    name: str
    parameters: sw.Assignment
    state: str = "pending"  # succeeded, stopped (early stopping), failed
    value: float | None = None
    steps: int | None = None
    stopped_at: int | None = None
    error: str | None = None
    logged: dict[int, float] = field(default_factory=dict)  # step -> objective
    result: dict[str, Any] = field(default_factory=dict)  # the run's result.json


def _stopper(running: dict[int, float], completed: list[dict[int, float]], sweep: FineTuneSweep,
             stopped: list[int]) -> Any:
    """A TrainerCallback that records the objective as it is logged and ends the training
    when the median rule says so (the run then finishes as at its last step: saved,
    evaluated)."""
    from transformers import TrainerCallback

    objective, rule = sweep.spec.objective, sweep.spec.early_stopping

    class MedianStop(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any
                   ) -> None:
            record = {"step": state.global_step, **(logs or {})}
            running.update(sw.observations([record], objective.metric))
            if rule is None or stopped:
                return
            at = sw.median_stops(running, completed, direction=objective.direction,
                                 min_steps=rule.min_steps, min_trials=rule.min_trials)
            if at is not None:
                stopped.append(at)
                control.should_training_stop = True

    return MedianStop()


def run_sweep(sweep: FineTuneSweep, ctx: Any, *, log: Callable[[str], None] = print
              ) -> list[TrialResult]:
    """Every trial, in order (all validated first, by ``kubetune.sweep.plan``)."""
    from kubetune_trainer.progress import read_progress
    from kubetune_trainer.train import run as train

    trials = sw.plan(sweep)
    for t in trials:
        if t.job.spec.resources.strategy != "ddp":
            raise KubetuneError("kubetune sweep runs each trial in this process (one "
                                f"process, strategy ddp); {t.name} asks for "
                                f"{t.job.spec.resources.strategy}", field="spec.template")
    objective = sweep.spec.objective
    completed: list[dict[int, float]] = []  # the objective by step of each succeeded trial
    results = []
    for i, trial in enumerate(trials, 1):
        given = ", ".join(f"{p}={sw.show(v)}" for p, v in trial.parameters.items())
        log(f"trial {i}/{len(trials)}: {trial.name} ({given})")
        out = TrialResult(name=trial.name, parameters=trial.parameters)
        results.append(out)
        stopped: list[int] = []
        try:
            out.result = train(trial.job, ctx, log=log,
                               callbacks=(_stopper(out.logged, completed, sweep, stopped),))
        except KubetuneError as e:
            out.state, out.error = "failed", str(e)
            log(f"trial {trial.name} failed: {e}")
            continue
        # Everything it logged (a resumed run's earlier steps too), from its own progress file.
        out.logged.update(sw.observations(read_progress(Path(out.result["progress"])),
                                          objective.metric))
        out.steps = out.result.get("global_step")
        out.value = sw.objective_value(objective.metric, objective.step,
                                       out.result.get("metrics"), out.logged)
        if stopped:
            out.state, out.stopped_at = "stopped", stopped[0]
            log(f"trial {trial.name} stopped at step {stopped[0]}: worse than the median of "
                f"the completed trials")
        else:
            out.state = "succeeded"
            completed.append(dict(out.logged))
    return results


def write_summary(sweep: FineTuneSweep, results: list[TrialResult], ctx: Any) -> Path:
    """sweep.json beside the trials' folders (under the template's output): every trial's
    values, state, steps, objective and folder, and the best, for scripts to read."""
    import json

    from kubetune_trainer.outputs import output_root

    root = output_root(sweep.spec.template, ctx)
    winner = best(results, sweep.spec.objective.direction)
    summary = {
        "sweep": sweep.metadata.name,
        "objective": sweep.spec.objective.model_dump(by_alias=True, exclude_none=True),
        "best": winner.name if winner else None,
        "trials": [{"name": r.name, "parameters": r.parameters, "state": r.state,
                    "steps": r.steps, "value": r.value, "stoppedAt": r.stopped_at,
                    "error": r.error,
                    "output": str(Path(r.result["progress"]).parent.resolve())
                    if r.result.get("progress") else None} for r in results],
    }
    root.mkdir(parents=True, exist_ok=True)
    path = (root / "sweep.json").resolve()
    path.write_text(json.dumps(summary, indent=1) + "\n")
    return path


def best(results: list[TrialResult], direction: str) -> TrialResult | None:
    """The best succeeded trial (an early-stopped one never wins)."""
    values = [r.value if r.state == "succeeded" else None for r in results]
    i = sw.best_index(values, direction)
    return results[i] if i is not None else None


def plan_table(sweep: FineTuneSweep) -> Any:
    """The trials a sweep would run (each checked by the job parser first: a refused one is
    the KubetuneError ``plan`` raises), as a rich Table."""
    from rich.table import Table

    trials = sw.plan(sweep)
    spec = sweep.spec
    t = Table(title=f"FineTuneSweep {sweep.metadata.name}: {len(trials)} trials "
              f"({spec.algorithm.type}), every spec valid")
    t.add_column("trial")
    paths = [p.path for p in spec.parameters]
    for path in paths:
        t.add_column(path, justify="right")
    t.add_column("output")
    for trial in trials:
        t.add_row(trial.name, *(sw.show(trial.parameters[p]) for p in paths),
                  trial.job.spec.output.uri)
    return t


def table(sweep: FineTuneSweep, results: list[TrialResult]) -> Any:
    """The results as a rich Table: a row per trial, the best marked."""
    from rich.table import Table

    objective = sweep.spec.objective
    winner = best(results, objective.direction)
    metric = objective.metric + (f" @ {objective.step}" if objective.step else "")
    t = Table(title=f"FineTuneSweep {sweep.metadata.name}: {objective.direction} {metric}")
    t.add_column("trial")
    paths = [p.path for p in sweep.spec.parameters]
    for path in paths:
        t.add_column(path, justify="right")
    t.add_column("steps", justify="right")
    t.add_column(metric, justify="right")
    t.add_column("state")
    for r in results:
        state = {"stopped": f"stopped at {r.stopped_at}",
                 "failed": f"failed: {(r.error or '')[:60]}"}.get(r.state, r.state)
        t.add_row(("* " if r is winner else "  ") + r.name,
                  *(sw.show(r.parameters[p]) for p in paths),
                  str(r.steps if r.steps is not None else "-"),
                  f"{r.value:.4f}" if r.value is not None else "-",
                  state + (" (best)" if r is winner else ""))
    return t
