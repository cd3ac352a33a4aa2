"""The progress endpoint: an aiohttp app taking pods' reports into the store, with limits
for slow and greedy clients (header, body and TLS handshake timeouts, connections per peer)."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import web
from kubetune.api.v1alpha1 import PLURAL

from kubetune_operator import metrics
from kubetune_operator.backends import Backend
from kubetune_operator.reporting.auth import (
    POD_NAME,
    POD_UID,
    PodLookup,
    TokenChecker,
    allowed,
    pod_belongs,
)
from kubetune_operator.reporting.clean import BadReport
from kubetune_operator.reporting.store import ProgressStore

log = logging.getLogger("kubetune.reporting")

ROUTE = f"/v1/namespaces/{{namespace}}/{PLURAL}/{{name}}/status"
MAX_BODY = 64 * 1024
# Slow clients: a connection that has not sent a whole request's headers within
# HEADER_TIMEOUT s (also between two requests), or its body within BODY_TIMEOUT s, is closed;
# one peer holds at most MAX_CONNECTIONS_PER_PEER connections (a pod reports over one).
HEADER_TIMEOUT = 5.0
BODY_TIMEOUT = 5.0
MAX_CONNECTIONS_PER_PEER = 8

def make_app(store: ProgressStore, checker: TokenChecker,
             on_report: Callable[[str, str], None] | None = None,
             pod_lookup: PodLookup | None = None, *,
             backend: Backend) -> web.Application:
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
        key = (ns, name, repr((extra.get(POD_NAME), extra.get(POD_UID))))
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
