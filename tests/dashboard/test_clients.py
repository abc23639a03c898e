"""The clients pane (key c) and the 429 reasons in the routes table: who floods a
route, asked for about once a second only while the pane is shown, and an older
gatewayd without the ``clients`` command said so in the pane."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from rich.console import Console

from dashboard.app import DashboardApp
from dashboard.clients import CLIENTS_EVERY, ClientsPane, ClientView, client_views, refusals_line
from dashboard.messages import SnapshotReceived
from dashboard.model import Sample, route_views
from dashboard.routetable import RouteTable
from dashboard.widgets import COLUMNS, NARROW, WIDE_429, EventPane

from ..conftest import wait_for
from .test_app import SIZE, body, press, row


def drawn(pane: ClientsPane) -> str:
    """The pane's content as drawn at its width, as text."""
    console = Console(width=pane.content_region.width or 80, file=io.StringIO(), record=True)
    console.print(pane.content)
    return console.export_text()


@contextlib.asynccontextmanager
async def relay(target: Path, path: Path) -> AsyncIterator[Counter[str]]:
    """A Unix socket in front of gatewayd's control socket: passes every line both
    ways and counts the commands it sees, by name."""
    seen: Counter[str] = Counter()
    tasks: set[asyncio.Task[None]] = set()
    writers: list[asyncio.StreamWriter] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool) -> None:
        while line := await reader.readline():
            if count:
                seen[json.loads(line)["cmd"]] += 1
            writer.write(line)
            await writer.drain()
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(target), limit=64 * 1024 * 1024)
        writers.extend((writer, up_writer))
        for t in (asyncio.create_task(pipe(reader, up_writer, True)),
                  asyncio.create_task(pipe(up_reader, writer, False))):
            tasks.add(t)

    server = await asyncio.start_unix_server(serve, path=str(path))
    try:
        yield seen
    finally:
        server.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in writers:
            w.close()
        await server.wait_closed()


async def _queue_from(port: int, source: str, n: int) -> list[asyncio.StreamWriter]:
    """``n`` requests to route slow from the loopback address ``source``."""
    writers = []
    for _ in range(n):
        _, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        writer.write(b"GET /slow/q?ms=10 HTTP/1.1\r\nHost: x\r\n\r\n")
        writers.append(writer)
    return writers


async def test_the_clients_pane_shows_who_holds_the_queue_and_polls_only_while_shown(
        start_gateway, upstream, tmp_path: Path) -> None:
    """1. route slow (one slot, max_queue_per_client 3) held by a 8 s request;
    127.0.0.5 sends 4 requests: 3 queue, the 4th is refused 429 client_queue_full;
    127.0.0.6 queues one 2. the dashboard, through a relay counting commands, never
    asks for clients while the pane is hidden 3. cursor on slow, `c`: the pane replaces
    the events and draws 127.0.0.5 with 3 places and 1 capped first, then 127.0.0.6
    with 1; under it the route's 429 total 4. while shown, about one clients command a
    second, not one a snapshot 5. `c` again: the events are back and no clients
    command is sent any more."""
    gw = await start_gateway(body(upstream.url).replace("queue_timeout = 10.0", "queue_timeout = 10.0\n"
                                                        "max_queue_per_client = 3"))
    _, holder = await asyncio.open_connection("127.0.0.1", gw.port)
    holder.write(b"GET /slow/hold?ms=8000 HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_for(lambda: upstream.active == 1)
    writers = [holder, *await _queue_from(gw.port, "127.0.0.5", 3)]
    await wait_for(lambda: gw.runtime.table.routes["slow"].gate.queued == 3, timeout=10)
    refused_reader, refused = await asyncio.open_connection("127.0.0.1", gw.port, local_addr=("127.0.0.5", 0))
    refused.write(b"GET /slow/q?ms=10 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(refused_reader.readline(), 10)).startswith(b"HTTP/1.1 429")
    writers += [refused, *await _queue_from(gw.port, "127.0.0.6", 1)]
    app = DashboardApp(tmp_path / "relay.sock", interval=0.1)
    try:
        async with relay(gw.socket_path, tmp_path / "relay.sock") as seen, app.run_test(size=SIZE):
            await wait_for(lambda: gw.runtime.table.routes["slow"].gate.queued == 4, timeout=10)
            await wait_for(lambda: "slow" in app.query_one(RouteTable).rows and seen["snapshot"] >= 10, timeout=10)
            assert seen["clients"] == 0
            pane = app.query_one(ClientsPane)
            assert not pane.display

            press(app, "down")
            await wait_for(lambda: app.query_one(RouteTable).selected == "slow", timeout=5)
            press(app, "c")
            await wait_for(lambda: pane.content_region.width > 30 and "127.0.0.5" in drawn(pane), timeout=5)
            assert pane.display and not app.query_one(EventPane).display
            assert pane.border_title == "Clients: slow"
            lines = [line.split() for line in drawn(pane).splitlines() if line.strip()]
            assert lines[0] == ["client", "queued", "limited", "capped"]
            assert lines[1] == ["127.0.0.5", "3", "0", "1"] and lines[2] == ["127.0.0.6", "1", "0", "0"]
            await wait_for(lambda: "capped 1" in str(pane.border_subtitle), timeout=5)

            polls, snapshots, start = seen["clients"], seen["snapshot"], time.monotonic()
            await wait_for(lambda: seen["snapshot"] >= snapshots + 25, timeout=15)
            asked, took = seen["clients"] - polls, time.monotonic() - start
            assert 1 <= asked <= took / CLIENTS_EVERY + 1.5, (asked, took)

            press(app, "c")
            await wait_for(lambda: not pane.display and app.query_one(EventPane).display, timeout=5)
            polls, snapshots = seen["clients"], seen["snapshot"]
            await wait_for(lambda: seen["snapshot"] >= snapshots + 15, timeout=15)  # 1.5 s and more
            assert seen["clients"] == polls
    finally:
        for w in writers:
            w.close()


async def test_an_older_gatewayd_without_the_clients_command_is_said_in_the_pane(tmp_path: Path) -> None:
    """A control socket that answers clients with gatewayd's "unknown cmd" error (a
    gatewayd older than the command): `c` shows a line saying so, the dashboard goes
    on, and it does not ask again on that connection."""
    asked: Counter[str] = Counter()
    writers: list[asyncio.StreamWriter] = []
    old_commands = "hello, snapshot, subscribe, reload, set_limit, queue"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while line := await reader.readline():
            cmd = json.loads(line)["cmd"]
            asked[cmd] += 1
            if cmd == "hello":
                answer: dict[str, Any] = {"ok": True, "version": "0.0.9", "protocol": 1, "pid": 9}
            elif cmd == "snapshot":
                answer = {"ok": True, "snapshot": {"pid": 9, "time": time.time(), "routes": [
                    {"name": "app", "in_flight": 1, "max_concurrency": 1, "queued": 2, "max_queue": 10,
                     "rejected": {"queue_full": 0, "queue_timeout": 0}}]}}
            else:
                answer = {"ok": False, "error": f"unknown cmd {cmd!r}; expected one of {old_commands}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(tmp_path / "old.sock"))
    app = DashboardApp(tmp_path / "old.sock", interval=0.05)
    try:
        async with app.run_test(size=SIZE):
            await wait_for(lambda: "app" in app.query_one(RouteTable).rows, timeout=5)
            press(app, "c")
            pane = app.query_one(ClientsPane)
            await wait_for(lambda: "no clients command" in drawn(pane), timeout=5)
            assert "older version" in drawn(pane) and app.is_running
            snapshots = asked["snapshot"]
            await wait_for(lambda: asked["snapshot"] >= snapshots + 30, timeout=10)  # 1.5 s and more
            assert asked["clients"] == 1
            assert pane.border_subtitle == ""  # no 429 counts in this snapshot: none shown
    finally:
        server.close()
        for w in writers:
            w.close()
        await server.wait_closed()


def _snap(t: float, **rejected: int) -> dict[str, Any]:
    return {"pid": 7, "uptime_s": t, "time": t, "routes": [
        {"name": "app", "in_flight": 1, "max_concurrency": 2, "queued": 0, "max_queue": 10, "requests": 100,
         "rejected": {"queue_full": 4, "queue_timeout": 1, **rejected}}]}


async def test_the_routes_table_shows_429_reasons_only_from_a_gatewayd_that_counts_them() -> None:
    """1. 160 columns, snapshots without rate_limited and client_queue_full: the wide
    layout as before, no 429 columns 2. snapshots with them: two 429 columns with the
    totals 3. at 140 columns the layout stays the wide one, and the clients pane
    (`c`) says the route's 429 totals by reason under it."""
    app = DashboardApp(Path("/run/gatewayd/gatewayd.sock"), connect=False)
    async with app.run_test(size=(160, 30)) as pilot:
        app.post_message(SnapshotReceived(_snap(1.0), 1.0))
        await wait_for(lambda: "app" in app.table.rows)
        await pilot.pause()
        assert app.table.columns == COLUMNS
        app.post_message(SnapshotReceived(_snap(2.0, rate_limited=1200, client_queue_full=31), 2.0))
        await wait_for(lambda: app.table.columns == WIDE_429)
        assert [c.label for c in app.table.columns[-2:]] == ["429 rate", "429 cap"]
        assert row(app, "app")[-2:] == ["1200", "31"]
        assert row(app, "app")[-6:-4] == ["4", "1"]  # the 503s as before

        await pilot.resize_terminal(140, 40)
        await wait_for(lambda: app.table.columns == COLUMNS)
        press(app, "c")
        pane = app.query_one(ClientsPane)
        await wait_for(lambda: pane.display and pane.border_subtitle == "429: limited 1200 · capped 31")
        await pilot.resize_terminal(80, 24)
        await wait_for(lambda: app.table.columns == NARROW)


def test_route_views_read_429_reasons_and_leave_them_blank_when_absent() -> None:
    old = Sample(_snap(1.0), 1.0)
    [v] = route_views(old, None)
    assert (v.rate_limited, v.client_queue_full, v.refused_rps) == (None, None, None)
    new = Sample(_snap(3.0, rate_limited=10, client_queue_full=4), 3.0)
    later = Sample(_snap(5.0, rate_limited=30, client_queue_full=6), 5.0)
    [v] = route_views(later, new)
    assert (v.rate_limited, v.client_queue_full, v.refused_rps) == (30, 6, 11.0)
    assert refusals_line({"queue_full": 1}) == "" and refusals_line(None) == ""
    assert refusals_line({"rate_limited": 5}) == "429: limited 5"


def test_client_views_keep_the_daemons_order_and_skip_what_they_cannot_read() -> None:
    answer = {"ok": True, "route": "app", "clients": [
        {"client": "10.0.0.7", "queued": 400, "rate_limited": 1200, "client_queue_full": 31},
        {"client": 7}, "junk", {"client": "10.0.0.8", "queued": "many"}]}
    assert client_views(answer) == [ClientView("10.0.0.7", 400, 1200, 31), ClientView("10.0.0.8", None, None, None)]
    assert client_views({"ok": True, "clients": None}) == [] and client_views(None) == []
