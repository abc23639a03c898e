"""Per-route admission: a concurrency limit with a bounded wait queue.

The common case (a free slot, nobody waiting) is one synchronous call,
``try_enter``, with no future or coroutine created. A request that has to wait
pays for a timer and nothing else: no future and no task. A freed slot is
handed straight to the next waiter, by calling it from ``release`` (the
request goes upstream in that same call, with no loop turn in between), so
arrivals cannot overtake the queue and a slot is never idle while a request
waits for it.

The policy seam. The gate owns counting, timers and waking; what may change
from route to route is pluggable without touching it:

- the queue order: a ``Discipline`` (push, pop, remove, len, iterate) chosen by
  name from ``ORDERS``; ``Fifo`` is today's only one. A fair (round-robin per
  client, SPEC §10) or priority order (SPEC §12) is a class beside it and one
  entry in ``ORDERS``; the gate never looks inside a discipline.
- the limit: ``limit`` is a plain int read on the fast path, moved only by
  ``set_limits`` (reload, ``set_limit``; an adaptive controller, SPEC §13, is
  one more caller), which admits waiters at once when it rises.
- the shedding rules: ``queue_full`` is the bound, asked before a waiter is made
  (a shed costs a comparison); ``evict`` takes a queued waiter out with a reason
  as its answer: the queue timeout today, ``preempted`` or ``deadline`` next. A
  rule that refuses an arrival with a status of its own (``client_queue_full``,
  ``overloaded``) is asked by the gateway between ``try_enter`` and ``enqueue``,
  where that status is answered and counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Protocol

ADMITTED = None
QUEUE_FULL = "queue_full"
QUEUE_TIMEOUT = "queue_timeout"


class Waiter:
    """One queued request: what the queue X-ray shows, and whom to wake."""

    __slots__ = ("client", "method", "path", "since", "timer", "wake")

    def __init__(self, wake: Callable[[str | None], bool | None], since: float,
                 method: str, path: str, client: str) -> None:
        # called once: ADMITTED (the slot is the waiter's; False back declines it) or a reason
        self.wake = wake
        self.since = since
        self.method = method
        self.path = path
        self.client = client
        self.timer: asyncio.TimerHandle | None = None


class Discipline(Protocol):
    """The order in which a gate's waiters get slots. The gate calls it only with
    waiters it queued, never ``pop`` on an empty queue, and keeps its own count
    (the fast path asks no method of it)."""

    def push(self, waiter: Waiter) -> None:
        """A new waiter joins."""

    def pop(self) -> Waiter:
        """Take out the waiter that gets the next free slot."""
        ...

    def remove(self, waiter: Waiter) -> bool:
        """Take ``waiter`` out (its client left, or a rule sheds it); whether it was in."""
        ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Waiter]:
        """The waiters in the order they would get slots: the queue X-ray's order."""
        ...

    def oldest(self) -> Waiter | None:
        """The waiter that has waited longest; None when empty."""
        ...


class Fifo:
    """First in, first out (SPEC §3)."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        # dict as an ordered set: O(1) removal of a waiter whose client left
        self._waiters: dict[Waiter, None] = {}

    def push(self, waiter: Waiter) -> None:
        self._waiters[waiter] = None

    def pop(self) -> Waiter:
        waiters = self._waiters
        waiter = next(iter(waiters))
        del waiters[waiter]
        return waiter

    def remove(self, waiter: Waiter) -> bool:
        return self._waiters.pop(waiter, False) is None

    def __len__(self) -> int:
        return len(self._waiters)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(self._waiters)

    def oldest(self) -> Waiter | None:
        return next(iter(self._waiters), None)


# The queue orders by name (the names SPEC §10's ``queue_order`` will take);
# every route uses "fifo" until that key exists.
ORDERS: dict[str, Callable[[], Discipline]] = {
    "fifo": Fifo,
}


class Gate:
    """At most ``limit`` holders; up to ``max_queue`` waiters, in the order of its
    ``Discipline`` (``waiters``)."""

    __slots__ = ("_loop", "in_flight", "limit", "max_queue", "queued", "waiters")

    def __init__(self, limit: int, max_queue: int, order: str = "fifo") -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.in_flight = 0
        self.waiters: Discipline = ORDERS[order]()
        self.queued = 0  # len(waiters), kept here: the fast path and a shed call no method
        self._loop: asyncio.AbstractEventLoop | None = None

    def try_enter(self) -> bool:
        """Take a slot if one is free and nobody waits; the fast path."""
        if self.in_flight < self.limit and not self.queued:
            self.in_flight += 1
            return True
        return False

    def queue_full(self) -> bool:
        return self.queued >= self.max_queue

    def enqueue(self, wake: Callable[[str | None], bool | None], timeout: float, method: str, path: str,
                client: str) -> Waiter:
        """Wait in the queue. ``wake(ADMITTED)`` is called when a slot is the waiter's
        (from ``release`` or ``set_limits``, synchronously), or ``wake(reason)`` when it
        is shed (``QUEUE_TIMEOUT`` after ``timeout``, or by ``evict``); once. ``leave``
        takes a waiter out before either.

        A waiter woken with a slot it cannot use (its client has just gone) returns
        False: the slot goes to the next waiter in the same loop, never by calling
        ``release`` from inside ``wake`` (hundreds of clients leaving at once would
        otherwise nest that many calls deep)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        waiter = Waiter(wake, loop.time(), method, path, client)
        self.waiters.push(waiter)
        self.queued += 1
        waiter.timer = loop.call_later(timeout, self._expire, waiter)
        return waiter

    def leave(self, waiter: Waiter) -> bool:
        """Take a waiter out of the queue (its client left); whether it was still in it."""
        if self.waiters.remove(waiter):
            self.queued -= 1
            if waiter.timer is not None:
                waiter.timer.cancel()
            return True
        return False

    def evict(self, waiter: Waiter, reason: str) -> bool:
        """Shed a queued waiter: out of the queue, then ``wake(reason)``; whether it was
        still in it. The seam for rules that give up on a waiter (preempted, deadline):
        the gateway's waiter answers the reasons it knows (``QUEUE_TIMEOUT`` today), so
        a rule's new reason comes with its status and counter there."""
        if not self.leave(waiter):
            return False
        waiter.wake(reason)
        return True

    def _expire(self, waiter: Waiter) -> None:
        if self.waiters.remove(waiter):
            self.queued -= 1
            waiter.wake(QUEUE_TIMEOUT)

    def release(self) -> None:
        """Give a slot back; the next waiter gets it if the limit allows."""
        self.in_flight -= 1
        if self.queued:
            self._admit()

    def _admit(self) -> None:
        waiters = self.waiters
        while self.queued and self.in_flight < self.limit:
            waiter = waiters.pop()
            self.queued -= 1
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
        """Seconds the longest waiter has waited; 0 when nobody waits."""
        waiter = self.waiters.oldest()
        return 0.0 if waiter is None else now - waiter.since


def share(total: int, index: int, count: int, minimum: int = 0) -> int:
    """Worker ``index``'s part of a gateway-wide limit divided among ``count`` workers.

    The parts add up to ``total`` exactly: the remainder goes one each to the
    lowest-numbered workers. A part is never below ``minimum`` (a route limit of
    2 over 4 workers gives each worker 1, so the gateway-wide sum is 4).
    """
    base, extra = divmod(total, count)
    return max(minimum, base + (1 if index < extra else 0))
