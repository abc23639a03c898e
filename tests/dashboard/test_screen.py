"""The main screen as an SVG, compared with the reviewed one at docs/dashboard.svg.

The snapshots come from a fixed scenario (no socket, no clock: every time shown
is a snapshot's, in UTC), so the picture is the same on every run. After a
deliberate change of the screen, look at the new picture and store it:

    GATEWAYD_DASHBOARD_SVG_UPDATE=1 python -m pytest tests/dashboard/test_screen.py

(pytest-textual-snapshot would do the same, but pins pytest < 9.)
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.events import Key

from dashboard.app import DashboardApp
from dashboard.messages import Connected, QueueReceived, SnapshotReceived

from ..conftest import ROOT, wait_for

REFERENCE = ROOT / "docs" / "dashboard.svg"
T0 = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC
STEP = 0.25


def _route(name: str, limit: int, max_queue: int, **figures: Any) -> dict[str, Any]:
    r: dict[str, Any] = {"name": name, "upstream": name, "in_flight": 0, "max_concurrency": limit, "queued": 0,
                         "max_queue": max_queue, "oldest_wait_ms": 0.0, "waiters": [], "requests": 0,
                         "rejected": {"queue_full": 0, "queue_timeout": 0}, "cancelled": 0, "upstream_errors": 0,
                         "latency_ms": {"p50": None, "p90": None, "p99": None}}
    r.update(figures)
    return r


def _server(url: str, state: str, in_flight: int, failures: int = 0) -> dict[str, Any]:
    return {"url": url, "weight": 1, "state": state, "healthy": state == "up", "in_flight": in_flight,
            "requests": 3000, "failures": failures, "last_error": "upstream_connect" if failures else None}


def _waiters(n: int, oldest_ms: float) -> list[dict[str, Any]]:
    return [{"wait_ms": round(oldest_ms - i * 73.5, 3), "method": "POST" if i % 3 else "GET",
             "path": f"/checkout/cart/{1000 + i}?step=pay", "client": f"203.0.113.{10 + i}", "pid": 4242}
            for i in range(n)]


def scenario() -> Iterator[dict[str, Any]]:
    """40 snapshots, 4 a second: busy, saturated, idle and failing routes; a limit
    change, a failed reload, then a reload that changes two things."""
    reload: dict[str, Any] | None = None
    generation, api_limit = 1, 100
    for i in range(40):
        t = T0 + i * STEP
        if i == 10:
            api_limit = 120
        if i == 18:
            reload = {"ok": False, "time": t - 0.1, "changes": [],
                      "error": "config.toml:41: routes[2].max_queue: expected an integer >= 0, got -5"}
        if i == 30:
            generation += 1
            reload = {"ok": True, "time": t - 0.1, "error": None,
                      "changes": ["route checkout: max_queue 40 -> 50", "upstream legacy: read_timeout 30.0 -> 10.0"]}
        wave = (i % 8) / 8
        routes = [
            _route("api", api_limit, 1000, in_flight=30 + i % 9, requests=50_000 + i * 212 + i % 3,
                   latency_ms={"p50": 12.5 + wave, "p90": 30.0, "p99": 48.0 + 3 * wave}),
            _route("checkout", 8, 50, in_flight=8, queued=23, oldest_wait_ms=1810.0 + i * 12.5,
                   waiters=_waiters(5, 1810.0 + i * 12.5), requests=9_000 + i * 9,
                   rejected={"queue_full": 140 + i, "queue_timeout": 12 + i // 8}, cancelled=7,
                   latency_ms={"p50": 340.0, "p90": 900.0, "p99": 1950.0}),
            _route("images", 2, 8, in_flight=2, queued=3, oldest_wait_ms=420.0, requests=1_200 + i // 2,
                   latency_ms={"p50": 95.0, "p90": 150.0, "p99": 240.0}),
            _route("legacy", 20, 100, in_flight=1, requests=3_000 + i * 4, upstream_errors=60 + i,
                   latency_ms={"p50": 30.1, "p90": 800.0, "p99": 2500.0}),
            _route("search", 50, 200, in_flight=4 + i % 3, requests=20_000 + i * 60,
                   latency_ms={"p50": 21.0, "p90": 40.0, "p99": 77.5}, cancelled=3),
            _route("static", 200, 0, requests=12_345),
        ]
        yield {"version": "0.1.0", "pid": 4242, "uptime_s": 3723.0 + i * STEP, "time": t,
               "config_path": "/etc/gatewayd/config.toml", "generation": generation, "last_reload": reload,
               "connections": 180 + i % 5, "tasks": 240 + i % 7,
               "loop_lag_ms": {"last": 0.4 + (i % 5) * 0.3, "max": 12.0},
               "gc": {"collections": [5210 + i, 473, 12], "pauses": 5695 + i,
                      "pause_ms": {"last": 0.08, "max": 18.4, "total": 912.0 + i * 0.6}},
               "rss_bytes": 96_468_992, "routes": routes, "workers": [{"pid": 4242}],
               "upstreams": [{"name": "legacy", "balance": "round_robin", "retried": 3, "no_healthy_server": 0,
                              "servers": [_server("http://10.0.0.7:8080", "up", 1),
                                          _server("http://10.0.0.8:8080", "ejected" if i >= 20 else "up", 0,
                                                  failures=60 + i)]}],
               "unknown_future_field": {"ignored": True}}


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


async def test_main_screen_matches_the_reviewed_svg(utc: None, tmp_path: Path) -> None:
    """1. connected 2. 40 snapshots 3. sorted by req/s 4. the cursor on checkout,
    its whole queue in the X-ray 5. the SVG equals docs/dashboard.svg."""
    app = DashboardApp(Path("/run/gatewayd/gatewayd.sock"), connect=False)
    async with app.run_test(size=(140, 40)) as pilot:
        app.post_message(Connected({"ok": True, "version": "0.1.0", "protocol": 1, "pid": 4242}, T0 - 1.0))
        for i, snap in enumerate(scenario()):
            app.post_message(SnapshotReceived(snap, 1000.0 + i * STEP))
        for key in ("s", "s", "s", "s"):
            app.post_message(Key(key, key))
        await wait_for(lambda: app.last is not None and app.last.snap["time"] == T0 + 39 * STEP)
        await wait_for(lambda: app.sort_column == "served_rps")
        for _ in range(app.table.order.index("checkout") - app.table.cursor):
            app.post_message(Key("down", None))
        await wait_for(lambda: app.table.selected == "checkout")
        app.post_message(QueueReceived("checkout", _waiters(23, 2297.5)))
        await pilot.pause()
        svg = app.export_screenshot()
    if os.environ.get("GATEWAYD_DASHBOARD_SVG_UPDATE"):
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(svg)
    got = tmp_path / "dashboard.svg"
    got.write_text(svg)
    assert REFERENCE.exists(), f"no reviewed screen yet: look at {got}, then store it (see this module's docstring)"
    assert svg == REFERENCE.read_text(), f"the screen changed: compare {got} with {REFERENCE}"


def _many(t: float, bump: int) -> dict[str, Any]:
    routes = [_route(f"r{i:03d}", 50, 100, requests=1000 + i * bump, in_flight=i % 7) for i in range(200)]
    return {"pid": 1, "uptime_s": t - T0 + 10, "time": t, "routes": routes}


async def test_cursor_and_scroll_survive_updates_and_reordering() -> None:
    """1. 200 routes 2. page down twice and a row further: the cursor on a route far
    down 3. new figures: cursor, route and scroll offset unchanged, only changed rows
    kept current 4. sorted by req/s, which reverses the order: the cursor stays on
    its route, scrolled into view."""
    app = DashboardApp(Path("/run/gatewayd/gatewayd.sock"), connect=False)
    async with app.run_test(size=(140, 40)) as pilot:
        app.post_message(SnapshotReceived(_many(T0, 1), 1000.0))
        await wait_for(lambda: len(app.table.order) == 200)
        for key in ("pagedown", "pagedown", "down"):
            app.post_message(Key(key, None))
        await pilot.pause()
        # scrolling the cursor into view happens on a later refresh
        await wait_for(lambda: app.table.cursor > 30 and app.table.scroll_offset.y > 0)
        picked, cursor, scroll = app.table.selected, app.table.cursor, app.table.scroll_offset
        app.post_message(SnapshotReceived(_many(T0 + 1, 2), 1001.0))
        await wait_for(lambda: app.last is not None and app.last.snap["time"] == T0 + 1)
        await pilot.pause()
        assert (app.table.selected, app.table.cursor, app.table.scroll_offset) == (picked, cursor, scroll)
        assert app.table.rows[picked].rps == float(picked[1:]) + 0.0  # r042: 42 more requests in 1 s
        for key in ("s", "s", "s", "s"):  # by req/s: r199 first, r000 last
            app.post_message(Key(key, None))
        await wait_for(lambda: app.sort_column == "served_rps")
        await pilot.pause()
        assert app.table.selected == picked and app.table.order[0] == "r199"
        top = app.table.scroll_offset.y
        assert top <= app.table.cursor < top + app.table.size.height - 1
