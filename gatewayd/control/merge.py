"""Summing the exports of workers: counters and buckets add up, gauges add up (or
take the maximum, for ``max`` and age fields), and the counters of workers that
exited are kept (``retire``) so that gateway-wide totals never go backwards when
a worker is replaced. A route's open tunnels are a gauge (a worker's tunnels end with
it); the tunnels it opened are a counter, kept. A route's estimates are each worker's
of its own share: the completion rates add up, the service time is the largest.

TLS handshakes sum like the other counters; the certificates are those of the
configuration in force, the same in every worker, so they are taken once.

Upstream servers are judged by each worker on its own traffic. Merged, a server
is ``healthy`` only when every worker that has it takes requests for it, its
``state`` is the worst any worker reports, and its counters are sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict

from ..stats.metrics import LATENCY_BUCKETS, PAUSE_BUCKETS, RESPONSE_CLASSES, Counts, HistogramExport
from ..stats.process import GcExport, GcGeneration, GcPause
from ..upstreams.state import ServerExport
from .export import XRAY_SUMMARY, ProcessExport, ProcessFigures, RouteFigures, RouteTotals
from .protocol import (
    ClientRow,
    Estimates,
    ProxyProtocolSnapshot,
    ServerSnapshot,
    TlsSnapshot,
    UpstreamSnapshot,
    Waiter,
)

# Worst first: the merged state of a server is the first any worker reports.
STATES = ("down", "unhealthy", "ejected", "trial", "kept", "up")
ServerCounter = Literal["requests", "failures", "ejections", "ejections_refused"]
_SERVER_COUNTERS: tuple[ServerCounter, ...] = ("requests", "failures", "ejections", "ejections_refused")
_ROUTE_COUNTS: tuple[Literal["responses", "codes", "rejected", "upstream_errors"], ...] = (
    "responses", "codes", "rejected", "upstream_errors")


class RetiredUpstream(TypedDict):
    retried: int
    no_healthy_server: int
    servers: dict[str, Counts]  # by URL: the counters of _SERVER_COUNTERS


class Retired(TypedDict, total=False):
    """The counters of workers that exited, summed; empty until one does."""

    unrouted: Counts
    routes: dict[str, RouteTotals]
    upstreams: dict[str, RetiredUpstream]
    tls: Counts  # handshakes, handshake_errors
    proxy_protocol: Counts  # headers, refused
    client_connections_refused: int


def empty_histogram(bounds: tuple[float, ...]) -> HistogramExport:
    return {"counts": [0] * (len(bounds) + 1), "sum": 0.0, "count": 0}


def add_histogram(into: HistogramExport | None, h: HistogramExport) -> HistogramExport:
    """``into`` plus ``h`` (``into`` changed in place); a copy of ``h`` when None."""
    if into is None:
        return {"counts": list(h["counts"]), "sum": h["sum"], "count": h["count"]}
    into["counts"] = [a + b for a, b in zip(into["counts"], h["counts"], strict=True)]
    into["sum"] += h["sum"]
    into["count"] += h["count"]
    return into


def add_counts(into: Counts, more: Counts) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


# ----------------------------------------------------------------------------- routes
def merge_route(name: str, exports: Sequence[ProcessExport], retired: Retired | None) -> RouteFigures:
    """Route ``name`` summed over ``exports`` and the workers that exited; its waiters
    the oldest of all."""
    live = [e["routes"][name] for e in exports if name in e["routes"]]
    gone = retired.get("routes", {}).get(name) if retired else None
    if gone is None and len(live) == 1:
        return live[0]  # one process: its export was built for this snapshot, taken as it is
    parts: list[RouteTotals] = [*live, gone] if gone is not None else list(live)
    responses = {c: 0 for c in RESPONSE_CLASSES}
    codes: Counts = {}
    rejected = {"queue_full": 0, "queue_timeout": 0, "client_queue_full": 0, "rate_limited": 0,
                "tunnels_full": 0, "deadline": 0, "preempted": 0, "route_timeout": 0}
    errors: Counts = {}
    latency: HistogramExport | None = None
    own: HistogramExport | None = None
    qwait: HistogramExport | None = None
    requests = cq = cf = opened = 0
    for p in parts:
        requests += p["requests"]
        opened += p["tunnels_total"]
        add_counts(responses, p["responses"])
        add_counts(codes, p["codes"])
        add_counts(rejected, p["rejected"])
        add_counts(errors, p["upstream_errors"])
        cq += p["cancelled_queued"]
        cf += p["cancelled_in_flight"]
        latency = add_histogram(latency, p["latency"])
        own = add_histogram(own, p["gateway_latency"])
        qwait = add_histogram(qwait, p["queue_wait"])
    in_flight = queued = tunnels = 0
    oldest = 0.0
    xray: list[Waiter] = []
    by_priority: Counts = {}
    estimates: Estimates = {"completion_rate": 0.0, "service_ms": None}
    for r in live:
        tunnels += r["tunnels"]  # a gauge: the tunnels of a worker that exited closed with it
        in_flight += r["in_flight"]
        queued += r["queued"]
        add_counts(by_priority, r["queued_by_priority"])
        add_estimates(estimates, r["estimates"])
        oldest = max(oldest, r["oldest_wait_ms"])
        xray.extend(r["waiters"])
    xray.sort(key=_age)
    return {
        "requests": requests, "responses": responses, "codes": codes, "rejected": rejected,
        "cancelled_queued": cq, "cancelled_in_flight": cf, "upstream_errors": errors,
        "latency": latency or empty_histogram(LATENCY_BUCKETS),
        "gateway_latency": own or empty_histogram(LATENCY_BUCKETS),
        "queue_wait": qwait or empty_histogram(LATENCY_BUCKETS),
        "tunnels": tunnels, "tunnels_total": opened,
        "in_flight": in_flight, "queued": queued, "queued_by_priority": by_priority,
        "estimates": estimates, "oldest_wait_ms": oldest,
        "waiters": xray[:XRAY_SUMMARY],
    }


def add_estimates(into: Estimates, more: Estimates) -> None:
    """A worker's estimates into the route's: rates summed (each worker completes its
    share), the service time the largest known."""
    into["completion_rate"] = round(into["completion_rate"] + more["completion_rate"], 3)
    service = more["service_ms"]
    if service is not None and (into["service_ms"] is None or service > into["service_ms"]):
        into["service_ms"] = service


def _age(w: Waiter) -> float:
    return -w["wait_ms"]


def worker_totals(e: ProcessExport) -> tuple[int, int, int]:
    """Requests, in flight and queued over the routes of one export."""
    routes = e["routes"].values()
    return (sum(r["requests"] for r in routes), sum(r["in_flight"] for r in routes),
            sum(r["queued"] for r in routes))


# ----------------------------------------------------------------------------- process figures
def merge_gc(exports: Sequence[ProcessFigures]) -> GcExport:
    """The workers' GC figures: counts and totals summed, ``last`` and ``max`` the
    largest, the most recent pauses of all (each with its worker's pid)."""
    collections = [0, 0, 0]
    pauses = 0
    pause_last = pause_max = pause_total = 0.0
    gens: list[GcGeneration] = [
        {"generation": g, "count": 0, "collected": 0, "last_ms": 0.0, "max_ms": 0.0,
         "total_ms": 0.0} for g in range(3)
    ]
    hists: list[HistogramExport | None] = [None, None, None]
    recent: list[GcPause] = []
    for e in exports:
        g = e["gc"]
        collections = [a + b for a, b in zip(collections, g["collections"], strict=True)]
        pauses += g["pauses"]
        pause_last = max(pause_last, g["pause_ms"]["last"])
        pause_max = max(pause_max, g["pause_ms"]["max"])
        pause_total += g["pause_ms"]["total"]
        for i, (mine, theirs) in enumerate(zip(gens, g["generations"], strict=True)):
            mine["count"] += theirs["count"]
            mine["collected"] += theirs["collected"]
            mine["last_ms"] = max(mine["last_ms"], theirs["last_ms"])
            mine["max_ms"] = max(mine["max_ms"], theirs["max_ms"])
            mine["total_ms"] += theirs["total_ms"]
            if "histogram" in theirs:
                hists[i] = add_histogram(hists[i], theirs["histogram"])
        recent.extend({**r, "pid": e["pid"]} for r in g["recent"])
    recent.sort(key=lambda r: r["time"])
    for mine, h in zip(gens, hists, strict=True):
        mine["histogram"] = h or empty_histogram(PAUSE_BUCKETS)
    return {"collections": collections, "pauses": pauses,
            "pause_ms": {"last": pause_last, "max": pause_max, "total": pause_total},
            "generations": gens, "recent": recent[-16:],
            "frozen": max((e["gc"]["frozen"] for e in exports), default=0)}


def merge_unrouted(exports: Sequence[ProcessFigures], retired: Retired | None) -> Counts:
    """Answers given without a route (refused requests, head timeouts, no_route), by
    status code, summed over the workers, those that exited included."""
    codes: Counts = dict(retired.get("unrouted", {})) if retired else {}
    for e in exports:
        add_counts(codes, e.get("unrouted", {}))
    return codes


_TLS_COUNTERS: tuple[Literal["handshakes", "handshake_errors"], ...] = ("handshakes", "handshake_errors")


def merge_tls(exports: Sequence[ProcessFigures], retired: Retired | None) -> TlsSnapshot:
    """Handshakes summed over the workers, those that exited included; the certificates
    of the newest generation any worker runs (mid-reload, workers may differ)."""
    counts: Counts = dict((retired or {}).get("tls", {}))
    newest: ProcessFigures | None = None
    for e in exports:
        tls = e.get("tls")
        if tls is None:
            continue
        add_counts(counts, {k: tls[k] for k in _TLS_COUNTERS})
        if newest is None or e["generation"] > newest["generation"]:
            newest = e
    certificates = newest["tls"]["certificates"] if newest is not None else []
    return {"handshakes": counts.get("handshakes", 0),
            "handshake_errors": counts.get("handshake_errors", 0),
            "certificates": certificates}


def merge_proxy_protocol(exports: Sequence[ProcessFigures], retired: Retired | None) -> ProxyProtocolSnapshot:
    """PROXY protocol headers and refusals summed over the workers, those that exited
    included."""
    counts: Counts = dict((retired or {}).get("proxy_protocol", {}))
    for e in exports:
        figures = e.get("proxy_protocol")
        if figures is not None:
            add_counts(counts, {"headers": figures["headers"], "refused": figures["refused"]})
    return {"headers": counts.get("headers", 0), "refused": counts.get("refused", 0)}


# ----------------------------------------------------------------------------- upstreams
def merge_upstreams(exports: Sequence[ProcessFigures], retired: Retired | None = None
                    ) -> list[UpstreamSnapshot]:
    """The snapshot's ``upstreams``: one entry per upstream with servers, workers merged."""
    merged: dict[str, UpstreamSnapshot] = {}
    index: dict[tuple[str, int, str], ServerSnapshot] = {}
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
                    into = index[key] = {**s, "workers": 0, "healthy_workers": 0}
                    m["servers"].append(into)
                else:
                    _merge_server(into, s)
                into["workers"] += 1
                into["healthy_workers"] += 1 if s["healthy"] else 0
    gone = (retired or {}).get("upstreams", {})
    for name, m in merged.items():
        old = gone.get(name)
        if old is None:
            continue
        m["retried"] += old["retried"]
        m["no_healthy_server"] += old["no_healthy_server"]
        for srv in m["servers"]:
            counts = old["servers"].get(srv["url"], {})
            for k in _SERVER_COUNTERS:
                if k in counts:
                    srv[k] += counts[k]
    return list(merged.values())


def _merge_server(into: ServerSnapshot, s: ServerExport) -> None:
    into["in_flight"] += s["in_flight"]
    into["requests"] += s["requests"]
    into["failures"] += s["failures"]
    into["ejections"] += s["ejections"]
    into["ejections_refused"] += s["ejections_refused"]
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


# ----------------------------------------------------------------------------- retiring
def retire(retired: Retired, gone: ProcessExport) -> None:
    """Keep the counters of a worker that exited (its gauges go with it)."""
    _retire_upstreams(retired, gone)
    add_counts(retired.setdefault("unrouted", {}), gone.get("unrouted", {}))
    retired["client_connections_refused"] = (retired.get("client_connections_refused", 0)
                                             + gone.get("client_connections_refused", 0))
    tls = gone.get("tls")
    if tls is not None:
        add_counts(retired.setdefault("tls", {}), {k: tls[k] for k in _TLS_COUNTERS})
    proxied = gone.get("proxy_protocol")
    if proxied is not None:
        add_counts(retired.setdefault("proxy_protocol", {}),
                   {"headers": proxied["headers"], "refused": proxied["refused"]})
    routes = retired.setdefault("routes", {})
    for name, r in gone.get("routes", {}).items():
        into = routes.get(name)
        if into is None:
            routes[name] = {
                "requests": r["requests"], "responses": dict(r["responses"]), "codes": dict(r["codes"]),
                "rejected": dict(r["rejected"]), "cancelled_queued": r["cancelled_queued"],
                "cancelled_in_flight": r["cancelled_in_flight"],
                "upstream_errors": dict(r["upstream_errors"]),
                "latency": add_histogram(None, r["latency"]),
                "gateway_latency": add_histogram(None, r["gateway_latency"]),
                "queue_wait": add_histogram(None, r["queue_wait"]),
                "tunnels_total": r["tunnels_total"],
            }
            continue
        into["requests"] += r["requests"]
        into["tunnels_total"] += r["tunnels_total"]
        into["cancelled_queued"] += r["cancelled_queued"]
        into["cancelled_in_flight"] += r["cancelled_in_flight"]
        for k in _ROUTE_COUNTS:
            add_counts(into[k], r[k])
        into["latency"] = add_histogram(into["latency"], r["latency"])
        into["gateway_latency"] = add_histogram(into["gateway_latency"], r["gateway_latency"])
        into["queue_wait"] = add_histogram(into["queue_wait"], r["queue_wait"])


def _retire_upstreams(retired: Retired, gone: ProcessExport) -> None:
    ups = retired.setdefault("upstreams", {})
    for name, u in gone.get("upstreams", {}).items():
        into = ups.setdefault(name, {"retried": 0, "no_healthy_server": 0, "servers": {}})
        into["retried"] += u["retried"]
        into["no_healthy_server"] += u["no_healthy_server"]
        for s in u["servers"]:
            counts = into["servers"].setdefault(s["url"], dict.fromkeys(_SERVER_COUNTERS, 0))
            for k in _SERVER_COUNTERS:
                counts[k] += s[k]


def top_clients(rows: Sequence[ClientRow], top: int) -> list[ClientRow]:
    """Rows of several processes summed by client; the ``top`` with the most queue
    places first, then the most refusals (the ``clients`` command's answer)."""
    merged: dict[str, ClientRow] = {}
    for row in rows:
        one = merged.get(row["client"])
        if one is None:
            merged[row["client"]] = dict(row)  # type: ignore[assignment]
            continue
        one["queued"] += row["queued"]
        one["rate_limited"] += row["rate_limited"]
        one["client_queue_full"] += row["client_queue_full"]
    ranked = sorted(merged.values(), key=lambda r: (-r["queued"], -(r["rate_limited"] + r["client_queue_full"]),
                                                   r["client"]))
    return ranked[:top]
