"""The upstreams pane (each upstream's servers and their state) and the limits
dialog (type max_concurrency and max_queue of a route)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static

from . import fmt
from .model import ServerView

STATE_STYLES = {"up": "green", "kept": "yellow", "trial": "yellow", "down": "bold red",
                "unhealthy": "bold red", "ejected": "bold red"}


def short_url(url: str) -> str:
    """``host:port`` of a server's URL (its path, if any, after it)."""
    parts = urlsplit(url)
    if not parts.netloc:
        return url
    return parts.netloc + (parts.path if parts.path not in ("", "/") else "")


def servers_summary(servers: list[ServerView]) -> tuple[str, str]:
    """``2/3 up`` and its style: red when a server is out of rotation."""
    if not servers:
        return "", ""
    up = sum(s.healthy for s in servers)
    return f"{up}/{len(servers)} up", "bold green" if up == len(servers) else "bold red"


def upstreams_text(servers: list[ServerView]) -> Text:
    """One line an upstream (how many servers are in rotation), then one a server:
    its state, host:port, in flight and failures, the unhealthy ones first."""
    if not servers:
        return Text("no upstream servers (handlers only, or an older gatewayd)", style="dim")
    out = Text(no_wrap=True, overflow="ellipsis")
    names = list(dict.fromkeys(s.upstream for s in servers))
    for name in names:
        group = [s for s in servers if s.upstream == name]
        text, style = servers_summary(group)
        if out:
            out.append("\n")
        out.append(f"{name} ", style="bold")
        out.append(text, style=style)
        for s in sorted(group, key=lambda s: s.healthy):
            out.append("\n ")
            out.append(f"{s.state or '?':9}", style=STATE_STYLES.get(s.state, "dim"))
            out.append(f" {short_url(s.url)}")
            extra = f" {fmt.count(s.in_flight)} in flight" if s.in_flight else ""
            if s.failures:
                extra += f" {fmt.count(s.failures)} fail"
            out.append(extra, style="dim")
    return out


class UpstreamPane(Static):
    """Each upstream's servers and their state (key u swaps it with the trends)."""

    _shown: Any = None

    def show(self, servers: list[ServerView]) -> None:
        if servers == self._shown:
            return
        self._shown = servers
        text, _ = servers_summary(servers)
        self.border_subtitle = text
        self.update(upstreams_text(servers), layout=False)


# --------------------------------------------------------------------------- limits dialog
def parse_limits(concurrency: str, queue: str, current: tuple[int | None, int | None]
                 ) -> tuple[dict[str, int], str | None]:
    """The set_limit fields to send (only the ones typed and changed), or an error."""
    out: dict[str, int] = {}
    for key, text, least, now in (("max_concurrency", concurrency, 1, current[0]),
                                  ("max_queue", queue, 0, current[1])):
        text = text.strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            return {}, f"{key}: expected a whole number, got {text!r}"
        if value < least:
            return {}, f"{key}: expected a number >= {least}, got {value}"
        if value != now:
            out[key] = value
    return out, None


class LimitScreen(ModalScreen[dict[str, int] | None]):
    """Type a route's max_concurrency and max_queue; Enter sends, Esc cancels."""

    BINDINGS = [("escape", "cancel", "Cancel")]
    AUTO_FOCUS = "#max_concurrency"

    def __init__(self, route: str, concurrency: int | None, queue: int | None) -> None:
        super().__init__()
        self.route = route
        self.current = (concurrency, queue)

    def compose(self) -> ComposeResult:
        with Vertical(id="limits"):
            yield Label(f"Limits of route [b]{self.route}[/b] (live until the next reload)")
            yield Label("max_concurrency (>= 1)")
            yield Input(str(self.current[0] or ""), type="integer", id="max_concurrency")
            yield Label("max_queue (>= 0)")
            yield Input("" if self.current[1] is None else str(self.current[1]), type="integer",
                        id="max_queue")
            yield Label("", id="limits-error")
            yield Label("[dim]Tab: next field · Enter: set · Esc: cancel[/dim]")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        fields, error = parse_limits(self.query_one("#max_concurrency", Input).value,
                                     self.query_one("#max_queue", Input).value, self.current)
        if error:
            self.query_one("#limits-error", Label).update(Text(error, style="bold red"))
            return
        self.dismiss(fields)

    def action_cancel(self) -> None:
        self.dismiss(None)
