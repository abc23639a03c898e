"""Upstream pools (issue 10): several servers, balancing, passive and active
health, retries, DNS names, per-server state in the snapshot, /metrics and the
control socket. Every upstream here is a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gatewayd.config.kinds import Server
from gatewayd.control.prometheus import SnapshotCollector
from gatewayd.http.client import H1Pool
from gatewayd.upstreams.balance import Balancer
from gatewayd.upstreams.names import UnresolvableServer
from gatewayd.upstreams.servers import ServerState

from ..builders import free_port, route_toml, upstream_toml
from ..conftest import Upstream, wait_for


def pool(servers: list[tuple[str, int]], **keys: Any) -> str:
    """A config body: upstream "app" over ``servers`` (url, weight), route "app" to it."""
    items = [{"url": url, "weight": w} for url, w in servers]
    return (upstream_toml("app", servers=items, connect_timeout=0.5, read_timeout=2.0, **keys)
            + route_toml("app", "app", max_concurrency=200))


async def started(n: int, cls: type[Upstream] = Upstream) -> list[Upstream]:
    ups = [cls() for _ in range(n)]
    for u in ups:
        await u.start()
    return ups


@pytest.fixture
async def three():
    ups = await started(3)
    yield ups
    for u in ups:
        await u.stop()


async def servers_of(gw) -> list[dict[str, Any]]:
    snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
    return snap["upstreams"][0]["servers"]


async def until_state(gw, index: int, state: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = (await servers_of(gw))[index]
        if s["state"] == state:
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"server {index} is {s['state']}, not {state}: {s}")
        await asyncio.sleep(0.02)


async def get_many(url: str, n: int, path: str = "/x") -> list[tuple[int, str | None]]:
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(url + path) as r:
                await r.read()
                out.append((r.status, r.headers.get("X-Gatewayd-Reason")))
    return out


# ----------------------------------------------------------------------------- balancing
def states(*weights: int) -> list[ServerState]:
    return [ServerState("t", Server(f"http://10.0.0.{i}:80", f"10.0.0.{i}", 80, w))
            for i, w in enumerate(weights)]


def test_round_robin_is_smooth_and_weighted():
    """Weights 5, 1, 1 give nginx's smooth sequence a a b a c a a, repeated."""
    s = states(5, 1, 1)
    b = Balancer("round_robin", s, 10.0, time.monotonic)
    picks = "".join("abc"[s.index(b.pick(()))] for _ in range(14))
    assert picks == "aabacaa" * 2


@pytest.mark.parametrize("algorithm", ["round_robin", "least_in_flight", "random_two"])
def test_every_algorithm_respects_weights_when_idle(algorithm):
    random.seed(10)
    s = states(1, 2, 3)
    b = Balancer(algorithm, s, 10.0, time.monotonic)
    counts = collections.Counter(s.index(b.pick(())) for _ in range(60000))
    for i, w in enumerate((1, 2, 3)):
        assert abs(counts[i] - 10000 * w) < 0.03 * 10000 * w, counts


@pytest.mark.parametrize("algorithm", ["least_in_flight", "random_two"])
def test_in_flight_algorithms_avoid_the_busy_server(algorithm):
    """With requests held open, the in-flight algorithms keep the load even per weight."""
    random.seed(11)
    s = states(1, 1, 2)
    b = Balancer(algorithm, s, 10.0, time.monotonic)
    for _ in range(400):
        b.pick(()).in_flight += 1
    loads = [x.in_flight for x in s]
    if algorithm == "least_in_flight":
        assert loads == [100, 100, 200]
    else:  # two choices: close, not exact
        assert all(abs(load - want) <= 0.1 * want for load, want in zip(loads, (100, 100, 200), strict=True)), loads


@pytest.mark.parametrize("algorithm", ["round_robin", "least_in_flight", "random_two"])
async def test_distribution_through_the_gateway(start_gateway, three, algorithm):
    """600 requests over servers of weight 1, 2 and 3 arrive in proportion (idle pool)."""
    random.seed(12)
    gw = await start_gateway(pool([(u.url, w) for u, w in zip(three, (1, 2, 3), strict=True)],
                                  balance=algorithm))
    statuses = await get_many(gw.url, 600)
    assert statuses == [(200, None)] * 600
    tolerance = 0.03 if algorithm != "random_two" else 0.25
    for u, w in zip(three, (1, 2, 3), strict=True):
        assert abs(u.started - 100 * w) <= tolerance * 100 * w, [x.started for x in three]
    servers = await servers_of(gw)
    assert [s["requests"] for s in servers] == [u.started for u in three]
    assert (await gw.command({"cmd": "snapshot"}))["snapshot"]["upstreams"][0]["balance"] == algorithm


async def test_least_in_flight_spreads_concurrent_requests(start_gateway, three):
    """30 slow requests at once over three equal servers: ten each."""
    gw = await start_gateway(pool([(u.url, 1) for u in three], balance="least_in_flight"))
    async with aiohttp.ClientSession() as s:

        async def one() -> int:
            async with s.get(gw.url + "/slow?ms=400") as r:
                await r.read()
                return r.status

        assert await asyncio.gather(*(one() for _ in range(30))) == [200] * 30
    assert all(8 <= u.started <= 12 for u in three), [u.started for u in three]


# ----------------------------------------------------------------------------- passive health
async def test_killed_server_is_ejected_then_comes_back(start_gateway, three):
    """1. four clients send GETs in a loop over three servers 2. server 1 is killed:
    it is ejected, and no client sees a failure (its failed attempts are retried on
    the others) 3. it is restarted on the same port: after fail_timeout one trial
    request restores it and it takes its share again 4. not one request failed."""
    gw = await start_gateway(pool([(u.url, 1) for u in three], max_fails=2, fail_timeout=1.0))
    failures: list[tuple[int, str | None]] = []
    ok = 0
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal ok
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                async with s.get(gw.url + "/x") as r:
                    await r.read()
                    if r.status == 200:
                        ok += 1
                    else:
                        failures.append((r.status, r.headers.get("X-Gatewayd-Reason")))

    clients = [asyncio.create_task(client()) for _ in range(4)]
    try:
        await wait_for(lambda: all(u.started >= 20 for u in three))
        killed = three[1]
        await killed.stop()
        s = await until_state(gw, 1, "ejected")
        assert not s["healthy"] and s["ejected_until"] > time.time()
        assert s["failures"] >= 2 and s["last_error"] in ("upstream_connect", "upstream_reset")
        served = three[0].started + three[2].started
        await wait_for(lambda: three[0].started + three[2].started > served + 100)

        back = Upstream()
        back.port, back.url = killed.port, killed.url
        await back.start()
        try:
            await wait_for(lambda: back.started >= 20, timeout=5)
            s = await until_state(gw, 1, "up")
            assert s["healthy"] and s["ejected_until"] is None and s["consecutive_failures"] == 0
        finally:
            stop.set()
            await asyncio.gather(*clients)
            await back.stop()
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
    assert failures == [] and ok > 200
    snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
    assert snap["routes"][0]["upstream_errors"] == 0
    assert snap["upstreams"][0]["retried"] >= 2


async def test_all_servers_dead_keeps_the_last_in_rotation(start_gateway):
    """1. both servers refuse connections: the first request fails on both (retried
    once, in vain); the first is ejected, the second, the last in rotation, is kept
    2. then every request fails fast with the real reason, 502 upstream_connect, never
    no_healthy_server 3. the kept server set down by hand: the ejected one is taken
    back at once 4. both set down by hand: 502 no_healthy_server at once, counted
    among the route's upstream errors (only the operator or the active check empty
    an upstream)."""
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    gw = await start_gateway(pool([(u, 1) for u in dead], max_fails=1, fail_timeout=30.0))
    first = await get_many(gw.url, 1)
    assert first == [(502, "upstream_connect")]
    await until_state(gw, 0, "ejected")
    kept = await until_state(gw, 1, "kept")
    assert kept["healthy"] and kept["ejections"] == 0 and kept["ejections_refused"] == 1
    t0 = time.monotonic()
    rest = await get_many(gw.url, 5)
    assert rest == [(502, "upstream_connect")] * 5
    assert time.monotonic() - t0 < 0.5
    assert (await servers_of(gw))[1]["ejections_refused"] == 1  # one refusal per run of failures

    await gw.command({"cmd": "server_state", "upstream": "app", "server": dead[1], "state": "down"})
    assert await get_many(gw.url, 1) == [(502, "upstream_connect")]
    s = await until_state(gw, 0, "kept")
    assert s["ejected_until"] is None and s["ejections_refused"] == 1

    await gw.command({"cmd": "server_state", "upstream": "app", "server": dead[0], "state": "down"})
    t0 = time.monotonic()
    assert await get_many(gw.url, 5) == [(502, "no_healthy_server")] * 5
    assert time.monotonic() - t0 < 0.5
    snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
    assert snap["routes"][0]["upstream_error_reasons"]["no_healthy_server"] == 5
    assert snap["upstreams"][0]["no_healthy_server"] == 5


async def test_5xx_counts_as_failure_when_asked(start_gateway, three):
    """fail_on_5xx: two 500s in a row eject a server, yet every 500 reaches the client;
    the other, the last in rotation, is kept and goes on answering."""
    a, b = three[0], three[1]
    gw = await start_gateway(pool([(a.url, 1), (b.url, 1)], max_fails=2, fail_on_5xx=True))
    assert [s for s, _ in await get_many(gw.url, 4, "/status/500")] == [500] * 4
    s = await until_state(gw, 0, "ejected")
    assert s["last_error"] == "status_500"
    assert (await until_state(gw, 1, "kept"))["last_error"] == "status_500"
    served = b.started
    assert (await get_many(gw.url, 2, "/status/500")) == [(500, None)] * 2
    assert b.started == served + 2 and a.started == 2
    assert (await get_many(gw.url, 1)) == [(200, None)]
    assert (await servers_of(gw))[1]["state"] == "up"


async def test_5xx_is_no_failure_by_default(start_gateway, upstream):
    gw = await start_gateway(pool([(upstream.url, 1)], max_fails=1))
    assert [s for s, _ in await get_many(gw.url, 3, "/status/503")] == [503] * 3
    assert (await servers_of(gw))[0]["state"] == "up"


# ----------------------------------------------------------------------------- active health
class Checked(Upstream):
    """An upstream whose /health answers 200 or 503 as the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.health = 200
        self.probes = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/health":
            self.probes += 1
            return web.Response(status=self.health, text="health\n")
        return await super().handle(request)


async def test_active_check_marks_a_server_down_and_up(start_gateway):
    """1. /health of server 0 starts answering 503: after two probes it is unhealthy and
    gets no requests 2. it answers 200 again: after two probes it is up and serves."""
    ups = await started(2, Checked)
    try:
        check = {"path": "/health", "interval": 0.05, "timeout": 1, "healthy": 2, "unhealthy": 2}
        gw = await start_gateway(pool([(u.url, 1) for u in ups], health_check=check))
        await wait_for(lambda: all(u.probes >= 2 for u in ups))
        assert [s["state"] for s in await servers_of(gw)] == ["up", "up"]

        ups[0].health = 503
        s = await until_state(gw, 0, "unhealthy")
        assert s["last_check"] == "status 503" and not s["healthy"]
        before = ups[0].started
        assert await get_many(gw.url, 10) == [(200, None)] * 10
        assert ups[0].started == before

        ups[0].health = 200
        s = await until_state(gw, 0, "up")
        assert s["last_check"] == "ok"
        await get_many(gw.url, 10)
        assert ups[0].started >= before + 4
    finally:
        for u in ups:
            await u.stop()


# ----------------------------------------------------------------------------- retries
class Resetter:
    """A raw server that reads one request head and body, then resets the connection."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length) if length else b""
        self.requests.append(head.split(b" ")[0] + b" " + body)
        writer.transport.abort()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_reset_retries_gets_but_never_duplicates_a_post(start_gateway, upstream):
    """Server 0 resets every connection after reading the request.
    1. GETs that land on it are retried on server 1: every GET succeeds
    2. a POST that lands on it fails with 502 upstream_reset: each POST reached
       exactly one server, once."""
    bad = Resetter()
    await bad.start()
    try:
        gw = await start_gateway(pool([(bad.url, 1), (upstream.url, 1)], max_fails=0, retries=3))
        assert await get_many(gw.url, 6) == [(200, None)] * 6
        assert len(bad.requests) >= 3  # round robin sent half of them there first
        bad.requests.clear()
        upstream.requests.clear()
        statuses = []
        async with aiohttp.ClientSession() as s:
            for i in range(6):
                async with s.post(gw.url + "/echo", data=f"order-{i}".encode()) as r:
                    await r.read()
                    statuses.append((r.status, r.headers.get("X-Gatewayd-Reason")))
        posts = [r for r in bad.requests if r.startswith(b"POST")]
        posts += [b"POST " + r["body"] for r in upstream.requests if r["method"] == "POST"]
        assert sorted(posts) == sorted(f"POST order-{i}".encode() for i in range(6))  # each once
        assert statuses.count((502, "upstream_reset")) == len(bad.requests) >= 1
        assert statuses.count((200, None)) == len(upstream.requests)
    finally:
        await bad.stop()


async def test_connect_failure_retries_even_a_post_body_intact(start_gateway, upstream):
    """A server that refuses connections was never sent a byte: the POST, body
    unread until then, goes to the other server, once; one admission slot serves both
    attempts (max_concurrency = 1, no queue)."""
    dead = f"http://127.0.0.1:{free_port()}"
    body = pool([(dead, 1), (upstream.url, 1)], max_fails=0).replace(
        "max_concurrency = 200", "max_concurrency = 1\nmax_queue = 0")
    gw = await start_gateway(body)
    async with aiohttp.ClientSession() as s:
        for i in range(4):
            async with s.post(gw.url + "/echo", data=b"x" * 100_000 + bytes([i])) as r:
                assert r.status == 200
                got = await r.json()
                assert got["method"] == "POST" and len(got["body"]) == 100_001
    assert len(upstream.requests) == 4
    route = gw.runtime.table.routes["app"]
    assert route.gate.in_flight == 0
    servers = await servers_of(gw)
    assert servers[0]["failures"] == 2 and servers[0]["last_error"] == "upstream_connect"


async def test_no_retry_when_retries_is_zero(start_gateway, upstream):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await start_gateway(pool([(dead, 1), (upstream.url, 1)], retries=0, max_fails=0))
    assert sorted(await get_many(gw.url, 2)) == [(200, None), (502, "upstream_connect")]


# ----------------------------------------------------------------------------- DNS
async def test_server_names_resolve(start_gateway, upstream):
    gw = await start_gateway(pool([(f"http://localhost:{upstream.port}", 1)], dns_ttl=0.5))
    assert await get_many(gw.url, 3) == [(200, None)] * 3
    assert (await servers_of(gw))[0]["url"] == f"http://localhost:{upstream.port}"


async def test_unresolvable_name_fails_start_and_reload(start_gateway, upstream, tmp_path):
    """A host name with no address stops the start (file, line, key, name); a reload
    to such a file is refused and the running configuration stays."""
    body = pool([(upstream.url, 1), ("http://nohost.invalid:8080", 1)])
    with pytest.raises(UnresolvableServer) as info:
        await start_gateway(body)
    path = tmp_path / "gatewayd.toml"
    text = path.read_text()
    line = text.splitlines().index(next(x for x in text.splitlines() if x.startswith("servers"))) + 1
    assert info.value.located(str(path)).startswith(
        f'{path}:{line}: upstreams.app.servers[1]: cannot resolve "nohost.invalid" (')

    gw = await start_gateway(pool([(upstream.url, 1)]))
    path.write_text(path.read_text().replace('weight = 1}]', 'weight = 1}, "http://nohost.invalid:1"]'))
    answer = await gw.command({"cmd": "reload"})
    assert not answer["ok"] and 'upstreams.app.servers[1]: cannot resolve "nohost.invalid"' in answer["error"]
    assert await get_many(gw.url, 1) == [(200, None)]


async def test_runtime_resolution_failure_is_a_counted_error(start_gateway, upstream):
    """A name that stops resolving (here: server 1's host swapped for one with no
    address, as a DNS change would do) fails that server's attempts with
    upstream_dns: counted for the server and, when no retry saves it, for the route."""
    gw = await start_gateway(pool([(upstream.url, 1), (f"http://localhost:{upstream.port}", 1)],
                                  max_fails=0, retries=0))
    gw.runtime.table.upstreams["app"].servers[1].session = H1Pool("nohost.invalid", 8080)
    assert sorted(await get_many(gw.url, 4)) == [(200, None)] * 2 + [(502, "upstream_dns")] * 2
    server = (await servers_of(gw))[1]
    assert server["failures"] == 2 and server["last_error"] == "upstream_dns"
    snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
    assert snap["routes"][0]["upstream_error_reasons"] == {"upstream_dns": 2}


def test_unresolvable_name_exits_1_with_the_line(gateway_process, tmp_path):
    gp = gateway_process(pool([("http://nohost.invalid:8080", 1)]), wait_ready=False)
    assert gp.wait() == 1
    line = gp.config_path.read_text().splitlines().index(
        'servers = [{url = "http://nohost.invalid:8080", weight = 1}]') + 1
    assert f'{gp.config_path}:{line}: upstreams.app.servers[0]: cannot resolve "nohost.invalid"' in gp.stderr()


# ----------------------------------------------------------------------------- by hand, reload, metrics
async def test_server_state_by_hand(start_gateway, three):
    """1. server 1 set down: no requests reach it, snapshot and /metrics say so 2. set
    up: it serves again 3. bad names get errors."""
    gw = await start_gateway(pool([(u.url, 1) for u in three]))
    answer = await gw.command({"cmd": "server_state", "upstream": "app", "server": three[1].url,
                               "state": "down"})
    assert answer == {"ok": True, "upstream": "app", "servers": [three[1].url], "state": "down"}
    await get_many(gw.url, 9)
    assert three[1].started == 0
    snap = (await gw.command({"cmd": "snapshot", "histograms": True}))["snapshot"]
    assert snap["upstreams"][0]["servers"][1]["state"] == "down"
    up = {tuple(s.labels.values()): s.value for f in SnapshotCollector(lambda: snap).collect()
          if f.name == "gatewayd_upstream_server_up" for s in f.samples}
    assert up == {("app", three[0].url): 1, ("app", three[1].url): 0, ("app", three[2].url): 1}

    host_port = three[1].url.removeprefix("http://")
    assert (await gw.command({"cmd": "server_state", "upstream": "app", "server": host_port,
                              "state": "ready"}))["ok"]
    await get_many(gw.url, 9)
    assert three[1].started == 3

    for cmd, error in (
        ({"upstream": "nope", "server": three[0].url, "state": "down"}, "no upstream 'nope'"),
        ({"upstream": "app", "server": "http://x:1", "state": "down"}, "has no server"),
        ({"upstream": "app", "server": three[0].url, "state": "sideways"}, "state: expected"),
    ):
        answer = await gw.command({"cmd": "server_state", **cmd})
        assert not answer["ok"] and error in answer["error"], answer


async def test_hand_set_state_lasts_until_the_upstream_changes(start_gateway, three):
    """1. server 0 set down 2. a reload that adds a route keeps the upstream, and the
    state 3. a reload that changes the upstream builds it afresh: up again."""
    gw = await start_gateway(pool([(u.url, 1) for u in three]))
    await gw.command({"cmd": "server_state", "upstream": "app", "server": three[0].url, "state": "down"})
    text = gw.config_path.read_text()
    gw.config_path.write_text(text + route_toml("other", "app", path_prefix="/other"))
    assert (await gw.command({"cmd": "reload"}))["ok"]
    assert (await servers_of(gw))[0]["state"] == "down"  # the upstream did not change
    gw.config_path.write_text(text.replace("read_timeout = 2.0", "read_timeout = 3.0"))
    assert (await gw.command({"cmd": "reload"}))["ok"]
    assert (await servers_of(gw))[0]["state"] == "up"  # a changed upstream starts afresh


async def test_server_state_reaches_every_worker(gateway_process, three):
    """workers = 2: 1. a server set down by hand is down in both workers (the merged
    snapshot counts it in each) and no new connection, whichever worker takes it,
    reaches it 2. a worker killed is replaced, and its replacement has it down too."""
    gp = gateway_process(pool([(u.url, 1) for u in three]), workers=2)
    port = int(gp.config_path.read_text().split("127.0.0.1:")[1].split('"')[0])

    def snap() -> dict:
        return gp.command({"cmd": "snapshot"})["snapshot"]

    deadline = time.monotonic() + 15
    while len(snap()["workers"]) < 2 or not snap()["upstreams"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    answer = gp.command({"cmd": "server_state", "upstream": "app", "server": three[2].url, "state": "down"})
    assert answer["ok"], answer
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(40):
            async with s.get(f"http://127.0.0.1:{port}/x") as r:
                assert r.status == 200
    assert three[2].started == 0 and three[0].started + three[1].started == 40
    deadline = time.monotonic() + 5
    while True:
        server = snap()["upstreams"][0]["servers"][2]
        if server["workers"] == 2 and server["healthy_workers"] == 0:  # both exports fresh
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert server["state"] == "down" and server["healthy_workers"] == 0 and not server["healthy"]

    pids = {w["pid"] for w in snap()["workers"]}
    os.kill(min(pids), signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        workers = snap()["workers"]
        if len(workers) == 2 and {w["pid"] for w in workers} != pids:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + 5
    while snap()["upstreams"][0]["servers"][2]["healthy_workers"] != 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for _ in range(40):
            async with s.get(f"http://127.0.0.1:{port}/x") as r:
                assert r.status == 200
    assert three[2].started == 0


# ----------------------------------------------------------------------------- passive health rules
def test_passive_health_rules_by_the_clock():
    """ServerState on its own: 1. a failure fail_on does not count is recorded but
    taken as an answer (it ends a trial, restoring the server) 2. a failed trial when
    the other server is out keeps the server in rotation instead of ejecting it."""
    a, b = states(1, 1)
    for s in (a, b):
        s.peers = (a, b)
    a.failed("upstream_connect", 100.0, 1, 10.0)
    assert a.state(100.0) == "ejected" and a.ejections == 1
    a.begin_trial(111.0, 10.0)
    a.failed("upstream_invalid", 111.0, 1, 10.0, counts=False)
    assert a.state(111.0) == "up" and a.failures == 2 and a.last_error == "upstream_invalid"

    a.failed("upstream_connect", 120.0, 1, 10.0)
    assert a.state(120.0) == "ejected"
    b.failed("upstream_connect", 121.0, 1, 10.0)  # a is out: b is the last
    assert b.state(121.0) == "kept" and b.ejections == 0 and b.ejections_refused == 1
    a.begin_trial(131.0, 10.0)
    b.set_admin(False)
    a.failed("upstream_connect", 131.0, 1, 10.0)  # its trial failed, but b is down
    assert a.state(131.0) == "kept" and a.blocked_until == 0.0 and a.ejections == 2
