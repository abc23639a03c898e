"""The cost of admission control when its limits never bind.

gatewayd has no "no limits" setting, and a route whose limits are high enough
never to bind runs the same code as any other, so two routes cannot be
compared. Two honest measurements instead:

1. micro: the gate's fast path as the request path calls it (``try_enter``,
   the queue-wait histogram, ``release``), timed in-process, set against the
   CPU time gatewayd spends per proxied request;
2. end to end: gatewayd (max_concurrency=1000000, max_queue=0) against the same
   gatewayd with the gate's two methods replaced by no-ops
   (bench/gatewayd_nogate.py), CPU time per request under wrk -c50.

The micro figure is the precise one; the end-to-end one bounds it from above
but is within the noise of a shared machine (a few per cent).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..context import Context, Measured
from ..report import Table, median, ratio
from ..servers import Limits, gatewayd

LOOPS = 1_000_000


def run(ctx: Context) -> list[Table]:
    upstream = ctx.upstream()
    runs: dict[str, list[Measured]] = {"gate": [], "no-op gate": []}
    for rnd in range(ctx.options.repeats):
        for variant in runs:
            ctx.say(f"admission: round {rnd + 1}/{ctx.options.repeats}, {variant}")
            server = gatewayd(ctx.env, upstream.port, Limits(), nogate=variant != "gate")
            try:
                ctx.warm(server)
                runs[variant].append(ctx.measure(server, 50))
            finally:
                ctx.env.procs.stop(server.proc)
    cpu = {v: median([m.cpu_us_per_request for m in r]) for v, r in runs.items()}
    e2e = Table(
        f"Admission cost end to end: wrk -c50, gatewayd with and without its gate (median of "
        f"{ctx.options.repeats})",
        ["gatewayd", "req/s", "p99 ms", "CPU µs/req", "CPU vs no-op gate"],
    )
    for variant, r in runs.items():
        e2e.add(variant, median([m.result.rps for m in r]), median([m.result.p99_ms for m in r]),
                cpu[variant], ratio(cpu[variant], cpu["no-op gate"]))
    e2e.notes.append("gate: max_concurrency=1000000, max_queue=0 (never binds); no-op gate: "
                     "Gate.try_enter/release replaced by functions that do nothing.")

    ctx.say("admission: micro-benchmark")
    per_request = ctx.figures.get("throughput", {}).get("gatewayd", {}).get(50, {}).get("cpu_us")
    if per_request is None:
        per_request = cpu["gate"]
    loops = 200_000 if ctx.options.quick else LOOPS
    micro = Table(
        f"Admission cost, micro-benchmark (in-process, best of 5 x {loops:,} requests)",
        ["path", "ns/request", "% of gatewayd CPU/request"],
    )
    for name, ns in _micro(loops).items():
        micro.add(name, ns, 100 * ns / 1000 / per_request if per_request else None)
    micro.notes.append(f"gatewayd CPU/request: {per_request:.1f} µs (throughput at c=50, or the "
                       "end-to-end run above). Goal: admission <= 5 %.")
    return [micro, e2e]


def _micro(loops: int) -> dict[str, float]:
    from gatewayd.proxy.admission import Gate
    from gatewayd.stats.metrics import RouteStats

    gate = Gate(1_000_000, 0)
    stats = RouteStats()
    rng = range(loops)

    def empty() -> None:
        for _ in rng:
            pass

    def gate_only() -> None:
        enter, release = gate.try_enter, gate.release
        for _ in rng:
            if enter():
                release()

    def gate_and_metric() -> None:
        observe = stats.queue_wait.observe
        for _ in rng:
            if gate.try_enter():
                observe(0.0)
                gate.release()

    base = _best(empty)
    return {
        "Gate.try_enter + release": (_best(gate_only) - base) / loops * 1e9,
        "+ queue-wait histogram": (_best(gate_and_metric) - base) / loops * 1e9,
    }


def _best(fn: Callable[[], None], times: int = 5) -> float:
    best = float("inf")
    for _ in range(times):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
