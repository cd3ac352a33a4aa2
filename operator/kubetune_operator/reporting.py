"""Progress from training pods: the Kubeflow KEP-2779 contract, server side.

Pods POST ``{"trainerStatus": {...}}`` (transformers' KubeflowCallback does it by itself when
``KUBEFLOW_TRAINER_SERVER_URL`` is set) with a projected service-account token whose audience
is ``kubetune``. We check the token with a TokenReview and accept it only from a pod of that
very job: same namespace, a pod name its backend gives (``<job>-master-N`` for a
PyTorchJob, ``<job>-node-N-M-xxxxx`` for a TrainJob, ``<job>-[N-]xxxxx`` for a Job), owned as
that backend owns its pods. Pods get no RBAC on the Kubernetes API. kubetune's trainer adds
``{"kubetune": {"checkpoint"|"outputs"}}``.

Reports land in a ``ProgressStore``; a flusher patches statuses at most every few seconds per
job and at most ``max_patches_per_second`` overall, so a thousand jobs do not flood the API.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from kubetune.api.stages import FINAL_METRIC_PATTERN, MAX_STAGE_METRICS, STAGE_METRIC_PATTERN
from kubetune.api.v1alpha1 import PLURAL, Checkpoint, Outputs

from kubetune_operator import metrics
from kubetune_operator.backends import Backend
from kubetune_operator.backends.pytorchjob import PYTORCHJOB
from kubetune_operator.builders import PROGRESS_AUDIENCE
from kubetune_operator.status import MAX_CHECKPOINTS, as_api

log = logging.getLogger("kubetune.reporting")

ROUTE = f"/v1/namespaces/{{namespace}}/{PLURAL}/{{name}}/status"
MAX_BODY = 64 * 1024
# Slow clients: a connection that has not sent a whole request's headers within
# HEADER_TIMEOUT s (also between two requests), or its body within BODY_TIMEOUT s, is closed;
# one peer holds at most MAX_CONNECTIONS_PER_PEER connections (a pod reports over one).
HEADER_TIMEOUT = 5.0
BODY_TIMEOUT = 5.0
MAX_CONNECTIONS_PER_PEER = 8

_METRIC_MAP = {"current_step": "step", "total_steps": "totalSteps", "loss": "loss",
               "learning_rate": "learningRate", "current_epoch": "epoch", "epoch": "epoch"}
_TOKENS = "num_input_tokens_seen"
_OUTPUTS = ("adapter", "mergedModel", "model", "trackingUrl")
_STAGE_METRIC = re.compile(STAGE_METRIC_PATTERN)
_FINAL_METRIC = re.compile(FINAL_METRIC_PATTERN + "|" + STAGE_METRIC_PATTERN)

# What a status field may hold. A value the API server would refuse (NaN, a 300-digit step)
# must never reach a patch: the flusher would retry that patch, and every later one, forever.
INT64_MAX = 2**63 - 1
MAX_ETA_SECONDS = 10 * 365 * 24 * 3600.0
MAX_NUMBER_TEXT = 64  # a number sent as a string ("1.25", as the KEP does)
MAX_TIME_TEXT = 64  # RFC 3339 takes about 32
MAX_URI_TEXT = 2048


class BadReport(ValueError):
    """A body the endpoint refuses as a whole (400)."""


@dataclass
class JobProgress:
    report: dict[str, Any] = field(default_factory=dict)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    dirty: bool = False
    tokens_seen: tuple[float, float] | None = None  # (monotonic time, tokens) last report
    refused: int = 0  # status patches refused in a row (400/422)

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

    def update(self, namespace: str, name: str, payload: dict[str, Any]) -> list[str]:
        """Apply one report; fields that do not fit the status are dropped (and counted), the
        rest applies. Returns the dropped fields; raises ``BadReport`` for a body of the wrong
        shape, before anything is applied."""
        ts, ext = payload.get("trainerStatus"), payload.get("kubetune")
        for key, section in (("trainerStatus", ts), ("kubetune", ext)):
            if section is not None and not isinstance(section, dict):
                raise BadReport(f"{key} must be an object")
        job = self.jobs.setdefault((namespace, name), JobProgress())
        clean = _Clean()
        if ts:
            job.report.update(_from_trainer_status(ts, job, clean))
        if ext:
            cp = _checkpoint(ext.get("checkpoint"), clean)
            if cp is not None:
                job.checkpoints = [c for c in job.checkpoints if c["step"] != cp["step"]]
                job.checkpoints.append(cp)
                job.checkpoints = sorted(job.checkpoints, key=lambda c: c["step"])[
                    -MAX_CHECKPOINTS:]
            job.outputs.update(_outputs(ext.get("outputs"), clean))
        job.dirty = True
        return clean.dropped

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


def _finite(value: Any) -> tuple[float | None, str | None]:
    """A finite float from a JSON number or a numeric string, else (None, why)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None, "type"
    if isinstance(value, str) and len(value) > MAX_NUMBER_TEXT:
        return None, "length"
    try:
        f = float(value)
    except ValueError:
        return None, "type"
    except OverflowError:  # an int past float's range
        return None, "range"
    return (f, None) if math.isfinite(f) else (None, "nonfinite")


def from_trainer_status(ts: dict[str, Any]) -> dict[str, Any]:
    """A TrainJob's ``status.trainerStatus`` (Kubeflow's own KEP-2779 endpoint wrote it) as
    kubetune's progress report, cleaned the same way as a report to kubetune's endpoint."""
    return _from_trainer_status(ts, JobProgress(), _Clean()) if isinstance(ts, dict) else {}


class _Clean:
    """Cleans one report field by field: a value that does not fit is dropped and counted.
    An absent field (None) is neither."""

    def __init__(self) -> None:
        self.dropped: list[str] = []

    def drop(self, name: str, why: str) -> None:
        metrics.PROGRESS_FIELDS_DROPPED.labels(name, why).inc()
        if name not in self.dropped:
            self.dropped.append(name)

    def number(self, name: str, value: Any, low: float = -math.inf,
               high: float = math.inf) -> float | None:
        if value is None:
            return None
        f, why = _finite(value)
        if f is not None and not low <= f <= high:
            f, why = None, "range"
        if why:
            self.drop(name, why)
        return f

    def count(self, name: str, value: Any) -> int | None:
        """A step count: an int in [0, int64], from 42, 42.0 or "42" (a fraction is cut)."""
        if value is None:
            return None
        n: int | None = None
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif isinstance(value, str) and value.isascii() and value.strip().isdigit():
            n = int(value)
        elif (f := self.number(name, value)) is not None:
            n = int(f)
        else:
            return None  # counted by number()
        if not 0 <= n <= INT64_MAX:
            self.drop(name, "range")
            return None
        return n

    def text(self, name: str, value: Any, limit: int) -> str | None:
        """A string as sent, never ``str()`` of something else."""
        if value is None:
            return None
        why = None
        if not isinstance(value, str):
            why = "type"
        elif len(value) > limit:
            why = "length"
        elif not _utf8(value):  # a lone surrogate ("\\ud800") cannot be sent on
            why = "encoding"
        if why:
            self.drop(name, why)
            return None
        return value


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _checkpoint(value: Any, clean: _Clean) -> dict[str, Any] | None:
    """A checkpoint report in the status's own shape, or None (a bad one is dropped, not
    allowed to make every later status patch fail)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        clean.drop("checkpoint", "type")
        return None
    step = clean.count("checkpoint.step", value.get("step"))
    uri = clean.text("checkpoint.uri", value.get("uri"), MAX_URI_TEXT)
    loss, why = _finite(value.get("loss")) if value.get("loss") is not None else (None, None)
    if step is None or uri is None or why not in (None, "nonfinite"):
        clean.drop("checkpoint", "incomplete" if step is None or uri is None else why)
        return None
    if why:  # NaN or infinite: a diverged run's checkpoint is still a checkpoint
        clean.drop("checkpoint.loss", why)
    return as_api(Checkpoint(step=step, uri=uri, loss=loss))


def _outputs(value: Any, clean: _Clean) -> dict[str, Any]:
    """Output URIs, and the run's final metrics (``{"metrics": {name: number}}``)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        clean.drop("outputs", "type")
        return {}
    outs: dict[str, Any] = {k: clean.text(f"outputs.{k}", value.get(k), MAX_URI_TEXT)
                            for k in _OUTPUTS}
    final = value.get("metrics")
    if isinstance(final, dict):
        kept: dict[str, float] = {}
        for name, v in final.items():
            if not (isinstance(name, str) and _FINAL_METRIC.match(name)):
                clean.drop("outputs.metrics", "name")
            elif len(kept) >= MAX_STAGE_METRICS:
                clean.drop("outputs.metrics", "count")
                break
            elif (f := clean.number(f"outputs.metrics.{name}", v)) is not None:
                kept[name] = f
        outs["metrics"] = kept or None
    elif final is not None:
        clean.drop("outputs.metrics", "type")
    return as_api(Outputs.model_validate({k: v for k, v in outs.items() if v is not None}))


def _stage_metrics(named: dict[str, Any], clean: _Clean) -> dict[str, float]:
    """The stage's own metrics (rewards/margins, kl, …): finite numbers, a bounded count."""
    out: dict[str, float] = {}
    for name, value in named.items():
        if not _STAGE_METRIC.match(name):
            continue
        if len(out) >= MAX_STAGE_METRICS:
            clean.drop("metrics", "count")
            break
        if (v := clean.number(f"metrics.{name}", value)) is not None:
            out[name] = v
    return out


def _metrics(value: Any, clean: _Clean) -> dict[str, Any]:
    """The metrics we map, by name, from the KEP's ``[{"name": …, "value": …}]``."""
    if value is None:
        return {}
    if not isinstance(value, list):
        clean.drop("metrics", "type")
        return {}
    out: dict[str, Any] = {}
    for m in value:
        name = m.get("name") if isinstance(m, dict) else None
        if not isinstance(name, str):
            clean.drop("metrics", "type")
        elif name in _METRIC_MAP or name == _TOKENS or _STAGE_METRIC.match(name):
            out[name] = m.get("value")
    return out


def _from_trainer_status(ts: dict[str, Any], job: JobProgress,
                         clean: _Clean) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # A percentage past 100 or below 0 is a rounding slip, not a reason to lose the report.
    if (p := clean.number("percent", ts.get("progressPercentage"))) is not None:
        out["percent"] = round(min(max(p, 0.0), 100.0), 2)
    if (e := clean.number("etaSeconds", ts.get("estimatedRemainingSeconds"), 0,
                          MAX_ETA_SECONDS)) is not None:
        out["etaSeconds"] = e
    metrics_ = _metrics(ts.get("metrics"), clean)
    for key, target in _METRIC_MAP.items():
        if target in ("step", "totalSteps"):
            v: float | int | None = clean.count(target, metrics_.get(key))
        else:
            v = clean.number(target, metrics_.get(key))
        if v is not None:
            out[target] = v
    if stage := _stage_metrics(metrics_, clean):
        out["metrics"] = stage
    tokens = clean.number("tokensPerSecond", metrics_.get(_TOKENS), 0)
    if tokens is not None:
        t = time.monotonic()
        if job.tokens_seen and t > job.tokens_seen[0] and tokens >= job.tokens_seen[1]:
            rate = round((tokens - job.tokens_seen[1]) / (t - job.tokens_seen[0]), 1)
            if math.isfinite(rate):
                out["tokensPerSecond"] = rate
        job.tokens_seen = (t, tokens)
    if (u := clean.text("updatedAt", ts.get("lastUpdatedTime"), MAX_TIME_TEXT)) is not None:
        out["updatedAt"] = u
    return out


# ------------------------------------------------------------------------ authentication


_POD_NAME = "authentication.kubernetes.io/pod-name"


class TokenChecker:
    """TokenReview, cached for a minute per token; a refused token is cached as None, so it is
    refused the same way (401) every time."""

    def __init__(self, review: Callable[[str, str], Awaitable[dict[str, Any]]],
                 ttl: float = 60.0) -> None:
        self.review = review
        self.ttl = ttl
        self._cache: dict[str, tuple[float, dict[str, Any] | None]] = {}

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
        ident: dict[str, Any] | None = None
        # An empty audience list means the API server's own audience: not ours.
        if status.get("authenticated") and PROGRESS_AUDIENCE in (status.get("audiences") or []):
            ident = status.get("user") or None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (time.monotonic(), ident)
        return ident


def allowed(identity: dict[str, Any], namespace: str, name: str,
            backend: Backend = PYTORCHJOB) -> bool:
    """Only a pod of this job, in its namespace, may report for it (its name as the backend
    names its pods)."""
    username = identity.get("username") or ""
    if not username.startswith(f"system:serviceaccount:{namespace}:"):
        return False
    extra = identity.get("extra") or {}
    pods = extra.get(_POD_NAME) or []
    return any(isinstance(p, str) and backend.pod_name_matches(p, name) for p in pods)


_POD_UID = "authentication.kubernetes.io/pod-uid"
PodLookup = Callable[[str, str], Awaitable[dict[str, Any] | None]]


async def pod_belongs(identity: dict[str, Any], namespace: str, name: str,
                      lookup: PodLookup, backend: Backend = PYTORCHJOB) -> bool:
    """The token's pod is the live pod of this job's training object (same uid, owned as the
    backend owns its pods): a pod someone else made with the right name does not pass."""
    extra = identity.get("extra") or {}
    pods, uids = extra.get(_POD_NAME) or [], extra.get(_POD_UID) or []
    if not pods or not uids:
        return False
    pod = await lookup(namespace, pods[0])
    meta = (pod or {}).get("metadata") or {}
    return meta.get("uid") == uids[0] and backend.owns_pod(pod or {}, name)


def make_app(store: ProgressStore, checker: TokenChecker,
             on_report: Callable[[str, str], None] | None = None,
             pod_lookup: PodLookup | None = None,
             backend: Backend = PYTORCHJOB) -> web.Application:
    async def post(request: web.Request) -> web.Response:
        response = await _post(request)
        metrics.PROGRESS_REPORTS.labels(str(response.status)).inc()
        return response

    # A pod's uid never names another pod, and the pod keeps its owner: a yes is kept for
    # the pod's life, which the token review (redone every minute: a bound token dies with
    # its pod) keeps proving. One GET per pod, not one per pod and minute (17/s at 1,000).
    owners_seen: set[tuple[str, str, str]] = set()

    async def owned(ident: dict[str, Any], ns: str, name: str) -> bool:
        extra = ident.get("extra") or {}
        key = (ns, name, repr((extra.get(_POD_NAME), extra.get(_POD_UID))))
        if key in owners_seen:
            return True
        if not await pod_belongs(ident, ns, name, pod_lookup, backend):
            return False
        if len(owners_seen) > 10_000:
            owners_seen.clear()
        owners_seen.add(key)
        return True

    async def _post(request: web.Request) -> web.Response:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return web.json_response({"error": "a bearer token is required"}, status=401)
        token = auth[7:].strip()
        # A token is ASCII (a JWT); anything else is not hashed, not sent for review.
        ident = await checker.identity(token) if token.isascii() else None
        if ident is None:
            return web.json_response({"error": "token not accepted"}, status=401)
        if not allowed(ident, ns, name, backend) or (
                pod_lookup is not None and not await owned(ident, ns, name)):
            log.warning("refused a report for %s/%s from %s", ns, name, ident.get("username"))
            return web.json_response({"error": "not a pod of this job"}, status=403)
        if (request.content_length or 0) > MAX_BODY:
            return web.json_response({"error": "too large"}, status=413)
        try:
            # Bytes, not request.json(): an unknown charset in Content-Type must not raise.
            payload = json.loads(await asyncio.wait_for(request.read(), BODY_TIMEOUT))
        except web.HTTPRequestEntityTooLarge:  # chunked, no Content-Length
            return web.json_response({"error": "too large"}, status=413)
        except TimeoutError:  # trickled, or less than its Content-Length
            log.info("closed a report for %s/%s: its body took over %ss", ns, name,
                     BODY_TIMEOUT)
            if request.transport is not None:
                request.transport.close()
            return web.json_response({"error": "body too slow"}, status=408)
        except ConnectionError as err:  # the client went away mid-body
            log.info("a report for %s/%s ended mid-body: %s", ns, name,
                     type(err).__name__)
            return web.json_response({"error": "disconnected"}, status=400)
        except RecursionError:  # [[[[… within the size limit
            return web.json_response({"error": "nested too deeply"}, status=400)
        except ValueError:  # UnicodeDecodeError included
            return web.json_response({"error": "not JSON"}, status=400)
        if not isinstance(payload, dict):
            return web.json_response({"error": "expected an object"}, status=400)
        try:
            dropped = store.update(ns, name, payload)
        except BadReport as err:
            return web.json_response({"error": str(err)}, status=400)
        if on_report:
            on_report(ns, name)
        return web.json_response({"ok": True, "dropped": dropped} if dropped else {"ok": True})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(ROUTE, post)
    app.router.add_get("/healthz", healthz)
    return app


async def start_runner(app: web.Application) -> web.AppRunner:
    """``app``'s runner, set up, with the slow-client limits: HEADER_TIMEOUT (aiohttp closes a
    connection waiting for a request's headers that long, however it trickles), and at most
    MAX_CONNECTIONS_PER_PEER connections per peer address."""
    runner = web.AppRunner(app, keepalive_timeout=HEADER_TIMEOUT)
    await runner.setup()
    server = runner.server
    assert server is not None
    made, lost = server.connection_made, server.connection_lost
    open_: dict[str, int] = {}
    peers: dict[Any, str] = {}  # handler -> its peer (aiohttp's handlers have __slots__)

    def peer(transport: Any) -> str:
        name = transport.get_extra_info("peername") if transport is not None else None
        return str(name[0]) if isinstance(name, (tuple, list)) and name else "?"

    def connection_made(handler: Any, transport: Any) -> None:
        made(handler, transport)
        who = peer(transport)
        peers[handler] = who
        open_[who] = open_.get(who, 0) + 1
        if open_[who] > MAX_CONNECTIONS_PER_PEER:
            if open_[who] == MAX_CONNECTIONS_PER_PEER + 1:
                log.warning("%s holds %d connections to the progress endpoint: closing the "
                            "ones beyond", who, MAX_CONNECTIONS_PER_PEER)
            transport.close()

    def connection_lost(handler: Any, exc: BaseException | None) -> None:
        lost(handler, exc)
        who = peers.pop(handler, None)
        if who in open_:
            open_[who] -= 1
            if open_[who] <= 0:
                del open_[who]

    server.connection_made = connection_made  # type: ignore[method-assign]
    server.connection_lost = connection_lost  # type: ignore[method-assign]
    return runner


async def listen(runner: web.AppRunner, host: str, port: int,
                 tls: ssl.SSLContext | None) -> asyncio.AbstractServer:
    """The listening socket for ``runner``'s app (TLS when ``tls``), its handshake bounded as
    the headers are (HEADER_TIMEOUT; asyncio's default is 60 s): a connection counts towards
    MAX_CONNECTIONS_PER_PEER only once its handshake is done, so one that never finishes it
    must not linger. (aiohttp's TCPSite has no such setting.) Close it before
    ``runner.cleanup()``."""
    assert runner.server is not None
    return await asyncio.get_running_loop().create_server(
        runner.server, host, port, ssl=tls,
        ssl_handshake_timeout=HEADER_TIMEOUT if tls is not None else None)


# The API server refused the patch's content (a bad value, too large): retrying cannot help.
# 401/403 (the operator's own credentials or RBAC), 409 and 429 are retried.
REFUSED = frozenset({400, 413, 422})


class Flusher:
    """Patches dirty progress into statuses: every ``interval`` s, at most ``rate`` patches/s,
    ``concurrency`` at a time (a thousand jobs reporting every few seconds need hundreds of
    patches a second; one at a time, each waiting on the API server, would fall behind)."""

    def __init__(self, store: ProgressStore,
                 patch: Callable[[str, str, dict[str, Any]], Awaitable[None]],
                 interval: float = 2.0, rate: float = 250.0, concurrency: int = 8) -> None:
        self.store, self.patch, self.interval, self.rate = store, patch, interval, rate
        self.concurrency = concurrency

    async def run_once(self) -> int:
        slots = asyncio.Semaphore(self.concurrency)
        start = time.monotonic()

        async def one(i: int, ns: str, name: str) -> int:
            await asyncio.sleep(max(0.0, start + i / self.rate - time.monotonic()))
            async with slots:
                return await self._flush(ns, name)

        done = await asyncio.gather(*(one(i, ns, name) for i, (ns, name)
                                      in enumerate(self.store.take_dirty())))
        return sum(done)

    async def _flush(self, ns: str, name: str) -> int:
        snap = self.store.get(ns, name)
        if snap is None:
            return 0
        job = self.store.jobs.get((ns, name))
        try:
            await self.patch(ns, name, snap)
        except Exception as err:
            code = getattr(err, "status", None)
            if code == 404:  # the job is gone
                self.store.forget(ns, name)
            elif code in REFUSED and job is not None:
                self._drop_refused(ns, name, job, code)
            else:  # a conflict, throttling, the API server away: try again next round
                log.warning("progress patch for %s/%s failed", ns, name, exc_info=True)
                if job is not None:
                    job.dirty = True
            return 0
        if job is not None:
            job.refused = 0
        return 1

    @staticmethod
    def _drop_refused(ns: str, name: str, job: JobProgress, code: int) -> None:
        """The API server refused the content: the same snapshot would be refused forever, and
        so would every later one that still carries the bad field. We cannot tell which field it
        was, so we drop in two steps: first the progress (rewritten on every report, so least
        is lost), retrying the checkpoints and outputs at once; if that is refused too, those go
        as well. Later reports then flush again; the status keeps whatever was written before."""
        job.refused += 1
        everything = job.refused > 1 or not job.report
        what = "all" if everything else "progress"
        metrics.PROGRESS_FIELDS_DROPPED.labels(what, "refused").inc()
        log.error("the API server refused the progress patch for %s/%s (%s): dropping %s",
                  ns, name, code, "all of it" if everything else "its progress")
        job.report = {}
        if everything:
            job.checkpoints, job.outputs = [], {}
        else:
            job.dirty = job.dirty or bool(job.checkpoints or job.outputs)

    async def run(self) -> None:
        # Rounds start every ``interval`` s (at once after one that took longer): a pause after
        # each round instead would let a round of a thousand jobs at ``rate`` stretch the time
        # between one job's writes to interval / (1 - reports per second / rate).
        while True:
            started = time.monotonic()
            try:
                await self.run_once()
            except Exception:  # never let one bad round stop progress for every job
                log.exception("progress flush failed")
            await asyncio.sleep(max(0.0, started + self.interval - time.monotonic()))
