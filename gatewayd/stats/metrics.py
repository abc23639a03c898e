"""The metrics core: per-route counters and histograms, recorded on the hot path.

Recording is attribute arithmetic and one ``bisect`` per histogram; anything
derived (quantiles, sums over workers, a histogram's count, responses by class)
is computed when a snapshot is taken.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Literal, TypedDict

from .clients import ClientCounts

# Upper bounds, in seconds, of the latency and queue-wait histograms' buckets.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
# GC pauses are much shorter: finer buckets.
PAUSE_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
)


# A summable map of counts by key (status code, response class, reason): summed
# over workers key by key, so its keys are open.
Counts = dict[str, int]


class HistogramExport(TypedDict):
    """A histogram as exported and presented: bucket counts (the last +Inf), their
    sum of observed values, and the number of observations."""

    counts: list[int]
    sum: float
    count: int


class Quantiles(TypedDict):
    """Estimated quantiles in milliseconds; None while the histogram is empty."""

    p50: float | None
    p90: float | None
    p99: float | None


class RouteCounters(TypedDict):
    """A route's counters and histograms, as :meth:`RouteStats.export` gives them:
    all summable over workers. ``responses`` by class (``RESPONSE_CLASSES``),
    ``codes`` by status, ``rejected`` by reason (queue_full, queue_timeout, client_queue_full,
    rate_limited),
    ``upstream_errors`` by reason. ``latency`` holds the responses the upstream
    made (its count is the route's ``served``), ``gateway_latency`` the answers the
    gateway made itself (sheds, refusals, errors it answered: ``gateway_answers``)."""

    requests: int
    responses: Counts
    codes: Counts
    rejected: Counts
    cancelled_queued: int
    cancelled_in_flight: int
    upstream_errors: Counts
    latency: HistogramExport
    gateway_latency: HistogramExport
    queue_wait: HistogramExport


class Histogram:
    """Fixed buckets; ``counts[i]`` holds observations <= ``bounds[i]``, the last +Inf."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_zero(self) -> None:
        """``observe(0.0)`` (a request admitted without waiting), without the search."""
        self.counts[0] += 1

    @property
    def count(self) -> int:
        """Observations so far: summed when read, not counted on the request path."""
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """Estimated ``q`` quantile (linear within a bucket); None when empty."""
        return quantile(self.bounds, self.counts, q)

    def export(self) -> HistogramExport:
        return {"counts": list(self.counts), "sum": self.total, "count": self.count}


def quantile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The ``q`` quantile of bucket counts, interpolated within its bucket."""
    n = sum(counts)
    if n == 0:
        return None
    rank = q * n
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            lo = bounds[i - 1] if i > 0 else 0.0
            hi = bounds[i] if i < len(bounds) else bounds[-1]
            return lo + (hi - lo) * ((rank - seen) / c)
        seen += c
    return bounds[-1]


_QUANTILES: tuple[tuple[Literal["p50", "p90", "p99"], float], ...] = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))


def quantiles_ms(bounds: tuple[float, ...], h: HistogramExport) -> Quantiles:
    """p50, p90 and p99 of an exported histogram, in milliseconds, in one pass."""
    return quantiles_ms_of(bounds, h["counts"], h["count"])


def quantiles_ms_of(bounds: tuple[float, ...], counts: list[int], n: int) -> Quantiles:
    """p50, p90 and p99 of bucket ``counts`` holding ``n`` observations, in milliseconds."""
    if not n:
        return {"p50": None, "p90": None, "p99": None}
    out: Quantiles = {"p50": None, "p90": None, "p99": None}
    seen = 0
    i = 0
    last = len(counts) - 1
    for name, q in _QUANTILES:
        rank = q * n
        while i < last and seen + counts[i] < rank:
            seen += counts[i]
            i += 1
        c = counts[i]
        lo = bounds[i - 1] if i > 0 else 0.0
        hi = bounds[i] if i < len(bounds) else bounds[-1]
        v = lo + (hi - lo) * ((rank - seen) / c) if c else hi
        out[name] = round(v * 1000, 3)
    return out


RESPONSE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class RouteStats:
    """Everything counted for one route; survives reloads that keep the route's name."""

    __slots__ = (
        "cancelled_in_flight",
        "cancelled_queued",
        "client_queue_full",
        "clients",
        "codes",
        "deadline",
        "gateway_latency",
        "latency",
        "preempted",
        "queue_full",
        "queue_timeout",
        "queue_wait",
        "rate_limited",
        "requests",
        "route_timeout",
        "tunnels",
        "tunnels_full",
        "tunnels_opening",
        "tunnels_total",
        "upstream_errors",
    )

    def __init__(self) -> None:
        self.requests = 0
        # status code -> count, for gatewayd_requests_total{code} (and ``responses``)
        self.codes: dict[int, int] = {}
        self.queue_full = 0
        self.queue_timeout = 0
        self.client_queue_full = 0  # 429: the client held max_queue_per_client places already
        self.rate_limited = 0  # 429s of the route's rate_limit
        # SPEC §12: 503 deadline (could not be served in the client's budget), 503 preempted
        # (a higher class took the place), 504 route_timeout (no response head in time)
        self.deadline = 0
        self.preempted = 0
        self.route_timeout = 0
        self.cancelled_queued = 0
        self.cancelled_in_flight = 0
        # WebSocket tunnels (websocket = true): open now, upgrades on their way to a 101
        # (counted against max_tunnels with the open ones), opened since start, and the
        # upgrades refused at the cap (503 tunnels_full)
        self.tunnels = 0
        self.tunnels_opening = 0
        self.tunnels_total = 0
        self.tunnels_full = 0
        self.upstream_errors: dict[str, int] = {}
        self.clients = ClientCounts()  # refusals by client (the ``clients`` command)
        # responses the upstream made; the gateway's own answers go to gateway_latency
        self.latency = Histogram(LATENCY_BUCKETS)
        self.gateway_latency = Histogram(LATENCY_BUCKETS)
        self.queue_wait = Histogram(LATENCY_BUCKETS)

    def responded(self, status: int, seconds: float) -> None:
        """A response the upstream made (its head came from the upstream): the route's
        latency is theirs only."""
        try:
            self.codes[status] += 1
        except KeyError:  # the first response with this status
            self.codes[status] = 1
        latency = self.latency  # Histogram.observe, inlined: this runs for every request
        latency.counts[bisect_left(latency.bounds, seconds)] += 1
        latency.total += seconds

    def answered(self, status: int, seconds: float) -> None:
        """An answer the gateway made itself (a shed, a refusal, an error it answered):
        counted by status as any response, timed apart from the served ones."""
        try:
            self.codes[status] += 1
        except KeyError:
            self.codes[status] = 1
        own = self.gateway_latency  # (inlined as in responded: every shed comes here)
        own.counts[bisect_left(own.bounds, seconds)] += 1
        own.total += seconds

    @property
    def responses(self) -> list[int]:
        """Responses by class, indexed by ``status // 100`` (index 0 unused): summed
        from ``codes`` when read, not counted twice on the request path."""
        out = [0, 0, 0, 0, 0, 0]
        for status, n in self.codes.items():
            cls = status // 100
            if 1 <= cls <= 5:
                out[cls] += n
        return out

    def upstream_error(self, reason: str) -> None:
        errs = self.upstream_errors
        errs[reason] = errs.get(reason, 0) + 1

    def export(self) -> RouteCounters:
        """Counters and buckets (summable over workers)."""
        return {
            "requests": self.requests,
            "responses": dict(zip(RESPONSE_CLASSES, self.responses[1:], strict=True)),
            "codes": {str(c): n for c, n in self.codes.items()},
            "rejected": {"queue_full": self.queue_full, "queue_timeout": self.queue_timeout,
                         "client_queue_full": self.client_queue_full,
                         "rate_limited": self.rate_limited},
            "cancelled_queued": self.cancelled_queued,
            "cancelled_in_flight": self.cancelled_in_flight,
            "upstream_errors": dict(self.upstream_errors),
            "latency": self.latency.export(),
            "gateway_latency": self.gateway_latency.export(),
            "queue_wait": self.queue_wait.export(),
        }


class Registry:
    """Route statistics by route name: the one piece of long-lived mutable state."""

    def __init__(self) -> None:
        self.routes: dict[str, RouteStats] = {}

    def route(self, name: str) -> RouteStats:
        stats = self.routes.get(name)
        if stats is None:
            stats = self.routes[name] = RouteStats()
        return stats
