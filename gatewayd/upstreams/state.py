"""Upstream servers' state across processes: each process exports its view,
``present`` merges the views of all workers into the snapshot's ``upstreams``,
and ``set_server_state`` is the control command's work in one process.

Health is judged by each worker on its own traffic. Merged, a server is
``healthy`` only when every worker that has it takes requests for it, its
``state`` is the worst any worker reports, and its counters are sums.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..proxy.exchange import Upstream

# Worst first: the merged state of a server is the first any worker reports.
STATES = ("down", "unhealthy", "ejected", "trial", "kept", "up")
# server_state command: the words accepted (HAProxy's "set server ... state" words too)
COMMAND_STATES = {"up": True, "ready": True, "down": False, "drain": False, "maint": False}
_SUMMED = ("in_flight", "requests", "failures", "ejections", "ejections_refused")
_COUNTERS = ("requests", "failures", "ejections", "ejections_refused")


def export_upstreams(upstreams: Mapping[str, Upstream]) -> dict[str, Any]:
    """This process's servers, by upstream name (upstreams with servers only)."""
    out = {}
    for name, u in upstreams.items():
        view = getattr(u, "pool_export", None)
        if view is not None:
            out[name] = view()
    return out


def present_upstreams(exports: list[dict[str, Any]], retired: dict[str, Any] | None = None
                      ) -> list[dict[str, Any]]:
    """The snapshot's ``upstreams``: one entry per upstream with servers, workers merged."""
    merged: dict[str, dict[str, Any]] = {}
    index: dict[tuple[str, int, str], dict[str, Any]] = {}
    for e in exports:
        for name, u in e.get("upstreams", {}).items():
            m = merged.get(name)
            if m is None:
                m = merged[name] = {"name": name, "balance": u["balance"], "retried": 0,
                                    "no_healthy_server": 0, "servers": []}
            m["retried"] += u["retried"]
            m["no_healthy_server"] += u["no_healthy_server"]
            for i, s in enumerate(u["servers"]):
                key = (name, i, s["url"])
                into = index.get(key)
                if into is None:
                    into = index[key] = dict(s, workers=0, healthy_workers=0)
                    m["servers"].append(into)
                else:
                    _merge(into, s)
                into["workers"] += 1
                into["healthy_workers"] += 1 if s["healthy"] else 0
    gone = (retired or {}).get("upstreams", {})
    for name, m in merged.items():
        old = gone.get(name)
        if old is None:
            continue
        m["retried"] += old["retried"]
        m["no_healthy_server"] += old["no_healthy_server"]
        for s in m["servers"]:
            for k, n in old["servers"].get(s["url"], {}).items():
                s[k] += n
    return list(merged.values())


def _merge(into: dict[str, Any], s: dict[str, Any]) -> None:
    for k in _SUMMED:
        into[k] += s[k]
    if STATES.index(s["state"]) < STATES.index(into["state"]):
        into["state"] = s["state"]
    into["healthy"] = into["healthy"] and s["healthy"]
    if s["ejected_until"] is not None:
        into["ejected_until"] = max(into["ejected_until"] or 0.0, s["ejected_until"])
    into["consecutive_failures"] = max(into["consecutive_failures"], s["consecutive_failures"])
    if s["last_error_time"] is not None and (into["last_error_time"] is None
                                             or s["last_error_time"] > into["last_error_time"]):
        into["last_error"], into["last_error_time"] = s["last_error"], s["last_error_time"]
    if s["last_check"] not in (None, "ok"):
        into["last_check"] = s["last_check"]


def retire_upstreams(retired: dict[str, Any], gone: dict[str, Any]) -> None:
    """Keep the server counters of a worker that exited, so totals never go backwards."""
    ups = retired.setdefault("upstreams", {})
    for name, u in gone.get("upstreams", {}).items():
        into = ups.setdefault(name, {"retried": 0, "no_healthy_server": 0, "servers": {}})
        into["retried"] += u["retried"]
        into["no_healthy_server"] += u["no_healthy_server"]
        for s in u["servers"]:
            counts = into["servers"].setdefault(s["url"], dict.fromkeys(_COUNTERS, 0))
            for k in _COUNTERS:
                counts[k] += s[k]


def check_state(state: str) -> str | None:
    """The error for a state word the command does not know, else None."""
    if state in COMMAND_STATES:
        return None
    return f'state: expected "up" or "down" ("ready", "drain", "maint" as in HAProxy), got {state!r}'


def set_server_state(upstreams: Mapping[str, Upstream], upstream: str, server: str,
                     state: str) -> dict[str, Any]:
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
    matched = setter(server, up)
    if not matched:
        known = ", ".join(s.url for s in getattr(u, "servers", ()))
        return {"ok": False, "error": f"upstream {upstream!r} has no server {server!r}; expected one of {known}"}
    return {"ok": True, "upstream": upstream, "servers": matched, "state": "up" if up else "down"}
