"""Deadlines and priorities (issue 24), through the front door: gatewayd
in-process, the recording upstream with controlled latencies (``/slow?ms=``),
real clients; waits on conditions, never bare sleeps."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.builders import app_route
from tests.conftest import wait_for
from tests.proxy.wsclient import head_of

HEADER = "X-Request-Timeout"


def get(path: str, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def reason_of(head: bytes) -> str | None:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"x-gatewayd-reason:"):
            return line.split(b":", 1)[1].strip().decode()
    return None


def retry_after_of(head: bytes) -> int | None:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"retry-after:"):
            return int(line.split(b":", 1)[1])
    return None


def stats(gw: Any) -> Any:
    return gw.runtime.table.routes["app"].stats


def gate(gw: Any) -> Any:
    return gw.runtime.table.routes["app"].gate


async def test_route_timeout_is_504_and_aborts_the_upstream(start_gateway, upstream) -> None:
    gw = await start_gateway(app_route(upstream.url, timeout=0.3))
    began = time.monotonic()
    head = await head_of(gw.port, get("/slow?ms=3000"))
    took = time.monotonic() - began
    assert head.startswith(b"HTTP/1.1 504 ") and reason_of(head) == "route_timeout"
    assert 0.25 <= took < 1.0, took
    await wait_for(lambda: len(upstream.aborted) == 1)  # the upstream's work stopped
    assert stats(gw).route_timeout == 1 and gate(gw).in_flight == 0


async def test_a_response_head_in_time_is_not_cut(start_gateway, upstream) -> None:
    gw = await start_gateway(app_route(upstream.url, timeout=2.0))
    head = await head_of(gw.port, get("/slow?ms=50"))
    assert head.startswith(b"HTTP/1.1 200 ")
    assert stats(gw).route_timeout == 0


async def test_the_client_budget_is_capped_and_a_bad_one_ignored(start_gateway, upstream) -> None:
    gw = await start_gateway(app_route(upstream.url, timeout=0.6, deadline_header=HEADER))
    for value, expect in (("0.2", 0.2), ("30", 0.6), ("soon", 0.6), ("-1", 0.6), ("nan", 0.6)):
        began = time.monotonic()
        head = await head_of(gw.port, get("/slow?ms=5000", f"{HEADER}: {value}"))
        took = time.monotonic() - began
        assert head.startswith(b"HTTP/1.1 504 "), value  # never an error page for the header
        assert expect - 0.05 <= took < expect + 0.4, (value, took)


async def test_the_remaining_budget_goes_upstream(start_gateway, upstream) -> None:
    gw = await start_gateway(app_route(upstream.url, timeout=10.0, deadline_header=HEADER))
    head = await head_of(gw.port, get("/echo", f"{HEADER}: 5"))
    assert head.startswith(b"HTTP/1.1 200 ")
    sent = [v for n, v in upstream.requests[-1]["headers"] if n.lower() == HEADER.lower()]
    assert len(sent) == 1 and 4.5 < float(sent[0]) <= 5.0 and len(sent[0].split(".")[1]) == 3
    head = await head_of(gw.port, get("/echo"))  # no client budget: the route's timeout
    sent = [v for n, v in upstream.requests[-1]["headers"] if n.lower() == HEADER.lower()]
    assert len(sent) == 1 and 9.5 < float(sent[0]) <= 10.0


async def learn(gw: Any, n: int = 8, ms: int = 100) -> None:
    """Serve ``n`` requests of ``ms`` each so the route learns its service time."""
    await asyncio.gather(*(head_of(gw.port, get(f"/slow?ms={ms}")) for _ in range(n)))
    assert abs(gate(gw).estimator.service - ms / 1000) < 0.05, gate(gw).estimator.service


async def test_a_request_that_cannot_make_it_is_refused_at_arrival(start_gateway, upstream) -> None:
    """Two slots of 100 ms: 20 a second. A request behind 30 waiters expects 1.55 s of
    wait and 0.1 s of service: with a 1 s budget it is answered 503 deadline at once,
    and the upstream never sees it."""
    gw = await start_gateway(app_route(upstream.url, max_concurrency=2, max_queue=100, queue_timeout=10,
                                       deadline_header=HEADER))
    await learn(gw)
    waiting = [asyncio.ensure_future(head_of(gw.port, get("/slow?ms=100"))) for _ in range(32)]
    await wait_for(lambda: gate(gw).queued == 30)
    seen = upstream.started
    began = time.monotonic()
    head = await head_of(gw.port, get("/slow?ms=100", f"{HEADER}: 1.0"))
    assert time.monotonic() - began < 0.5  # at once, not after a wait (its budget is 1 s)
    assert head.startswith(b"HTTP/1.1 503 ") and reason_of(head) == "deadline"
    assert stats(gw).deadline == 1
    await asyncio.gather(*waiting)
    assert upstream.started == seen + 30  # the queued ones, not the refused one


async def test_a_waiter_leaves_once_its_budget_cannot_cover_the_service(start_gateway, upstream) -> None:
    """Service 300 ms, one slot held for 3 s: a waiter with 1 s of budget leaves at about
    0.625 s (when what is left no longer covers the service and its quarter more),
    before its deadline."""
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1, max_queue=10, queue_timeout=10,
                                       deadline_header=HEADER))
    await learn(gw, n=4, ms=300)
    holder = asyncio.ensure_future(head_of(gw.port, get("/slow?ms=3000")))
    await wait_for(lambda: gate(gw).in_flight == 1)
    began = time.monotonic()
    head = await head_of(gw.port, get("/slow?ms=10", f"{HEADER}: 1.0"))
    took = time.monotonic() - began
    assert head.startswith(b"HTTP/1.1 503 ") and reason_of(head) == "deadline"
    assert 0.55 <= took < 0.98, took  # out before its deadline, not at it
    holder.cancel()


async def test_retry_after_is_computed_from_the_route(start_gateway, upstream) -> None:
    """Two slots of 100 ms (20 a second) and a queue of 20: a request shed at the full
    queue is told about 21 / 20 s, whatever the configured retry_after."""
    gw = await start_gateway(app_route(upstream.url, max_concurrency=2, max_queue=20, queue_timeout=10,
                                       retry_after=17))
    first = [asyncio.ensure_future(head_of(gw.port, get("/slow?ms=100"))) for _ in range(22)]
    await wait_for(lambda: gate(gw).queued == 20)
    await wait_for(lambda: upstream.finished >= 12, timeout=10)  # the route has run full for a while
    # (as a shed does, this takes a sample: its rate is over the time since the first waiter)
    capacity = gate(gw).estimate(asyncio.get_running_loop().time()).capacity(2)
    assert 12 < capacity < 28, capacity  # two slots of 100 ms
    # a burst: the queue fills again and the rest is shed, each told when to come back
    burst = await asyncio.gather(*(head_of(gw.port, get("/slow?ms=100")) for _ in range(30)))
    shed = [retry_after_of(h) for h in burst if reason_of(h) == "queue_full"]
    assert shed and all(v is not None and 1 <= v <= 3 for v in shed), shed
    await asyncio.gather(*first)


async def test_retry_after_is_the_configured_one_while_nothing_is_known(start_gateway, upstream) -> None:
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1, max_queue=0, retry_after=17))
    holder = asyncio.ensure_future(head_of(gw.port, get("/slow?ms=500")))
    await wait_for(lambda: gate(gw).in_flight == 1)
    head = await head_of(gw.port, get("/"))
    assert retry_after_of(head) == 17
    await holder


async def test_classes_are_served_critical_first(start_gateway, upstream) -> None:
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1, max_queue=10, queue_timeout=10,
                                       priority="sheddable", priority_header="X-Priority"))
    holder = asyncio.ensure_future(head_of(gw.port, get("/slow?ms=300")))
    await wait_for(lambda: gate(gw).in_flight == 1)
    order = []
    for name, header in (("shed", []), ("default", ["X-Priority: default"]), ("crit", ["X-Priority: Critical"]),
                         ("junk", ["X-Priority: urgent"])):
        order.append(asyncio.ensure_future(head_of(gw.port, get(f"/echo?{name}", *header))))
        queued = len(order)
        await wait_for(lambda queued=queued: gate(gw).queued == queued)
    assert gate(gw).waiters.by_class() == [1, 1, 2]  # critical, default, sheddable
    await asyncio.gather(holder, *order)
    served = [r["target"].split("?")[1] for r in upstream.requests if r["target"].startswith("/echo")]
    assert served == ["crit", "default", "shed", "junk"]  # a bad class is the route's


async def test_a_higher_class_preempts_the_newest_lower_waiter(start_gateway, upstream) -> None:
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1, max_queue=2, queue_timeout=10,
                                       priority_header="X-Priority"))
    holder = asyncio.ensure_future(head_of(gw.port, get("/slow?ms=300")))
    await wait_for(lambda: gate(gw).in_flight == 1)
    first = asyncio.ensure_future(head_of(gw.port, get("/echo?first", "X-Priority: sheddable")))
    await wait_for(lambda: gate(gw).queued == 1)
    second = asyncio.ensure_future(head_of(gw.port, get("/echo?second", "X-Priority: sheddable")))
    await wait_for(lambda: gate(gw).queued == 2)
    crit = asyncio.ensure_future(head_of(gw.port, get("/echo?crit", "X-Priority: critical")))
    head = await second  # the newest sheddable waiter gave its place
    assert head.startswith(b"HTTP/1.1 503 ") and reason_of(head) == "preempted"
    # a sheddable request at the full queue: no class below its own, so it is the one shed
    full = await head_of(gw.port, get("/echo?late", "X-Priority: sheddable"))
    assert reason_of(full) == "queue_full"
    for h in await asyncio.gather(holder, first, crit):
        assert h.startswith(b"HTTP/1.1 200 ")
    assert stats(gw).preempted == 1
    served = [r["target"].split("?")[1] for r in upstream.requests if r["target"].startswith("/echo")]
    assert served == ["crit", "first"]
