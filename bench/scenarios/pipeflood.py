"""A pipelined flood: many clients each send a burst of pipelined GETs and never
read a response (issue 17, item 2), while a legitimate client asks once every
0.25 s on a new connection.

What it shows, per proxy: its RSS before and at its peak during the flood (all its
processes; kernel socket buffers are in no process's RSS), and the legitimate
requests answered, their errors and p99. A proxy that parses a whole read of
pipelined requests at once, or keeps answering a client that takes nothing,
grows by megabytes per connection; one that bounds what it parses ahead and stops
reading such a client stays flat.
"""

from __future__ import annotations

import asyncio
import socket
import time

from ..aio import run as run_async
from ..context import Context
from ..report import Table, percentile, ratio
from ..servers import Server, start_proxy

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
BURST = 256 * 1024  # bytes of pipelined GETs each flooding connection sends (~9,700 requests)
PROBE_EVERY = 0.25  # seconds between legitimate requests
PROBE_TIMEOUT = 5.0


def run(ctx: Context) -> list[Table]:
    n = 100 if ctx.options.quick else 1000
    seconds = 5.0 if ctx.options.quick else 15.0
    upstream = ctx.upstream()
    table = Table(
        f"Pipelined flood: {n:,} connections x {BURST // 1024} KiB of pipelined GETs, "
        f"never reading; a legitimate GET every {PROBE_EVERY} s for {seconds:.0f} s",
        ["proxy", "RSS before MiB", "RSS peak MiB", "RSS growth MiB", "vs nginx",
         "legit answered", "legit errors", "legit p99 ms"],
    )
    growth: dict[str, float] = {}
    rows = []
    for kind in ctx.options.proxies:
        ctx.say(f"pipeflood: {kind}")
        server = start_proxy(ctx.env, kind, upstream.port)
        try:
            ctx.wrk(server, 50, 1.0)
            before = server.proc.usage().rss
            peak, answered, errors, latencies = run_async(_flood(server, n, seconds))
        finally:
            ctx.env.procs.stop(server.proc)
        growth[kind] = (peak - before) / 2**20
        p99 = percentile(latencies, 99) * 1000 if latencies else float("nan")
        rows.append((kind, before / 2**20, peak / 2**20, growth[kind], answered, errors, p99))
    for kind, mib_before, mib_peak, grown, answered, errors, p99 in rows:
        table.add(kind, mib_before, mib_peak, grown, ratio(grown, growth.get("nginx")),
                  f"{answered}/{answered + errors}", errors, p99)
    table.notes.append("Goal (gatewayd): RSS growth < 100 MiB; legitimate requests all answered, p99 < 1 s.")
    return [table]


async def _flood(server: Server, n: int, seconds: float) -> tuple[int, int, int, list[float]]:
    """Open ``n`` flooding connections and probe; return the peak RSS, the probes
    answered, the probes failed and the answered probes' latencies."""
    loop = asyncio.get_running_loop()
    burst = REQUEST * (BURST // len(REQUEST))
    socks: list[socket.socket] = []
    senders: list[asyncio.Task[None]] = []
    peak = server.proc.usage().rss
    latencies: list[float] = []
    errors = 0

    async def flooder() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # takes (almost) nothing
        sock.setblocking(False)
        socks.append(sock)
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        await loop.sock_sendall(sock, burst)

    async def probe() -> float:
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(head[:40])
            await reader.read()
            return time.monotonic() - t0
        finally:
            writer.close()

    try:
        for _ in range(n):
            senders.append(loop.create_task(flooder()))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            probing = loop.create_task(asyncio.wait_for(probe(), PROBE_TIMEOUT))
            await asyncio.sleep(PROBE_EVERY)
            peak = max(peak, server.proc.usage().rss)
            try:  # (done by now unless slow: then waited for, so probes never overlap)
                latencies.append(await probing)
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                errors += 1
        peak = max(peak, server.proc.usage().rss)
        return peak, len(latencies), errors, latencies
    finally:
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        for sock in socks:
            sock.close()
