"""Raw TCP test upstreams: a relay that records the exact bytes each connection
delivered (to prove what did or did not reach an upstream), and fault-injecting
upstreams (reset, hang, garbage, truncation, random closes).

Plain asyncio sockets, no HTTP library: the upstream sees precisely what the
gateway wrote, and can misbehave in ways no real server would.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
OK_HEAD = OK_RESPONSE[:-3]


class Unparseable(Exception):
    """The bytes an upstream received are not one clean HTTP/1.1 request."""


@dataclass
class UpstreamRequest:
    """One request as the upstream received it: the head's bytes and the decoded body."""

    head: bytes
    body: bytes
    raw: bytes  # the request's bytes on the wire, head and (chunked) body

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def headers(self) -> list[tuple[str, str]]:
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            if not line:
                continue
            name, _, value = line.partition(b":")
            out.append((name.decode("latin-1").lower(), value.strip().decode("latin-1")))
        return out

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]


@dataclass
class Connection:
    """Everything that arrived on one upstream connection."""

    raw: bytearray = field(default_factory=bytearray)
    requests: list[UpstreamRequest] = field(default_factory=list)
    error: str | None = None  # set when the bytes did not parse as clean requests
    closed: bool = False


async def read_request(reader: asyncio.StreamReader, conn: Connection) -> UpstreamRequest | None:
    """Read one request strictly (CRLF lines, one framing, hex chunk sizes); None at a clean EOF.

    Anything a strict HTTP/1.1 server would refuse raises Unparseable: an upstream
    must never be handed an ambiguous message.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        conn.raw += exc.partial
        if exc.partial:
            raise Unparseable(f"truncated head {exc.partial[:80]!r}") from None
        return None
    conn.raw += head
    raw = bytearray(head)
    lines = head[:-4].split(b"\r\n")
    if any(b"\n" in line or b"\r" in line or b"\0" in line for line in lines):
        raise Unparseable("bare CR/LF/NUL in the head")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1":
        raise Unparseable(f"bad request line {lines[0]!r}")
    lengths: list[bytes] = []
    encodings: list[bytes] = []
    hosts = 0
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise Unparseable(f"bad header line {line!r}")
        lname = name.lower()
        if lname == b"content-length":
            lengths.append(value.strip())
        elif lname == b"transfer-encoding":
            encodings.append(value.strip())
        elif lname == b"host":
            hosts += 1
    if hosts != 1:
        raise Unparseable(f"{hosts} Host headers")
    if lengths and encodings:
        raise Unparseable("both Content-Length and Transfer-Encoding")
    if len(lengths) > 1 or len(encodings) > 1:
        raise Unparseable("repeated framing header")
    body = bytearray()
    if encodings:
        if encodings[0] != b"chunked":
            raise Unparseable(f"Transfer-Encoding {encodings[0]!r}")
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size_text = size_line[:-2]
            if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
                raise Unparseable(f"bad chunk size {size_line!r}")
            size = int(size_text, 16)
            data = await reader.readexactly(size + 2)
            raw += data
            if data[-2:] != b"\r\n":
                raise Unparseable("chunk not followed by CRLF")
            if size == 0:
                break
            body += data[:-2]
    elif lengths:
        if not lengths[0].isdigit():
            raise Unparseable(f"bad Content-Length {lengths[0]!r}")
        data = await reader.readexactly(int(lengths[0]))
        raw += data
        body += data
    conn.raw += raw[len(head):]
    return UpstreamRequest(bytes(head), bytes(body), bytes(raw))


Respond = Callable[[UpstreamRequest, asyncio.StreamReader, asyncio.StreamWriter, "RawUpstream"],
                   Awaitable[bool]]


async def answer_ok(req: UpstreamRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up: RawUpstream) -> bool:
    """The relay's default: a fixed valid response, connection kept open."""
    writer.write(OK_HEAD if req.request_line.startswith("HEAD ") else OK_RESPONSE)
    await writer.drain()
    return True


class RawUpstream:
    """A raw asyncio TCP server recording every connection's bytes and requests.

    ``respond(req, reader, writer, upstream)`` answers each parsed request and
    returns whether to keep the connection open; the default answers 200 ``ok``.
    """

    def __init__(self, respond: Respond = answer_ok) -> None:
        self.respond = respond
        self.connections: list[Connection] = []
        self.open = 0
        self.sent = 0  # response body bytes written (big_response)
        self.port = 0
        self.url = ""
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def requests(self) -> list[UpstreamRequest]:
        return [r for c in self.connections for r in c.requests]

    @property
    def errors(self) -> list[str]:
        return [c.error for c in self.connections if c.error]

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c.raw) for c in self.connections)

    async def start(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        conn = Connection()
        self.connections.append(conn)
        self.open += 1
        try:
            while True:
                try:
                    req = await read_request(reader, conn)
                except Unparseable as exc:
                    conn.error = str(exc)
                    conn.raw += await _drain(reader)
                    return
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                    conn.error = f"incomplete request: {exc!r}"
                    return
                if req is None:
                    return
                conn.requests.append(req)
                if not await self.respond(req, reader, writer, self):
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            conn.closed = True
            self.open -= 1
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()


async def _drain(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(65536), 0.2)
    except (TimeoutError, ConnectionError):
        return b""


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# ----------------------------------------------------------------------------- faults
async def reset_before_head(req, reader, writer, up) -> bool:
    reset(writer)
    return False


# The faults after the head wait this long first, so that the gateway has passed
# the head on to its client: what follows can only cut the response short.
HEAD_LEAD = 0.3


async def reset_mid_body(req, reader, writer, up) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 10000)
    await writer.drain()
    await asyncio.sleep(HEAD_LEAD)
    reset(writer)
    return False


async def hang(req, reader, writer, up) -> bool:
    """Never answer; notice only when the gateway gives up and closes."""
    while await reader.read(65536):
        pass
    return False


async def invalid_status_line(req, reader, writer, up) -> bool:
    writer.write(b"HTTP/1.1 2OO Fine\r\nContent-Length: 3\r\n\r\nok\n")
    await writer.drain()
    return False


async def not_http(req, reader, writer, up) -> bool:
    writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    await writer.drain()
    return False


async def ambiguous_framing(req, reader, writer, up) -> bool:
    """Content-Length and Transfer-Encoding together: a response smuggling shape."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
    await writer.drain()
    return False


async def oversized_headers(req, reader, writer, up) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nX-Huge: " + b"a" * 20000 + b"\r\nContent-Length: 3\r\n\r\nok\n")
    await writer.drain()
    return False


async def too_many_headers(req, reader, writer, up) -> bool:
    extra = b"".join(b"X-H%d: v\r\n" % i for i in range(300))
    writer.write(b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: 3\r\n\r\nok\n")
    await writer.drain()
    return False


async def short_body(req, reader, writer, up) -> bool:
    """Content-Length says 100 000, 1 000 bytes come, then a clean FIN."""
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"y" * 1000)
    await writer.drain()
    await asyncio.sleep(HEAD_LEAD)
    return False


async def bad_chunked_body(req, reader, writer, up) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    await asyncio.sleep(HEAD_LEAD)
    writer.write(b"zz\r\nhello\r\n")  # not a chunk size
    await writer.drain()
    await asyncio.sleep(HEAD_LEAD)
    return False


def random_close(seed: int, p: float = 0.5) -> Respond:
    """A valid keep-alive response, after which the connection is closed with
    probability ``p`` (without a ``Connection: close`` announcing it)."""
    rng = random.Random(seed)

    async def respond(req, reader, writer, up) -> bool:
        writer.write(OK_RESPONSE)
        await writer.drain()
        return rng.random() >= p

    return respond


def big_response(size: int, chunk: int = 65536) -> Respond:
    """A response of ``size`` bytes, written as fast as the socket takes them; the
    bytes the upstream managed to write are counted in ``upstream.sent``."""

    async def respond(req, reader, writer, up) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"z" * chunk
        left = size
        while left > 0:
            n = min(left, chunk)
            writer.write(block[:n])
            await writer.drain()
            left -= n
            up.sent += n
        return True

    return respond


async def echo_request_line(req, reader, writer, up) -> bool:
    """Answer with the request line and the body's length, to check order and framing."""
    body = f"{req.request_line} {len(req.body)}\n".encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    return True


class ThreadedUpstream:
    """A RawUpstream on its own event loop in a thread, for synchronous tests
    (hypothesis drives those) talking to a gateway subprocess."""

    def __init__(self, respond: Respond = answer_ok) -> None:
        self.upstream = RawUpstream(respond)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="upstream", daemon=True)

    def start(self) -> RawUpstream:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.upstream.start(), self._loop).result(5)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.upstream.stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
