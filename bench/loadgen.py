"""An open-loop load generator that records the status and latency of every request.

Requests are started on a fixed schedule (``rate`` per second) whether or not
earlier ones were answered, so a slow server cannot slow the offered load down
(wrk, a closed loop, would). Latency is measured from the scheduled start, so
time spent waiting for a connection counts.

Connections are opened before the schedule starts (``prewarm``, as wrk opens
all of its connections first), kept alive and reused; a new one is opened only
when none is idle. Requests run as callbacks on futures, not tasks, and one
sweep per millisecond times them out (a heap by deadline): one core offers several thousand
requests per second this way.
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import time
from dataclasses import dataclass, field
from functools import partial

from .client import Conn, Response

TIMEOUT = -1  # status recorded for a request not answered within the timeout
ERROR = 0  # ... for a connection error (refused, reset, closed without an answer)
OVERFLOW = -2  # ... for a request not sent: the client's connection budget was spent
LATE = -3  # ... for a request not sent: the generator itself fell a whole timeout behind


@dataclass
class OpenLoopResult:
    rate: float
    duration: float  # seconds over which requests were started
    # (scheduled start in seconds from the first, status, latency in seconds)
    samples: list[tuple[float, int, float]] = field(default_factory=list)
    max_open: int = 0
    late: float = 0.0  # the most the generator fell behind its schedule, seconds

    def window(self, start: float, end: float) -> list[tuple[float, int, float]]:
        """Samples of the requests scheduled in [start, end)."""
        return [s for s in self.samples if start <= s[0] < end]


class OpenLoop:
    def __init__(self, port: int, rate: float, duration: float, timeout: float = 2.0,
                 max_conns: int = 15000, prewarm: int = 0, path: bytes = b"/") -> None:
        self.port = port
        self.rate = rate
        self.duration = duration
        self.timeout = timeout
        self.max_conns = max_conns
        self.prewarm = min(prewarm, max_conns)
        self.path = path
        self.idle: list[Conn] = []
        self.open = 0
        self.result = OpenLoopResult(rate, duration)
        # heap of (deadline, sequence, conn, future): the sweep times out from the top
        self._inflight: list[tuple[float, int, Conn, asyncio.Future[Response]]] = []
        self._seq = 0
        self._connecting: set[asyncio.Task[None]] = set()
        self._t0 = 0.0

    async def run(self) -> OpenLoopResult:
        """Offer the load (``prewarm`` first, if it has not been called) and collect the outcome."""
        if self.prewarm and not self.open:
            await self.prewarm_connections()
        # A full collection over thousands of connections and samples stalls this loop for
        # tens of ms: every response in that window would be timed late, and the p99 of the
        # sheds measured the generator, not the server. Nothing here makes cycles that matter.
        gc.disable()
        try:
            return await self._offer()
        finally:
            gc.enable()

    async def _offer(self) -> OpenLoopResult:
        loop = asyncio.get_running_loop()
        total = int(self.rate * self.duration)
        self._t0 = t0 = time.perf_counter()
        n = 0
        while n < total:
            now = time.perf_counter()
            due = min(total, int((now - t0) * self.rate) + 1)
            if n < due:
                self.result.late = max(self.result.late, now - (t0 + n / self.rate))
            while n < due:
                offset = n / self.rate
                if now - (t0 + offset) > self.timeout:
                    self._record(offset, LATE, 0.0)  # keeps a saturated generator bounded in time
                else:
                    self._start(loop, offset)
                n += 1
            self._sweep(now)
            await asyncio.sleep(0.001)
        end = time.perf_counter() + self.timeout + 0.5
        while (self._inflight or self._connecting) and time.perf_counter() < end:
            self._sweep(time.perf_counter())
            await asyncio.sleep(0.005)
        for task in list(self._connecting):
            task.cancel()
        for _, _, conn, _ in self._inflight:
            conn.abort()
        for conn in self.idle:
            conn.abort()
        self.idle.clear()
        return self.result

    async def prewarm_connections(self) -> None:
        """Open the ``prewarm`` connections (the server may still be accepting them after)."""
        gate = asyncio.Semaphore(200)

        async def one() -> None:
            async with gate:
                try:
                    conn = await Conn.open(self.port)
                except OSError:
                    return
                self.idle.append(conn)
                self.open += 1

        await asyncio.gather(*(one() for _ in range(self.prewarm)))
        self.result.max_open = self.open

    def _record(self, offset: float, status: int, latency: float) -> None:
        self.result.samples.append((offset, status, latency))

    def _start(self, loop: asyncio.AbstractEventLoop, offset: float) -> None:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                self._send(conn, offset)
                return
            self.open -= 1
        if self.open >= self.max_conns:
            self._record(offset, OVERFLOW, 0.0)
            return
        self.open += 1
        self.result.max_open = max(self.result.max_open, self.open)
        task = loop.create_task(self._connect(offset))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, offset: float) -> None:
        scheduled = self._t0 + offset
        try:
            async with asyncio.timeout(max(0.0, scheduled + self.timeout - time.perf_counter())):
                conn = await Conn.open(self.port)
        except (OSError, TimeoutError):
            self.open -= 1
            status = TIMEOUT if time.perf_counter() >= scheduled + self.timeout else ERROR
            self._record(offset, status, time.perf_counter() - scheduled)
            return
        self._send(conn, offset)

    def headers(self, offset: float) -> bytes:
        """Header lines (each ending in CRLF) for the request scheduled at ``offset``: none
        here; a subclass may add some."""
        return b""

    def _send(self, conn: Conn, offset: float) -> None:
        fut = conn.request(self.path, self.headers(offset))
        self._seq += 1
        heapq.heappush(self._inflight, (self._t0 + offset + self.timeout, self._seq, conn, fut))
        fut.add_done_callback(partial(self._done, conn, offset))

    def _done(self, conn: Conn, offset: float, fut: asyncio.Future[Response]) -> None:
        if fut.cancelled():
            return  # timed out: the sweep recorded it
        latency = time.perf_counter() - (self._t0 + offset)
        if fut.exception() is not None:
            self._record(offset, ERROR, latency)
            conn.abort()
            self.open -= 1
            return
        response = fut.result()
        # answered after the client would have given up, before the sweep noticed
        self._record(offset, response.status if latency < self.timeout else TIMEOUT, latency)
        if response.keep_alive and not conn.closed:
            self.idle.append(conn)
        else:
            self.open -= 1

    def _sweep(self, now: float) -> None:
        inflight = self._inflight
        while inflight:
            deadline, _, conn, fut = inflight[0]
            if fut.done():
                heapq.heappop(inflight)
            elif deadline <= now:
                heapq.heappop(inflight)
                fut.cancel()
                conn.abort()
                self.open -= 1
                self._record(deadline - self.timeout - self._t0, TIMEOUT, self.timeout)
            else:
                break
