"""Snapshots in two steps: each process exports raw figures (counters, histogram
buckets, gauges); ``present`` sums the exports of all workers and derives what
an operator reads (quantiles, totals). With one process there is one export.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from .metrics import LATENCY_BUCKETS, PAUSE_BUCKETS, RESPONSE_CLASSES, quantiles_ms
from .procstats import cpu_seconds, fd_limit, open_fds, rss_bytes
from .upstream_state import export_upstreams, present_upstreams, retire_upstreams

if TYPE_CHECKING:
    from .config import Config
    from .runtime import Runtime

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
    return {
        "pid": os.getpid(),
        "index": runtime.worker_index,
        "started": runtime.started,
        "connections": runtime.connections,
        "accepted": runtime.acceptor.accepted,
        "tasks": runtime.tasks.live,
        "loop_lag_ms": {"last": runtime.lag.last * 1000, "max": runtime.lag.max * 1000},
        "gc": runtime.gc.export(),
        "rss_bytes": rss_bytes(),
        "open_fds": open_fds(),
        "fd_limit": fd_limit(),
        "cpu_s": cpu_seconds(),
        "generation": runtime.generation,
        "routes": routes,
        "upstreams": export_upstreams(runtime.table.upstreams),
    }


def _add_hist(into: dict[str, Any] | None, h: dict[str, Any]) -> dict[str, Any]:
    if into is None:
        return {"counts": list(h["counts"]), "sum": h["sum"], "count": h["count"]}
    into["counts"] = [a + b for a, b in zip(into["counts"], h["counts"], strict=True)]
    into["sum"] += h["sum"]
    into["count"] += h["count"]
    return into


def _sum_dicts(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def present(runtime_info: dict[str, Any], exports: list[dict[str, Any]],
            route_order: list[dict[str, Any]], retired: dict[str, Any] | None = None) -> dict[str, Any]:
    """The SPEC §5 snapshot from worker exports.

    ``route_order`` lists the configured routes (name, upstream, gateway-wide
    limits); ``retired`` holds counters of workers that exited, so totals never
    go backwards when a worker is replaced.
    """
    routes = []
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
        routes.append({
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
            "latency_histogram": latency,
            "queue_wait_histogram": qwait,
        })
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
        "gc_pause_ms": e["gc"]["pause_ms"],
        "requests": sum(r["requests"] for r in e["routes"].values()),
        "in_flight": sum(r["in_flight"] for r in e["routes"].values()),
        "queued": sum(r["queued"] for r in e["routes"].values()),
    } for e in exports]
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


def snapshot(runtime: Runtime) -> dict[str, Any]:
    """The snapshot of a single-process gateway."""
    return present(runtime_info(runtime), [export(runtime)], route_order(runtime))


_COUNTERS = ("requests", "cancelled_queued", "cancelled_in_flight")
_COUNTER_DICTS = ("responses", "codes", "rejected", "upstream_errors")


def retire(retired: dict[str, Any], gone: dict[str, Any]) -> None:
    """Keep the counters of a worker that exited (its gauges go with it), so that
    gateway-wide totals never go backwards."""
    retire_upstreams(retired, gone)
    routes = retired.setdefault("routes", {})
    for name, r in gone.get("routes", {}).items():
        into = routes.get(name)
        if into is None:
            into = routes[name] = {k: 0 for k in _COUNTERS}
            for k in _COUNTER_DICTS:
                into[k] = {}
            into["latency"] = None
            into["queue_wait"] = None
        for k in _COUNTERS:
            into[k] += r[k]
        for k in _COUNTER_DICTS:
            _sum_dicts(into[k], r[k])
        into["latency"] = _add_hist(into["latency"], r["latency"])
        into["queue_wait"] = _add_hist(into["queue_wait"], r["queue_wait"])
