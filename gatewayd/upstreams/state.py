"""Upstream servers' state in one process: the shape each process exports (merged
over workers by ``control.merge``), and ``set_server_state``, the ``server_state``
control command's work in one process.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, TypedDict

from ..proxy.exchange import Upstream

# server_state command: the words accepted (HAProxy's "set server ... state" words too)
COMMAND_STATES = {"up": True, "ready": True, "down": False, "drain": False, "maint": False}


class ServerExport(TypedDict):
    """One server as one process sees it (``ServerState.export``)."""

    url: str
    weight: int
    state: str  # up, kept, trial, ejected, unhealthy or down (see control.merge.STATES)
    healthy: bool
    ejected_until: float | None  # epoch seconds
    in_flight: int
    requests: int
    failures: int
    consecutive_failures: int
    ejections: int
    ejections_refused: int
    last_error: str | None
    last_error_time: float | None
    last_check: str | None


class UpstreamExport(TypedDict):
    """An upstream with servers as one process sees it (``HttpUpstream.pool_export``)."""

    balance: str
    retried: int
    no_healthy_server: int
    servers: list[ServerExport]


class ServerStateSet(TypedDict):
    """The ``server_state`` command's answer: the servers set, by URL."""

    ok: Literal[True]
    upstream: str
    servers: list[str]
    state: str  # "up" or "down"


class ServerStateRefused(TypedDict):
    ok: Literal[False]
    error: str


def check_state(state: str) -> str | None:
    """The error for a state word the command does not know, else None."""
    if state in COMMAND_STATES:
        return None
    return f'state: expected "up" or "down" ("ready", "drain", "maint" as in HAProxy), got {state!r}'


def set_server_state(upstreams: Mapping[str, Upstream], upstream: str, server: str,
                     state: str) -> ServerStateSet | ServerStateRefused:
    """Set a server up or down by hand in this process; the control answer.

    ``server`` is its URL as configured or its ``host:port``. A server set down
    gets no requests until set up; set up, it is back in rotation at once, its
    ejection and health-check verdict forgotten. Either lasts until the next
    change by hand or a reload that changes the upstream.
    """
    error = check_state(state)
    if error is not None:
        return {"ok": False, "error": error}
    u = upstreams.get(upstream)
    if u is None:
        return {"ok": False, "error": f"no upstream {upstream!r}"}
    setter = getattr(u, "set_server_state", None)
    if setter is None:
        return {"ok": False, "error": f"upstream {upstream!r} has a handler, not servers"}
    up = COMMAND_STATES[state]
    matched: list[str] = setter(server, up)
    if not matched:
        known = ", ".join(s.url for s in getattr(u, "servers", ()))
        return {"ok": False, "error": f"upstream {upstream!r} has no server {server!r}; expected one of {known}"}
    return {"ok": True, "upstream": upstream, "servers": matched, "state": "up" if up else "down"}
