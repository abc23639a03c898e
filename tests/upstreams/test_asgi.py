"""ASGI applications in-process (issue 23): gatewayd in-process, real clients,
our own raw ASGI apps and real Starlette and FastAPI ones (tests/upstreams/asgi_apps.py)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from typing import Any

import aiohttp
import pytest

from tests.builders import route_toml, upstream_toml
from tests.conftest import head_of, wait_for
from tests.upstreams.asgi_apps import SEEN

APPS = "tests.upstreams.asgi_apps"


def asgi(name: str, app: str, lifespan: str | None = None, **route: Any) -> str:
    keys: dict[str, Any] = {"handler": f"{APPS}:{app}", "interface": "asgi"}
    if lifespan is not None:
        keys["lifespan"] = lifespan
    return upstream_toml(name, **keys) + route_toml(name, name, **route)


@pytest.fixture(autouse=True)
def fresh_seen() -> None:
    SEEN.update(events=[], chunks=0, startups=0)


async def test_the_scope_is_the_asgi_spec(start_gateway) -> None:
    gw = await start_gateway(asgi("a", "scope_echo", path_prefix="/api", strip_prefix=True))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /api/caf%C3%A9/x%20y?q=1&r=%20 HTTP/1.1\r\nHost: example.com\r\n"
                 b"X-Thing: One\r\nx-thing: two\r\nUser-Agent: t\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    scope = json.loads(await reader.readexactly(length))
    local_port = writer.get_extra_info("sockname")[1]
    writer.close()
    assert scope["type"] == "http" and scope["asgi"]["version"] == "3.0"
    assert (scope["http_version"], scope["method"], scope["scheme"]) == ("1.1", "GET", "http")
    # the whole path (root_path included, as ASGI frameworks expect), root_path the stripped prefix
    assert scope["path"] == "/api/café/x y" and scope["raw_path"] == "/api/caf%C3%A9/x%20y"
    assert scope["query_string"] == "q=1&r=%20" and scope["root_path"] == "/api"
    # headers as received: names lower-cased, order and duplicates kept
    assert scope["headers"][:4] == [["host", "example.com"], ["x-thing", "One"], ["x-thing", "two"],
                                    ["user-agent", "t"]]
    assert scope["client"] == ["127.0.0.1", local_port] and scope["server"] == ["127.0.0.1", gw.port]
    assert scope["messages"] == [[0, False]]  # one http.request message, no body


async def test_the_scope_of_a_route_that_strips_nothing(start_gateway) -> None:
    """The common case, built without decoding: the path as forwarded, no root_path."""
    gw = await start_gateway(asgi("a", "scope_echo"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /plain/path?a=1&b HTTP/1.1\r\nHost: h\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    scope = json.loads(await reader.readexactly(length))
    local_port = writer.get_extra_info("sockname")[1]
    writer.close()
    assert (scope["path"], scope["raw_path"], scope["query_string"], scope["root_path"]) == (
        "/plain/path", "/plain/path", "a=1&b", "")
    assert scope["client"] == ["127.0.0.1", local_port] and scope["scheme"] == "http"


async def test_request_bodies_arrive_as_messages(start_gateway) -> None:
    gw = await start_gateway(asgi("a", "scope_echo"), request_buffer_size=65536)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/", data=b"x" * 1000) as r:
            assert (await r.json())["messages"] == [[1000, False]]  # buffered: one message
        big = b"y" * (5 * 1024 * 1024)
        async with s.post(f"{gw.url}/", data=io.BytesIO(big)) as r:
            messages = (await r.json())["messages"]
    # past the buffer it streams: several messages, the last empty without more_body
    assert len(messages) > 2 and sum(n for n, _ in messages) == len(big)
    assert all(more for _, more in messages[:-1]) and messages[-1] == [0, False]


async def test_responses_stream_with_back_pressure(start_gateway) -> None:
    gw = await start_gateway(asgi("a", "stream_out"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, limit=2**16)
    sock = writer.get_extra_info("socket")
    import socket as socket_module
    sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_RCVBUF, 65536)
    writer.write(b"GET /?n=800 HTTP/1.1\r\nHost: x\r\n\r\n")  # 50 MiB
    writer.transport.pause_reading()
    last = -1

    def stalled() -> bool:
        nonlocal last
        now, last = last, SEEN["chunks"]
        return now == last and last > 0

    await wait_for(stalled, timeout=10, interval=0.3)
    assert SEEN["chunks"] < 200  # the application waits on its sends: not 800 chunks ahead
    writer.transport.resume_reading()
    got = 0
    async with asyncio.timeout(30):
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"transfer-encoding: chunked" in head.lower()
        while not (await reader.read(1 << 20)).endswith(b"0\r\n\r\n"):
            pass
    got = SEEN["chunks"]
    writer.close()
    assert got == 800


async def test_a_leaving_client_gets_disconnect_then_cancellation(start_gateway) -> None:
    gw = await start_gateway(asgi("poll", "long_poll", path_prefix="/poll")
                             + asgi("sleep", "sleeper", path_prefix="/sleep"))
    for path, expect in (("/poll", ["long_poll: http.disconnect", "long_poll: cancelled"]),
                         ("/sleep", ["sleeper: cancelled"])):
        SEEN["events"].clear()
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        if path == "/poll":
            await reader.readuntil(b"waiting\n")
        else:
            await wait_for(lambda: gw.runtime.table.routes["sleep"].gate.in_flight == 1)
        began = time.monotonic()
        writer.close()
        await wait_for(lambda expect=expect: SEEN["events"] == expect, timeout=2)
        assert time.monotonic() - began < 0.1, path
    for name in ("poll", "sleep"):
        route = gw.runtime.table.routes[name]
        await wait_for(lambda route=route: route.gate.in_flight == 0)
        assert route.stats.cancelled_in_flight == 1  # a 499, not an error


async def test_errors_are_500_handler_error_and_logged(start_gateway, caplog) -> None:
    gw = await start_gateway(asgi("a", "broken"))
    caplog.set_level(logging.ERROR, logger="gatewayd")
    for path in ("/raise", "/silent"):
        head = await head_of(gw.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert head.startswith(b"HTTP/1.1 500 ") and b"X-Gatewayd-Reason: handler_error" in head
    assert "ValueError: broken on purpose" in caplog.text  # with its traceback
    assert "returned without a response" in caplog.text
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)  # cut: the connection ends mid-body
    writer.close()
    assert data.startswith(b"HTTP/1.1 200 ") and b"partial" in data and not data.endswith(b"0\r\n\r\n")


async def test_admission_holds_the_slot_until_the_app_returns(start_gateway) -> None:
    gw = await start_gateway(asgi("a", "sleeper", max_concurrency=1, max_queue=5))
    async with aiohttp.ClientSession() as s:
        first = asyncio.ensure_future(s.get(f"{gw.url}/?ms=300"))
        await wait_for(lambda: gw.runtime.table.routes["a"].gate.in_flight == 1)
        second = asyncio.ensure_future(s.get(f"{gw.url}/?ms=0"))
        await wait_for(lambda: gw.runtime.table.routes["a"].gate.queued == 1)
        snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]["routes"][0]
        assert (snap["in_flight"], snap["queued"]) == (1, 1)
        for r in await asyncio.gather(first, second):
            assert r.status == 200 and await r.read() == b"slept"
            r.release()


async def test_lifespan_state_reaches_every_request(start_gateway) -> None:
    gw = await start_gateway(asgi("a", "lifespanned"))
    assert SEEN["startups"] == 1
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/") as r:
        assert await r.json(content_type=None) == {"state": "db-pool"}
    await gw.runtime.shutdown(1.0)
    assert "shutdown" in SEEN["events"]


async def test_lifespan_auto_serves_an_app_without_it(start_gateway, caplog) -> None:
    caplog.set_level(logging.INFO, logger="gatewayd")
    gw = await start_gateway(asgi("a", "scope_echo"))
    assert "does not speak ASGI lifespan" in caplog.text
    async with aiohttp.ClientSession() as s, s.get(f"{gw.url}/") as r:
        assert r.status == 200


async def test_starlette(start_gateway) -> None:
    gw = await start_gateway(asgi("s", "starlette_app", path_prefix="/app", strip_prefix=True))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{gw.url}/app/hello/ada") as r:
            assert (r.status, await r.text()) == (200, "hello ada")
        async with s.get(f"{gw.url}/app/info?x=1") as r:
            info = await r.json()
        assert info["path"] == "/app/info" and info["root_path"] == "/app" and info["query"] == {"x": "1"}
        assert info["client"] == "127.0.0.1" and info["url"].startswith(f"http://127.0.0.1:{gw.port}/app/info")
        async with s.get(f"{gw.url}/app/sub/info") as r:
            assert (await r.json())["root_path"] == "/app/sub"
        async with s.post(f"{gw.url}/app/upload", data=io.BytesIO(b"z" * (3 * 1024 * 1024))) as r:
            assert (await r.json())["bytes"] == 3 * 1024 * 1024
        async with s.get(f"{gw.url}/app/numbers") as r:
            assert await r.text() == "0\n1\n2\n3\n4\n"
        async with s.get(f"{gw.url}/app/nothing") as r:
            assert r.status == 404


async def test_fastapi(start_gateway) -> None:
    gw = await start_gateway(asgi("f", "fastapi_app"))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/items/7?q=z", json={"name": "pen", "price": 1.5}) as r:
            assert (r.status, await r.json()) == (200, {"id": 7, "name": "pen", "price": 1.5, "q": "z"})
        async with s.post(f"{gw.url}/items/7", json={"name": "pen"}) as r:
            assert r.status == 422  # FastAPI's own validation answer, passed on
        async with s.get(f"{gw.url}/items/x") as r:
            assert r.status == 422
        async with s.get(f"{gw.url}/openapi.json") as r:
            assert (await r.json())["paths"]["/items/{item_id}"]


async def test_starlette_websocket(start_gateway) -> None:
    gw = await start_gateway(asgi("s", "starlette_app", websocket=True))
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(f"{gw.url}/ws", protocols=("echo",)) as ws:
            assert ws.protocol == "echo"
            await ws.send_str("hi")
            assert (await ws.receive(timeout=5)).data == "starlette:hi"
            route = gw.runtime.table.routes["s"]
            assert route.stats.tunnels == 1
        await wait_for(lambda: "ws_echo: closed" in SEEN["events"])
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await s.ws_connect(f"{gw.url}/refuse")
        assert refused.value.status == 403
    await wait_for(lambda: gw.runtime.table.routes["s"].stats.tunnels == 0)
