"""Per-route admission: a concurrency limit with a bounded FIFO wait queue.

The common case (a free slot, nobody waiting) is one synchronous call,
``try_enter``, with no future or coroutine created. Only a request that has to
wait pays for a future and a timer. A freed slot is handed straight to the
oldest waiter, so arrivals cannot overtake the queue.
"""

from __future__ import annotations

import asyncio

ADMITTED = None
QUEUE_FULL = "queue_full"
QUEUE_TIMEOUT = "queue_timeout"


class Waiter:
    """One queued request: what the queue X-ray shows, and its wake-up future."""

    __slots__ = ("client", "future", "method", "path", "since")

    def __init__(self, future: asyncio.Future[str | None], since: float,
                 method: str, path: str, client: str) -> None:
        self.future = future
        self.since = since
        self.method = method
        self.path = path
        self.client = client


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

    async def wait(self, timeout: float, method: str, path: str, client: str) -> str | None:
        """Wait in the queue: ``ADMITTED`` (the caller holds a slot) or ``QUEUE_TIMEOUT``.

        Cancellation (the client went away) removes the waiter at once; a slot
        granted in the same tick is given back.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] = loop.create_future()
        waiter = Waiter(future, loop.time(), method, path, client)
        self.waiters[waiter] = None
        timer = loop.call_later(timeout, self._expire, waiter)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.result() is ADMITTED:
                self.release()
            else:
                self.waiters.pop(waiter, None)
            raise
        finally:
            timer.cancel()

    def _expire(self, waiter: Waiter) -> None:
        if self.waiters.pop(waiter, False) is None and not waiter.future.done():
            waiter.future.set_result(QUEUE_TIMEOUT)

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
            if not waiter.future.done():
                self.in_flight += 1
                waiter.future.set_result(ADMITTED)

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
