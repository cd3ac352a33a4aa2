"""The progress endpoint against slow and vanishing clients, over real sockets: headers or a
body trickled (or shorter than its Content-Length) are cut after a few seconds, one peer
holds a bounded number of connections, and a client that leaves mid-body is one log line."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from aiohttp import web
from kubetune_operator.backends.pytorchjob import PYTORCHJOB
from kubetune_operator.reporting import server
from kubetune_operator.reporting.auth import TokenChecker
from kubetune_operator.reporting.server import make_app, start_runner
from kubetune_operator.reporting.store import ProgressStore
from test_reporting import URL, _pod, _review


@pytest.fixture
async def endpoint(monkeypatch):
    monkeypatch.setattr(server, "HEADER_TIMEOUT", 0.5)
    monkeypatch.setattr(server, "BODY_TIMEOUT", 0.5)
    monkeypatch.setattr(server, "MAX_CONNECTIONS_PER_PEER", 4)
    runner = await start_runner(make_app(ProgressStore(), TokenChecker(_review),
                                         pod_lookup=_pod, backend=PYTORCHJOB))
    site = web.TCPSite(runner, host="127.0.0.1", port=0)
    await site.start()
    port = runner.addresses[0][1]
    yield port
    await runner.cleanup()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before it closed the connection; fails if it stays open."""
    data = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = await asyncio.wait_for(reader.read(4096), deadline - time.monotonic())
        except ConnectionError:  # reset: closed
            return data
        except TimeoutError:
            break
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"still open after {seconds}s (got {data[:80]!r})")


HEAD = (f"POST {URL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\n"
        "Content-Type: application/json\r\n")


async def test_trickled_headers_are_cut(endpoint):
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint)
    start = time.monotonic()

    async def trickle():
        for byte in HEAD.encode():
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    task = asyncio.create_task(trickle())
    await _closed_within(reader, 3)
    task.cancel()
    assert time.monotonic() - start < 3
    writer.close()


@pytest.mark.parametrize("trickle", [True, False])
async def test_a_slow_or_short_body_is_cut(endpoint, trickle):
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint)
    writer.write(f"{HEAD}Content-Length: 100\r\n\r\n{{\"a\":".encode())
    await writer.drain()
    if trickle:
        for _ in range(10):
            writer.write(b" ")
            await asyncio.sleep(0.1)
    answer = await _closed_within(reader, 3)
    assert answer == b"" or b" 408 " in answer.split(b"\r\n")[0], answer[:100]
    writer.close()


async def test_one_peer_holds_a_bounded_number_of_connections(endpoint):
    conns = [await asyncio.open_connection("127.0.0.1", endpoint) for _ in range(12)]
    await asyncio.sleep(0.2)
    still_open = 0
    for reader, _ in conns:
        try:
            got = await asyncio.wait_for(reader.read(1), 0.1)
        except TimeoutError:
            still_open += 1
        else:
            assert got == b""
    assert still_open <= server.MAX_CONNECTIONS_PER_PEER
    for _, writer in conns:
        writer.close()


async def test_a_client_leaving_mid_body_is_one_line(endpoint, caplog):
    caplog.set_level(logging.DEBUG)
    _, writer = await asyncio.open_connection("127.0.0.1", endpoint)
    writer.write(f"{HEAD}Content-Length: 1000\r\n\r\n{{\"a\":".encode())
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()
    await asyncio.sleep(0.8)
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
