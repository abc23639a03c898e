"""Fairness between clients on one route (SPEC §10): ``queue_order = "fair"``
(round-robin across the client addresses that wait, FIFO within one),
``max_queue_per_client`` (429 client_queue_full), the queue X-ray's ``client``,
and a reload that changes the order under waiters. Clients come from many
loopback addresses (127.0.0.N)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gatewayd.control.prometheus import SnapshotCollector
from gatewayd.control.snapshot import snapshot

from ..builders import app_route
from ..conftest import status_of, wait_for


def client(n: int) -> str:
    return f"127.0.0.{n}"


async def from_client(port: int, n: int, target: str, timeout: float = 10.0, headers: str = "") -> bytes:
    """``GET target`` (Connection: close) from 127.0.0.``n``; the bytes received."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(client(n), 0))
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read()
    finally:
        writer.close()


def arrival_tags(upstream: Any) -> list[str]:
    """The ``t`` query value of each request the upstream received, in order."""
    return [r["target"].rsplit("t=", 1)[1] for r in upstream.requests]


async def flood_then_others(gw: Any, upstream: Any, greedy: int, others: range) -> list[asyncio.Task[bytes]]:
    """The only slot is held (client 1, 1.5 s); client 2 queues ``greedy`` requests one
    after another, then each client in ``others`` queues one. Returns every task (holder
    first); the queue holds them all when it returns."""
    gate = gw.runtime.table.routes["app"].gate
    tasks = [asyncio.create_task(from_client(gw.port, 1, "/slow?ms=1500&t=hold"))]
    await wait_for(lambda: upstream.active == 1)
    for i in range(greedy):
        tasks.append(asyncio.create_task(from_client(gw.port, 2, f"/slow?ms=10&t=a{i}")))
        await wait_for(lambda i=i: gate.queued == i + 1)
    for n in others:
        tasks.append(asyncio.create_task(from_client(gw.port, n, f"/slow?ms=10&t=c{n}")))
        await wait_for(lambda n=n: gate.queued == greedy + n - others.start + 1)
    return tasks


async def test_fair_order_admits_every_other_client_within_a_round(start_gateway, upstream):
    """1. queue_order = "fair", one slot, held 2. client 2 queues 30 requests, then
    clients 3..7 one each 3. the X-ray lists them in the order they will be admitted:
    one of client 2's, then each other client's, then client 2's others, each waiter
    with its client 4. the upstream receives exactly that: clients 3..7 within the
    next 6 slots, client 2's in the order it sent them (FIFO within a client)."""
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1, max_queue=100,
                                       queue_timeout=20, queue_order="fair"))
    tasks = await flood_then_others(gw, upstream, 30, range(3, 8))
    xray = await gw.command({"cmd": "queue", "route": "app"})
    expected = ["a0", "c3", "c4", "c5", "c6", "c7"] + [f"a{i}" for i in range(1, 30)]
    assert [w["path"].rsplit("t=", 1)[1] for w in xray["waiters"]] == expected
    assert [w["client"] for w in xray["waiters"][:6]] == [client(n) for n in (2, 3, 4, 5, 6, 7)]
    assert {w["client"] for w in xray["waiters"][6:]} == {client(2)}
    route = snapshot(gw.runtime)["routes"][0]
    assert [w["client"] for w in route["waiters"]] == [client(n) for n in (2, 3, 4, 5, 6)]
    answers = await asyncio.gather(*tasks)
    assert [status_of(a) for a in answers] == [200] * 36
    assert arrival_tags(upstream) == ["hold", *expected]


async def test_fifo_stays_the_default_order(start_gateway, upstream):
    """Without queue_order the same arrivals are served first come, first served:
    clients 3..7 after all 30 of client 2's."""
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1, max_queue=100, queue_timeout=20))
    tasks = await flood_then_others(gw, upstream, 30, range(3, 8))
    await asyncio.gather(*tasks)
    assert arrival_tags(upstream) == ["hold", *(f"a{i}" for i in range(30)), "c3", "c4", "c5", "c6", "c7"]


async def test_a_client_leaving_the_fair_queue_keeps_the_round(start_gateway, upstream):
    """1. fair order: client 2 queues three, clients 3 and 4 one each 2. client 3 leaves
    3. the rest are served a0, c4, a1, a2; nothing is left queued."""
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1, max_queue=100,
                                       queue_timeout=20, queue_order="fair"))
    gate = gw.runtime.table.routes["app"].gate
    tasks = await flood_then_others(gw, upstream, 3, range(3, 5))
    tasks[4].cancel()  # client 3's
    await wait_for(lambda: gate.queued == 4)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert arrival_tags(upstream) == ["hold", "a0", "c4", "a1", "a2"]
    assert gate.queued == 0 and len(gate.waiters) == 0 and gate.in_flight == 0


async def scrape(gw: Any) -> dict[tuple[str, str], float]:
    """gatewayd_rejected_total as Prometheus reads it: {(route, reason): value}."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot(gw.runtime)))
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if s.name == "gatewayd_rejected_total":
                out[(s.labels["route"], s.labels["reason"])] = s.value
    return out


async def test_max_queue_per_client_answers_429(start_gateway, upstream, tmp_path):
    """1. max_queue_per_client = 2, one slot, held; the access log on 2. client 2 queues
    two; its third request is answered 429 client_queue_full at once, never queued
    3. client 3 still queues 4. the refusal is counted: snapshot rejected, Prometheus
    reason, access log 5. the four others are served."""
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1, max_queue=100,
                                       queue_timeout=20, max_queue_per_client=2))
    log_path = tmp_path / "access.json"
    gw.config_path.write_text(gw.config_path.read_text().replace(
        'access_log = "off"', f'access_log = "{log_path}"\naccess_format = "json"'))
    assert (await gw.command({"cmd": "reload"}))["ok"]
    gate = gw.runtime.table.routes["app"].gate
    tasks = await flood_then_others(gw, upstream, 2, range(3, 3))
    refused = await from_client(gw.port, 2, "/slow?ms=10&t=a2", timeout=1)
    assert status_of(refused) == 429 and b"X-Gatewayd-Reason: client_queue_full" in refused
    tasks.append(asyncio.create_task(from_client(gw.port, 3, "/slow?ms=10&t=c3")))
    await wait_for(lambda: gate.queued == 3)
    answers = await asyncio.gather(*tasks)
    assert [status_of(a) for a in answers] == [200] * 4
    assert arrival_tags(upstream) == ["hold", "a0", "a1", "c3"]
    route = snapshot(gw.runtime)["routes"][0]
    assert route["rejected"]["client_queue_full"] == 1 and route["rejected"]["queue_full"] == 0
    assert route["codes"]["429"] == 1
    assert (await scrape(gw))[("app", "client_queue_full")] == 1
    await wait_for(lambda: log_path.exists() and "client_queue_full" in log_path.read_text())
    entry = next(e for e in map(json.loads, log_path.read_text().splitlines()) if e["status"] == 429)
    assert entry["reason"] == "client_queue_full" and entry["client"] == client(2), entry


async def test_max_queue_per_client_with_fair_order(start_gateway, upstream):
    """The bound holds with the fair order too: client 2 gets 3 places and a 429 for
    its fourth; clients 3 and 4 queue and are served within the first round."""
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1, max_queue=100, queue_timeout=20,
                                       queue_order="fair", max_queue_per_client=3))
    gate = gw.runtime.table.routes["app"].gate
    tasks = await flood_then_others(gw, upstream, 3, range(3, 3))
    assert status_of(await from_client(gw.port, 2, "/slow?ms=10&t=a3", timeout=1)) == 429
    for n in (3, 4):
        tasks.append(asyncio.create_task(from_client(gw.port, n, f"/slow?ms=10&t=c{n}")))
        await wait_for(lambda n=n: gate.queued == n)
    assert [status_of(a) for a in await asyncio.gather(*tasks)] == [200] * 6
    assert arrival_tags(upstream) == ["hold", "a0", "c3", "c4", "a1", "a2"]


async def test_reload_moves_waiters_between_orders(start_gateway, upstream):
    """1. FIFO: client 2 queues 4, clients 3 and 4 one each 2. a reload to "fair":
    every waiter is kept, now in round-robin order (the X-ray shows it) 3. more
    arrive (client 5) and a reload back to "fifo" with a per-client bound puts them
    in arrival order again 4. all are served, in that order; nothing is left queued."""
    body = app_route(upstream.url, max_concurrency=1, max_queue=100, queue_timeout=20)
    gw = await start_gateway(body)
    gate = gw.runtime.table.routes["app"].gate
    tasks = await flood_then_others(gw, upstream, 4, range(3, 5))

    async def reload(**keys: Any) -> None:
        text = gw.config_path.read_text().split("[upstreams.", 1)[0]
        gw.config_path.write_text(text + app_route(upstream.url, max_concurrency=1, max_queue=100,
                                                   queue_timeout=20, **keys))
        answer = await gw.command({"cmd": "reload"})
        assert answer["ok"], answer

    async def order() -> list[str]:
        xray = await gw.command({"cmd": "queue", "route": "app"})
        return [w["path"].rsplit("t=", 1)[1] for w in xray["waiters"]]

    await reload(queue_order="fair")
    assert gw.runtime.table.routes["app"].gate is gate and gate.queued == 6
    assert await order() == ["a0", "c3", "c4", "a1", "a2", "a3"]
    tasks.append(asyncio.create_task(from_client(gw.port, 5, "/slow?ms=10&t=c5")))
    await wait_for(lambda: gate.queued == 7)
    assert await order() == ["a0", "c3", "c4", "c5", "a1", "a2", "a3"]
    await reload(queue_order="fifo", max_queue_per_client=4)
    assert await order() == ["a0", "a1", "a2", "a3", "c3", "c4", "c5"]
    assert status_of(await from_client(gw.port, 2, "/slow?ms=10&t=a4", timeout=1)) == 429
    assert [status_of(a) for a in await asyncio.gather(*tasks)] == [200] * 8
    assert arrival_tags(upstream) == ["hold", "a0", "a1", "a2", "a3", "c3", "c4", "c5"]
    assert gate.queued == 0 and len(gate.waiters) == 0 and gate.in_flight == 0


async def test_behind_a_trusted_proxy_the_client_is_the_forwarded_one(start_gateway, upstream):
    """trusted_proxies = 127.0.0.1: every request comes from the proxy's address, each
    with its own X-Forwarded-For. 1. fair order, one slot held; client 10.0.0.2 queues
    three (max_queue_per_client = 3: its fourth gets 429), then 10.0.0.3 one 2. the
    X-ray names the forwarded clients 3. 10.0.0.3 is served second."""
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1, max_queue=100, queue_timeout=20,
                                       queue_order="fair", max_queue_per_client=3),
                             trusted_proxies=["127.0.0.1"])
    gate = gw.runtime.table.routes["app"].gate
    tasks = [asyncio.create_task(from_client(gw.port, 1, "/slow?ms=1500&t=hold"))]
    await wait_for(lambda: upstream.active == 1)
    for i in range(3):
        tasks.append(asyncio.create_task(from_client(gw.port, 1, f"/slow?ms=10&t=a{i}",
                                                     headers="X-Forwarded-For: 10.0.0.2\r\n")))
        await wait_for(lambda i=i: gate.queued == i + 1)
    over = await from_client(gw.port, 1, "/slow?ms=10&t=a3", timeout=1, headers="X-Forwarded-For: 10.0.0.2\r\n")
    assert status_of(over) == 429
    tasks.append(asyncio.create_task(from_client(gw.port, 1, "/slow?ms=10&t=c3",
                                                 headers="X-Forwarded-For: 10.0.0.3\r\n")))
    await wait_for(lambda: gate.queued == 4)
    xray = await gw.command({"cmd": "queue", "route": "app"})
    assert [w["client"] for w in xray["waiters"]] == ["10.0.0.2", "10.0.0.3", "10.0.0.2", "10.0.0.2"]
    assert [status_of(a) for a in await asyncio.gather(*tasks)] == [200] * 5
    assert arrival_tags(upstream) == ["hold", "a0", "c3", "a1", "a2"]
