"""Raw proxying: each proxy in front of the nginx upstream, wrk at 50 and 500
connections; req/s, latency, errors and the proxy's CPU time per request.

Runs are taken in rounds (every proxy once per round, each freshly started)
so that slow phases of a shared machine hit every proxy alike; each figure is
the median over the rounds.
"""

from __future__ import annotations

from ..context import Context, Measured
from ..report import Table, median, ratio
from ..servers import start_proxy

CONNECTIONS = (50, 500)


def run(ctx: Context) -> list[Table]:
    upstream = ctx.upstream()
    proxies = ctx.options.proxies
    runs: dict[tuple[str, int], list[Measured]] = {}
    for rnd in range(ctx.options.repeats):
        for kind in proxies:
            ctx.say(f"throughput: round {rnd + 1}/{ctx.options.repeats}, {kind}")
            server = start_proxy(ctx.env, kind, upstream.port)
            try:
                ctx.warm(server)
                for c in CONNECTIONS:
                    runs.setdefault((kind, c), []).append(ctx.measure(server, c))
            finally:
                ctx.env.procs.stop(server.proc)

    tables = []
    figures: dict[str, dict[int, dict[str, float]]] = {}
    for c in CONNECTIONS:
        table = Table(
            f"Throughput, {c} connections (proxy on 1 core; median of {ctx.options.repeats})",
            ["proxy", "req/s", "req/s vs nginx", "p50 ms", "p99 ms", "p99 vs nginx", "errors",
             "CPU µs/req", "CPU vs nginx", "proxy CPU %", "CPU wait %"],
        )
        med = {k: _medians(runs[(k, c)]) for k in proxies}
        base = med.get("nginx", {})
        for kind in proxies:
            m = med[kind]
            figures.setdefault(kind, {})[c] = m
            table.add(kind, m["rps"], ratio(m["rps"], base.get("rps")), m["p50"], m["p99"],
                      ratio(m["p99"], base.get("p99")), int(m["errors"]), m["cpu_us"],
                      ratio(m["cpu_us"], base.get("cpu_us")), m["cpu_pct"], m["wait_pct"])
        table.notes.append(
            "CPU µs/req: the proxy's user+system CPU time (from /proc, all its processes and threads) "
            "over the run, divided by the requests completed; steadier than req/s on a shared machine.")
        table.notes.append(
            "proxy CPU %: the share of its core the proxy used. CPU wait %: the share of the run it "
            "was ready to run but another process (not this run's) had its core. When the two add up "
            "to well under 100 the proxy was idle part of the time, waiting for wrk and the upstream "
            "on the other core: its req/s understates it, its CPU µs/req does not.")
        tables.append(table)
    ctx.figures["throughput"] = figures
    return tables


def _medians(runs: list[Measured]) -> dict[str, float]:
    return {
        "rps": median([r.result.rps for r in runs]),
        "p50": median([r.result.p50_ms for r in runs]),
        "p99": median([r.result.p99_ms for r in runs]),
        "errors": median([r.result.errors for r in runs]),
        "cpu_us": median([r.cpu_us_per_request for r in runs]),
        "cpu_pct": median([r.cpu_share for r in runs]),
        "wait_pct": median([r.wait_share for r in runs]),
    }
