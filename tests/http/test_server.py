"""The client protocol's own economies (gatewayd/http/server.py) keep every request
whole: a parser dropped from an idle connection, a partial head that must keep its
parser, and client reads put off to a later loop turn under a burst."""

from __future__ import annotations

import asyncio
import json

from gatewayd.http.server import PARSER_IDLE, READS_PER_TURN, SWEEP_INTERVAL

from ..builders import app_route
from ..conftest import raw_request, wait_for


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response with a Content-Length body: (status, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    length = next(int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:"))
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return int(lines[0].split()[1]), body


def only_connection(gw):
    (protocol,) = gw.runtime.server.connections
    return protocol


async def test_idle_connection_drops_its_parser_and_serves_again(start_gateway, upstream):
    """1. a keep-alive request is answered 2. idle for PARSER_IDLE, the connection's
    parser is dropped 3. the next request on it is parsed by a new one and answered."""
    gw = await start_gateway(app_route(upstream.url), keepalive_timeout=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        protocol = only_connection(gw)
        assert protocol._parser is not None
        await wait_for(lambda: protocol._parser is None, timeout=PARSER_IDLE + 3 * SWEEP_INTERVAL)
        writer.write(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        assert [r["target"] for r in upstream.requests] == ["/first", "/second"]
        assert protocol._parser is not None
    finally:
        writer.close()


async def test_partial_head_keeps_its_parser_while_idle(start_gateway, upstream):
    """1. a request and the first part of the next one arrive in one write 2. the
    first is answered and the connection sits idle for longer than PARSER_IDLE 3. the
    parser holding the partial head is kept 4. the rest of the head completes the
    second request, which is answered and forwarded as sent."""
    gw = await start_gateway(app_route(upstream.url), keepalive_timeout=60,
                             request_header_timeout=30)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHos")
        assert (await read_response(reader))[0] == 200
        server = gw.runtime.server
        protocol = only_connection(gw)
        start = server.sweeps
        sweeps = int(PARSER_IDLE / SWEEP_INTERVAL) + 2
        await wait_for(lambda: server.sweeps >= start + sweeps, timeout=(sweeps + 2) * SWEEP_INTERVAL)
        assert protocol._parser is not None
        writer.write(b"t: x\r\nX-Part: two\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        assert [r["target"] for r in upstream.requests] == ["/a", "/b"]
        assert ("X-Part", "two") in upstream.requests[1]["headers"]
    finally:
        writer.close()


async def test_burst_of_clients_is_answered_across_turns(start_gateway, upstream):
    """1. 8 x READS_PER_TURN clients send a request in the same loop turn 2. the
    reads beyond READS_PER_TURN are put off to later turns (counted) 3. every client
    gets its own answer: none lost, none mixed up."""
    gw = await start_gateway(app_route(upstream.url), keepalive_timeout=60)
    clients = 8 * READS_PER_TURN
    conns = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(clients)]
    server = gw.runtime.server
    await wait_for(lambda: len(server.connections) == clients)
    before = server.deferred_reads
    try:
        for i, (_, writer) in enumerate(conns):  # no await between writes: one turn
            writer.write(b"GET /echo?client=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        answers = await asyncio.gather(*(read_response(reader) for reader, _ in conns))
        for i, (status, body) in enumerate(answers):
            assert status == 200
            assert json.loads(body)["target"] == f"/echo?client={i}"
        assert server.deferred_reads > before
        snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
        assert snap["workers"][0]["deferred_reads"] == server.deferred_reads
    finally:
        for _, writer in conns:
            writer.close()


async def test_refused_requests_are_counted_in_the_snapshot(start_gateway, upstream):
    """1. a request the parser refuses (two Content-Lengths) gets 400 bad_request and
    its connection closes 2. the worker's bad_requests in the snapshot counts it 3. it
    never reached the upstream."""
    gw = await start_gateway(app_route(upstream.url))
    out = await raw_request(gw.port, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                                     b"Content-Length: 2\r\n\r\nab")
    assert out.startswith(b"HTTP/1.1 400 ") and b"X-Gatewayd-Reason: bad_request" in out
    snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
    assert snap["workers"][0]["bad_requests"] == 1
    assert upstream.requests == []


async def test_held_output_keeps_the_order_of_answers(start_gateway, upstream):
    """Answers are held until the end of the loop turn and written in one burst: 1. one
    write carries two proxied GETs, a HEAD and a request the gateway refuses at once
    (400) 2. the answers arrive in request order, the 400 last, whole 3. the
    connection closes after the 400 (nothing held is lost to the close)."""
    gw = await start_gateway(app_route(upstream.url), keepalive_timeout=60)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET /echo?n=1 HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /echo?n=2 HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"HEAD /echo?n=3 HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /x HTTP/1.1\r\nHost: a b\r\n\r\n")  # refused by the gateway: bad_host
        for n in (1, 2):
            status, body = await read_response(reader)
            assert status == 200 and json.loads(body)["target"] == f"/echo?n={n}"
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 "), head  # the HEAD: no body follows
        rest = await asyncio.wait_for(reader.read(), 5)  # the 400, then the close
        assert rest.startswith(b"HTTP/1.1 400 ") and b"X-Gatewayd-Reason: bad_host" in rest, rest
        assert rest.count(b"HTTP/1.1") == 1
    finally:
        writer.close()
