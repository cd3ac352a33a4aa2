"""Progress from training pods: the Kubeflow KEP-2779 contract, server side.

Pods POST ``{"trainerStatus": {...}}`` (transformers' KubeflowCallback does it by itself when
``KUBEFLOW_TRAINER_SERVER_URL`` is set) with a projected service-account token whose audience
is ``kubetune``. We check the token with a TokenReview and accept it only from a pod of that
very job: same namespace, pod name ``<job>-master-N`` / ``<job>-worker-N``. Pods get no RBAC
on the Kubernetes API. kubetune's trainer adds ``{"kubetune": {"checkpoint"|"outputs"}}``.

Reports land in a ``ProgressStore``; a flusher patches statuses at most every few seconds per
job and at most ``max_patches_per_second`` overall, so a thousand jobs do not flood the API.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from kubetune_operator.builders import PROGRESS_AUDIENCE
from kubetune_operator.status import MAX_CHECKPOINTS

log = logging.getLogger("kubetune.reporting")

ROUTE = "/v1/namespaces/{namespace}/finetunejobs/{name}/status"
MAX_BODY = 64 * 1024

_METRIC_MAP = {"current_step": "step", "total_steps": "totalSteps", "loss": "loss",
               "learning_rate": "learningRate", "current_epoch": "epoch", "epoch": "epoch"}


@dataclass
class JobProgress:
    report: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    dirty: bool = False
    tokens_seen: tuple[float, float] | None = None  # (monotonic time, tokens) last report

    def snapshot(self) -> dict[str, Any]:
        out = dict(self.report)
        if self.checkpoints:
            out["checkpoints"] = list(self.checkpoints)
        if self.outputs:
            out["outputs"] = dict(self.outputs)
        return out


class ProgressStore:
    """The latest report per job, in memory (a restart loses at most a few seconds)."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], JobProgress] = {}

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        job = self.jobs.get((namespace, name))
        return job.snapshot() if job else None

    def forget(self, namespace: str, name: str) -> None:
        self.jobs.pop((namespace, name), None)

    def update(self, namespace: str, name: str, payload: dict[str, Any]) -> None:
        job = self.jobs.setdefault((namespace, name), JobProgress())
        ts = payload.get("trainerStatus")
        if isinstance(ts, dict):
            job.report.update(_from_trainer_status(ts, job))
        ext = payload.get("kubetune")
        if isinstance(ext, dict):
            cp = _checkpoint(ext.get("checkpoint"))
            if cp is not None:
                job.checkpoints = [c for c in job.checkpoints if c["step"] != cp["step"]]
                job.checkpoints.append(cp)
                job.checkpoints = sorted(job.checkpoints, key=lambda c: c["step"])[
                    -MAX_CHECKPOINTS:]
            outs = ext.get("outputs")
            if isinstance(outs, dict):
                job.outputs.update({k: str(v) for k, v in outs.items()
                                    if k in ("adapter", "mergedModel", "model")})
        job.dirty = True

    def remember_checkpoints(self, namespace: str, name: str,
                             checkpoints: list[dict[str, Any]]) -> None:
        """After a restart: start from what the status already lists, so a flush that writes
        the (replaced-as-a-whole) list keeps them."""
        job = self.jobs.get((namespace, name))
        if job is not None and not job.checkpoints and checkpoints:
            job.checkpoints = list(checkpoints)[-MAX_CHECKPOINTS:]

    def take_dirty(self) -> list[tuple[str, str]]:
        keys = [k for k, j in self.jobs.items() if j.dirty]
        for k in keys:
            self.jobs[k].dirty = False
        return keys


def _checkpoint(value: Any) -> dict[str, Any] | None:
    """A checkpoint report in the status's own shape, or None (a bad one is dropped, not
    allowed to make every later status patch fail)."""
    from kubetune.api.v1alpha1 import Checkpoint
    from pydantic import ValidationError

    if not isinstance(value, dict):
        return None
    try:
        cp = Checkpoint.model_validate({k: value[k] for k in ("step", "loss", "uri")
                                        if k in value})
    except ValidationError:
        return None
    return cp.model_dump(by_alias=True, exclude_none=True)


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _from_trainer_status(ts: dict[str, Any], job: JobProgress) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if (p := _num(ts.get("progressPercentage"))) is not None:
        out["percent"] = round(p, 2)
    if (e := _num(ts.get("estimatedRemainingSeconds"))) is not None:
        out["etaSeconds"] = e
    metrics = {m.get("name"): m.get("value") for m in ts.get("metrics") or []
               if isinstance(m, dict)}
    for key, target in _METRIC_MAP.items():
        if (v := _num(metrics.get(key))) is not None:
            out[target] = int(v) if target in ("step", "totalSteps") else v
    tokens = _num(metrics.get("num_input_tokens_seen"))
    if tokens is not None:
        t = time.monotonic()
        if job.tokens_seen and t > job.tokens_seen[0] and tokens >= job.tokens_seen[1]:
            out["tokensPerSecond"] = round((tokens - job.tokens_seen[1]) /
                                           (t - job.tokens_seen[0]), 1)
        job.tokens_seen = (t, tokens)
    if isinstance(ts.get("lastUpdatedTime"), str):
        out["updatedAt"] = ts["lastUpdatedTime"][:40]
    return out


# ------------------------------------------------------------------------ authentication


_POD_NAME = "authentication.kubernetes.io/pod-name"


class TokenChecker:
    """TokenReview, cached for a minute per token."""

    def __init__(self, review: Callable[[str, str], Awaitable[dict[str, Any]]],
                 ttl: float = 60.0) -> None:
        self.review = review
        self.ttl = ttl
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}

    async def identity(self, token: str) -> dict[str, Any] | None:
        key = hashlib.sha256(token.encode()).hexdigest()
        hit = self._cache.get(key)
        if hit and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        try:
            result = await self.review(token, PROGRESS_AUDIENCE)
        except Exception:  # the API server said no or is away: refuse, do not crash
            log.warning("TokenReview failed", exc_info=True)
            return None
        status = result.get("status") or {}
        # An empty audience list means the API server's own audience: not ours.
        if not status.get("authenticated") or PROGRESS_AUDIENCE not in (
                status.get("audiences") or []):
            ident: dict[str, Any] = {}
        else:
            ident = status.get("user") or {}
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (time.monotonic(), ident)
        return ident or None


def allowed(identity: dict[str, Any], namespace: str, name: str) -> bool:
    """Only a pod of this job, in its namespace, may report for it."""
    username = identity.get("username") or ""
    if not username.startswith(f"system:serviceaccount:{namespace}:"):
        return False
    extra = identity.get("extra") or {}
    pods = extra.get(_POD_NAME) or []
    pattern = re.compile(rf"^{re.escape(name)}-(master|worker)-\d+$")
    return any(pattern.match(p) for p in pods)


_POD_UID = "authentication.kubernetes.io/pod-uid"
PodLookup = Callable[[str, str], Awaitable[dict[str, Any] | None]]


async def pod_belongs(identity: dict[str, Any], namespace: str, name: str,
                      lookup: PodLookup) -> bool:
    """The token's pod is the live pod of this job's PyTorchJob (same uid): a pod someone
    else made with the right name does not pass."""
    extra = identity.get("extra") or {}
    pods, uids = extra.get(_POD_NAME) or [], extra.get(_POD_UID) or []
    if not pods or not uids:
        return False
    pod = await lookup(namespace, pods[0])
    meta = (pod or {}).get("metadata") or {}
    owners = meta.get("ownerReferences") or []
    return meta.get("uid") == uids[0] and any(
        o.get("kind") == "PyTorchJob" and o.get("name") == name for o in owners)


def make_app(store: ProgressStore, checker: TokenChecker,
             on_report: Callable[[str, str], None] | None = None,
             pod_lookup: PodLookup | None = None) -> web.Application:
    async def post(request: web.Request) -> web.Response:
        response = await _post(request)
        from kubetune_operator.metrics import PROGRESS_REPORTS

        PROGRESS_REPORTS.labels(str(response.status)).inc()
        return response

    async def _post(request: web.Request) -> web.Response:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return web.json_response({"error": "a bearer token is required"}, status=401)
        ident = await checker.identity(auth[7:].strip())
        if ident is None:
            return web.json_response({"error": "token not accepted"}, status=401)
        if not allowed(ident, ns, name) or (
                pod_lookup is not None and not await pod_belongs(ident, ns, name, pod_lookup)):
            log.warning("refused a report for %s/%s from %s", ns, name, ident.get("username"))
            return web.json_response({"error": "not a pod of this job"}, status=403)
        if (request.content_length or 0) > MAX_BODY:
            return web.json_response({"error": "too large"}, status=413)
        try:
            payload = await request.json()
        except ValueError:
            return web.json_response({"error": "not JSON"}, status=400)
        if not isinstance(payload, dict):
            return web.json_response({"error": "expected an object"}, status=400)
        store.update(ns, name, payload)
        if on_report:
            on_report(ns, name)
        return web.json_response({"ok": True})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(ROUTE, post)
    app.router.add_get("/healthz", healthz)
    return app


class Flusher:
    """Patches dirty progress into statuses: every ``interval`` s, ≤ ``rate`` patches/s."""

    def __init__(self, store: ProgressStore,
                 patch: Callable[[str, str, dict[str, Any]], Awaitable[None]],
                 interval: float = 2.0, rate: float = 50.0) -> None:
        self.store, self.patch, self.interval, self.rate = store, patch, interval, rate

    async def run_once(self) -> int:
        done = 0
        for ns, name in self.store.take_dirty():
            snap = self.store.get(ns, name)
            if snap is None:
                continue
            try:
                await self.patch(ns, name, snap)
                done += 1
            except Exception as err:
                if getattr(err, "status", None) == 404:  # the job is gone
                    self.store.forget(ns, name)
                    continue
                log.warning("progress patch for %s/%s failed", ns, name, exc_info=True)
                job = self.store.jobs.get((ns, name))
                if job is not None:
                    job.dirty = True  # try again next round
            await asyncio.sleep(1.0 / self.rate)
        return done

    async def run(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # never let one bad round stop progress for every job
                log.exception("progress flush failed")
            await asyncio.sleep(self.interval)
