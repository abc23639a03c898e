"""The dashboard's panels. Each renders what it is given; none reads the socket."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.screen import ModalScreen
from textual.widgets import RichLog, Static

from . import fmt
from .model import CertificateView, Event, RouteView, Sample, dig, num_at, server_views, soonest_certificate, text_at
from .panes import servers_summary
from .routetable import Cell, Column

# --------------------------------------------------------------------------- routes table
# Layouts of the same rows (see layout()). WIDE needs WIDE_WIDTH cells inside the border; a
# narrower terminal (80x24) gets NARROW: every figure an operator needs in an
# incident on one line, the oldest waiter's age in the X-ray, the 503s summed in
# shed/s, cancellations and upstream errors as totals.
COLUMNS = (
    Column("name", "Route", 14, left=True),
    Column("in_flight", "In flight/limit", 16, left=True),
    Column("queued", "Queued/max", 11),
    Column("oldest_wait_ms", "Oldest", 8),
    Column("served_rps", "served/s", 8),
    Column("shed_rps", "shed/s", 8),
    Column("p50", "p50", 8),
    Column("p99", "p99", 8),
    Column("queue_full", "503 full", 8),
    Column("queue_timeout", "503 tmo", 8),
    Column("cancelled", "Cancel", 7),
    Column("upstream_errors", "Up.err", 7),
)
NARROW = (
    Column("name", "Route", 9, left=True),
    Column("in_flight", "In/limit", 8),
    Column("queued", "Queued", 7),
    Column("served_rps", "serv/s", 6),
    Column("shed_rps", "shed/s", 6),
    Column("p50", "p50", 6),
    Column("p99", "p99", 6),
    Column("cancelled", "Cancel", 6),
    Column("upstream_errors", "UpErr", 5),
)
# With a gatewayd that counts 429 refusals and a terminal wide enough, the wide
# layout and the 429 totals by reason; else those are in the clients pane (c).
WIDE_429 = (
    *COLUMNS,
    Column("rate_limited", "429 rate", 8),
    Column("client_queue_full", "429 cap", 8),
)
# With a route that carries WebSocket (a gatewayd that says max_tunnels) and room left:
# its tunnels open/cap and the upgrades answered 503 tunnels_full, after the rest;
# else the X-ray says them for its route.
TUNNEL_COLUMNS = (
    Column("tunnels", "Tunnels", 11),
    Column("tunnels_full", "503 tun", 8),
)
# With a route that has refused requests for their deadline or class and room left:
# its 503 deadline, 503 preempted and 504 route_timeout totals; else the X-ray says them.
DEADLINE_COLUMNS = (
    Column("deadline", "503 ddl", 7),
    Column("preempted", "503 pre", 7),
    Column("route_timeout", "504 rto", 7),
)
BAR = 7


def width_of(columns: tuple[Column, ...]) -> int:
    """The cells a layout needs: each column padded by one on both sides."""
    return sum(c.width + 2 for c in columns)


WIDE_WIDTH = width_of(COLUMNS)
WIDE_429_WIDTH = width_of(WIDE_429)
TUNNELS_WIDTH = width_of(TUNNEL_COLUMNS)
DEADLINES_WIDTH = width_of(DEADLINE_COLUMNS)


def _load_style(value: float | None, limit: float | None) -> str:
    if value is None or not limit:
        return ""
    share = value / limit
    return "bold red" if share >= 1 else "yellow" if share >= 0.7 else "green"


def _common(v: RouteView) -> dict[str, Cell]:
    full_queue = bool(v.queued and v.max_queue is not None and v.queued >= v.max_queue)
    return {
        "name": (v.name, "bold"),
        "queued": (fmt.ratio(v.queued, v.max_queue), "bold red" if full_queue else "yellow" if v.queued else ""),
        "served_rps": (fmt.per_second(v.served_rps), ""),
        "shed_rps": (fmt.per_second(v.shed_rps), "bold red" if v.shed_rps else ""),
        "p50": (fmt.ms(v.p50), ""),
        "p99": (fmt.ms(v.p99), ""),
        "cancelled": (fmt.count(v.cancelled), ""),
        "upstream_errors": (fmt.count(v.upstream_errors), "bold red" if v.error_rps else ""),
    }


def row_cells(v: RouteView) -> tuple[Cell, ...]:
    """The wide table row of a route: (text, style) per column, in COLUMNS order."""
    busy = fmt.ratio(v.in_flight, v.max_concurrency)
    rejecting = "bold red" if v.rejected_rps else ""
    cells = _common(v)
    cells["in_flight"] = (fmt.bar(v.in_flight, v.max_concurrency, BAR) + " "
                          + busy.rjust(COLUMNS[1].width - BAR - 1), _load_style(v.in_flight, v.max_concurrency))
    cells["oldest_wait_ms"] = (fmt.age(v.oldest_wait_ms), "yellow" if v.oldest_wait_ms else "")
    cells["queue_full"] = (fmt.count(v.queue_full), rejecting)
    cells["queue_timeout"] = (fmt.count(v.queue_timeout), rejecting)
    return tuple(cells[c.key] for c in COLUMNS)


def row_cells_429(v: RouteView) -> tuple[Cell, ...]:
    """The wide row and the route's 429 totals by reason, in WIDE_429 order."""
    refusing = "bold red" if v.refused_rps else ""
    return (*row_cells(v), (fmt.count(v.rate_limited), refusing), (fmt.count(v.client_queue_full), refusing))


def tunnel_cells(v: RouteView) -> tuple[Cell, Cell]:
    """Tunnels open/cap and the 503 tunnels_full total; blank on a route without WebSocket."""
    if not v.websocket:
        return ("", ""), ("", "")
    return ((fmt.ratio(v.tunnels, v.max_tunnels), _load_style(v.tunnels, v.max_tunnels)),
            (fmt.count(v.tunnels_full), "bold red" if v.tunnels_full_rps else ""))


def deadline_cells(v: RouteView) -> tuple[Cell, Cell, Cell]:
    """503 deadline, 503 preempted and 504 route_timeout totals; red while rising."""
    style = "bold red" if v.deadlines_rps else ""
    return ((fmt.count(v.deadline), style), (fmt.count(v.preempted), style), (fmt.count(v.route_timeout), style))


def _joined(parts: list[Callable[[RouteView], tuple[Cell, ...]]]) -> Callable[[RouteView], tuple[Cell, ...]]:
    def cells(v: RouteView) -> tuple[Cell, ...]:
        return tuple(c for part in parts for c in part(v))
    return cells


def layout(width: int, refusals: bool, tunnels: bool = False, deadlines: bool = False
           ) -> tuple[tuple[Column, ...], Callable[[RouteView], tuple[Cell, ...]]]:
    """The routes table's columns for a table ``width`` cells wide (inside its border
    and scroll bar); ``refusals``: the gatewayd counts 429 refusals; ``tunnels``: a
    route carries WebSocket tunnels; ``deadlines``: a route has refused requests for
    their deadline or class. The wide layout, then each group of columns that fits,
    in that order."""
    if width < WIDE_WIDTH:
        return NARROW, narrow_cells
    columns, parts = COLUMNS, [row_cells]
    if refusals and width >= WIDE_429_WIDTH:
        columns, parts = WIDE_429, [row_cells_429]
    if tunnels and width >= width_of(columns) + TUNNELS_WIDTH:
        columns, parts = (*columns, *TUNNEL_COLUMNS), [*parts, tunnel_cells]
    if deadlines and width >= width_of(columns) + DEADLINES_WIDTH:
        columns, parts = (*columns, *DEADLINE_COLUMNS), [*parts, deadline_cells]
    return columns, parts[0] if len(parts) == 1 else _joined(parts)


def narrow_cells(v: RouteView) -> tuple[Cell, ...]:
    """The narrow table row of a route, in NARROW order (no bar: the colour says it)."""
    cells = _common(v)
    cells["in_flight"] = (fmt.ratio(v.in_flight, v.max_concurrency), _load_style(v.in_flight, v.max_concurrency))
    return tuple(cells[c.key] for c in NARROW)


# --------------------------------------------------------------------------- header and status
Field = tuple[str, str, str]  # label, value, style of the value


def _line(fields: list[Field]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for i, (label, value, style) in enumerate(fields):
        if i:
            out.append(("  ", ""))
        if label:
            out.append((label + " ", "dim"))
        out.append((value, style) if value else ("?", "dim"))
    return out


def _pair_ms(last: float | None, most: float | None) -> str:
    return "" if last is None and most is None else f"{fmt.ms(last)}/{fmt.ms(most)}"


CERT_NAME = 40  # cells of a certificate's path in the header (its end: the file name)


def certificate_field(c: CertificateView) -> Field:
    """The soonest expiry: bold yellow within EXPIRY_WARNING_DAYS, bold red once expired."""
    name = fmt.tail(c.cert, CERT_NAME)
    if c.expired:
        return ("soonest expiry", f"{fmt.date(c.not_after)} EXPIRED {name}", "bold red")
    return ("soonest expiry", f"{fmt.date(c.not_after)} ({fmt.time_left(c.left_s)} left) {name}",
            "bold yellow" if c.soon else "bold")


def tls_fields(sample: Sample) -> list[Field]:
    """The header's TLS line: handshakes and errors since start, the soonest expiry;
    empty when the gateway has no certificate and made no handshake."""
    tls = dig(sample.snap, "tls")
    cert = soonest_certificate(sample)
    handshakes, errors = num_at(tls, "handshakes"), num_at(tls, "handshake_errors")
    if cert is None and not handshakes and not errors:
        return []
    out: list[Field] = [("TLS handshakes", fmt.count(handshakes), "bold"),
                        ("errors", fmt.count(errors), "bold")]
    if cert is not None:
        out.append(certificate_field(cert))
    return out


def summary_text(sample: Sample | None, width: int = 140) -> Text:
    """The header lines: process and configuration, runtime figures, and with TLS a
    third: handshakes and the soonest certificate expiry."""
    if sample is None:
        return Text("no data yet", style="dim")
    s = sample.snap
    workers = dig(s, "workers")
    line1: list[Field] = [
        ("gatewayd", text_at(s, "version") or "", "bold"),
        ("pid", fmt.count(num_at(s, "pid")), "bold"),
        ("up", fmt.duration(num_at(s, "uptime_s")), "bold"),
        ("workers", str(len(workers)) if isinstance(workers, list) else "", "bold"),
        ("generation", fmt.count(num_at(s, "generation")), "bold"),
    ]
    servers, style = servers_summary(server_views(sample))
    if servers:
        line1.append(("servers", servers, style))
    reload = dig(s, "last_reload")
    tail: list[tuple[str, str]] = [("  last reload ", "dim")]
    if isinstance(reload, dict):
        when = fmt.ago(num_at(reload, "time"), num_at(s, "time"))
        if reload.get("ok") is True:
            tail += [("ok", "bold green"), (f" {when}", "")]
        else:
            used = sum(len(t) for t, _ in _line(line1)) + len(when) + 24
            error = fmt.one_line(text_at(reload, "error") or "", max(width - used, 20))
            tail += [("FAILED", "bold red"), (f" {when}: ", ""), (error, "red")]
    else:
        tail.append(("never", "dim") if "last_reload" in s else ("?", "dim"))
    collections = dig(s, "gc", "collections")
    line2: list[Field] = [
        ("connections", fmt.count(num_at(s, "connections")), "bold"),
        ("tasks", fmt.count(num_at(s, "tasks")), "bold"),
        ("loop lag last/max", _pair_ms(num_at(s, "loop_lag_ms", "last"), num_at(s, "loop_lag_ms", "max")), "bold"),
        ("GC pause last/max", _pair_ms(num_at(s, "gc", "pause_ms", "last"), num_at(s, "gc", "pause_ms", "max")),
         "bold"),
        ("GC gen0/1/2", "/".join(fmt.count(num_at(collections, i)) for i in range(3))
         if isinstance(collections, list) else "", "bold"),
        ("RSS", fmt.size(num_at(s, "rss_bytes")), "bold"),
    ]
    tls = tls_fields(sample)
    line3 = ["\n", *_line(tls)] if tls else []
    return Text.assemble(*_line(line1), *tail, "\n", *_line(line2), *line3, no_wrap=True, overflow="ellipsis")


class Summary(Static):
    text = Text()

    def show(self, sample: Sample | None) -> None:
        self.text = summary_text(sample, self.size.width or 140)
        lines = max(self.text.plain.count("\n") + 1, 2)
        if self.styles.height is None or self.styles.height.value != lines:
            self.styles.height = lines  # a third line with TLS; the layout follows
        self.update(self.text, layout=False)


class StatusBar(Static):
    """One line: connected, waiting or disconnected, and what the dashboard is doing."""

    STATES = ("-ok", "-down", "-waiting")
    text = ""

    def show(self, state: str, text: str) -> None:
        for s in self.STATES:
            self.set_class(s == f"-{state}", s)
        if text != self.text:
            self.text = text
            self.update(Text(text), layout=False)


# --------------------------------------------------------------------------- bottom panels
def tunnels_text(v: RouteView | None) -> Text | None:
    """The X-ray's first line for a route that carries WebSocket: ``tunnels 12/10000 ·
    full 3`` (open/cap, then the upgrades answered 503 tunnels_full, when there are
    any: short enough for the pane at 80 columns), coloured as the load; None for
    another route (or from a gatewayd that does not count tunnels)."""
    if v is None or not v.websocket:
        return None
    out = Text(no_wrap=True, overflow="ellipsis")
    out.append("tunnels ", style="dim")
    out.append(fmt.ratio(v.tunnels, v.max_tunnels), style=_load_style(v.tunnels, v.max_tunnels) or "bold")
    if v.tunnels_full:
        out.append(" · full ", style="dim")
        out.append(fmt.count(v.tunnels_full), style="bold red" if v.tunnels_full_rps else "")
    return out


def estimates_text(v: RouteView | None) -> Text | None:
    """The X-ray's lines of a route's estimates and deadline refusals: ``service 100ms ·
    200/s``, then, once the route has refused any, ``deadline 3 · preempted 1 · timeout
    2`` (the refusals that happened, red while rising): two short lines, so that the
    pane at 80 columns shows the figures before its cut. None when the route has none
    of them (or from a gatewayd that does not say them)."""
    if v is None or (v.service_ms is None and not v.completion_rate and not v.refuses_by_deadline):
        return None
    estimates: list[tuple[str, str, str]] = []
    if v.service_ms is not None:
        estimates.append(("service ", fmt.ms(v.service_ms), "bold"))
    if v.completion_rate:
        estimates.append(("", fmt.per_second(v.completion_rate) + "/s", "bold"))
    rising = "bold red" if v.deadlines_rps else "bold"
    refused = [(label, fmt.count(value), rising) for label, value in (
        ("deadline ", v.deadline), ("preempted ", v.preempted), ("timeout ", v.route_timeout)) if value]
    out = Text(no_wrap=True, overflow="ellipsis")
    for n, pieces in enumerate(p for p in (estimates, refused) if p):
        if n:
            out.append("\n")
        for i, (label, value, style) in enumerate(pieces):
            if i:
                out.append(" · ", style="dim")
            if label:
                out.append(label, style="dim")
            out.append(value, style=style)
    return out


def xray_body(route: str | None, waiting: list[dict[str, Any]], queued: float | None,
              tunnels: Text | None = None, estimates: Text | None = None) -> RenderableType:
    """The X-ray's content: its route's tunnels line (a WebSocket route) and estimates
    line (a route with estimates or deadline refusals), then the waiters."""
    table = xray_table(route, waiting, queued)
    lines = [line for line in (tunnels, estimates) if line is not None]
    return Group(*lines, table) if lines else table


CLASS_SHORT = {"critical": "crit", "default": "dflt", "sheddable": "shed"}


def xray_table(route: str | None, waiting: list[dict[str, Any]], queued: float | None) -> Table | Text:
    if route is None:
        return Text("no route selected", style="dim")
    if not waiting:
        return Text(f"{route}: nobody waiting" if queued == 0 or queued is None else
                    f"{route}: {fmt.count(queued)} waiting", style="dim")
    t = Table(box=None, expand=True, padding=(0, 1), show_edge=False, header_style="dim")
    t.add_column("waited", justify="right", no_wrap=True, min_width=6)  # (fmt.ms: at most 6)
    # a waiter's class when one is not of the default class, the seconds left of its
    # deadline when one has a deadline (SPEC §12): columns only where they say something,
    # next to the wait, so that a narrow pane cuts the path and client first
    classes = any(text_at(w, "priority") not in (None, "default") for w in waiting)
    if classes:
        t.add_column("class", no_wrap=True, min_width=4)
    budgets = any(num_at(w, "deadline_in") is not None for w in waiting)
    if budgets:
        t.add_column("left", justify="right", no_wrap=True, min_width=5)
    t.add_column("method", no_wrap=True)
    t.add_column("path", ratio=1, no_wrap=True, overflow="ellipsis")
    t.add_column("client", no_wrap=True, overflow="ellipsis", max_width=15)
    # the worker's pid matters only when the waiters are spread over several
    pids = len({num_at(w, "pid") for w in waiting}) > 1
    if pids:
        t.add_column("pid", justify="right", no_wrap=True)
    for w in waiting:
        cells: list[Text | str] = [fmt.ms(num_at(w, "wait_ms"))]
        if classes:
            priority = text_at(w, "priority") or ""
            cells.append(Text(CLASS_SHORT.get(priority, priority),
                              style="bold" if priority == "critical" else "dim" if priority == "sheddable" else ""))
        if budgets:
            left = num_at(w, "deadline_in")
            cells.append(Text("-", style="dim") if left is None else
                         Text(fmt.seconds_left(left), style="yellow" if left < 1 else ""))
        cells += [text_at(w, "method") or "", text_at(w, "path") or "", text_at(w, "client") or ""]
        if pids:
            cells.append(fmt.count(num_at(w, "pid")))
        t.add_row(*cells)
    return t


class XRay(Static):
    """The selected route's waiters, oldest first."""

    _shown: Any = None

    def shown_waiters(self) -> int:
        return len(self._shown[1]) if self._shown else 0

    def show(self, route: str | None, waiting: list[dict[str, Any]], queued: float | None,
             following: bool = False, tunnels: Text | None = None, estimates: Text | None = None) -> None:
        """``following``: the route is the most pressed one, not one the operator picked;
        ``tunnels``: its tunnels line (``tunnels_text``), for a route that carries WebSocket;
        ``estimates``: its estimates line (``estimates_text``)."""
        if (route, waiting, queued, following, estimates, tunnels) == self._shown:
            return
        self._shown = (route, waiting, queued, following, estimates, tunnels)
        self.border_title = f"Queue X-ray: {route}" if route else "Queue X-ray"
        # "most pressed": chosen by the dashboard, not the operator (a in the help)
        parts = ["most pressed"] if following else []
        if queued:
            parts.append(f"{fmt.count(queued)} waiting")
        self.border_subtitle = " · ".join(parts)
        self.update(xray_body(route, waiting, queued, tunnels, estimates), layout=False)


LEVEL_STYLES = {"info": "", "warning": "yellow", "error": "bold red"}


class EventPane(RichLog):
    """Reloads (their changes or error), limit changes, connection lost and restored."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_lines=500, wrap=True, markup=False, min_width=20, **kwargs)
        self.events: deque[Event] = deque(maxlen=500)

    def add(self, event: Event) -> None:
        self.events.append(event)
        self.write(Text.assemble((fmt.clock(event.time), "dim"), " ",
                                 (event.text, LEVEL_STYLES.get(event.level, ""))))


HELP = """\
[b]Keys[/b]
  [b]↑ ↓ PgUp PgDn Home End[/b]  select a route (its queue shows in the X-ray)
  [b]r[/b]        reload gatewayd's configuration; the outcome shows as a notice and an event
  [b]l[/b]        type the selected route's max_concurrency and max_queue (set_limit)
  [b]+[/b] / [b]=[/b]    raise its max_concurrency by 1   [b]-[/b]  lower it by 1; live until the next reload
  [b]a[/b]        the X-ray follows the most pressed route again (moving the cursor picks one)
  [b]u[/b]        the upstreams' servers and their state in place of the trends, and back
  [b]c[/b]        the selected route's top clients in place of the events, and back
  [b]s[/b]        sort by the next column      [b]S[/b]  reverse the order (or click a header)
  [b]p[/b]        pause / resume the screen (data keeps being collected)
  [b]?[/b]        this help                     [b]q[/b]  quit

[b]Routes[/b]  in flight / max_concurrency, queued / max_queue, (wide: the oldest waiter's age),
  served/s (answered by the upstream) and shed/s (answered by the gateway: 503s, errors)
  over the last second, p50 and p99 of served requests, (wide: 503 totals by reason),
  cancellations and upstream errors (totals; red while rising); 158 columns and more:
  429 totals by reason when the gatewayd counts them (else under the clients pane); with a
  WebSocket route and room left, its tunnels open / max_tunnels and 503 tunnels_full total;
  with a route that refused requests for their deadline or class and room left, its
  503 deadline, 503 preempted and 504 route_timeout totals.
[b]X-ray[/b]   the waiters of the most pressed route (deepest queue, then oldest waiter),
  or of the route under the cursor once you move it, with their class (when not default)
  and the seconds left of their deadline (when they have one); above them, for a WebSocket
  route, its tunnels open / max_tunnels and its upgrades refused at the cap (full); for a
  route with estimates, its service time and completions a second, then its 503 deadline,
  503 preempted and 504 route_timeout totals.
[b]Trends[/b]  the last minutes, one point an update: req/s, queued requests (all routes),
  event-loop lag, GC pause milliseconds per second.
[b]Clients[/b] who floods the selected route: the most queue places now, then the most 429s since
  start (limited: rate_limited, capped: client_queue_full); asked for once a second while shown.
[b]Events[/b]  reloads with their changes or error, limit changes, connection lost and restored.

Press [b]?[/b] or [b]Esc[/b] to close."""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [("escape", "dismiss", "Close"), ("question_mark", "dismiss", "Close"),
                ("q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        yield Static(HELP, id="help")
