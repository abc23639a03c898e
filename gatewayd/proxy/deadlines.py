"""Deadlines and priorities (SPEC §12): a request's deadline and class, the
route's estimates of how fast it frees slots, and the rules built on them.

- **Deadline**: arrival plus the smaller of the route's ``timeout`` and the
  client's budget in ``deadline_header`` (seconds; a malformed value is
  ignored). Past it before the response head: ``504 route_timeout``.
- **Estimates** (``Estimator``, one per gate, read lazily): the rate at which
  the route completes requests, ``rate`` (slots freed a second, smoothed over
  samples at least ``SAMPLE`` seconds apart), and the typical service time by
  Little's law, ``service = in_flight / rate`` (smoothed in-flight over the
  same samples). No clock is read per request: the gate counts completions,
  and the samples are taken when a rule or a snapshot asks.
- **Deadline-aware admission**: a request that would queue behind ``ahead``
  waiters expects to wait ``(ahead + 1) / capacity``; if that plus ``needed``
  (the service time and ``MARGIN`` of it) is more than its remaining budget it
  is answered at once ``503 deadline``. A waiter leaves the queue (``503
  deadline``) as soon as its remaining budget is below ``needed``, and is
  never given a slot it could not use.
- **Retry-After** on the gateway's 503s: ``ceil((queued + 1) / rate)``,
  between 1 and 60 seconds; the route's ``retry_after`` while nothing is known.
- **Classes**: critical (0), default (1), sheddable (2); see
  ``admission.Prioritized``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..config.settings import RouteConfig

if TYPE_CHECKING:
    from ..http.server import Request

CLASSES = ("critical", "default", "sheddable")
CLASS_OF = {name: i for i, name in enumerate(CLASSES)}
DEADLINE = "deadline"
PREEMPTED = "preempted"
ROUTE_TIMEOUT = "route_timeout"

SAMPLE = 0.25  # seconds between the estimator's samples
# A request needs its service time and this share more once it has a slot: the service
# varies, and the answer must still reach its client (measured: without it, 2-5 % of
# the upstream's work under deadline overload arrived just too late)
MARGIN = 0.25
SMOOTHING = 0.3  # the weight of a new sample (exponential smoothing)
MAX_BUDGET = 86400.0  # a client budget beyond a day is taken as a day


class Rules:
    """A route's deadline and class rules; a route with none of the keys has none
    (``Route.rules`` is None) and pays nothing."""

    __slots__ = ("deadline_header", "header_bytes", "priority", "priority_header", "timeout")

    def __init__(self, config: RouteConfig) -> None:
        self.timeout = config.timeout
        self.deadline_header = config.deadline_header
        self.header_bytes = config.deadline_header.lower().encode() if config.deadline_header else b""
        self.priority = CLASS_OF[config.priority]
        self.priority_header = config.priority_header

    @staticmethod
    def of(config: RouteConfig) -> Rules | None:
        if (config.timeout is None and config.deadline_header is None and config.priority == "default"
                and config.priority_header is None):
            return None
        return Rules(config)

    @property
    def deadlines(self) -> bool:
        return self.timeout is not None or self.deadline_header is not None

    def deadline(self, request: Request, start: float) -> float:
        """The request's deadline on the loop's clock; 0.0 when none applies."""
        budget = self.timeout
        name = self.deadline_header
        if name is not None:
            given = _seconds(request.headers.get(name))
            if given is not None and (budget is None or given < budget):
                budget = given
        return 0.0 if budget is None else start + budget

    def priority_of(self, request: Request) -> int:
        name = self.priority_header
        if name is not None:
            value = request.headers.get(name)
            if value is not None:
                got = CLASS_OF.get(value.strip().lower())
                if got is not None:
                    return got
        return self.priority


def _seconds(value: str | None) -> float | None:
    """A budget in seconds, or None when absent or malformed (never an error page)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(seconds, MAX_BUDGET)


class Estimator:
    """A gate's completion rate and service time (see the module docstring)."""

    __slots__ = ("_at", "_done", "rate", "service", "timed")

    def __init__(self) -> None:
        self._at = -1.0  # when the last sample was taken (-1: never)
        self._done = 0
        self.rate = 0.0  # completions a second (0: not known yet)
        self.service = 0.0  # seconds a request holds its slot (0: not known yet)
        self.timed = False  # service is measured (observe), not inferred from samples

    def sample(self, now: float, completed: int, in_flight: int) -> None:
        """Take a sample if ``SAMPLE`` seconds have passed since the last."""
        at = self._at
        if at < 0:
            self._at, self._done = now, completed
            return
        elapsed = now - at
        if elapsed < SAMPLE:
            return
        done = completed - self._done
        self._at, self._done = now, completed
        if not done and not in_flight:
            return  # an idle route: nothing learned (the old estimates stand)
        rate = done / elapsed
        self.rate = rate if self.rate == 0.0 else self.rate + SMOOTHING * (rate - self.rate)
        if not self.timed and self.rate > 0 and in_flight:
            # Little's law, where nothing measures it: time in service = in flight / throughput
            self._smooth(in_flight / self.rate)

    @property
    def needed(self) -> float:
        """The budget a request needs once it has its slot: the service time and
        ``MARGIN`` of it more (0.0 while unknown)."""
        return self.service * (1 + MARGIN)

    def observe(self, seconds: float) -> None:
        """A request's time in its slot, measured (routes with deadlines time theirs)."""
        self.timed = True
        self._smooth(seconds)

    def _smooth(self, service: float) -> None:
        self.service = service if self.service == 0.0 else self.service + SMOOTHING * (service - self.service)

    def capacity(self, limit: int) -> float:
        """Slots the route frees a second when busy: what it completed lately, or
        ``limit`` slots over the service time if that is more (a burst's first
        samples still hold the quiet time before it). 0.0 when unknown."""
        rate = self.rate
        if self.service > 0:
            full = limit / self.service
            if full > rate:
                rate = full
        return rate

    def wait(self, ahead: int, limit: int) -> float | None:
        """Seconds a new waiter behind ``ahead`` others expects to wait; None if unknown."""
        capacity = self.capacity(limit)
        if capacity <= 0:
            return None
        return (ahead + 1) / capacity

    def retry_after(self, queued: int, limit: int, fallback: str) -> str:
        """Whole seconds until the route could take a request, 1 to 60."""
        capacity = self.capacity(limit)
        if capacity <= 0:
            return fallback
        return str(min(60, max(1, math.ceil((queued + 1) / capacity))))
