"""What the upstream client costs per request: aiohttp's ClientSession, configured
as gatewayd configures it, against gatewayd.http.client.H1Pool.

    python -m bench.client_cost [--requests 20000] [--concurrency 32] [--repeats 3]

The upstream is nginx (bench.servers.nginx_upstream: 127.0.0.1 only, a fixed
100-byte body, its files in a temporary folder) when nginx is installed, else a
small aiohttp server; either way it runs in its own process, so the figures are
the client's CPU time alone (time.process_time of this process: user + system,
the loop's syscalls included). Each figure is the median of ``--repeats`` runs,
sequential (one request at a time) and concurrent (``--concurrency`` tasks), on
uvloop when installed (gatewayd's loop). Every request sends the headers a
proxied browser request carries and reads the whole body, as the gateway does.
Target: H1Pool at most 1/3 of ClientSession's CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gatewayd.http.client import H1Pool

from .deps import tool
from .procs import Processes, free_port
from .servers import Env, Server, nginx_upstream

# what gatewayd forwards for a typical browser GET (headers.request_fields' output)
HEADERS = [
    ("Host", "example.test"),
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    ("Accept-Language", "en-US,en;q=0.5"),
    ("Accept-Encoding", "gzip, deflate, br"),
    ("X-Forwarded-For", "192.0.2.10"),
    ("X-Forwarded-Proto", "http"),
    ("X-Forwarded-Host", "example.test"),
]
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")  # as gatewayd.upstreams.http

AIOHTTP_UPSTREAM = textwrap.dedent("""\
    import asyncio
    import sys
    from aiohttp import web
    BODY = b"x" * 99 + b"\\n"
    async def handle(request):
        return web.Response(body=BODY, content_type="text/plain")
    async def main():
        runner = web.ServerRunner(web.Server(handle))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", int(sys.argv[1]), backlog=4096).start()
        await asyncio.Event().wait()
    asyncio.run(main())
""")


def start_upstream(tmp: Path, procs: Processes) -> Server:
    """nginx when installed, else an aiohttp server: a separate process either way."""
    env = Env(tmp=tmp, procs=procs, proxy_cpu=None, load_cpu=None)
    try:
        tool("nginx")
    except FileNotFoundError:
        port = free_port()
        script = tmp / "upstream.py"
        script.write_text(AIOHTTP_UPSTREAM)
        proc = procs.start("upstream-aiohttp", [sys.executable, str(script), str(port)])
        proc.wait_port(port)
        return Server("aiohttp", proc, port, None, tmp)
    return nginx_upstream(env)


# ----------------------------------------------------------------------------- the clients
class SessionClient:
    """aiohttp's ClientSession exactly as gatewayd.upstreams.http.HttpUpstream uses it."""

    name = "ClientSession"

    def __init__(self, port: int, limit: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=2.0, sock_read=30.0)
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, keepalive_timeout=4.0, ttl_dns_cache=10)
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO, trust_env=False, timeout=self.timeout,
        )

    async def one(self, target: str) -> int:
        headers = CIMultiDict(HEADERS)  # aiohttp's parser builds one per request
        up = await self.session._request("GET", URL(self.base + target, encoded=True), headers=headers,
                                         data=None, allow_redirects=False, timeout=self.timeout)
        n = 0
        try:
            content = up.content
            while chunk := await content.readany():
                n += len(chunk)
        finally:
            up.release()
        return n

    async def close(self) -> None:
        await self.session.close()


class PoolClient:
    """H1Pool, reading the body the cheap way the gateway would (read_small, else stream)."""

    name = "H1Pool"

    def __init__(self, port: int, limit: int) -> None:
        self.pool = H1Pool("127.0.0.1", port, max_connections=limit, keepalive_timeout=4.0,
                           connect_timeout=2.0, read_timeout=30.0)

    async def one(self, target: str) -> int:
        headers = list(HEADERS)  # the caller builds a list per request
        resp = await self.pool.request("GET", target, headers)
        try:
            data = resp.read_small(65536)
            if data is not None:
                return len(data)
            n = 0
            async for chunk in resp:
                n += len(chunk)
            return n
        finally:
            resp.release()

    async def close(self) -> None:
        await self.pool.close()


class FloorClient:
    """Not a client: a raw asyncio Protocol writing a fixed request and waiting for the
    100-byte body. What the loop and the syscalls cost alone, for scale."""

    name = "floor (raw protocol)"

    def __init__(self, port: int, limit: int) -> None:
        self.port = port
        self.idle: list[_FloorConn] = []
        self.request = ("GET / HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in HEADERS) + "\r\n").encode()

    async def one(self, target: str) -> int:
        if self.idle:
            conn = self.idle.pop()
        else:
            conn = _FloorConn()
            await asyncio.get_running_loop().create_connection(lambda: conn, "127.0.0.1", self.port)
        conn.waiter = asyncio.get_running_loop().create_future()
        conn.transport.write(self.request)
        n = await conn.waiter
        self.idle.append(conn)
        return n

    async def close(self) -> None:
        for conn in self.idle:
            conn.transport.close()
        await asyncio.sleep(0)


class _FloorConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport
        self.waiter: asyncio.Future[int] | None = None
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end >= 0 and len(self.buf) >= end + 4 + 100 and self.waiter is not None:
            self.buf = b""
            self.waiter.set_result(100)


# ----------------------------------------------------------------------------- measuring
async def cpu_per_request(one: Callable[[str], Awaitable[int]], requests: int, concurrency: int) -> float:
    """CPU microseconds per request for ``requests`` requests, ``concurrency`` at a time."""
    per_task = max(1, requests // concurrency)

    async def worker() -> None:
        for _ in range(per_task):
            if await one("/") != 100:
                raise RuntimeError("unexpected body size")

    t0 = time.process_time()
    if concurrency == 1:
        await worker()
    else:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - t0) / (per_task * concurrency) * 1e6


async def measure(kind: type[SessionClient] | type[PoolClient] | type[FloorClient], port: int, requests: int,
                  concurrency: int) -> tuple[float, float]:
    client = kind(port, concurrency)
    try:
        await cpu_per_request(client.one, 2000, concurrency)  # warm up: connections, caches
        seq = await cpu_per_request(client.one, requests // 2, 1)
        conc = await cpu_per_request(client.one, requests, concurrency)
    finally:
        await client.close()
    return seq, conc


def run(args: argparse.Namespace, port: int) -> dict[str, list[tuple[float, float]]]:
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    results: dict[str, list[tuple[float, float]]] = {SessionClient.name: [], PoolClient.name: [],
                                                     FloorClient.name: []}
    for i in range(args.repeats):
        # alternate the order: a noisy neighbour then penalises both alike
        kinds = (SessionClient, PoolClient) if i % 2 == 0 else (PoolClient, SessionClient)
        for kind in (*kinds, FloorClient):
            with asyncio.Runner(loop_factory=factory) as runner:
                figures = runner.run(measure(kind, port, args.requests, args.concurrency))
            results[kind.name].append(figures)
            print(f"  run {i + 1} {kind.name:20s} sequential {figures[0]:6.1f} us  "
                  f"concurrent {figures[1]:6.1f} us", file=sys.stderr)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000, help="requests per concurrent run (half sequential)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="client-cost-") as tmp:
        procs = Processes(Path(tmp))
        try:
            upstream = start_upstream(Path(tmp), procs)
            loop_name = "uvloop" if _has_uvloop() else "asyncio"
            print(f"upstream: {upstream.kind} on 127.0.0.1:{upstream.port}; loop: {loop_name}; "
                  f"{args.requests} requests x {args.repeats} runs", file=sys.stderr)
            results = run(args, upstream.port)
        finally:
            procs.close()
    print(f"{'CPU us/request (median)':26s} {'sequential':>11s} {'concurrent':>11s}")
    rows = []
    for name in (SessionClient.name, PoolClient.name, FloorClient.name):
        figures = results[name]
        seq = statistics.median(f[0] for f in figures)
        conc = statistics.median(f[1] for f in figures)
        rows.append((seq, conc))
        print(f"{name:26s} {seq:11.1f} {conc:11.1f}")
    ratio_seq = rows[1][0] / rows[0][0]
    ratio_conc = rows[1][1] / rows[0][1]
    print(f"{'H1Pool / ClientSession':26s} {ratio_seq:11.2f} {ratio_conc:11.2f}   (target <= 0.33)")


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
