"""WSGI applications (``interface = "wsgi"``) served in-process on a thread pool,
through the front door: the environ, Flask, bodies streaming both ways with
back-pressure, the iterable's close(), clients that leave, errors, admission."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import flask

from ..builders import route_toml, upstream_toml
from ..conftest import wait_for

CHUNK = 65536


def wsgi_route(handler: str, name: str = "app", threads: int = 4, **route: Any) -> str:
    return upstream_toml(name, handler=handler, interface="wsgi", threads=threads) \
        + route_toml(name, name, **route)


# -- applications ------------------------------------------------------------------------
def environ_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The environ's plain fields as JSON, and the body read through wsgi.input."""
    fields = {k: v for k, v in environ.items() if isinstance(v, (str, bool, int, tuple))}
    fields["body"] = environ["wsgi.input"].read().decode("latin-1")
    body = json.dumps(fields).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


def reader_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The body read line by line and in pieces, as wsgi.input allows: its digest."""
    stream = environ["wsgi.input"]
    digest = hashlib.sha256()
    first = stream.readline()
    digest.update(first)
    while True:
        piece = stream.read(1000)
        if not piece:
            break
        digest.update(piece)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [digest.hexdigest().encode()]


def lines_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The body's lines, by readlines(hint) first then iteration: their count and lengths."""
    stream = environ["wsgi.input"]
    lines = stream.readlines(10)
    lines += list(stream)
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps([len(line) for line in lines]).encode()]


flask_app = flask.Flask(__name__)


@flask_app.get("/items/<int:n>")
def flask_item(n: int) -> Any:
    return {"item": n, "q": flask.request.args.get("q"), "agent": flask.request.headers.get("X-Agent")}


@flask_app.get("/stream")
def flask_stream() -> Any:
    def parts() -> Iterator[str]:
        for i in range(5):
            yield f"part {i}\n"
    return flask.Response(parts(), mimetype="text/plain")


@flask_app.post("/upload")
def flask_upload() -> Any:
    data = flask.request.get_data()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# what the recording applications saw, by the request's X-Id
CLOSED: dict[str, str] = {}
PRODUCED: dict[str, int] = {}
ENTERED: list[str] = []
RELEASE = threading.Event()


class Recorded:
    """An iterable whose close() is recorded; ``mode``: how its iteration ends."""

    def __init__(self, key: str, mode: str, interval: float = 0.0, size: int = 0) -> None:
        self.key, self.mode, self.interval, self.size = key, mode, interval, size
        PRODUCED[key] = 0

    def __iter__(self) -> Iterator[bytes]:
        if self.mode == "ok":
            yield b"one "
            yield b"two"
        elif self.mode == "error":
            raise RuntimeError("failed before the first chunk")
        elif self.mode == "error_late":
            yield b"x" * 100
            raise RuntimeError("failed after the head")
        else:  # "slow" (a chunk each interval) or "big" (size bytes, as fast as taken)
            chunk = b"x" * CHUNK
            end = time.monotonic() + 30
            while time.monotonic() < end and PRODUCED[self.key] * CHUNK < (self.size or 1 << 40):
                PRODUCED[self.key] += 1
                yield chunk
                if self.interval:
                    time.sleep(self.interval)

    def close(self) -> None:
        CLOSED[self.key] = self.mode


def recording_app(environ: dict[str, Any], start_response: Any) -> Recorded:
    key = environ["HTTP_X_ID"]
    mode = environ["QUERY_STRING"]
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return Recorded(key, mode, interval=0.02 if mode == "slow" else 0.0,
                    size=50 * 1024 * 1024 if mode == "big" else 0)


def blocking_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Waits for RELEASE (at most 10 s), recording that it began."""
    ENTERED.append(threading.current_thread().name)
    RELEASE.wait(10)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"done"]


READ_ERRORS: list[str] = []


def swallowing_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Reads the whole body; an error reading it is recorded, and the answer is 200."""
    try:
        environ["wsgi.input"].read()
    except Exception as exc:
        READ_ERRORS.append(type(exc).__name__)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


CLOSE_GATE = threading.Event()


class SlowClose:
    """Six bytes under their Content-Length; close() waits for CLOSE_GATE (at most 5 s)."""

    def __iter__(self) -> Iterator[bytes]:
        yield b"abc"
        yield b"def"

    def close(self) -> None:
        CLOSE_GATE.wait(5)
        CLOSED["slow-close"] = "closed"


def slow_close_app(environ: dict[str, Any], start_response: Any) -> SlowClose:
    start_response("200 OK", [("Content-Length", "6")])
    return SlowClose()


def failing_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    if environ["PATH_INFO"] == "/silent":
        return [b"no start_response"]
    if environ["PATH_INFO"] == "/exit":
        raise SystemExit(3)
    if environ["PATH_INFO"] == "/errors":
        environ["wsgi.errors"].write("something to say\n")
        environ["wsgi.errors"].flush()
        start_response("204 No Content", [])
        return []
    raise ValueError("the application broke")


def framing_app(environ: dict[str, Any], start_response: Any) -> Any:
    path = environ["PATH_INFO"]
    if path == "/204":
        start_response("204 No Content", [])
        return [b""]
    if path == "/write":  # the legacy write callable, then the iterable
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        return iter([b"then ", b"iterated"])
    if path == "/length":  # the application's Content-Length, a generator
        start_response("200 OK", [("Content-Length", "6")])
        return iter([b"abc", b"def"])
    if path == "/latin1":
        start_response("200 OK", [("X-Name", "caf\xe9")])
        return [b"ok"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return iter([b"chunk1 ", b"chunk2"])


# -- tests ---------------------------------------------------------------------------------
async def test_hello_wsgi(start_gateway):
    """1. route to gatewayd.handlers:hello_wsgi 2. GET 3. 200, its text, a Content-Length."""
    gw = await start_gateway(wsgi_route("gatewayd.handlers:hello_wsgi"))
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(len(await r.read()))
        assert "Transfer-Encoding" not in r.headers


async def test_flask_routes_stream_and_upload(start_gateway):
    """1. a Flask app; request_buffer_size 64 KiB so a 5 MiB upload streams 2. a JSON
    route with args and a header, a generator response, the upload, a 404 3. each as
    Flask means it; the upload arrives whole (its digest), the stream chunked."""
    gw = await start_gateway(wsgi_route("tests.upstreams.test_wsgi:flask_app", path_prefix="/"),
                             request_buffer_size=65536)
    upload = bytes(range(256)) * (5 * 4096)
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/items/7?q=abc", headers={"X-Agent": "t"}) as r:
            assert r.status == 200
            assert await r.json() == {"item": 7, "q": "abc", "agent": "t"}
        async with s.get(gw.url + "/stream") as r:
            assert r.status == 200 and r.headers["Transfer-Encoding"] == "chunked"
            assert await r.text() == "".join(f"part {i}\n" for i in range(5))
        async with s.post(gw.url + "/upload", data=io.BytesIO(upload)) as r:
            assert r.status == 200
            assert await r.json() == {"size": len(upload), "sha256": hashlib.sha256(upload).hexdigest()}
        async with s.get(gw.url + "/nothing-here") as r:
            assert r.status == 404
            await r.read()


async def test_environ_fields(start_gateway):
    """1. a route /app with strip_prefix to an app that returns its environ 2. a POST with
    an escaped path, a query, custom headers (one with an underscore) 3. PEP 3333's
    fields: SCRIPT_NAME the prefix, PATH_INFO decoded, REMOTE_ADDR/PORT the client,
    HTTP_* (no underscore name), CONTENT_*, the wsgi.* flags."""
    gw = await start_gateway(wsgi_route("tests.upstreams.test_wsgi:environ_app",
                                        path_prefix="/app", strip_prefix=True))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        port = writer.get_extra_info("sockname")[1]
        writer.write(b"POST /app/a%20b/c?x=1&y=%41 HTTP/1.1\r\nHost: example.test\r\n"
                     b"X-Custom: one\r\nX-Custom: two\r\nX_Sneaky: no\r\n"
                     b"Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    env = json.loads(body)
    assert env["SCRIPT_NAME"] == "/app"
    assert env["PATH_INFO"] == "/a b/c"
    assert env["QUERY_STRING"] == "x=1&y=%41"
    assert env["REQUEST_METHOD"] == "POST"
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"] == str(port)
    assert env["SERVER_NAME"] == "127.0.0.1" and env["SERVER_PORT"] == str(gw.port)
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["HTTP_HOST"] == "example.test"
    assert env["HTTP_X_CUSTOM"] == "one, two"
    assert not any("SNEAKY" in k for k in env)
    assert env["CONTENT_TYPE"] == "text/plain" and env["CONTENT_LENGTH"] == "5"
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.multithread"] is True and env["wsgi.multiprocess"] is False
    assert env["wsgi.run_once"] is False and env["wsgi.input_terminated"] is True
    assert env["body"] == "hello"


async def test_chunked_request_bodies(start_gateway):
    """1. an app reading wsgi.input by readline and read(n), one by readlines and
    iteration 2. chunked uploads: small (buffered before admission) and 1 MiB over a
    64 KiB buffer (streamed) 3. each digest, and the lines, are the body's."""
    gw = await start_gateway(wsgi_route("tests.upstreams.test_wsgi:reader_app", path_prefix="/")
                             + wsgi_route("tests.upstreams.test_wsgi:lines_app", name="lines",
                                          path_prefix="/lines"), request_buffer_size=65536)

    async def chunked(data: bytes) -> Any:
        for i in range(0, len(data), 10000):
            yield data[i:i + 10000]

    async with aiohttp.ClientSession() as s:
        for data in (b"first line\nand the rest", b"line\n" + bytes(range(256)) * 4096):
            async with s.post(gw.url + "/", data=chunked(data)) as r:
                assert r.status == 200
                assert (await r.text()) == hashlib.sha256(data).hexdigest()
    text = b"".join(b"%d\n" % (10 ** (i % 7)) for i in range(20000)) + b"no newline at the end"
    async with aiohttp.ClientSession() as s, s.post(gw.url + "/lines", data=chunked(text)) as r:
        gw_lines = await r.json()
    lines = [len(line) for line in text.splitlines(keepends=True)]
    assert gw_lines == lines


async def test_response_framing(start_gateway):
    """1. an app answering with a generator, its own Content-Length, the write callable,
    a 204, a latin-1 header, and HEAD 2. each request 3. chunked where the length is
    unknown, the app's length kept, write's bytes before the iterable's, no body for
    204 and HEAD, the header's bytes as latin-1."""
    gw = await start_gateway(wsgi_route("tests.upstreams.test_wsgi:framing_app"))
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/") as r:
            assert r.headers["Transfer-Encoding"] == "chunked" and await r.read() == b"chunk1 chunk2"
        async with s.get(gw.url + "/length") as r:
            assert r.headers["Content-Length"] == "6" and await r.read() == b"abcdef"
        async with s.get(gw.url + "/write") as r:
            assert await r.read() == b"written then iterated"
        async with s.get(gw.url + "/204") as r:
            assert r.status == 204 and await r.read() == b""
        async with s.head(gw.url + "/length") as r:
            assert r.status == 200 and r.headers["Content-Length"] == "6"
        async with s.get(gw.url + "/latin1") as r:
            assert r.raw_headers[0] == (b"X-Name", b"caf\xe9")


async def test_close_is_called_on_success_error_and_client_gone(start_gateway):
    """1. an app whose iterable records close() 2. a response in full, one that fails
    before its first chunk, one that fails after it, one whose client leaves mid-body
    3. close() called each time; 500 handler_error for the early failure, the
    connection cut for the late one."""
    gw = await start_gateway(wsgi_route("tests.upstreams.test_wsgi:recording_app"))
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/?ok", headers={"X-Id": "c-ok"}) as r:
            assert await r.read() == b"one two"
        async with s.get(gw.url + "/?error", headers={"X-Id": "c-error"}) as r:
            assert r.status == 500 and r.headers["X-Gatewayd-Reason"] == "handler_error"
        async with s.get(gw.url + "/?error_late", headers={"X-Id": "c-late"}) as r:
            assert r.status == 200
            try:
                await r.read()
                raise AssertionError("the body should have been cut")
            except aiohttp.ClientPayloadError:
                pass
        async with s.get(gw.url + "/?slow", headers={"X-Id": "c-gone"}) as r:
            await r.content.readexactly(CHUNK)
            r.close()
    await wait_for(lambda: "c-gone" in CLOSED)
    assert CLOSED == {**CLOSED, "c-ok": "ok", "c-error": "error", "c-late": "error_late", "c-gone": "slow"}


async def test_client_leaving_frees_the_thread_and_the_slot(start_gateway):
    """1. threads = 1, max_concurrency = 1, an app streaming a chunk every 20 ms 2. a
    client reads one chunk and leaves 3. close() is called within about one chunk's
    interval, and the next request (needing that thread and that slot) is served."""
    gw = await start_gateway(wsgi_route("tests.upstreams.test_wsgi:recording_app", threads=1,
                                        max_concurrency=1, max_queue=10))
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/?slow", headers={"X-Id": "g-1"}) as r:
            await r.content.readexactly(CHUNK)
            r.close()
            left = time.monotonic()
        await wait_for(lambda: "g-1" in CLOSED, timeout=5)
        freed = time.monotonic() - left
        async with s.get(gw.url + "/?ok", headers={"X-Id": "g-2"}) as r:
            assert r.status == 200 and await r.read() == b"one two"
    print(f"client gone -> close() called in {freed * 1000:.1f} ms")
    assert freed < 0.5, freed  # one chunk interval (20 ms) plus the loop's hops
    route = gw.runtime.table.routes["app"]
    await wait_for(lambda: route.gate.in_flight == 0)
    assert route.stats.cancelled_in_flight == 1


async def test_back_pressure_holds_the_generator(start_gateway):
    """1. an app whose generator would yield 50 MiB in 64 KiB chunks 2. a client reads
    the head and stops reading (a small receive buffer) 3. the generator stalls far
    short of its end: what it produced is what the socket buffers hold (a few MiB),
    then the client leaves and close() is called."""
    gw = await start_gateway(wsgi_route("tests.upstreams.test_wsgi:recording_app"))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", gw.port))
    try:
        await loop.sock_sendall(sock, b"GET /?big HTTP/1.1\r\nHost: x\r\nX-Id: bp\r\n\r\n")
        first = await loop.sock_recv(sock, 4096)
        assert first.startswith(b"HTTP/1.1 200")
        # stalled: the count no longer grows for 300 ms
        seen: list[tuple[int, float]] = []

        def stalled() -> bool:
            now = time.monotonic()
            if not seen or seen[-1][0] != PRODUCED["bp"]:
                seen.append((PRODUCED["bp"], now))
                return False
            return now - seen[-1][1] > 0.3

        await wait_for(stalled, timeout=10)
        produced = PRODUCED["bp"]
        assert produced < 200, produced  # of 800: under 12.5 MiB
        assert "bp" not in CLOSED
    finally:
        sock.close()
    await wait_for(lambda: "bp" in CLOSED)
    print(f"back-pressure: the generator stalled at {produced} chunks of 64 KiB")


async def test_errors_are_500_handler_error_and_logged(start_gateway, caplog):
    """1. an app that raises, one that returns without calling start_response, one that
    calls sys.exit 2. GET each 3. 500 handler_error, each logged with its traceback
    (and the gateway goes on); what an app writes to wsgi.errors is logged too."""
    gw = await start_gateway(wsgi_route("tests.upstreams.test_wsgi:failing_app"))
    with caplog.at_level(logging.ERROR, logger="gatewayd"):
        async with aiohttp.ClientSession() as s:
            for path in ("/raise", "/silent", "/exit"):
                async with s.get(gw.url + path) as r:
                    assert r.status == 500 and r.headers["X-Gatewayd-Reason"] == "handler_error"
    records = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert any("the application broke" in str(r.exc_info[1]) for r in records)
    assert any("start_response" in str(r.exc_info[1]) for r in records)
    assert any(isinstance(r.exc_info[1], SystemExit) for r in records)
    with caplog.at_level(logging.WARNING, logger="gatewayd"):
        async with aiohttp.ClientSession() as s, s.get(gw.url + "/errors") as r:
            assert r.status == 204
    assert any(r.getMessage() == "upstreams.app: wsgi.errors: something to say" for r in caplog.records)


async def test_admission_queues_in_the_gateway_not_the_pool(start_gateway):
    """1. threads = 2, max_concurrency = 2, an app that blocks until released 2. three
    requests 3. two run in the two threads, the third waits in the gateway's queue
    (the snapshot shows it queued) holding no thread; released, all three are
    served."""
    ENTERED.clear()
    RELEASE.clear()
    gw = await start_gateway(wsgi_route("tests.upstreams.test_wsgi:blocking_app", name="adm", threads=2,
                                        max_concurrency=2, max_queue=5))
    try:
        async with aiohttp.ClientSession() as s:
            async def get() -> int:
                async with s.get(gw.url + "/") as r:
                    await r.read()
                    return r.status

            tasks = [asyncio.create_task(get()) for _ in range(3)]
            await wait_for(lambda: len(ENTERED) == 2)
            snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
            route = next(r for r in snap["routes"] if r["name"] == "adm")
            assert route["in_flight"] == 2 and route["queued"] == 1
            threads = [t for t in threading.enumerate() if t.name.startswith("gatewayd-wsgi-adm-")]
            assert len(threads) == 2
            assert sorted(ENTERED) == sorted(t.name for t in threads)  # both busy, none for the third
            RELEASE.set()
            assert await asyncio.gather(*tasks) == [200, 200, 200]
            assert len(ENTERED) == 3
    finally:
        RELEASE.set()


async def test_a_streamed_body_over_max_body_size_is_413(start_gateway):
    """1. max_body_size 2 MiB, a 64 KiB buffer, an app that reads the whole body and
    answers 200 even when its read fails 2. a chunked upload of 4 MiB (it streams: its
    size is unknown at admission) 3. the app's read raised the body's error in its
    thread, and the client gets the gateway's 413 body_too_large, not the app's 200."""
    gw = await start_gateway(wsgi_route("tests.upstreams.test_wsgi:swallowing_app"),
                             request_buffer_size=65536, max_body_size=2 * 1024 * 1024)

    async def chunked() -> Any:
        for _ in range(64):
            yield b"y" * CHUNK

    READ_ERRORS.clear()
    async with aiohttp.ClientSession() as s, s.post(gw.url + "/", data=chunked()) as r:
        assert r.status == 413 and r.headers["X-Gatewayd-Reason"] == "body_too_large"
    assert READ_ERRORS == ["BodyTooLarge"]

def port_of(gp: Any) -> int:
    return int(gp.config_path.read_text().split("127.0.0.1:")[1].split('"')[0])


async def test_workers_make_wsgi_multiprocess_true(gateway_process):
    """1. gatewayd with workers = 2 (a subprocess) and the environ app 2. GET 3.
    wsgi.multiprocess is True (False with one process: test_environ_fields)."""
    gp = gateway_process(wsgi_route("tests.upstreams.test_wsgi:environ_app"), workers=2)
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port_of(gp)}/") as r:
        assert r.status == 200
        env = await r.json()
    assert env["wsgi.multiprocess"] is True and env["wsgi.multithread"] is True


async def test_a_stuck_thread_does_not_hold_the_stop(gateway_process):
    """1. gatewayd (a subprocess, shutdown_timeout 1 s) with an app that blocks for 10 s
    2. a request enters it, then SIGTERM 3. gatewayd exits 0 well before the app would
    return: the drain's timeout cuts the client, the serving task stops waiting for
    the thread on the second cancellation, and the pool's threads are daemons."""
    gp = gateway_process(wsgi_route("tests.upstreams.test_wsgi:blocking_app"), shutdown_timeout=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gp))
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await wait_for(lambda: gp.command({"cmd": "snapshot"})["snapshot"]["routes"][0]["in_flight"] == 1)
        began = time.monotonic()
        gp.signal(15)
        assert await asyncio.get_running_loop().run_in_executor(None, gp.wait, 15) == 0
        stopped = time.monotonic() - began
        assert stopped < 8, stopped
        print(f"stopped in {stopped:.2f} s with a thread stuck")
    finally:
        writer.close()


async def test_a_blocked_thread_keeps_its_slot_after_its_client_left(start_gateway):
    """1. threads = 1, max_concurrency = 1, an app that blocks without reading or
    writing 2. its client leaves; a second request comes 3. the first keeps the slot
    while its thread is busy (the second is queued in the gateway, not in the pool);
    released, the thread is free and the second is served."""
    ENTERED.clear()
    RELEASE.clear()
    gw = await start_gateway(wsgi_route("tests.upstreams.test_wsgi:blocking_app", threads=1,
                                        max_concurrency=1, max_queue=5))
    route = gw.runtime.table.routes["app"]
    second = None
    try:
        async with aiohttp.ClientSession() as s:
            first = asyncio.create_task(s.get(gw.url + "/"))
            await wait_for(lambda: len(ENTERED) == 1)
            first.cancel()  # the client leaves
            await wait_for(lambda: gw.runtime.connections == 0)
            second = asyncio.create_task(s.get(gw.url + "/"))
            await wait_for(lambda: len(route.gate.waiters) == 1)
            assert route.gate.in_flight == 1 and len(ENTERED) == 1
            RELEASE.set()
            async with await second as r:
                assert r.status == 200 and await r.read() == b"done"
        assert route.stats.cancelled_in_flight == 1  # counted once its thread was free
    finally:
        RELEASE.set()
        if second is not None and not second.done():
            second.cancel()


async def test_a_client_that_closes_after_the_whole_response_was_served(start_gateway):
    """1. an app answering 6 bytes under its Content-Length whose close() is slow 2. the
    client reads the 6 bytes and closes while close() still runs 3. the thread is
    waited for (the slot held), and the request counts as served, not cancelled."""
    CLOSE_GATE.clear()
    CLOSED.pop("slow-close", None)
    gw = await start_gateway(wsgi_route("tests.upstreams.test_wsgi:slow_close_app"))
    route = gw.runtime.table.routes["app"]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"Content-Length: 6" in head
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"abcdef"
        writer.close()
        await wait_for(lambda: gw.runtime.connections == 0)
        assert route.gate.in_flight == 1  # the thread is still in close()
    finally:
        CLOSE_GATE.set()
    await wait_for(lambda: route.gate.in_flight == 0)
    assert CLOSED["slow-close"] == "closed"
    assert route.stats.cancelled_in_flight == 0


async def test_a_reload_replaces_the_pool_after_its_last_request(start_gateway):
    """1. threads = 2, a request blocked in the app 2. a reload to threads = 3 3. the new
    pool serves at once; the old pool's threads end once the blocked request is done
    (the old upstream's close after its last request)."""
    ENTERED.clear()
    RELEASE.clear()
    gw = await start_gateway(wsgi_route("tests.upstreams.test_wsgi:blocking_app", name="rl", threads=2))

    def pool_threads() -> int:
        return sum(t.name.startswith("gatewayd-wsgi-rl-") for t in threading.enumerate())

    assert pool_threads() == 2
    try:
        async with aiohttp.ClientSession() as s:
            first = asyncio.create_task(s.get(gw.url + "/"))
            await wait_for(lambda: len(ENTERED) == 1)
            gw.config_path.write_text(gw.config_path.read_text().replace("threads = 2", "threads = 3"))
            assert (await gw.command({"cmd": "reload"}))["ok"]
            assert pool_threads() == 5
            RELEASE.set()
            async with await first as r:
                assert r.status == 200
        await wait_for(lambda: pool_threads() == 3)
    finally:
        RELEASE.set()


async def test_a_client_that_leaves_mid_upload_unblocks_the_reading_thread(start_gateway):
    """1. an app reading a streamed body (1 MiB declared, over a 64 KiB buffer) 2. the
    client sends 100 KiB and leaves 3. the app's read raises ConnectionResetError in
    its thread at once, and the slot is released, counted cancelled."""
    READ_ERRORS.clear()
    gw = await start_gateway(wsgi_route("tests.upstreams.test_wsgi:swallowing_app"), request_buffer_size=65536)
    route = gw.runtime.table.routes["app"]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n" + b"z" * 102400)
    await writer.drain()
    await wait_for(lambda: route.gate.in_flight == 1)
    writer.close()
    left = time.monotonic()
    await wait_for(lambda: READ_ERRORS, timeout=5)
    unblocked = time.monotonic() - left
    assert READ_ERRORS == ["ConnectionResetError"]
    await wait_for(lambda: route.gate.in_flight == 0 and route.stats.cancelled_in_flight == 1)
    assert unblocked < 0.5, unblocked
