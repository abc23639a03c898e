"""Connections and the process: timeouts, max_connections, EMFILE, signals,
the access log, and the production wiring as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import aiohttp

from .conftest import ROOT, gateway_config, raw_request, status_of, wait_for, wait_for_sync


def app_route(url: str, **route: object) -> str:
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in route.items())
    return f"""
        [upstreams.app]
        servers = ["{url}"]

        [[routes]]
        name = "app"
        upstream = "app"
        {extra}
    """


async def test_request_header_timeout(start_gateway, upstream):
    """A head dribbled slower than request_header_timeout gets 408 and the connection closes,
    counted from the head's first byte (also for the second request on a connection)."""
    gw = await start_gateway(app_route(upstream.url), request_header_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"ok\n")
    t0 = time.monotonic()
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n")  # never finished
    data = await asyncio.wait_for(reader.read(), 3)
    elapsed = time.monotonic() - t0
    assert data.startswith(b"HTTP/1.1 408"), data
    assert 0.4 < elapsed < 1.5, elapsed
    writer.close()
    assert upstream.started == 1


async def test_keepalive_timeout_closes_idle_connection(start_gateway, upstream):
    gw = await start_gateway(app_route(upstream.url), keepalive_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"ok\n")
    t0 = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 3) == b""
    assert 0.4 < time.monotonic() - t0 < 1.6
    writer.close()


async def test_slow_body_gets_408(start_gateway, upstream):
    """A body that stops arriving is cut at request_body_timeout (plus its allowance)."""
    gw = await start_gateway(app_route(upstream.url), request_body_timeout=0.5, request_body_min_rate=1000000)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    t0 = time.monotonic()
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    assert status_of(data) == 408 and b"body_timeout" in data
    assert time.monotonic() - t0 < 2.0
    writer.close()
    r = gw.runtime.table.routes["app"]
    await wait_for(lambda: r.gate.in_flight == 0)


async def test_max_connections_pauses_accepting(start_gateway, upstream):
    """At max_connections the gateway stops accepting; the waiting connection is served
    as soon as one closes."""
    gw = await start_gateway(app_route(upstream.url), max_connections=3)
    held = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"ok\n")
        held.append(writer)
    assert gw.runtime.connections == 3
    extra = asyncio.create_task(raw_request(gw.port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 5))
    await asyncio.sleep(0.3)  # give it every chance to be (wrongly) accepted
    assert not extra.done() and gw.runtime.connections == 3
    held.pop().close()
    assert status_of(await asyncio.wait_for(extra, 3)) == 200
    for w in held:
        w.close()


class _Preamble:
    """An opener defined here, to plug in through the listener seam: every connection
    must start with ``HELLO\\r\\n`` (as a PROXY protocol header would), read before
    HTTP sees the connection; anything else closes it."""

    waits_for_peer = True
    PREAMBLE = b"HELLO\r\n"

    async def open(self, loop, conn, factory):
        got = b""
        while len(got) < len(self.PREAMBLE):
            chunk = await loop.sock_recv(conn, len(self.PREAMBLE) - len(got))
            if not chunk:
                raise ConnectionError("closed before its preamble")
            got += chunk
        if got != self.PREAMBLE:
            raise ValueError(f"bad preamble {got!r}")
        return await loop.connect_accepted_socket(factory, conn)


async def test_an_opener_wraps_connections_before_http(start_gateway, upstream, monkeypatch):
    """The listener seam: the opener chosen for a listen address runs before HTTP.
    1. opener_for gives every address the preamble opener; the gateway starts
    2. a client connects and sends nothing: it holds a connection, not the accept loop
    3. a client that sends the preamble and a request gets 200
    4. a client that sends a request without the preamble is closed without an answer
    5. the silent client leaves: no connection is left counted
    6. another silent client is closed when the listeners stop, and not counted."""
    from gatewayd.http import listener

    monkeypatch.setattr(listener, "opener_for", lambda address: _Preamble())
    gw = await start_gateway(app_route(upstream.url))
    silent_reader, silent = await asyncio.open_connection("127.0.0.1", gw.port)
    await wait_for(lambda: gw.runtime.connections == 1)
    request = b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    served = await asyncio.wait_for(raw_request(gw.port, _Preamble.PREAMBLE + request, 3), 4)
    assert status_of(served) == 200 and served.endswith(b"ok\n"), served
    try:  # closed with the request unread: a reset, or an end with nothing before it
        refused = await asyncio.wait_for(raw_request(gw.port, request, 3), 4)
    except ConnectionResetError:
        refused = b""
    assert refused == b""
    assert [r["target"] for r in upstream.requests] == ["/ok"]
    await wait_for(lambda: gw.runtime.connections == 1)
    silent.close()
    await wait_for(lambda: gw.runtime.connections == 0)
    late_reader, late = await asyncio.open_connection("127.0.0.1", gw.port)
    await wait_for(lambda: gw.runtime.connections == 1)
    await gw.runtime.acceptor.stop_all()
    assert gw.runtime.connections == 0
    assert await asyncio.wait_for(late_reader.read(), 2) == b""
    late.close()


async def test_process_executor_keeps_loop_free(start_gateway, upstream):
    """CPU-heavy jobs run in the process pool: another route's loop lag stays low."""
    gw = await start_gateway(f"""
        [upstreams.cpu]
        handler = "gatewayd.handlers:cpu_hash"
        executor = "process"
        processes = 2

        [upstreams.app]
        servers = ["{upstream.url}"]

        [[routes]]
        name = "cpu"
        path_prefix = "/cpu"
        upstream = "cpu"
        max_concurrency = 2
        queue_timeout = 60

        [[routes]]
        name = "app"
        path_prefix = "/"
        upstream = "app"
    """)
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/cpu?n=10") as r:  # warm the pool
            assert r.status == 200
        gw.runtime.lag.max = 0.0
        t0 = time.monotonic()
        jobs = [asyncio.create_task(s.get(gw.url + "/cpu?n=400000")) for _ in range(4)]
        while not all(j.done() for j in jobs):
            async with s.get(gw.url + "/ok") as r:
                assert r.status == 200
            await asyncio.sleep(0.02)
        for j in jobs:
            resp = await j
            assert resp.status == 200 and len(await resp.read()) == 65
        busy = time.monotonic() - t0
    assert busy > 0.3  # the jobs really took CPU time
    assert gw.runtime.lag.max < 0.1, gw.runtime.lag.max


def _start(config, tmp_path, **popen):
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "gatewayd", "--config", str(config)],
                                stdout=out, stderr=err, cwd=str(ROOT), **popen)


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
    await wait_for(lambda: not gp.socket_path.exists() or gp.proc.poll() is not None or _refused(port), timeout=5)
    resp = await inflight
    assert status_of(resp) == 200 and resp.endswith(b"slow done\n")
    assert await asyncio.to_thread(gp.wait, 10) == 0
    assert not gp.socket_path.exists()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return False
    except OSError:
        return True


async def test_access_log_and_sigusr1_reopen(tmp_path, upstream):
    """Combined lines (499 for a client that left), and SIGUSR1 reopening a rotated file."""
    log_path = tmp_path / "access.log"
    cfg = gateway_config(tmp_path, app_route(upstream.url))
    cfg.write_text(cfg.read_text().replace('access_log = "off"', f'access_log = "{log_path}"'))
    port = int(cfg.read_text().split('127.0.0.1:')[1].split('"')[0])
    proc = _start(cfg, tmp_path)
    try:
        wait_for_sync(lambda: not _refused(port))
        assert status_of(await raw_request(port, b"GET /ok?a=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: ua/1\r\n"
                                           b"Connection: close\r\n\r\n")) == 200
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await wait_for(lambda: upstream.active == 1)
        writer.close()
        await wait_for(lambda: log_path.exists() and b" 499 " in log_path.read_bytes(), timeout=3)
        lines = log_path.read_text().splitlines()
        assert lines[0].startswith('127.0.0.1 - - [')
        assert '"GET /ok?a=1 HTTP/1.1" 200 3 "-" "ua/1"' in lines[0]
        os.rename(log_path, tmp_path / "access.log.1")
        proc.send_signal(signal.SIGUSR1)
        await wait_for(lambda: log_path.exists(), timeout=3)
        assert status_of(await raw_request(port, b"GET /ok?b=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == 200
        await wait_for(lambda: b"/ok?b=2" in log_path.read_bytes(), timeout=3)
        assert b"/ok?b=2" not in (tmp_path / "access.log.1").read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


async def test_json_access_log(tmp_path, upstream):
    log_path = tmp_path / "access.json"
    cfg = gateway_config(tmp_path, app_route(upstream.url))
    cfg.write_text(cfg.read_text().replace('access_log = "off"', f'access_log = "{log_path}"\naccess_format = "json"'))
    port = int(cfg.read_text().split('127.0.0.1:')[1].split('"')[0])
    proc = _start(cfg, tmp_path)
    try:
        wait_for_sync(lambda: not _refused(port))
        await raw_request(port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await wait_for(lambda: log_path.exists() and log_path.read_bytes().endswith(b"\n"), timeout=3)
        entry = json.loads(log_path.read_text().splitlines()[0])
        assert entry["status"] == 200 and entry["route"] == "app" and entry["target"] == "/ok"
        assert entry["duration_ms"] >= 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


async def test_emfile_does_not_kill_accept_loop(tmp_path, upstream):
    """With a tiny fd limit, connections beyond it hit EMFILE in accept: the gateway logs,
    keeps running, and serves again once connections close."""
    cfg = gateway_config(tmp_path, app_route(upstream.url), max_connections=1000)
    port = int(cfg.read_text().split('127.0.0.1:')[1].split('"')[0])

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = _start(cfg, tmp_path, preexec_fn=low_limit)
    try:
        wait_for_sync(lambda: not _refused(port))
        held = []
        for _ in range(80):
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            held.append(s)
        wait_for_sync(lambda: "Too many open files" in (tmp_path / "err").read_text(), timeout=5)
        assert proc.poll() is None
        for s in held:
            s.close()
        async def served() -> bool:
            return status_of(await raw_request(port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 2)) == 200
        for _ in range(50):
            if await served():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("not served after EMFILE")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_exit_status_when_port_in_use(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        cfg = gateway_config(tmp_path, """
            [upstreams.demo]
            handler = "gatewayd.handlers:simulated_io"

            [[routes]]
            name = "demo"
            upstream = "demo"
        """, port=port)
        proc = _start(cfg, tmp_path)
        assert proc.wait(15) == 1
        err = (tmp_path / "err").read_text()
        assert f"127.0.0.1:{port}" in err and "in use" in err
    finally:
        blocker.close()
