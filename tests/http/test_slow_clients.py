"""Slow and greedy clients (SPEC §3): slowloris heads, dribbled bodies, readers that
never drain a large response, and deep pipelines. Each ends where SPEC §3 says,
leaves nothing behind, and never costs another client its service.

(Header timeout, keep-alive, a stalled body, max_connections and EMFILE have
their own tests in http/test_connections.py.)
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time

import pytest

from .. import faults
from ..builders import route_to
from ..conftest import raw_request, settled, status_of, wait_for
from ..faults import RawUpstream

pytestmark = pytest.mark.usefixtures("no_error_logged")






async def test_slowloris_many_connections(start_gateway, upstream):
    """1. 40 connections each start a head and add a header line every 0.3 s, never
    finishing it 2. meanwhile an ordinary client is served at once 3. every slowloris
    connection gets 408 and is closed at request_header_timeout (1 s) after its first
    byte, not later however it keeps trickling 4. none reached the upstream; nothing is
    left behind."""
    gw = await start_gateway(route_to(upstream.url), request_header_timeout=1.0, keepalive_timeout=30)

    async def loris() -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        t0 = time.monotonic()
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n")
        answer = asyncio.create_task(reader.read())  # everything, until the gateway closes
        i = 0
        while not answer.done():  # a header line every 0.3 s (the 1.0 s timeout falls between)
            await asyncio.wait([answer], timeout=0.3)
            if not answer.done():
                writer.write(b"X-Loris-%d: %d\r\n" % (i, i))
                i += 1
        elapsed = time.monotonic() - t0
        writer.close()
        return elapsed, answer.result()

    lorises = [asyncio.create_task(loris()) for _ in range(40)]
    await wait_for(lambda: gw.runtime.connections == 40)
    t0 = time.monotonic()
    ok = await raw_request(gw.port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(ok) == 200 and time.monotonic() - t0 < 0.5
    results = await asyncio.gather(*lorises)
    for elapsed, data in results:
        assert data.startswith(b"HTTP/1.1 408"), data[:100]
        assert 0.9 < elapsed < 2.5, elapsed
    assert upstream.started == 1
    await settled(gw)


async def test_dribbled_body_is_cut_and_steady_body_is_not(start_gateway, upstream):
    """A body holds a credit of at most request_body_timeout seconds, earning 1 s per
    request_body_min_rate bytes: 1. a body dribbled at 20 B/s (below 1000 B/s) gets
    408 soon after 0.5 s, though bytes keep coming 2. a body sent steadily at 4000 B/s
    for 1.5 s (three times the timeout) is served whole."""
    gw = await start_gateway(route_to(upstream.url), request_body_timeout=0.5, request_body_min_rate=1000)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
    t0 = time.monotonic()
    data = b""
    try:
        for _ in range(100):
            writer.write(b"d")
            try:
                data = await asyncio.wait_for(reader.read(65536), 0.05)
                if data:
                    break
            except TimeoutError:
                pass
    except ConnectionError:
        pass
    elapsed = time.monotonic() - t0
    writer.close()
    assert status_of(data) == 408 and b"body_timeout" in data, data[:200]
    assert 0.45 < elapsed < 1.2, elapsed

    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6000\r\nConnection: close\r\n\r\n")
    for _ in range(15):
        writer.write(b"s" * 400)
        await writer.drain()
        await asyncio.sleep(0.1)
    resp = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert status_of(resp) == 200, resp[:200]
    assert json.loads(resp.split(b"\r\n\r\n", 1)[1])["body"] == "s" * 6000
    await settled(gw)


async def test_slow_reader_never_drains(start_gateway):
    """A client asks for 256 MiB and never reads:
    1. the upstream is read no faster than the client drains: what it managed to send
       stops growing, bounded by the socket buffers on the way plus the gateway's own
    2. after send_timeout without the client taking a byte the gateway drops it:
       counted as cancelled, the slot and the upstream connection released."""
    relay = await RawUpstream(faults.big_response(256 * 1024 * 1024)).start()
    try:
        gw = await start_gateway(route_to(relay.url), send_timeout=1.5)
        route = gw.runtime.table.routes["app"]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", gw.port))
        await loop.sock_sendall(sock, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: route.gate.in_flight == 1)

        last = -1
        for _ in range(25):  # until what the upstream sent stops growing
            await asyncio.sleep(0.2)
            if relay.sent == last:
                break
            last = relay.sent
        else:
            raise AssertionError(f"the upstream kept sending: {relay.sent}")
        sent = relay.sent
        # loopback buffers on the way (upstream send, gateway receive and send) are a
        # few MiB each; the gateway itself holds ~1-2 MiB (see docs/RELIABILITY.md)
        assert sent < 32 * 1024 * 1024, sent
        await wait_for(lambda: route.gate.in_flight == 0, timeout=5)
        assert route.stats.cancelled_in_flight == 1
        await wait_for(lambda: relay.open == 0, timeout=5)
        assert relay.sent < 40 * 1024 * 1024
        sock.close()
        await settled(gw)
    finally:
        await relay.stop()


async def test_deep_pipeline_in_order(start_gateway):
    """60 requests in one write (GETs, and POSTs with bodies) are answered in order, one
    upstream request each, every body exactly where its Content-Length put it; the
    parser's queue bounds how many are read ahead."""
    relay = await RawUpstream(faults.echo_request_line).start()
    try:
        gw = await start_gateway(route_to(relay.url, max_concurrency=4))
        parts = []
        for i in range(60):
            if i % 3 == 2:
                body = b"p" * i
                parts.append(b"POST /r%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (i, len(body), body))
            else:
                parts.append(b"GET /r%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        parts.append(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        resp = await raw_request(gw.port, b"".join(parts), timeout=10)
        bodies = [chunk.split(b"\r\n\r\n", 1)[1].split(b"\n", 1)[0]
                  for chunk in resp.split(b"HTTP/1.1 200 OK\r\n")[1:]]
        want = [(b"%s /r%d HTTP/1.1 %d" % (b"POST" if i % 3 == 2 else b"GET", i, i if i % 3 == 2 else 0))
                for i in range(60)] + [b"GET /last HTTP/1.1 0"]
        assert bodies == want
        assert not relay.errors
        assert [r.request_line for r in relay.requests] == [w.rsplit(b" ", 1)[0].decode() for w in want]
        await settled(gw)
    finally:
        await relay.stop()


async def test_pipelining_far_ahead_is_answered_then_closed(start_gateway):
    """A client that pipelines far more than the gateway reads ahead (over 64 KiB of GETs
    in one write, 2,500 requests): 1. the requests parsed ahead are answered, in order,
    the last with Connection: close, then the connection closes (before: every one was
    read, held and answered) 2. the upstream saw exactly those, nothing of the bytes
    dropped 3. 24 KiB of pipelined GETs (under the bound) are all answered."""
    relay = await RawUpstream(faults.echo_request_line).start()
    try:
        gw = await start_gateway(route_to(relay.url))
        far = b"".join(b"GET /r%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(2500))
        assert len(far) > 64 * 1024
        resp = await raw_request(gw.port, far, timeout=10)
        answers = resp.split(b"HTTP/1.1 200 OK\r\n")[1:]
        assert 1 <= len(answers) <= 32, len(answers)
        lines = [a.split(b"\r\n\r\n", 1)[1].split(b" HTTP/1.1", 1)[0] for a in answers]
        assert lines == [b"GET /r%d" % i for i in range(len(answers))]
        assert b"\r\nConnection: close" in b"\r\n" + answers[-1].split(b"\r\n\r\n", 1)[0]
        assert not any(b"Connection: close" in a for a in answers[:-1])
        await wait_for(lambda: len(relay.requests) == len(answers))
        assert [r.request_line for r in relay.requests] == [f"GET /r{i} HTTP/1.1" for i in range(len(answers))]
        near = b"".join(b"GET /s%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(800))
        near += b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        assert len(near) < 32 * 1024
        resp = await raw_request(gw.port, near, timeout=20)
        assert resp.count(b"HTTP/1.1 200 OK\r\n") == 801
        await settled(gw)
    finally:
        await relay.stop()


async def _answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await asyncio.wait_for(reader.readexactly(length), 5)
    return head


async def test_upload_then_idle_gets_no_408(start_gateway, upstream):
    """The bytes that end a body are no head: 1. a POST in one write, one whose body's
    end comes in a later write, and a chunked one whose last chunk does, each answered
    200 2. the keep-alive connection then stays idle for 3 x request_header_timeout,
    open and sent nothing (before: a 408 and a close, request_header_timeout after the
    body) 3. its next request is served 4. a body's end and the start of another head
    in one write: that head still gets its 408."""
    gw = await start_gateway(route_to(upstream.url), request_header_timeout=0.5, keepalive_timeout=30)
    route = gw.runtime.table.routes["app"]
    uploads = (
        [b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"],
        [b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhe", b"llo"],
        [b"POST /ok HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", b"0\r\n\r\n"],
    )
    for parts in uploads:
        seen = route.stats.requests
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            for part in parts:
                writer.write(part)
                await writer.drain()
                await wait_for(lambda seen=seen: route.stats.requests == seen + 1)  # (the head is in)
            assert (await _answer(reader)).startswith(b"HTTP/1.1 200"), parts
            with pytest.raises(TimeoutError):
                got = await asyncio.wait_for(reader.read(1), 1.5)
                raise AssertionError(f"sent while idle: {got!r}")
            writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            rest = await asyncio.wait_for(reader.read(), 5)
            assert rest.startswith(b"HTTP/1.1 200") and rest.count(b"HTTP/1.1 ") == 1, rest
        finally:
            writer.close()
    t0 = time.monotonic()
    out = await raw_request(gw.port, b"POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                            b"GET /b HTTP/1.1\r\nHost: x\r\nX-A: 1", timeout=10)
    assert out.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in out and time.monotonic() - t0 < 5, out
    await settled(gw)


async def test_broken_chunk_on_a_closing_connection_gets_its_400(start_gateway, upstream):
    """A chunked body that breaks in a later read, on a request that ends its connection
    (Connection: close), is answered 400 bad_request before the close (before: the
    access log said 400, the client got only the close); the upstream sees nothing."""
    gw = await start_gateway(route_to(upstream.url))
    route = gw.runtime.table.routes["app"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"POST /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await wait_for(lambda: route.stats.requests == 1)
        writer.write(b"zz\r\n")
        out = await asyncio.wait_for(reader.read(), 5)
        assert out.startswith(b"HTTP/1.1 400") and b"bad_request" in out, out
    finally:
        writer.close()
    assert upstream.requests == []
    await settled(gw)


async def test_pipelined_answers_at_once_are_put_off_once(start_gateway, upstream):
    """A client whose pipelined requests are answered at once (404s) waits its turn
    behind other clients once per turn, never queued twice (before: up to 100 places in
    the turn's queue at once, each good for a burst of answers ahead of other clients):
    400 pipelined 404s are all answered, and at no turn is the connection in the queue
    of put-off work more than once."""
    gw = await start_gateway(route_to(upstream.url, host="app.example"))
    server = gw.runtime.server
    worst = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal worst
        while not done.is_set():
            backlog = list(server._backlog)
            worst = max(worst, len(backlog) - len(set(map(id, backlog))) + (1 if backlog else 0))
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    try:
        flood = b"GET /nope HTTP/1.1\r\nHost: other.example\r\n\r\n" * 400
        flood += b"GET /nope HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n"
        assert len(flood) < 32 * 1024
        out = await raw_request(gw.port, flood, timeout=20)
        assert out.count(b"HTTP/1.1 404") == 401
    finally:
        done.set()
        await watcher
    assert worst == 1, worst
    await settled(gw)


async def test_client_leaving_a_large_response_is_no_error(start_gateway, upstream):
    """A client that reads the start of a 50 MB response and closes: counted as
    cancelled (499), its slot back, and nothing logged at ERROR (before: "unexpected
    error" with a traceback, the write's wait for room ending in ConnectionError)."""
    gw = await start_gateway(route_to(upstream.url))
    route = gw.runtime.table.routes["app"]
    for i in range(4):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /big?bytes=50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readexactly(64 * 1024), 5)
        # the gateway's buffer toward it fills (its write waits for room), then it goes
        await wait_for(lambda: any(p._paused for p in gw.runtime.server.connections), timeout=5)
        if i % 2:
            writer.transport.abort()
        else:
            writer.close()
    await wait_for(lambda: route.stats.cancelled_in_flight == 4 and route.gate.in_flight == 0, timeout=5)
    await settled(gw)


async def test_shed_on_a_keepalive_connection_is_answered_once(start_gateway, upstream):
    """1. the route's one slot is busy and its queue is 0 2. a keep-alive connection sends
    two requests: each gets exactly one 503 queue_full, nothing else follows 3. once the
    slot is free the same connection is served; no ERROR was logged."""
    gw = await start_gateway(route_to(upstream.url, max_concurrency=1, max_queue=0))
    busy = asyncio.create_task(raw_request(gw.port, b"GET /slow?ms=1500 HTTP/1.1\r\nHost: x\r\n\r\n", 5))
    route = gw.runtime.table.routes["app"]
    await wait_for(lambda: route.gate.in_flight == 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    for _ in range(2):
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 503") and b"queue_full" in head, head
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    await busy
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(), 3)
    assert rest.startswith(b"HTTP/1.1 200") and rest.count(b"HTTP/1.1 ") == 1, rest
    writer.close()
    await settled(gw)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _flood(port: int, first: bytes, each: bytes, size: int) -> tuple[socket.socket, asyncio.Task[None]]:
    """A connection that sends ``first`` then ``size`` bytes of ``each`` pipelined (as
    fast as the gateway takes them, from a task), and never reads (a small receive
    buffer, so its responses soon stop leaving)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    data = first + each * (size // len(each))
    return sock, asyncio.create_task(loop.sock_sendall(sock, data))


async def test_pipelined_flood_is_bounded(start_gateway, upstream):
    """A pipelined flood costs a bounded amount of memory and nobody else's service:
    1. 20 connections each send 256 KiB of pipelined GETs behind a slow one (about
       6,000 requests each) and read nothing; 4 more send 4 MiB each of requests no
       route serves (404s, answered at once, ~90,000 each) and read nothing
    2. the gateway grows by far less than the parsed flood would take (a 256 KiB read
       was ~6,000 parsed messages, several MiB, before the bound): under 48 MiB in all
    3. a client whose answers do not leave is no longer read: only what fits in the
       socket buffers toward it is answered, not its whole flood
    4. meanwhile an ordinary request on another connection is answered in under 1 s."""
    gw = await start_gateway(route_to(upstream.url, max_concurrency=100, host="app.example"),
                             keepalive_timeout=30, send_timeout=30)
    server = gw.runtime.server
    for _ in range(3):
        gc.collect()
    before = _rss()
    get = b"GET /ok HTTP/1.1\r\nHost: app.example\r\n\r\n"
    lost = b"GET /nowhere HTTP/1.1\r\nHost: nowhere.example\r\n\r\n"
    floods = []
    try:
        for _ in range(20):
            floods.append(await _flood(gw.port, b"GET /slow?ms=4000 HTTP/1.1\r\nHost: app.example\r\n\r\n",
                                       get, 256 * 1024))
        for _ in range(4):
            floods.append(await _flood(gw.port, b"", lost, 4 * 1024 * 1024))
        await wait_for(lambda: upstream.active == 20, timeout=5)
        # what the 404 floods get answered, and the memory, stop growing: they are no
        # longer read
        last = (-1, 0)
        for _ in range(50):
            await asyncio.sleep(0.2)
            now = (getattr(server, "unrouted", {}).get(404, 0), _rss() >> 21)
            if now == last:
                break
            last = now
        else:
            raise AssertionError(f"still answering the floods: {last}")
        grown = _rss() - before
        assert grown < 48 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
        answered = server.unrouted.get(404, 0)
        assert answered < 4 * 30000, answered  # of 4 x 89,000 sent
        t0 = time.monotonic()
        out = await raw_request(gw.port, b"GET /ok HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n")
        assert status_of(out) == 200 and time.monotonic() - t0 < 1.0
    finally:
        for sock, task in floods:
            task.cancel()
            sock.close()
    await settled(gw)


async def test_partial_head_behind_requests_times_out(start_gateway, upstream):
    """A head started in the same write as complete requests has request_header_timeout
    from its first byte, not the keep-alive timeout: 1. one write: a complete GET and
    the start of another head -> 200, then 408 and close about 1 s later 2. the same
    while the first request is still in flight (a 1.5 s answer) -> 200, then 408 at
    once after it, long before keepalive_timeout (30 s)."""
    gw = await start_gateway(route_to(upstream.url), request_header_timeout=1.0, keepalive_timeout=30)
    for first in (b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /slow?ms=1500 HTTP/1.1\r\nHost: x\r\n\r\n"):
        t0 = time.monotonic()
        out = await raw_request(gw.port, first + b"GET /b HTTP/1.1\r\nHost: x\r\nX-A: 1", timeout=10)
        took = time.monotonic() - t0
        assert out.startswith(b"HTTP/1.1 200 "), out[:200]
        assert out.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 408 " in out, out
        assert took < 5, took
    await settled(gw)
