"""No client can take an upstream out of rotation (issue 17, item 3).

The attack: an application's usual redirect (nginx's ``return 301
https://$host$request_uri``) echoes the request's path into its Location line, so
``GET /old/`` + 8,160 x ``a`` makes a line over the 8,190 bytes gatewayd accepts
from an upstream: a 502 ``upstream_invalid``, which stays. It used to count
against the server, and three of them ejected an upstream's only server: every
route on it answered ``502 no_healthy_server`` for ``fail_timeout``. Now a
failure a request can cause (invalid, reset, timeout) does not count unless
``fail_on`` says so, and passive health never takes out the last server in
rotation. A server that really is down is still found out (connect failures
count) and, when others are left, still ejected.

Upstreams here are raw asyncio servers on 127.0.0.1 that answer as applications
do: a 301 built from the request's path, 200 otherwise, and, on the paths the
test names, a reset or no answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import pytest

from gatewayd.control.prometheus import SnapshotCollector

from ..builders import free_port, route_toml, upstream_toml
from ..conftest import Upstream, raw_request, status_of
from ..faults import OK_HEAD, OK_RESPONSE, RawUpstream, UpstreamRequest, reset

LONG = "/old/" + "a" * 8160  # with Host: example.com, a Location line of 8,197 bytes
HOST = "example.com"


pytestmark = pytest.mark.usefixtures("no_error_logged")


async def app_like(req: UpstreamRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   up: RawUpstream) -> bool:
    """An application server: ``/old/...`` redirects to https with the same target
    (nginx's ``return 301 https://$host$request_uri``), ``/crash`` kills the worker
    mid-request (a reset), ``/stuck`` never answers, anything else is 200."""
    target = req.request_line.split(" ")[1]
    if target.startswith("/crash"):
        reset(writer)
        return False
    if target.startswith("/stuck"):
        await asyncio.sleep(3600)
    if target.startswith("/old/"):
        host = req.header("host")[0].split(":")[0]
        body = b"<html><body>moved</body></html>\n"
        writer.write(b"HTTP/1.1 301 Moved Permanently\r\nServer: nginx\r\nContent-Type: text/html\r\n"
                     b"Content-Length: %d\r\nLocation: https://%s%s\r\n\r\n%s"
                     % (len(body), host.encode(), target.encode(), body))
    else:
        writer.write(OK_HEAD if req.request_line.startswith("HEAD ") else OK_RESPONSE)
    await writer.drain()
    return True


def config(urls: list[str], **keys: Any) -> str:
    """Upstream ``app`` over ``urls`` (with ``keys``), and two routes to it: ``app`` and ``other``."""
    return (upstream_toml("app", servers=urls, read_timeout=0.5, connect_timeout=1.0, **keys)
            + route_toml("app", "app") + route_toml("other", "app", path_prefix="/api/"))


async def get(gw, path: str) -> tuple[int, str | None]:
    resp = await raw_request(gw.port, f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
    reason = None
    for line in resp.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"x-gatewayd-reason:"):
            reason = line.split(b":", 1)[1].strip().decode()
    return status_of(resp), reason


async def servers_of(gw) -> list[dict[str, Any]]:
    snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
    return snap["upstreams"][0]["servers"]


@pytest.fixture
async def apps():
    ups = [await RawUpstream(app_like).start() for _ in range(2)]
    yield ups
    for u in ups:
        await u.stop()


# ----------------------------------------------------------------------------- the attack
@pytest.mark.parametrize("n_servers", [1, 2])
async def test_oversized_redirect_takes_no_server_out(start_gateway, apps, n_servers) -> None:
    """1. nine times the attack, well over max_fails = 3: each is answered 502
    upstream_invalid (the oversized response is still refused) 2. every route on the
    upstream still answers, and the 301 of a normal path passes 3. no server was
    ejected; the failures are on record."""
    gw = await start_gateway(config([u.url for u in apps[:n_servers]]))
    for _ in range(9):
        assert await get(gw, LONG) == (502, "upstream_invalid")
    assert await get(gw, "/") == (200, None)
    assert await get(gw, "/api/x") == (200, None)
    assert (await get(gw, "/old/page"))[0] == 301
    servers = await servers_of(gw)
    assert [s["state"] for s in servers] == ["up"] * n_servers
    assert sum(s["failures"] for s in servers) == 9
    assert all(s["ejections"] == 0 and s["ejections_refused"] == 0 for s in servers)
    assert {s["last_error"] for s in servers} == {"upstream_invalid"}
    snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
    assert snap["upstreams"][0]["no_healthy_server"] == 0


@pytest.mark.parametrize(("path", "status", "reason"), [
    ("/crash", 502, "upstream_reset"),
    ("/stuck", 504, "upstream_timeout"),
])
async def test_request_caused_failures_do_not_count_by_default(start_gateway, apps, path, status,
                                                              reason) -> None:
    """A request that crashes the application's worker (a reset) or that it never
    answers (a timeout) fails, but four of them eject neither of two servers; the
    reset is still retried once on the other server (GET, no body)."""
    gw = await start_gateway(config([u.url for u in apps], max_fails=2))
    for _ in range(4):
        assert await get(gw, path) == (status, reason)
    assert [s["state"] for s in await servers_of(gw)] == ["up", "up"]
    assert [await get(gw, "/") for _ in range(4)] == [(200, None)] * 4
    snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
    assert snap["upstreams"][0]["retried"] == (4 if reason == "upstream_reset" else 0)


async def test_fail_on_makes_invalid_responses_count_again(start_gateway, apps, caplog) -> None:
    """fail_on = ["connect", "invalid"], max_fails = 3, two servers: the attack ejects
    the first server to reach three; the other, now the last in rotation, is kept
    (logged once, counted, state "kept"), so the routes keep answering."""
    gw = await start_gateway(config([u.url for u in apps], fail_on=["connect", "invalid"]))
    for _ in range(8):
        assert await get(gw, LONG) == (502, "upstream_invalid")
    states = sorted(s["state"] for s in await servers_of(gw))
    assert states == ["ejected", "kept"]
    kept = next(s for s in await servers_of(gw) if s["state"] == "kept")
    assert kept["healthy"] and kept["ejections_refused"] == 1 and kept["consecutive_failures"] >= 3
    assert await get(gw, "/") == (200, None)
    assert await get(gw, "/api/x") == (200, None)
    assert [s["state"] for s in await servers_of(gw)].count("up") == 1  # the answer restored it
    said = [r for r in caplog.get_records("call") if "kept in rotation" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING


async def test_fail_on_invalid_never_ejects_the_only_server(start_gateway, apps) -> None:
    gw = await start_gateway(config([apps[0].url], fail_on=["invalid"], max_fails=1))
    for _ in range(5):
        assert await get(gw, LONG) == (502, "upstream_invalid")
    [s] = await servers_of(gw)
    assert (s["state"], s["ejections"], s["ejections_refused"]) == ("kept", 0, 1)
    assert await get(gw, "/") == (200, None)
    assert (await servers_of(gw))[0]["state"] == "up"


# ----------------------------------------------------------------------------- a server that is down
async def test_dead_only_server_is_reported_never_ejected(start_gateway, caplog) -> None:
    """The only server refuses connections: every request is answered at once with
    the real cause, 502 upstream_connect (not no_healthy_server), the failures are
    counted and it is shown "kept"; once it listens again, the next request is
    served, with no fail_timeout to wait out."""
    port = free_port()
    gw = await start_gateway(config([f"http://127.0.0.1:{port}"], fail_timeout=30))
    t0 = time.monotonic()
    assert [await get(gw, "/") for _ in range(8)] == [(502, "upstream_connect")] * 8
    assert time.monotonic() - t0 < 2.0
    [s] = await servers_of(gw)
    assert (s["state"], s["healthy"], s["failures"], s["ejections"], s["ejections_refused"]) == \
        ("kept", True, 8, 0, 1)
    assert s["last_error"] == "upstream_connect"
    said = [r for r in caplog.get_records("call") if "kept in rotation" in r.getMessage()]
    assert len(said) == 1

    back = Upstream()
    back.port, back.url = port, f"http://127.0.0.1:{port}"
    await back.start()
    try:
        assert await get(gw, "/") == (200, None)
        assert (await servers_of(gw))[0]["state"] == "up"
    finally:
        await back.stop()


async def test_dead_server_of_two_is_still_ejected(start_gateway, apps) -> None:
    """The feature still works: of two servers, the one that refuses connections is
    ejected after max_fails (its requests retried on the other, so no client sees
    it), and then gets no more attempts; the live one stays up."""
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await start_gateway(config([dead, apps[0].url], max_fails=2, fail_timeout=30))
    assert [await get(gw, "/") for _ in range(8)] == [(200, None)] * 8
    servers = await servers_of(gw)
    assert [s["state"] for s in servers] == ["ejected", "up"]
    assert servers[0]["failures"] == 2 and servers[0]["ejections"] == 1
    assert servers[0]["last_error"] == "upstream_connect"
    assert [await get(gw, "/") for _ in range(4)] == [(200, None)] * 4
    assert (await servers_of(gw))[0]["failures"] == 2


async def test_active_check_still_empties_an_upstream(start_gateway, apps) -> None:
    """Only passive health is bounded: a failing health check takes even the only
    server out (502 no_healthy_server)."""
    probe = {"path": "/stuck", "interval": 0.05, "timeout": 0.1, "healthy": 1, "unhealthy": 1}
    gw = await start_gateway(config([apps[0].url], health_check=probe))
    deadline = time.monotonic() + 5
    while (await servers_of(gw))[0]["state"] != "unhealthy":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert await get(gw, "/") == (502, "no_healthy_server")


async def test_operator_down_empties_an_upstream(start_gateway, apps) -> None:
    """server_state down takes out even the only server; up brings it back."""
    gw = await start_gateway(config([apps[0].url]))
    answer = await gw.command({"cmd": "server_state", "upstream": "app", "server": apps[0].url,
                               "state": "down"})
    assert answer["ok"]
    assert await get(gw, "/") == (502, "no_healthy_server")
    await gw.command({"cmd": "server_state", "upstream": "app", "server": apps[0].url, "state": "up"})
    assert await get(gw, "/") == (200, None)


async def test_metrics_show_a_kept_server_as_taking_requests(start_gateway) -> None:
    """The /metrics gauge says 1 for a kept server: it takes requests."""
    gw = await start_gateway(config([f"http://127.0.0.1:{free_port()}"], max_fails=1))
    assert await get(gw, "/") == (502, "upstream_connect")
    snap = (await gw.command({"cmd": "snapshot", "histograms": True}))["snapshot"]
    up = [s.value for f in SnapshotCollector(lambda: snap).collect()
          if f.name == "gatewayd_upstream_server_up" for s in f.samples]
    assert up == [1]


async def test_client_session_sees_no_no_healthy_server_under_attack(start_gateway, apps) -> None:
    """Legitimate keep-alive traffic while the attack repeats: not one request is
    answered no_healthy_server."""
    gw = await start_gateway(config([apps[0].url]))
    statuses: list[int] = []
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            for _ in range(3):
                assert (await get(gw, LONG))[0] == 502
            async with s.get(gw.url + "/") as r:
                await r.read()
                statuses.append(r.status)
    assert statuses == [200] * 10
