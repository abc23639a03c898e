"""Deadlines and priorities in the snapshot, the queue X-ray, the metrics and
gatewayctl (gatewayd(8) Snapshot fields, METRICS; SPEC §12): a route's refusals by
deadline, preemption and route timeout, its waiters by class, each waiter's class
and remaining budget, and the route's estimates (completion rate, service time)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest

from gatewayd.control import snapshot as snapshots
from gatewayd.control.merge import Retired, merge_route, retire
from gatewayd.control.prometheus import SnapshotCollector
from gatewayd.control.snapshot import export, present, route_order, runtime_info
from gatewayd.stats.metrics import RouteStats

from ..builders import app_route, free_port
from ..conftest import ROOT, wait_for, wait_for_sync

HEADER = "X-Request-Timeout"
CLASS = "X-Priority"


async def head_of(port: int, data: bytes) -> bytes:
    """The head of the answer to ``data`` (waits up to 30 s: a slot is held for seconds)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    finally:
        writer.close()


def get(path: str, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def reason_of(head: bytes) -> str | None:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"x-gatewayd-reason:"):
            return line.split(b":", 1)[1].strip().decode()
    return None


def metrics_text(gw: Any) -> str:
    """What the metrics listener serves, from this gateway's snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshots.snapshot(gw.runtime)))
    return generate_latest(registry).decode()


async def gatewayctl(config: str, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd.control.cli", "--config", config, *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT))
    out, err = await proc.communicate()
    assert (proc.returncode, err) == (0, b"")
    return out.decode()


async def route_of(gw: Any) -> dict[str, Any]:
    (r,) = (await gw.command({"cmd": "snapshot"}))["snapshot"]["routes"]
    return r


def ruled_route(url: str, **keys: Any) -> str:
    return app_route(url, **{"max_concurrency": 1, "max_queue": 4, "queue_timeout": 10,
                             "deadline_header": HEADER, "priority_header": CLASS, **keys})


async def test_waiters_by_class_their_budgets_and_the_refusals(start_gateway, upstream):
    """1. one slot, held by a request with a 6 s budget; 2. a critical waiter with a
    20 s budget, a default one without a budget, one with 0.3 s that leaves at its
    deadline (503 deadline), then two sheddable ones fill the queue (4); 3. the
    snapshot counts the waiters by class, its X-ray (and the queue command, and
    ``gatewayctl queue``) give each one's class and seconds left, critical first;
    4. a critical request at the full queue takes the newest sheddable waiter's place
    (503 preempted); 5. the holder's budget ends before its response head (504
    route_timeout), the waiters are served; 6. the snapshot and the metrics count
    one of each reason."""
    gw = await start_gateway(ruled_route(upstream.url))
    gate = gw.runtime.table.routes["app"].gate
    holder = asyncio.ensure_future(head_of(gw.port, get("/slow?ms=15000", f"{HEADER}: 6")))
    await wait_for(lambda: gate.in_flight == 1)
    waiting = [asyncio.ensure_future(head_of(gw.port, get("/echo?crit", f"{CLASS}: critical", f"{HEADER}: 20")))]
    await wait_for(lambda: gate.queued == 1)
    waiting.append(asyncio.ensure_future(head_of(gw.port, get("/echo?default"))))
    await wait_for(lambda: gate.queued == 2)
    doomed = await head_of(gw.port, get("/echo?doomed", f"{HEADER}: 0.3"))
    assert doomed.startswith(b"HTTP/1.1 503 ") and reason_of(doomed) == "deadline"
    for n in (1, 2):
        waiting.append(asyncio.ensure_future(head_of(gw.port, get(f"/echo?shed{n}", f"{CLASS}: sheddable"))))
        await wait_for(lambda n=n: gate.queued == 2 + n)

    r = await route_of(gw)
    assert r["queued_by_priority"] == {"critical": 1, "default": 1, "sheddable": 2}
    xray = [(w["path"], w["priority"]) for w in r["waiters"]]
    assert xray == [("/echo?crit", "critical"), ("/echo?default", "default"), ("/echo?shed1", "sheddable"),
                    ("/echo?shed2", "sheddable")]
    crit = r["waiters"][0]
    assert 19.0 < crit["deadline_in"] <= 20.0 and round(crit["deadline_in"], 3) == crit["deadline_in"]
    assert [w["deadline_in"] for w in r["waiters"][1:]] == [None, None, None]
    listed = (await gw.command({"cmd": "queue", "route": "app"}))["waiters"]
    assert [(w["priority"], w["deadline_in"] is None) for w in listed] == [
        ("critical", False), ("default", True), ("sheddable", True), ("sheddable", True)]
    lines = (await gatewayctl(str(gw.config_path), "queue", "app")).splitlines()
    assert lines[0] == "4 waiting on route app"
    assert "/echo?crit  from 127.0.0.1  critical  " in lines[1] and lines[1].endswith("s left")
    assert 19.0 < float(lines[1].rsplit("  ", 1)[1].removesuffix("s left")) <= 20.0
    assert lines[2].endswith("/echo?default  from 127.0.0.1  default  no deadline")
    assert lines[4].endswith("/echo?shed2  from 127.0.0.1  sheddable  no deadline")
    text = metrics_text(gw).splitlines()
    for priority, n in (("critical", 1), ("default", 1), ("sheddable", 2)):
        assert f'gatewayd_queue_depth_by_priority{{priority="{priority}",route="app"}} {n}.0' in text

    late = asyncio.ensure_future(head_of(gw.port, get("/echo?late", f"{CLASS}: critical")))
    preempted = await waiting.pop()  # shed2, the newest sheddable waiter
    assert preempted.startswith(b"HTTP/1.1 503 ") and reason_of(preempted) == "preempted"
    head = await holder
    assert head.startswith(b"HTTP/1.1 504 ") and reason_of(head) == "route_timeout"
    for h in await asyncio.gather(*waiting, late):
        assert h.startswith(b"HTTP/1.1 200 ")

    r = await route_of(gw)
    assert r["queued_by_priority"] == {"critical": 0, "default": 0, "sheddable": 0}
    assert {k: r["rejected"][k] for k in ("deadline", "preempted", "route_timeout")} == {
        "deadline": 1, "preempted": 1, "route_timeout": 1}
    text = metrics_text(gw).splitlines()
    for reason in ("deadline", "preempted", "route_timeout"):
        assert f'gatewayd_rejected_total{{reason="{reason}",route="app"}} 1.0' in text
    assert 'gatewayd_queue_depth_by_priority{priority="critical",route="app"} 0.0' in text
    status = (await gatewayctl(str(gw.config_path), "status")).splitlines()
    line = next(line for line in status if line.startswith("  service "))
    assert line.endswith("  deadline 1  preempted 1  route timeout 1")


async def test_a_route_without_classes_counts_its_waiters_in_its_own(start_gateway, upstream):
    """A route with ``priority = "sheddable"`` and no priority_header: its waiters are all
    sheddable in the counts and the X-ray; its ``timeout`` gives each a deadline."""
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1, max_queue=4, queue_timeout=10,
                                       priority="sheddable", timeout=20.0))
    gate = gw.runtime.table.routes["app"].gate
    holder = asyncio.ensure_future(head_of(gw.port, get("/slow?ms=600")))
    await wait_for(lambda: gate.in_flight == 1)
    waiting = [asyncio.ensure_future(head_of(gw.port, get("/echo", f"{CLASS}: critical"))) for _ in range(2)]
    await wait_for(lambda: gate.queued == 2)
    r = await route_of(gw)
    assert r["queued_by_priority"] == {"critical": 0, "default": 0, "sheddable": 2}
    assert [w["priority"] for w in r["waiters"]] == ["sheddable", "sheddable"]
    assert all(19.0 < w["deadline_in"] <= 20.0 for w in r["waiters"])
    await asyncio.gather(holder, *waiting)


async def test_the_estimates_are_in_the_snapshot_the_metrics_and_status(start_gateway, upstream):
    """1. a route learns its service time from requests of 100 ms through one slot;
    2. the snapshot's estimates say about 100 ms and a completion rate above 0, as the
    route's estimator has them; the single-process snapshot agrees with the merged
    one; 3. the metrics have both gauges, 4. ``gatewayctl status`` a line with them."""
    gw = await start_gateway(ruled_route(upstream.url, max_queue=10))
    gate = gw.runtime.table.routes["app"].gate
    r = await route_of(gw)
    assert r["estimates"] == {"completion_rate": 0.0, "service_ms": None}  # nothing known yet
    assert not any(line.startswith("gatewayd_route_service_seconds{")
                   for line in metrics_text(gw).splitlines())  # absent while unknown

    async def rated() -> dict[str, Any]:
        began = time.monotonic()
        while True:
            await asyncio.gather(*(head_of(gw.port, get("/slow?ms=100")) for _ in range(3)))
            r = await route_of(gw)
            if r["estimates"]["completion_rate"] > 0 and r["estimates"]["service_ms"] is not None:
                return r
            assert time.monotonic() - began < 10, r["estimates"]

    r = await rated()
    est = r["estimates"]
    assert 50 < est["service_ms"] < 200, est
    assert est["service_ms"] == round(gate.estimator.service * 1000, 3)
    assert est["completion_rate"] == round(gate.estimator.rate, 3)
    fast = snapshots.snapshot(gw.runtime)["routes"][0]
    slow = present(runtime_info(gw.runtime), [export(gw.runtime)], route_order(gw.runtime))["routes"][0]
    for key in ("estimates", "queued_by_priority", "rejected"):
        assert fast[key] == slow[key], key
    text = metrics_text(gw).splitlines()
    assert any(line.startswith('gatewayd_route_service_seconds{route="app"} 0.') for line in text)
    rate = next(line for line in text if line.startswith('gatewayd_route_completion_rate{route="app"} '))
    assert float(rate.rsplit(" ", 1)[1]) > 0
    status = (await gatewayctl(str(gw.config_path), "status")).splitlines()
    line = next(line for line in status if line.startswith("  service "))
    service = float(line.split()[1])
    assert 50 < service < 200 and "  completes " in line and line.endswith("  route timeout 0"), line


def route_export(by_class: list[int], rate: float, service: float | None, refused: int) -> dict[str, Any]:
    """Route ``app`` of one worker, as ``export`` makes it."""
    stats = RouteStats()
    counters: dict[str, Any] = dict(stats.export())
    counters["rejected"].update(tunnels_full=0, deadline=refused, preempted=2 * refused, route_timeout=3 * refused)
    return {**counters, "tunnels": 0, "tunnels_total": 0, "in_flight": 0, "queued": sum(by_class),
            "queued_by_priority": dict(zip(("critical", "default", "sheddable"), by_class, strict=True)),
            "estimates": {"completion_rate": rate, "service_ms": service},
            "limit": 5, "queue_limit": 5, "oldest_wait_ms": 0.0, "waiters": []}


def test_merge_sums_classes_and_rates_takes_the_largest_service_and_keeps_refusals():
    """Three workers: waiters by class and completion rates add up, the service time is
    the largest known; when one exits, its waiters and rate go with it, its refusals
    stay."""
    exports: list[Any] = [
        {"routes": {"app": route_export([1, 2, 3], 10.0, 80.0, 1)}, "upstreams": {}},
        {"routes": {"app": route_export([0, 1, 0], 20.5, None, 2)}, "upstreams": {}},
        {"routes": {"app": route_export([2, 0, 1], 5.25, 120.0, 3)}, "upstreams": {}},
    ]
    merged = merge_route("app", exports, None)
    assert merged["queued_by_priority"] == {"critical": 3, "default": 3, "sheddable": 4}
    assert merged["estimates"] == {"completion_rate": 35.75, "service_ms": 120.0}
    assert {k: merged["rejected"][k] for k in ("deadline", "preempted", "route_timeout")} == {
        "deadline": 6, "preempted": 12, "route_timeout": 18}
    retired: Retired = {}
    retire(retired, exports[2])
    merged = merge_route("app", exports[:2], retired)
    assert merged["queued_by_priority"] == {"critical": 1, "default": 3, "sheddable": 3}
    assert merged["estimates"] == {"completion_rate": 30.5, "service_ms": 80.0}
    assert {k: merged["rejected"][k] for k in ("deadline", "preempted", "route_timeout")} == {
        "deadline": 6, "preempted": 12, "route_timeout": 18}


def test_with_workers_the_master_presents_the_new_figures(gateway_process):
    """Two workers: the master's snapshot has the route's new reasons (zeros), its
    waiters by class (none) and its estimates (nothing known)."""
    gp = gateway_process(app_route(f"http://127.0.0.1:{free_port()}", timeout=5.0, priority_header=CLASS),
                         workers=2)

    def merged() -> dict[str, Any] | None:
        snap = gp.command({"cmd": "snapshot"})["snapshot"]
        return snap if len([w for w in snap["workers"] if w["pid"]]) == 2 else None

    (r,) = wait_for_sync(merged, timeout=20)["routes"]
    assert {k: r["rejected"][k] for k in ("deadline", "preempted", "route_timeout")} == {
        "deadline": 0, "preempted": 0, "route_timeout": 0}
    assert r["queued_by_priority"] == {"critical": 0, "default": 0, "sheddable": 0}
    assert r["estimates"] == {"completion_rate": 0.0, "service_ms": None}
