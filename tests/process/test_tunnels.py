"""WebSocket tunnels and the process (issue 22): SIGTERM closes them after
shutdown_timeout, and a worker that dies takes its own tunnels and nothing else.
gatewayd as a real subprocess; a real aiohttp WebSocket upstream."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from ..builders import app_route
from ..conftest import wait_for
from ..proxy.wsclient import WsClient
from .test_workers import fresh_get, port_of, snap, wait_for_workers


async def test_sigterm_closes_tunnels_after_shutdown_timeout(gateway_process, ws_upstream):
    gp = gateway_process(app_route(ws_upstream.url, websocket=True), shutdown_timeout=1.5)
    port = port_of(gp)
    c = await WsClient.connect(port)
    assert await c.echo(b"before") == b"before"
    began = time.monotonic()
    gp.signal(signal.SIGTERM)
    assert await c.echo(b"draining") == b"draining"  # left alone while the others drain
    assert await c.closed_by_peer(timeout=5)
    waited = time.monotonic() - began
    assert 1.4 <= waited < 3.0, waited
    assert await asyncio.to_thread(gp.wait, 10) == 0
    c.close()


async def test_a_dead_worker_takes_its_tunnels_and_nothing_else(gateway_process, ws_upstream):
    gp = gateway_process(app_route(ws_upstream.url, websocket=True), workers=2)
    port = port_of(gp)
    await asyncio.to_thread(wait_for_workers, gp, 2)
    clients = [await WsClient.connect(port) for _ in range(24)]
    s = await asyncio.to_thread(snap, gp)
    victim = s["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    ends = await asyncio.gather(*(c.closed_by_peer(timeout=1.0) for c in clients))
    gone = [c for c, ended in zip(clients, ends, strict=True) if ended]
    kept = [c for c, ended in zip(clients, ends, strict=True) if not ended]
    assert gone and kept  # (24 tunnels over two workers: both hold some)
    for i, c in enumerate(kept):
        assert await c.echo(b"%d" % i) == b"%d" % i
    await wait_for(lambda: ws_upstream.open == len(kept), timeout=5)
    assert await fresh_get(port, "/plain") == 200
    for c in clients:
        c.close()
