"""The process: production wiring as a real subprocess (a client leaving aborts its
upstream request, graceful SIGTERM) and the exit status when the port is taken."""

from __future__ import annotations

import asyncio
import signal
import socket

from ..builders import app_route, gateway_config, handler_route
from ..conftest import raw_request, refused, run_gatewayd, status_of, wait_for


async def test_subprocess_cancellation_and_graceful_sigterm(gateway_process, upstream):
    """Production wiring: 1. a client leaving mid-flight aborts the upstream request within
    100 ms 2. SIGTERM with a request in flight: it completes 200, new connections are
    refused, the process exits 0 and removes its control socket."""
    gp = gateway_process(app_route(upstream.url), shutdown_timeout=10)
    port = int(gp.config_path.read_text().split('127.0.0.1:')[1].split('"')[0])
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow?ms=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await wait_for(lambda: upstream.active == 1)
    t0 = loop.time()
    writer.close()
    await wait_for(lambda: upstream.aborted, timeout=2)
    assert upstream.aborted[0] - t0 < 0.1
    snap = await asyncio.to_thread(gp.command, {"cmd": "snapshot"})
    assert snap["snapshot"]["routes"][0]["cancelled"] == 1

    inflight = asyncio.create_task(raw_request(port, b"GET /slow?ms=1000 HTTP/1.1\r\nHost: x\r\n\r\n", 10))
    await wait_for(lambda: upstream.active == 1)
    gp.signal(signal.SIGTERM)
    await wait_for(lambda: not gp.socket_path.exists() or gp.proc.poll() is not None or refused(port), timeout=5)
    resp = await inflight
    assert status_of(resp) == 200 and resp.endswith(b"slow done\n")
    assert await asyncio.to_thread(gp.wait, 10) == 0
    assert not gp.socket_path.exists()


def test_exit_status_when_port_in_use(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        cfg = gateway_config(tmp_path, handler_route(), port=port)
        proc = run_gatewayd(cfg, tmp_path)
        assert proc.wait(15) == 1
        err = (tmp_path / "err").read_text()
        assert f"127.0.0.1:{port}" in err and "in use" in err
    finally:
        blocker.close()
