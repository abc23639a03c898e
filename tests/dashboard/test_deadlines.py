"""Deadlines and priorities in the dashboard (gatewayd-dashboard(1)): the X-ray's line
of a route's estimates (service time, completions a second) and its 503 deadline,
503 preempted and 504 route_timeout totals, its waiters' class and the seconds left
of their deadlines; three more columns of the routes table when a route has such
refusals and the terminal has room; a gatewayd without those figures shows the
screen as before."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path
from typing import Any

from rich.console import Console

from dashboard.app import DashboardApp
from dashboard.messages import SnapshotReceived
from dashboard.model import Sample, reports_deadlines, route_views
from dashboard.widgets import (
    COLUMNS,
    DEADLINE_COLUMNS,
    NARROW,
    TUNNEL_COLUMNS,
    WIDE_429,
    XRay,
    estimates_text,
    layout,
    width_of,
    xray_table,
)

from ..builders import app_route
from ..conftest import wait_for
from .test_app import row
from .test_clients import drawn

HEADER = "X-Request-Timeout"
CLASS = "X-Priority"
REJECTED = {"queue_full": 0, "queue_timeout": 0}


def _route(name: str, **over: Any) -> dict[str, Any]:
    r = {"name": name, "in_flight": 1, "max_concurrency": 10, "queued": 0, "max_queue": 100, "requests": 100,
         "rejected": dict(REJECTED)}
    r.update(over)
    return r


def _snap(t: float, *routes: dict[str, Any]) -> dict[str, Any]:
    return {"pid": 7, "uptime_s": t, "time": t, "routes": list(routes)}


def test_route_views_read_the_reasons_and_estimates_and_leave_them_blank_from_an_older_gatewayd() -> None:
    [v] = route_views(Sample(_snap(1.0, _route("app")), 1.0), None)
    assert (v.deadline, v.preempted, v.route_timeout, v.deadlines_rps, v.service_ms, v.completion_rate) == (
        None, None, None, None, None, None)
    assert not reports_deadlines([v]) and estimates_text(v) is None

    def ruled(deadline: int) -> dict[str, Any]:
        return _route("app", rejected={**REJECTED, "deadline": deadline, "preempted": 1, "route_timeout": 0},
                      estimates={"completion_rate": 200.0, "service_ms": 100.0},
                      queued_by_priority={"critical": 1, "default": 0, "sheddable": 4})

    before, after = Sample(_snap(1.0, ruled(2)), 1.0), Sample(_snap(3.0, ruled(8)), 3.0)
    [v] = route_views(after, before)
    assert (v.deadline, v.preempted, v.route_timeout, v.deadlines_rps, v.service_ms, v.completion_rate) == (
        8, 1, 0, 3.0, 100.0, 200.0)
    assert reports_deadlines([v])
    line = estimates_text(v)
    assert line is not None and line.plain == "service 100ms · 200/s\ndeadline 8 · preempted 1"
    assert "bold red" in {str(s.style) for s in line.spans}  # rising
    [quiet] = route_views(Sample(_snap(1.0, _route("q", estimates={"completion_rate": 0.0, "service_ms": None})),
                                 1.0), None)
    assert estimates_text(quiet) is None  # nothing known, nothing refused: no line


def test_the_xray_lists_class_and_budget_only_where_they_say_something() -> None:
    def text(waiting: list[dict[str, Any]]) -> str:
        console = Console(width=100, record=True, file=io.StringIO())
        console.print(xray_table("app", waiting, len(waiting)))
        return console.export_text()

    old = [{"wait_ms": 500.0, "method": "GET", "path": "/a", "client": "10.0.0.1", "pid": 1}]
    assert text(old).split()[:5] == ["waited", "method", "path", "client", "500ms"]  # as before
    plain = [{**old[0], "priority": "default", "deadline_in": None}]
    assert text(plain) == text(old)
    ruled = [{**old[0], "priority": "critical", "deadline_in": 4.5},
             {**old[0], "wait_ms": 300.0, "priority": "sheddable", "deadline_in": None}]
    lines = text(ruled).splitlines()
    assert lines[0].split() == ["waited", "class", "left", "method", "path", "client"]
    assert lines[1].split()[:3] == ["500ms", "crit", "4.50s"] and lines[2].split()[:3] == ["300ms", "shed", "-"]


def test_the_deadline_columns_come_last_where_there_is_room() -> None:
    wide = width_of(WIDE_429) + width_of(TUNNEL_COLUMNS) + width_of(DEADLINE_COLUMNS)
    assert layout(wide, True, True, True)[0] == (*WIDE_429, *TUNNEL_COLUMNS, *DEADLINE_COLUMNS)
    assert layout(wide - 1, True, True, True)[0] == (*WIDE_429, *TUNNEL_COLUMNS)
    assert layout(width_of(COLUMNS) + width_of(DEADLINE_COLUMNS), False, False, True)[0] == (
        *COLUMNS, *DEADLINE_COLUMNS)
    assert layout(wide, True, True, False)[0] == (*WIDE_429, *TUNNEL_COLUMNS)
    assert layout(80, True, True, True)[0] == NARROW


async def test_wide_table_gets_the_deadline_columns_once_a_route_refuses() -> None:
    """1. 190 columns, a snapshot without the reasons: the wide layout as before 2. a
    route's 503 deadline, 503 preempted and 504 route_timeout totals: three more columns,
    blank on a route from an older gatewayd 3. at 80 columns the narrow layout."""
    app = DashboardApp(Path("/run/gatewayd/gatewayd.sock"), connect=False)
    async with app.run_test(size=(190, 40)) as pilot:
        app.post_message(SnapshotReceived(_snap(1.0, _route("app"), _route("old")), 1.0))
        await wait_for(lambda: "app" in app.table.rows)
        await pilot.pause()
        assert app.table.columns == COLUMNS
        ruled = _route("app", rejected={**REJECTED, "deadline": 4, "preempted": 2, "route_timeout": 1})
        app.post_message(SnapshotReceived(_snap(2.0, ruled, _route("old")), 2.0))
        await wait_for(lambda: app.table.columns == (*COLUMNS, *DEADLINE_COLUMNS))
        assert row(app, "app")[-3:] == ["4", "2", "1"] and row(app, "old")[-3:] == ["", "", ""]
        await pilot.resize_terminal(80, 24)
        await wait_for(lambda: app.table.columns == NARROW)


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


async def test_at_80x24_the_xray_says_estimates_refusals_classes_and_budgets(start_gateway, upstream) -> None:
    """A gatewayd with a route of one slot, deadline_header and priority_header, the
    dashboard at 80x24 on its control socket: 1. the route learns its service time
    (requests of 100 ms): the X-ray's first line says it and the completion rate
    2. a request holds the slot; a critical waiter with a 20 s budget and a sheddable
    one without: the X-ray lists them with their class and the seconds left (critical
    first) 3. a waiter with a 0.3 s budget leaves (503 deadline): the first line
    counts it."""
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1, max_queue=10, queue_timeout=10,
                                       deadline_header=HEADER, priority_header=CLASS))
    gate = gw.runtime.table.routes["app"].gate
    app = DashboardApp(gw.socket_path, interval=0.05)
    async with app.run_test(size=(80, 24)):
        await wait_for(lambda: "app" in app.table.rows, timeout=5)
        assert app.table.columns == NARROW
        xray = app.query_one(XRay)
        await wait_for(lambda: xray.border_title == "Queue X-ray: app", timeout=5)
        assert "nobody waiting" in drawn(xray) and "service" not in drawn(xray)

        async def learned() -> bool:
            await asyncio.gather(*(head_of(gw.port, get("/slow?ms=100")) for _ in range(3)))
            return bool(re.match(r"service \d+ms · [\d.]+/s\n", drawn(xray)))

        for _ in range(20):
            if await learned():
                break
        assert re.match(r"service \d+ms · [\d.]+/s\n", drawn(xray)), drawn(xray)

        holder = asyncio.ensure_future(head_of(gw.port, get("/slow?ms=5000")))
        await wait_for(lambda: gate.in_flight == 1)
        waiting = [asyncio.ensure_future(head_of(gw.port, get("/echo?s", f"{CLASS}: sheddable")))]
        await wait_for(lambda: gate.queued == 1)
        waiting.append(asyncio.ensure_future(head_of(gw.port, get("/echo?c", f"{CLASS}: critical",
                                                                  f"{HEADER}: 20"))))
        await wait_for(lambda: gate.queued == 2)

        def rows() -> list[list[str]]:
            lines = drawn(xray).splitlines()
            return [line.split() for line in lines[2:] if line.strip()]  # after the estimates and header

        await wait_for(lambda: len(rows()) == 2, timeout=5)
        shed, crit = rows()  # oldest first
        assert crit[1] == "crit" and re.fullmatch(r"(19\.\d|20\.0)s", crit[2]), crit
        assert shed[1:3] == ["shed", "-"], shed
        doomed = await head_of(gw.port, get("/echo?d", f"{HEADER}: 0.3"))
        assert b" 503 " in doomed.split(b"\r\n")[0]
        await wait_for(lambda: drawn(xray).splitlines()[1] == "deadline 1", timeout=5)
        for h in await asyncio.gather(holder, *waiting):
            assert h.startswith(b"HTTP/1.1 200 ")
