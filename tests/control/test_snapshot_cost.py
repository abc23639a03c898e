"""What a dashboard costs the gateway (issue #5): snapshots reuse what did not change,
and never serve what did.

The single-process snapshot shares route objects (and their JSON) between
snapshots while a route's figures stay the same; every test that changes a
figure between two snapshots checks that the second one shows it.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from typing import Any

import pytest

from gatewayd.control import snapshot as snapshots
from gatewayd.control.encode import route_json, to_json
from gatewayd.control.snapshot import (
    export,
    present,
    route_order,
    runtime_info,
    snapshot_json,
    without_histograms,
)
from gatewayd.stats.metrics import LATENCY_BUCKETS, RouteStats, quantiles_ms
from gatewayd.stats.process import open_fds

from ..conftest import wait_for

ROUTES = """
    [upstreams.app]
    servers = ["{url}"]

    [[routes]]
    name = "a"
    path_prefix = "/slow"
    upstream = "app"
    max_concurrency = 2
    max_queue = 10
    queue_timeout = 30

    [[routes]]
    name = "b"
    path_prefix = "/b"
    upstream = "app"

    [[routes]]
    name = "c"
    path_prefix = "/"
    upstream = "app"
"""

# top-level figures that move on their own between two snapshots taken a moment apart
VOLATILE = ("time", "uptime_s", "rss_bytes", "open_fds", "cpu_s", "tasks", "loop_lag_ms", "gc",
            "workers", "control")


def steady(snap: dict[str, Any]) -> dict[str, Any]:
    """``snap`` through JSON, without the figures that move by themselves."""
    out = json.loads(json.dumps(snap))
    for key in VOLATILE:
        out.pop(key, None)
    return out


def record(stats: RouteStats, rng: random.Random) -> None:
    """Traffic as the request path records it."""
    stats.requests += 1
    stats.queue_wait.observe(rng.random() * 0.01)
    status = rng.choice((200, 200, 204, 304, 404, 502, 503))
    if status == 502:
        stats.upstream_error(rng.choice(("upstream_connect", "upstream_timeout")))
    stats.responded(status, rng.lognormvariate(-4, 1))


async def ask(gw: Any, obj: dict[str, Any]) -> dict[str, Any]:
    answer = await gw.command(obj)
    assert answer["ok"] is True, answer
    return answer


def route(snap: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in snap["routes"] if r["name"] == name)


# ----------------------------------------------------------------------------- equivalence
async def test_presented_snapshot_equals_present_of_one_export(start_gateway, upstream):
    """1. a gateway with three routes 2. rounds of recorded traffic on some routes, limits
    changed, requests held in flight and queued 3. each round, the cached single-process
    snapshot equals present() of a fresh export, the slow path it replaces."""
    gw = await start_gateway(ROUTES.format(url=upstream.url))
    rt = gw.runtime
    rng = random.Random(5)
    writers = []
    for i in range(8):
        for name in rng.sample(["a", "b", "c"], rng.randint(0, 2)):
            for _ in range(rng.randint(1, 5)):
                record(rt.table.routes[name].stats, rng)
        if i == 3:
            rt.set_limit("b", 7, 9)
        if i == 5:  # two in flight on "a", one queued: rebuilt each time (ages grow)
            for n in range(3):
                _, w = await asyncio.open_connection("127.0.0.1", gw.port)
                w.write(f"GET /slow?ms=3000&n={n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                writers.append(w)
            gate = rt.table.routes["a"].gate
            await wait_for(lambda gate=gate: gate.in_flight == 2 and len(gate.waiters) == 1)
        fast = snapshots.snapshot(rt)
        slow = present(runtime_info(rt), [export(rt)], route_order(rt))
        a, b = steady(fast), steady(slow)
        for ra, rb in zip(a["routes"], b["routes"], strict=True):
            # the waiter ages are read a moment apart
            assert ra.pop("oldest_wait_ms") == pytest.approx(rb.pop("oldest_wait_ms"), abs=50)
            for wa, wb in zip(ra.pop("waiters"), rb.pop("waiters"), strict=True):
                assert wa.pop("wait_ms") == pytest.approx(wb.pop("wait_ms"), abs=50)
                assert wa == wb
        assert a == b
        assert fast["workers"][0]["requests"] == slow["workers"][0]["requests"]
        assert fast["workers"][0]["in_flight"] == slow["workers"][0]["in_flight"]
        assert fast["workers"][0]["queued"] == slow["workers"][0]["queued"]
    for w in writers:
        w.close()


def test_snapshot_json_is_json_dumps():
    """The line encoder writes what json.dumps(separators=(",", ":")) writes, with and
    without the bucket counts, for presented routes and for plain dicts."""
    stats = RouteStats()
    rng = random.Random(1)
    for _ in range(50):
        record(stats, rng)
    exp = stats.export()
    exp.update({"in_flight": 1, "queued": 0, "oldest_wait_ms": 0.0, "waiters": [], "tunnels": 2,
                "tunnels_total": 5, "queued_by_priority": {"critical": 0, "default": 0, "sheddable": 0},
                "estimates": {"completion_rate": 12.5, "service_ms": None}})
    order = [{"name": "é \"q\"", "upstream": "u", "path_prefix": "/", "host": None,
              "max_concurrency": 3, "max_queue": 4, "queue_timeout": 2.0, "max_tunnels": 9}]
    info = {"version": "x", "pid": 1, "last_reload": {"ok": False, "error": "bad\nline ☃"}}
    gen = {"generation": 0, "count": 0, "collected": 0, "last_ms": 0.0, "max_ms": 0.0,
           "total_ms": 0.0, "histogram": {"counts": [0, 1], "sum": 0.5, "count": 1}}
    e = {"pid": 1, "index": 0, "connections": 0, "accepted": 0, "tasks": 1,
         "loop_lag_ms": {"last": 0.0, "max": 0.0}, "rss_bytes": 1, "open_fds": 1, "fd_limit": 9,
         "cpu_s": 0.1, "generation": 1, "routes": {order[0]["name"]: exp}, "upstreams": {},
         "gc": {"collections": [1, 0, 0], "pauses": 1,
                "pause_ms": {"last": 0.1, "max": 0.1, "total": 0.1},
                "generations": [dict(gen, generation=g) for g in range(3)], "recent": [],
                "frozen": 0}}
    snap = present(info, [e], order)
    snap["nan"] = float("nan")
    dumps = lambda obj: json.dumps(obj, separators=(",", ":"))  # noqa: E731
    assert snapshot_json(snap, histograms=True) == dumps(snap)
    assert snapshot_json(snap) == dumps(without_histograms(snap))
    assert "histogram" not in snapshot_json(snap)
    plain = json.loads(dumps(snap["routes"][0]))  # a route that is not a RouteDict
    assert route_json(plain, True) == dumps(plain)
    assert json.loads(route_json(plain)) == {k: v for k, v in plain.items() if "histogram" not in k}
    for obj in ({"a": [1, 2.5, None, True, "é"]}, [], "x", 1e300, -0.0):
        assert to_json(obj) == dumps(obj)
    with pytest.raises(TypeError):
        to_json({"a": object()})
    assert math.isnan(json.loads(snapshot_json(snap))["nan"])


def test_quantiles_unchanged_by_the_split():
    stats = RouteStats()
    rng = random.Random(2)
    for _ in range(1000):
        stats.latency.observe(rng.lognormvariate(-4, 1.5))
    h = stats.latency.export()
    q = quantiles_ms(LATENCY_BUCKETS, h)
    assert q["p50"] < q["p90"] < q["p99"]
    for name, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        assert q[name] == round(stats.latency.quantile(p) * 1000, 3)


def test_open_fds_counts_what_is_open():
    """The O(1) count (size of /proc/self/fd) agrees with listing the folder, and
    follows descriptors being opened and closed."""
    before = open_fds()
    listed = len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
    assert before in (listed, listed + 1)  # + 1: the fallback (listing) before Linux 6.2
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(50)]
    try:
        assert open_fds() == before + 50
    finally:
        for fd in fds:
            os.close(fd)
    assert open_fds() == before


# ----------------------------------------------------------------------------- no stale data
CHANGES = [
    ("requests", lambda s, g: setattr(s, "requests", s.requests + 1),
     lambda r: r["requests"]),
    ("responded", lambda s, g: s.responded(200, 0.002),
     lambda r: (r["responses"]["2xx"], r["codes"], r["latency_ms"])),
    ("responded 5xx", lambda s, g: s.responded(503, 0.2),
     lambda r: (r["responses"]["5xx"], r["codes"])),
    ("queue_full", lambda s, g: setattr(s, "queue_full", s.queue_full + 1),
     lambda r: r["rejected"]),
    ("queue_timeout", lambda s, g: setattr(s, "queue_timeout", s.queue_timeout + 1),
     lambda r: r["rejected"]),
    ("rate_limited", lambda s, g: setattr(s, "rate_limited", s.rate_limited + 1),
     lambda r: r["rejected"]),
    ("cancelled_queued", lambda s, g: setattr(s, "cancelled_queued", s.cancelled_queued + 1),
     lambda r: (r["cancelled"], r["cancelled_queued"])),
    ("cancelled_in_flight",
     lambda s, g: setattr(s, "cancelled_in_flight", s.cancelled_in_flight + 1),
     lambda r: (r["cancelled"], r["cancelled_in_flight"])),
    ("upstream_error", lambda s, g: s.upstream_error("upstream_reset"),
     lambda r: (r["upstream_errors"], r["upstream_error_reasons"])),
    ("another upstream_error", lambda s, g: s.upstream_error("upstream_reset"),
     lambda r: r["upstream_error_reasons"]),
    ("queue_wait", lambda s, g: s.queue_wait.observe(0.3),
     lambda r: r["queue_wait_ms"]),
    ("in_flight", lambda s, g: setattr(g, "in_flight", g.in_flight + 1),
     lambda r: r["in_flight"]),
    ("tunnels", lambda s, g: setattr(s, "tunnels", s.tunnels + 1),
     lambda r: r["tunnels"]),
    ("tunnels_total", lambda s, g: setattr(s, "tunnels_total", s.tunnels_total + 1),
     lambda r: r["tunnels_total"]),
    ("tunnels_full", lambda s, g: setattr(s, "tunnels_full", s.tunnels_full + 1),
     lambda r: r["rejected"]),
    ("deadline", lambda s, g: setattr(s, "deadline", s.deadline + 1),
     lambda r: r["rejected"]),
    ("preempted", lambda s, g: setattr(s, "preempted", s.preempted + 1),
     lambda r: r["rejected"]),
    ("route_timeout", lambda s, g: setattr(s, "route_timeout", s.route_timeout + 1),
     lambda r: r["rejected"]),
    ("service time", lambda s, g: g.estimator.observe(0.25),
     lambda r: r["estimates"]),
]


@pytest.mark.parametrize("how", ["snapshot", "subscribe"])
async def test_every_figure_change_shows_in_the_next_snapshot(start_gateway, upstream, how):
    """1. a gateway with three routes, snapshots taken through the socket (answers to
    ``snapshot``, or successive ``subscribe`` lines) 2. between two snapshots one figure
    of route "b" changes through the recording API 3. the second snapshot shows the
    change, and routes "a" and "c" are as before."""
    gw = await start_gateway(ROUTES.format(url=upstream.url))
    r = gw.runtime.table.routes["b"]
    if how == "subscribe":
        reader, writer = await asyncio.open_unix_connection(str(gw.socket_path), limit=1 << 24)
        writer.write(b'{"cmd": "subscribe", "interval": 0.05}\n')
        assert json.loads(await reader.readline()) == {"ok": True}

        async def take(after: float) -> dict[str, Any]:
            # the first line built after the change (earlier ones may be on their way)
            while True:
                snap = json.loads(await asyncio.wait_for(reader.readline(), 5))["snapshot"]
                if snap["time"] > after:
                    return snap
    else:
        async def take(after: float) -> dict[str, Any]:
            return (await ask(gw, {"cmd": "snapshot"}))["snapshot"]

    prev = await take(0.0)
    for name, change, shown in CHANGES:
        change(r.stats, r.gate)
        cur = await take(time.time())
        assert shown(route(cur, "b")) != shown(route(prev, "b")), name
        for other in ("a", "c"):
            assert route(cur, other) == route(prev, other), name
        prev = cur
    if how == "subscribe":
        writer.close()


async def test_waiter_ages_grow_between_snapshots(start_gateway, upstream):
    """1. two requests in flight on route "a", one queued behind them 2. two snapshots
    0.2 s apart, nothing else happening 3. the second shows the waiter 0.2 s older."""
    gw = await start_gateway(ROUTES.format(url=upstream.url))
    gate = gw.runtime.table.routes["a"].gate
    writers = []
    for n in range(3):
        _, w = await asyncio.open_connection("127.0.0.1", gw.port)
        w.write(f"GET /slow?ms=5000&n={n} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        writers.append(w)
    await wait_for(lambda: gate.in_flight == 2 and len(gate.waiters) == 1)
    s1 = route((await ask(gw, {"cmd": "snapshot"}))["snapshot"], "a")
    await asyncio.sleep(0.2)
    s2 = route((await ask(gw, {"cmd": "snapshot"}))["snapshot"], "a")
    assert s2["oldest_wait_ms"] >= s1["oldest_wait_ms"] + 150
    assert s2["waiters"][0]["wait_ms"] >= s1["waiters"][0]["wait_ms"] + 150
    for w in writers:
        w.close()


async def test_limits_and_reload_show_in_the_next_snapshot(start_gateway, upstream):
    gw = await start_gateway(ROUTES.format(url=upstream.url))
    s1 = (await ask(gw, {"cmd": "snapshot"}))["snapshot"]
    await ask(gw, {"cmd": "set_limit", "route": "a", "max_concurrency": 5, "max_queue": 6})
    s2 = (await ask(gw, {"cmd": "snapshot"}))["snapshot"]
    assert (route(s1, "a")["max_concurrency"], route(s1, "a")["max_queue"]) == (2, 10)
    assert (route(s2, "a")["max_concurrency"], route(s2, "a")["max_queue"]) == (5, 6)
    text = gw.config_path.read_text().replace("queue_timeout = 30", "queue_timeout = 12")
    gw.config_path.write_text(text.replace('path_prefix = "/b"', 'path_prefix = "/bee"'))
    assert (await ask(gw, {"cmd": "reload"}))["generation"] == 2
    s3 = (await ask(gw, {"cmd": "snapshot"}))["snapshot"]
    assert route(s3, "a")["queue_timeout"] == 12.0 and route(s3, "b")["path_prefix"] == "/bee"
    assert route(s3, "a")["max_concurrency"] == 2  # the reload ended the set_limit


async def test_histograms_on_request_and_not_stale(start_gateway, upstream):
    gw = await start_gateway(ROUTES.format(url=upstream.url))
    stats = gw.runtime.table.routes["c"].stats
    plain = (await ask(gw, {"cmd": "snapshot"}))["snapshot"]
    assert "latency_histogram" not in route(plain, "c")
    assert all("histogram" not in g for g in plain["gc"]["generations"])
    full = (await ask(gw, {"cmd": "snapshot", "histograms": True}))["snapshot"]
    assert route(full, "c")["latency_histogram"]["count"] == 0
    assert all("histogram" in g for g in full["gc"]["generations"])
    stats.responded(200, 0.003)
    full = (await ask(gw, {"cmd": "snapshot", "histograms": True}))["snapshot"]
    assert route(full, "c")["latency_histogram"]["count"] == 1
    assert route(full, "c")["latency_histogram"]["counts"][3] == 1  # 2.5 ms < 3 ms <= 5 ms
    plain = (await ask(gw, {"cmd": "snapshot"}))["snapshot"]
    assert "latency_histogram" not in route(plain, "c") and route(plain, "c")["codes"] == {"200": 1}


# ----------------------------------------------------------------------------- reuse
async def test_unchanged_routes_are_reused_busy_ones_rebuilt(start_gateway, upstream):
    """What the cache is for: a route whose figures did not change is the same object
    (its JSON encoded once); a busy one is new."""
    gw = await start_gateway(ROUTES.format(url=upstream.url))
    rt = gw.runtime
    s1 = snapshots.snapshot(rt)
    rt.table.routes["b"].stats.responded(200, 0.01)
    s2 = snapshots.snapshot(rt)
    assert route(s1, "a") is route(s2, "a") and route(s1, "c") is route(s2, "c")
    assert route(s1, "b") is not route(s2, "b")
    assert route_json(route(s1, "a")) is route_json(route(s2, "a"))
    # a consumer of the control socket never modifies them
    line = gw.control.build_line()
    assert "latency_histogram" in route(s2, "a")
    assert json.loads(line)["snapshot"]["routes"][0] == json.loads(route_json(route(s2, "a")))


async def test_subscribers_share_one_snapshot_per_tick(start_gateway, upstream):
    """1. three subscribers with the same interval 2. they read for about a second
    3. each gets every tick, but the gateway built about one snapshot per tick, not
    three."""
    gw = await start_gateway(ROUTES.format(url=upstream.url))
    control = gw.control
    real = control.controller
    built = 0

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def snapshot(self) -> dict[str, Any]:
            nonlocal built
            built += 1
            return real.snapshot()

    control.controller = Counting()  # type: ignore[assignment]
    conns = []
    for _ in range(3):
        reader, writer = await asyncio.open_unix_connection(str(gw.socket_path), limit=1 << 24)
        writer.write(b'{"cmd": "subscribe", "interval": 0.1}\n')
        assert json.loads(await reader.readline()) == {"ok": True}
        conns.append((reader, writer))
    await asyncio.sleep(0.05)
    built = 0
    counts = [0, 0, 0]

    async def read(i: int, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            assert json.loads(line)["ok"] is True
            counts[i] += 1

    tasks = [asyncio.ensure_future(read(i, r)) for i, (r, _) in enumerate(conns)]
    await asyncio.sleep(1.0)
    for t in tasks:
        t.cancel()
    for _, w in conns:
        w.close()
    assert min(counts) >= 6, counts
    assert built <= max(counts) + 2, (built, counts)
