"""Idle keep-alive connections: resident memory each one costs a proxy.

After a short warm-up (so allocator pools and upstream connections exist), the
harness reads the proxy's RSS (all its processes), opens N connections, sends
one request on each, reads the answer and leaves the connection open; SETTLE
seconds after the last answer (past gatewayd's PARSER_IDLE, so its sweep has
dropped the HTTP parser of every connection, as on any connection idle for a
while) it checks they are all still open and reads the RSS again.
RSS per connection = delta / connections still open. Kernel socket buffers
are not in any process's RSS and are not counted.
"""

from __future__ import annotations

import asyncio
import ssl

from gatewayd.http.server import PARSER_IDLE, SWEEP_INTERVAL

from ..aio import run as run_async
from ..client import Conn
from ..context import Context
from ..report import Table, ratio
from ..servers import Server, start_proxy

PARALLEL = 200
# gatewayd drops an idle connection's parser once it has been idle PARSER_IDLE, at its next
# sweep (one every SWEEP_INTERVAL): wait past both, and a second more
SETTLE = PARSER_IDLE + SWEEP_INTERVAL + 1.0


def run(ctx: Context) -> list[Table]:
    n = ctx.options.idle_connections
    upstream = ctx.upstream()
    table = Table(
        f"Idle keep-alive connections: RSS for {n:,} connections held after one request each",
        ["proxy", "connections held", "RSS before MiB", "RSS after MiB", "KiB per connection",
         "vs nginx"],
    )
    per: dict[str, float] = {}
    rows: list[tuple[str, int, float, float, float]] = []
    for kind in ctx.options.proxies:
        ctx.say(f"idle: {kind}")
        server = start_proxy(ctx.env, kind, upstream.port)
        try:
            ctx.wrk(server, 50, 1.0)
            before = server.proc.usage().rss
            held, after = run_async(_hold(server, n))
        finally:
            ctx.env.procs.stop(server.proc)
        per[kind] = (after - before) / 1024 / held if held else float("nan")
        rows.append((kind, held, before / 2**20, after / 2**20, per[kind]))
    for kind, held, mib_before, mib_after, kib in rows:
        table.add(kind, held, mib_before, mib_after, kib, ratio(kib, per.get("nginx")))
    table.notes.append("Goal: <= 4 KiB per idle keep-alive connection (gatewayd).")
    return [table]


async def _hold(server: Server, n: int, tls: ssl.SSLContext | None = None) -> tuple[int, int]:
    """Open ``n`` connections (over ``tls`` if given) with one answered request each; return
    how many are still open SETTLE seconds later and the proxy's RSS then; close them."""
    conns: list[Conn] = []
    answered: list[Conn] = []
    gate = asyncio.Semaphore(PARALLEL)

    async def one() -> None:
        async with gate:
            conn = await Conn.open(server.port, tls=tls)
            conns.append(conn)
            await asyncio.wait_for(conn.request(b"/"), 10.0)
            answered.append(conn)

    await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    try:
        await asyncio.sleep(SETTLE)
        held = sum(1 for c in answered if not c.closed)
        return held, server.proc.usage().rss
    finally:
        for c in conns:
            c.abort()
