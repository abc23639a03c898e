"""WebSocket tunnels in the dashboard (gatewayd-dashboard(1)): a route that carries
WebSocket shows its open tunnels against its cap and its upgrades refused at the
cap (503 tunnels_full) in the X-ray at any width, and in two more columns of the
routes table when the terminal has room; a gatewayd without those figures (or
without a WebSocket route) shows the screen as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dashboard.app import DashboardApp
from dashboard.messages import SnapshotReceived
from dashboard.model import Sample, reports_tunnels, route_views
from dashboard.widgets import COLUMNS, NARROW, TUNNEL_COLUMNS, WIDE_429, XRay, tunnels_text

from ..builders import route_toml, upstream_toml
from ..conftest import wait_for
from ..proxy.wsupstream import WsUpstream
from .test_app import press, row
from .test_clients import drawn

WIDE = (190, 40)  # room for the wide layout, the 429 columns and the two tunnel columns


def _route(name: str, **over: Any) -> dict[str, Any]:
    r = {"name": name, "in_flight": 1, "max_concurrency": 10, "queued": 0, "max_queue": 100, "requests": 100,
         "rejected": {"queue_full": 0, "queue_timeout": 0}}
    r.update(over)
    return r


def _snap(t: float, *routes: dict[str, Any]) -> dict[str, Any]:
    return {"pid": 7, "uptime_s": t, "time": t, "routes": list(routes)}


def test_route_views_read_tunnels_and_leave_them_blank_from_an_older_gatewayd() -> None:
    old = Sample(_snap(1.0, _route("app")), 1.0)
    [v] = route_views(old, None)
    assert (v.tunnels, v.max_tunnels, v.tunnels_full, v.tunnels_full_rps, v.websocket) == (None, None, None, None,
                                                                                          False)
    assert not reports_tunnels([v]) and tunnels_text(v) is None

    def ws(t: float, full: int) -> dict[str, Any]:
        return _route("ws", tunnels=3, max_tunnels=7, tunnels_total=9,
                      rejected={"queue_full": 0, "queue_timeout": 0, "tunnels_full": full})

    plain = _route("plain", tunnels=0, max_tunnels=0, tunnels_total=0)
    before, after = Sample(_snap(1.0, ws(1.0, 2), plain), 1.0), Sample(_snap(3.0, ws(3.0, 6), plain), 3.0)
    ws_view, plain_view = route_views(after, before)
    assert (ws_view.tunnels, ws_view.max_tunnels, ws_view.tunnels_full, ws_view.tunnels_full_rps) == (3, 7, 6, 2.0)
    assert ws_view.websocket and not plain_view.websocket and reports_tunnels([ws_view, plain_view])
    line = tunnels_text(ws_view)
    assert line is not None and line.plain == "tunnels 3/7 · full 6"
    assert tunnels_text(plain_view) is None


async def test_wide_table_gets_tunnel_columns_only_with_a_websocket_route() -> None:
    """1. 190 columns, a snapshot without tunnel figures: the wide layout as before
    2. a websocket route appears: two more columns, its tunnels/cap and 503s at the
    cap, blank on the other route 3. with the 429 columns too, the tunnel columns
    come after them 4. at 140 columns no room: the wide layout, at 80 the narrow one."""
    app = DashboardApp(Path("/run/gatewayd/gatewayd.sock"), connect=False)
    async with app.run_test(size=WIDE) as pilot:
        app.post_message(SnapshotReceived(_snap(1.0, _route("app")), 1.0))
        await wait_for(lambda: "app" in app.table.rows)
        await pilot.pause()
        assert app.table.columns == COLUMNS
        ws = _route("ws", tunnels=3, max_tunnels=7, rejected={"queue_full": 0, "queue_timeout": 0, "tunnels_full": 2})
        app.post_message(SnapshotReceived(_snap(2.0, _route("app", max_tunnels=0, tunnels=0), ws), 2.0))
        await wait_for(lambda: app.table.columns == (*COLUMNS, *TUNNEL_COLUMNS))
        assert row(app, "ws")[-2:] == ["3/7", "2"]
        assert row(app, "app")[-2:] == ["", ""]
        refusing = _route("app", max_tunnels=0, tunnels=0, rejected={"queue_full": 0, "queue_timeout": 0,
                                                                      "rate_limited": 5, "client_queue_full": 1})
        app.post_message(SnapshotReceived(_snap(3.0, refusing, ws), 3.0))
        await wait_for(lambda: app.table.columns == (*WIDE_429, *TUNNEL_COLUMNS))
        assert row(app, "app")[-4:] == ["5", "1", "", ""] and row(app, "ws")[-2:] == ["3/7", "2"]
        await pilot.resize_terminal(140, 40)
        await wait_for(lambda: app.table.columns == COLUMNS)
        await pilot.resize_terminal(80, 24)
        await wait_for(lambda: app.table.columns == NARROW)


async def test_at_80x24_the_xray_says_the_selected_routes_tunnels(start_gateway, upstream) -> None:
    """A gatewayd with a plain route and a websocket route (max_tunnels 3) to an aiohttp
    WebSocket echo upstream, the dashboard at 80x24 on its control socket: the narrow
    table as always; the cursor on ws, the X-ray's first line says its tunnels as
    real ones open (two of three); at the cap, one more upgrade refused: 3/3 in red
    and full 1; on the plain route, no such line."""
    ws_up = WsUpstream()
    await ws_up.start()
    gw = await start_gateway(upstream_toml("app", servers=[upstream.url]) + upstream_toml("ws", servers=[ws_up.url])
                             + route_toml("plain", "app", path_prefix="/")
                             + route_toml("ws", "ws", path_prefix="/echo", websocket=True, max_tunnels=3))
    app = DashboardApp(gw.socket_path, interval=0.05)
    try:
        async with aiohttp.ClientSession() as session, app.run_test(size=(80, 24)):
            await wait_for(lambda: "ws" in app.table.rows, timeout=5)
            assert app.table.columns == NARROW
            xray = app.query_one(XRay)
            await wait_for(lambda: xray.border_title == "Queue X-ray: plain", timeout=5)
            assert "nobody waiting" in drawn(xray) and "tunnels" not in drawn(xray)
            press(app, "down")
            await wait_for(lambda: xray.border_title == "Queue X-ray: ws", timeout=5)
            await wait_for(lambda: drawn(xray).splitlines()[:2] == ["tunnels 0/3", "ws: nobody waiting"], timeout=5)
            sockets = [await session.ws_connect(f"{gw.url}/echo") for _ in range(2)]
            await wait_for(lambda: drawn(xray).startswith("tunnels 2/3\n"), timeout=5)
            sockets.append(await session.ws_connect(f"{gw.url}/echo"))
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await session.ws_connect(f"{gw.url}/echo")
            await wait_for(lambda: drawn(xray).startswith("tunnels 3/3 · full 1\n"), timeout=5)
            assert "bold red" in {str(s.style) for s in xray._shown[-1].spans}
            for ws in sockets:
                await ws.close()
            await wait_for(lambda: drawn(xray).startswith("tunnels 0/3 · full 1\n"), timeout=5)
    finally:
        await ws_up.stop()
