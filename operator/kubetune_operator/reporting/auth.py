"""Who may report a job's progress: a TokenReview of the pod's projected token (audience
``kubetune``), then only a live pod of that very job, in its namespace, named and owned as its
backend makes its pods. Pods get no RBAC on the Kubernetes API."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kubetune_operator.backends import Backend
from kubetune_operator.builders import PROGRESS_AUDIENCE

log = logging.getLogger("kubetune.reporting")


POD_NAME = "authentication.kubernetes.io/pod-name"


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
            backend: Backend) -> bool:
    """Only a pod of this job, in its namespace, may report for it (its name as the backend
    names its pods)."""
    username = identity.get("username") or ""
    if not username.startswith(f"system:serviceaccount:{namespace}:"):
        return False
    extra = identity.get("extra") or {}
    pods = extra.get(POD_NAME) or []
    return any(isinstance(p, str) and backend.pod_name_matches(p, name) for p in pods)


POD_UID = "authentication.kubernetes.io/pod-uid"
PodLookup = Callable[[str, str], Awaitable[dict[str, Any] | None]]


async def pod_belongs(identity: dict[str, Any], namespace: str, name: str,
                      lookup: PodLookup, backend: Backend) -> bool:
    """The token's pod is the live pod of this job's training object (same uid, owned as the
    backend owns its pods): a pod someone else made with the right name does not pass."""
    extra = identity.get("extra") or {}
    pods, uids = extra.get(POD_NAME) or [], extra.get(POD_UID) or []
    if not pods or not uids:
        return False
    pod = await lookup(namespace, pods[0])
    meta = (pod or {}).get("metadata") or {}
    return meta.get("uid") == uids[0] and backend.owns_pod(pod or {}, name)
