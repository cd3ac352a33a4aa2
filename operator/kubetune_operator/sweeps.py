"""FineTuneSweep on a cluster: its trials are FineTuneJobs it owns (the FineTuneJob handlers
train them like any other job, Kueue queues them like any other job).

One converge per sweep, level-triggered: observe (the sweep, its trials by label) -> decide
(``decide``: pure, typed, unit-tested) -> act (create trials, patch their spec) -> write the
status once, only if it changed. It runs on every event of the sweep and of its trials (a
trial's progress is what the median rule reads).

- Every trial is planned and validated (``kubetune.sweep.plan``) before the first is created;
  an invalid combination stalls the sweep (condition Stalled, reason InvalidSpec) and nothing
  is created.
- At most ``parallelism`` trials are in flight (not Succeeded, Failed or stopped early).
- ``spec.suspend`` suspends every trial in flight (and creates none); unset, they resume.
- The median rule stops a trial by suspending it (its checkpoints stay; it is marked with the
  ``kubetune.io/stopped-early`` annotation so that a resumed sweep leaves it suspended). The
  objective is read from the trial's status.progress as it is reported; a completed trial's
  value at a step is its last one reported at or before that step (reports come every few
  seconds, not at every logged step).
- Deleting a sweep deletes its trials (owner references); their outputs stay where written.
- ``promote``: once every trial has ended, the best one gets ``spec.serve`` (the FineTuneJob
  handlers serve it, under spec.serve's rules, checked by ``plan`` first, and its gate: the
  trial is served only if its final metrics pass ``promote.gate``). The Promoted condition
  says which, by the same check (``gate_verdict``) the trial's serving makes; a best trial
  that misses the gate is not served, and no other trial is served in its place.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from kubetune import sweep as sw
from kubetune.api.v1alpha1 import (
    API_VERSION,
    GROUP,
    KIND,
    MAX_OBSERVATIONS,
    PLURAL,
    SWEEP_KIND,
    SWEEP_PLURAL,
    VERSION,
    BestTrial,
    Condition,
    FineTuneSweepStatus,
    Observation,
    TrialStatus,
    gate_verdict,
)
from kubetune.errors import KubetuneError

from kubetune_operator.kube import Kube, now, owned_by, ref

log = logging.getLogger("kubetune.operator.sweeps")
STOPPED_EARLY = "kubetune.io/stopped-early"  # annotation on a trial the median rule stopped
ENDED = ("Succeeded", "Failed", "Stopped")


@dataclass
class Decision:
    """What a converge does: trials to create, merge patches of trials, the new status."""

    create: list[dict[str, Any]] = field(default_factory=list)
    patch: dict[str, dict[str, Any]] = field(default_factory=dict)  # trial name -> patch
    status: FineTuneSweepStatus = field(default_factory=FineTuneSweepStatus)


def _cond(type_: str, ok: bool, reason: str, message: str, generation: int | None
          ) -> Condition:
    return Condition(type=type_, status="True" if ok else "False", reason=reason,
                     message=message, observed_generation=generation)


def _keep_times(new: list[Condition], old: list[dict[str, Any]], now: str) -> list[Condition]:
    before = {c.get("type"): c for c in old}
    for c in new:
        prev = before.get(c.type) or {}
        c.last_transition_time = (prev.get("lastTransitionTime", now)
                                  if prev.get("status") == c.status else now)
    return new


def _value_by(logged: dict[int, float], step: int) -> float | None:
    """A completed trial's objective as it stood at ``step``: its last report at or before."""
    earlier = [s for s in logged if s <= step]
    return logged[max(earlier)] if earlier else None


def _objective(objective: Any, final: dict[str, Any] | None, seen: dict[int, float]
               ) -> float | None:
    """``kubetune.sweep.objective_value``, for reports that come every few seconds: at a
    step, the value reported then, or the last one before it once the trial is past it."""
    if objective.step is not None and objective.step not in seen and seen and max(
            seen) > objective.step:
        return _value_by(seen, objective.step)
    return sw.objective_value(objective.metric, objective.step, final, seen)


def thin(steps: list[int], limit: int = MAX_OBSERVATIONS) -> list[int]:
    """At most ``limit`` of the (sorted) steps, spread over the run: every other one is
    dropped, the newest always kept, until they fit."""
    while len(steps) > limit:
        steps = steps[-1::-2][::-1] if len(steps) % 2 == 0 else steps[::2]
    return steps


def _owner(raw: dict[str, Any]) -> dict[str, Any]:
    meta = raw["metadata"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": SWEEP_KIND, "name": meta["name"],
            "uid": meta.get("uid"), "controller": True, "blockOwnerDeletion": True}


def decide(raw: dict[str, Any], trials: dict[str, dict[str, Any]], now: str) -> Decision:
    """The converge of one sweep, from the sweep as read and its trials by name."""
    meta = raw["metadata"]
    generation = meta.get("generation")
    old = raw.get("status") or {}
    out = Decision()
    try:
        sweep = sw.parse_sweep({k: v for k, v in raw.items() if k != "status"})
        planned = sw.plan(sweep)
    except KubetuneError as e:
        out.status = FineTuneSweepStatus.model_validate(
            {k: v for k, v in old.items() if k in ("trials", "best", "trialsTotal",
                                                   "trialsDone", "done")})
        out.status.observed_generation = generation
        msg = str(e)[:4000]
        out.status.conditions = _keep_times([
            _cond("Ready", False, "InvalidSpec", msg, generation),
            _cond("Stalled", True, "InvalidSpec", msg, generation),
            _cond("Reconciling", False, "InvalidSpec", "nothing is created", generation),
        ], old.get("conditions") or [], now)
        return out
    spec, objective, rule = sweep.spec, sweep.spec.objective, sweep.spec.early_stopping
    before = {t.get("name"): t for t in old.get("trials") or []}
    rows: list[TrialStatus] = []
    logged: dict[str, dict[int, float]] = {}
    in_flight = 0
    for trial in planned:
        body = trials.get(trial.name)
        if body is None:
            continue
        st = body.get("status") or {}
        prev = before.get(trial.name) or {}
        seen = {o["step"]: o["value"] for o in prev.get("observations") or []}
        seen.update(sw.observations([st.get("progress") or {}], objective.metric))
        logged[trial.name] = seen
        stopped = (body["metadata"].get("annotations") or {}).get(STOPPED_EARLY) == "true"
        phase = "Stopped" if stopped else st.get("phase") or "Pending"  # no status yet
        value = _objective(objective, (st.get("outputs") or {}).get("metrics"), seen)
        # Kept for the median rule and an objective at a step only: of trials that run, or
        # succeeded.
        keep = (rule is not None or objective.step is not None) and phase not in (
            "Failed", "Stopped")
        steps = thin(sorted(seen)) if keep else []
        rows.append(TrialStatus(
            name=trial.name, parameters={p: sw.show(v) for p, v in trial.parameters.items()},
            phase=phase, value=value if phase in ("Succeeded", "Stopped") else None,
            stopped_early=stopped,
            observations=[Observation(step=s, value=seen[s]) for s in steps]))
        if phase not in ENDED:
            in_flight += 1
    completed = [logged[r.name] for r in rows if r.phase == "Succeeded"]

    # The median rule, on trials in flight.
    if rule is not None and not spec.suspend:
        for r in rows:
            if r.phase in ENDED or not logged[r.name]:
                continue
            running = logged[r.name]
            filled = [{s: v for s in running if (v := _value_by(c, s)) is not None}
                      for c in completed]
            at = sw.median_stops(running, filled, direction=objective.direction,
                                 min_steps=rule.min_steps, min_trials=rule.min_trials)
            if at is not None:
                out.patch[r.name] = {"metadata": {"annotations": {STOPPED_EARLY: "true"}},
                                     "spec": {"suspend": True}}
                r.phase, r.stopped_early = "Stopped", True
                r.value = _objective(objective, None, running)
                in_flight -= 1

    # Suspend carried to the trials in flight (stopped ones stay suspended).
    for r in rows:
        if r.phase in ENDED or r.name in out.patch:
            continue
        suspended = bool((trials[r.name].get("spec") or {}).get("suspend"))
        if suspended != spec.suspend:
            out.patch[r.name] = {"spec": {"suspend": spec.suspend}}

    # New trials, in order, while fewer than parallelism are in flight.
    if not spec.suspend:
        for trial in planned:
            if in_flight >= spec.parallelism:
                break
            if trial.name in trials:
                continue
            doc = sw.trial_document(sweep, trial.index, trial.parameters)
            doc["metadata"]["namespace"] = meta["namespace"]
            doc["metadata"]["ownerReferences"] = [_owner(raw)]
            out.create.append(doc)
            rows.append(TrialStatus(name=trial.name, parameters={
                p: sw.show(v) for p, v in trial.parameters.items()}, phase="Pending"))
            in_flight += 1
    order = {t.name: t.index for t in planned}
    rows.sort(key=lambda r: order[r.name])

    # The best so far (a stopped trial never wins), and promotion once all have ended.
    succeeded = [r for r in rows if r.phase == "Succeeded"]
    best_i = sw.best_index([r.value for r in succeeded], objective.direction)
    best = succeeded[best_i] if best_i is not None else None
    done = sum(r.phase in ENDED for r in rows)
    finished = done == len(planned)
    promoted: list[Condition] = []
    if finished and best is not None and spec.promote is not None:
        serve = spec.promote.model_dump(by_alias=True, exclude_unset=True, mode="json")
        if (trials.get(best.name) or {}).get("spec", {}).get("serve") != serve:
            out.patch.setdefault(best.name, {}).setdefault("spec", {})["serve"] = serve
        promoted = [_promoted(spec.promote, best.name, trials.get(best.name) or {},
                              generation)]
    out.status = FineTuneSweepStatus(
        observed_generation=generation, trials=rows, trials_total=len(planned),
        trials_done=done, done=f"{done}/{len(planned)}",
        best=BestTrial(name=best.name, parameters=best.parameters, value=best.value)
        if best is not None and best.value is not None else None,
        conditions=_keep_times(_conditions(spec, rows, best, finished, done, len(planned),
                                           generation) + promoted,
                               old.get("conditions") or [], now))
    return out


def _promoted(promote: Any, name: str, trial: dict[str, Any], generation: int | None
              ) -> Condition:
    """Whether the best trial is served under ``promote``: its gate against the trial's
    final metrics, the same check its own serving makes (``gate_verdict``)."""
    metrics = ((trial.get("status") or {}).get("outputs") or {}).get("metrics")
    verdict = gate_verdict(promote.gate, metrics)
    if not verdict.passed:
        return _cond("Promoted", False, verdict.reason or "GateNotMet",
                     f"trial {name} is not served: {verdict.message}", generation)
    gate = f" (gate passed: {verdict.message})" if verdict.message else ""
    return _cond("Promoted", True, "Promoted", f"trial {name} is served under spec.promote"
                 f"{gate}; its status.serving says where", generation)


def _conditions(spec: Any, rows: list[TrialStatus], best: TrialStatus | None, finished: bool,
                done: int, total: int, generation: int | None) -> list[Condition]:
    """kstatus: Ready while the sweep goes as it should (and once it has a best), Reconciling
    while trials are left, Stalled when it ended with no trial succeeded, Succeeded for the
    outcome."""
    metric = spec.objective.metric
    if not finished:
        why = "Suspended" if spec.suspend else "TrialsRunning"
        text = (f"suspended: {done}/{total} trials ended" if spec.suspend
                else f"{done}/{total} trials ended, at most {spec.parallelism} at a time")
        return [_cond("Ready", True, why, text, generation),
                _cond("Reconciling", True, why, text, generation),
                _cond("Stalled", False, why, text, generation)]
    if best is None:
        failed = sum(r.phase == "Failed" for r in rows)
        text = (f"no trial succeeded with a value of {metric} ({failed} failed, "
                f"{sum(r.phase == 'Stopped' for r in rows)} stopped early)")
        return [_cond("Ready", False, "NoTrialSucceeded", text, generation),
                _cond("Reconciling", False, "NoTrialSucceeded", text, generation),
                _cond("Stalled", True, "NoTrialSucceeded", text, generation),
                _cond("Succeeded", False, "NoTrialSucceeded", text, generation)]
    text = f"best: {best.name} ({metric} {best.value})"
    return [_cond("Ready", True, "Completed", text, generation),
            _cond("Reconciling", False, "Completed", text, generation),
            _cond("Stalled", False, "Completed", text, generation),
            _cond("Succeeded", True, "Completed", text, generation)]


def name_taken(status: FineTuneSweepStatus, names: list[str], raw: dict[str, Any], now: str
               ) -> None:
    """A trial's name belongs to a FineTuneJob that is not this sweep's (never adopted): the
    sweep is stalled until it is gone (deleted, or collected after an earlier sweep of the
    same name)."""
    generation = raw["metadata"].get("generation")
    text = (f"FineTuneJob {', '.join(names)} exists and is not a trial of this sweep: delete "
            "it (or rename the sweep)")
    status.trials = [t for t in status.trials if t.name not in names]
    status.conditions = _keep_times([
        _cond("Ready", False, "NameTaken", text, generation),
        _cond("Reconciling", True, "NameTaken", text, generation),
        _cond("Stalled", True, "NameTaken", text, generation),
    ], (raw.get("status") or {}).get("conditions") or [], now)


# ------------------------------------------------------------------------ the API calls


class SweepApi:
    """The calls a sweep's converge makes (through the operator's ``Kube``)."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube

    def get(self, ns: str, name: str) -> dict[str, Any] | None:
        return self.kube.get(ref(API_VERSION, SWEEP_KIND, ns, name))

    def trials(self, ns: str, sweep: str, uid: str | None) -> dict[str, dict[str, Any]]:
        """Its trials: FineTuneJobs with its label that it owns (never adopted otherwise)."""
        items = self.kube.list(API_VERSION, KIND, ns, labels=f"{sw.SWEEP_LABEL}={sweep}")
        return {t["metadata"]["name"]: t for t in items if owned_by(t, uid)}

    def create(self, body: dict[str, Any]) -> bool:
        """Create a trial; False when a FineTuneJob of that name is there and is not ours
        (one made by a converge before this one is)."""
        there, made = self.kube.create(body)
        return made or owned_by(there, body["metadata"]["ownerReferences"][0]["uid"])

    def patch_trial(self, ns: str, name: str, patch: dict[str, Any]) -> None:
        self.kube.patch(API_VERSION, KIND, ns, name, patch)

    def patch_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.kube.patch(API_VERSION, SWEEP_KIND, ns, name, {"status": status}, sub="status")


Key = tuple[str, str]  # (namespace, name)
RETRY_SECONDS = 10


@dataclass
class SweepController:
    """The sweeps' part of the operator: one converge at a time per sweep (its own events
    and its trials' come on kopf's workers), each from a fresh read; a failure (a conflict,
    the API server away) retried from a fresh read after a pause (kopf does not retry event
    handlers). The operator's ``Controller`` holds one."""

    api: SweepApi
    executor: Executor | None = None  # converges run in its threads (None: the loop's own)
    locks: dict[Key, threading.Lock] = field(default_factory=dict)
    retries: set[asyncio.Task[None]] = field(default_factory=set)  # kept until done

    def converge(self, ns: str, name: str, now: str) -> FineTuneSweepStatus | None:
        """Observe, decide, act, write the status if it changed."""
        api = self.api
        with self.locks.setdefault((ns, name), threading.Lock()):
            raw = api.get(ns, name)
            if raw is None:
                self.locks.pop((ns, name), None)
                return None
            trials = api.trials(ns, name, raw["metadata"].get("uid"))
            decision = decide(raw, trials, now)
            taken = [body["metadata"]["name"] for body in decision.create
                     if not api.create(body)]
            if taken:
                name_taken(decision.status, taken, raw, now)
            for trial, patch in decision.patch.items():
                api.patch_trial(ns, trial, patch)
            status = decision.status.model_dump(mode="json", by_alias=True, exclude_none=True)
            before = raw.get("status") or {}
            if status != before:
                api.patch_status(ns, name, {**{k: None for k in before if k not in status},
                                            **status})
            return decision.status

    async def converge_soon(self, ns: str, name: str) -> None:
        """``converge`` in a thread; retried after RETRY_SECONDS when it fails."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, self.converge, ns, name, now())
        except Exception as err:
            log.warning("sweep %s/%s: converge failed (%s); retrying in %ss", ns, name, err,
                        RETRY_SECONDS)

            def retry() -> None:
                task = loop.create_task(self.converge_soon(ns, name))
                self.retries.add(task)
                task.add_done_callback(self.retries.discard)

            loop.call_later(RETRY_SECONDS, retry)

    async def on_sweep(self, raw: dict[str, Any], type: str | None) -> None:
        meta = raw["metadata"]
        if type == "DELETED":  # its trials go by their owner references
            self.locks.pop((meta["namespace"], meta["name"]), None)
            return
        await self.converge_soon(meta["namespace"], meta["name"])

    async def on_trial(self, raw: dict[str, Any]) -> None:
        meta = raw["metadata"]
        owner = next((o for o in meta.get("ownerReferences") or []
                      if o.get("kind") == SWEEP_KIND and o.get("controller")), None)
        if owner is not None:
            await self.converge_soon(meta["namespace"], owner["name"])


# ------------------------------------------------------------------------ kopf


def register(registry: Any) -> None:
    """The sweep's handlers, into the operator's registry: every event of a FineTuneSweep,
    and of a FineTuneJob that is a trial (its progress, its phase)."""
    import kopf

    kopf.on.event(GROUP, VERSION, SWEEP_PLURAL, registry=registry,
                  id="sweep_event")(sweep_event)
    kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="sweep_trial_event",
                  labels={sw.SWEEP_LABEL: kopf.PRESENT})(trial_event)


async def sweep_event(event: dict[str, Any], memo: Any, type: str | None, **_: Any) -> None:
    await memo.controller.sweeps.on_sweep(event["object"], type)


async def trial_event(event: dict[str, Any], memo: Any, **_: Any) -> None:
    await memo.controller.sweeps.on_trial(event["object"])
