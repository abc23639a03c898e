"""Snapshots in two steps: each process exports raw figures (counters, histogram
buckets, gauges); ``present`` sums the exports of all workers and derives what
an operator reads (quantiles, totals). With one process there is one export.

A single-process gateway (``snapshot``) skips the export step for its routes:
:class:`Presenter` builds each route's presented object straight from its
counters and gauges and hands out the *same* object, and the JSON encoded from
it, until one of them changes. A dashboard asking 4 times a second about 200
routes, few of them busy, then costs little more than the busy ones. Presented
snapshots are read-only to their consumers: a route object may be shared by
several snapshots.
"""

from __future__ import annotations

import json
import os
import time
import weakref
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any

from ..stats.metrics import (
    LATENCY_BUCKETS,
    PAUSE_BUCKETS,
    RESPONSE_CLASSES,
    quantiles_ms,
    quantiles_ms_of,
)
from ..stats.process import cpu_seconds, fd_limit, open_fds, rss_bytes
from ..upstreams.state import export_upstreams, present_upstreams, retire_upstreams

if TYPE_CHECKING:
    from ..config.settings import Config
    from ..runtime.state import Runtime

XRAY_SUMMARY = 5  # waiters listed per route in a snapshot (the queue command lists all)


def waiters(runtime: Runtime, route: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The route's waiters, oldest first: the queue X-ray."""
    r = runtime.table.routes.get(route)
    if r is None:
        return []
    now = runtime.lag._loop.time() if runtime.lag._loop else 0.0
    out = []
    for w in r.gate.waiters:
        out.append({"wait_ms": round((now - w.since) * 1000, 3), "method": w.method,
                    "path": w.path, "client": w.client, "pid": os.getpid()})
        if limit is not None and len(out) >= limit:
            break
    return out


def export(runtime: Runtime) -> dict[str, Any]:
    """This process's raw figures."""
    loop_now = runtime.lag._loop.time() if runtime.lag._loop else 0.0
    routes = {}
    for name, r in runtime.table.routes.items():
        e = r.stats.export()
        gate = r.gate
        e.update({
            "in_flight": gate.in_flight, "queued": len(gate.waiters),
            "limit": gate.limit, "queue_limit": gate.max_queue,
            "oldest_wait_ms": round(gate.oldest_wait(loop_now) * 1000, 3),
            "waiters": waiters(runtime, name, XRAY_SUMMARY),
        })
        routes[name] = e
    out = _export_process(runtime)
    out["routes"] = routes
    out["upstreams"] = export_upstreams(runtime.table.upstreams)
    return out


def _open_fds() -> int:
    """Open file descriptors. Linux 6.2 and later give the count as the size of
    /proc/self/fd, in microseconds; listing it (procstats.open_fds, the fallback)
    takes milliseconds with thousands of connections, on every snapshot."""
    try:
        n = os.stat("/proc/self/fd").st_size
    except OSError:
        n = 0
    return n if n > 0 else open_fds()


def _export_process(runtime: Runtime) -> dict[str, Any]:
    """This process's figures other than routes and upstreams."""
    return {
        "pid": os.getpid(),
        "index": runtime.worker_index,
        "started": runtime.started,
        "connections": runtime.connections,
        "accepted": runtime.acceptor.accepted,
        "bad_requests": runtime.server.bad_requests,
        "unrouted": {str(c): n for c, n in runtime.server.unrouted.items()},
        "deferred_reads": runtime.server.deferred_reads,
        "tasks": runtime.tasks.live,
        "loop_lag_ms": {"last": runtime.lag.last * 1000, "max": runtime.lag.max * 1000},
        "gc": runtime.gc.export(),
        "rss_bytes": rss_bytes(),
        "open_fds": _open_fds(),
        "fd_limit": fd_limit(),
        "cpu_s": cpu_seconds(),
        "generation": runtime.generation,
    }


def _add_hist(into: dict[str, Any] | None, h: dict[str, Any]) -> dict[str, Any]:
    if into is None:
        return {"counts": list(h["counts"]), "sum": h["sum"], "count": h["count"]}
    into["counts"] = [a + b for a, b in zip(into["counts"], h["counts"], strict=True)]
    into["sum"] += h["sum"]
    into["count"] += h["count"]
    return into


def _unrouted(exports: list[dict[str, Any]], retired: dict[str, Any] | None) -> dict[str, int]:
    """Answers given without a route (refused requests, head timeouts, no_route), by
    status code, summed over the workers, those that exited included."""
    codes: dict[str, int] = dict(retired.get("unrouted", {})) if retired else {}
    for e in exports:
        _sum_dicts(codes, e.get("unrouted", {}))
    return codes


def _sum_dicts(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


# ----------------------------------------------------------------------------- presented routes
HISTOGRAM_KEYS = ("latency_histogram", "queue_wait_histogram")


class RouteDict(dict[str, Any]):
    """A presented route: a plain dict to every reader, plus the JSON encoded from
    it, kept so that a route shared by several snapshots is encoded once. Read-only."""

    __slots__ = ("_base", "_json", "_json_all")
    _base: dict[str, Any]  # the same without the histograms
    _json: str | None
    _json_all: str | None


def _route(base: dict[str, Any], latency: dict[str, Any], qwait: dict[str, Any]) -> RouteDict:
    """``base`` (every field but the bucket counts) with the two histograms at the end."""
    r = RouteDict(base)
    r["latency_histogram"] = latency
    r["queue_wait_histogram"] = qwait
    r._base = base
    r._json = r._json_all = None
    return r


def _no_default(obj: Any) -> Any:
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _make_encoder() -> Callable[[Any], str]:
    """What ``json.dumps(obj, separators=(",", ":"))`` does, without its per-call set-up
    (a new encoder object and the circular-reference bookkeeping) when ``_json`` has C."""
    slow = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
    try:
        from json.encoder import c_make_encoder  # type: ignore[attr-defined]
        it = c_make_encoder(None, _no_default, encode_basestring_ascii, None, ":", ",",
                            False, False, True)
        if "".join(it({"a": [1, 2.5, None, True, "\u00e9"]}, 0)) != slow({"a": [1, 2.5, None, True, "\u00e9"]}):
            return slow
    except (ImportError, TypeError):
        return slow
    return lambda obj: "".join(it(obj, 0))  # type: ignore[no-any-return]


to_json = _make_encoder()


def route_json(r: dict[str, Any], histograms: bool = False) -> str:
    """One presented route as JSON, with or without its bucket counts; computed once
    per :class:`RouteDict`."""
    if type(r) is RouteDict:
        if histograms:
            j = r._json_all
            if j is None:
                j = r._json_all = to_json(r)
        else:
            j = r._json
            if j is None:
                j = r._json = to_json(r._base)
        return j
    if histograms:
        return to_json(r)
    return to_json({k: v for k, v in r.items() if k not in HISTOGRAM_KEYS})


def without_histograms(snap: dict[str, Any]) -> dict[str, Any]:
    """``snap`` without bucket counts (routes' and GC generations'), ``snap`` untouched."""
    out = dict(snap)
    routes = snap.get("routes")
    if isinstance(routes, list):
        out["routes"] = [r._base if type(r) is RouteDict else
                         {k: v for k, v in r.items() if k not in HISTOGRAM_KEYS} for r in routes]
    g = snap.get("gc")
    if isinstance(g, dict) and isinstance(g.get("generations"), list):
        out["gc"] = dict(g, generations=[{k: v for k, v in gen.items() if k != "histogram"}
                                         for gen in g["generations"]])
    return out


def snapshot_json(snap: dict[str, Any], histograms: bool = False, before: str = "",
                  after: str = "") -> str:
    """``before``, ``snap`` as compact JSON (``json.dumps`` with ``separators=(",", ":")``),
    ``after``: bucket counts only when asked for, routes already encoded not encoded
    again, the whole joined once."""
    parts = [before, "{"]
    for k, v in snap.items():
        if len(parts) > 2:
            parts.append(",")
        if k == "routes" and type(v) is list:
            parts.append('"routes":[')
            for i, r in enumerate(v):
                if i:
                    parts.append(",")
                parts.append(route_json(r, histograms))
            parts.append("]")
            continue
        if k == "gc" and not histograms and type(v) is dict and type(v.get("generations")) is list:
            v = dict(v, generations=[{gk: gv for gk, gv in gen.items() if gk != "histogram"}
                                     for gen in v["generations"]])
        parts.append(encode_basestring_ascii(k) + ":" + to_json(v))
    parts.append("}")
    parts.append(after)
    return "".join(parts)


def present(runtime_info: dict[str, Any], exports: list[dict[str, Any]],
            route_order: list[dict[str, Any]], retired: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SPEC §5 snapshot from worker exports.

    ``route_order`` lists the configured routes (name, upstream, gateway-wide
    limits); ``retired`` holds counters of workers that exited, so totals never
    go backwards when a worker is replaced.
    """
    routes: list[RouteDict] = []
    for rinfo in route_order:
        name = rinfo["name"]
        parts = [e["routes"][name] for e in exports if name in e["routes"]]
        if retired and name in retired.get("routes", {}):
            parts.append(retired["routes"][name])
        if len(parts) == 1 and not (retired and name in retired.get("routes", {})):
            # one process: its export was built for this snapshot, take it as it is
            p = parts[0]
            responses, codes, rejected = p["responses"], p["codes"], p["rejected"]
            errors, latency, qwait = p["upstream_errors"], p["latency"], p["queue_wait"]
            requests, cq, cf = p["requests"], p["cancelled_queued"], p["cancelled_in_flight"]
            in_flight, queued = p.get("in_flight", 0), p.get("queued", 0)
            oldest, xray = p.get("oldest_wait_ms", 0.0), list(p.get("waiters", ()))
            parts = []
        else:
            responses = {c: 0 for c in RESPONSE_CLASSES}
            codes = {}
            rejected = {"queue_full": 0, "queue_timeout": 0}
            errors = {}
            latency = qwait = None
            requests = cq = cf = in_flight = queued = 0
            oldest = 0.0
            xray = []
        for p in parts:
            requests += p["requests"]
            _sum_dicts(responses, p["responses"])
            _sum_dicts(codes, p["codes"])
            _sum_dicts(rejected, p["rejected"])
            _sum_dicts(errors, p["upstream_errors"])
            cq += p["cancelled_queued"]
            cf += p["cancelled_in_flight"]
            latency = _add_hist(latency, p["latency"])
            qwait = _add_hist(qwait, p["queue_wait"])
            in_flight += p.get("in_flight", 0)
            queued += p.get("queued", 0)
            oldest = max(oldest, p.get("oldest_wait_ms", 0.0))
            xray.extend(p.get("waiters", ()))
        xray.sort(key=lambda w: -w["wait_ms"])
        empty = {"counts": [0] * (len(LATENCY_BUCKETS) + 1), "sum": 0.0, "count": 0}
        latency = latency or empty
        qwait = qwait or empty
        routes.append(_route({
            "name": name,
            "upstream": rinfo["upstream"],
            "path_prefix": rinfo["path_prefix"],
            "host": rinfo["host"],
            "in_flight": in_flight,
            "max_concurrency": rinfo["max_concurrency"],
            "queued": queued,
            "max_queue": rinfo["max_queue"],
            "queue_timeout": rinfo["queue_timeout"],
            "oldest_wait_ms": oldest,
            "waiters": xray[:XRAY_SUMMARY],
            "requests": requests,
            "responses": responses,
            "codes": codes,
            "rejected": rejected,
            "cancelled": cq + cf,
            "cancelled_queued": cq,
            "cancelled_in_flight": cf,
            "upstream_errors": sum(errors.values()),
            "upstream_error_reasons": errors,
            "latency_ms": quantiles_ms(LATENCY_BUCKETS, latency),
            "queue_wait_ms": quantiles_ms(LATENCY_BUCKETS, qwait),
        }, latency, qwait))
    return _present_top(runtime_info, exports, routes, retired)


def _present_top(runtime_info: dict[str, Any], exports: list[dict[str, Any]],
                 routes: list[RouteDict], retired: dict[str, Any] | None,
                 totals: list[tuple[int, int, int]] | None = None) -> dict[str, Any]:
    """The snapshot around its ``routes``: process figures summed over ``exports``.
    ``totals`` (requests, in flight, queued of each export) when the exports carry
    no routes."""
    if totals is None:
        totals = [(sum(r["requests"] for r in e["routes"].values()),
                   sum(r["in_flight"] for r in e["routes"].values()),
                   sum(r["queued"] for r in e["routes"].values())) for e in exports]
    gc_collections = [0, 0, 0]
    pauses = 0
    pause_last = pause_max = pause_total = 0.0
    gens: list[dict[str, Any]] = [
        {"generation": g, "count": 0, "collected": 0, "last_ms": 0.0, "max_ms": 0.0,
         "total_ms": 0.0, "histogram": None} for g in range(3)
    ]
    recent: list[dict[str, Any]] = []
    for e in exports:
        g = e["gc"]
        gc_collections = [a + b for a, b in zip(gc_collections, g["collections"], strict=True)]
        pauses += g["pauses"]
        pause_last = max(pause_last, g["pause_ms"]["last"])
        pause_max = max(pause_max, g["pause_ms"]["max"])
        pause_total += g["pause_ms"]["total"]
        for mine, theirs in zip(gens, g["generations"], strict=True):
            mine["count"] += theirs["count"]
            mine["collected"] += theirs["collected"]
            mine["last_ms"] = max(mine["last_ms"], theirs["last_ms"])
            mine["max_ms"] = max(mine["max_ms"], theirs["max_ms"])
            mine["total_ms"] += theirs["total_ms"]
            mine["histogram"] = _add_hist(mine["histogram"], theirs["histogram"])
        recent.extend(dict(r, pid=e["pid"]) for r in g["recent"])
    recent.sort(key=lambda r: r["time"])
    for mine in gens:
        if mine["histogram"] is None:
            mine["histogram"] = {"counts": [0] * (len(PAUSE_BUCKETS) + 1), "sum": 0.0, "count": 0}
    workers = [{
        "pid": e["pid"], "index": e["index"], "connections": e["connections"],
        "tasks": e["tasks"], "loop_lag_ms": e["loop_lag_ms"], "rss_bytes": e["rss_bytes"],
        "open_fds": e["open_fds"], "fd_limit": e["fd_limit"], "cpu_s": e["cpu_s"],
        "generation": e["generation"], "accepted": e["accepted"],
        "bad_requests": e.get("bad_requests", 0), "deferred_reads": e.get("deferred_reads", 0),
        "gc_pause_ms": e["gc"]["pause_ms"],
        "requests": t[0], "in_flight": t[1], "queued": t[2],
    } for e, t in zip(exports, totals, strict=True)]
    snap = dict(runtime_info)
    snap.update({
        "time": time.time(),
        "connections": sum(e["connections"] for e in exports),
        "tasks": sum(e["tasks"] for e in exports),
        "loop_lag_ms": {"last": max((e["loop_lag_ms"]["last"] for e in exports), default=0.0),
                        "max": max((e["loop_lag_ms"]["max"] for e in exports), default=0.0)},
        "gc": {"collections": gc_collections, "pauses": pauses,
               "pause_ms": {"last": pause_last, "max": pause_max, "total": pause_total},
               "generations": gens, "recent": recent[-16:],
               "frozen": max((e["gc"]["frozen"] for e in exports), default=0)},
        "rss_bytes": sum(e["rss_bytes"] for e in exports) + runtime_info.get("master_rss_bytes", 0),
        "open_fds": sum(e["open_fds"] for e in exports),
        "fd_limit": min((e["fd_limit"] for e in exports), default=0),
        "routes": routes,
        "unrouted": _unrouted(exports, retired),
        "upstreams": present_upstreams(exports, retired),
        "workers": workers,
    })
    return snap


def runtime_info(runtime: Runtime) -> dict[str, Any]:
    """Top-level fields that belong to the gateway, not to a worker."""
    return {
        "version": runtime.version,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - runtime.started, 3),
        "config_path": os.path.abspath(runtime.config.path),
        "generation": runtime.generation,
        "last_reload": runtime.last_reload,
        "draining": runtime.draining,
        "listen": list(runtime.config.server.listen),
    }


def route_order(runtime: Runtime) -> list[dict[str, Any]]:
    return route_order_from(runtime.config, runtime.overrides)


def route_order_from(config: Config, overrides: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    """The configured routes with their gateway-wide limits (``set_limit`` included)."""
    out = []
    for r in config.routes:
        o = overrides.get(r.name, {})
        mc = o.get("max_concurrency", r.max_concurrency)
        mq = o.get("max_queue", r.max_queue)
        out.append({"name": r.name, "upstream": r.upstream, "path_prefix": r.path_prefix,
                    "host": r.host, "max_concurrency": mc, "max_queue": mq,
                    "queue_timeout": r.queue_timeout})
    return out


class _Entry:
    __slots__ = ("key", "route")

    def __init__(self, key: tuple[Any, ...], route: RouteDict) -> None:
        self.key = key
        self.route = route


class Presenter:
    """The presented routes of one single-process runtime, each rebuilt only when one
    of its figures changed since the previous snapshot.

    A route's figures change only through its counters and gauges, all compared
    each time (the recording path is left as it is); a route with waiters is
    rebuilt every time (their ages grow). The result equals ``present`` of one
    ``export``.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def routes(self, runtime: Runtime) -> tuple[list[RouteDict], tuple[int, int, int]] | None:
        """The routes in configuration order, and their total requests, in-flight and
        queued figures; None when the table and the configuration disagree (mid-reload)."""
        table = runtime.table.routes
        configured = runtime.config.routes
        if len(table) != len(configured):
            return None
        overrides = runtime.overrides
        loop = runtime.lag._loop
        old = self._entries
        new: dict[str, _Entry] = {}
        out: list[RouteDict] = []
        requests = in_flight = queued = 0
        for rc in configured:
            name = rc.name
            r = table.get(name)
            if r is None:
                return None
            s = r.stats
            g = r.gate
            mc, mq = rc.max_concurrency, rc.max_queue
            o = overrides.get(name)
            if o:
                mc = o.get("max_concurrency", mc)
                mq = o.get("max_queue", mq)
            errs = s.upstream_errors
            lat, qw = s.latency, s.queue_wait
            nw = len(g.waiters)
            key = (rc, s, mc, mq, s.requests, lat.count, qw.count, s.queue_full, s.queue_timeout,
                   s.cancelled_queued, s.cancelled_in_flight, sum(errs.values()) if errs else 0,
                   g.in_flight, nw)
            requests += s.requests
            in_flight += g.in_flight
            queued += nw
            e = old.get(name)
            if e is not None and not nw and e.key == key:
                new[name] = e
                out.append(e.route)
                continue
            prev = e.route if e is not None else None
            resp = s.responses
            cq, cf = s.cancelled_queued, s.cancelled_in_flight
            if prev is not None and prev["latency_histogram"]["count"] == lat.count:
                lat_h, lat_q = prev["latency_histogram"], prev["latency_ms"]
            else:
                lat_h = lat.export()
                lat_q = quantiles_ms_of(LATENCY_BUCKETS, lat_h["counts"], lat_h["count"])
            if prev is not None and prev["queue_wait_histogram"]["count"] == qw.count:
                qw_h, qw_q = prev["queue_wait_histogram"], prev["queue_wait_ms"]
            else:
                qw_h = qw.export()
                qw_q = quantiles_ms_of(LATENCY_BUCKETS, qw_h["counts"], qw_h["count"])
            if nw:
                now = loop.time() if loop else 0.0
                oldest = round(g.oldest_wait(now) * 1000, 3)
                xray = waiters(runtime, name, XRAY_SUMMARY)
            else:
                oldest, xray = 0.0, []
            route = _route({
                "name": name,
                "upstream": rc.upstream,
                "path_prefix": rc.path_prefix,
                "host": rc.host,
                "in_flight": g.in_flight,
                "max_concurrency": mc,
                "queued": nw,
                "max_queue": mq,
                "queue_timeout": rc.queue_timeout,
                "oldest_wait_ms": oldest,
                "waiters": xray,
                "requests": s.requests,
                "responses": {"1xx": resp[1], "2xx": resp[2], "3xx": resp[3], "4xx": resp[4],
                              "5xx": resp[5]},
                "codes": {str(c): n for c, n in s.codes.items()},
                "rejected": {"queue_full": s.queue_full, "queue_timeout": s.queue_timeout},
                "cancelled": cq + cf,
                "cancelled_queued": cq,
                "cancelled_in_flight": cf,
                "upstream_errors": sum(errs.values()),
                "upstream_error_reasons": dict(errs),
                "latency_ms": lat_q,
                "queue_wait_ms": qw_q,
            }, lat_h, qw_h)
            new[name] = _Entry(key, route)
            out.append(route)
        self._entries = new
        return out, (requests, in_flight, queued)


_presenters: weakref.WeakKeyDictionary[Runtime, Presenter] = weakref.WeakKeyDictionary()


def snapshot(runtime: Runtime) -> dict[str, Any]:
    """The snapshot of a single-process gateway: ``present`` of its one export, with
    the routes that did not change since the last snapshot shared with it."""
    presenter = _presenters.get(runtime)
    if presenter is None:
        presenter = _presenters[runtime] = Presenter()
    got = presenter.routes(runtime)
    if got is None:
        return present(runtime_info(runtime), [export(runtime)], route_order(runtime))
    routes, totals = got
    e = _export_process(runtime)
    e["upstreams"] = export_upstreams(runtime.table.upstreams)
    return _present_top(runtime_info(runtime), [e], routes, None, [totals])


_COUNTERS = ("requests", "cancelled_queued", "cancelled_in_flight")
_COUNTER_DICTS = ("responses", "codes", "rejected", "upstream_errors")


def retire(retired: dict[str, Any], gone: dict[str, Any]) -> None:
    """Keep the counters of a worker that exited (its gauges go with it), so that
    gateway-wide totals never go backwards."""
    retire_upstreams(retired, gone)
    _sum_dicts(retired.setdefault("unrouted", {}), gone.get("unrouted", {}))
    routes = retired.setdefault("routes", {})
    for name, r in gone.get("routes", {}).items():
        into: dict[str, Any] | None = routes.get(name)
        if into is None:
            fresh: dict[str, Any] = {k: 0 for k in _COUNTERS}
            fresh.update({k: {} for k in _COUNTER_DICTS}, latency=None, queue_wait=None)
            into = routes[name] = fresh
        for k in _COUNTERS:
            into[k] += r[k]
        for k in _COUNTER_DICTS:
            _sum_dicts(into[k], r[k])
        into["latency"] = _add_hist(into["latency"], r["latency"])
        into["queue_wait"] = _add_hist(into["queue_wait"], r["queue_wait"])
