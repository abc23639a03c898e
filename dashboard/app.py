"""gatewayd-dashboard: a Textual TUI attached to a running gatewayd's control socket.

One worker reads the socket (:class:`dashboard.client.Feed`) and posts messages;
the handlers here turn successive snapshots into figures with the pure functions
of :mod:`dashboard.model` and hand them to the widgets, which update in place.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.notifications import Notify, SeverityLevel
from textual.widgets import Footer

from gatewayd.exits import EXIT_CONFIG

from . import fmt
from .client import Feed
from .clients import ClientsPane, unknown_command
from .messages import ClientsReceived, CommandReply, Connected, Disconnected, QueueReceived, SnapshotReceived
from .model import (
    SORT_COLUMNS,
    Event,
    History,
    RateWindow,
    RouteView,
    Sample,
    Totals,
    dig,
    events_between,
    find_route,
    most_pressed,
    num_at,
    ordered,
    reports_deadlines,
    reports_refusals,
    reports_tunnels,
    route_views,
    server_views,
    totals,
    waiters,
)
from .panes import LimitScreen, UpstreamPane
from .routetable import RouteTable
from .socketpath import ConfigProblem, socket_from_config
from .trends import Trends
from .widgets import (
    COLUMNS,
    DEADLINE_COLUMNS,
    TUNNEL_COLUMNS,
    WIDE_429,
    EventPane,
    HelpScreen,
    StatusBar,
    Summary,
    XRay,
    estimates_text,
    layout,
    row_cells,
    tunnels_text,
)

TRENDS_EVERY = 1.0  # seconds between redraws of the sparklines


class DashboardApp(App[int]):
    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses elsewhere find it too
    TITLE = "gatewayd dashboard"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("r", "reload", "Reload"),
        Binding("plus", "limit(1)", "+limit"),
        Binding("equals_sign", "limit(1)", "+limit", show=False),
        Binding("minus", "limit(-1)", "-limit"),
        Binding("l", "limits", "Limits"),
        Binding("u", "upstreams", "Upstreams"),
        Binding("c", "clients", "Clients"),
        Binding("a", "follow", "X-ray auto", show=False),
        Binding("s", "sort", "Sort"),
        Binding("S", "reverse", "Reverse", show=False),
        Binding("p", "pause", "Pause"),
        Binding("question_mark", "help", "Help"),
    ]

    def __init__(self, socket_path: Path, interval: float = 0.25, history_s: float = 300.0,
                 connect: bool = True) -> None:
        super().__init__()
        self.socket_path = socket_path
        self.interval = interval
        self.connect = connect  # False: the messages come from elsewhere (tests)
        self.feed = Feed(socket_path, self.post_message, interval)
        self.history = History(max(2, math.ceil(history_s / interval)))
        self.window = RateWindow(1.0)
        self.last: Sample | None = None
        self.views: list[RouteView] = []
        self.now: Totals | None = None
        self.paused = False
        self.sort_column = "name"
        self.sort_reverse = False
        self.state = "waiting"
        self.state_text = f"connecting to {socket_path}…"
        self.ever_connected = False
        self.full_queue: tuple[str, list[Any]] | None = None  # the queue command's answer
        self._pending_limits: dict[str, tuple[int, bool]] = {}  # route -> (target, answered)
        self._trends_drawn = 0.0
        self.xray_pinned = False  # the operator picked the X-ray's route (moved the cursor)
        self.xray_route: str | None = None
        self._table_width = 0  # cells the routes table's columns may take
        self._refusals = False  # the gatewayd counts 429 refusals: the wide layout may show them
        self._tunnels = False  # a route carries WebSocket tunnels: the wide layout may show them
        self._deadlines = False  # a route refused requests for their deadline or class: likewise
        self.clients_answer: tuple[str, dict[str, Any]] | None = None  # the last clients answer, and its route

    # -- layout --------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        # kept by reference: the help screen on top must not hide them from updates
        self.status_bar = StatusBar(id="status")
        self.summary = Summary(id="summary")
        self.table = RouteTable(COLUMNS, row_cells, id="routes")
        self.trends = Trends(id="trends")
        self.upstream_pane = UpstreamPane(id="upstreams")
        self.xray = XRay(id="xray")
        self.event_pane = EventPane(id="events")
        self.clients_pane = ClientsPane(id="clients")
        yield self.status_bar
        yield self.summary
        yield self.table
        with Horizontal(id="bottom"):
            yield self.trends
            yield self.upstream_pane
            yield self.xray
            yield self.event_pane
            yield self.clients_pane
        yield Footer()

    def on_mount(self) -> None:
        self.trends.border_title = f"Trends, last {fmt.duration(self.history.length * self.interval)}"
        self.event_pane.border_title = "Events"
        self.upstream_pane.border_title = "Upstreams"
        self.upstream_pane.display = False
        self.clients_pane.display = False
        self.table.focus()
        self._show_sort()
        self._show_status()
        self._show_xray()
        if self.connect:
            self.read_socket()

    def on_resize(self, event: events.Resize) -> None:
        # the routes table's border takes 2 cells, its scroll bar 1
        self._table_width = event.size.width - 3
        self._set_layout()

    def _set_layout(self) -> None:
        """The routes table's columns for the terminal's width and what the gatewayd counts."""
        self.table.set_columns(*layout(self._table_width, self._refusals, self._tunnels, self._deadlines))
        self._show_sort()

    def toast(self, message: str, title: str = "", severity: SeverityLevel = "information",
              timeout: float = 3) -> None:
        """A notice, in place of the one shown (see _on_notify)."""
        self.notify(message, title=title, severity=severity, timeout=timeout)

    def _on_notify(self, event: Notify) -> None:
        # One toast at a time, never a pile over the events pane: a new one replaces
        # the one shown. Here rather than in toast(): notify() only posts a message,
        # so a toast asked for before the previous one arrived would still pile up.
        self.clear_notifications()
        super()._on_notify(event)

    @work(exclusive=True, group="socket")
    async def read_socket(self) -> None:
        await self.feed.run()

    # -- messages from the worker ----------------------------------------------------
    def on_connected(self, msg: Connected) -> None:
        pid = number_text(dig(msg.hello, "pid"))
        who = f"gatewayd {dig(msg.hello, 'version') or '?'} (pid {pid})"
        self.add_event(Event(msg.at, "info", ("connection restored: " if self.ever_connected else "connected to ")
                             + who))
        self.ever_connected = True
        self.state, self.state_text = "ok", f"connected to {who} at {self.socket_path}"
        self._show_status()

    def on_disconnected(self, msg: Disconnected) -> None:
        if self.state == "ok":
            self.add_event(Event(msg.at, "error", f"connection lost: {msg.reason}"))
        elif msg.attempt == 1 and not self.ever_connected:
            self.add_event(Event(msg.at, "warning", f"waiting for gatewayd at {self.socket_path}: {msg.reason}"))
        self.state = "waiting" if msg.waiting and not self.ever_connected else "down"
        head = "WAITING for the control socket" if self.state == "waiting" else "DISCONNECTED"
        self.state_text = f"{head} {self.socket_path}: {msg.reason} · retry {msg.attempt} in {msg.retry_in:.2g}s"
        self._show_status()

    def on_snapshot_received(self, msg: SnapshotReceived) -> None:
        sample = Sample(msg.snapshot, msg.received)
        for event in events_between(self.last, sample):
            self.add_event(event)
        self.window.push(sample)
        base = self.window.base()
        self.views = route_views(sample, base)
        reports = (reports_refusals(self.views), reports_tunnels(self.views), reports_deadlines(self.views))
        if reports != (self._refusals, self._tunnels, self._deadlines):
            self._refusals, self._tunnels, self._deadlines = reports
            self._set_layout()
        self.now = totals(sample, base)
        self.history.add(self.now)
        self.last = sample
        self._pending_limits = {k: v for k, v in self._pending_limits.items() if not v[1]}
        if not self.paused:
            self.refresh_screen()

    def on_queue_received(self, msg: QueueReceived) -> None:
        self.full_queue = (msg.route, msg.waiters)
        if not self.paused:
            self._show_xray()

    def on_clients_received(self, msg: ClientsReceived) -> None:
        self.clients_answer = (msg.route, msg.reply)
        if not self.paused:
            self._show_clients()

    def on_command_reply(self, msg: CommandReply) -> None:
        req, rep = msg.request, msg.reply
        ok = rep.get("ok") is True
        if req.get("cmd") == "reload":
            if ok:
                changes = rep.get("changes")
                n = len(changes) if isinstance(changes, list) else 0
                self.toast(f"generation {rep.get('generation', '?')}, {n} change{'s' * (n != 1)}",
                            title="Reload ok")
            else:
                self.toast(str(rep.get("error")), title="Reload FAILED", severity="error", timeout=10)
                if not self.feed.connected:
                    self.add_event(Event(time.time(), "error", f"reload not sent: {rep.get('error')}"))
        elif req.get("cmd") == "set_limit":
            route = str(req.get("route"))
            if ok:
                target = req.get("max_concurrency")
                if target is not None and self._pending_limits.get(route, (None, False))[0] == target:
                    # the last one asked for is in force: the next snapshot shows it
                    self._pending_limits[route] = (int(target), True)
                said = [f"{k} {rep.get(k, req[k])}" for k in ("max_concurrency", "max_queue") if k in req]
                self.toast(f"{route}: {', '.join(said)}", title="Limit set")
            else:
                self._pending_limits.pop(route, None)
                self.toast(str(rep.get("error")), title="set_limit failed", severity="error")
                self.add_event(Event(time.time(), "error", f"set_limit {route}: {rep.get('error')}"))

    # -- drawing ---------------------------------------------------------------------
    def refresh_screen(self, force: bool = False) -> None:
        self.summary.show(self.last)
        self._show_table()
        # the trends span minutes: redrawing them once a second is enough, and cheaper
        now = self.last.received if self.last is not None else 0.0
        if force or abs(now - self._trends_drawn) >= TRENDS_EVERY:
            self._trends_drawn = now
            self.trends.show(self.history, self.now)
        self._show_xray()
        self._show_clients()
        self.upstream_pane.show(server_views(self.last))
        self._show_status()

    def _show_xray(self) -> None:
        auto = None if self.xray_pinned else most_pressed(self.views, self.xray_route)
        route = self.xray_route = auto or self.table.selected
        self.feed.xray_route = route
        r = find_route(self.last, route)
        queued = num_at(r, "queued")
        summary = waiters(dig(r, "waiters"))
        listed = summary
        if self.full_queue and self.full_queue[0] == route and queued and queued > len(summary):
            listed = waiters(self.full_queue[1])
        view = next((v for v in self.views if v.name == route), None)
        self.xray.show(route, listed, queued, following=auto is not None, tunnels=tunnels_text(view),
                       estimates=estimates_text(view))

    def _show_clients(self) -> None:
        if not self.clients_pane.display:
            return
        route = self.table.selected
        answer = None
        if self.clients_answer is not None:
            asked, reply = self.clients_answer
            # an older gatewayd's "unknown cmd" holds for every route
            if asked == route or unknown_command(reply):
                answer = reply
        self.clients_pane.show(route, answer, dig(find_route(self.last, route), "rejected"))

    def _show_status(self) -> None:
        icon = {"ok": "●", "down": "✖", "waiting": "…"}[self.state]
        extras = [] if self.state != "ok" else ["? help"]
        if self.paused:
            extras.insert(0, "⏸ PAUSED (p resumes)")
        self.status_bar.show(self.state, " · ".join([f" {icon} {self.state_text}", *extras]))
        table = self.table
        title = f"Routes: {len(table.order)} · sorted by {self._sort_label()}"
        if self.state != "ok" and self.last is not None:
            title += f" · STALE: data from {fmt.clock(num_at(self.last.snap, 'time'))}"
        if table.border_title != title:  # setting it repaints the whole table, even unchanged
            table.border_title = title

    def _sort_label(self) -> str:
        label = next(c.label for c in (*WIDE_429, *TUNNEL_COLUMNS, *DEADLINE_COLUMNS) if c.key == self.sort_column)
        ascending = (self.sort_column == "name") != self.sort_reverse
        return f"{label} {'▲' if ascending else '▼'}"

    def add_event(self, event: Event) -> None:
        self.event_pane.add(event)

    # -- actions ---------------------------------------------------------------------
    def action_reload(self) -> None:
        self.toast("reloading…", timeout=2)
        self.feed.send({"cmd": "reload"})

    def action_limit(self, delta: int) -> None:
        route = self.table.selected
        view = next((v for v in self.views if v.name == route), None)
        if route is None or view is None:
            self.toast("no route selected", severity="warning")
            return
        current = self._pending_limits[route][0] if route in self._pending_limits else view.max_concurrency
        if current is None:
            self.toast(f"{route}: max_concurrency unknown", severity="warning")
            return
        target = int(current) + delta
        if target < 1:
            self.toast(f"{route}: max_concurrency cannot go below 1", severity="warning")
            return
        self._pending_limits[route] = (target, False)
        self.feed.send({"cmd": "set_limit", "route": route, "max_concurrency": target})

    def action_sort(self) -> None:
        i = SORT_COLUMNS.index(self.sort_column)
        self._set_sort(SORT_COLUMNS[(i + 1) % len(SORT_COLUMNS)], False)

    def action_reverse(self) -> None:
        self._set_sort(self.sort_column, not self.sort_reverse)

    @on(RouteTable.HeaderClicked)
    def header_clicked(self, msg: RouteTable.HeaderClicked) -> None:
        self._set_sort(msg.column, not self.sort_reverse if msg.column == self.sort_column else False)

    def _set_sort(self, column: str, reverse: bool) -> None:
        self.sort_column, self.sort_reverse = column, reverse
        self._show_sort()
        self._show_table()
        self._show_status()

    def _show_sort(self) -> None:
        arrow = " " + self._sort_label()[-1]
        self.table.set_sort_marks({self.sort_column: arrow})

    def _show_table(self) -> None:
        rows = {v.name: v for v in self.views}
        self.table.show(rows, ordered(self.views, self.sort_column, self.sort_reverse))

    @on(RouteTable.Selected)
    def route_selected(self, msg: RouteTable.Selected) -> None:
        if msg.by_user:
            self.xray_pinned = True
        self._show_xray()
        if self.clients_pane.display:
            self.feed.watch_clients(self.table.selected)
            self._show_clients()

    def action_follow(self) -> None:
        self.xray_pinned = False
        self._show_xray()

    def action_upstreams(self) -> None:
        self.upstream_pane.display = not self.upstream_pane.display
        self.trends.display = not self.upstream_pane.display
        if self.trends.display:
            self.trends.show(self.history, self.now)

    def action_clients(self) -> None:
        """Show the top clients of the route under the cursor in place of the events
        (asked for about once a second while shown, never while hidden), and back."""
        shown = self.clients_pane.display = not self.clients_pane.display
        self.event_pane.display = not shown
        self.feed.watch_clients(self.table.selected if shown else None)
        self._show_clients()

    def action_limits(self) -> None:
        route = self.table.selected
        view = next((v for v in self.views if v.name == route), None)
        if route is None or view is None:
            self.toast("no route selected", severity="warning")
            return
        pending = self._pending_limits.get(route)
        concurrency = pending[0] if pending else view.max_concurrency
        current = (None if concurrency is None else int(concurrency),
                   None if view.max_queue is None else int(view.max_queue))

        def chosen(fields: dict[str, int] | None) -> None:
            if not fields:
                return
            if "max_concurrency" in fields:
                self._pending_limits[route] = (fields["max_concurrency"], False)
            self.feed.send({"cmd": "set_limit", "route": route, **fields})

        self.push_screen(LimitScreen(route, *current), chosen)

    def action_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused:
            self.refresh_screen(force=True)
        self._show_status()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())


def number_text(value: Any) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gatewayd-dashboard",
                                description="Live view of a running gatewayd, through its control socket.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", type=Path, metavar="PATH", help="the control socket")
    where.add_argument("--config", type=Path, metavar="PATH",
                       help="a gatewayd configuration file: its [control] socket")
    p.add_argument("--interval", type=float, default=0.25, metavar="SECONDS",
                   help="seconds between updates (default 0.25: 4 updates a second)")
    p.add_argument("--history", type=float, default=300.0, metavar="SECONDS",
                   help="how far back the trends reach (default 300)")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    args = p.parse_args(argv)
    if not 0.05 <= args.interval <= 3600:
        p.error("--interval: expected seconds >= 0.05 and <= 3600")
    if not args.interval <= args.history <= 86400:
        p.error("--history: expected seconds >= --interval and <= 86400")
    return args


def _version() -> str:
    try:
        return version("gatewayd")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    socket_path = args.socket
    if args.config is not None:
        try:
            socket_path = socket_from_config(args.config)
        except ConfigProblem as exc:
            print(f"gatewayd-dashboard: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    app = DashboardApp(socket_path.absolute(), args.interval, args.history)
    app.run()
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
