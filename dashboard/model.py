"""Pure functions from successive snapshots to what the screen shows.

Nothing here touches a socket or a terminal. A snapshot is whatever JSON object
the daemon sent: every field is read defensively (:func:`dig`, :func:`number`),
so an unknown field is ignored and a missing or mistyped one becomes ``None``
(shown blank).
Rates compare a snapshot with an earlier one *of the same daemon process*;
across a restart (another pid, or counters going backwards) there is no rate.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

Snapshot = dict[str, Any]


def dig(obj: Any, *path: str | int) -> Any:
    """``obj[path[0]][path[1]]...``, or None where a step is missing or of the wrong kind."""
    for step in path:
        if isinstance(step, int):
            if not isinstance(obj, list) or not -len(obj) <= step < len(obj):
                return None
        elif not isinstance(obj, dict):
            return None
        obj = obj[step] if isinstance(step, int) else obj.get(step)
    return obj


def number(value: Any) -> float | None:
    """A finite int or float (bool excluded) as float, else None."""
    # exact type checks: bool is an int subclass, and this runs ~20 times a route a snapshot
    if type(value) is float:
        return value if math.isfinite(value) else None
    if type(value) is int:
        return float(value)
    return None


def num_at(obj: Any, *path: str | int) -> float | None:
    return number(dig(obj, *path))


def text_at(obj: Any, *path: str | int) -> str | None:
    value = dig(obj, *path)
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Sample:
    """One snapshot and when it arrived (``time.monotonic()`` on our side)."""

    snap: Snapshot
    received: float

    @property
    def pid(self) -> float | None:
        return num_at(self.snap, "pid")

    @cached_property
    def by_name(self) -> dict[str, dict[str, Any]]:
        """The route objects that have a name, by name, in the daemon's order."""
        routes = self.snap.get("routes")
        if not isinstance(routes, list):
            return {}
        return {r["name"]: r for r in routes if isinstance(r, dict) and isinstance(r.get("name"), str)}

    def routes(self) -> Iterable[dict[str, Any]]:
        return self.by_name.values()


def same_process(earlier: Sample, later: Sample) -> bool:
    """Whether counters of ``later`` continue those of ``earlier`` (no restart between)."""
    if earlier.pid != later.pid:
        return False
    a, b = num_at(earlier.snap, "uptime_s"), num_at(later.snap, "uptime_s")
    return a is None or b is None or b >= a


def elapsed(earlier: Sample, later: Sample) -> float | None:
    """Seconds between two samples: the daemon's ``time`` fields when both have one."""
    a, b = num_at(earlier.snap, "time"), num_at(later.snap, "time")
    dt = b - a if a is not None and b is not None else later.received - earlier.received
    return dt if dt > 0 else None


def rate(now: float | None, before: float | None, dt: float | None) -> float | None:
    """Per-second increase of a counter; None when unknown or when it went backwards."""
    if now is None or before is None or dt is None or now < before:
        return None
    return (now - before) / dt


# --------------------------------------------------------------------------- routes
@dataclass(frozen=True)
class RouteView:
    """One row of the routes table: the figures, not their formatting."""

    name: str
    in_flight: float | None
    max_concurrency: float | None
    queued: float | None
    max_queue: float | None
    oldest_wait_ms: float | None
    rps: float | None  # responses of every kind per second
    served_rps: float | None  # responses the upstream made, per second
    shed_rps: float | None  # responses the gateway made itself (503 sheds, refusals, errors)
    p50: float | None
    p99: float | None
    queue_full: float | None
    queue_timeout: float | None
    rejected_rps: float | None  # 503s per second, both reasons
    cancelled: float | None
    upstream_errors: float | None
    error_rps: float | None  # upstream errors per second
    # 429s for a client's own excess; None from a gatewayd (or a route) that does not count them
    rate_limited: float | None = None
    client_queue_full: float | None = None
    refused_rps: float | None = None  # both per second
    # WebSocket tunnels: open now, the gateway-wide cap (0: the route does not carry
    # WebSocket), upgrades answered 503 tunnels_full (total, per second); None from a
    # gatewayd that does not count them
    tunnels: float | None = None
    max_tunnels: float | None = None
    tunnels_full: float | None = None
    tunnels_full_rps: float | None = None
    # deadlines and classes: 503 deadline, 503 preempted, 504 route_timeout (totals, and
    # the three per second), the route's estimates (service time, completions a second);
    # None from a gatewayd that does not count them
    deadline: float | None = None
    preempted: float | None = None
    route_timeout: float | None = None
    deadlines_rps: float | None = None
    service_ms: float | None = None
    completion_rate: float | None = None

    @property
    def websocket(self) -> bool:
        """The route carries WebSocket tunnels (a gatewayd that says so: max_tunnels > 0)."""
        return bool(self.max_tunnels)

    @property
    def refuses_by_deadline(self) -> bool:
        """The route has answered 503 deadline, 503 preempted or 504 route_timeout."""
        return bool(self.deadline or self.preempted or self.route_timeout)

    def sort_value(self, column: str) -> Any:
        return getattr(self, column, None)


def _table(obj: dict[str, Any], key: str) -> dict[str, Any]:
    value = obj.get(key)
    return value if isinstance(value, dict) else {}


def _rejected(r: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """queue_full, queue_timeout and their sum (None only when both are missing)."""
    rej = _table(r, "rejected")
    full, tmo = number(rej.get("queue_full")), number(rej.get("queue_timeout"))
    both = None if full is None and tmo is None else (full or 0.0) + (tmo or 0.0)
    return full, tmo, both


def _refused(r: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """rate_limited, client_queue_full and their sum (None only when both are missing)."""
    rej = _table(r, "rejected")
    limited, capped = number(rej.get("rate_limited")), number(rej.get("client_queue_full"))
    both = None if limited is None and capped is None else (limited or 0.0) + (capped or 0.0)
    return limited, capped, both


DEADLINE_REASONS = ("deadline", "preempted", "route_timeout")


def _deadlines(r: dict[str, Any]) -> tuple[float | None, float | None, float | None, float | None]:
    """deadline, preempted, route_timeout and their sum (None only when all are missing)."""
    rej = _table(r, "rejected")
    got = [number(rej.get(k)) for k in DEADLINE_REASONS]
    present = [v for v in got if v is not None]
    return got[0], got[1], got[2], sum(present) if present else None


def reports_deadlines(views: Iterable[RouteView]) -> bool:
    """Whether any route has refused a request for its deadline or class."""
    return any(v.refuses_by_deadline for v in views)


def reports_refusals(views: Iterable[RouteView]) -> bool:
    """Whether any route counts 429 refusals (a gatewayd that knows them)."""
    return any(v.rate_limited is not None or v.client_queue_full is not None for v in views)


def reports_tunnels(views: Iterable[RouteView]) -> bool:
    """Whether any route carries WebSocket tunnels (``websocket = true``)."""
    return any(v.websocket for v in views)


def _shed(r: dict[str, Any]) -> float | None:
    """Answers the gateway made: ``gateway_answers``; from a gatewayd without it, its
    503 sheds (every reason in ``rejected``)."""
    made = number(r.get("gateway_answers"))
    if made is not None or "gateway_answers" in r:
        return made
    values = [number(v) for v in _table(r, "rejected").values()]
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _served(r: dict[str, Any]) -> float | None:
    """Answers the upstream made: ``served``; from a gatewayd without it, the
    responses (or, without those, the requests) less the 503 sheds."""
    served = number(r.get("served"))
    if served is not None or "served" in r:
        return served
    classes = [number(v) for v in _table(r, "responses").values()]
    total = sum(v for v in classes if v is not None) if classes else number(r.get("requests"))
    if total is None:
        return None
    return max(total - (_shed(r) or 0.0), 0.0)


def route_views(cur: Sample, base: Sample | None) -> list[RouteView]:
    """The routes of ``cur``; rates against ``base`` (an earlier sample of the same process)."""
    dt = elapsed(base, cur) if base is not None and same_process(base, cur) else None
    before = base.by_name if dt is not None and base is not None else {}
    out = []
    for r in cur.routes():
        old = before.get(r["name"], {})
        full, tmo, rejected = _rejected(r)
        limited, capped, refused = _refused(r)
        errors = number(r.get("upstream_errors"))
        latency = _table(r, "latency_ms")
        tunnels_full = number(_table(r, "rejected").get("tunnels_full"))
        deadline, preempted, route_timeout, by_deadline = _deadlines(r)
        estimates = _table(r, "estimates")
        out.append(RouteView(
            name=r["name"],
            in_flight=number(r.get("in_flight")),
            max_concurrency=number(r.get("max_concurrency")),
            queued=number(r.get("queued")),
            max_queue=number(r.get("max_queue")),
            oldest_wait_ms=number(r.get("oldest_wait_ms")),
            rps=rate(number(r.get("requests")), number(old.get("requests")), dt),
            served_rps=rate(_served(r), _served(old), dt),
            shed_rps=rate(_shed(r), _shed(old), dt),
            p50=number(latency.get("p50")),
            p99=number(latency.get("p99")),
            queue_full=full,
            queue_timeout=tmo,
            rejected_rps=rate(rejected, _rejected(old)[2], dt),
            cancelled=number(r.get("cancelled")),
            upstream_errors=errors,
            error_rps=rate(errors, number(old.get("upstream_errors")), dt),
            rate_limited=limited,
            client_queue_full=capped,
            refused_rps=rate(refused, _refused(old)[2], dt),
            tunnels=number(r.get("tunnels")),
            max_tunnels=number(r.get("max_tunnels")),
            tunnels_full=tunnels_full,
            tunnels_full_rps=rate(tunnels_full, number(_table(old, "rejected").get("tunnels_full")), dt),
            deadline=deadline,
            preempted=preempted,
            route_timeout=route_timeout,
            deadlines_rps=rate(by_deadline, _deadlines(old)[3], dt),
            service_ms=number(estimates.get("service_ms")),
            completion_rate=number(estimates.get("completion_rate")),
        ))
    return out


SORT_COLUMNS = ("name", "in_flight", "queued", "oldest_wait_ms", "served_rps", "shed_rps", "p50", "p99",
                "queue_full", "queue_timeout", "cancelled", "upstream_errors", "rate_limited", "client_queue_full",
                "tunnels", "tunnels_full", "deadline", "preempted", "route_timeout")


def pressure(v: RouteView) -> tuple[float, float]:
    """How pressed a route is: its queue's depth, then its oldest waiter's age."""
    return (v.queued or 0.0, v.oldest_wait_ms or 0.0)


def most_pressed(views: Iterable[RouteView], current: str | None = None) -> str | None:
    """The route with the deepest queue (then the oldest waiter); None when nobody
    waits anywhere. On a tie, ``current`` stays, so the choice does not flicker."""
    best: RouteView | None = None
    for v in views:
        if best is None or pressure(v) > pressure(best) or (
                pressure(v) == pressure(best) and v.name == current):
            best = v
    return best.name if best is not None and pressure(best) > (0.0, 0.0) else None


def ordered(views: Iterable[RouteView], column: str, reverse: bool = False) -> list[str]:
    """Route names in display order: names A-Z, figures largest first; ``reverse`` flips
    that. Routes with a blank figure always come last."""
    if column not in RouteView.__dataclass_fields__:  # any figure of a row sorts
        column = "name"
    if column == "name":
        return sorted((v.name for v in views), reverse=reverse)
    present: list[tuple[float, str]] = []
    blank: list[str] = []
    for v in views:
        value = v.sort_value(column)
        if value is None:
            blank.append(v.name)
        else:
            present.append((-value, v.name))
    present.sort(reverse=reverse)
    return [name for _, name in present] + sorted(blank)


# --------------------------------------------------------------------------- totals and history
@dataclass(frozen=True)
class Totals:
    """Gateway-wide figures of one sample, for the time series."""

    rps: float | None
    queued: float | None
    loop_lag_ms: float | None
    gc_ms_per_s: float | None  # GC pause time per second of wall time


def totals(cur: Sample, base: Sample | None) -> Totals:
    """Total req/s (routes present in both samples), queue depth, loop lag, GC ms/s."""
    dt = elapsed(base, cur) if base is not None and same_process(base, cur) else None
    routes = list(cur.routes())
    queued = [q for q in (number(r.get("queued")) for r in routes) if q is not None]
    rps = None
    if dt is not None and base is not None:
        before = base.by_name
        # a route added by a reload has no earlier count: leave it out of this rate
        pairs = [(number(r.get("requests")), number(before[r["name"]].get("requests")))
                 for r in routes if r["name"] in before]
        now = [a for a, _ in pairs if a is not None]
        then = [b for _, b in pairs if b is not None]
        if pairs and len(now) == len(then) == len(pairs):
            rps = rate(sum(now), sum(then), dt)
    gc_before = num_at(base.snap, "gc", "pause_ms", "total") if base is not None else None
    return Totals(
        rps=rps,
        queued=sum(queued) if queued else None,
        loop_lag_ms=num_at(cur.snap, "loop_lag_ms", "last"),
        gc_ms_per_s=rate(num_at(cur.snap, "gc", "pause_ms", "total"), gc_before, dt),
    )


class RateWindow:
    """The recent samples of one process; :meth:`base` is the one about ``seconds`` ago."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds
        self._samples: deque[Sample] = deque()

    def push(self, sample: Sample) -> None:
        if self._samples and not same_process(self._samples[-1], sample):
            self._samples.clear()
        self._samples.append(sample)
        # keep the newest sample that is at least `seconds` old, drop the ones before it
        while len(self._samples) > 2:
            dt = elapsed(self._samples[1], sample)
            if dt is None or dt < self.seconds:
                break
            self._samples.popleft()

    def base(self) -> Sample | None:
        return self._samples[0] if len(self._samples) > 1 else None

    def clear(self) -> None:
        self._samples.clear()


SERIES = ("rps", "queued", "loop_lag_ms", "gc_ms_per_s")


class History:
    """The last ``length`` values of each time series (kept across reconnections)."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.series: dict[str, deque[float]] = {k: deque(maxlen=length) for k in SERIES}

    def add(self, t: Totals) -> None:
        for key, values in self.series.items():
            value = getattr(t, key)
            # a blank is drawn as the previous value, so one missing figure leaves no dip
            if value is None:
                value = values[-1] if values else 0.0
            values.append(value)

    def values(self, key: str) -> list[float]:
        return list(self.series[key])


# --------------------------------------------------------------------------- upstreams
HEALTHY_STATES = ("up", "kept")


@dataclass(frozen=True)
class ServerView:
    """One server of an upstream, as the snapshot's ``upstreams`` lists it."""

    upstream: str
    url: str
    state: str  # up, kept, down, unhealthy, ejected, trial; "" when not sent
    in_flight: float | None
    failures: float | None
    last_error: str | None

    @property
    def healthy(self) -> bool:
        return self.state in HEALTHY_STATES


def server_views(sample: Sample | None) -> list[ServerView]:
    """Every server of every upstream, in the daemon's order (handler upstreams have none)."""
    ups = dig(sample.snap, "upstreams") if sample is not None else None
    out: list[ServerView] = []
    for u in ups if isinstance(ups, list) else []:
        name = text_at(u, "name")
        servers = dig(u, "servers")
        if name is None or not isinstance(servers, list):
            continue
        for srv in servers:
            url = text_at(srv, "url")
            if url is not None:
                out.append(ServerView(name, url, text_at(srv, "state") or "", num_at(srv, "in_flight"),
                                      num_at(srv, "failures"), text_at(srv, "last_error")))
    return out


def _server_events(prev: Sample, cur: Sample, t: float | None) -> list[Event]:
    before = {(s.upstream, s.url): s for s in server_views(prev)}
    out = []
    for s in server_views(cur):
        old = before.get((s.upstream, s.url))
        if old is None or old.state == s.state or not s.state:
            continue
        why = f" ({s.last_error})" if s.last_error and not s.healthy else ""
        out.append(Event(t, "info" if s.healthy else "warning",
                         f"upstream {s.upstream}: {s.url} {old.state or '?'} -> {s.state}{why}"))
    return out


# --------------------------------------------------------------------------- TLS
EXPIRY_WARNING_DAYS = 14  # a certificate expiring sooner is marked


@dataclass(frozen=True)
class CertificateView:
    """The certificate in force that expires first, seen at the snapshot's time."""

    cert: str  # its path as configured
    not_after: float  # Unix time
    left_s: float  # seconds until it expires; negative once it has

    @property
    def expired(self) -> bool:
        return self.left_s <= 0

    @property
    def soon(self) -> bool:
        """Expiring within EXPIRY_WARNING_DAYS (and not yet expired)."""
        return not self.expired and self.left_s < EXPIRY_WARNING_DAYS * 86400


def soonest_certificate(sample: Sample | None) -> CertificateView | None:
    """The certificate of the snapshot's ``tls`` that expires first; None without TLS
    (or from a gatewayd that does not say)."""
    certs = dig(sample.snap, "tls", "certificates") if sample is not None else None
    if sample is None or not isinstance(certs, list):
        return None
    best: tuple[float, str] | None = None
    for c in certs:
        not_after, name = num_at(c, "not_after"), text_at(c, "cert")
        if not_after is not None and (best is None or not_after < best[0]):
            best = (not_after, name or "?")
    if best is None:
        return None
    now = num_at(sample.snap, "time")  # the daemon's clock; ours only if it sent none
    return CertificateView(best[1], best[0], best[0] - (now if now is not None else time.time()))


# --------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Event:
    """A line of the event pane. ``level``: info, warning or error."""

    time: float | None
    level: str
    text: str


def reload_event(last_reload: Any, generation: float | None, time: float | None) -> Event:
    when = num_at(last_reload, "time")
    if dig(last_reload, "ok") is True:
        changes = dig(last_reload, "changes")
        lines = [c for c in changes if isinstance(c, str)] if isinstance(changes, list) else []
        gen = f"generation {int(generation)}" if generation is not None else "reloaded"
        return Event(when or time, "info",
                     f"reload ok, {gen}: " + ("; ".join(lines) if lines else "no changes"))
    error = text_at(last_reload, "error") or "unknown error"
    return Event(when or time, "error", f"reload FAILED (nothing changed): {error}")


def events_between(prev: Sample | None, cur: Sample) -> list[Event]:
    """What happened between two successive samples: restarts, reloads, limit changes."""
    if prev is None:
        return []
    t = num_at(cur.snap, "time")
    if prev.pid != cur.pid or not same_process(prev, cur):
        pid = cur.pid
        return [Event(t, "warning", "gatewayd restarted" + (f" (pid {int(pid)})" if pid is not None else ""))]
    out = []
    old_reload, new_reload = dig(prev.snap, "last_reload"), dig(cur.snap, "last_reload")
    if isinstance(new_reload, dict) and new_reload != old_reload:
        out.append(reload_event(new_reload, num_at(cur.snap, "generation"), t))
    reloaded = num_at(prev.snap, "generation") != num_at(cur.snap, "generation")
    # a reload lists its own changes; a limit it changed without listing it is a
    # set_limit override that the reload ended
    listed = dig(new_reload, "changes") if reloaded else None
    listed = [c for c in listed if isinstance(c, str)] if isinstance(listed, list) else []
    before = prev.by_name
    for r in cur.routes():
        old = before.get(r["name"])
        if old is None:
            continue
        for key in ("max_concurrency", "max_queue"):
            a, b = old.get(key), r.get(key)
            if a == b or any(c.startswith(f"route {r['name']}:") and key in c for c in listed):
                continue
            a, b = number(a), number(b)
            if a is not None and b is not None:
                why = " (set_limit ended by the reload)" if reloaded else ""
                out.append(Event(t, "info", f"limit {r['name']}: {key} {int(a)} -> {int(b)}{why}"))
    return out + _server_events(prev, cur, t)


def waiters(items: Any) -> list[dict[str, Any]]:
    """The queue X-ray: waiter objects, oldest first (blank fields where missing)."""
    if not isinstance(items, list):
        return []
    out = [w for w in items if isinstance(w, dict)]
    out.sort(key=lambda w: -(num_at(w, "wait_ms") or 0.0))
    return out


def find_route(sample: Sample | None, name: str | None) -> dict[str, Any] | None:
    if sample is None or name is None:
        return None
    return sample.by_name.get(name)
