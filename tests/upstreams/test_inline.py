"""The common exchange without a task: an admitted GET sent at once on an idle pooled
connection and answered from that connection's read callback (``serve_inline``).

Every case warms the pool first, so that the request under test starts inline; each
way off the common path (a failure before the head, a body that streams, a client
that leaves) must end as the general path ends, with nothing left behind.
"""

from __future__ import annotations

import asyncio

import pytest

from .. import faults
from ..conftest import TasksMade, status_of, wait_for
from ..faults import RawUpstream, Respond
from .test_failures import READ_TIMEOUT, Baseline, _reason, route_to


def warm_then(fault: Respond) -> Respond:
    """``200 ok`` (keep-alive) for ``/warm``; ``fault`` for any other target."""

    async def respond(req, reader, writer, up) -> bool:
        if req.request_line.split(" ")[1] == "/warm":
            return await faults.answer_ok(req, reader, writer, up)
        return await fault(req, reader, writer, up)

    return respond


class Client:
    """One keep-alive client connection reading responses framed by Content-Length."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(self, target: str, method: str = "GET", timeout: float = 5.0) -> tuple[bytes, bytes]:
        """(head, body) of one response; no task made on the way (asyncio.timeout)."""
        self.writer.write(f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = b"" if method == "HEAD" else await self.reader.readexactly(length)
        return head, body

    def close(self) -> None:
        self.writer.close()


async def _warm(gw, relay: RawUpstream) -> Client:
    client = await Client.open(gw.port)
    head, body = await client.get("/warm")
    assert status_of(head) == 200 and body == b"ok\n", head
    pool = gw.runtime.table.routes["app"].upstream.servers[0].session
    await wait_for(lambda: pool.snapshot()["idle"] == 1)
    return client


async def test_warm_gets_make_no_task(start_gateway) -> None:
    """1. one GET warms the pool 2. 20 more GETs and HEADs on the same client connection
    3. each is answered in full on the one pooled connection 4. no task was made for
    any of them (the whole exchange ran in the connections' callbacks)."""
    relay = await RawUpstream().start()
    try:
        gw = await start_gateway(route_to(relay.url))
        client = await _warm(gw, relay)
        with TasksMade() as tasks:
            for i in range(20):
                method = "HEAD" if i % 4 == 3 else "GET"
                head, body = await client.get(f"/n{i}", method)
                assert status_of(head) == 200, head
                assert body == (b"" if method == "HEAD" else b"ok\n")
                assert b"content-length: 3" in head.lower()
        assert tasks.made == 0
        assert len(relay.connections) == 1 and len(relay.requests) == 21
        stats = gw.runtime.table.routes["app"].stats
        assert stats.codes == {200: 21} and stats.latency.count == 21  # counted as any other
        client.close()
    finally:
        await relay.stop()


BEFORE_HEAD = [
    ("reset_before_head", 502, "upstream_reset"),
    ("hang", 504, "upstream_timeout"),
    ("invalid_status_line", 502, "upstream_invalid"),
]


@pytest.mark.parametrize(("fault", "status", "reason"), BEFORE_HEAD)
async def test_inline_failure_before_the_head(fault: str, status: int, reason: str, start_gateway) -> None:
    """On a warm pool the failing GET starts inline; it still gets its status and
    reason, is counted once under that reason, and leaves nothing behind."""
    relay = await RawUpstream(warm_then(getattr(faults, fault))).start()
    try:
        gw = await start_gateway(route_to(relay.url))
        base = Baseline(gw)
        client = await _warm(gw, relay)
        head, _ = await client.get("/fail", timeout=READ_TIMEOUT + 5)
        assert status_of(head) == status, head
        assert _reason(head) == reason, head
        stats = gw.runtime.table.routes["app"].stats
        assert stats.upstream_errors == {reason: 1}, stats.upstream_errors
        # the client connection is still good
        head, body = await client.get("/warm")
        assert status_of(head) == 200 and body == b"ok\n"
        client.close()
        await base.settled(relay, pooled=1)
    finally:
        await relay.stop()


async def test_inline_response_that_streams(start_gateway) -> None:
    """A body too big for one read goes on in a task: 1. the client gets all of it,
    framed by its length 2. the connection serves the next request 3. the pooled
    connection is reused for it."""
    size = 3_000_000
    relay = await RawUpstream(warm_then(faults.big_response(size))).start()
    try:
        gw = await start_gateway(route_to(relay.url))
        base = Baseline(gw)
        client = await _warm(gw, relay)
        head, body = await client.get("/big", timeout=20)
        assert status_of(head) == 200 and f"content-length: {size}".encode() in head.lower()
        assert body == b"z" * size
        head, body = await client.get("/warm")
        assert status_of(head) == 200 and body == b"ok\n"
        assert len(relay.connections) == 1
        client.close()
        await base.settled(relay, pooled=1)
    finally:
        await relay.stop()


async def test_client_that_leaves_an_inline_exchange(start_gateway) -> None:
    """1. a GET on a warm pool goes upstream, which does not answer 2. its client
    closes 3. the upstream connection is closed at once, the slot freed, the request
    counted as cancelled in flight; nothing is left behind."""
    relay = await RawUpstream(warm_then(faults.hang)).start()
    try:
        gw = await start_gateway(route_to(relay.url).replace(f"read_timeout = {READ_TIMEOUT}",
                                                            "read_timeout = 30"))
        base = Baseline(gw)
        client = await _warm(gw, relay)
        route = gw.runtime.table.routes["app"]
        client.writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: len(relay.requests) == 2 and route.gate.in_flight == 1)
        client.writer.transport.abort()
        await wait_for(lambda: relay.connections[0].closed, timeout=2)
        await wait_for(lambda: route.stats.cancelled_in_flight == 1)
        assert route.stats.upstream_errors == {}
        await base.settled(relay)
    finally:
        await relay.stop()


async def test_queued_requests_make_no_task(start_gateway) -> None:
    """A route of one slot, its pool warm: 1. four clients send a GET at once, the
    upstream takes 50 ms each 2. one goes upstream, three queue 3. each freed slot
    goes to the oldest waiter, whose request goes upstream from the release itself:
    all four are answered, in order, on the one pooled connection 4. no task was
    made for any of them, queued or not."""

    async def slow_ok(req, reader, writer, up) -> bool:
        if req.request_line.split(" ")[1] != "/warm":
            await asyncio.sleep(0.05)
        return await faults.answer_ok(req, reader, writer, up)

    relay = await RawUpstream(slow_ok).start()
    try:
        config = route_to(relay.url) + "max_concurrency = 1\nmax_queue = 10\nqueue_timeout = 5\n"
        gw = await start_gateway(config)
        warm = await _warm(gw, relay)
        route = gw.runtime.table.routes["app"]
        clients = [await Client.open(gw.port) for _ in range(4)]
        with TasksMade() as tasks:
            for i, c in enumerate(clients):
                c.writer.write(f"GET /q{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                await wait_for(lambda i=i: route.stats.requests == 2 + i)  # in this order
            assert len(route.gate.waiters) == 3
            for c in clients:
                async with asyncio.timeout(5):
                    head = await c.reader.readuntil(b"\r\n\r\n")
                    assert status_of(head) == 200 and await c.reader.readexactly(3) == b"ok\n"
        assert tasks.made == 0
        assert [r.request_line.split(" ")[1] for r in relay.requests] == ["/warm", "/q0", "/q1", "/q2", "/q3"]
        assert len(relay.connections) == 1
        assert route.stats.queue_wait.count == 5 and route.gate.in_flight == 0
        for c in (warm, *clients):
            c.close()
    finally:
        await relay.stop()


async def test_queued_clients_leaving_as_the_slot_frees(start_gateway) -> None:
    """A one-slot route holding one request upstream and 600 queued behind it: 1. all
    600 clients reset their connections and, in the same turn, the upstream answers
    2. the holder gets its response and its connection serves another request 3. no
    slot, queue place or upstream count is left behind and a new client is served."""
    import socket
    import struct

    answer = asyncio.Event()

    async def held(req, reader, writer, up) -> bool:
        if req.request_line.split(" ")[1] == "/hold":
            await answer.wait()
        return await faults.answer_ok(req, reader, writer, up)

    relay = await RawUpstream(held).start()
    try:
        config = route_to(relay.url).replace(f"read_timeout = {READ_TIMEOUT}", "read_timeout = 30")
        gw = await start_gateway(config + "max_concurrency = 1\nmax_queue = 5000\nqueue_timeout = 30\n")
        holder = await _warm(gw, relay)
        route = gw.runtime.table.routes["app"]
        holder.writer.write(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: route.gate.in_flight == 1)
        clients = []
        for i in range(600):
            s = socket.create_connection(("127.0.0.1", gw.port))
            s.setblocking(False)
            s.sendall(f"GET /q{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            clients.append(s)
        await wait_for(lambda: len(route.gate.waiters) == 600, timeout=10)
        for s in clients:
            s.close()  # RST
        answer.set()
        async with asyncio.timeout(5):
            head = await holder.reader.readuntil(b"\r\n\r\n")
            assert status_of(head) == 200 and await holder.reader.readexactly(3) == b"ok\n"
        await wait_for(lambda: (route.gate.in_flight, len(route.gate.waiters), route.upstream.active) == (0, 0, 0))
        assert route.stats.cancelled_queued + route.stats.cancelled_in_flight == 600
        head, body = await holder.get("/warm")
        assert status_of(head) == 200 and body == b"ok\n"
        newcomer = await Client.open(gw.port)
        head, body = await newcomer.get("/warm")
        assert status_of(head) == 200 and body == b"ok\n"
        holder.close()
        newcomer.close()
    finally:
        await relay.stop()


async def test_headers_remembered_per_connection_follow_each_request(start_gateway) -> None:
    """The header lines sent upstream are remembered per client connection and reused
    while the client repeats its headers: 1. four requests on one connection, the
    headers the same, then changed, then back 2. the upstream sees each request's own
    headers, byte for byte."""
    relay = await RawUpstream().start()
    try:
        gw = await start_gateway(route_to(relay.url))
        client = await Client.open(gw.port)
        sent = [b"X-A: 1\r\n", b"X-A: 1\r\n", b"X-A: 2\r\nX-Forwarded-For: 10.0.0.1\r\n", b"X-A: 1\r\n"]
        for i, extra in enumerate(sent):
            client.writer.write(b"GET /h%d HTTP/1.1\r\nHost: x\r\n%s\r\n" % (i, extra))
            async with asyncio.timeout(5):
                head = await client.reader.readuntil(b"\r\n\r\n")
                assert status_of(head) == 200 and await client.reader.readexactly(3) == b"ok\n"
        got = [[line for line in r.head.split(b"\r\n")[1:] if line] for r in relay.requests]
        assert got[0] == got[1] == got[3] == [b"Host: x", b"X-A: 1", b"X-Forwarded-For: 127.0.0.1",
                                              b"X-Forwarded-Proto: http", b"X-Forwarded-Host: x"]
        assert got[2] == [b"Host: x", b"X-A: 2", b"X-Forwarded-For: 10.0.0.1, 127.0.0.1",
                          b"X-Forwarded-Proto: http", b"X-Forwarded-Host: x"]
        client.close()
    finally:
        await relay.stop()
