"""gatewayd-dashboard, headless (App.run_test + Pilot), against a real gatewayd
under real traffic: figures change, keys act on the daemon, the queue X-ray
lists waiters, and the dashboard survives the daemon going away and coming back."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from textual.events import Key
from textual.geometry import Region
from textual.widgets import Input, Label

from dashboard.app import DashboardApp
from dashboard.panes import LimitScreen, UpstreamPane
from dashboard.routetable import RouteTable
from dashboard.trends import Trends
from dashboard.widgets import EventPane, HelpScreen, StatusBar, Summary, XRay

from ..builders import free_port
from ..conftest import wait_for

SIZE = (140, 40)


def body(upstream_url: str, slow_queue: int = 20) -> str:
    return f"""
        [upstreams.app]
        servers = ["{upstream_url}"]

        [[routes]]
        name = "api"
        path_prefix = "/"
        upstream = "app"
        max_concurrency = 4
        max_queue = 50

        [[routes]]
        name = "slow"
        path_prefix = "/slow"
        upstream = "app"
        max_concurrency = 1
        max_queue = {slow_queue}
        queue_timeout = 10.0
    """


@contextlib.asynccontextmanager
async def traffic(url: str, path: str = "/echo", concurrency: int = 4) -> AsyncIterator[list[int]]:
    """Requests in a loop until the block ends; yields a one-item list counting answers."""
    done = [0]

    async def client(session: aiohttp.ClientSession) -> None:
        while True:
            async with session.get(url + path) as r:
                await r.read()
            done[0] += 1

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(concurrency)]
        try:
            yield done
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


KEY_CHARS = {"plus": "+", "minus": "-", "question_mark": "?", "escape": None, "down": None, "up": None,
             "backspace": None, "tab": None, "enter": "\r"}


def press(app: DashboardApp, *keys: str) -> None:
    """Key presses as the terminal driver posts them. (Pilot.press waits for the whole
    process to go idle, up to 2 s a key: never, with a gateway and its traffic in it.)"""
    for key in keys:
        app.post_message(Key(key, KEY_CHARS.get(key, key)))


def table_text(app: DashboardApp) -> str:
    """The routes table as drawn (border, header and rows)."""
    table = app.query_one(RouteTable)
    return "\n".join(s.text for s in table.render_lines(Region(0, 0, table.size.width, table.size.height)))


def row(app: DashboardApp, name: str) -> list[str]:
    table = app.query_one(RouteTable)
    return [text for text, _ in table.cells_of(table.rows[name])]


def events(app: DashboardApp) -> str:
    return "\n".join(e.text for e in app.query_one(EventPane).events)


def status(app: DashboardApp) -> str:
    return app.query_one(StatusBar).text


async def test_live_figures_and_keys_act_on_the_daemon(start_gateway, upstream, tmp_path: Path) -> None:
    """1. traffic on route api 2. both routes show, api's req/s above 0 3. its figures
    change between updates 4. `+` raises api's max_concurrency in the daemon, `-`
    lowers it 5. `r` after an edit: generation 2, the change in the event pane 6. `r`
    on a broken file: the error in the event pane, nothing changed 7. `s` sorts by
    in-flight 8. `p` freezes the table while snapshots keep coming, `p` resumes
    9. `?` opens the help, Esc closes it 10. `q` quits."""
    gw = await start_gateway(body(upstream.url))
    app = DashboardApp(gw.socket_path, interval=0.1)
    async with traffic(gw.url) as done, app.run_test(size=SIZE) as pilot:
        await wait_for(lambda: app.last is not None and status(app).startswith(" ● connected"), timeout=10)
        await wait_for(lambda: done[0] > 20 and "api" in app.query_one(RouteTable).rows
                       and row(app, "api")[4] not in ("", "0"), timeout=10)
        text = table_text(app)
        assert "api" in text and "slow" in text and "In flight/limit" in text
        first = app.last
        await wait_for(lambda: app.last is not first and app.last.snap["routes"][0]["requests"]
                       > first.snap["routes"][0]["requests"], timeout=5)
        assert app.query_one(RouteTable).selected == "api"

        press(app, "plus")
        await wait_for(lambda: gw.runtime.limits("api") == (5, 50), timeout=5)
        await wait_for(lambda: row(app, "api")[1].endswith("/5"), timeout=5)
        press(app, "minus", "minus")
        await wait_for(lambda: gw.runtime.limits("api") == (3, 50), timeout=5)
        await wait_for(lambda: "limit api: max_concurrency 5 -> 3" in events(app)
                       or "limit api: max_concurrency 4 -> 3" in events(app), timeout=5)

        gw.config_path.write_text(gw.config_path.read_text().replace("max_queue = 20", "max_queue = 30"))
        press(app, "r")
        await wait_for(lambda: gw.runtime.generation == 2, timeout=5)
        await wait_for(lambda: "reload ok, generation 2: route api: max_concurrency 3 (set_limit) -> 4; "
                               "route slow: max_queue 20 -> 30" in events(app), timeout=5)
        assert "generation 2" in app.query_one(Summary).text.plain

        gw.config_path.write_text(gw.config_path.read_text() + "\n[[routes]]\nname = 42\n")
        press(app, "r")
        await wait_for(lambda: "reload FAILED" in events(app), timeout=5)
        assert gw.runtime.generation == 2

        press(app, "s", "s")
        await wait_for(lambda: app.sort_column == "queued", timeout=5)
        press(app, "S")
        await wait_for(lambda: app.sort_reverse, timeout=5)

        press(app, "p")
        await wait_for(lambda: app.paused and "PAUSED" in status(app), timeout=5)
        await pilot.pause()
        frozen, seen = table_text(app), app.last
        await wait_for(lambda: app.last is not seen and app.last.snap["routes"][0]["requests"]
                       > seen.snap["routes"][0]["requests"], timeout=5)
        assert table_text(app) == frozen
        press(app, "p")
        await wait_for(lambda: not app.paused and table_text(app) != frozen, timeout=5)

        press(app, "question_mark")
        await wait_for(lambda: isinstance(app.screen, HelpScreen), timeout=5)
        press(app, "escape")
        await wait_for(lambda: not isinstance(app.screen, HelpScreen), timeout=5)

        press(app, "q")
        await wait_for(lambda: not app.is_running, timeout=5)
    assert app.return_code == 0


async def test_queue_xray_lists_the_waiters_of_the_selected_route(start_gateway, upstream) -> None:
    """1. route slow (one slot) gets 8 requests of 3 s: 1 in flight, 7 wait 2. the
    cursor goes to slow 3. the X-ray lists all 7 waiters (more than the snapshot's
    summary of 5: the `queue` command), oldest first 4. the table shows 7/20 queued."""
    gw = await start_gateway(body(upstream.url))
    app = DashboardApp(gw.socket_path, interval=0.1)
    async with traffic(gw.url, "/slow/x?ms=3000", concurrency=8), app.run_test(size=SIZE):
        await wait_for(lambda: len(gw.runtime.table.routes["slow"].gate.waiters) == 7, timeout=10)
        await wait_for(lambda: "slow" in app.query_one(RouteTable).rows, timeout=5)
        press(app, "down")
        await wait_for(lambda: app.query_one(RouteTable).selected == "slow", timeout=5)
        xray = app.query_one(XRay)
        await wait_for(lambda: xray.shown_waiters() == 7, timeout=5)
        assert xray.border_title == "Queue X-ray: slow"
        waits = [w["wait_ms"] for w in app.full_queue[1]]  # type: ignore[index]
        assert waits == sorted(waits, reverse=True)
        assert row(app, "slow")[2] == "7/20"


async def test_waits_for_the_daemon_then_survives_a_restart(gateway_process, tmp_path: Path) -> None:
    """1. the dashboard starts first: it says it waits for the socket 2. gatewayd
    starts: data 3. gatewayd stops: DISCONNECTED, the event pane says the
    connection was lost, the last data stays 4. gatewayd starts again: data within
    seconds, the restart in the event pane, the trend history kept."""
    config = tmp_path / "gatewayd.toml"
    app = DashboardApp(tmp_path / "gw.sock", interval=0.1)
    async with app.run_test(size=SIZE):
        await wait_for(lambda: "WAITING for the control socket" in status(app), timeout=5)
        assert "no socket file" in status(app)
        gp = await asyncio.to_thread(gateway_process, """
            [upstreams.demo]
            handler = "gatewayd.handlers:simulated_io"

            [[routes]]
            name = "demo"
            upstream = "demo"
        """, shutdown_timeout=0.5)
        assert gp.config_path == config
        await wait_for(lambda: app.last is not None and status(app).startswith(" ● connected"), timeout=10)
        pid = app.last.snap["pid"]
        await wait_for(lambda: len(app.history.values("rps")) >= 5, timeout=5)

        await asyncio.to_thread(gp.stop)
        await wait_for(lambda: "DISCONNECTED" in status(app), timeout=5)
        assert "connection lost" in events(app)
        assert "STALE" in str(app.query_one(RouteTable).border_title)
        kept = len(app.history.values("rps"))

        await asyncio.to_thread(gp.start)
        await wait_for(lambda: status(app).startswith(" ● connected") and app.last.snap["pid"] != pid, timeout=10)
        assert "connection restored" in events(app) and "gatewayd restarted" in events(app)
        assert len(app.history.values("rps")) >= kept
        assert "demo" in table_text(app)


async def test_odd_snapshots_show_blanks_never_crash(tmp_path: Path) -> None:
    """A control socket that answers with fields missing, of the wrong type, or
    unknown: the dashboard shows what it can and leaves the rest blank."""
    answers = iter([
        {},
        {"pid": "x", "routes": [{"name": "r1", "in_flight": None, "latency_ms": "fast", "brand_new": [1]},
                                {"nameless": True}, 7], "gc": [], "loop_lag_ms": None, "workers": "many"},
        {"pid": 9, "time": 5.0, "routes": [{"name": "r1", "requests": 10, "max_concurrency": 2, "in_flight": 1}],
         "last_reload": {"ok": False, "error": None}, "future": {"nested": {"deep": 1}}},
    ])
    last: dict[str, Any] = {}
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while line := await reader.readline():
            cmd = json.loads(line)["cmd"]
            if cmd == "hello":
                answer: dict[str, Any] = {"ok": True, "version": "9.9", "protocol": 1, "pid": 9}
            else:
                last["snap"] = next(answers, last.get("snap"))
                answer = {"ok": True, "snapshot": last["snap"]}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(tmp_path / "odd.sock"))
    app = DashboardApp(tmp_path / "odd.sock", interval=0.05)
    try:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(lambda: app.last is not None and app.last.snap.get("pid") == 9, timeout=5)
            await pilot.pause()
            assert row(app, "r1")[1].endswith("1/2")
            assert row(app, "r1")[5:] == ["", "", "", "", "", "", ""]  # shed/s to Up.err
            assert "FAILED" in app.query_one(Summary).text.plain
            press(app, "plus", "r")  # commands to a daemon that ignores them: no crash
            await pilot.pause()
            assert app.is_running
    finally:
        server.close()
        for w in writers:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
        await server.wait_closed()


def notices(app: DashboardApp) -> int:
    """How many toasts are up."""
    return len(app._notifications)


async def test_xray_follows_the_most_pressed_route_until_the_operator_picks_one(start_gateway, upstream) -> None:
    """1. route slow (one slot) gets 4 requests of 3 s: 3 wait; the cursor stays on api
    2. the X-ray shows slow, marked "most pressed" 3. the operator moves the cursor
    down and back up to api: the X-ray shows api, and stays on it 4. `a`: it follows
    slow again."""
    gw = await start_gateway(body(upstream.url))
    app = DashboardApp(gw.socket_path, interval=0.1)
    async with traffic(gw.url, "/slow/x?ms=3000", concurrency=4), app.run_test(size=SIZE):
        await wait_for(lambda: len(gw.runtime.table.routes["slow"].gate.waiters) == 3, timeout=10)
        xray = app.query_one(XRay)
        await wait_for(lambda: xray.border_title == "Queue X-ray: slow", timeout=5)
        assert app.query_one(RouteTable).selected == "api" and "most pressed" in str(xray.border_subtitle)
        press(app, "down", "up")
        await wait_for(lambda: xray.border_title == "Queue X-ray: api", timeout=5)
        seen = app.last
        await wait_for(lambda: app.last is not seen and app.last.received > seen.received + 0.3, timeout=5)
        assert xray.border_title == "Queue X-ray: api" and "most pressed" not in str(xray.border_subtitle)
        press(app, "a")
        await wait_for(lambda: xray.border_title == "Queue X-ray: slow", timeout=5)


async def test_typed_limits_are_set_in_the_daemon_and_one_toast_at_a_time(start_gateway, upstream) -> None:
    """1. `l` on route api opens the limits dialog with its limits (4, 50) 2. typed:
    max_concurrency 12, Tab, max_queue 75, Enter: both set in the daemon, shown in
    the row 3. a value below the least allowed is refused in the dialog, Esc closes it,
    nothing changes 4. `+` pressed five times, then `r`: never more than one toast
    on screen."""
    gw = await start_gateway(body(upstream.url))
    app = DashboardApp(gw.socket_path, interval=0.1)
    async with app.run_test(size=(80, 24)):
        await wait_for(lambda: "api" in app.query_one(RouteTable).rows, timeout=10)
        press(app, "l")
        await wait_for(lambda: isinstance(app.screen, LimitScreen), timeout=5)
        dialog = app.screen
        await wait_for(lambda: any(i.has_focus for i in dialog.query("#max_concurrency")), timeout=5)
        assert [dialog.query_one(f"#{k}", Input).value for k in ("max_concurrency", "max_queue")] == ["4", "50"]
        # a field's text is selected when it gets the focus: typing replaces it
        press(app, "1", "2", "tab")
        await wait_for(lambda: dialog.query_one("#max_queue", Input).has_focus, timeout=5)
        press(app, "7", "5", "enter")
        await wait_for(lambda: gw.runtime.limits("api") == (12, 75), timeout=5)
        await wait_for(lambda: row(app, "api")[1] == "0/12" and row(app, "api")[2] == "0/75", timeout=5)
        assert not isinstance(app.screen, LimitScreen)

        press(app, "l")
        await wait_for(lambda: isinstance(app.screen, LimitScreen), timeout=5)
        dialog = app.screen
        await wait_for(lambda: any(i.has_focus for i in dialog.query("#max_concurrency")), timeout=5)
        press(app, "0", "enter")
        await wait_for(lambda: "expected a number >= 1" in str(dialog.query_one("#limits-error", Label).content),
                       timeout=5)
        press(app, "escape")
        await wait_for(lambda: not isinstance(app.screen, LimitScreen), timeout=5)
        assert gw.runtime.limits("api") == (12, 75)

        most = [0]
        app.notify = _counting(app, most)  # type: ignore[method-assign]
        press(app, "plus", "plus", "plus", "plus", "plus", "r")
        await wait_for(lambda: gw.runtime.generation == 2 and gw.runtime.limits("api") == (4, 50), timeout=5)
        await wait_for(lambda: "generation 2" in str([n.message for n in app._notifications]), timeout=5)
        assert most[0] == 1 and notices(app) == 1


def _counting(app: DashboardApp, most: list[int]) -> Any:
    """app.notify, noting the most toasts ever up at once."""
    notify = app.notify

    def counted(*args: Any, **kwargs: Any) -> None:
        notify(*args, **kwargs)
        most[0] = max(most[0], notices(app))

    return counted


async def test_served_and_shed_rates_side_by_side_under_overload(start_gateway, upstream) -> None:
    """Route slow: one slot, a queue of 1, 10 clients asking for 200 ms each: about
    5 served a second, the rest shed with 503. The row shows both rates, and the
    served rate is not the sum of both."""
    gw = await start_gateway(body(upstream.url, slow_queue=1))
    app = DashboardApp(gw.socket_path, interval=0.1)
    async with traffic(gw.url, "/slow/x?ms=200", concurrency=10), app.run_test(size=(80, 24)):
        await wait_for(lambda: app.last is not None, timeout=10)
        first = app.last.received  # type: ignore[union-attr]

        def rates() -> tuple[float, float] | None:
            # rates over a full second (the first ones span less)
            if app.last is None or app.last.received < first + 1.5:
                return None
            v = next((v for v in app.views if v.name == "slow"), None)
            if v is None or not v.served_rps or not v.shed_rps or v.shed_rps < 20:
                return None
            return v.served_rps, v.shed_rps
        served, shed = await wait_for(rates, timeout=10)
        assert 1 <= served <= 8 and shed > 4 * served
        cells = row(app, "slow")
        assert cells[3] and cells[4] and cells[3] != cells[4]  # serv/s, shed/s, in the narrow layout


async def test_an_ejected_server_shows_with_its_state(start_gateway, upstream) -> None:
    """Upstream app has a live server and a dead one (nothing listens), max_fails 1:
    under traffic the dead one is ejected; the dashboard says so in the header
    (servers 1/2 up), the event pane (up -> ejected) and the upstreams pane (`u`)."""
    dead = f"http://127.0.0.1:{free_port()}"
    config = body(upstream.url).replace(f'servers = ["{upstream.url}"]', f"""servers = ["{upstream.url}", "{dead}"]
        max_fails = 1
        fail_timeout = 30.0
        connect_timeout = 0.5""")
    gw = await start_gateway(config)
    app = DashboardApp(gw.socket_path, interval=0.1)
    async with app.run_test(size=(80, 24)):
        await wait_for(lambda: app.last is not None and "servers 2/2 up" in app.query_one(Summary).text.plain,
                       timeout=10)
        async with traffic(gw.url, "/echo", concurrency=2):
            await wait_for(lambda: "servers 1/2 up" in app.query_one(Summary).text.plain, timeout=10)
        assert f"upstream app: {dead} up -> ejected" in events(app)
        pane = app.query_one(UpstreamPane)
        assert not pane.display
        press(app, "u")
        await wait_for(lambda: pane.display and not app.query_one(Trends).display, timeout=5)
        text = str(pane.render())
        assert "ejected" in text and dead.removeprefix("http://") in text and "1/2 up" in text
