"""Rate limits per route (SPEC §10, ``rate_limit = {rate, burst, key}``): 429
``rate_limited`` with a Retry-After a client can trust, per key, refilled at the
configured rate, gateway-wide across workers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import aiohttp

from gatewayd.control.prometheus import SnapshotCollector
from gatewayd.control.snapshot import snapshot
from gatewayd.proxy.ratelimit import RateTable

from ..builders import app_route, toml
from ..conftest import wait_for

Reply = tuple[int, str | None, str | None]  # status, X-Gatewayd-Reason, Retry-After


def limited(url: str, rate: float, burst: int, key: str = "client", **route: object) -> str:
    return app_route(url, rate_limit={"rate": rate, "burst": burst, "key": key}, **route)


class Client:
    """Keep-alive requests from one loopback address (``127.0.0.N``)."""

    def __init__(self, base: str, address: str = "127.0.0.1", connections: int = 1) -> None:
        self.base = base
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            local_addr=(address, 0), limit=connections))

    async def get(self, path: str = "/", headers: dict[str, str] | None = None) -> Reply:
        async with self.session.get(self.base + path, headers=headers) as r:
            await r.read()
            return r.status, r.headers.get("X-Gatewayd-Reason"), r.headers.get("Retry-After")

    async def close(self) -> None:
        await self.session.close()


OK: Reply = (200, None, None)


async def test_burst_exactly_then_429_with_retry_after(start_gateway, upstream):
    """1. rate 0.2/s (one request every 5 s), burst 3 2. five requests at once
    3. exactly three reach the upstream; two are answered 429 rate_limited with
       Retry-After 5 4. counted in the snapshot's rejected, codes and the access log."""
    gw = await start_gateway(limited(upstream.url, 0.2, 3))
    c = Client(gw.url)
    try:
        replies = [await c.get() for _ in range(5)]
    finally:
        await c.close()
    assert replies[:3] == [OK] * 3
    assert replies[3:] == [(429, "rate_limited", "5")] * 2
    assert upstream.started == 3
    route = (await gw.command({"cmd": "snapshot"}))["snapshot"]["routes"][0]
    assert route["rejected"]["rate_limited"] == 2
    assert route["codes"]["429"] == 2 and route["requests"] == 5
    assert route["queued"] == 0 and route["in_flight"] == 0


async def test_refused_request_is_never_queued_and_has_no_body_read(start_gateway, upstream):
    """1. burst 1, the one slot busy with a slow request, the queue empty 2. a second
    request of the key (a POST with a body) is answered 429 at once: it took no queue
    place, and the upstream saw one request."""
    gw = await start_gateway(limited(upstream.url, 0.2, 1, max_concurrency=1, max_queue=10))
    c = Client(gw.url, connections=2)
    gate = gw.runtime.table.routes["app"].gate
    try:
        slow = asyncio.create_task(c.get("/slow?ms=800"))
        await wait_for(lambda: gate.in_flight == 1)
        t0 = time.monotonic()
        async with c.session.post(gw.url + "/echo", data=b"x" * 1000) as r:
            await r.read()
            assert (r.status, r.headers["X-Gatewayd-Reason"]) == (429, "rate_limited")
        assert time.monotonic() - t0 < 0.5 and not gate.waiters
        assert await slow == OK
    finally:
        await c.close()
    assert upstream.started == 1


async def test_after_retry_after_the_key_is_admitted(start_gateway, upstream):
    """1. rate 2/s, burst 1: a request is admitted 2. the next one, at once, gets 429
    with Retry-After 1 (0.5 s rounded up) 3. the client waits those seconds, as told
    4. admitted: Retry-After is never too short."""
    gw = await start_gateway(limited(upstream.url, 2.0, 1))
    c = Client(gw.url)
    try:
        assert await c.get() == OK
        status, reason, retry_after = await c.get()
        assert (status, reason, retry_after) == (429, "rate_limited", "1")
        await asyncio.sleep(int(retry_after))  # what the client was told to do
        assert await c.get() == OK
    finally:
        await c.close()
    assert upstream.started == 2


async def test_keys_are_per_client_address(start_gateway, upstream):
    """1. rate 0.2/s, burst 2 2. 127.0.0.2 sends three requests: two admitted, one 429
    3. 127.0.0.3 then sends two: both admitted; its allowance is its own."""
    gw = await start_gateway(limited(upstream.url, 0.2, 2))
    a, b = Client(gw.url, "127.0.0.2"), Client(gw.url, "127.0.0.3")
    try:
        assert [(await a.get())[0] for _ in range(3)] == [200, 200, 429]
        assert [(await b.get())[0] for _ in range(2)] == [200, 200]
        assert (await a.get())[0] == 429
    finally:
        await a.close()
        await b.close()


async def test_header_key_and_its_fallback_to_the_client_address(start_gateway, upstream):
    """key = "header:X-Api-Key", burst 1, rate 0.2/s:
    1. key "alpha" from 127.0.0.2: admitted, then 429 2. key "beta" from the same address:
    admitted (the header, not the address, is the key) 3. "alpha" from 127.0.0.3: 429
    4. no header from 127.0.0.2: counted under its address, admitted once, then 429; an
    empty header counts as none 5. a header whose value is an address shares nothing with
    that address's key."""
    gw = await start_gateway(limited(upstream.url, 0.2, 1, "header:X-Api-Key"))
    a, b = Client(gw.url, "127.0.0.2"), Client(gw.url, "127.0.0.3")
    try:
        assert (await a.get(headers={"X-Api-Key": "alpha"}))[0] == 200
        assert (await a.get(headers={"x-api-key": "alpha"}))[0] == 429
        assert (await a.get(headers={"X-Api-Key": "beta"}))[0] == 200
        assert (await b.get(headers={"X-Api-Key": "alpha"}))[0] == 429
        assert (await a.get())[0] == 200
        assert (await a.get())[0] == 429
        assert (await a.get(headers={"X-Api-Key": ""}))[0] == 429
        assert (await b.get(headers={"X-Api-Key": ""}))[0] == 200
        assert (await b.get(headers={"X-Api-Key": "127.0.0.3"}))[0] == 200
        assert (await b.get())[0] == 429
    finally:
        await a.close()
        await b.close()


async def test_routes_count_their_own_keys(start_gateway, upstream):
    """The same client on two rate-limited routes has a key on each."""
    body = limited(upstream.url, 0.2, 1) + (
        f'[[routes]]\nname = "other"\nupstream = "app"\npath_prefix = "/other"\n'
        f'rate_limit = {toml({"rate": 0.2, "burst": 1})}\n')
    gw = await start_gateway(body)
    c = Client(gw.url)
    try:
        assert [(await c.get())[0] for _ in range(2)] == [200, 429]
        assert [(await c.get("/other"))[0] for _ in range(2)] == [200, 429]
    finally:
        await c.close()


async def test_clients_command_names_the_rate_limited_clients(start_gateway, upstream):
    """1. rate 0.2/s, burst 1 2. 127.0.0.8 sends four requests (three refused), 127.0.0.9
    two (one refused) 3. the clients command ranks 127.0.0.8 first with 3 rate_limited."""
    gw = await start_gateway(limited(upstream.url, 0.2, 1))
    a, b = Client(gw.url, "127.0.0.8"), Client(gw.url, "127.0.0.9")
    try:
        assert [(await a.get())[0] for _ in range(4)] == [200, 429, 429, 429]
        assert [(await b.get())[0] for _ in range(2)] == [200, 429]
    finally:
        await a.close()
        await b.close()
    answer = await gw.command({"cmd": "clients", "route": "app"})
    assert answer["clients"] == [
        {"client": "127.0.0.8", "queued": 0, "rate_limited": 3, "client_queue_full": 0},
        {"client": "127.0.0.9", "queued": 0, "rate_limited": 1, "client_queue_full": 0}]


async def test_reload_changes_the_rate_at_once(start_gateway, upstream):
    """1. rate 0.2/s, burst 1: admitted, then 429 with Retry-After 5 2. a reload raises
    the rate to 100/s: the key's next request is admitted at once (it owes at most one
    new burst) 3. a reload lowers it to 0.2/s again: a new key is admitted once, then refused
    with Retry-After 5; the old key too gets at most one more (none if it sent within the
    last 1/100 s) 4. a reload removes rate_limit: no limit."""
    gw = await start_gateway(limited(upstream.url, 0.2, 1))
    c, fresh = Client(gw.url), Client(gw.url, "127.0.0.5")

    async def reload(body: str) -> None:
        text = gw.config_path.read_text()
        gw.config_path.write_text(text[:text.index("[upstreams.app]")] + body)
        assert (await gw.command({"cmd": "reload"}))["ok"]

    try:
        assert [await c.get() for _ in range(2)] == [OK, (429, "rate_limited", "5")]
        await reload(limited(upstream.url, 100.0, 1))
        assert await c.get() == OK
        await reload(limited(upstream.url, 0.2, 1))
        assert [await fresh.get() for _ in range(2)] == [OK, (429, "rate_limited", "5")]
        assert (await c.get())[0] in (200, 429)
        assert (await c.get())[0] == 429
        await reload(app_route(upstream.url))
        assert [(await c.get())[0] for _ in range(5)] == [200] * 5
    finally:
        await c.close()
        await fresh.close()


async def test_access_log_and_metrics_name_rate_limited(start_gateway, upstream, tmp_path):
    """A 429 is logged with its reason and client, and counted in
    gatewayd_rejected_total{reason="rate_limited"}."""
    log = tmp_path / "access.json"
    gw = await start_gateway(limited(upstream.url, 0.2, 1))
    text = gw.config_path.read_text()
    gw.config_path.write_text(text.replace('access_log = "off"', f'access_log = "{log}"\naccess_format = "json"'))
    assert (await gw.command({"cmd": "reload"}))["ok"]
    c = Client(gw.url, "127.0.0.4")
    try:
        assert [(await c.get())[0] for _ in range(2)] == [200, 429]
    finally:
        await c.close()
    gw.runtime.access_log.flush()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(x["status"], x["reason"], x["client"]) for x in lines] == [
        (200, None, "127.0.0.4"), (429, "rate_limited", "127.0.0.4")]
    families = {f.name: f for f in SnapshotCollector(lambda: snapshot(gw.runtime)).collect()}
    rejected = {x.labels["reason"]: x.value for x in families["gatewayd_rejected"].samples
                if x.name == "gatewayd_rejected_total"}
    assert rejected == {"queue_full": 0, "queue_timeout": 0, "client_queue_full": 0, "rate_limited": 1,
                        "tunnels_full": 0, "deadline": 0, "preempted": 0, "route_timeout": 0}


async def test_two_workers_share_one_allowance(gateway_process, upstream):
    """1. workers = 2, rate 100/s, burst 10 2. one client (127.0.0.2) sends as fast as it
    can for 3 s over 16 keep-alive connections, which the kernel spreads over both workers
    3. the requests that reached the upstream are burst + rate x elapsed, within 10 %:
    one allowance for the gateway, not one per worker."""
    gp = gateway_process(limited(upstream.url, 100.0, 10), workers=2)
    port = int(gp.config_path.read_text().split("127.0.0.1:")[1].split('"')[0])

    def snapshot_of() -> dict:
        return gp.command({"cmd": "snapshot"})["snapshot"]

    await wait_for(lambda: len([w for w in snapshot_of()["workers"] if w["pid"]]) == 2, timeout=20)
    c = Client(f"http://127.0.0.1:{port}", "127.0.0.2", connections=16)
    statuses: dict[int, int] = {}
    t0 = time.monotonic()

    async def closed_loop() -> None:
        while time.monotonic() - t0 < 3.0:
            status = (await c.get())[0]
            statuses[status] = statuses.get(status, 0) + 1

    try:
        await asyncio.gather(*(closed_loop() for _ in range(16)))
    finally:
        await c.close()
    elapsed = time.monotonic() - t0
    expected = 10 + 100 * elapsed
    admitted = upstream.started
    assert statuses.get(200) == admitted and set(statuses) == {200, 429}, statuses
    assert abs(admitted - expected) <= 0.1 * expected, (admitted, expected, statuses)
    total = sum(statuses.values())
    assert total > 3 * expected  # the client always wanted more than its allowance

    def counted() -> list[int] | None:
        workers = [w["requests"] for w in snapshot_of()["workers"]]
        return workers if sum(workers) == total else None

    per_worker = await wait_for(counted, timeout=5)
    assert min(per_worker) > total / 10, per_worker  # the key's requests came through both


_HAMMER = """
import sys, time
from gatewayd.config.ratelimit import RateLimit
from gatewayd.proxy.ratelimit import Limiter, RateTable
fd, rate, burst, start, end = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
limiter = Limiter("app", RateLimit(rate, burst), RateTable.attach(fd))
class Request:  # what a limiter reads of a request
    headers = {}
    client = "127.0.0.2"
request = Request()
n = 0
while time.monotonic() < start:
    pass
while time.monotonic() < end:
    n += limiter.check(request) == 0
print(n)
"""


def test_two_processes_on_one_key_never_both_admit_on_one_time():
    """The worst case for two workers: two processes that do nothing but check one key
    of one shared table, each ~10^5 checks a second, for 2 s at 1000/s (burst 200, so a
    process descheduled for a moment loses nothing). Together they admit burst + rate x
    2 s, within 1 %: without the lock on the admitting path, both processes read the same
    time and both admit, some 12 % more."""
    table = RateTable.shared()
    assert table.fd is not None
    start = time.monotonic() + 1.0  # (one clock for every process of the host)
    argv = [str(table.fd), "1000", "200", str(start), str(start + 2.0)]
    env = {**os.environ, "PYTHONHASHSEED": str(table.seed)}
    procs = [subprocess.Popen([sys.executable, "-c", _HAMMER, *argv], pass_fds=(table.fd,), env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    admitted = sum(int(p.communicate(timeout=30)[0]) for p in procs)
    assert all(p.returncode == 0 for p in procs)
    expected = 200 + 1000 * 2.0
    assert abs(admitted - expected) <= 0.01 * expected, (admitted, expected)


async def test_behind_a_trusted_proxy_the_key_is_the_forwarded_client(start_gateway, upstream):
    """trusted_proxies = ["127.0.0.2"], rate 0.2/s, burst 1: 1. through the proxy, clients
    10.0.0.1 and 10.0.0.2 (X-Forwarded-For) each get their own allowance 2. 10.0.0.1 again:
    429 3. the proxy's own requests (no X-Forwarded-For) are its own key."""
    gw = await start_gateway(limited(upstream.url, 0.2, 1), trusted_proxies=["127.0.0.2"])
    proxy = Client(gw.url, "127.0.0.2")
    try:
        assert (await proxy.get(headers={"X-Forwarded-For": "10.0.0.1"}))[0] == 200
        assert (await proxy.get(headers={"X-Forwarded-For": "10.0.0.2"}))[0] == 200
        assert (await proxy.get(headers={"X-Forwarded-For": "10.0.0.1"}))[0] == 429
        assert [(await proxy.get())[0] for _ in range(2)] == [200, 429]
    finally:
        await proxy.close()
