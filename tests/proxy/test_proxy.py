"""Proxying (SPEC §3): routing, headers, bodies both ways, upstream failures."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
from aiohttp import web

from gatewayd.proxy.exchange import UpstreamFailure
from gatewayd.upstreams.application import Application, respond

from ..builders import app_route, free_port, handler_route
from ..conftest import raw_request, status_of, wait_for


def one_route(url: str, **route: object) -> str:
    return app_route(url, {"read_timeout": 1.0, "connect_timeout": 1.0}, **route)


async def test_request_headers_hop_by_hop_and_forwarded(start_gateway, upstream):
    gw = await start_gateway(one_route(upstream.url))
    raw = (b"GET /echo HTTP/1.1\r\nHost: example.test:8080\r\nConnection: keep-alive, X-Private\r\n"
           b"X-Private: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: x\r\n"
           b"Upgrade: h2c\r\nX-Forwarded-For: 10.0.0.1\r\nX-Keep: yes\r\nUser-Agent: test/1\r\n"
           b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    resp = await raw_request(gw.port, raw)
    assert status_of(resp) == 200
    got = json.loads(resp.split(b"\r\n\r\n", 1)[1])
    names = {k.lower(): v for k, v in got["headers"]}
    for dropped in ("connection", "x-private", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert dropped not in names, dropped
    assert names["x-keep"] == "yes"
    assert names["user-agent"] == "test/1"
    assert names["host"] == "example.test:8080"  # passed through unchanged
    assert names["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"  # appended, never trusted
    assert names["x-forwarded-proto"] == "http"
    assert names["x-forwarded-host"] == "example.test:8080"
    assert "accept-encoding" not in names  # the client sent none; the gateway adds none


async def test_header_names_go_upstream_as_the_client_wrote_them(start_gateway):
    """Names are passed on byte for byte, in the client's order and case (field names
    are case-insensitive; nginx does the same): only the gateway's own fields are added."""
    from ..faults import RawUpstream

    relay = await RawUpstream().start()
    try:
        gw = await start_gateway(one_route(relay.url))
        resp = await raw_request(gw.port, b"GET /a HTTP/1.1\r\nhost: x\r\nuser-agent: u\r\n"
                                          b"X-CamelCase: v\r\naccept: */*\r\nConnection: close\r\n\r\n")
        assert status_of(resp) == 200
        lines = relay.requests[0].head.split(b"\r\n")[1:]
        assert lines[:4] == [b"host: x", b"user-agent: u", b"X-CamelCase: v", b"accept: */*"], lines
    finally:
        await relay.stop()


async def test_response_headers_hop_by_hop_and_no_forged_reason(start_gateway):
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.Response(text="x", headers={
            "X-Private": "1", "Proxy-Authenticate": "Basic", "X-Gatewayd-Reason": "forged",
            "Trailer": "X-T", "X-Public": "ok",
        })
        resp.headers["Connection"] = "X-Private"
        return resp

    port = free_port()
    runner = web.ServerRunner(web.Server(handler), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        gw = await start_gateway(one_route(f"http://127.0.0.1:{port}"))
        async with aiohttp.ClientSession() as s, s.get(gw.url + "/") as r:
            assert r.status == 200
            assert r.headers["X-Public"] == "ok"
            for name in ("X-Private", "Proxy-Authenticate", "X-Gatewayd-Reason", "Trailer"):
                assert name not in r.headers, name
    finally:
        await runner.cleanup()


async def test_bodies_stream_both_ways(start_gateway, upstream):
    gw = await start_gateway(one_route(upstream.url), max_body_size="4MiB")

    async def body():
        for _ in range(64):
            yield b"y" * 16384

    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/echo", data=body()) as r:  # chunked upload
            got = await r.json()
        assert r.status == 200 and len(got["body"]) == 64 * 16384
        names = {k.lower() for k, _ in got["headers"]}
        # read whole before admission, then forwarded with its length
        assert "transfer-encoding" not in names
        assert dict((k.lower(), v) for k, v in got["headers"])["content-length"] == str(64 * 16384)
        async with s.post(gw.url + "/echo", data=b"z" * 1000) as r:
            got = await r.json()
        assert got["body"] == "z" * 1000
        assert dict((k.lower(), v) for k, v in got["headers"])["content-length"] == "1000"
        async with s.get(gw.url + "/big?bytes=3000000") as r:
            data = await r.read()
        assert r.status == 200 and len(data) == 3000000
        async with s.get(gw.url + "/echo") as r:
            got = await r.json()
        # a request without a body must not become a chunked one upstream
        assert not {k.lower() for k, _ in got["headers"]} & {"transfer-encoding", "content-length"}


async def test_body_too_large(start_gateway, upstream):
    """Over max_body_size: 413 before forwarding when Content-Length says so, or while
    streaming a chunked body; the upstream never receives a complete request."""
    gw = await start_gateway(one_route(upstream.url), max_body_size=1000)
    resp = await raw_request(gw.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"a" * 5000)
    assert status_of(resp) == 413 and b"X-Gatewayd-Reason: body_too_large" in resp
    assert upstream.started == 0

    async def body():
        for _ in range(10):
            yield b"b" * 500

    async with aiohttp.ClientSession() as s, s.post(gw.url + "/echo", data=body()) as r:
        assert r.status == 413
        assert r.headers["X-Gatewayd-Reason"] == "body_too_large"
    assert all(len(q["body"]) <= 1000 for q in upstream.requests)
    r = gw.runtime.table.routes["app"]
    await wait_for(lambda: r.gate.in_flight == 0)


async def test_expect_100_continue(start_gateway, upstream):
    gw = await start_gateway(one_route(upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    got = json.loads(await reader.readexactly(length))
    writer.close()
    assert got["body"] == "hello"
    assert "expect" not in {k.lower() for k, _ in got["headers"]}


async def test_routing_longest_prefix_host_and_strip(start_gateway, upstream):
    gw = await start_gateway(f"""
        [upstreams.app]
        servers = ["{upstream.url}"]

        [[routes]]
        name = "root"
        path_prefix = "/"
        upstream = "app"

        [[routes]]
        name = "api"
        path_prefix = "/api"
        strip_prefix = true
        upstream = "app"

        [[routes]]
        name = "api-v2"
        path_prefix = "/api/v2"
        upstream = "app"

        [[routes]]
        name = "only-host"
        path_prefix = "/"
        host = "special.test"
        upstream = "app"
    """)
    routes = gw.runtime.table.routes

    async def get(path: str, host: str = "x") -> None:
        resp = await raw_request(gw.port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert status_of(resp) == 200

    await get("/echo/a")
    await get("/api/echo?q=1")
    await get("/api/v2/echo")
    await get("/echo/b", host="Special.TEST:8080")
    assert [routes[n].stats.requests for n in ("root", "api", "api-v2", "only-host")] == [1, 1, 1, 1]
    assert [q["target"] for q in upstream.requests] == ["/echo/a", "/echo?q=1", "/api/v2/echo", "/echo/b"]


async def test_no_route_is_404(start_gateway, upstream):
    gw = await start_gateway(f"""
        [upstreams.app]
        servers = ["{upstream.url}"]

        [[routes]]
        name = "api"
        path_prefix = "/api"
        upstream = "app"
    """)
    resp = await raw_request(gw.port, b"GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(resp) == 404 and b"X-Gatewayd-Reason: no_route" in resp
    assert upstream.started == 0


async def test_upstream_refused_is_502(start_gateway):
    gw = await start_gateway(one_route(f"http://127.0.0.1:{free_port()}"))
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/") as r:
        assert r.status == 502
        assert r.headers["X-Gatewayd-Reason"] == "upstream_connect"
    stats = gw.runtime.table.routes["app"].stats
    assert stats.upstream_errors == {"upstream_connect": 1}
    assert gw.runtime.table.routes["app"].gate.in_flight == 0


async def test_upstream_silent_is_504(start_gateway, upstream):
    gw = await start_gateway(one_route(upstream.url))  # read_timeout = 1.0
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/slow?ms=3000") as r:
        assert r.status == 504
        assert r.headers["X-Gatewayd-Reason"] == "upstream_timeout"


async def test_upstream_reset_before_head_is_502(start_gateway):
    """An upstream that accepts and closes without answering."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    loop = asyncio.get_running_loop()

    async def slam() -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            await loop.sock_recv(conn, 65536)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()

    task = asyncio.create_task(slam())
    try:
        gw = await start_gateway(one_route(f"http://127.0.0.1:{port}"))
        async with aiohttp.ClientSession() as s, s.post(gw.url + "/", data=b"x") as r:
            assert r.status == 502
            assert r.headers["X-Gatewayd-Reason"] in ("upstream_reset", "upstream_invalid")
    finally:
        task.cancel()
        listener.close()


async def test_handler_upstream_and_its_cancellation(start_gateway):
    gw = await start_gateway(handler_route())
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/") as r:
        assert r.status == 200
        assert await r.text() == "hello from gatewayd simulated_io\n"
    r = gw.runtime.table.routes["demo"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /?ms=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await wait_for(lambda: r.gate.in_flight == 1)
    writer.close()
    await wait_for(lambda: r.gate.in_flight == 0, timeout=0.5)
    assert r.stats.cancelled_in_flight == 1


class _EchoKind(Application):
    """An upstream kind defined here, to plug in through the factory's KINDS table: it
    answers with what the exchange carried, fails on /fail and waits on /wait."""

    built: list[_EchoKind] = []

    def __init__(self, config, turn) -> None:
        super().__init__(config, turn)
        self.started = self.closed = False
        self.cancelled = 0
        self.slots_held: list[int] = []
        _EchoKind.built.append(self)

    async def start(self) -> None:
        self.started = True

    async def serve(self, ex) -> None:
        self.slots_held.append(ex.route.gate.in_flight)
        if ex.path.startswith("/fail"):
            raise UpstreamFailure(502, "handler_crashed")
        if ex.path.startswith("/wait"):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        body = await ex.body.read_all() if ex.body is not None else b""
        text = f"{ex.request.method} {ex.path} {ex.client_ip} started={self.started} "
        respond(ex, 201, [("X-Kind", "echo"), ("Keep-Alive", "timeout=1")], text.encode() + body)

    async def _close(self) -> None:
        self.closed = True


async def test_an_upstream_kind_plugged_in_serves_through_the_contract(start_gateway, monkeypatch):
    """The upstream-kind seam: a kind is an import string in KINDS, used only through
    the Upstream contract.
    1. the "handler" kind is replaced by one defined here; the gateway starts it
    2. a GET and a POST reach it admitted (slot held), with the forwarded path, the
       client address and the body; its answer goes out (hop-by-hop fields dropped)
    3. its UpstreamFailure is the client's 502 with its reason, counted
    4. a client that leaves cancels it and frees the slot
    5. a reload that changes the upstream builds a new one and closes the old."""
    from gatewayd.upstreams import factory

    _EchoKind.built.clear()
    monkeypatch.setitem(factory.KINDS, "handler", f"{__name__}:_EchoKind")
    body = """
        [upstreams.demo]
        handler = "gatewayd.handlers:simulated_io"
        {extra}

        [[routes]]
        name = "demo"
        upstream = "demo"
        path_prefix = "/k"
        strip_prefix = true
        max_concurrency = 1
    """
    gw = await start_gateway(body.format(extra=""))
    kind = _EchoKind.built[0]
    r = gw.runtime.table.routes["demo"]
    assert r.upstream is kind
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/k/hello?x=1") as resp:
            assert resp.status == 201 and resp.headers["X-Kind"] == "echo"
            assert "Keep-Alive" not in resp.headers
            assert await resp.text() == "GET /hello?x=1 127.0.0.1 started=True "
        async with s.post(gw.url + "/k/echo", data=b"abc") as resp:
            assert resp.status == 201 and await resp.text() == "POST /echo 127.0.0.1 started=True abc"
        async with s.get(gw.url + "/k/fail") as resp:
            assert resp.status == 502 and resp.headers["X-Gatewayd-Reason"] == "handler_crashed"
    assert r.stats.upstream_errors == {"handler_crashed": 1}
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /k/wait HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await wait_for(lambda: r.gate.in_flight == 1)
    writer.close()
    await wait_for(lambda: r.gate.in_flight == 0 and kind.cancelled == 1, timeout=0.5)
    assert kind.slots_held == [1, 1, 1, 1]
    text = gw.config_path.read_text()
    gw.config_path.write_text(text.replace('handler = "gatewayd.handlers:simulated_io"',
                                           'handler = "gatewayd.handlers:simulated_io"\nprocesses = 3'))
    answer = await gw.command({"cmd": "reload"})
    assert answer["ok"], answer
    assert len(_EchoKind.built) == 2 and gw.runtime.table.routes["demo"].upstream is _EchoKind.built[1]
    await wait_for(lambda: kind.closed, timeout=2)
    assert _EchoKind.built[1].started and not _EchoKind.built[1].closed
