"""WebSocket tunnels (issue 22), through the front door: gatewayd in-process, a
real aiohttp WebSocket upstream on 127.0.0.1, aiohttp's WebSocket client or a
bare one (tests/proxy/wsclient.py) where the bytes on the wire matter."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSMsgType

from tests.builders import app_route, route_toml, upstream_toml
from tests.certs import client_context, issue, tls_section, write_ca
from tests.conftest import head_of, status_of, wait_for
from tests.proxy.wsclient import WsClient, frame, read_frame, upgrade_request
from tests.proxy.wsupstream import WsUpstream

HANDLER = "tests.proxy.wsupstream:ws_echo_handler"


def ws_route(up: WsUpstream, **keys: Any) -> str:
    return app_route(up.url, websocket=True, **keys)


def route_of(gw: Any, name: str = "app") -> Any:
    return gw.runtime.table.routes[name]


async def test_echo_text_binary_and_a_mebibyte(start_gateway, ws_upstream) -> None:
    gw = await start_gateway(ws_route(ws_upstream))
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{gw.url}/echo") as ws:
        await ws.send_str("héllo")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "héllo")
        await ws.send_bytes(b"\x00\xff" * 8)
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, b"\x00\xff" * 8)
        big = bytes(range(256)) * 4096  # 1 MiB
        await ws.send_bytes(big)
        msg = await ws.receive(timeout=10)
        assert msg.type == WSMsgType.BINARY and msg.data == big
    # the upstream saw the upgrade with its headers, and the client's address
    seen = ws_upstream.headers[0]
    assert seen["Upgrade"].lower() == "websocket" and "upgrade" in seen["Connection"].lower()
    assert seen["Sec-WebSocket-Version"] == "13" and seen["X-Forwarded-For"] == "127.0.0.1"


async def test_the_slot_is_released_at_101(start_gateway, ws_upstream) -> None:
    """One slot: two tunnels open at once, and a plain request is served beside them."""
    gw = await start_gateway(ws_route(ws_upstream, max_concurrency=1, max_queue=0))
    a = await WsClient.connect(gw.port)
    b = await WsClient.connect(gw.port)
    assert await a.echo(b"a") == b"a" and await b.echo(b"b") == b"b"
    route = route_of(gw)
    assert (route.gate.in_flight, route.stats.tunnels) == (0, 2)
    assert status_of(await head_of(gw.port, b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")) == 200
    snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]["routes"][0]
    assert snap["in_flight"] == 0
    a.close()
    b.close()
    await wait_for(lambda: route.stats.tunnels == 0)


async def test_the_cap_answers_503_tunnels_full(start_gateway, ws_upstream) -> None:
    gw = await start_gateway(ws_route(ws_upstream, max_tunnels=2, retry_after=7))
    clients = [await WsClient.connect(gw.port) for _ in range(2)]
    answer = await head_of(gw.port, upgrade_request())
    assert status_of(answer) == 503
    assert b"X-Gatewayd-Reason: tunnels_full\r\n" in answer and b"Retry-After: 7\r\n" in answer
    assert ws_upstream.sessions == 2  # the upstream never saw the third
    assert route_of(gw).stats.tunnels_full == 1
    clients[0].close()
    await wait_for(lambda: route_of(gw).stats.tunnels == 1)
    third = await WsClient.connect(gw.port)  # a place again
    assert await third.echo(b"3") == b"3"
    for c in (clients[1], third):
        c.close()


async def test_a_client_close_closes_the_upstream_within_100ms(start_gateway, ws_upstream) -> None:
    gw = await start_gateway(ws_route(ws_upstream))
    for end in ("close", "abort"):
        c = await WsClient.connect(gw.port)
        assert await c.echo(b"x") == b"x"
        ws_upstream.closed.clear()
        began = time.monotonic()
        c.close() if end == "close" else c.abort()
        await asyncio.wait_for(ws_upstream.closed.wait(), 2)
        assert time.monotonic() - began < 0.1, end
    await wait_for(lambda: route_of(gw).stats.tunnels == 0)


async def test_an_upstream_close_closes_the_client_within_100ms(start_gateway, ws_upstream) -> None:
    gw = await start_gateway(ws_route(ws_upstream))
    c = await WsClient.connect(gw.port, "/hangup")
    began = time.monotonic()
    assert await c.closed_by_peer(timeout=2)
    assert time.monotonic() - began < 0.1
    c.close()
    await wait_for(lambda: route_of(gw).stats.tunnels == 0)


async def test_idle_tunnels_are_closed_busy_ones_kept(start_gateway, ws_upstream) -> None:
    gw = await start_gateway(ws_route(ws_upstream, tunnel_idle_timeout=1.0))
    idle = await WsClient.connect(gw.port)
    busy = await WsClient.connect(gw.port)
    began = time.monotonic()
    closed = asyncio.ensure_future(idle.closed_by_peer(timeout=5))
    while not closed.done():
        assert await busy.echo(b"ping") == b"ping"  # bytes every 0.2 s: never idle
        await asyncio.wait([closed], timeout=0.2)
    assert closed.result()
    waited = time.monotonic() - began
    assert 0.95 <= waited < 2.6  # the timeout, to within the sweep's second (and the clock's ms)
    assert await busy.echo(b"still") == b"still"
    idle.close()
    busy.close()


async def test_a_frame_sent_with_the_upgrade_request_arrives(start_gateway, ws_upstream) -> None:
    """Bytes after the request's head in the same read are the tunnel's first."""
    gw = await start_gateway(ws_route(ws_upstream))
    c = await WsClient.connect(gw.port, first=frame(b"early"))
    _, data = await asyncio.wait_for(read_frame(c.reader), 5)
    assert data == b"early"
    c.close()


async def test_back_pressure_against_a_client_that_does_not_read(start_gateway, ws_upstream) -> None:
    """The upstream sends 200 MiB to a client that reads nothing: the gateway stops
    reading the upstream once the client's side is full, holds a bounded amount,
    and the tunnel moves again, all of it, once the client reads."""
    gw = await start_gateway(ws_route(ws_upstream))
    c = await WsClient.connect(gw.port, "/flood", rcvbuf=65536)
    last = -1

    def stalled() -> bool:
        nonlocal last
        now, last = last, ws_upstream.sent
        return now == last and last > 0

    await wait_for(stalled, timeout=10, interval=0.3)
    # it stalls: what the four sockets' kernel buffers hold (loopback grows them to a few
    # MiB each), not 200 MiB; the gateway's own share is below
    assert ws_upstream.sent < 32 * 1024 * 1024
    tunnel = next(iter(gw.runtime.server.tunnels))
    held = sum(e.transport.get_write_buffer_size() for e in (tunnel.client, tunnel.upstream))
    assert held <= 64 * 1024 + 256 * 1024  # the write high-water mark and one read (uvloop's size)
    got = 0
    async with asyncio.timeout(60):
        while got < ws_upstream.flood_size:
            _, data = await read_frame(c.reader)
            got += len(data)
    assert got == ws_upstream.flood_size
    c.close()


async def test_a_refusal_is_relayed_and_the_connection_goes_on(start_gateway, ws_upstream) -> None:
    gw = await start_gateway(ws_route(ws_upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(upgrade_request("/refuse") + b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 ")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    assert await reader.readexactly(length) == b"no websocket for you"
    head = await reader.readuntil(b"\r\n\r\n")  # the request after it, parsed as HTTP
    assert head.startswith(b"HTTP/1.1 200 ")
    writer.close()
    assert route_of(gw).stats.tunnels_opening == 0 and route_of(gw).stats.tunnels == 0


async def test_other_upgrades_and_websocket_off_are_not_forwarded(start_gateway, ws_upstream) -> None:
    gw = await start_gateway(
        ws_route(ws_upstream)
        + route_toml("off", "app", path_prefix="/off", strip_prefix=True)
    )
    h2c = (b"GET /plain HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
           b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
    assert status_of(await head_of(gw.port, h2c)) == 200
    listed = upgrade_request("/plain").replace(b"Upgrade: websocket", b"Upgrade: websocket, h2c")
    assert status_of(await head_of(gw.port, listed)) == 200  # one the parser does not stop at
    assert status_of(await head_of(gw.port, upgrade_request("/off/plain"))) == 200
    for seen in ws_upstream.headers:
        assert "Upgrade" not in seen and "upgrade" not in seen.get("Connection", "").lower()
    # the WebSocket endpoint behind a route without websocket: the upstream sees a plain GET
    answer = await head_of(gw.port, upgrade_request("/off/echo"))
    assert status_of(answer) != 101
    assert route_of(gw).stats.tunnels_total == 0


async def test_a_reload_leaves_open_tunnels_alone(start_gateway, ws_upstream, tmp_path: Path) -> None:
    gw = await start_gateway(ws_route(ws_upstream))
    c = await WsClient.connect(gw.port)
    assert await c.echo(b"before") == b"before"
    text = gw.config_path.read_text()
    gw.config_path.write_text(text.replace("max_concurrency = 100", "max_concurrency = 5")
                              .replace("websocket = true", "websocket = true\nmax_tunnels = 3"))
    answer = await gw.command({"cmd": "reload"})
    assert answer["ok"], answer
    assert await c.echo(b"after") == b"after"
    assert route_of(gw).stats.tunnels == 1
    c.close()
    await wait_for(lambda: route_of(gw).stats.tunnels == 0)


async def test_an_in_process_handler_answers_with_its_own_websocket(start_gateway) -> None:
    gw = await start_gateway(upstream_toml("h", handler=HANDLER) + route_toml("h", "h", websocket=True))
    async with aiohttp.ClientSession() as s, s.ws_connect(f"{gw.url}/ws") as ws:
        await ws.send_str("hi")
        msg = await ws.receive(timeout=5)
        assert msg.data == "handler:hi"
        route = route_of(gw, "h")
        # the handler's session holds its slot, and counts as one of the route's tunnels
        assert (route.gate.in_flight, route.stats.tunnels, route.stats.tunnels_opening) == (1, 1, 0)
    await wait_for(lambda: route_of(gw, "h").gate.in_flight == 0)
    stats = route_of(gw, "h").stats
    assert (stats.tunnels, stats.tunnels_opening, stats.tunnels_total) == (0, 0, 1)


async def test_one_access_log_line_per_tunnel_at_its_end(start_gateway, ws_upstream, tmp_path: Path) -> None:
    log_path = tmp_path / "access.json"
    gw = await start_gateway(ws_route(ws_upstream))
    text = gw.config_path.read_text().replace(
        'access_log = "off"', f'access_log = "{log_path}"\naccess_format = "json"')
    gw.config_path.write_text(text)
    assert (await gw.command({"cmd": "reload"}))["ok"]
    c = await WsClient.connect(gw.port)
    assert await c.echo(b"x" * 100) == b"x" * 100
    await asyncio.sleep(0)
    c.close()
    await wait_for(lambda: log_path.exists() and b'"status": 101' in log_path.read_bytes(), timeout=5)
    entry = json.loads(log_path.read_text().splitlines()[-1])
    assert entry["status"] == 101 and entry["route"] == "app" and entry["target"] == "/echo"
    assert entry["bytes"] >= 102 and entry["bytes_received"] >= 106  # a frame each way, at least
    assert entry["duration_ms"] > 0


async def test_two_thousand_tunnels_at_once(start_gateway, ws_upstream) -> None:
    gw = await start_gateway(ws_route(ws_upstream), max_connections=5000)
    clients = await asyncio.gather(*(WsClient.connect(gw.port) for _ in range(2000)))
    assert route_of(gw).stats.tunnels == 2000
    echoes = await asyncio.gather(*(c.echo(str(i).encode()) for i, c in enumerate(clients)))
    assert echoes == [str(i).encode() for i in range(2000)]
    for c in clients:
        c.close()
    await wait_for(lambda: route_of(gw).stats.tunnels == 0, timeout=10)
    await wait_for(lambda: ws_upstream.open == 0, timeout=10)


async def test_a_tunnel_over_a_tls_listener(start_gateway, ws_upstream, tls_ca, tmp_path: Path) -> None:
    """wss: the client's side is the gateway's own TLS transport; the tunnel carries
    a mebibyte each way through it, and the upstream sees X-Forwarded-Proto: https."""
    pem = issue(tls_ca, tmp_path / "certs", "gw", "ws.example")
    gw = await start_gateway(ws_route(ws_upstream), tls=tls_section(pem))
    big = bytes(range(256)) * 4096
    async with aiohttp.ClientSession() as s, s.ws_connect(
            f"wss://127.0.0.1:{gw.port}/echo", ssl=client_context(tls_ca),
            server_hostname="ws.example") as ws:
        await ws.send_bytes(big)
        msg = await ws.receive(timeout=10)
        assert msg.type == WSMsgType.BINARY and msg.data == big
    assert ws_upstream.headers[0]["X-Forwarded-Proto"] == "https"
    await wait_for(lambda: route_of(gw).stats.tunnels == 0)


async def test_a_tunnel_to_an_https_upstream(start_gateway, tls_ca, tmp_path: Path) -> None:
    """The upstream's side is the loop's TLS transport of a verified https:// server."""
    pem = issue(tls_ca, tmp_path / "up", "up", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pem.cert, pem.key)
    up = WsUpstream(ctx)
    await up.start()
    try:
        write_ca(tls_ca, tmp_path / "ca.pem")
        gw = await start_gateway(app_route(up.url, {"tls_ca": "ca.pem"}, websocket=True))
        c = await WsClient.connect(gw.port, first=frame(b"early"))
        _, data = await asyncio.wait_for(read_frame(c.reader), 5)
        assert data == b"early"
        big = bytes(range(256)) * 4096
        assert await c.echo(big, timeout=10) == big
        c.close()
        await wait_for(lambda: up.open == 0)
    finally:
        await up.stop()
