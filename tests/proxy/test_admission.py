"""Admission (SPEC §3): limit, FIFO queue, queue timeout, fast 503s, and the
release of slots and queue places when clients go away."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from ..builders import app_route
from ..conftest import raw_request, status_of, wait_for


def route(url: str, mc: int, mq: int, qt: float) -> str:
    return app_route(url, max_concurrency=mc, max_queue=mq, queue_timeout=qt)


async def test_two_served_two_timed_out_six_shed(start_gateway, upstream):
    """1. route max_concurrency=2, max_queue=2, queue_timeout=0.5 in front of a 1.5 s upstream
    2. ten requests at once: two take the slots, two queue, six find the queue full
    3. the six are answered 503 queue_full at once, the two waiters 503 queue_timeout
       after 0.5 s, the two admitted 200; the upstream saw exactly two."""
    gw = await start_gateway(route(upstream.url, 2, 2, 0.5))
    gate = gw.runtime.table.routes["app"].gate

    async def one(session: aiohttp.ClientSession) -> tuple[int, str | None, str | None, float]:
        t0 = time.monotonic()
        async with session.get(gw.url + "/slow?ms=1500") as r:
            await r.read()
            return (r.status, r.headers.get("X-Gatewayd-Reason"), r.headers.get("Retry-After"),
                    time.monotonic() - t0)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        # the first four arrive before the rest, so who is admitted or queued is determined
        first = [asyncio.create_task(one(s)) for _ in range(4)]
        await wait_for(lambda: gate.in_flight == 2 and len(gate.waiters) == 2)
        rest = await asyncio.gather(*(one(s) for _ in range(6)))
        results = await asyncio.gather(*first) + rest

    ok = [r for r in results if r[0] == 200]
    full = [r for r in results if r[1] == "queue_full"]
    timed_out = [r for r in results if r[1] == "queue_timeout"]
    assert len(ok) == 2 and len(full) == 6 and len(timed_out) == 2, results
    assert all(r[0] == 503 and r[2] == "1" for r in full + timed_out)
    assert all(r[3] < 0.1 for r in full), [r[3] for r in full]
    assert all(0.45 < r[3] < 1.0 for r in timed_out), [r[3] for r in timed_out]
    assert upstream.started == 2
    stats = gw.runtime.table.routes["app"].stats
    assert (stats.queue_full, stats.queue_timeout) == (6, 2)
    assert gate.in_flight == 0 and not gate.waiters


async def test_queue_is_first_in_first_out(start_gateway, upstream):
    """1. max_concurrency=1: request 0 holds the slot
    2. requests 1..6 queue one after another
    3. the upstream receives them in arrival order."""
    gw = await start_gateway(route(upstream.url, 1, 100, 10))
    gate = gw.runtime.table.routes["app"].gate
    async with aiohttp.ClientSession() as s:
        async def get(i: int) -> int:
            async with s.get(f"{gw.url}/slow?ms=50&i={i}") as r:
                return r.status

        tasks = [asyncio.create_task(get(0))]
        await wait_for(lambda: gate.in_flight == 1)
        for i in range(1, 7):
            tasks.append(asyncio.create_task(get(i)))
            await wait_for(lambda i=i: len(gate.waiters) == i or upstream.started > 1)
        assert await asyncio.gather(*tasks) == [200] * 7
    order = [int(r["target"].rsplit("=", 1)[1]) for r in upstream.requests]
    assert order == list(range(7))


async def test_queued_client_that_leaves_is_never_forwarded(start_gateway, upstream):
    """1. one slow request holds the only slot 2. a second waits in the queue
    3. its client closes 4. the queue empties at once 5. the upstream never sees it."""
    gw = await start_gateway(route(upstream.url, 1, 10, 30))
    r = gw.runtime.table.routes["app"]
    holder = asyncio.create_task(raw_request(gw.port, b"GET /slow?ms=800 HTTP/1.1\r\nHost: x\r\n\r\n", 5))
    await wait_for(lambda: upstream.active == 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /slow?ms=1&queued=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await wait_for(lambda: len(r.gate.waiters) == 1)
    t0 = time.monotonic()
    writer.close()
    await wait_for(lambda: not r.gate.waiters, timeout=1)
    assert time.monotonic() - t0 < 0.1
    assert status_of(await holder) == 200
    assert [q["target"] for q in upstream.requests] == ["/slow?ms=800"]
    assert r.stats.cancelled_queued == 1
    assert r.gate.in_flight == 0


async def test_client_gone_in_flight_aborts_upstream_within_100ms(start_gateway, upstream):
    """1. a request reaches a slow upstream 2. its client closes the connection
    3. the upstream sees its request aborted within 100 ms 4. the slot is free."""
    gw = await start_gateway(route(upstream.url, 4, 10, 5))
    r = gw.runtime.table.routes["app"]
    loop = asyncio.get_running_loop()
    delays = []
    for _ in range(5):
        before = len(upstream.aborted)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /slow?ms=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await wait_for(lambda: upstream.active == 1)
        t0 = loop.time()
        writer.close()
        await wait_for(lambda before=before: len(upstream.aborted) > before, timeout=2)
        delays.append(upstream.aborted[-1] - t0)
        await wait_for(lambda: r.gate.in_flight == 0, timeout=1)
    assert max(delays) < 0.1, delays
    assert r.stats.cancelled_in_flight == 5


async def test_half_close_counts_as_gone(start_gateway, upstream):
    """A client that sends its request and shuts down its write side is gone (like nginx)."""
    gw = await start_gateway(route(upstream.url, 4, 10, 5))
    r = gw.runtime.table.routes["app"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /slow?ms=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await wait_for(lambda: upstream.active == 1)
    writer.write_eof()
    await wait_for(lambda: len(upstream.aborted) == 1, timeout=2)
    await wait_for(lambda: r.gate.in_flight == 0, timeout=1)
    writer.close()


async def test_all_slots_free_after_many_aborts(start_gateway, upstream):
    """200 requests, every other one aborted by its client mid-flight or in the queue:
    afterwards no slot, queue place or upstream request is left behind."""
    gw = await start_gateway(route(upstream.url, 20, 300, 10))
    r = gw.runtime.table.routes["app"]

    async def complete(i: int) -> int:
        return status_of(await raw_request(
            gw.port, f"GET /slow?ms=20&i={i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), 10))

    async def abort(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(f"GET /slow?ms=300&i={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        await asyncio.sleep(0.01 * (i % 7))  # leave at different stages: queued or in flight
        writer.transport.abort()

    results = await asyncio.gather(*(complete(i) if i % 2 else abort(i) for i in range(200)))
    assert [s for s in results if s is not None] == [200] * 100
    await wait_for(lambda: r.gate.in_flight == 0 and not r.gate.waiters and upstream.active == 0)
    assert r.stats.cancelled_queued + r.stats.cancelled_in_flight == 100
    assert gw.runtime.table.upstreams["app"].active == 0


async def test_set_limit_raise_admits_waiters(start_gateway, upstream):
    """Raising max_concurrency through the control socket admits waiters at once;
    lowering it lets in-flight requests finish."""
    gw = await start_gateway(route(upstream.url, 1, 10, 10))
    r = gw.runtime.table.routes["app"]
    tasks = [asyncio.create_task(raw_request(
        gw.port, b"GET /slow?ms=500 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 5)) for _ in range(3)]
    await wait_for(lambda: r.gate.in_flight == 1 and len(r.gate.waiters) == 2)
    answer = await gw.command({"cmd": "set_limit", "route": "app", "max_concurrency": 3})
    assert answer["ok"] and answer["max_concurrency"] == 3
    await wait_for(lambda: upstream.active == 3, timeout=0.2)
    answer = await gw.command({"cmd": "set_limit", "route": "app", "max_concurrency": 1})
    assert r.gate.in_flight == 3  # nobody is cut off
    assert [status_of(x) for x in await asyncio.gather(*tasks)] == [200] * 3
    bad = await gw.command({"cmd": "set_limit", "route": "nope", "max_concurrency": 3})
    assert bad["ok"] is False and "nope" in bad["error"]


async def test_a_freed_slot_passes_over_waiters_that_decline_it():
    """The gate hands a freed slot on in a loop, not by nesting: 1. one slot taken,
    3,000 waiters whose clients have gone (they decline the slot), then one that
    takes it 2. one release wakes all 3,001 in order, without a RecursionError
    3. the slot ends with the last waiter and nobody is left queued."""
    from gatewayd.proxy.admission import ADMITTED, Gate

    gate = Gate(1, 5000)
    assert gate.try_enter()
    woken: list[int] = []

    def declines(i: int):
        def wake(outcome):
            assert outcome is ADMITTED
            woken.append(i)
            return False
        return wake

    for i in range(3000):
        gate.enqueue(declines(i), 30, "GET", f"/{i}", "c")
    gate.enqueue(lambda outcome: woken.append(-1) or True, 30, "GET", "/last", "c")
    gate.release()
    assert woken == [*range(3000), -1]
    assert gate.in_flight == 1 and not gate.waiters


class _NewestFirst:
    """A queue discipline defined here, to plug in through the admission seam: the
    newest waiter gets the next slot (the opposite of FIFO, so the order shows)."""

    def __init__(self) -> None:
        self._waiters: list = []

    def push(self, waiter) -> None:
        self._waiters.append(waiter)

    def pop(self):
        return self._waiters.pop()

    def remove(self, waiter) -> bool:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            return True
        return False

    def __len__(self) -> int:
        return len(self._waiters)

    def __iter__(self):
        return reversed(self._waiters)

    def oldest(self):
        return self._waiters[0] if self._waiters else None


async def test_a_queue_discipline_plugged_in_orders_the_queue(start_gateway, upstream, monkeypatch):
    """The queue order is the gate's Discipline, picked by name from ORDERS:
    1. "fifo" is replaced by a newest-first discipline before the gateway starts
    2. max_concurrency=1: request 0 holds the slot, requests 1..4 queue in turn
    3. the queue X-ray lists them newest first, its oldest wait is request 1's
    4. the upstream receives 0, then 4, 3, 2, 1; nothing is left queued."""
    from gatewayd.proxy import admission

    monkeypatch.setitem(admission.ORDERS, "fifo", _NewestFirst)
    gw = await start_gateway(route(upstream.url, 1, 100, 10))
    gate = gw.runtime.table.routes["app"].gate
    assert isinstance(gate.waiters, _NewestFirst)
    async with aiohttp.ClientSession() as s:
        async def get(i: int) -> int:
            async with s.get(f"{gw.url}/slow?ms={300 if i == 0 else 20}&i={i}") as r:
                return r.status

        tasks = [asyncio.create_task(get(0))]
        await wait_for(lambda: gate.in_flight == 1)
        for i in range(1, 5):
            tasks.append(asyncio.create_task(get(i)))
            await wait_for(lambda i=i: len(gate.waiters) == i)
        xray = await gw.command({"cmd": "queue", "route": "app"})
        assert [w["path"].rsplit("=", 1)[1] for w in xray["waiters"]] == ["4", "3", "2", "1"], xray
        assert gate.oldest_wait(asyncio.get_running_loop().time()) >= xray["waiters"][0]["wait_ms"] / 1000
        assert await asyncio.gather(*tasks) == [200] * 5
    order = [int(r["target"].rsplit("=", 1)[1]) for r in upstream.requests]
    assert order == [0, 4, 3, 2, 1]
    assert gate.in_flight == 0 and not gate.waiters and gate.queued == 0


async def test_evict_answers_a_waiter_with_its_reason(start_gateway, upstream):
    """``Gate.evict`` is how a shedding rule gives up on a waiter: 1. one request holds
    the only slot, a second waits (queue_timeout 30 s) 2. the gate evicts the waiter
    with QUEUE_TIMEOUT 3. its client has 503 queue_timeout at once, counted as such
    4. the holder ends 200; the upstream never saw the evicted request."""
    from gatewayd.proxy.admission import QUEUE_TIMEOUT

    gw = await start_gateway(route(upstream.url, 1, 10, 30))
    r = gw.runtime.table.routes["app"]
    holder = asyncio.create_task(raw_request(gw.port, b"GET /slow?ms=500 HTTP/1.1\r\nHost: x\r\n\r\n", 5))
    await wait_for(lambda: upstream.active == 1)
    queued = asyncio.create_task(raw_request(gw.port, b"GET /slow?ms=1&q=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 5))
    await wait_for(lambda: len(r.gate.waiters) == 1)
    t0 = time.monotonic()
    assert r.gate.evict(next(iter(r.gate.waiters)), QUEUE_TIMEOUT)
    answer = await queued
    assert time.monotonic() - t0 < 0.2
    assert status_of(answer) == 503 and b"X-Gatewayd-Reason: queue_timeout" in answer
    assert r.stats.queue_timeout == 1 and not r.gate.waiters
    assert status_of(await holder) == 200
    assert [q["target"] for q in upstream.requests] == ["/slow?ms=500"]
