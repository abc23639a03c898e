"""Cancellation: clients that give up mid-flight, and how soon the upstream hears of it.

An upstream in the harness's own process (bench/upstream.py) holds every
``/hold/<id>`` request and records, with ``time.monotonic()``, when it arrived
and when its connection closed. Each client sends one request through the
proxy, waits until the upstream has it, closes its connection (a FIN, as a
browser or curl does) and notes the time. The delay is upstream-close minus
client-close; no close within WINDOW seconds counts as "not aborted" (the
upstream answers at HOLD, so an unaborted request finishes normally).
"""

from __future__ import annotations

import asyncio
import time

from ..aio import run as run_async
from ..client import Conn
from ..context import Context
from ..procs import free_port
from ..report import Table, median_rows, percentile
from ..servers import start_proxy
from ..upstream import Upstream

WINDOW = 1.0
HOLD = 1.3
PARALLEL = 50
EARLY_STOP = 100


def run(ctx: Context) -> list[Table]:
    n = ctx.options.cancel_requests
    rounds = ctx.options.repeats
    table = Table(
        f"Cancellation: {n:,} requests closed by their clients while at the upstream; median of {rounds}",
        ["proxy", "requests", "aborted upstream", "p50 ms", "p99 ms", "max ms", "not aborted",
         "not forwarded"],
    )
    rows: dict[str, list[list[object]]] = {k: [] for k in ctx.options.proxies}
    for rnd in range(rounds):
        for kind in ctx.options.proxies:
            ctx.say(f"cancel: round {rnd + 1}/{rounds}, {kind}")
            upstream = Upstream(hold=HOLD)
            sent, delays, not_aborted, not_forwarded = run_async(_measure(ctx, kind, upstream, n))
            ms = [d * 1000 for d in delays]
            rows[kind].append([kind, sent, len(delays), percentile(ms, 50), percentile(ms, 99),
                               max(ms) if ms else None, not_aborted, not_forwarded])
    for r in rows.values():
        table.add(*median_rows(r))
    table.notes += [
        f"delay: from the client's close to the upstream seeing its connection close; "
        f"'not aborted': no close within {WINDOW:g} s (the request ran on to completion). A proxy "
        f"that has aborted none of the first {EARLY_STOP} is not given the rest.",
        "Goal: upstream abort p99 <= 10 ms (SPEC: within 100 ms).",
    ]
    return [table]


async def _measure(ctx: Context, kind: str, upstream: Upstream,
                   n: int) -> tuple[int, list[float], int, int]:
    """Requests sent, abort delays (seconds), requests not aborted, requests never forwarded."""
    arrived: dict[int, asyncio.Event] = {i: asyncio.Event() for i in range(n)}
    aborted: dict[int, asyncio.Event] = {i: asyncio.Event() for i in range(n)}
    upstream.on_arrival = lambda rid: arrived[rid].set()
    upstream.on_abort = lambda rid: aborted[rid].set()
    port = free_port()
    await upstream.start(port)
    loop = asyncio.get_running_loop()
    # started from inside the loop: the in-process upstream must already listen
    server = await loop.run_in_executor(None, start_proxy, ctx.env, kind, port)
    closed_at: dict[int, float] = {}
    missing = 0
    sent = 0
    done: list[bool] = []  # aborted or not, per finished request
    gate = asyncio.Semaphore(PARALLEL)

    async def one(i: int) -> None:
        nonlocal missing, sent
        async with gate:
            if len(done) >= EARLY_STOP and not any(done):
                return  # this proxy does not abort: the rest would only take time
            sent += 1
            conn = await Conn.open(server.port)
            fut = conn.request(b"/hold/%d" % i)
            try:
                await asyncio.wait_for(arrived[i].wait(), 2.0)
            except TimeoutError:
                missing += 1
                fut.cancel()
                conn.abort()
                return
            fut.cancel()
            conn.close()
            closed_at[i] = time.monotonic()
            try:
                await asyncio.wait_for(aborted[i].wait(), WINDOW)
                done.append(True)
            except TimeoutError:
                done.append(False)

    try:
        await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await loop.run_in_executor(None, ctx.env.procs.stop, server.proc)
        await upstream.close()
    delays = [upstream.aborted[i] - t for i, t in closed_at.items()
              if i in upstream.aborted and upstream.aborted[i] - t <= WINDOW]
    return sent, delays, len(closed_at) - len(delays), missing
