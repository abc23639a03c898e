"""Overload: a backend of fixed capacity offered several times what it can serve.

The upstream (bench/upstream.py) answers in 100 ms with 100 workers: capacity
1,000 req/s. gatewayd's route has max_concurrency=100, max_queue=200,
queue_timeout=1; HAProxy has ``maxconn 100`` on the server and ``timeout queue
1s``; the naive aiohttp proxy has no limits. Two kinds of load:

- open loop (bench/loadgen.py): 5,000 req/s on a fixed schedule, each request's
  status and latency recorded, a client timeout of 2 s; figures over the
  steady part (the first second is left out);
- closed loop: ``wrk -c2000``, each connection sending its next request as soon
  as the last was answered, so a proxy that sheds fast is offered far more.

Goodput: 2xx responses per second, as a fraction of the capacity.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..aio import run as run_async
from ..context import Context
from ..loadgen import ERROR, LATE, OVERFLOW, TIMEOUT, OpenLoop, OpenLoopResult
from ..report import Table, median_rows, percentile
from ..servers import Limits, Server, python_upstream, start_proxy

DELAY = 0.1
SLOTS = 100
CAPACITY = SLOTS / DELAY
OFFERED = 5 * CAPACITY
LIMITS = Limits(max_concurrency=100, max_queue=200, queue_timeout=1.0)
CLIENT_TIMEOUT = 2.0
# connections opened before the schedule starts: enough for a proxy that holds every
# request a whole queue_timeout (HAProxy's unbounded queue) not to need new ones
PREWARM = int(OFFERED * (LIMITS.queue_timeout + DELAY) * 1.1)
MAX_CONNS = PREWARM + 2000  # beyond: "not sent", as a client with a bounded pool would
PROXIES = ("gatewayd", "haproxy", "naive")


def run(ctx: Context) -> list[Table]:
    proxies = [p for p in PROXIES if p in ctx.options.proxies]
    seconds = ctx.options.overload_duration
    rounds = ctx.options.repeats
    warm = min(1.0, seconds / 4)
    open_table = Table(
        f"Overload, open loop: {OFFERED:,.0f} req/s offered for {seconds:g} s to a backend of "
        f"{CAPACITY:,.0f} req/s (100 workers x 100 ms); median of {rounds}",
        ["proxy", "offered req/s", "2xx req/s", "goodput % of capacity", "p50 ms 2xx", "p99 ms 2xx",
         "shed (503) req/s", "p50 ms shed", "p99 ms shed", "timeouts", "not sent", "errors/other",
         "proxy CPU %", "CPU wait %", "client lag ms"],
    )
    closed_table = Table(
        f"Overload, closed loop: wrk -c2000 for {seconds:g} s, same backend and limits; median of {rounds}",
        ["proxy", "responses/s", "2xx req/s", "goodput % of capacity", "non-2xx/s", "p50 ms (all)",
         "p99 ms (all)", "socket errors", "CPU µs/response", "proxy CPU %", "CPU wait %"],
    )
    open_rows: dict[str, list[list[object]]] = {k: [] for k in proxies}
    closed_rows: dict[str, list[list[object]]] = {k: [] for k in proxies}
    for rnd in range(ctx.options.repeats):
        for kind in proxies:
            ctx.say(f"overload: round {rnd + 1}/{ctx.options.repeats}, open loop, {kind}")
            with _setup(ctx, kind) as server:
                result, used = run_async(_open_loop(server, seconds))
            open_rows[kind].append(_open_row(kind, result, warm, seconds, used))

            ctx.say(f"overload: round {rnd + 1}/{ctx.options.repeats}, wrk -c2000, {kind}")
            with _setup(ctx, kind) as server:
                m = ctx.measure(server, 2000, seconds, timeout=5.0)
            r = m.result
            closed_rows[kind].append([
                kind, r.rps, r.ok / r.seconds, 100 * r.ok / r.seconds / CAPACITY, r.non_2xx / r.seconds,
                r.p50_ms, r.p99_ms, r.socket_errors, m.cpu_us_per_request, m.cpu_share, m.wait_share])
    for kind in proxies:
        open_table.add(*median_rows(open_rows[kind]))
        closed_table.add(*median_rows(closed_rows[kind]))
    open_table.notes += [
        "shed: 503 answers (gatewayd: queue_full or queue_timeout; HAProxy: queue timeout). "
        "Latencies are from each request's scheduled start, so waiting for a connection counts. "
        f"The client opens {PREWARM:,} connections before it starts, and more when none is idle.",
        f"timeouts: no answer within {CLIENT_TIMEOUT:g} s (the client gives up and closes the "
        f"connection). not sent: all {MAX_CONNS:,} client connections were busy, or the generator "
        "fell a whole timeout behind its schedule. errors/other: connection errors, other statuses.",
        "proxy CPU % / CPU wait %: the share of its core the proxy used, and the share of the "
        "time it was ready to run but another process had the core (see the throughput table).",
        "client lag: the most the generator fell behind its schedule (a busy load core); "
        "more than a few ms and the offered load was burstier than planned.",
        "Goal: goodput >= 95 % of capacity, shed responses in <= 5 ms (p99).",
    ]
    closed_table.notes.append(
        "wrk's latency figures mix admitted and shed responses; wrk timeout 5 s. With 2,000 "
        "connections a proxy that answers 503 at once is offered many times the open-loop rate.")
    return [open_table, closed_table]


async def _open_loop(server: Server, seconds: float) -> tuple[OpenLoopResult, tuple[float, float]]:
    """Open the connections, let the proxy finish accepting them, then offer the load."""
    gen = OpenLoop(server.port, OFFERED, seconds, CLIENT_TIMEOUT, max_conns=MAX_CONNS, prewarm=PREWARM)
    await gen.prewarm_connections()
    await asyncio.get_running_loop().run_in_executor(None, server.proc.wait_quiet)
    before, t = server.proc.usage(), time.perf_counter()
    result = await gen.run()
    used, wall = server.proc.usage() - before, time.perf_counter() - t
    return result, (100 * used.cpu / wall, 100 * used.waited / wall)


@contextmanager
def _setup(ctx: Context, kind: str) -> Iterator[Server]:
    """A fresh upstream and proxy for one measurement, both stopped on exit."""
    up = python_upstream(ctx.env, DELAY, SLOTS)
    try:
        proxy = start_proxy(ctx.env, kind, up.port, LIMITS)
        try:
            yield proxy
        finally:
            ctx.env.procs.stop(proxy.proc)
    finally:
        ctx.env.procs.stop(up.proc)


def _open_row(kind: str, result: OpenLoopResult, start: float, end: float,
              used: tuple[float, float]) -> list[object]:
    span = end - start
    steady = result.window(start, end)
    done_2xx = sum(1 for t, s, lat in result.samples if 200 <= s < 300 and start <= t + lat < end)
    ok = [lat * 1000 for _, s, lat in steady if 200 <= s < 300]
    shed = [lat * 1000 for _, s, lat in steady if s == 503]
    timeouts = sum(1 for _, s, _ in steady if s == TIMEOUT)
    unsent = sum(1 for _, s, _ in steady if s in (OVERFLOW, LATE))
    bad = sum(1 for _, s, _ in steady if s == ERROR or (s >= 300 and s != 503) or 0 < s < 200)
    return [kind, len(steady) / span, done_2xx / span, 100 * done_2xx / span / CAPACITY,
              percentile(ok, 50), percentile(ok, 99), len(shed) / span, percentile(shed, 50),
              percentile(shed, 99), timeouts, unsent, bad, *used, result.late * 1000]
