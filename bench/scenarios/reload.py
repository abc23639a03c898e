"""Reload under load: p99 and errors of wrk -c50 with 10 configuration reloads
spread over the run, against the same run without reloads.

Between reloads the configuration really changes: gatewayd's route limit
toggles between 1000000 and 999999 (reload through the control socket, which
answers with the outcome); nginx, for reference, toggles its upstream
``keepalive`` and reloads on SIGHUP (new workers, old ones drain).
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import wrk
from ..context import Context
from ..report import Table, median
from ..servers import Limits, Server, gatewayd_config, reload, start_proxy

RELOADS = 10
PROXIES = ("gatewayd", "nginx")


def run(ctx: Context) -> list[Table]:
    proxies = [p for p in PROXIES if p in ctx.options.proxies]
    upstream = ctx.upstream()
    seconds = ctx.options.duration
    steady: dict[str, list[wrk.WrkResult]] = {p: [] for p in proxies}
    loaded: dict[str, list[wrk.WrkResult]] = {p: [] for p in proxies}
    outcomes: dict[str, list[tuple[bool, float]]] = {p: [] for p in proxies}
    for rnd in range(ctx.options.repeats):
        for kind in proxies:
            ctx.say(f"reload: round {rnd + 1}/{ctx.options.repeats}, {kind}")
            server = start_proxy(ctx.env, kind, upstream.port)
            try:
                ctx.warm(server)
                steady[kind].append(ctx.wrk(server, 50, seconds))
                with wrk.Background(server.port, 50, seconds, ctx.env.tmp, ctx.env.load_cpu) as load:
                    outcomes[kind] += _reloads(server, upstream.port, seconds)
                    loaded[kind].append(load.result())
            finally:
                ctx.env.procs.stop(server.proc)

    table = Table(
        f"Reload under load: wrk -c50, {RELOADS} reloads in {seconds:g} s vs none "
        f"(median of {ctx.options.repeats})",
        ["proxy", "reloads ok", "reload ms p50", "req/s steady", "req/s reloading", "p99 ms steady",
         "p99 ms reloading", "errors steady", "errors reloading"],
    )
    for kind in proxies:
        ok = [ms for good, ms in outcomes[kind] if good]
        st, ld = steady[kind], loaded[kind]
        table.add(kind, f"{len(ok)}/{len(outcomes[kind])}", median(ok) if kind == "gatewayd" else None,
                  median([r.rps for r in st]), median([r.rps for r in ld]),
                  median([r.p99_ms for r in st]), median([r.p99_ms for r in ld]),
                  int(median([r.errors for r in st])), int(median([r.errors for r in ld])))
    table.notes += [
        "errors: wrk's socket errors (connect, read, write, timeout) plus non-2xx responses.",
        "reload ms: time until gatewayd's control socket answered the reload (nginx's SIGHUP "
        "is not acknowledged).",
    ]
    return [table]


def _reloads(server: Server, upstream_port: int, seconds: float) -> list[tuple[bool, float]]:
    """RELOADS reloads, evenly spaced over the middle 80 % of the run, each after a real change."""
    out: list[tuple[bool, float]] = []
    t0 = time.monotonic()
    for i in range(RELOADS):
        at = t0 + seconds * (0.1 + 0.8 * i / max(1, RELOADS - 1))
        time.sleep(max(0.0, at - time.monotonic()))
        _change(server, upstream_port, i)
        t = time.perf_counter()
        answer = reload(server)
        out.append((bool(answer.get("ok")), (time.perf_counter() - t) * 1000))
    return out


def _change(server: Server, upstream_port: int, i: int) -> None:
    assert server.config is not None
    path: Path = server.config
    if server.kind == "gatewayd":
        limit = 999_999 if i % 2 == 0 else 1_000_000
        text = gatewayd_config(server.port, upstream_port, server.workdir / "gatewayd.sock",
                               Limits(max_concurrency=limit))
        path.write_text(text)
    else:
        text = path.read_text()
        a, b = ("keepalive 256;", "keepalive 255;") if i % 2 == 0 else ("keepalive 255;", "keepalive 256;")
        path.write_text(text.replace(a, b))

