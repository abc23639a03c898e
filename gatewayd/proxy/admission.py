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
  name from ``ORDERS``: ``Fifo``, and ``Fair`` (round-robin across clients, FIFO
  within one, SPEC §10). A priority order (SPEC §12) is a class beside them and
  one entry in ``ORDERS``; the gate never looks inside a discipline. ``set_policy``
  changes a gate's order in place (a reload), moving its waiters over.
- the limit: ``limit`` is a plain int read on the fast path, moved only by
  ``set_limits`` (reload, ``set_limit``; an adaptive controller, SPEC §13, is
  one more caller), which admits waiters at once when it rises.
- the shedding rules: ``queue_full`` is the bound, asked before a waiter is made
  (a shed costs a comparison); ``evict`` takes a queued waiter out with a reason
  as its answer: the queue timeout today, ``preempted`` or ``deadline`` next. A
  rule that refuses an arrival with a status of its own (``client_queue_full``,
  ``overloaded``) is asked by the gateway between ``try_enter`` and ``enqueue``,
  where that status is answered and counted. ``client_full`` is the per-client
  bound (``max_queue_per_client``): the gateway asks it only when ``per_client``
  is set, and only then does a FIFO queue count its waiters by client
  (``Counted``; ``Fair`` keeps them by client anyway).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterator
from operator import attrgetter
from typing import Protocol

from .deadlines import DEADLINE, PREEMPTED, Estimator

ADMITTED = None
QUEUE_FULL = "queue_full"
QUEUE_TIMEOUT = "queue_timeout"
CLIENT_QUEUE_FULL = "client_queue_full"
DEFAULT_CLASS = 1  # (deadlines.CLASSES: critical, default, sheddable)


class Waiter:
    """One queued request: what the queue X-ray shows, and whom to wake."""

    __slots__ = ("client", "deadline", "method", "path", "priority", "since", "timer", "wake")

    def __init__(self, wake: Callable[[str | None], bool | None], since: float,
                 method: str, path: str, client: str, priority: int = DEFAULT_CLASS,
                 deadline: float = 0.0) -> None:
        # called once: ADMITTED (the slot is the waiter's; False back declines it) or a reason
        self.wake = wake
        self.since = since
        self.method = method
        self.path = path
        self.client = client
        self.priority = priority  # its class (SPEC §12): 0 critical, 1 default, 2 sheddable
        self.deadline = deadline  # on the loop's clock; 0.0: none
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

    def newest(self) -> Waiter | None:
        """The waiter that came last; None when empty."""
        ...


class CountsClients(Discipline, Protocol):
    """A discipline that knows how many queue places each client holds (the per-client
    bound asks it)."""

    def holding(self, client: str) -> int:
        """Queue places ``client`` holds now."""
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

    def newest(self) -> Waiter | None:
        return next(reversed(self._waiters), None)


class Fair:
    """Round-robin across clients, first in, first out within one (SPEC §10): the
    next slot goes to the first client of a ring of the clients that wait, which
    then moves to the ring's end (or leaves it, its last waiter gone); a client
    that starts waiting joins at the end. A client with 400 waiters thus gets one
    slot in each round, as does a client with one.

    One ordered dict, client -> that client's waiters (an ordered dict too), in
    ring order: push, pop and remove are O(1). ``oldest`` looks at each waiting
    client's first waiter: O(clients), asked by snapshots only."""

    __slots__ = ("_clients", "_count")

    def __init__(self) -> None:
        self._clients: OrderedDict[str, OrderedDict[Waiter, None]] = OrderedDict()
        self._count = 0

    def push(self, waiter: Waiter) -> None:
        clients = self._clients
        mine = clients.get(waiter.client)
        if mine is None:
            mine = clients[waiter.client] = OrderedDict()
        mine[waiter] = None
        self._count += 1

    def pop(self) -> Waiter:
        clients = self._clients
        client, mine = next(iter(clients.items()))
        waiter = mine.popitem(last=False)[0]
        if mine:
            clients.move_to_end(client)
        else:
            del clients[client]
        self._count -= 1
        return waiter

    def remove(self, waiter: Waiter) -> bool:
        mine = self._clients.get(waiter.client)
        if mine is None or mine.pop(waiter, False) is not None:
            return False
        if not mine:
            del self._clients[waiter.client]
        self._count -= 1
        return True

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Waiter]:
        """Admission order: each waiting client's first waiter in ring order, then
        each one's second, and so on (what ``pop`` would give if nobody came or went)."""
        rounds = [iter(mine) for mine in self._clients.values()]
        while rounds:
            left = []
            for it in rounds:
                waiter = next(it, None)
                if waiter is not None:
                    yield waiter
                    left.append(it)
            rounds = left

    def oldest(self) -> Waiter | None:
        firsts = [next(iter(mine)) for mine in self._clients.values()]
        return min(firsts, key=_since) if firsts else None

    def newest(self) -> Waiter | None:
        lasts = [next(reversed(mine)) for mine in self._clients.values()]
        return max(lasts, key=_since) if lasts else None

    def holding(self, client: str) -> int:
        mine = self._clients.get(client)
        return 0 if mine is None else len(mine)


class Counted:
    """Another discipline (FIFO) with its waiters counted by client: what a route with
    ``max_queue_per_client`` and an order that does not count by itself uses, so
    that a route without the bound counts nothing."""

    __slots__ = ("_counts", "inner")

    def __init__(self, inner: Discipline) -> None:
        self.inner = inner
        self._counts: dict[str, int] = {}
        for waiter in inner:  # (a bound set on a route with waiters)
            self._counts[waiter.client] = self._counts.get(waiter.client, 0) + 1

    def push(self, waiter: Waiter) -> None:
        self.inner.push(waiter)
        counts = self._counts
        counts[waiter.client] = counts.get(waiter.client, 0) + 1

    def _out(self, client: str) -> None:
        counts = self._counts
        n = counts[client] - 1
        if n:
            counts[client] = n
        else:
            del counts[client]

    def pop(self) -> Waiter:
        waiter = self.inner.pop()
        self._out(waiter.client)
        return waiter

    def remove(self, waiter: Waiter) -> bool:
        if not self.inner.remove(waiter):
            return False
        self._out(waiter.client)
        return True

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(self.inner)

    def oldest(self) -> Waiter | None:
        return self.inner.oldest()

    def newest(self) -> Waiter | None:
        return self.inner.newest()

    def holding(self, client: str) -> int:
        return self._counts.get(client, 0)


class Prioritized:
    """Classes first (SPEC §12): every critical waiter before any default one, default
    before sheddable; within a class, the route's own order (a discipline per class).
    What a route with ``priority_header`` uses: without it all its waiters are of one
    class."""

    __slots__ = ("_count", "classes")

    def __init__(self, make: Callable[[], Discipline]) -> None:
        self.classes: tuple[Discipline, ...] = (make(), make(), make())
        self._count = 0

    def push(self, waiter: Waiter) -> None:
        self.classes[waiter.priority].push(waiter)
        self._count += 1

    def pop(self) -> Waiter:
        for waiters in self.classes:
            if len(waiters):
                self._count -= 1
                return waiters.pop()
        raise IndexError("pop from an empty queue")

    def remove(self, waiter: Waiter) -> bool:
        if self.classes[waiter.priority].remove(waiter):
            self._count -= 1
            return True
        return False

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Waiter]:
        for waiters in self.classes:
            yield from waiters

    def oldest(self) -> Waiter | None:
        olds = [w for w in (c.oldest() for c in self.classes) if w is not None]
        return min(olds, key=_since) if olds else None

    def newest(self) -> Waiter | None:
        news = [w for w in (c.newest() for c in self.classes) if w is not None]
        return max(news, key=_since) if news else None

    def ahead(self, priority: int) -> int:
        """Waiters a new one of class ``priority`` would wait behind."""
        return sum(len(c) for c in self.classes[:priority + 1])

    def newest_below(self, priority: int) -> Waiter | None:
        """The newest waiter of the lowest class below ``priority`` (SPEC §12's
        preemption victim); None when no waiter is of a lower class."""
        for waiters in reversed(self.classes[priority + 1:]):
            if len(waiters):
                return waiters.newest()
        return None

    def holding(self, client: str) -> int:
        return sum(c.holding(client) for c in self.classes)  # type: ignore[attr-defined]

    def by_class(self) -> list[int]:
        return [len(c) for c in self.classes]


_since = attrgetter("since")

# The queue orders by name: the values of a route's ``queue_order`` (SPEC §10).
ORDERS: dict[str, Callable[[], Discipline]] = {
    "fifo": Fifo,
    "fair": Fair,
}


def discipline(order: str, per_client: int, classes: bool = False) -> Discipline:
    """The discipline for ``order``; one that counts waiters by client if ``per_client``
    (a bound on them) is set and the order does not count them itself; by class first
    when ``classes`` (a route with ``priority_header``)."""
    def make() -> Discipline:
        made = ORDERS[order]()
        if per_client and not hasattr(made, "holding"):
            return Counted(made)
        return made
    return Prioritized(make) if classes else make()


class Gate:
    """At most ``limit`` holders; up to ``max_queue`` waiters, in the order of its
    ``Discipline`` (``waiters``); at most ``per_client`` of them from one client when
    it is set (0: no bound)."""

    __slots__ = ("_loop", "classes", "completed", "estimator", "in_flight", "limit", "max_queue", "order",
                 "per_client", "queued", "waiters")

    def __init__(self, limit: int, max_queue: int, order: str = "fifo", per_client: int = 0,
                 classes: bool = False) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.in_flight = 0
        self.order = order
        self.per_client = per_client
        self.classes = classes  # waiters ranked by class (Prioritized)
        self.waiters: Discipline = discipline(order, per_client, classes)
        self.queued = 0  # len(waiters), kept here: the fast path and a shed call no method
        self.completed = 0  # slots given back since start: the estimator's clock-free count
        self.estimator = Estimator()
        self._loop: asyncio.AbstractEventLoop | None = None

    def estimate(self, now: float) -> Estimator:
        """The route's estimates, sampled now if a sample is due (deadlines.Estimator)."""
        estimator = self.estimator
        estimator.sample(now, self.completed, self.in_flight)
        return estimator

    def retry_after(self, now: float, fallback: str) -> str:
        """The Retry-After of a 503 the gateway makes: whole seconds until the route
        could take a request (1 to 60), ``fallback`` while nothing is known."""
        return self.estimate(now).retry_after(self.queued, self.limit, fallback)

    def try_enter(self) -> bool:
        """Take a slot if one is free and nobody waits; the fast path."""
        if self.in_flight < self.limit and not self.queued:
            self.in_flight += 1
            return True
        return False

    def queue_full(self) -> bool:
        return self.queued >= self.max_queue

    def client_full(self, client: str) -> bool:
        """Whether ``client`` holds ``per_client`` queue places already; asked only when
        ``per_client`` is set (the discipline then counts by client)."""
        waiters: CountsClients = self.waiters  # type: ignore[assignment]
        return waiters.holding(client) >= self.per_client

    def enqueue(self, wake: Callable[[str | None], bool | None], timeout: float, method: str, path: str,
                client: str, priority: int = DEFAULT_CLASS, deadline: float = 0.0) -> Waiter:
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
        now = loop.time()
        # the route is full: a sample of how fast it frees slots (deadlines.Estimator)
        self.estimator.sample(now, self.completed, self.in_flight)
        waiter = Waiter(wake, now, method, path, client, priority, deadline)
        self.waiters.push(waiter)
        self.queued += 1
        if deadline:
            self._watch(waiter, now, timeout)
        else:
            waiter.timer = loop.call_later(timeout, self._expire, waiter)
        return waiter

    def _watch(self, waiter: Waiter, now: float, timeout: float) -> None:
        """A waiter with a deadline leaves at its queue timeout, or as soon as its
        remaining budget no longer covers the service time (``_doomed``), whichever
        comes first."""
        loop = self._loop
        assert loop is not None
        expires = waiter.since + timeout
        leave = waiter.deadline - self.estimator.needed
        if leave < expires:
            waiter.timer = loop.call_at(max(leave, now), self._doomed, waiter, expires)
        else:
            waiter.timer = loop.call_at(expires, self._expire, waiter)

    def _doomed(self, waiter: Waiter, expires: float) -> None:
        """A waiter's budget may no longer cover the service time: it leaves (503
        deadline), unless the estimate has moved and it still may."""
        loop = self._loop
        assert loop is not None
        now = loop.time()
        if waiter.deadline - self.estimate(now).needed > now + 0.001:
            self._watch(waiter, now, expires - waiter.since)
            return
        if self.waiters.remove(waiter):
            self.queued -= 1
            waiter.wake(DEADLINE)

    def ahead(self, priority: int) -> int:
        """Waiters a new waiter of class ``priority`` would wait behind."""
        waiters = self.waiters
        if isinstance(waiters, Prioritized):
            return waiters.ahead(priority)
        return self.queued

    def preempt(self, priority: int) -> bool:
        """A waiter of class ``priority`` arrives at a full queue: the newest waiter of
        the lowest class below it is shed (503 preempted) to make room; whether one was."""
        waiters = self.waiters
        if not isinstance(waiters, Prioritized):
            return False
        victim = waiters.newest_below(priority)
        return victim is not None and self.evict(victim, PREEMPTED)

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
        self.completed += 1
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

    def set_policy(self, order: str, per_client: int, classes: bool = False) -> None:
        """Change the queue order, the per-client bound and the ranking by class in
        place (a reload). A new discipline takes every waiter over, in arrival order
        (FIFO within each client whatever the orders), so nobody waiting is lost or
        jumps ahead of an earlier waiter of its own client; a lower bound drops nobody
        already waiting."""
        counted = bool(per_client)
        was_counted = bool(self.per_client)
        self.per_client = per_client
        waiters = self.waiters
        if classes != self.classes:
            new = discipline(order, per_client, classes)
            for waiter in sorted(waiters, key=_since):
                new.push(waiter)
            self.waiters = new
            self.order = order
            self.classes = classes
            return
        if classes:
            if order != self.order or counted != was_counted:
                new = discipline(order, per_client, classes)
                for waiter in sorted(waiters, key=_since):
                    new.push(waiter)
                self.waiters = new
                self.order = order
            return
        if order == self.order:
            if counted and not hasattr(waiters, "holding"):
                self.waiters = Counted(waiters)
            elif not counted and isinstance(waiters, Counted):
                self.waiters = waiters.inner  # a route without the bound counts nothing
            return
        new = discipline(order, per_client)
        for waiter in sorted(waiters, key=_since):
            new.push(waiter)
        self.waiters = new
        self.order = order

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
