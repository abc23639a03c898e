"""Deadlines and priorities (issue 24): no work for a client that has given up.

The upstream (bench/upstream.py) answers in 100 ms with 20 workers: capacity
200 req/s. Every request carries ``X-Request-Timeout: 1.0`` and its client gives
up after 1.0 s (bench/deadline_load.py: it closes the connection); the upstream
counts the requests it finished after their client's give-up instant (the
``X-Bench-Give-Up`` header), work done for nobody.

1. *Useful goodput*: 600 closed-loop clients (three processes, six source
   addresses), each sending its next request the moment the last was answered,
   refused or given up. Useful goodput: 200 answers that reached their client
   within its 1.0 s, as a share of the capacity.
2. *Priorities*: an open loop of 1,000 req/s (five times the capacity), every
   tenth request ``X-Priority: critical``, the others ``sheddable``; the
   critical requests' success rate (a 200 within 1.0 s) and the sheddable ones'
   goodput.

Proxies:

- gatewayd fifo: ``max_concurrency = 20``, ``max_queue = 200``,
  ``queue_timeout = 1.0`` (the route as before this issue);
- gatewayd deadlines: the same with ``timeout = 2.0`` and ``deadline_header =
  "X-Request-Timeout"`` (the client's 1.0 s is the budget);
- gatewayd priorities: the deadlines route with ``priority = "sheddable"`` and
  ``priority_header = "X-Priority"``;
- HAProxy: ``server ... maxconn 20``, ``timeout queue 1s``; "haproxy
  abortonclose" adds ``option abortonclose`` (a queued request whose client
  closed is dropped); "haproxy priority-class" adds ``http-request
  set-priority-class int(-1)`` for ``X-Priority: critical`` (served first).

gatewayd's route counters are read from its control socket every 0.25 s over
the run (rejections by reason, cancellations, the queue), and every snapshot
is kept in the server's folder (``snapshots.jsonl``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..aio import run as run_async
from ..context import Context
from ..deadline_load import ERROR, GAVE_UP, LATE_OK, PriorityLoop, closed_loop
from ..loadgen import LATE, OVERFLOW, TIMEOUT
from ..procs import Usage
from ..report import Table, median_rows, percentile
from ..servers import Limits, Server, control, gatewayd, haproxy, late_counts, python_upstream, served_rate

DELAY = 0.1
SLOTS = 20
CAPACITY = SLOTS / DELAY
BUDGET = 1.0  # the client's: X-Request-Timeout, and when it gives up
CLIENTS = 600
OFFERED = 5 * CAPACITY  # the priority run's open loop
CRITICAL_EVERY = 10
PREWARM = int(OFFERED * (BUDGET + DELAY) * 1.1)
MAX_CONNS = PREWARM + 2000
WARM = 2.0
# a diagnostic, not the scenario: seconds a refused client waits before it asks again (the
# scenario's clients ask at once, and their refusals keep the load CPU busy)
PAUSE = float(os.environ.get("BENCH_DEADLINES_PAUSE", "0"))
# ... and the budget the closed loop's clients send, when not the 1.0 s they wait
HEADER_BUDGET = float(os.environ.get("BENCH_DEADLINES_SENT", str(BUDGET)))
LIMITS = Limits(max_concurrency=SLOTS, max_queue=200, queue_timeout=1.0)
DEADLINE_KEYS = 'timeout = 2.0\ndeadline_header = "X-Request-Timeout"\n'
PRIORITY_KEYS = DEADLINE_KEYS + 'priority = "sheddable"\npriority_header = "X-Priority"\n'
GATEWAYD_KEYS = {"gatewayd fifo": "", "gatewayd deadlines": DEADLINE_KEYS, "gatewayd priorities": PRIORITY_KEYS}
HAPROXY_LINES: dict[str, tuple[str, ...]] = {
    "haproxy": (),
    "haproxy abortonclose": ("option abortonclose",),
    "haproxy priority-class": ("http-request set-priority-class int(-1) if { req.hdr(X-Priority) -m str critical }",),
}
USEFUL_VARIANTS = ("gatewayd fifo", "gatewayd deadlines", "haproxy", "haproxy abortonclose")
PRIORITY_VARIANTS = ("gatewayd fifo", "gatewayd deadlines", "gatewayd priorities", "haproxy priority-class")
NEW_KEYS = ("timeout", "deadline_header", "priority", "priority_header")
REASONS = ("queue_full", "queue_timeout", "deadline", "route_timeout", "preempted")
# a route's snapshot fields before issue 24 (the counters table shows the ones that move)
ROUTE_FIELDS = {"name", "in_flight", "max_concurrency", "queued", "max_queue", "requests", "responses",
                "rejected", "cancelled", "upstream_errors", "latency_ms", "limit", "upstream", "path_prefix",
                "host", "queue_timeout", "oldest_wait_ms", "waiters", "served", "gateway_answers", "codes",
                "cancelled_queued", "cancelled_in_flight", "upstream_error_reasons", "queue_wait_ms",
                "tunnels", "max_tunnels", "tunnels_total"}


def run(ctx: Context) -> list[Table]:
    seconds = 6.0 if ctx.options.quick else 12.0
    rounds = ctx.options.repeats
    core = _core_has_keys()
    skipped = [] if core else ["gatewayd deadlines", "gatewayd priorities"]
    chosen = [v for v in dict.fromkeys(USEFUL_VARIANTS + PRIORITY_VARIANTS)
              if v.split()[0] in ctx.options.proxies and v not in skipped]
    useful = Table(
        f"Deadlines, useful goodput: {CLIENTS} closed-loop clients giving up after {BUDGET:g} s "
        f"(X-Request-Timeout: {BUDGET:g}), a route of {SLOTS} slots on a {DELAY * 1000:.0f} ms upstream "
        f"({CAPACITY:.0f} req/s); {seconds:g} s, median of {rounds}",
        ["proxy", "useful 2xx/s", "useful % of capacity", "2xx p50 ms", "2xx p99 ms", "refused/s",
         "refused p99 ms", "given up/s", "of which 2xx read late/s", "errors/s", "upstream served/s",
         "upstream work wasted %", "budget at upstream ms", "proxy CPU %", "load CPU %", "client lag p99 ms"])
    prio = Table(
        f"Priorities: {OFFERED:,.0f} req/s offered (open loop, {100 // CRITICAL_EVERY} % critical, the rest "
        f"sheddable), each giving up after {BUDGET:g} s, same route and upstream; {seconds:g} s, median of {rounds}",
        ["proxy", "critical sent/s", "critical success %", "critical p99 ms", "sheddable useful/s",
         "sheddable refused/s", "given up/s", "useful % of capacity", "upstream work wasted %",
         "budget at upstream ms", "proxy CPU %", "load CPU %"])
    counters = Table(
        "Deadlines: gatewayd's route counters over the measured window (per second; queue and "
        "in flight: mean of the 0.25 s samples)",
        ["run", "requests/s", "503/s", "504/s", *(f"{r}/s" for r in REASONS), "cancelled queued/s",
         "cancelled in flight/s", "queued", "in flight"])
    rows: dict[str, list[list[object]]] = {}
    count_rows: dict[str, list[list[object]]] = {}
    estimators: dict[str, Any] = {}
    for rnd in range(rounds):
        for kind, variants in (("useful", USEFUL_VARIANTS), ("priorities", PRIORITY_VARIANTS)):
            for variant in variants:
                if variant not in chosen:
                    continue
                ctx.say(f"deadlines: round {rnd + 1}/{rounds}, {kind}, {variant}")
                with _setup(ctx, variant) as (server, upstream):
                    probe = _Snapshots(server) if server.kind == "gatewayd" else None
                    measure = _useful if kind == "useful" else _priorities
                    row, window = measure(variant, server, upstream, seconds, ctx.env.load_cpu)
                    rows.setdefault(f"{kind}/{variant}", []).append(row)
                    if probe is not None:
                        probe.stop()
                        count_rows.setdefault(f"{kind}/{variant}", []).append(
                            [f"{kind}: {variant}", *probe.counters(*window)])
                        estimators[f"{kind}: {variant}"] = probe.extra()
    for key, rs in rows.items():
        (useful if key.startswith("useful/") else prio).add(*median_rows(rs))
    for rs in count_rows.values():
        counters.add(*median_rows(rs))
    useful.notes += [
        f"useful: a 200 that reached its client within its {BUDGET:g} s; refused: any other answer "
        "(gatewayd's 503s, HAProxy's 503 on a queue timeout); given up: no answer within the budget "
        "(the client closed its connection), or a 200 its client's process read only after it "
        "(a busy load CPU: \"of which 2xx read late\"); counted by when they happened, over the "
        f"steady part (the first {WARM:g} s left out). "
        + (f"DIAGNOSTIC RUN: a refused client waits {PAUSE:g} s before it asks again "
           "($BENCH_DEADLINES_PAUSE). " if PAUSE else "Every client asks again at once. ")
        + (f"DIAGNOSTIC RUN: the clients send X-Request-Timeout: {HEADER_BUDGET:g} "
           f"($BENCH_DEADLINES_SENT) and give up after {BUDGET:g} s." if HEADER_BUDGET != BUDGET else ""),
        "upstream work wasted: the share of the requests the upstream finished that it finished after "
        "their client had given up (the client's give-up instant travels in a header); upstream "
        "served/s: its own count (the capacity is 200). budget at upstream: the mean "
        "X-Request-Timeout the upstream received (a proxy that passes the remaining budget on "
        "lowers it; the others forward the client's 1.0 s).",
        "gatewayd fifo: max_concurrency 20, max_queue 200, queue_timeout 1. gatewayd deadlines: the "
        "same with timeout = 2.0, deadline_header = \"X-Request-Timeout\". HAProxy: maxconn 20, "
        "timeout queue 1s (its queue has no length limit); abortonclose: option abortonclose.",
        "load CPU %: the load CPU's busy share over the run (clients, upstream, and anything else on "
        "it): near 100 and the upstream's 100 ms timers run late, which lowers the capacity itself. "
        "client lag: how late a 10 ms timer in the client processes fired (p99): an answer is read "
        "that much after it arrived, and one that arrives just in time is read too late.",
        "Goal (issue 24), gatewayd deadlines: useful goodput >= 90 % of capacity, upstream work "
        "wasted < 2 %.",
    ]
    prio.notes += [
        f"Every {CRITICAL_EVERY}th request carries X-Priority: critical, the others X-Priority: "
        f"sheddable; all carry X-Request-Timeout: {BUDGET:g} and are given up after it (the "
        f"connection aborted). {PREWARM:,} connections are opened first. critical success: a 200 "
        "within the budget, of the critical requests scheduled in the steady part; the rates "
        "(useful, refused, given up) count what ended in it.",
        "gatewayd priorities: the deadlines route with priority = \"sheddable\", priority_header = "
        "\"X-Priority\". haproxy priority-class: http-request set-priority-class int(-1) for "
        "X-Priority: critical (lower is served first), maxconn 20, timeout queue 1s.",
        "Goal (issue 24): critical success >= 99 % with gatewayd priorities.",
    ]
    if skipped:
        note = ("not run: gatewayd deadlines and gatewayd priorities (this gatewayd has no "
                f"{', '.join(NEW_KEYS)} route keys yet)")
        useful.notes.append(note)
        prio.notes.append(note)
    counters.notes.append("Per-second rates of the snapshot's route counters between the samples "
                          "closest to the window's ends (n/a: not in this gatewayd's snapshot; 503/s and "
                          "504/s from its counts by status); cancelled: the client left while its request was "
                          "queued, or at the upstream (the gateway aborts it, the upstream's worker finishes "
                          "it anyway).")
    if estimators:
        counters.notes.append("Route fields beyond the usual at the end of each run's last round: "
                              + "; ".join(f"{k}: {json.dumps(v, sort_keys=True)}" for k, v in estimators.items()))
    return [useful, prio] + ([counters] if count_rows else [])


def _core_has_keys() -> bool:
    """Whether this gatewayd knows the route keys of issue 24 (its settings declare them)."""
    from gatewayd.config import settings

    text = Path(settings.__file__).read_text()
    return all(re.search(rf"^\s+{key}\s*:", text, re.M) for key in NEW_KEYS)


# ----------------------------------------------------------------------------- the two loads
def _useful(variant: str, server: Server, upstream: Server, seconds: float, load_cpu: int | None
            ) -> tuple[list[object], tuple[float, float]]:
    before, cpu0 = server.proc.usage(), _cpu_times(load_cpu)
    start = time.monotonic() + 0.5  # the client processes are forked and ready by then
    window = (start + WARM, start + seconds)
    result = closed_loop(server.port, CLIENTS, BUDGET, start, window, start + seconds, PAUSE, HEADER_BUDGET)
    used, load = server.proc.usage() - before, _load_share(load_cpu, cpu0)
    span = window[1] - window[0]
    out = result.outcomes
    ok = out[200]
    refused = sum(n for status, n in out.items() if status > 0 and status != 200)
    gave_up = out[GAVE_UP] + out[LATE_OK]
    served = served_rate(upstream, *window)
    counts = late_counts(upstream, *window)
    return [variant, ok / span, 100 * ok / span / CAPACITY, percentile(result.ok_ms, 50),
            percentile(result.ok_ms, 99), refused / span, percentile(result.refused_ms, 99),
            gave_up / span, out[LATE_OK] / span, out[ERROR] / span, served, counts.late_share, counts.budget_ms,
            100 * used.cpu / (seconds + 0.5), load, percentile(result.lag_ms, 99)], window


def _priorities(variant: str, server: Server, upstream: Server, seconds: float, load_cpu: int | None
                ) -> tuple[list[object], tuple[float, float]]:
    gen = PriorityLoop(server.port, OFFERED, seconds, BUDGET, CRITICAL_EVERY, MAX_CONNS, PREWARM)

    async def go() -> tuple[float, float, Usage, tuple[float, float]]:
        await gen.prewarm_connections()
        await asyncio.get_running_loop().run_in_executor(None, server.proc.wait_quiet)
        t0, before, cpu0 = time.monotonic(), server.proc.usage(), _cpu_times(load_cpu)
        await gen.run()
        return t0, time.monotonic(), before, cpu0

    t0, t1, before, cpu0 = run_async(go())
    used, load = server.proc.usage() - before, _load_share(load_cpu, cpu0)
    span = seconds - WARM
    window = (t0 + WARM, t0 + seconds)  # (the loop's t0 is within a few ms of this t0)
    steady = gen.result.window(WARM, seconds)  # by scheduled start: the success rate's base
    crit = [(s, lat) for off, s, lat in steady if gen.critical(off)]
    crit_ok = [lat * 1000 for s, lat in crit if s == 200]
    # rates by completion: what ended inside the window (a request started late in it may end after)
    ended = [(off, s) for off, s, lat in gen.result.samples if WARM <= off + lat < seconds]
    useful = sum(1 for _, s in ended if s == 200)
    shed_ok = sum(1 for off, s in ended if s == 200 and not gen.critical(off))
    shed_refused = sum(1 for off, s in ended if s > 0 and s != 200 and not gen.critical(off))
    gave_up = sum(1 for _, s in ended if s in (TIMEOUT, LATE, OVERFLOW))
    counts = late_counts(upstream, *window)
    return [variant, len(crit) / span, 100 * len(crit_ok) / len(crit) if crit else None,
            percentile(crit_ok, 99), shed_ok / span, shed_refused / span, gave_up / span,
            100 * useful / span / CAPACITY, counts.late_share, counts.budget_ms,
            100 * used.cpu / (t1 - t0), load], window


# ----------------------------------------------------------------------------- the proxies
@contextmanager
def _setup(ctx: Context, variant: str) -> Iterator[tuple[Server, Server]]:
    """A fresh upstream (reporting its counts every 0.25 s) and proxy, both stopped on exit."""
    env = ctx.env
    up = python_upstream(env, DELAY, SLOTS, report=0.25)
    try:
        if variant.startswith("gatewayd"):
            server = gatewayd(env, up.port, LIMITS, route_keys=GATEWAYD_KEYS[variant])
        else:
            server = haproxy(env, up.port, LIMITS, backend=HAPROXY_LINES[variant])
        try:
            yield server, up
        finally:
            env.procs.stop(server.proc)
    finally:
        env.procs.stop(up.proc)


class _Snapshots:
    """gatewayd's route, read from its control socket every 0.25 s in a thread of its own
    (each line also written to the server's snapshots.jsonl)."""

    def __init__(self, server: Server) -> None:
        self.sock = server.workdir / "gatewayd.sock"
        self.log = server.workdir / "snapshots.jsonl"
        self.samples: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        with self.log.open("a") as f:
            while not self._stop.wait(0.25):
                try:
                    answer = control(self.sock, {"cmd": "snapshot"}, timeout=2.0)
                except (OSError, ValueError):
                    continue
                snap = answer.get("snapshot")
                if not isinstance(snap, dict) or not snap.get("routes"):
                    continue
                route = snap["routes"][0]
                self.samples.append((time.monotonic(), route))
                f.write(json.dumps({"t": time.monotonic(), "route": route}) + "\n")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def counters(self, start: float, end: float) -> list[object]:
        inside = [(t, r) for t, r in self.samples if start <= t <= end]
        if len(inside) < 2:
            return [None] * (len(REASONS) + 7)
        (ta, a), (tb, b) = inside[0], inside[-1]
        span = tb - ta

        def rate(get: Any) -> float | None:
            """The counter's rate; None when this gatewayd's snapshot does not have it."""
            x, y = get(a), get(b)
            return None if x is None or y is None else (float(y) - float(x)) / span

        return [rate(lambda r: r.get("requests")),
                rate(lambda r: r.get("codes", {}).get("503", 0)),
                rate(lambda r: r.get("codes", {}).get("504", 0)),
                *(rate(lambda r, k=k: r.get("rejected", {}).get(k)) for k in REASONS),
                rate(lambda r: r.get("cancelled_queued", 0)),
                rate(lambda r: r.get("cancelled_in_flight", 0)),
                sum(r.get("queued", 0) for _, r in inside) / len(inside),
                sum(r.get("in_flight", 0) for _, r in inside) / len(inside)]

    def extra(self) -> dict[str, Any]:
        """The last sample's route fields that the snapshot had before issue 24 did not."""
        if not self.samples:
            return {}
        route = self.samples[-1][1]
        return {k: v for k, v in route.items() if k not in ROUTE_FIELDS}


# ----------------------------------------------------------------------------- the load CPU
def _cpu_times(cpu: int | None) -> tuple[float, float]:
    """(busy, total) jiffies of CPU ``cpu`` (None: the whole machine) from /proc/stat."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    with open("/proc/stat") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] == name:
                values = [float(v) for v in parts[1:]]
                idle = values[3] + (values[4] if len(values) > 4 else 0.0)
                return sum(values) - idle, sum(values)
    return 0.0, 0.0


def _load_share(cpu: int | None, before: tuple[float, float]) -> float:
    busy, total = _cpu_times(cpu)
    return 100 * (busy - before[0]) / (total - before[1]) if total > before[1] else float("nan")
