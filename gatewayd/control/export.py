"""One process's raw figures, read from its Runtime: counters, histogram buckets
and gauges, summable over workers (``merge``) before anything is derived from them
(``present``). A worker sends its export to the master; a single process presents
its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, TypedDict

from ..proxy.admission import Gate, Prioritized
from ..proxy.deadlines import CLASSES, Estimator
from ..stats.metrics import Counts, RouteCounters, RouteStats
from ..stats.process import GcExport, cpu_seconds, fd_limit, open_fds, rss_bytes
from ..upstreams.state import UpstreamExport
from .protocol import ClientRow, Estimates, LoopLag, ProxyProtocolSnapshot, TlsSnapshot, Waiter

if TYPE_CHECKING:
    from ..proxy.exchange import Route, Upstream
    from ..runtime.state import Runtime

XRAY_SUMMARY = 5  # waiters listed per route in a snapshot (the queue command lists all)


class RouteTotals(RouteCounters):
    """A route's counters (``rejected`` with ``tunnels_full``, ``deadline``, ``preempted``
    and ``route_timeout`` too): what a worker that exits leaves behind (``merge.retire``)."""

    tunnels_total: int  # WebSocket tunnels opened since start


class RouteFigures(RouteTotals):
    """A route's counters and its gates' gauges: one process's, or summed over all."""

    tunnels: int  # WebSocket tunnels open now
    in_flight: int
    queued: int
    queued_by_priority: Counts  # by class (CLASSES)
    estimates: Estimates  # rate summed, service time the largest
    oldest_wait_ms: float
    waiters: list[Waiter]  # the oldest few (XRAY_SUMMARY) of each process


class RouteExport(RouteFigures):
    """A route in one process."""

    limit: int  # this process's share of the gateway-wide limits
    queue_limit: int


class ProcessFigures(TypedDict):
    """One process's own figures: everything but its routes."""

    pid: int
    index: int
    started: float
    connections: int
    accepted: int
    bad_requests: int
    client_connections_refused: int  # over max_connections_per_client
    unrouted: Counts
    deferred_reads: int
    tasks: int
    loop_lag_ms: LoopLag
    gc: GcExport
    rss_bytes: int
    open_fds: int
    fd_limit: int
    cpu_s: float
    generation: int
    upstreams: dict[str, UpstreamExport]
    tls: TlsSnapshot  # this process's handshakes; the certificates of its generation
    proxy_protocol: ProxyProtocolSnapshot  # this process's PROXY protocol headers


class ProcessExport(ProcessFigures):
    """What a worker sends its master: its figures and its routes by name."""

    routes: dict[str, RouteExport]


def waiters(runtime: Runtime, route: str, limit: int | None = None) -> list[Waiter]:
    """The route's waiters, oldest first: the queue X-ray."""
    r = runtime.table.routes.get(route)
    if r is None:
        return []
    now = runtime.lag._loop.time() if runtime.lag._loop else 0.0
    out: list[Waiter] = []
    pid = os.getpid()
    for w in r.gate.waiters:
        deadline = w.deadline
        out.append({"wait_ms": round((now - w.since) * 1000, 3), "method": w.method,
                    "path": w.path, "client": w.client, "pid": pid, "priority": CLASSES[w.priority],
                    "deadline_in": round(max(deadline - now, 0.0), 3) if deadline else None})
        if limit is not None and len(out) >= limit:
            break
    return out


def rejected(stats: RouteStats) -> Counts:
    """A route's refusals by reason: ``RouteStats.export``'s and those it counts apart
    (WebSocket tunnels, SPEC §11; deadlines and classes, SPEC §12)."""
    return {"queue_full": stats.queue_full, "queue_timeout": stats.queue_timeout,
            "client_queue_full": stats.client_queue_full, "rate_limited": stats.rate_limited,
            "tunnels_full": stats.tunnels_full, "deadline": stats.deadline, "preempted": stats.preempted,
            "route_timeout": stats.route_timeout}


def queued_by_priority(route: Route) -> Counts:
    """The route's waiters by class. A route that ranks its waiters (``priority_header``)
    counts them by class; on another, every waiter is of the route's ``priority``."""
    waiters = route.gate.waiters
    if isinstance(waiters, Prioritized):
        return dict(zip(CLASSES, waiters.by_class(), strict=True))
    counts = dict.fromkeys(CLASSES, 0)
    counts[route.config.priority] = len(waiters)
    return counts


def estimator(gate: Gate, now: float | None) -> Estimator:
    """The route's estimator, sampled now if a sample is due (as it is without a loop)."""
    return gate.estimator if now is None else gate.estimate(now)


def estimates(e: Estimator) -> Estimates:
    """What the snapshot says of a route's estimates."""
    return {"completion_rate": round(e.rate, 3),
            "service_ms": round(e.service * 1000, 3) if e.service > 0 else None}


def clients(runtime: Runtime, route: str) -> list[ClientRow]:
    """This process's clients of a route: queue places now (counted from the X-ray's
    waiters) and refusals since start; every client with any, unsorted."""
    r = runtime.table.routes.get(route)
    if r is None:
        return []
    rows: dict[str, ClientRow] = {}

    def row(client: str) -> ClientRow:
        found = rows.get(client)
        if found is None:
            found = rows[client] = {"client": client, "queued": 0, "rate_limited": 0,
                                    "client_queue_full": 0}
        return found
    for w in r.gate.waiters:
        row(w.client)["queued"] += 1
    for client, refused in r.stats.clients.export().items():
        one = row(client)
        one["rate_limited"] += refused.get("rate_limited", 0)
        one["client_queue_full"] += refused.get("client_queue_full", 0)
    return list(rows.values())


def export(runtime: Runtime) -> ProcessExport:
    """This process's raw figures."""
    loop = runtime.lag._loop
    loop_now = loop.time() if loop else 0.0
    routes: dict[str, RouteExport] = {}
    for name, r in runtime.table.routes.items():
        gate = r.gate
        stats = r.stats
        counters = stats.export()
        counters["rejected"] = rejected(stats)
        routes[name] = {
            **counters,
            "tunnels": stats.tunnels, "tunnels_total": stats.tunnels_total,
            "in_flight": gate.in_flight, "queued": len(gate.waiters),
            "queued_by_priority": queued_by_priority(r),
            "estimates": estimates(estimator(gate, loop_now if loop else None)),
            "limit": gate.limit, "queue_limit": gate.max_queue,
            "oldest_wait_ms": round(gate.oldest_wait(loop_now) * 1000, 3),
            "waiters": waiters(runtime, name, XRAY_SUMMARY),
        }
    return {**process_figures(runtime), "routes": routes}


def process_figures(runtime: Runtime) -> ProcessFigures:
    """This process's figures other than its routes."""
    return {
        "pid": os.getpid(),
        "index": runtime.worker_index,
        "started": runtime.started,
        "connections": runtime.connections,
        "accepted": runtime.acceptor.accepted,
        "bad_requests": runtime.server.bad_requests,
        "client_connections_refused": runtime.server.client_connections_refused,
        "unrouted": {str(c): n for c, n in runtime.server.unrouted.items()},
        "deferred_reads": runtime.server.deferred_reads,
        "tasks": runtime.tasks.live,
        "loop_lag_ms": {"last": runtime.lag.last * 1000, "max": runtime.lag.max * 1000},
        "gc": runtime.gc.export(),
        "rss_bytes": rss_bytes(),
        "open_fds": open_fds(),
        "fd_limit": fd_limit(),
        "cpu_s": cpu_seconds(),
        "generation": runtime.generation,
        "upstreams": export_upstreams(runtime.table.upstreams),
        "tls": export_tls(runtime),
        "proxy_protocol": {"headers": runtime.proxy_headers.received,
                           "refused": runtime.proxy_headers.refused},
    }


def export_tls(runtime: Runtime) -> TlsSnapshot:
    """This process's TLS handshakes since start and the certificates in force."""
    counts = runtime.handshakes
    return {"handshakes": counts.handshakes, "handshake_errors": counts.errors,
            "certificates": [{"cert": c.name, "hosts": list(c.hosts), "not_after": c.not_after}
                             for c in runtime.certificates]}


def export_upstreams(upstreams: Mapping[str, Upstream]) -> dict[str, UpstreamExport]:
    """This process's servers, by upstream name (upstreams with servers only)."""
    out = {}
    for name, u in upstreams.items():
        view = getattr(u, "pool_export", None)
        if view is not None:
            out[name] = view()
    return out
