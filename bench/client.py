"""A minimal HTTP/1.1 client connection on a raw asyncio protocol.

Enough for the harness's own load (one request at a time per connection, no
pipelining): status line, Content-Length, chunked and close-delimited bodies,
``Connection: close``. Much cheaper per request than aiohttp's client, so one
core can offer several thousand requests per second.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import cast

REQUEST = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n"


class ConnectionClosed(Exception):
    pass


class Response:
    __slots__ = ("keep_alive", "status")

    def __init__(self, status: int, keep_alive: bool) -> None:
        self.status = status
        self.keep_alive = keep_alive


class Conn(asyncio.Protocol):
    """One connection; ``request`` sends and returns a future of the response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = b""
        self._future: asyncio.Future[Response] | None = None
        self._head: tuple[int, bool, int | None, bool] | None = None  # status, keep-alive, length, chunked

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Conn:
        """Connect (with ``tls``: and complete a TLS handshake, server name localhost)."""
        loop = asyncio.get_running_loop()
        if tls is None:
            _, proto = await loop.create_connection(cls, host, port)
        else:
            _, proto = await loop.create_connection(cls, host, port, ssl=tls, server_hostname="localhost")
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def request(self, path: bytes = b"/", headers: bytes = b"") -> asyncio.Future[Response]:
        """Send ``GET path`` (``headers``: more header lines, each ending in CRLF)."""
        assert self.transport is not None and self._future is None
        fut = self._future = asyncio.get_running_loop().create_future()
        if self.closed:
            fut.set_exception(ConnectionClosed())
            self._future = None
            return fut
        self.transport.write(REQUEST % (path, headers))
        return fut

    def close(self) -> None:
        """Close (FIN after what is queued), as a client giving up does."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- parsing --------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._parse()

    def _parse(self) -> None:
        buf = self._buf
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head = _parse_head(buf[:end])
            buf = self._buf = buf[end + 4:]
        status, keep_alive, length, chunked = self._head
        if length is not None:
            if len(buf) < length:
                return
            self._buf = buf[length:]
        elif chunked:
            used = _chunked_end(buf)
            if used < 0:
                return
            self._buf = buf[used:]
        elif status in (204, 304) or 100 <= status < 200:
            pass
        else:
            return  # read until close
        self._complete(Response(status, keep_alive))

    def _complete(self, response: Response) -> None:
        self._head = None
        fut, self._future = self._future, None
        if fut is not None and not fut.done():
            fut.set_result(response)
        if not response.keep_alive:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        head = self._head
        if head is not None and head[2] is None and not head[3]:
            self._complete(Response(head[0], False))  # a close-delimited body ended
            return
        fut, self._future = self._future, None
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionClosed())


def _parse_head(head: bytes) -> tuple[int, bool, int | None, bool]:
    lines = head.split(b"\r\n")
    first = lines[0].split(b" ", 2)
    status = int(first[1])
    keep_alive = first[0] == b"HTTP/1.1"
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value.endswith(b"chunked")
        elif name == b"connection":
            if b"close" in value:
                keep_alive = False
            elif b"keep-alive" in value:
                keep_alive = True
    if chunked:
        length = None
    return status, keep_alive, length, chunked


def _chunked_end(buf: bytes) -> int:
    """Bytes used by a complete chunked body at the start of ``buf``; -1 if incomplete."""
    pos = 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return -1
        size = int(buf[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)  # trailers end with an empty line
            return -1 if end < 0 else end + 4
        pos += size + 2
        if pos > len(buf):
            return -1
