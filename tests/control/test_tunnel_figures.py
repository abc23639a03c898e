"""A route's WebSocket tunnels in the snapshot, the metrics and ``gatewayctl status``
(gatewayd(8) Snapshot fields, METRICS; SPEC §11): open now (summed over the
workers), the gateway-wide cap of a ``websocket = true`` route (0 on another),
opened since start (a worker that exited keeps its count), and the upgrades
refused at the cap as a reason of ``rejected``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import pytest
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest

from gatewayd.control import snapshot as snapshots
from gatewayd.control.merge import Retired, merge_route, retire
from gatewayd.control.prometheus import SnapshotCollector
from gatewayd.control.snapshot import export, present, route_order, runtime_info
from gatewayd.stats.metrics import RouteStats

from ..builders import app_route, free_port, route_toml, upstream_toml
from ..conftest import ROOT, wait_for, wait_for_sync


def route_export(tunnels: int, opened: int, full: int) -> dict[str, Any]:
    """Route ``ws`` of one worker, as ``export`` makes it from its counters."""
    stats = RouteStats()
    stats.tunnels, stats.tunnels_total, stats.tunnels_full = tunnels, opened, full
    counters: dict[str, Any] = dict(stats.export())
    counters["rejected"]["tunnels_full"] = full
    return {**counters, "tunnels": tunnels, "tunnels_total": opened, "in_flight": 0, "queued": 0,
            "queued_by_priority": {"critical": 0, "default": 0, "sheddable": 0},
            "estimates": {"completion_rate": 0.0, "service_ms": None},
            "limit": 5, "queue_limit": 5, "oldest_wait_ms": 0.0, "waiters": []}


def test_merge_sums_open_tunnels_and_keeps_the_opened_count_of_a_worker_that_exited():
    """Three workers with 2, 3 and 4 tunnels open: the route has 9; the first exits,
    its tunnels go with it (6 open) but what it opened and refused still counts."""
    exports: list[Any] = [{"routes": {"ws": route_export(n, 10 * n, n - 1)}, "upstreams": {}}
                          for n in (2, 3, 4)]
    merged = merge_route("ws", exports, None)
    assert (merged["tunnels"], merged["tunnels_total"], merged["rejected"]["tunnels_full"]) == (9, 90, 6)
    retired: Retired = {}
    retire(retired, exports[0])
    merged = merge_route("ws", exports[1:], retired)
    assert (merged["tunnels"], merged["tunnels_total"], merged["rejected"]["tunnels_full"]) == (7, 90, 6)
    retire(retired, exports[1])  # a second one exits: retired counts add up
    merged = merge_route("ws", exports[2:], retired)
    assert (merged["tunnels"], merged["tunnels_total"], merged["rejected"]["tunnels_full"]) == (4, 90, 6)


WS_ROUTES = (upstream_toml("app", servers=["{url}"])
             + route_toml("ws", "app", path_prefix="/ws", websocket=True, max_tunnels=7)
             + route_toml("plain", "app", path_prefix="/"))


def ws_routes(url: str) -> str:
    return WS_ROUTES.replace("{url}", url)


def route(snap: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in snap["routes"] if r["name"] == name)


async def test_snapshot_and_metrics_show_a_routes_tunnels(start_gateway, upstream):
    """1. a websocket route (max_tunnels 7) and a plain one: zeros, the cap only on the
    first 2. the route's counters move as the tunnel path records them 3. the
    snapshot shows them, equal to present() of a fresh export, and the metrics text
    has the gauge, the counter, the cap and tunnels_full among the rejected reasons."""
    gw = await start_gateway(ws_routes(upstream.url))
    snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
    ws, plain = route(snap, "ws"), route(snap, "plain")
    assert (ws["tunnels"], ws["max_tunnels"], ws["tunnels_total"], ws["rejected"]["tunnels_full"]) == (0, 7, 0, 0)
    assert (plain["tunnels"], plain["max_tunnels"], plain["tunnels_total"]) == (0, 0, 0)

    stats = gw.runtime.table.routes["ws"].stats
    stats.tunnels, stats.tunnels_total, stats.tunnels_full = 3, 5, 1
    snap = (await gw.command({"cmd": "snapshot", "histograms": True}))["snapshot"]
    ws = route(snap, "ws")
    assert (ws["tunnels"], ws["max_tunnels"], ws["tunnels_total"], ws["rejected"]["tunnels_full"]) == (3, 7, 5, 1)
    slow = present(runtime_info(gw.runtime), [export(gw.runtime)], route_order(gw.runtime))
    fast = snapshots.snapshot(gw.runtime)
    for name in ("ws", "plain"):
        for key in ("tunnels", "max_tunnels", "tunnels_total", "rejected"):
            assert route(fast, name)[key] == route(slow, name)[key], (name, key)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))
    text = generate_latest(registry).decode()
    for line in ('gatewayd_tunnels{route="ws"} 3.0', 'gatewayd_tunnels{route="plain"} 0.0',
                 'gatewayd_tunnels_total{route="ws"} 5.0', 'gatewayd_route_max_tunnels{route="ws"} 7.0',
                 'gatewayd_route_max_tunnels{route="plain"} 0.0',
                 'gatewayd_rejected_total{reason="tunnels_full",route="ws"} 1.0',
                 "# TYPE gatewayd_tunnels gauge", "# TYPE gatewayd_tunnels_total counter"):
        assert line in text.splitlines(), line


async def gatewayctl_status(config: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gatewayd.control.cli", "--config", config, "status",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT))
    out, err = await proc.communicate()
    assert (proc.returncode, err) == (0, b"")
    return out.decode()


async def test_gatewayctl_status_shows_tunnels_of_websocket_routes_only(start_gateway, upstream):
    """``status`` has a tunnels line under a websocket route (open/cap, opened, refused
    at the cap), none under another route."""
    gw = await start_gateway(ws_routes(upstream.url))
    stats = gw.runtime.table.routes["ws"].stats
    stats.tunnels, stats.tunnels_total, stats.tunnels_full = 3, 12, 2
    lines = (await gatewayctl_status(str(gw.config_path))).splitlines()
    tunnels = [line for line in lines if "tunnels" in line]
    assert tunnels == ["  tunnels 3/7  opened 12  full 2"]
    at = lines.index(tunnels[0])
    assert lines[at - 2].startswith("ws ") and lines[at + 1].startswith("plain ")


def test_with_workers_the_cap_is_gateway_wide(gateway_process):
    """Two workers each enforce a share of max_tunnels 7; the snapshot (merged by the
    master) and the metrics say the configured 7, and zeros while nothing is open."""
    gp = gateway_process(app_route(f"http://127.0.0.1:{free_port()}", websocket=True, max_tunnels=7), workers=2)

    def merged() -> dict[str, Any] | None:
        snap = gp.command({"cmd": "snapshot"})["snapshot"]
        return snap if len([w for w in snap["workers"] if w["pid"]]) == 2 else None

    snap = wait_for_sync(merged, timeout=20)
    (r,) = snap["routes"]
    assert (r["tunnels"], r["max_tunnels"], r["tunnels_total"], r["rejected"]["tunnels_full"]) == (0, 7, 0, 0)


# ----------------------------------------------------------------------------- real tunnels
def metrics_text(gw: Any) -> str:
    """What the metrics listener serves, from this gateway's snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshots.snapshot(gw.runtime)))
    return generate_latest(registry).decode()


async def test_open_tunnels_are_counted_and_closed_ones_leave_the_gauge(start_gateway, ws_upstream):
    """1. a websocket route to an aiohttp WebSocket echo upstream 2. three clients
    open tunnels and get an echo through each 3. the snapshot says 3 open, 3
    opened, and so do gatewayd_tunnels and gatewayd_tunnels_total 4. the clients
    close: the gauge goes back to 0, the counter stays at 3."""
    gw = await start_gateway(app_route(ws_upstream.url, websocket=True, max_tunnels=10))
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(f"{gw.url}/echo") for _ in range(3)]
        for i, ws in enumerate(sockets):
            await ws.send_str(f"hello {i}")
            assert (await ws.receive(timeout=5)).data == f"hello {i}"
        snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
        (r,) = snap["routes"]
        assert (r["tunnels"], r["max_tunnels"], r["tunnels_total"], r["rejected"]["tunnels_full"]) == (3, 10, 3, 0)
        assert r["in_flight"] == 0  # the slots went back with the 101s
        lines = metrics_text(gw).splitlines()
        assert 'gatewayd_tunnels{route="app"} 3.0' in lines
        assert 'gatewayd_tunnels_total{route="app"} 3.0' in lines
        assert "  tunnels 3/10  opened 3  full 0" in (await gatewayctl_status(str(gw.config_path))).splitlines()
        for ws in sockets:
            await ws.close()

    def closed() -> bool:
        (r,) = snapshots.snapshot(gw.runtime)["routes"]
        return r["tunnels"] == 0 and r["tunnels_total"] == 3

    await wait_for(closed, timeout=5)
    (r,) = (await gw.command({"cmd": "snapshot"}))["snapshot"]["routes"]
    assert (r["tunnels"], r["tunnels_total"]) == (0, 3)
    lines = metrics_text(gw).splitlines()
    assert 'gatewayd_tunnels{route="app"} 0.0' in lines and 'gatewayd_tunnels_total{route="app"} 3.0' in lines


async def test_an_upgrade_over_the_cap_is_shed_and_counted(start_gateway, ws_upstream):
    """max_tunnels 2: two tunnels open, the third upgrade gets 503 with
    X-Gatewayd-Reason: tunnels_full; the snapshot counts it under rejected and the
    metrics as a reason of gatewayd_rejected_total."""
    gw = await start_gateway(app_route(ws_upstream.url, websocket=True, max_tunnels=2))
    async with aiohttp.ClientSession() as session:
        sockets = [await session.ws_connect(f"{gw.url}/echo") for _ in range(2)]
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{gw.url}/echo")
        assert refused.value.status == 503
        assert refused.value.headers is not None
        assert refused.value.headers.get("X-Gatewayd-Reason") == "tunnels_full"
        (r,) = (await gw.command({"cmd": "snapshot"}))["snapshot"]["routes"]
        assert (r["tunnels"], r["max_tunnels"], r["tunnels_total"], r["rejected"]["tunnels_full"]) == (2, 2, 2, 1)
        assert 'gatewayd_rejected_total{reason="tunnels_full",route="app"} 1.0' in metrics_text(gw).splitlines()
        for ws in sockets:
            await ws.close()


async def echoes(ws: aiohttp.ClientWebSocketResponse) -> bool:
    """Whether the tunnel still carries an echo (False once its worker is gone)."""
    try:
        await ws.send_str("ping")
        return (await ws.receive(timeout=5)).data == "ping"
    except (ConnectionError, aiohttp.ClientError):
        return False


async def test_with_workers_tunnels_sum_and_a_dead_workers_opened_count_stays(gateway_process, ws_upstream):
    """1. two workers, six tunnels: the master's snapshot says 6 open, 6 opened
    2. one worker is killed: its tunnels end with it; once it is replaced the
    snapshot's open tunnels are those that still echo, and the opened count stays 6."""
    gp = await asyncio.to_thread(gateway_process, app_route(ws_upstream.url, websocket=True, max_tunnels=100),
                                 workers=2)
    listen = f"http://{gp.command({'cmd': 'snapshot'})['snapshot']['listen'][0]}"

    def tunnel_figures() -> tuple[int, int, list[int]]:
        snap = gp.command({"cmd": "snapshot"})["snapshot"]
        (r,) = snap["routes"]
        return r["tunnels"], r["tunnels_total"], [w["pid"] for w in snap["workers"] if w["pid"]]

    async def until(predicate: Any) -> tuple[int, int, list[int]]:
        return await asyncio.to_thread(wait_for_sync, lambda: (lambda f: f if predicate(f) else None)(
            tunnel_figures()), 20)

    pids = (await until(lambda f: len(f[2]) == 2))[2]
    async with aiohttp.ClientSession() as session:
        # six: the kernel spreads connections over the workers (SO_REUSEPORT), so the
        # killed one almost surely holds some; the figures hold however they fell
        sockets = [await session.ws_connect(f"{listen}/echo") for _ in range(6)]
        assert all([await echoes(ws) for ws in sockets])
        await until(lambda f: f[:2] == (6, 6))
        os.kill(pids[0], signal.SIGKILL)
        await until(lambda f: len(f[2]) == 2 and pids[0] not in f[2])  # replaced: its tunnels are gone
        alive = sum([await echoes(ws) for ws in sockets])
        after = await until(lambda f: f[0] == alive)
        assert after[1] == 6  # opened since start: the dead worker's count kept
        for ws in sockets:
            await ws.close()
    await until(lambda f: f[0] == 0 and f[1] == 6)
