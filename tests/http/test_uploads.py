"""Slow and oversized uploads (issue 17, items 1 and 7): a body is read before its
request asks for a slot, so slow uploaders hold connections and bytes, never route
slots; a body is judged by its recent rate, not by credit banked earlier; an
oversized chunked body never reaches the upstream."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest
from aiohttp import web

from ..builders import route_to, route_toml, upstream_toml
from ..conftest import raw_request, settled, status_of, wait_for
from ..faults import RawUpstream

pytestmark = pytest.mark.usefixtures("no_error_logged")






async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if status >= 200 and "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


class Received:
    """Everything the gateway sends on a connection, read as it arrives: the reset that
    follows a response on a connection closed with unread input cannot take it back
    (as it would from a StreamReader read after the reset)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.data = bytearray()
        self.task = asyncio.create_task(self._run(reader))

    async def _run(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(65536):
                self.data += chunk
        except ConnectionError:
            pass

    async def until(self, text: bytes, timeout: float = 5.0) -> bytes:
        await wait_for(lambda: text in self.data or self.task.done(), timeout=timeout)
        return bytes(self.data)


async def send_collecting(port: int, data: bytes, piece: int = 16384) -> bytes:
    """Send ``data`` in pieces while collecting the answer (see Received): a gateway
    that answers and closes before the end of a large body resets the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = Received(reader)
    try:
        for i in range(0, len(data), piece):
            if received.data:
                break
            writer.write(data[i:i + piece])
            await writer.drain()
    except ConnectionError:
        pass
    try:
        return await received.until(b"\r\n\r\n")
    finally:
        writer.close()


class Uploader:
    """A client sending a ``size``-byte body ``step`` bytes every ``every`` seconds."""

    def __init__(self, port: int, size: int, step: int, every: float, path: str = "/echo") -> None:
        self.port, self.size, self.step, self.every, self.path = port, size, step, every, path
        self.sent = 0
        self.task: asyncio.Task[bytes] | None = None

    def start(self) -> Uploader:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % (self.path.encode(), self.size))
        answer = asyncio.create_task(reader.read())
        try:
            while self.sent < self.size and not answer.done():
                n = min(self.step, self.size - self.sent)
                writer.write(b"u" * n)
                self.sent += n
                await asyncio.wait([answer], timeout=self.every)
            return await asyncio.wait_for(answer, 10)
        except ConnectionError:
            return b""
        finally:
            answer.cancel()
            writer.close()

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def test_slow_uploads_hold_no_slot(start_gateway, upstream):
    """The issue's attack, small: 1. six clients upload 50 kB at 2,000 B/s (above the
    minimum rate) to a route of 2 slots and 2 queue places, whose upstream reads the
    whole body before it answers 2. meanwhile 20 ordinary GETs, one after another, are all served at once
    (before request buffering the uploads held both slots and both queue places:
    every GET was shed 503) 3. no upload holds a slot or a queue place while its body
    arrives, and the bodies are held in the buffer memory 4. a slow upload that ends
    is served whole, with its length."""
    gw = await start_gateway(route_to(upstream.url, max_concurrency=2, max_queue=2, queue_timeout=0.3),
                             request_body_timeout=2.0, request_body_min_rate=500)
    route = gw.runtime.table.routes["app"]
    uploads = [Uploader(gw.port, 50_000, 200, 0.1).start() for _ in range(6)]

    async def get() -> tuple[int, float]:
        t0 = time.monotonic()
        resp = await raw_request(gw.port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return status_of(resp), time.monotonic() - t0

    try:
        # (before buffering, two of them took the slots, two the queue, two were shed)
        await wait_for(lambda: all(u.sent >= 1000 or u.task.done() for u in uploads), timeout=5)
        results = [await get() for _ in range(20)]  # (one at a time: the route has 2 slots)
        assert [s for s, _ in results] == [200] * 20, results
        assert max(t for _, t in results) < 0.5, results
        assert route.gate.in_flight == 0 and not route.gate.waiters
        assert gw.runtime.body_memory.held >= 6 * 800
    finally:
        for u in uploads:
            await u.stop()

    # one slow upload that ends (3,000 B/s, 1 s) is served whole
    done = await Uploader(gw.port, 3000, 300, 0.1).start().task  # type: ignore[misc]
    status, _, body = await read_response(_reader_of(done))
    assert status == 200
    got = json.loads(body)
    assert got["body"] == "u" * 3000
    assert dict((k.lower(), v) for k, v in got["headers"])["content-length"] == "3000"
    await settled(gw)


def _reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "streamed"])
async def test_trickle_after_a_burst_is_cut(start_gateway, upstream, buffered):
    """A body sends 60 kB at once, then trickles at 20 B/s (minimum rate 1,000 B/s,
    timeout 0.5 s). Under the old rule (deadline = timeout + received / rate) the burst
    bought 60 s; now the credit never exceeds request_body_timeout, so 1. it gets 408
    body_timeout within about a second of the burst, whether its body was being
    buffered or streamed to an admitted request."""
    gw = await start_gateway(route_to(upstream.url), request_body_timeout=0.5, request_body_min_rate=1000,
                             request_buffer_size=1_000_000 if buffered else 1000)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"b" * 60_000)
    t0 = time.monotonic()
    received = Received(reader)
    try:
        while not received.data and not received.task.done() and time.monotonic() - t0 < 3:
            writer.write(b"t")
            await asyncio.wait([received.task], timeout=0.05)
    except ConnectionError:
        pass
    elapsed = time.monotonic() - t0
    try:
        data = await received.until(b"\r\n\r\n")
    finally:
        writer.close()
    assert status_of(data) == 408 and b"body_timeout" in data, data[:200]
    assert elapsed < 1.5, elapsed
    await settled(gw)


CHUNKED_HEAD = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect-100"])
async def test_oversized_chunked_body_never_reaches_the_upstream(start_gateway, expect):
    """max_body_size = 1 MiB, a 2 MiB chunked upload (with or without Expect:
    100-continue): 1. the client gets 413 body_too_large (after its 100 Continue when
    it asked) 2. the recording upstream receives not one byte (before buffering it got
    about 1 MB of the body before the 413)."""
    relay = await RawUpstream().start()
    try:
        gw = await start_gateway(route_to(relay.url), max_body_size="1MiB")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        received = Received(reader)
        writer.write(CHUNKED_HEAD + (b"Expect: 100-continue\r\n\r\n" if expect else b"\r\n"))
        if expect:
            interim = await received.until(b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
            del received.data[:25]
        chunk = b"%x\r\n%s\r\n" % (65536, b"c" * 65536)
        try:
            for _ in range(32):
                writer.write(chunk)
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass  # the gateway answered and closed before the end
        try:
            data = await received.until(b"\r\n\r\n")
        finally:
            writer.close()
        assert status_of(data) == 413 and b"X-Gatewayd-Reason: body_too_large" in data, data[:300]
        assert relay.received == b"" and not relay.connections
        # a chunked body within the limit is forwarded, with its length
        ok = await raw_request(gw.port, CHUNKED_HEAD + b"Connection: close\r\n\r\n"
                               + chunk * 4 + b"0\r\n\r\n")
        assert status_of(ok) == 200, ok[:200]
        [req] = relay.requests
        assert req.header("content-length") == [str(4 * 65536)] and not req.header("transfer-encoding")
        assert req.body == b"c" * 4 * 65536
        await settled(gw)
    finally:
        await relay.stop()


async def test_expect_100_is_answered_before_admission(start_gateway, upstream):
    """With the route's only slot busy: 1. a POST with Expect: 100-continue gets its
    100 Continue at once (the gateway reads the body before admission, as nginx), and
    holds no queue place while its body arrives 2. once the slot frees it is served
    with its whole body."""
    gw = await start_gateway(route_to(upstream.url, max_concurrency=1, max_queue=4, queue_timeout=5.0))
    route = gw.runtime.table.routes["app"]
    slow = asyncio.create_task(raw_request(gw.port, b"GET /slow?ms=600 HTTP/1.1\r\nHost: x\r\n"
                                                    b"Connection: close\r\n\r\n"))
    await wait_for(lambda: route.gate.in_flight == 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
                 b"Connection: close\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.4)
    assert interim.startswith(b"HTTP/1.1 100 "), interim
    assert not route.gate.waiters
    writer.write(b"hello")
    status, _, body = await asyncio.wait_for(read_response(reader), 5)
    writer.close()
    assert status == 200 and json.loads(body)["body"] == "hello"
    assert status_of(await slow) == 200
    await settled(gw)


async def test_buffer_memory_full_refuses_bodies(start_gateway, upstream):
    """request_buffer_memory = 64 KiB: 1. while slow uploads hold the whole of it, a
    new body is refused at once (503 body_buffer_full, Retry-After) and GETs are still
    served 2. once they are gone the memory is given back and a body fits again."""
    gw = await start_gateway(route_to(upstream.url), request_buffer_memory=65536)
    route = gw.runtime.table.routes["app"]
    uploads = [Uploader(gw.port, 60_000, 16384, 0.1).start() for _ in range(4)]
    try:
        await wait_for(lambda: gw.runtime.body_memory.full)
        resp = await raw_request(gw.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                 b"Content-Length: 5\r\n\r\nhello")
        assert status_of(resp) == 503 and b"body_buffer_full" in resp, resp[:300]
        resp = await raw_request(gw.port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(resp) == 200
        assert route.gate.in_flight == 0
    finally:
        for u in uploads:
            await u.stop()
    await wait_for(lambda: gw.runtime.body_memory.held == 0)
    resp = await raw_request(gw.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                             b"Content-Length: 5\r\n\r\nhello")
    assert status_of(resp) == 200 and json.loads(resp.split(b"\r\n\r\n", 1)[1])["body"] == "hello"
    await settled(gw)


async def echo_handler(request: web.BaseRequest) -> web.StreamResponse:
    """An in-process handler that reads the body itself (used by the test below)."""
    first = await request.content.read(10)
    rest = await request.read() if not first else await request.content.read()
    return web.json_response({"length": len(first) + len(rest), "head": (first + rest)[:8].decode()})


@pytest.mark.parametrize("framing", ["buffered", "chunked", "streamed"])
async def test_handler_reads_the_body(start_gateway, framing):
    """An inline aiohttp handler reads request.content whether the body was buffered
    before admission (Content-Length, chunked) or streams (over request_buffer_size)."""
    gw = await start_gateway(upstream_toml("h", handler="tests.http.test_uploads:echo_handler")
                             + route_toml("app", "h"), request_buffer_size=1000)
    size = 500 if framing == "buffered" else 5000
    body = b"abcdefgh" + b"z" * (size - 8)
    if framing == "chunked":
        req = CHUNKED_HEAD + b"Connection: close\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (size, body)
    else:
        req = b"POST /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % size + body
    resp = await raw_request(gw.port, req)
    assert status_of(resp) == 200, resp[:300]
    assert json.loads(resp.split(b"\r\n\r\n", 1)[1]) == {"length": size, "head": "abcdefgh"}
    await wait_for(lambda: gw.runtime.body_memory.held == 0)


async def test_broken_chunk_framing_later_is_one_400_at_once(start_gateway):
    """A chunked body whose framing breaks in a later read (a chunk size that is not
    hex), while its body is being read before admission: 1. one 400 bad_request, at
    once, not a 408 at the body timeout followed by a 400 2. the upstream sees nothing
    3. nothing logged at ERROR, nothing left behind."""
    relay = await RawUpstream().start()
    try:
        gw = await start_gateway(route_to(relay.url), request_body_timeout=3.0)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(CHUNKED_HEAD + b"\r\n" + b"5\r\nhello\r\n")
            await wait_for(lambda: gw.runtime.body_memory.held == 5)
            writer.write(b"zz\r\nxx\r\n")
            t0 = time.monotonic()
            data = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        assert time.monotonic() - t0 < 1.0
        assert data.count(b"HTTP/1.1 ") == 1 and status_of(data) == 400, data
        assert b"X-Gatewayd-Reason: bad_request" in data
        assert relay.received == b""
        await settled(gw)
    finally:
        await relay.stop()


async def test_buffer_memory_is_divided_among_workers(start_gateway, upstream):
    """request_buffer_memory is gateway-wide: 1. one worker holds all of it 2. each of
    N workers holds its share (the shares add up to the whole), re-divided when the
    number of live workers changes."""
    gw = await start_gateway(route_to(upstream.url), request_buffer_memory=1000)
    runtime = gw.runtime
    assert runtime.body_memory.limit == 1000
    shares = []
    for index in range(3):
        runtime.set_share(index, 3)
        shares.append(runtime.body_memory.limit)
    assert shares == [334, 333, 333]
    runtime.set_share(0, 1)
    assert runtime.body_memory.limit == 1000


@pytest.mark.parametrize("framing", ["buffered", "chunked", "streamed"])
async def test_process_handler_gets_the_body(start_gateway, framing):
    """A process-pool handler gets the whole body as bytes, whether it was buffered
    before admission (Content-Length, chunked) or streamed (over request_buffer_size)."""
    gw = await start_gateway(upstream_toml("h", handler="gatewayd.handlers:cpu_hash", executor="process", processes=1)
                             + route_toml("app", "h"), request_buffer_size=1000)
    size = 500 if framing == "buffered" else 5000
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    if framing == "chunked":
        req = (CHUNKED_HEAD.replace(b"/up", b"/h?n=0") + b"Connection: close\r\n\r\n"
               + b"%x\r\n%s\r\n0\r\n\r\n" % (size, body))
    else:
        req = (b"POST /h?n=0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % size
               + body)
    resp = await raw_request(gw.port, req, timeout=20)
    assert status_of(resp) == 200, resp[:300]
    assert resp.split(b"\r\n\r\n", 1)[1] == hashlib.sha256(body).hexdigest().encode() + b"\n"
    await wait_for(lambda: gw.runtime.body_memory.held == 0)


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_body_larger_than_the_buffer_memory_streams(start_gateway, framing):
    """request_buffer_memory = 64 KiB (one worker's share, less than
    request_buffer_size): a 300 kB body, Content-Length or chunked, could never fit,
    so it streams once admitted instead of a 503 body_buffer_full no retry could
    cure (before: 503 every time). The upstream gets it whole (a chunked one, chunked),
    and nothing stays counted."""
    relay = await RawUpstream().start()
    try:
        gw = await start_gateway(route_to(relay.url), request_buffer_memory=65536)
        payload = bytes(range(256)) * 1200
        if framing == "length":
            req = b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
        else:
            req = CHUNKED_HEAD + b"\r\n" + b"".join(
                b"%x\r\n%s\r\n" % (len(payload[i:i + 30000]), payload[i:i + 30000])
                for i in range(0, len(payload), 30000)) + b"0\r\n\r\n"
        resp = await send_collecting(gw.port, req)
        assert status_of(resp) == 200, resp[:300]
        [got] = relay.requests
        assert got.body == payload
        if framing == "chunked":
            assert got.header("transfer-encoding") == ["chunked"]
        assert gw.runtime.body_memory.refused == 0
        await settled(gw)
    finally:
        await relay.stop()


async def test_body_memory_is_given_back_once_forwarded(start_gateway, upstream):
    """request_buffer_memory = 64 KiB: a client sends a 40 kB body to /big (a 50 MB
    answer) and reads none of its response: 1. once the upstream has the body, none of
    the buffer memory is held for it (before: all 40 kB until the response was
    sent) 2. so another 40 kB body fits and is answered 200, not 503
    body_buffer_full."""
    gw = await start_gateway(route_to(upstream.url), request_buffer_memory=65536)
    body = b"b" * 40000
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"POST /big?bytes=50000000 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body)
        await wait_for(lambda: upstream.started == 1)
        await wait_for(lambda: gw.runtime.body_memory.held == 0, timeout=2)
        resp = await raw_request(gw.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert status_of(resp) == 200, resp[:300]
        assert gw.runtime.table.routes["app"].gate.in_flight == 1  # the slow reader's answer is under way
        status, _, rest = await asyncio.wait_for(read_response(reader), 20)  # now read it all
        assert status == 200 and len(rest) == 50_000_000
    finally:
        writer.close()
    await settled(gw)


async def outgrown_handler(request: web.BaseRequest) -> web.StreamResponse:
    data = await request.read()
    return web.json_response({"length": len(data), "sha": hashlib.sha256(data).hexdigest()})


async def test_handler_gets_a_chunked_body_that_outgrew_the_buffer(start_gateway):
    """An inline handler behind request_buffer_memory = 64 KiB gets a 300 kB chunked
    body whole: what was read before admission, then the rest."""
    gw = await start_gateway(upstream_toml("h", handler="tests.http.test_uploads:outgrown_handler")
                             + route_toml("app", "h"), request_buffer_memory=65536)
    payload = bytes(range(256)) * 1200
    req = CHUNKED_HEAD + b"Connection: close\r\n\r\n" + b"".join(
        b"%x\r\n%s\r\n" % (len(payload[i:i + 30000]), payload[i:i + 30000])
        for i in range(0, len(payload), 30000)) + b"0\r\n\r\n"
    resp = await send_collecting(gw.port, req)
    assert status_of(resp) == 200, resp[:300]
    got = json.loads(resp.split(b"\r\n\r\n", 1)[1])
    assert got == {"length": len(payload), "sha": hashlib.sha256(payload).hexdigest()}
    await wait_for(lambda: gw.runtime.body_memory.held == 0)
