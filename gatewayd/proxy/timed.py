"""An exchange with a deadline (SPEC §12): it is cut at the deadline if its
response head has not gone out (``504 route_timeout``, answered by the
gateway's ``_run``), it measures the time it held its slot for the route's
estimates, and it sends the remaining budget upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from .deadlines import Rules
from .exchange import Exchange

if TYPE_CHECKING:
    from ..http.body import RequestBody
    from ..http.server import Request
    from .exchange import Route


class Timed(Exchange):
    """An admitted request of a route with deadlines or classes."""

    __slots__ = ("admitted", "expired", "timer")

    def __init__(self, request: Request, route: Route, path: str, start: float,
                 body: RequestBody | None, admitted: float) -> None:
        Exchange.__init__(self, request, route, path, start, body)
        self.admitted = admitted  # when it got its slot (the service time's start)
        self.expired = False
        self.timer: asyncio.TimerHandle | None = None

    def expire(self) -> None:
        """The deadline: a request whose response head has not gone out is cut."""
        self.timer = None
        if self.head_sent:
            return
        task = self.request.task
        if isinstance(task, asyncio.Task) and not task.done():
            self.expired = True
            task.cancel()

    async def within(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (the upstream's serve); then stop the timer and give the route
        the time this request held its slot, when the upstream answered it."""
        try:
            await work
        finally:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.head_sent and not self.expired:
                loop = asyncio.get_running_loop()
                self.route.gate.estimator.observe(loop.time() - self.admitted)


def with_budget(fields: bytes, rules: Rules, remaining: float) -> bytes:
    """The header lines sent upstream with ``deadline_header`` saying the remaining
    budget (seconds, millisecond precision) instead of what the client sent."""
    name = rules.header_bytes
    lines = [line for line in fields.split(b"\r\n")
             if line and line.split(b":", 1)[0].lower() != name]
    assert rules.deadline_header is not None
    budget = b"%s: %.3f" % (rules.deadline_header.encode(), max(remaining, 0.001))
    return b"\r\n".join([*lines, budget]) + b"\r\n"
