"""Connections (SPEC §3): the header, keep-alive and body timeouts, max_connections,
and an accept loop that survives EMFILE."""

from __future__ import annotations

import asyncio
import resource
import signal
import socket
import time

from ..builders import app_route, gateway_config
from ..conftest import raw_request, refused, run_gatewayd, status_of, wait_for, wait_for_sync


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


async def test_emfile_does_not_kill_accept_loop(tmp_path, upstream):
    """With a tiny fd limit, connections beyond it hit EMFILE in accept: the gateway logs,
    keeps running, and serves again once connections close."""
    cfg = gateway_config(tmp_path, app_route(upstream.url), max_connections=1000)
    port = int(cfg.read_text().split('127.0.0.1:')[1].split('"')[0])

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = run_gatewayd(cfg, tmp_path, preexec_fn=low_limit)
    try:
        wait_for_sync(lambda: not refused(port))
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


async def test_an_opener_wraps_connections_before_http(start_gateway, upstream):
    """The listener seam: the opener chosen for a listen address runs before HTTP.
    1. the gateway starts; every listen address is given the preamble opener
    2. a client connects and sends nothing: it holds a connection, not the accept loop
    3. a client that sends the preamble and a request gets 200
    4. a client that sends a request without the preamble is closed without an answer
    5. the silent client leaves: no connection is left counted
    6. another silent client is closed when the listeners stop, and not counted."""
    gw = await start_gateway(app_route(upstream.url))
    for address in gw.runtime.acceptor.addresses:
        gw.runtime.acceptor.set_opener(address, _Preamble())
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
