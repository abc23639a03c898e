"""gatewayd.http.client: the lean HTTP/1.1 upstream client, against real servers on
127.0.0.1 — aiohttp upstreams for well-behaved HTTP, raw asyncio socket servers
for faults. The asyncio tests run on asyncio's loop; ``test_on_uvloop`` runs the
core ones again on uvloop (gatewayd's loop in production).
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from gatewayd.http.client import H1Pool, Response
from gatewayd.proxy.exchange import UpstreamFailure

from ..builders import free_port
from ..conftest import wait_for

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# ----------------------------------------------------------------------------- servers
class AioUpstream:
    """An aiohttp upstream (web.Server) that records what reached it.

    ``/`` ok, ``/echo`` the request back (method, framing headers, body),
    ``/chunked?n=N`` N chunks with pauses, ``/big?bytes=N`` N bytes in 64 KiB writes
    (``written`` counts them), ``/status/N``, ``/dup`` repeated headers,
    ``/hold/I`` waits for ``gates[I]``.
    """

    def __init__(self, **server_kwargs: Any) -> None:
        self.peers: list[int] = []  # client port of each request: one entry per connection reuse
        self.arrivals: list[int] = []
        self.gates: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.active = 0
        self.max_active = 0
        self.written = 0
        self.server_kwargs = server_kwargs
        self.port = 0
        self._runner: web.ServerRunner | None = None

    @property
    def connections(self) -> int:
        return len(set(self.peers))

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.peers.append(request.transport.get_extra_info("peername")[1])
        path = request.path
        if path == "/echo":
            body = await request.read()
            return web.Response(body=body, headers={
                "X-Method": request.method,
                "X-CL": request.headers.get("Content-Length", "-"),
                "X-TE": request.headers.get("Transfer-Encoding", "-"),
            })
        if path == "/chunked":
            resp = web.StreamResponse()
            await resp.prepare(request)
            for i in range(int(request.query.get("n", "5"))):
                await resp.write(b"chunk%d;" % i)
                await asyncio.sleep(0.005)
            await resp.write_eof()
            return resp
        if path == "/big":
            n = int(request.query["bytes"])
            resp = web.StreamResponse()
            resp.content_length = n
            await resp.prepare(request)
            chunk = b"b" * 65536
            while n > 0:
                await resp.write(chunk[:n])
                self.written += min(n, 65536)
                n -= 65536
            await resp.write_eof()
            return resp
        if path.startswith("/status/"):
            return web.Response(status=int(path.rsplit("/", 1)[1]))
        if path == "/dup":
            resp = web.Response(text="dup")
            resp.headers.add("Set-Cookie", "a=1")
            resp.headers.add("X-B", "2")
            resp.headers.add("Set-Cookie", "b=2")
            return resp
        if path.startswith("/hold/"):
            i = int(path.rsplit("/", 1)[1])
            self.arrivals.append(i)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                await self.gates[i].wait()
            finally:
                self.active -= 1
            return web.Response(text=f"held {i}")
        return web.Response(text="ok\n")

    async def __aenter__(self) -> AioUpstream:
        self.port = free_port()
        self._runner = web.ServerRunner(web.Server(self.handle, **self.server_kwargs), handle_signals=False,
                                        shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        for gate in self.gates.values():  # a failed test must not leave handlers waiting
            gate.set()
        await self._runner.cleanup()


class RawServer:
    """A plain asyncio socket server running ``handle`` per connection; everything
    it opened is closed on exit."""

    def __init__(self, handle: Handler) -> None:
        self.handle = handle
        self.connections = 0
        self.closed_at: list[float] = []  # loop time at which a handler saw EOF/reset (via eof())
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_at.append(asyncio.get_running_loop().time())  # the client closed or reset it
        except asyncio.CancelledError:
            pass  # torn down by __aexit__ (asyncio 3.11's stream callback logs cancelled handlers)
        finally:
            writer.close()

    async def eof(self, reader: asyncio.StreamReader) -> None:
        """Wait for the client to close this connection; record when."""
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.closed_at.append(asyncio.get_running_loop().time())

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for w in self._writers:
            w.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def pool_for(port: int, **kw: Any) -> H1Pool:
    kw.setdefault("connect_timeout", 1.0)
    kw.setdefault("read_timeout", 2.0)
    return H1Pool("127.0.0.1", port, **kw)


async def get(pool: H1Pool, target: str = "/", method: str = "GET") -> tuple[Response, bytes]:
    resp = await pool.request(method, target, [("Host", "up.test")])
    try:
        return resp, await resp.read()
    finally:
        resp.release()


async def failure(aw: Awaitable[Any]) -> UpstreamFailure:
    with pytest.raises(UpstreamFailure) as info:
        await aw
    return info.value


async def settled(value: Callable[[], int], interval: float = 0.05, timeout: float = 10.0) -> int:
    """Wait until ``value()`` stops changing for ``interval`` seconds (the loop keeps running); return it."""
    deadline = time.monotonic() + timeout
    last = value()
    while time.monotonic() < deadline:
        await asyncio.sleep(interval)
        now = value()
        if now == last:
            return now
        last = now
    raise AssertionError(f"still changing after {timeout}s")


async def gen(*chunks: bytes, delay: float = 0.0) -> AsyncIterator[bytes]:
    for c in chunks:
        if delay:
            await asyncio.sleep(delay)
        yield c


# ----------------------------------------------------------------------------- keep-alive and the pool
async def test_keepalive_reuse_one_connection() -> None:
    async with AioUpstream() as up:
        pool = pool_for(up.port)
        for _ in range(20):
            resp, body = await get(pool)
            assert (resp.status, resp.reason, body) == (200, "OK", b"ok\n")
            assert resp.keep_alive
        assert len(up.peers) == 20 and up.connections == 1
        snap = pool.snapshot()
        assert snap["connects"] == 1 and snap["reuses"] == 19 and snap["requests"] == 20
        assert snap["open"] == 1 and snap["idle"] == 1 and snap["failures"] == {}
        await pool.close()
        assert pool.snapshot()["open"] == 0


async def test_limit_and_fifo_waiters() -> None:
    async with AioUpstream() as up:
        pool = pool_for(up.port, max_connections=2)
        results: dict[int, bytes] = {}

        async def fetch(i: int) -> None:
            resp, body = await get(pool, f"/hold/{i}")
            results[i] = body

        tasks = [asyncio.create_task(fetch(0)), asyncio.create_task(fetch(1))]
        await wait_for(lambda: sorted(up.arrivals) == [0, 1])  # these two connect in parallel
        up.arrivals.clear()
        for i in (2, 3, 4):  # queued in this order
            tasks.append(asyncio.create_task(fetch(i)))
            await wait_for(lambda i=i: pool.snapshot()["waiting"] == i - 1)
        assert pool.snapshot()["open"] == 2 and up.active == 2
        # free the connections in an order unrelated to the waiters': they are served first come first served
        for release, expect in ((1, [2]), (0, [2, 3]), (2, [2, 3, 4])):
            up.gates[release].set()
            await wait_for(lambda expect=expect: up.arrivals == expect)
            assert up.active == 2
        for i in (3, 4):
            up.gates[i].set()
        await asyncio.gather(*tasks)
        assert results == {i: b"held %d" % i for i in range(5)}
        assert up.max_active == 2 and up.connections == 2
        snap = pool.snapshot()
        assert snap["connects"] == 2 and snap["reuses"] == 3 and snap["waiting"] == 0
        await pool.close()


async def test_waiter_gets_the_slot_of_a_closed_connection() -> None:
    async with AioUpstream() as up:
        pool = pool_for(up.port, max_connections=1)
        first = asyncio.create_task(pool.request("GET", "/hold/0", []))
        await wait_for(lambda: up.arrivals == [0])
        second = asyncio.create_task(get(pool, "/"))
        await wait_for(lambda: pool.snapshot()["waiting"] == 1)
        up.gates[0].set()
        resp = await first
        resp.close()  # abandoned with its body unread: closed, the slot passes to the waiter
        _, body = await second
        assert body == b"ok\n"
        assert pool.snapshot()["connects"] == 2 and pool.snapshot()["open"] == 1
        await pool.close()


async def test_cancelled_waiter_leaves_no_trace() -> None:
    async with AioUpstream() as up:
        pool = pool_for(up.port, max_connections=1)
        first = asyncio.create_task(get(pool, "/hold/0"))
        await wait_for(lambda: up.arrivals == [0])
        waiting = asyncio.create_task(get(pool, "/"))
        await wait_for(lambda: pool.snapshot()["waiting"] == 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        up.gates[0].set()
        await first
        _, body = await get(pool, "/")
        assert body == b"ok\n"
        snap = pool.snapshot()
        assert snap["open"] == 1 and snap["connects"] == 1 and snap["waiting"] == 0
        await pool.close()


async def test_server_closing_idle_connection_is_dropped() -> None:
    async with AioUpstream(keepalive_timeout=0.1) as up:  # the server closes idle connections at 0.1 s
        pool = pool_for(up.port, keepalive_timeout=30.0)
        await get(pool)
        await wait_for(lambda: pool.snapshot()["open"] == 0)  # its EOF, read while idle, removed it
        assert pool.snapshot()["idle"] == 0
        _, body = await get(pool)
        assert body == b"ok\n"
        snap = pool.snapshot()
        assert snap["connects"] == 2 and snap["retries"] == 0 and snap["failures"] == {}
        await pool.close()


async def test_own_keepalive_timeout_closes_idle() -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await srv.eof(r)

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port, keepalive_timeout=0.2)
        t0 = asyncio.get_running_loop().time()
        await get(pool)
        assert pool.snapshot()["idle"] == 1
        await wait_for(lambda: srv.closed_at, timeout=3)
        assert 0.15 <= srv.closed_at[0] - t0 < 2.0
        assert pool.snapshot()["open"] == 0
        await pool.close()


async def test_stale_pooled_connection_retried_once_for_idempotent() -> None:
    # the first connection answers one request, then closes on the next without a byte:
    # the keep-alive race a pooled client must absorb
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = srv.connections == 1
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await read_head(r)
        if first:
            return  # closes
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await srv.eof(r)

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port)
        await get(pool)
        _, body = await get(pool)
        assert body == b"ok"
        snap = pool.snapshot()
        assert snap["retries"] == 1 and snap["connects"] == 2 and snap["failures"] == {}
        await pool.close()

    async with RawServer(handle) as srv:  # POST is not replayed: the caller decides
        pool = pool_for(srv.port)
        await get(pool, method="POST")
        fail = await failure(get(pool, method="POST"))
        assert (fail.status, fail.reason) == (502, "upstream_reset")
        snap = pool.snapshot()
        assert snap["retries"] == 0 and snap["failures"] == {"upstream_reset": 1}
        await pool.close()


async def test_unannounced_close_never_costs_a_post() -> None:
    # the server closes right after each response, without "Connection: close": the FIN is
    # in the socket before the client reads the response, but the loop has not seen it when
    # the connection goes back to the pool. A POST (not replayable) must not be sent on it.
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await read_head(r)
        n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await r.readexactly(n)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port)
        for _ in range(50):
            resp = await pool.request("POST", "/", [], body=gen(b"data"), body_length=4)
            assert resp.read_small() == b"ok"
            resp.release()
        snap = pool.snapshot()
        assert snap["failures"] == {} and snap["retries"] == 0 and srv.connections == 50
        await pool.close()


# ----------------------------------------------------------------------------- response bodies
async def test_content_length_and_chunked_bodies() -> None:
    async with AioUpstream() as up:
        pool = pool_for(up.port)
        resp, body = await get(pool, "/chunked?n=20")
        assert body == b"".join(b"chunk%d;" % i for i in range(20))
        assert ("Transfer-Encoding", "chunked") in resp.headers
        resp, body = await get(pool, "/big?bytes=300000")
        assert body == b"b" * 300000
        assert up.connections == 1  # both were reused: read to the end
        # small and complete right after the head: read_small hands it over without waiting
        resp = await pool.request("GET", "/", [])
        assert resp.read_small(1024) == b"ok\n"
        assert resp.read_small(1024) == b""
        resp.release()
        resp = await pool.request("GET", "/big?bytes=300000", [])
        assert resp.read_small(1024) is None  # too big: stream it
        assert len(await resp.read()) == 300000
        resp.release()
        assert pool.snapshot()["connects"] == 1
        await pool.close()


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\n",
])
async def test_body_until_close(head: bytes) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(head + b"x" * 5000)
        await w.drain()
        await asyncio.sleep(0.02)
        w.write(b"y" * 5000)
        await w.drain()

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port)
        for _ in range(2):
            resp, body = await get(pool)
            assert body == b"x" * 5000 + b"y" * 5000
            assert not resp.keep_alive
        snap = pool.snapshot()
        assert snap["connects"] == 2 and srv.connections == 2
        await wait_for(lambda: pool.snapshot()["open"] == 0)
        await pool.close()


async def test_head_204_304_have_no_body_and_keep_the_connection() -> None:
    async with AioUpstream() as up:
        pool = pool_for(up.port)
        resp = await pool.request("HEAD", "/", [])
        assert resp.status == 200 and ("Content-Length", "3") in resp.headers
        assert resp.read_small() == b""
        resp.release()
        for status in (204, 304):
            resp, body = await get(pool, f"/status/{status}")
            assert resp.status == status and body == b""
        resp, body = await get(pool, "/")  # the parser was reset after HEAD
        assert body == b"ok\n"
        assert up.connections == 1 and pool.snapshot()["connects"] == 1
        # aiohttp's StreamResponse writes a body even to HEAD: those bytes must not be
        # taken for the next response, the connection is dropped
        resp = await pool.request("HEAD", "/big?bytes=5000", [])
        assert resp.status == 200 and resp.read_small() == b""
        resp.release()
        await wait_for(lambda: pool.snapshot()["open"] == 0)
        resp, body = await get(pool, "/")
        assert body == b"ok\n" and pool.snapshot()["connects"] == 2
        await pool.close()


async def test_connection_close_response_not_reused() -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await srv.eof(r)

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port)
        resp, body = await get(pool)
        assert body == b"ok" and not resp.keep_alive
        await wait_for(lambda: srv.closed_at)  # we closed it
        await get(pool)
        assert srv.connections == 2 and pool.snapshot()["idle"] == 0
        await pool.close()


async def test_chunked_trailers_and_unsolicited_bytes_while_idle() -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-Trailer: v\r\n\r\n")
        await read_head(r)  # the same connection, after the trailers
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n")  # while idle
        await srv.eof(r)

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port)
        assert (await get(pool))[1] == b"hi"
        assert (await get(pool))[1] == b"ok"
        assert srv.connections == 1
        await wait_for(lambda: pool.snapshot()["open"] == 0)  # the late 408 closed it
        await wait_for(lambda: srv.closed_at)
        await pool.close()


async def test_our_slowness_is_not_an_upstream_timeout() -> None:
    async def slow_source() -> AsyncIterator[bytes]:
        for _ in range(4):
            await asyncio.sleep(0.1)  # the client's body dribbles: not the upstream's fault
            yield b"s" * 10

    async with AioUpstream() as up:
        pool = pool_for(up.port, read_timeout=0.2, read_buffer=65536)
        resp = await pool.request("POST", "/echo", [], body=slow_source(), body_length=40)
        assert await resp.read() == b"s" * 40
        resp.release()
        resp = await pool.request("GET", f"/big?bytes={8 << 20}", [])
        await wait_for(lambda: resp.buffered > 65536)
        await asyncio.sleep(0.5)  # a consumer stuck behind a slow client, reading paused
        assert len(await resp.read()) == 8 << 20
        resp.release()
        assert pool.snapshot()["failures"] == {} and pool.snapshot()["connects"] == 1
        await pool.close()


async def test_headers_raw_order_and_duplicates() -> None:
    async with AioUpstream() as up:
        pool = pool_for(up.port)
        resp, _ = await get(pool, "/dup")
        names = [(n, v) for n, v in resp.headers if n in ("Set-Cookie", "X-B")]
        assert names == [("Set-Cookie", "a=1"), ("X-B", "2"), ("Set-Cookie", "b=2")]
        await pool.close()


async def test_interim_responses_skipped() -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.01)
        w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 201 Created\r\nX-Final: 1\r\n"
                b"Content-Length: 4\r\n\r\ndone")
        await srv.eof(r)

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port)
        resp, body = await get(pool)
        assert (resp.status, resp.reason, body) == (201, "Created", b"done")
        assert resp.headers == [("X-Final", "1"), ("Content-Length", "4")]
        await pool.close()


async def test_blank_lines_before_the_status_line() -> None:
    # llhttp skips CR/LF before a response; the head starts at the status line, so the
    # headers (and the length framing the body) are read as sent, none taken for another
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"\r\n\r\nHTTP/1.1 200 OK\r\nX-A: b\r\nContent-Length: 5\r\n\r\nhello")
        await srv.eof(r)

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port)
        resp, body = await get(pool)
        assert (resp.status, resp.reason, body) == (200, "OK", b"hello")
        assert resp.headers == [("X-A", "b"), ("Content-Length", "5")]
        await pool.close()


async def test_slow_consumer_pauses_upstream_bounded_buffer() -> None:
    total = 32 * 1024 * 1024
    limit = 65536
    async with AioUpstream() as up:
        pool = pool_for(up.port, read_buffer=limit, read_timeout=5.0)
        resp = await pool.request("GET", f"/big?bytes={total}", [])
        # nobody reads: the client stops reading the socket, the upstream's writes block
        await wait_for(lambda: resp.buffered > limit)
        stalled = await settled(lambda: up.written)
        await asyncio.sleep(0.2)
        assert up.written == stalled < total  # paused: kernel buffers full, the upstream waits
        assert resp.buffered <= limit + 262144  # at most the limit plus one socket read
        got = 0
        biggest = 0
        async for chunk in resp:
            got += len(chunk)
            biggest = max(biggest, len(chunk))
            if got < total // 2:
                await asyncio.sleep(0)  # a consumer slower than the socket, for a while
        resp.release()
        assert got == total and up.written == total
        assert biggest <= limit + 262144  # never more buffered than that
        assert pool.snapshot()["idle"] == 1
        await pool.close()


# ----------------------------------------------------------------------------- request bodies and heads
async def test_request_heads_and_bodies() -> None:
    heads: list[bytes] = []
    bodies: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(r)
            heads.append(head)
            lower = head.lower()
            if b"content-length:" in lower:
                n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                bodies.append(await r.readexactly(n))
            elif b"transfer-encoding: chunked" in lower:
                body = b""
                while True:
                    size = int((await r.readuntil(b"\r\n"))[:-2], 16)
                    data = await r.readexactly(size + 2)
                    if size == 0:
                        break
                    body += data[:-2]
                bodies.append(body)
            else:
                bodies.append(b"")
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port)
        # known length; the caller's framing headers are replaced by ours
        resp = await pool.request("PUT", "/a?b=%20c#frag", [("Host", "h.test"), ("Content-Length", "999"),
                                                       ("Transfer-Encoding", "gzip"), ("X-A", "é")],
                                  body=gen(b"hello ", b"", b"world"), body_length=11)
        assert await resp.read() == b""
        resp.release()
        # unknown length: chunked
        resp = await pool.request("POST", "/b", [], body=gen(b"x" * 70000, b"yz"))
        await resp.read()
        resp.release()
        # no body: POST says so, GET says nothing; Host added when missing
        for method in ("POST", "GET"):
            resp = await pool.request(method, "/c", [("X-Order", "1"), ("x-order", "2")])
            await resp.read()
            resp.release()
        assert srv.connections == 1
        await pool.close()

    assert heads[0] == ("PUT /a?b=%20c HTTP/1.1\r\nHost: h.test\r\nX-A: é\r\nContent-Length: 11\r\n\r\n"
                        .encode())
    assert bodies[0] == b"hello world"
    assert heads[1] == (f"POST /b HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n"
                        "Transfer-Encoding: chunked\r\n\r\n").encode()
    assert bodies[1] == b"x" * 70000 + b"yz"
    assert heads[2] == (f"POST /c HTTP/1.1\r\nX-Order: 1\r\nx-order: 2\r\nHost: 127.0.0.1:{srv.port}\r\n"
                        "Content-Length: 0\r\n\r\n").encode()
    assert heads[3] == f"GET /c HTTP/1.1\r\nX-Order: 1\r\nx-order: 2\r\nHost: 127.0.0.1:{srv.port}\r\n\r\n".encode()
    assert bodies[2:] == [b"", b""]


async def test_request_body_to_aiohttp_both_framings() -> None:
    async with AioUpstream() as up:
        pool = pool_for(up.port)
        data = os.urandom(200000)
        resp = await pool.request("POST", "/echo", [], body=gen(data[:100000], data[100000:]),
                                  body_length=len(data))
        assert await resp.read() == data
        assert dict(resp.headers)["X-CL"] == str(len(data))
        resp.release()
        resp = await pool.request("POST", "/echo", [], body=gen(data[:1000], data[1000:]))
        assert await resp.read() == data
        assert dict(resp.headers)["X-TE"] == "chunked"
        resp.release()
        assert up.connections == 1
        await pool.close()


async def test_request_body_write_flow_control() -> None:
    produced = 0
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        chunk = b"q" * 65536
        for _ in range(512):  # 32 MiB
            produced += len(chunk)
            yield chunk

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await read_head(r)
        n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await release.wait()  # read nothing until told
        got = 0
        while got < n:
            got += len(await r.read(1 << 20))
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(got)), got))
        await srv.eof(r)

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port, read_timeout=10.0)
        task = asyncio.create_task(pool.request("POST", "/", [], body=body(), body_length=512 * 65536))
        await wait_for(lambda: produced > 0)
        await settled(lambda: produced)
        # the upstream reads nothing: once the kernel buffers are full, the source is no longer
        # read and what waits in our transport stays under its high-water mark plus one chunk
        (conn,) = pool._conns
        for _ in range(10):
            assert conn._transport.get_write_buffer_size() <= 65536 + 65536
            await asyncio.sleep(0.01)
        assert produced < 512 * 65536
        release.set()
        resp = await task
        assert await resp.read() == str(512 * 65536).encode()
        resp.release()
        await pool.close()


async def test_request_body_error_propagates_and_closes() -> None:
    class ClientBodyBroke(Exception):
        pass

    async def bad() -> AsyncIterator[bytes]:
        yield b"part"
        await asyncio.sleep(0.01)
        raise ClientBodyBroke

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        await srv.eof(r)

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port)
        with pytest.raises(ClientBodyBroke):
            await pool.request("POST", "/", [], body=bad(), body_length=100)
        await wait_for(lambda: srv.closed_at)
        assert pool.snapshot()["open"] == 0
        with pytest.raises(ValueError, match="shorter"):
            await pool.request("POST", "/", [], body=gen(b"abc"), body_length=5)
        with pytest.raises(ValueError, match="longer"):
            await pool.request("POST", "/", [], body=gen(b"abcdef"), body_length=5)
        await wait_for(lambda: pool.snapshot()["open"] == 0)
        await pool.close()


async def test_early_response_while_body_is_sent() -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig")
        await w.drain()

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port)
        body = gen(*[b"z" * 1000] * 20, delay=0.02)
        resp = await pool.request("POST", "/", [], body=body, body_length=20000)
        assert resp.status == 413 and await resp.read() == b"big"
        resp.release()
        await wait_for(lambda: pool.snapshot()["open"] == 0)
        await pool.close()


async def test_header_injection_refused() -> None:
    pool = pool_for(free_port())
    for target, headers in (("/ HTTP/1.1\r\nX: y", []), ("/", [("X-A", "v\r\nEvil: 1")]),
                            ("/", [("X-A\n", "v")])):
        with pytest.raises(ValueError):
            await pool.request("GET", target, headers)
    assert pool.snapshot()["connects"] == 0
    await pool.close()


# ----------------------------------------------------------------------------- failures
async def test_connect_refused() -> None:
    pool = pool_for(free_port())
    fail = await failure(pool.request("GET", "/", []))
    assert (fail.status, fail.reason) == (502, "upstream_connect")
    assert pool.snapshot()["failures"] == {"upstream_connect": 1} and pool.snapshot()["open"] == 0
    await pool.close()


async def test_resolver_hook_and_dns_failure() -> None:
    asked: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        if host == "gone.test":
            raise OSError("no such name")
        return ["127.0.0.2", "127.0.0.1"]  # the first refuses (nothing listens there): the next is tried

    heads: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        heads.append(await read_head(r))
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await srv.eof(r)

    async with RawServer(handle) as srv:
        pool = H1Pool("up.test", srv.port, connect_timeout=1.0, resolve=resolve)
        resp = await pool.request("GET", "/", [])
        assert await resp.read() == b"ok"
        resp.release()
        assert asked == [("up.test", srv.port)]
        assert heads[0] == f"GET / HTTP/1.1\r\nHost: up.test:{srv.port}\r\n\r\n".encode()
        await pool.close()
        pool = H1Pool("gone.test", srv.port, connect_timeout=1.0, resolve=resolve)
        fail = await failure(pool.request("GET", "/", []))
        assert (fail.status, fail.reason) == (502, "upstream_dns")
        assert pool.snapshot()["open"] == 0
        await pool.close()


async def test_connect_timeout() -> None:
    # a listener whose backlog is full: the kernel drops further SYNs, connect() hangs
    listener = socket.socket()
    held: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        while True:
            s = socket.socket()
            s.settimeout(0.2)
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                s.close()
                break
            held.append(s)
            assert len(held) < 100
        pool = pool_for(port, connect_timeout=0.3)
        t0 = time.monotonic()
        fail = await failure(pool.request("GET", "/", []))
        assert (fail.status, fail.reason) == (504, "upstream_connect_timeout")
        assert 0.25 < time.monotonic() - t0 < 2.0
        await pool.close()
        pool = pool_for(port, connect_timeout=3.0)
        t0 = time.monotonic()  # a shorter one for this request only
        fail = await failure(pool.request("GET", "/", [], connect_timeout=0.1))
        assert (fail.status, fail.reason) == (504, "upstream_connect_timeout")
        assert 0.08 < time.monotonic() - t0 < 1.5
        assert pool.snapshot()["open"] == 0 and pool.snapshot()["connecting"] == 0
        await pool.close()
    finally:
        for s in held:
            s.close()
        listener.close()


@pytest.mark.parametrize("how", ["rst", "fin"])
async def test_reset_before_head(how: str) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        if how == "rst":
            reset(w)
        else:
            w.write(b"HTTP/1.1 2")  # a few bytes of a head, then FIN

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port)
        fail = await failure(pool.request("GET", "/", []))
        assert (fail.status, fail.reason) == (502, "upstream_reset")
        assert pool.snapshot()["retries"] == 0  # a fresh connection: nothing to blame on keep-alive
        assert srv.connections == 1 and pool.snapshot()["open"] == 0
        await pool.close()


async def test_hang_after_connect_times_out() -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        await srv.eof(r)

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port, read_timeout=0.3)
        t0 = time.monotonic()
        fail = await failure(pool.request("GET", "/", []))
        assert (fail.status, fail.reason) == (504, "upstream_timeout")
        assert 0.25 < time.monotonic() - t0 < 2.0
        await wait_for(lambda: srv.closed_at)  # the connection was closed
        assert pool.snapshot()["failures"] == {"upstream_timeout": 1}
        await pool.close()


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 abc OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 70000 + b"\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Long: " + b"v" * 8200 + b"\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
], ids=["status", "header", "not-http", "101", "101-headers", "70k-header", "8k-line", "two-lengths"])
async def test_invalid_response(response: bytes) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(response)
        await srv.eof(r)

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port)
        fail = await failure(pool.request("GET", "/", []))
        assert (fail.status, fail.reason) == (502, "upstream_invalid")
        await wait_for(lambda: srv.closed_at)
        assert pool.snapshot()["open"] == 0
        await pool.close()


async def test_head_limits() -> None:
    async def hundred_headers(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(98))
                + b"X-Long: " + b"l" * 8100 + b"\r\nContent-Length: 0\r\n\r\n")
        await srv.eof(r)

    async def endless_head(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(100):  # 100 KB of headers in small writes, never a blank line
            w.write(b"X-%d: %s\r\n" % (i, b"v" * 1000))
            await w.drain()
            await asyncio.sleep(0)
        await srv.eof(r)

    async with RawServer(hundred_headers) as srv:
        pool = pool_for(srv.port)
        resp, _ = await get(pool)
        assert len(resp.headers) == 100  # the limits themselves are allowed (and an 8108-byte line)
        await pool.close()
    async with RawServer(endless_head) as srv:
        pool = pool_for(srv.port)
        fail = await failure(pool.request("GET", "/", []))
        assert (fail.status, fail.reason) == (502, "upstream_invalid")
        await wait_for(lambda: srv.closed_at)
        await pool.close()


@pytest.mark.parametrize(("how", "reason"), [("fin", "upstream_invalid"), ("rst", "upstream_reset")])
async def test_truncated_body_after_head(how: str, reason: str) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"t" * 50)
        await w.drain()
        await asyncio.sleep(0.01)
        if how == "rst":
            reset(w)

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port)
        resp = await pool.request("GET", "/", [])
        assert resp.status == 200
        got = b""
        with pytest.raises(UpstreamFailure) as info:
            async for chunk in resp:
                got += chunk
        assert got == b"t" * 50  # what came is delivered, then the failure: never a clean end
        assert (info.value.status, info.value.reason) == (502, reason)
        resp.release()
        assert pool.snapshot()["failures"] == {reason: 1} and pool.snapshot()["open"] == 0
        await pool.close()


async def test_bad_chunk_and_body_gap_after_head() -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        if srv.connections == 1:
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await w.drain()
            await asyncio.sleep(0.05)
            w.write(b"zz\r\n")
        else:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await srv.eof(r)

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port, read_timeout=0.3)
        resp = await pool.request("GET", "/", [])
        assert await resp.read_chunk() == b"hello"
        fail = await failure(resp.read_chunk())
        assert (fail.status, fail.reason) == (502, "upstream_invalid")
        resp.release()
        resp = await pool.request("GET", "/", [])
        assert await resp.read_chunk() == b"hello"
        t0 = time.monotonic()
        fail = await failure(resp.read_chunk())
        assert (fail.status, fail.reason) == (504, "upstream_timeout")
        assert 0.25 < time.monotonic() - t0 < 2.0
        resp.release()
        await wait_for(lambda: len(srv.closed_at) == 2)
        assert pool.snapshot()["failures"] == {"upstream_invalid": 1, "upstream_timeout": 1}
        await pool.close()


async def test_pool_close_fails_in_flight_and_refuses_new() -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await srv.eof(r)

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port)
        resp = await pool.request("GET", "/", [])
        await pool.close()
        assert await resp.read_chunk() == b"hello"  # what had arrived
        fail = await failure(resp.read_chunk())
        assert fail.reason == "upstream_reset"
        with pytest.raises(RuntimeError):
            await pool.request("GET", "/", [])
        await wait_for(lambda: srv.closed_at)


# ----------------------------------------------------------------------------- cancellation and leaks
@pytest.mark.parametrize("where", ["head", "body", "abandon"])
async def test_cancellation_closes_upstream_connection_at_once(where: str) -> None:
    arrived = asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        if where != "head":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\npartial")
            await w.drain()
        arrived.set()
        await srv.eof(r)

    async with RawServer(handle) as srv:
        pool = pool_for(srv.port, read_timeout=30.0)
        loop = asyncio.get_running_loop()

        async def client() -> None:
            resp = await pool.request("GET", "/", [])
            try:
                async for _ in resp:
                    pass
            finally:
                resp.close()

        if where == "abandon":
            resp = await pool.request("GET", "/", [])
            await arrived.wait()
            t0 = loop.time()
            resp.close()
        else:
            task = asyncio.create_task(client())
            await asyncio.wait_for(arrived.wait(), 5)
            await asyncio.sleep(0.01)  # the client is waiting on the upstream
            t0 = loop.time()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert pool.snapshot()["open"] == 0  # the slot is free at once
        await wait_for(lambda: srv.closed_at, timeout=2)
        assert srv.closed_at[0] - t0 < 0.05
        await pool.close()


async def test_no_fd_leak_with_random_aborts() -> None:
    rng = random.Random(1234)

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async with AioUpstream() as up:
        before = fds()
        pool = pool_for(up.port, max_connections=8, keepalive_timeout=30.0)
        outcomes: defaultdict[str, int] = defaultdict(int)

        async def one(i: int) -> None:
            action = rng.choice(["read", "small", "abandon", "cancel", "stream"])
            target = rng.choice(["/", "/chunked?n=3", "/big?bytes=200000", "/echo"])
            if action == "cancel":
                task = asyncio.create_task(get(pool, target))
                await asyncio.sleep(rng.random() * 0.003)
                task.cancel()
                try:
                    await task
                    outcomes["finished"] += 1
                except asyncio.CancelledError:
                    outcomes["cancelled"] += 1
                return
            resp = await pool.request("GET", target, [("X-I", str(i))])
            try:
                if action == "read":
                    await resp.read()
                elif action == "small":
                    if resp.read_small(1000) is None:
                        await resp.read_chunk()
                elif action == "stream":
                    async for _ in resp:
                        break
                outcomes[action] += 1
            finally:
                resp.close()

        sem = asyncio.Semaphore(16)

        async def bounded(i: int) -> None:
            async with sem:
                await one(i)

        await asyncio.gather(*(bounded(i) for i in range(1000)))
        snap = pool.snapshot()
        assert snap["requests"] >= 1000 and snap["open"] <= 8 and snap["waiting"] == 0
        assert snap["open"] == snap["idle"]  # nothing busy is left behind
        assert outcomes["cancelled"] > 50 and outcomes["abandon"] > 100
        await pool.close()
        await wait_for(lambda: fds() <= before, timeout=5)  # the server side closed its ends too
        assert pool.snapshot()["open"] == 0


# ----------------------------------------------------------------------------- the same on uvloop
UVLOOP_CASES: list[Callable[[], Awaitable[None]]] = [
    test_keepalive_reuse_one_connection,
    test_limit_and_fifo_waiters,
    test_stale_pooled_connection_retried_once_for_idempotent,
    test_unannounced_close_never_costs_a_post,
    test_content_length_and_chunked_bodies,
    test_head_204_304_have_no_body_and_keep_the_connection,
    test_interim_responses_skipped,
    test_chunked_trailers_and_unsolicited_bytes_while_idle,
    test_our_slowness_is_not_an_upstream_timeout,
    test_slow_consumer_pauses_upstream_bounded_buffer,
    test_request_heads_and_bodies,
    test_request_body_write_flow_control,
    test_request_body_error_propagates_and_closes,
    test_bad_chunk_and_body_gap_after_head,
    test_hang_after_connect_times_out,
    test_no_fd_leak_with_random_aborts,
]


@pytest.mark.parametrize("case", UVLOOP_CASES, ids=[c.__name__.removeprefix("test_") for c in UVLOOP_CASES])
def test_on_uvloop(case: Callable[[], Awaitable[None]]) -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(case())  # type: ignore[arg-type]


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_truncated_on_uvloop(how: str) -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test_truncated_body_after_head(how, {"fin": "upstream_invalid", "rst": "upstream_reset"}[how]))


@pytest.mark.parametrize("where", ["head", "body", "abandon"])
def test_cancellation_on_uvloop(where: str) -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test_cancellation_closes_upstream_connection_at_once(where))
