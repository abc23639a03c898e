"""The clients pane (key c): who holds a route's queue places and who is refused
most, from the ``clients`` command, so an operator can see who is flooding.

:func:`client_views` reads an answer defensively (like the snapshot readers of
:mod:`dashboard.model`); :class:`ClientsPane` renders what it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from . import fmt
from .model import number, text_at

CLIENTS_EVERY = 1.0  # seconds between two clients commands, and only while the pane is shown
CLIENTS_TOP = 10  # clients asked for (the pane shows as many as fit)


@dataclass(frozen=True)
class ClientView:
    """One line of the pane: a client address and its figures on the route."""

    client: str
    queued: float | None  # queue places held now
    rate_limited: float | None  # 429 rate_limited since start
    client_queue_full: float | None  # 429 client_queue_full since start


def client_views(answer: Any) -> list[ClientView]:
    """The clients of a ``clients`` answer, in the daemon's order (the heaviest first)."""
    items = answer.get("clients") if isinstance(answer, dict) else None
    out: list[ClientView] = []
    for c in items if isinstance(items, list) else []:
        name = text_at(c, "client")
        if name is not None:
            out.append(ClientView(name, number(c.get("queued")), number(c.get("rate_limited")),
                                  number(c.get("client_queue_full"))))
    return out


def unknown_command(answer: dict[str, Any]) -> bool:
    """The answer of a gatewayd older than the ``clients`` command."""
    error = answer.get("error")
    return answer.get("ok") is not True and isinstance(error, str) and error.startswith("unknown cmd")


def clients_body(route: str | None, answer: dict[str, Any] | None) -> Table | Text:
    """The pane's content: the clients table, or a line saying why there is none."""
    if route is None:
        return Text("no route selected", style="dim")
    if answer is None:
        return Text(f"{route}: asking gatewayd…", style="dim")
    if unknown_command(answer):
        return Text("this gatewayd has no clients command (an older version): "
                    "upgrade it to see who holds the queue", style="yellow")
    if answer.get("ok") is not True:
        return Text(f"clients {route}: {answer.get('error') or 'refused'}", style="red")
    views = client_views(answer)
    if not views:
        return Text(f"{route}: no client queued or refused", style="dim")
    # one cell between columns: an IPv4 address and the three counts fit 38 cells
    t = Table(box=None, expand=True, padding=(0, 0, 0, 1), show_edge=False, header_style="dim")
    t.add_column("client", ratio=1, min_width=15, no_wrap=True, overflow="ellipsis")
    t.add_column("queued", justify="right", no_wrap=True)
    t.add_column("limited", justify="right", no_wrap=True)  # 429 rate_limited
    t.add_column("capped", justify="right", no_wrap=True)  # 429 client_queue_full
    for v in views:
        t.add_row(Text(v.client, style="bold" if v is views[0] else ""),
                  Text(fmt.count(v.queued), style="yellow" if v.queued else ""),
                  Text(fmt.count(v.rate_limited), style="red" if v.rate_limited else ""),
                  Text(fmt.count(v.client_queue_full), style="red" if v.client_queue_full else ""))
    return t


def refusals_line(rejected: Any) -> str:
    """The route's 429 totals by reason (the pane's subtitle), those its snapshot has
    (an older gatewayd: none): limited is rate_limited, capped client_queue_full."""
    if not isinstance(rejected, dict):
        return ""
    parts = [f"{label} {fmt.count(number(rejected.get(key)))}"
             for key, label in (("rate_limited", "limited"), ("client_queue_full", "capped"))
             if number(rejected.get(key)) is not None]
    return "429: " + " · ".join(parts) if parts else ""


class ClientsPane(Static):
    """The top clients of the route under the cursor (in place of the events pane)."""

    _shown: Any = None

    def show(self, route: str | None, answer: dict[str, Any] | None, rejected: Any) -> None:
        """``answer``: the last ``clients`` answer for ``route`` (None: not yet);
        ``rejected``: the route's ``rejected`` object from the snapshot."""
        if (route, answer, rejected) == self._shown:
            return
        self._shown = (route, answer, rejected)
        self.border_title = f"Clients: {route}" if route else "Clients"
        self.border_subtitle = refusals_line(rejected)
        self.update(clients_body(route, answer), layout=False)

