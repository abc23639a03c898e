"""Per-route admission: a concurrency limit with a bounded FIFO wait queue.

The common case (a free slot, nobody waiting) is one synchronous call,
``try_enter``, with no future or coroutine created. A request that has to wait
pays for a timer and nothing else: no future and no task. A freed slot is
handed straight to the oldest waiter, by calling it from ``release`` (the
request goes upstream in that same call, with no loop turn in between), so
arrivals cannot overtake the queue and a slot is never idle while a request
waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

ADMITTED = None
QUEUE_FULL = "queue_full"
QUEUE_TIMEOUT = "queue_timeout"


class Waiter:
    """One queued request: what the queue X-ray shows, and whom to wake."""

    __slots__ = ("client", "method", "path", "since", "timer", "wake")

    def __init__(self, wake: Callable[[str | None], bool | None], since: float,
                 method: str, path: str, client: str) -> None:
        # called once: ADMITTED (the slot is the waiter's; False back declines it) or QUEUE_TIMEOUT
        self.wake = wake
        self.since = since
        self.method = method
        self.path = path
        self.client = client
        self.timer: asyncio.TimerHandle | None = None


class Gate:
    """At most ``limit`` holders; up to ``max_queue`` waiters, first in first out."""

    __slots__ = ("_loop", "in_flight", "limit", "max_queue", "waiters")

    def __init__(self, limit: int, max_queue: int) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.in_flight = 0
        # dict as an ordered set: O(1) removal of a waiter whose client left
        self.waiters: dict[Waiter, None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def try_enter(self) -> bool:
        """Take a slot if one is free and nobody waits; the fast path."""
        if self.in_flight < self.limit and not self.waiters:
            self.in_flight += 1
            return True
        return False

    def queue_full(self) -> bool:
        return len(self.waiters) >= self.max_queue

    def enqueue(self, wake: Callable[[str | None], bool | None], timeout: float, method: str, path: str,
                client: str) -> Waiter:
        """Wait in the queue. ``wake(ADMITTED)`` is called when a slot is the waiter's
        (from ``release`` or ``set_limits``, synchronously), or ``wake(QUEUE_TIMEOUT)``
        after ``timeout``; once. ``leave`` takes a waiter out before either.

        A waiter woken with a slot it cannot use (its client has just gone) returns
        False: the slot goes to the next waiter in the same loop, never by calling
        ``release`` from inside ``wake`` (hundreds of clients leaving at once would
        otherwise nest that many calls deep)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        waiter = Waiter(wake, loop.time(), method, path, client)
        self.waiters[waiter] = None
        waiter.timer = loop.call_later(timeout, self._expire, waiter)
        return waiter

    def leave(self, waiter: Waiter) -> bool:
        """Take a waiter out of the queue (its client left); whether it was still in it."""
        if self.waiters.pop(waiter, False) is None:
            if waiter.timer is not None:
                waiter.timer.cancel()
            return True
        return False

    def _expire(self, waiter: Waiter) -> None:
        if self.waiters.pop(waiter, False) is None:
            waiter.wake(QUEUE_TIMEOUT)

    def release(self) -> None:
        """Give a slot back; the oldest waiter gets it if the limit allows."""
        self.in_flight -= 1
        if self.waiters:
            self._admit()

    def _admit(self) -> None:
        waiters = self.waiters
        while waiters and self.in_flight < self.limit:
            waiter = next(iter(waiters))
            del waiters[waiter]
            self.in_flight += 1
            if waiter.timer is not None:
                waiter.timer.cancel()
            if waiter.wake(ADMITTED) is False:
                self.in_flight -= 1  # declined: the next waiter's

    def set_limits(self, limit: int | None = None, max_queue: int | None = None) -> None:
        """Change limits in place: raising admits waiters at once; lowering lets
        holders finish and admits nobody until below the new limit; a smaller
        queue drops nobody already waiting."""
        if limit is not None:
            self.limit = limit
        if max_queue is not None:
            self.max_queue = max_queue
        self._admit()

    def oldest_wait(self, now: float) -> float:
        """Seconds the oldest waiter has waited; 0 when nobody waits."""
        for waiter in self.waiters:
            return now - waiter.since
        return 0.0


def share(total: int, index: int, count: int, minimum: int = 0) -> int:
    """Worker ``index``'s part of a gateway-wide limit divided among ``count`` workers.

    The parts add up to ``total`` exactly: the remainder goes one each to the
    lowest-numbered workers. A part is never below ``minimum`` (a route limit of
    2 over 4 workers gives each worker 1, so the gateway-wide sum is 4).
    """
    base, extra = divmod(total, count)
    return max(minimum, base + (1 if index < extra else 0))
