"""A request waiting in its route's queue: a timer and a ``Queued``, no task.
The gate wakes it with its slot, or sheds it (queue timeout, deadline,
preemption); its connection cancels it when the client leaves. What it needs
of the gateway is ``Gatekeeper``: the gateway forwards it or answers it."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from .admission import ADMITTED, QUEUE_TIMEOUT, Waiter
from .deadlines import DEADLINE

if TYPE_CHECKING:
    from ..http.body import RequestBody
    from ..http.server import Request
    from .exchange import Route


class Gatekeeper(Protocol):
    """What a queued request asks of the gateway (proxy.gateway.Gateway)."""

    _loop: asyncio.AbstractEventLoop

    def _forward(self, request: Request, route: Route, target: str, start: float) -> None: ...
    def _forward_body(self, request: Request, route: Route, target: str, start: float,
                      body: RequestBody) -> None: ...
    def _forward_ruled(self, request: Request, route: Route, target: str, start: float,
                       body: RequestBody | None, now: float) -> None: ...
    def _switch(self, request: Request, route: Route, target: str, start: float) -> None: ...
    def _refuse(self, request: Request, route: Route, status: int, reason: str, start: float,
                retry_after: str | None = None) -> None: ...
    def _log(self, request: Request, route: Route | None, status: int, size: int,
             start: float, reason: str | None) -> None: ...


class Queued:
    """A request in its route's queue: a timer and this, no task. The gate wakes it
    with its slot (or at its queue timeout); its connection cancels it when the
    client leaves (``request.task``)."""

    __slots__ = ("body", "gateway", "request", "route", "start", "target", "waiter")

    def __init__(self, gateway: Gatekeeper, request: Request, route: Route, target: str, start: float,
                 body: RequestBody | None = None) -> None:
        self.gateway = gateway
        self.request = request
        self.route = route
        self.target = target
        self.start = start
        self.body = body
        self.waiter: Waiter | None = None

    def wake(self, outcome: str | None) -> bool:
        """From the gate: a slot (ADMITTED) or the queue timeout. False declines the
        slot (the gate passes it on)."""
        self.waiter = None
        gateway = self.gateway
        request = self.request
        route = self.route
        request.task = None
        body = self.body
        if outcome is not ADMITTED:
            if body is not None:
                body.close()
            route.upstream.leave()
            stats = route.stats
            if outcome == QUEUE_TIMEOUT:
                stats.queue_timeout += 1
            elif outcome == DEADLINE:
                stats.deadline += 1
            else:
                stats.preempted += 1
            gateway._refuse(request, route, 503, outcome, self.start)
            return False
        if request.protocol.current is not request:
            # its client left in this loop turn; the cancel on its way comes too late
            self._gone()
            return False
        now = gateway._loop.time()
        route.stats.queue_wait.observe(now - self.start)
        if route.rules is not None:
            deadline = request.deadline
            if deadline and deadline - now < route.gate.estimator.needed:
                # a slot it could not use in time: declined, the next waiter's (SPEC §12)
                if body is not None:
                    body.close()
                route.upstream.leave()
                route.stats.deadline += 1
                gateway._refuse(request, route, 503, DEADLINE, self.start)
                return False
            gateway._forward_ruled(request, route, self.target, self.start, body, now)
            return True
        if body is None:
            gateway._forward(request, route, self.target, self.start)
        else:
            gateway._forward_body(request, route, self.target, self.start, body)
        return True

    def cancel(self) -> None:
        """The client left while its request waited: out of the queue, nothing sent."""
        waiter = self.waiter
        if waiter is not None and self.route.gate.leave(waiter):
            self.waiter = None
            self._gone()

    def _gone(self) -> None:
        self.request.task = None  # (it refers back to this)
        if self.body is not None:
            self.body.close()
        route = self.route
        route.upstream.leave()
        route.stats.cancelled_queued += 1
        self.gateway._log(self.request, route, 499, 0, self.start, "client_gone_queued")


class QueuedUpgrade(Queued):
    """A queued WebSocket upgrade: its tunnel place is given back unless it is admitted."""

    __slots__ = ()

    def wake(self, outcome: str | None) -> bool:
        if outcome is not ADMITTED:  # (its queue timeout)
            self.route.stats.tunnels_opening -= 1
            return super().wake(outcome)
        if self.request.protocol.current is not self.request:
            return super().wake(outcome)  # (gone: _gone gives the place back)
        self.waiter = None
        self.request.task = None
        self.route.stats.queue_wait.observe(self.gateway._loop.time() - self.start)
        self.gateway._switch(self.request, self.route, self.target, self.start)
        return True

    def _gone(self) -> None:
        super()._gone()
        self.route.stats.tunnels_opening -= 1
