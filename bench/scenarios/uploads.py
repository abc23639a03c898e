"""Slow uploads: clients that trickle large bodies must not take a route down.

110 clients each upload 1 MB (Content-Length) at 600 B/s, to an upstream that
reads a request's whole body before it answers (bench/upstream.py, 5 ms per
request), through a route of max_concurrency=100, max_queue=100,
queue_timeout=1 s. Once the uploads are under way, 150 ordinary GETs (one new
connection each, 5 s client timeout) are spread over the measured time; their
errors and latency are the figure, with the proxy's RSS before the attack and
at its end. nginx runs with its defaults (``proxy_request_buffering on``: the
body is read, to memory and then to a temporary file, before the upstream is
contacted). A variant sends 2 MB, chunked, at the same rate.

Without request buffering, gatewayd gave each upload a slot (or a queue place)
as its head arrived and kept it while the body trickled, so every GET was
answered 503 queue_timeout.

    bench/run --scenarios uploads --proxies gatewayd,nginx
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from ..aio import run as run_async
from ..context import Context
from ..procs import tree
from ..report import Table, percentile
from ..servers import Limits, Server, python_upstream, start_proxy

UPLOADERS = 110
# (body size, chunked): the attack, and a variant larger than a 1 MiB buffer, chunked
VARIANTS = ((1_000_000, False), (2_000_000, True))
RATE = 600  # bytes per second per uploader
TICK = 0.1  # seconds between an uploader's writes
LEGIT = 150
CLIENT_TIMEOUT = 5.0
SETTLE = 3.0  # seconds of attack before the legitimate requests begin
LIMITS = Limits(max_concurrency=100, max_queue=100, queue_timeout=1.0)
DELAY = 0.005
PROXIES = ("gatewayd", "nginx")


def run(ctx: Context) -> list[Table]:
    seconds = 10.0 if ctx.options.quick else 30.0
    proxies = [p for p in PROXIES if p in ctx.options.proxies]
    table = Table(
        f"Slow uploads: {UPLOADERS} clients at {RATE} B/s each, route of "
        f"{LIMITS.max_concurrency} slots; {LEGIT} GETs over {seconds:g} s",
        ["proxy", "uploads", "GETs", "2xx", "errors", "error kinds", "p50 ms", "p99 ms", "max ms",
         "uploads answered", "RSS before MiB", "RSS at end MiB"],
    )
    for size, chunked in VARIANTS:
        for kind in proxies:
            label = f"{size / 1e6:g} MB, {'chunked' if chunked else 'Content-Length'}"
            ctx.say(f"uploads: {kind}, {UPLOADERS} slow uploads ({label}) and {LEGIT} GETs "
                    f"over {seconds:g} s")
            up = python_upstream(ctx.env, DELAY, 0)
            try:
                proxy = start_proxy(ctx.env, kind, up.port, LIMITS)
                try:
                    before = _rss_mib(proxy)
                    outcome = run_async(_attack(proxy, seconds, size, chunked))
                finally:
                    ctx.env.procs.stop(proxy.proc)
            finally:
                ctx.env.procs.stop(up.proc)
            _row(table, kind, label, outcome, before)
    table.notes += [
        "GET: a new connection each, Connection: close; latency from connect to the end of the "
        f"response; an error is any other status, a reset, or no answer within {CLIENT_TIMEOUT:g} s.",
        "uploads answered: how the uploads that got a response (or were closed) before the end "
        "were answered; at 600 B/s none can finish in time.",
        "RSS: the proxy's whole process tree (nginx: master and worker), from /proc.",
        "Goal: 0 errors and p99 < 100 ms for the GETs.",
    ]
    return [table]


def _row(table: Table, kind: str, label: str, outcome: _Outcome, before: float) -> None:
    lat = sorted(ms for status, ms in outcome.gets if status == 200)
    kinds = Counter(status for status, _ in outcome.gets if status != 200)
    table.add(kind, label, len(outcome.gets), len(lat), LEGIT - len(lat),
              ", ".join(f"{k} x{n}" for k, n in kinds.most_common()) or "-",
              percentile(lat, 50) if lat else None, percentile(lat, 99) if lat else None,
              lat[-1] if lat else None,
              ", ".join(f"{k} x{n}" for k, n in outcome.uploads_answered.most_common()) or "-",
              before, outcome.rss_end)


class _Outcome:
    def __init__(self) -> None:
        self.gets: list[tuple[str | int, float]] = []
        self.uploads_answered: Counter[str] = Counter()
        self.rss_end = 0.0


async def _attack(proxy: Server, seconds: float, size: int, chunked: bool) -> _Outcome:
    out = _Outcome()
    stop = asyncio.Event()
    uploads = [asyncio.create_task(_upload(proxy.port, stop, out, size, chunked)) for _ in range(UPLOADERS)]
    try:
        await asyncio.sleep(SETTLE)
        gap = seconds / LEGIT
        t0 = time.monotonic()
        gets = []
        for i in range(LEGIT):
            await asyncio.sleep(max(0.0, t0 + i * gap - time.monotonic()))
            gets.append(asyncio.create_task(_get(proxy.port)))
        out.gets = list(await asyncio.gather(*gets))
        out.rss_end = _rss_mib(proxy)
    finally:
        stop.set()
        await asyncio.gather(*uploads, return_exceptions=True)
    return out


async def _upload(port: int, stop: asyncio.Event, out: _Outcome, size: int, chunked: bool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
    writer.write(b"POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
                 b"%s\r\n\r\n" % framing)
    data = b"u" * int(RATE * TICK)
    step = b"%x\r\n%s\r\n" % (len(data), data) if chunked else data
    answer = asyncio.create_task(reader.read(4096))
    sent = 0
    try:
        while not stop.is_set() and sent < size:
            writer.write(step)
            sent += len(data)
            await asyncio.wait([answer], timeout=TICK)
            if answer.done():
                data = answer.result() if answer.exception() is None else b""
                out.uploads_answered[_status(data) if data else "closed"] += 1
                return
    except ConnectionError:
        return
    finally:
        answer.cancel()
        writer.transport.abort()


async def _get(port: int) -> tuple[str | int, float]:
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"GET /ok HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                data = await reader.read()
            finally:
                writer.close()
    except TimeoutError:
        return "timeout", (time.monotonic() - t0) * 1000
    except OSError:
        return "reset", (time.monotonic() - t0) * 1000
    ms = (time.monotonic() - t0) * 1000
    status = _status(data)
    return (200 if status == "200" else status), ms


def _status(data: bytes) -> str:
    """A response's status, with its X-Gatewayd-Reason if any: "503 queue_timeout"."""
    try:
        status = data.split(b" ", 2)[1].decode()
    except IndexError:
        return "garbled"
    reason = next((line.split(b":", 1)[1].strip().decode() for line in data.split(b"\r\n")
                   if line.lower().startswith(b"x-gatewayd-reason:")), "")
    return f"{status} {reason}".strip()


def _rss_mib(proxy: Server) -> float:
    total = 0
    for pid in tree(proxy.proc.pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024
