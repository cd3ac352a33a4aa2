"""The flusher: dirty progress written into statuses, every few seconds per job, at most
``rate`` patches a second overall, a patch the API server refuses dropped in two steps."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubetune_operator import metrics
from kubetune_operator.kube import Kube
from kubetune_operator.reporting.store import JobProgress, ProgressStore
from kubetune_operator.status import progress_fields, progress_patch

log = logging.getLogger("kubetune.reporting")


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


class Gone(Exception):
    """The job was deleted: the flusher forgets it."""

    status = 404


class StatusWriter:
    """One flush of one job's report into its status (the flusher's ``patch``).

    While its checkpoints and outputs stay as last written (or there are none yet), only
    status.progress is replaced: one merge patch, no read first (a thousand jobs' first
    reports cost no thousand reads). New checkpoints or outputs are merged with the status as
    it is now (another replica may have written newer ones), read then patched guarded by its
    resourceVersion, in turn with converges (``lock``: the job's lock, shared with them): on
    the event loop when the lock is free, else in a thread of its own that waits for it."""

    def __init__(self, kube: Kube, lock: Callable[[tuple[str, str]], threading.Lock], *,
                 threads: int = 8) -> None:
        self.kube, self.lock = kube, lock
        self.threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="progress")
        self.merged: dict[tuple[str, str], tuple[Any, Any]] = {}  # what was last written

    def forget(self, ns: str, name: str) -> None:
        self.merged.pop((ns, name), None)

    async def __call__(self, ns: str, name: str, snap: dict[str, Any]) -> None:
        key, extras = (ns, name), (snap.get("checkpoints"), snap.get("outputs"))
        try:
            if self.merged.get(key, (None, None)) == extras:  # progress only: one patch
                fields = progress_fields(snap)
                if not fields:
                    return
                await self.kube.patch_status_async(ns, name, {"progress": fields})
                wrote = True
            else:
                wrote = await self._merge(key, snap, extras)
        except Exception:
            metrics.STATUS_PATCHES.labels("error").inc()
            raise
        if wrote:
            metrics.STATUS_PATCHES.labels("ok").inc()

    async def _merge(self, key: tuple[str, str], snap: dict[str, Any], extras: Any) -> bool:
        def merge(job: dict[str, Any] | None) -> dict[str, Any]:
            if job is None:
                raise Gone(*key)
            keep = ((job.get("spec") or {}).get("training") or {}).get("saveTotalLimit")
            return progress_patch(snap, job.get("status") or {}, keep)

        def in_thread() -> bool:
            with self.lock(key):
                job = self.kube.get_finetunejob(*key)
                status = merge(job)
                if status:  # a conflict (409) leaves the report dirty for the next round
                    self.kube.patch_status(*key, status, job["metadata"].get("resourceVersion"))
                self.merged[key] = extras
                return bool(status)

        lock = self.lock(key)
        if not lock.acquire(blocking=False):  # a converge holds it: wait for it in a thread
            return await asyncio.get_running_loop().run_in_executor(self.threads, in_thread)
        try:
            job = await self.kube.get_finetunejob_async(*key)
            status = merge(job)
            if status:
                await self.kube.patch_status_async(*key, status,
                                                   job["metadata"].get("resourceVersion"))
            self.merged[key] = extras
            return bool(status)
        finally:
            lock.release()
