"""Python applications in-process (issue 23): the same ASGI application under
gatewayd (``interface = "asgi"``, one worker) and under uvicorn (``uvicorn[standard]``:
uvloop and httptools, one process, no access log), each pinned to the proxy CPU,
wrk and the harness on the load CPU; the applications are bench/apps.py.

- throughput: a raw ASGI hello and a Starlette hello route, ``wrk -c50``; per
  app both servers started and warmed, then measured in turns of
  ``duration`` / 4 seconds (``repeats`` x 4 turns each, the order swapped every
  turn), so that the busy spells of a shared machine fall on both alike; req/s
  and CPU µs per request over all of a server's turns, gatewayd's against
  uvicorn's. Goals: raw >= 1.3 x uvicorn's req/s, Starlette >= 1.1 x.
- overload: an app awaiting 100 ms per request, 100 at once (capacity 1,000
  req/s): gatewayd's route ``max_concurrency = 100`` with a queue
  (``max_queue = 2000``, ``queue_timeout = 2``) against uvicorn's
  ``--limit-concurrency 100``. Two closed loops of 2,000 connections, each on a
  fresh server: ``wrk -c2000`` (responses/s, 2xx/s as a share of capacity),
  then the harness's own client (bench/client.py), which records each
  response's status and latency, for the served (2xx) p99. Goals: gatewayd's
  2xx >= 95 % of capacity and >= uvicorn's; served p99 <= queue_timeout + 0.1 s.

gatewayd is measured when it is in ``--proxies`` (the default); uvicorn, the
reference, always.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from ..aio import run as run_async
from ..apps import SLOW_DELAY
from ..client import Conn, ConnectionClosed
from ..context import Context, Measured
from ..report import Table, median, median_rows, percentile, ratio
from ..servers import Limits, Server, gatewayd_app, uvicorn

TOOLS = ("uvicorn", "watchfiles", "starlette")  # Python modules (bench.deps.PYTHON)

# (label, "module:app", goal: gatewayd's req/s over uvicorn's)
APPS = (("raw ASGI hello", "bench.apps:hello", 1.3),
        ("Starlette hello route", "bench.apps:starlette_hello", 1.1))
CONNECTIONS = 50
SLICES = 4  # turns per round: the servers alternate every duration / SLICES seconds
SLOW = "bench.apps:slow"
SLOTS = 100
CAPACITY = SLOTS / SLOW_DELAY
LIMITS = Limits(max_concurrency=SLOTS, max_queue=2000, queue_timeout=2.0)
OVERLOAD = 2000  # connections
WRK_TIMEOUT = 5.0
SKIP = 1.0  # seconds of the closed loop left out (2,000 connections opening)
TIMEOUT, ERROR = -1, 0  # statuses the client records for no answer in time, a connection error


def servers(ctx: Context) -> list[str]:
    return [*(["gatewayd"] if "gatewayd" in ctx.options.proxies else []), "uvicorn"]


def start(ctx: Context, kind: str, app: str, overload: bool = False) -> Server:
    if kind == "gatewayd":
        return gatewayd_app(ctx.env, app, LIMITS if overload else Limits())
    return uvicorn(ctx.env, app, SLOTS if overload else None)


@contextmanager
def started(ctx: Context, kind: str, app: str, overload: bool = False) -> Iterator[Server]:
    server = start(ctx, kind, app, overload)
    try:
        yield server
    finally:
        ctx.env.procs.stop(server.proc)


def run(ctx: Context) -> list[Table]:
    kinds = servers(ctx)
    rounds = ctx.options.repeats
    throughput = _throughput_table(ctx, kinds, _throughput(ctx, kinds))

    wrk_rows: dict[str, list[list[object]]] = {k: [] for k in kinds}
    own_rows: dict[str, list[list[object]]] = {k: [] for k in kinds}
    seconds = ctx.options.overload_duration
    for rnd in range(rounds):
        for kind in kinds:
            ctx.say(f"apps: round {rnd + 1}/{rounds}, overload, {kind}, wrk -c{OVERLOAD}")
            with started(ctx, kind, SLOW, overload=True) as server:
                m = ctx.measure(server, OVERLOAD, seconds, timeout=WRK_TIMEOUT)
            r = m.result
            wrk_rows[kind].append([
                kind, r.rps, r.ok / r.seconds, 100 * r.ok / r.seconds / CAPACITY, r.non_2xx / r.seconds,
                r.p50_ms, r.p99_ms, r.socket_errors, m.cpu_us_per_request, m.cpu_share, m.wait_share])
            ctx.say(f"apps: round {rnd + 1}/{rounds}, overload, {kind}, own client, {OVERLOAD} connections")
            with started(ctx, kind, SLOW, overload=True) as server:
                before, t = server.proc.usage(), time.perf_counter()
                samples, span = run_async(closed_loop(server.port, OVERLOAD, seconds, WRK_TIMEOUT))
                used, wall = server.proc.usage() - before, time.perf_counter() - t
            own_rows[kind].append(_own_row(kind, samples, span, 100 * used.cpu / wall))
    wrk_table = Table(
        f"Apps overload, wrk -c{OVERLOAD} for {seconds:g} s: an app awaiting {SLOW_DELAY * 1000:g} ms, "
        f"{SLOTS} at once (capacity {CAPACITY:,.0f} req/s); median of {rounds}",
        ["server", "responses/s", "2xx req/s", "goodput % of capacity", "non-2xx/s", "p50 ms (all)",
         "p99 ms (all)", "socket errors", "CPU µs/response", "CPU %", "CPU wait %"])
    own_table = Table(
        f"Apps overload, the harness's client, {OVERLOAD} connections in a closed loop for {seconds:g} s "
        f"(first {SKIP:g} s left out): served latency; median of {rounds}",
        ["server", "2xx req/s", "goodput % of capacity", "p50 ms 2xx", "p99 ms 2xx", "max ms 2xx",
         "503/s", "p99 ms 503", "other statuses", "connection errors", f"timeouts ({WRK_TIMEOUT:g} s)",
         "CPU %"])
    for kind in kinds:
        wrk_table.add(*median_rows(wrk_rows[kind]))
        own_table.add(*median_rows(own_rows[kind]))
    wrk_table.notes += [
        f"gatewayd: route max_concurrency = {LIMITS.max_concurrency}, max_queue = {LIMITS.max_queue}, "
        f"queue_timeout = {LIMITS.queue_timeout:g}; uvicorn: --limit-concurrency {SLOTS}, which answers "
        "503 at once, closes the connection and logs a warning whenever it holds that many connections "
        "or tasks (connections count, not only requests in progress).",
        f"wrk's latencies mix 2xx and 503 answers; wrk timeout {WRK_TIMEOUT:g} s. Goal: gatewayd's "
        "goodput >= 95 % of capacity and >= uvicorn's.",
    ]
    own_table.notes += [
        "Each connection sends its next request as soon as the last is answered (reconnecting when the "
        "server closed it), as wrk does; every response's status and latency (from the request's write, "
        "a reconnection not counted) is recorded, so the 2xx are timed apart from the 503s.",
        f"Goal: gatewayd's p99 of the 2xx <= queue_timeout + service time = "
        f"{(LIMITS.queue_timeout + SLOW_DELAY) * 1000:,.0f} ms.",
    ]
    tables = [throughput, wrk_table, own_table]
    if "gatewayd" in kinds:
        tables.append(_goals(throughput, wrk_table, own_table))
    return tables


def _throughput(ctx: Context, kinds: list[str]) -> dict[tuple[str, str], list[Measured]]:
    """Per app, both servers started, warmed, then measured in turns: ``repeats`` x SLICES slices
    of ``duration`` / SLICES seconds each, the order swapped every slice, so that a busy spell of a
    shared machine falls on both alike."""
    runs: dict[tuple[str, str], list[Measured]] = {(label, k): [] for label, _, _ in APPS for k in kinds}
    seconds = max(1.0, ctx.options.duration / SLICES)
    turns = ctx.options.repeats * SLICES
    for label, app, _ in APPS:
        ctx.say(f"apps: {label}, {' and '.join(kinds)} in turns, {turns} x {seconds:g} s each, wrk -c{CONNECTIONS}")
        with ExitStack() as stack:
            live = {k: stack.enter_context(started(ctx, k, app)) for k in kinds}
            for k in kinds:
                ctx.warm(live[k], CONNECTIONS)
            for turn in range(turns):
                for k in (kinds if turn % 2 == 0 else kinds[::-1]):
                    runs[(label, k)].append(ctx.measure(live[k], CONNECTIONS, seconds))
    return runs


def _throughput_table(ctx: Context, kinds: list[str], runs: dict[tuple[str, str], list[Measured]]) -> Table:
    turns = len(next(iter(runs.values())))
    table = Table(
        f"Apps throughput, wrk -c{CONNECTIONS} (server on 1 core; {turns} turns of "
        f"{max(1.0, ctx.options.duration / SLICES):g} s each, in alternation)",
        ["app", "server", "req/s", "req/s vs uvicorn", "goal", "p50 ms", "p99 ms", "errors", "CPU µs/req",
         "CPU vs uvicorn", "CPU %", "CPU wait %"])
    for label, _, goal in APPS:
        tot = {k: _totals(runs[(label, k)]) for k in kinds}
        base = tot["uvicorn"]
        for kind in kinds:
            m = tot[kind]
            table.add(label, kind, m["rps"], ratio(m["rps"], base["rps"]), f">= {goal:g}" if kind != "uvicorn" else "",
                      m["p50"], m["p99"], int(m["errors"]), m["cpu_us"], ratio(m["cpu_us"], base["cpu_us"]),
                      m["cpu_pct"], m["wait_pct"])
        if "gatewayd" in kinds:
            per_turn = sorted(g.result.rps / u.result.rps for g, u in
                              zip(runs[(label, "gatewayd")], runs[(label, "uvicorn")], strict=True) if u.result.rps)
            table.notes.append(
                f"{label}: gatewayd's req/s over uvicorn's turn by turn: median {median(per_turn):.2f}, "
                f"quartiles {percentile(per_turn, 25):.2f}-{percentile(per_turn, 75):.2f}, "
                f"range {per_turn[0]:.2f}-{per_turn[-1]:.2f}.")
    table.notes += [
        "Both serve the same module (bench/apps.py), the 100-byte body; gatewayd: one worker, route "
        "max_concurrency = 1000000 (never binds), access log off; uvicorn: --loop uvloop --http httptools "
        "--no-access-log --log-level warning, one process. Both run the whole time (idle when not loaded), "
        "each measured in turn.",
        "req/s, CPU µs/req, CPU % and CPU wait %: over all the server's turns together; p50 and p99: the "
        "median of its turns'. CPU µs/req (the server's user+system CPU over its requests) is steadier "
        "than req/s on a shared machine; CPU % + CPU wait % well under 100: the server waited for wrk.",
    ]
    return table


def _totals(runs: list[Measured]) -> dict[str, float]:
    requests = sum(r.result.requests for r in runs)
    seconds = sum(r.result.seconds for r in runs)
    cpu = sum(r.cpu for r in runs)
    return {
        "rps": requests / seconds if seconds else float("nan"),
        "p50": median([r.result.p50_ms for r in runs]),
        "p99": median([r.result.p99_ms for r in runs]),
        "errors": sum(r.result.errors for r in runs),
        "cpu_us": cpu / requests * 1e6 if requests else float("nan"),
        "cpu_pct": 100 * cpu / seconds if seconds else float("nan"),
        "wait_pct": 100 * sum(r.waited for r in runs) / seconds if seconds else float("nan"),
    }


def _goals(throughput: Table, wrk_table: Table, own_table: Table) -> Table:
    table = Table("Apps: against the goals (issue 23)", ["goal", "measured", "met"])
    rows = {(r[0], r[1]): r for r in throughput.rows}
    for label, _, goal in APPS:
        got = rows[(label, "gatewayd")][3]
        table.add(f"{label}: req/s >= {goal:g} x uvicorn's", f"{got:.2f} x" if got else "n/a",
                  bool(got and got >= goal))
        cpu = rows[(label, "gatewayd")][9]  # gatewayd's CPU µs/req over uvicorn's
        table.add(f"{label}, by CPU (the steadier figure): uvicorn's CPU µs/req over gatewayd's",
                  f"{1 / cpu:.2f} x" if cpu else "n/a", "")
    wrk = {r[0]: r for r in wrk_table.rows}
    own = {r[0]: r for r in own_table.rows}
    g, u = wrk["gatewayd"][3], wrk["uvicorn"][3]
    table.add("overload: gatewayd's goodput >= 95 % of capacity (wrk)", f"{g:.1f} %", g >= 95)
    table.add("overload: gatewayd's goodput >= uvicorn's (wrk)", f"{g:.1f} % vs {u:.1f} %", g >= u)
    p99 = own["gatewayd"][4]
    bound = (LIMITS.queue_timeout + SLOW_DELAY) * 1000
    table.add(f"overload: served p99 <= {bound:,.0f} ms", f"{p99:,.0f} ms", bool(p99 == p99 and p99 <= bound))
    table.notes.append(
        f"The wrk goodput counts the whole run, whose first {SLOW_DELAY * 1000:g} ms can have no answer: "
        "the most a run of N seconds can show is (N - 0.1) / N, 98.75 % for 8 s, 95 % for --quick's 2 s.")
    return table


async def closed_loop(port: int, connections: int, seconds: float,
                      timeout: float) -> tuple[list[tuple[float, int, float]], float]:
    """``connections`` clients, each sending its next GET / as soon as the last is answered, for
    ``seconds``; (completion time from the start, status, latency) of every request, and the span
    of the window kept (after SKIP)."""
    samples: list[tuple[float, int, float]] = []
    t0 = time.perf_counter()
    end = t0 + seconds

    async def client() -> None:
        conn: Conn | None = None
        while time.perf_counter() < end:
            if conn is None or conn.closed:
                try:
                    conn = await asyncio.wait_for(Conn.open(port), timeout)
                except (OSError, TimeoutError):
                    samples.append((time.perf_counter() - t0, ERROR, 0.0))
                    conn = None
                    await asyncio.sleep(0.01)  # a refused connect is not retried in a hot loop
                    continue
            sent = time.perf_counter()
            try:
                response = await asyncio.wait_for(conn.request(), timeout)
            except TimeoutError:
                samples.append((time.perf_counter() - t0, TIMEOUT, timeout))
                conn.abort()
                conn = None
                continue
            except (ConnectionClosed, OSError):
                samples.append((time.perf_counter() - t0, ERROR, time.perf_counter() - sent))
                conn.abort()
                conn = None
                continue
            now = time.perf_counter()
            samples.append((now - t0, response.status, now - sent))
        if conn is not None:
            conn.abort()

    gc.disable()  # see bench/loadgen.py: a full collection would be timed as server latency
    try:
        await asyncio.gather(*(client() for _ in range(connections)))
    finally:
        gc.enable()
    return [s for s in samples if SKIP <= s[0] < seconds], seconds - SKIP


def _own_row(kind: str, samples: list[tuple[float, int, float]], span: float, cpu: float) -> list[object]:
    ok = [lat * 1000 for _, s, lat in samples if 200 <= s < 300]
    shed = [lat * 1000 for _, s, lat in samples if s == 503]
    other = sum(1 for _, s, _ in samples if s > 0 and not 200 <= s < 300 and s != 503)
    errors = sum(1 for _, s, _ in samples if s == ERROR)
    timeouts = sum(1 for _, s, _ in samples if s == TIMEOUT)
    return [kind, len(ok) / span, 100 * len(ok) / span / CAPACITY, percentile(ok, 50), percentile(ok, 99),
            max(ok, default=float("nan")), len(shed) / span, percentile(shed, 99), other, errors, timeouts, cpu]
