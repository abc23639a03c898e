"""The deadlines scenario's load: clients that give up, and say when.

Every request carries ``X-Request-Timeout`` (the client's budget in seconds,
read by a route with ``deadline_header``), ``X-Bench-Id`` (unique) and
``X-Bench-Give-Up`` (the ``time.monotonic()`` instant the client gives up;
bench/upstream.py counts the work it finishes after it). A request not
answered by then is given up: its connection is closed (FIN, as a client
that stops waiting does) and the next request opens a new one.

- ``closed_loop``: processes of their own (``PROCESSES``, forked), each with
  its share of the clients and its own 127.0.0.x source addresses; every
  client sends its next request the moment the last was answered, refused or
  given up. Outcomes are counted by the instant they happened, inside the
  measured window only.
- ``PriorityLoop``: an open loop (bench/loadgen.py) whose every ``every``-th
  request is ``X-Priority: critical``, the others ``X-Priority: sheddable``.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from .aio import run as run_async
from .client import Conn, ConnectionClosed, Response
from .loadgen import OpenLoop

GAVE_UP = -1  # outcome of a request not answered within its budget
LATE_OK = -2  # ... of a 200 read after the budget (the client's process was behind)
ERROR = 0  # ... of a connection error (refused, reset, closed without an answer)
PROCESSES = 3
ADDRESSES_PER_PROCESS = 2  # 127.0.0.10 and up: a client's source address


def headers(budget: float, rid: int, give_up: float, priority: bytes = b"") -> bytes:
    line = b"X-Priority: %s\r\n" % priority if priority else b""
    return b"X-Request-Timeout: %.3f\r\nX-Bench-Id: %d\r\nX-Bench-Give-Up: %.4f\r\n%s" % (
        budget, rid, give_up, line)


@dataclass
class ClosedResult:
    """What the clients of the closed loop saw inside the window."""

    outcomes: Counter[int] = field(default_factory=Counter)  # status (or GAVE_UP, ERROR) -> count
    ok_ms: list[float] = field(default_factory=list)  # latency of each 200 within its budget
    refused_ms: list[float] = field(default_factory=list)  # latency of every other answer
    lag_ms: list[float] = field(default_factory=list)  # how late a 10 ms timer of each process fired

    def add(self, other: ClosedResult) -> None:
        self.outcomes.update(other.outcomes)
        self.ok_ms += other.ok_ms
        self.refused_ms += other.refused_ms
        self.lag_ms += other.lag_ms


class _GaveUp(Exception):
    pass


def closed_loop(port: int, clients: int, budget: float, start: float, window: tuple[float, float],
                end: float, pause: float = 0.0, header_budget: float | None = None) -> ClosedResult:
    """Run ``clients`` closed-loop clients over ``PROCESSES`` processes from ``start`` to
    ``end`` (``time.monotonic()`` instants); count what ended inside ``window``. With
    ``pause``, a client waits that long after an answer other than 200 before it asks again;
    ``header_budget``: the X-Request-Timeout sent, when not ``budget``."""
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    for i in range(PROCESSES):
        share = clients // PROCESSES + (1 if i < clients % PROCESSES else 0)
        sources = [f"127.0.0.{10 + i * ADDRESSES_PER_PROCESS + k}" for k in range(ADDRESSES_PER_PROCESS)]
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_process_main, daemon=True,
                           args=(child, port, share, sources, budget, start, window, end, i, pause,
                                 budget if header_budget is None else header_budget))
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    total = ClosedResult()
    try:
        for pipe in pipes:
            if pipe.poll(max(0.0, end - time.monotonic()) + budget + 15):
                total.add(pipe.recv())
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
    return total


def _process_main(out: Connection, port: int, clients: int, sources: list[str], budget: float,
                  start: float, window: tuple[float, float], end: float, index: int, pause: float,
                  sent: float) -> None:
    out.send(run_async(_clients(port, clients, sources, budget, start, window, end, index, pause, sent)))


async def _clients(port: int, clients: int, sources: list[str], budget: float, start: float,
                   window: tuple[float, float], end: float, index: int, pause: float, sent: float
                   ) -> ClosedResult:
    result = ClosedResult()
    ids = itertools.count(index * 1_000_000_000)
    loop = asyncio.get_running_loop()
    w0, w1 = window

    def expire(fut: asyncio.Future[Response]) -> None:
        if not fut.done():
            fut.set_exception(_GaveUp())

    async def client(source: str) -> None:
        conn: Conn | None = None
        while (now := time.monotonic()) < end:
            give_up = now + budget
            try:
                if conn is None or conn.closed:
                    async with asyncio.timeout(budget):
                        _, conn = await loop.create_connection(Conn, "127.0.0.1", port, local_addr=(source, 0))
                fut = conn.request(b"/", headers(sent, next(ids), give_up))
                timer = loop.call_later(give_up - time.monotonic(), expire, fut)
                try:
                    response = await fut
                finally:
                    timer.cancel()
                status = response.status
                if not response.keep_alive:
                    conn = None  # (it closes itself)
            except (_GaveUp, TimeoutError):
                status = GAVE_UP
                if conn is not None:
                    conn.close()
                conn = None
            except (OSError, ConnectionClosed):
                status = ERROR
                if conn is not None:
                    conn.abort()
                conn = None
                await asyncio.sleep(0.001)  # (a refused connect: not a spin of the event loop)
            done = time.monotonic()
            if status == 200 and done - now > budget:
                status = LATE_OK
            if w0 <= done < w1:
                result.outcomes[status] += 1
                if status == 200:
                    result.ok_ms.append((done - now) * 1000)
                elif status > 0:
                    result.refused_ms.append((done - now) * 1000)
            if pause and status > 0 and status != 200:
                await asyncio.sleep(pause)
        if conn is not None:
            conn.abort()

    async def lag() -> None:
        """A timer every 10 ms: how late it fires is how late this process reads its answers."""
        while (t := time.monotonic()) < end:
            await asyncio.sleep(0.01)
            late = time.monotonic() - t - 0.01
            if w0 <= t < w1:
                result.lag_ms.append(late * 1000)

    await asyncio.sleep(max(0.0, start - time.monotonic()))
    gc.disable()  # as the open loop: a collection over 200 clients' state would delay answers
    try:
        await asyncio.gather(lag(), *(client(sources[i % len(sources)]) for i in range(clients)))
    finally:
        gc.enable()
    return result


class PriorityLoop(OpenLoop):
    """The open loop with each request's budget, id, give-up instant and class in its head:
    request n is critical when n % ``every`` == 0, sheddable otherwise."""

    def __init__(self, port: int, rate: float, duration: float, budget: float, every: int,
                 max_conns: int, prewarm: int) -> None:
        super().__init__(port, rate, duration, budget, max_conns=max_conns, prewarm=prewarm)
        self.every = every
        self._ids = itertools.count(os.getpid() * 1_000_000)

    def critical(self, offset: float) -> bool:
        return round(offset * self.rate) % self.every == 0

    def headers(self, offset: float) -> bytes:
        # the loop's clock is perf_counter; the upstream's is monotonic (the same on Linux,
        # but measured, not assumed)
        give_up = self._t0 + offset + self.timeout + (time.monotonic() - time.perf_counter())
        cls = b"critical" if self.critical(offset) else b"sheddable"
        return headers(self.timeout, next(self._ids), give_up, cls)
