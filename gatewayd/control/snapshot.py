"""The snapshot, as the process layer asks for it: ``snapshot`` for a single
process, ``export`` in a worker, ``present`` and ``retire`` in the master (the
names below are this package's door for it).

A single-process gateway skips the export step for its routes: :class:`Presenter`
presents each route straight from its counters and gauges, and hands out the
*same* object (and the JSON encoded from it, see ``encode``) until one of its
figures changes. The result equals ``present`` of one ``export``.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from ..stats.metrics import LATENCY_BUCKETS, quantiles_ms_of
from .encode import snapshot_json, without_histograms
from .export import (
    XRAY_SUMMARY,
    clients,
    estimates,
    estimator,
    export,
    process_figures,
    queued_by_priority,
    rejected,
    waiters,
)
from .merge import retire
from .present import present, present_route, present_top, route_order, route_order_from, runtime_info
from .protocol import RouteSnapshot, Snapshot

if TYPE_CHECKING:
    from ..runtime.state import Runtime

__all__ = ["export", "present", "retire", "route_order", "route_order_from", "runtime_info",
           "snapshot", "snapshot_json", "waiters", "without_histograms", "clients"]


class _Entry:
    __slots__ = ("key", "route")

    def __init__(self, key: tuple[object, ...], route: RouteSnapshot) -> None:
        self.key = key  # the figures ``route`` was presented from
        self.route = route


class Presenter:
    """The presented routes of one single-process runtime, each rebuilt only when one
    of its figures changed since the previous snapshot.

    A route's figures change only through its counters and gauges, all compared
    each time (the recording path is left as it is); a route with waiters is
    rebuilt every time (their ages grow).
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def routes(self, runtime: Runtime) -> tuple[list[RouteSnapshot], tuple[int, int, int]] | None:
        """The routes in configuration order, and their total requests, in-flight and
        queued figures; None when the table and the configuration disagree (mid-reload)."""
        table = runtime.table.routes
        configured = runtime.config.routes
        if len(table) != len(configured):
            return None
        overrides = runtime.overrides
        loop = runtime.lag._loop
        now = loop.time() if loop else None
        old = self._entries
        new: dict[str, _Entry] = {}
        out: list[RouteSnapshot] = []
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
            lat, own, qw = s.latency, s.gateway_latency, s.queue_wait
            nw = len(g.waiters)
            # (waiters by class need no place in the key: a route with waiters is rebuilt anyway)
            est = estimator(g, now)
            key = (rc, s, mc, mq, s.requests, lat.count, own.count, qw.count, s.queue_full, s.queue_timeout,
                   s.client_queue_full, s.rate_limited, s.cancelled_queued, s.cancelled_in_flight,
                   sum(errs.values()) if errs else 0,
                   g.in_flight, nw, s.tunnels, s.tunnels_total, s.tunnels_full, s.deadline, s.preempted,
                   s.route_timeout, est.rate, est.service)
            requests += s.requests
            in_flight += g.in_flight
            queued += nw
            e = old.get(name)
            if e is not None and not nw and e.key == key:
                new[name] = e
                out.append(e.route)
                continue
            prev = e.route if e is not None else None
            if prev is not None and prev["latency_histogram"]["count"] == lat.count:
                lat_h, lat_q = prev["latency_histogram"], prev["latency_ms"]
            else:
                lat_h = lat.export()
                lat_q = quantiles_ms_of(LATENCY_BUCKETS, lat_h["counts"], lat_h["count"])
            if prev is not None and prev["gateway_latency_histogram"]["count"] == own.count:
                own_h = prev["gateway_latency_histogram"]
            else:
                own_h = own.export()
            if prev is not None and prev["queue_wait_histogram"]["count"] == qw.count:
                qw_h, qw_q = prev["queue_wait_histogram"], prev["queue_wait_ms"]
            else:
                qw_h = qw.export()
                qw_q = quantiles_ms_of(LATENCY_BUCKETS, qw_h["counts"], qw_h["count"])
            if nw:
                oldest = round(g.oldest_wait(now or 0.0) * 1000, 3)
                xray = waiters(runtime, name, XRAY_SUMMARY)
            else:
                oldest, xray = 0.0, []
            resp = s.responses
            route = present_route(
                name, rc.upstream, rc.path_prefix, rc.host, mc, mq, rc.queue_timeout, g.in_flight, nw,
                oldest, xray, s.requests,
                {"1xx": resp[1], "2xx": resp[2], "3xx": resp[3], "4xx": resp[4], "5xx": resp[5]},
                {str(c): n for c, n in s.codes.items()},
                rejected(s), s.cancelled_queued, s.cancelled_in_flight, dict(errs), lat_h, lat_q, own_h, qw_h,
                qw_q, s.tunnels, rc.max_tunnels if rc.websocket else 0, s.tunnels_total, queued_by_priority(r),
                estimates(est))
            new[name] = _Entry(key, route)
            out.append(route)
        self._entries = new
        return out, (requests, in_flight, queued)


# One presenter per runtime, dropped with it (a reload keeps the runtime).
_presenters: weakref.WeakKeyDictionary[Runtime, Presenter] = weakref.WeakKeyDictionary()


def snapshot(runtime: Runtime) -> Snapshot:
    """The snapshot of a single-process gateway: ``present`` of its one export, with
    the routes that did not change since the last snapshot shared with it."""
    presenter = _presenters.get(runtime)
    if presenter is None:
        presenter = _presenters[runtime] = Presenter()
    got = presenter.routes(runtime)
    if got is None:
        return present(runtime_info(runtime), [export(runtime)], route_order(runtime))
    routes, totals = got
    return present_top(runtime_info(runtime), [process_figures(runtime)], routes, None, [totals])
