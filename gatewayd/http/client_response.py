"""A response from an upstream whose head is in; its body is read from the
connection, which goes back to its pool once the body is handed over."""

from __future__ import annotations

import asyncio

from .client_connection import BUSY, ClientConnection
from .errors import UpstreamFailure
from .headers import split_fields

SMALL_BODY = 65536  # bytes of a body taken whole (read_small) when it is already here


class Response:
    """A response whose head is in; its body is read from the connection."""

    __slots__ = ("_conn", "_headers", "complete", "fields", "keep_alive", "reason", "status")

    def __init__(self, conn: ClientConnection) -> None:
        self._conn: ClientConnection | None = conn
        self.complete = False  # the whole body was handed over (the last chunk can go out with the EOF)
        self.status: int = conn._status
        self.reason: str = conn._reason
        self.fields: bytes = conn._fields  # the header lines as received, CRLF between them
        self._headers: list[tuple[str, str]] | None = None
        self.keep_alive: bool = conn._keep_alive

    @property
    def headers(self) -> list[tuple[str, str]]:
        """(name, value) pairs in the upstream's order, duplicates kept."""
        if self._headers is None:
            self._headers = split_fields(self.fields)
        return self._headers

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet read (bounded by the pool's ``read_buffer`` plus one socket read)."""
        conn = self._conn
        return conn._buffered if conn is not None else 0

    def read_small(self, limit: int = SMALL_BODY) -> bytes | None:
        """The whole body if it is already here and at most ``limit`` bytes (the connection
        is then released), else None: stream it instead. No await: the common small
        response costs nothing more."""
        conn = self._conn
        if conn is None:
            return b""
        if not conn._done or conn._buffered > limit:
            return None
        self._conn = None
        self.complete = True
        return conn._take()

    async def read_chunk(self) -> bytes:
        """The next body bytes (all that is buffered), or b"" at the end. Raises
        UpstreamFailure when the upstream fails mid-body (or the request body's error)."""
        conn = self._conn
        if conn is None:
            return b""
        try:
            while True:
                if conn._done:  # the last bytes, if any: release now, the next call returns b""
                    self._conn = None
                    self.complete = True
                    return conn._take()
                if conn._buf:
                    return conn._take()
                exc = conn._exc
                if exc is not None:
                    if isinstance(exc, UpstreamFailure):
                        conn._pool.stats.fail(exc.reason)  # after the head: request() did not see it
                    raise exc
                conn._waiter = conn._loop.create_future()
                await conn._waiter
        except BaseException:
            self.close()
            raise

    async def read(self) -> bytes:
        """The whole body (unbounded: for tests and bodies known to be small)."""
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def body(self) -> Response:
        """``async for chunk in resp.body()``: the same as iterating the response."""
        return self

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read_chunk()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    def detach(self) -> tuple[asyncio.Transport, bytes] | None:
        """After a 101 to an upgrade request (``H1Pool.request(upgrade=True)``): the
        connection's transport, out of the pool for good and its reading paused, and
        the bytes the upstream sent after the 101's head. None when the 101 did not
        switch (a 101 without Upgrade, or the connection lost): the caller closes it."""
        conn = self._conn
        if conn is None or not conn._upgrading or conn._garbage or conn._state != BUSY:
            return None
        self._conn = None
        return conn.detach()

    def close(self) -> None:
        """Done with this response: the connection is reused if the body was read in full
        and keep-alive allows it, otherwise closed at once. Idempotent."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if conn._done and not conn._buf and conn._state == BUSY:
            self.complete = True
            conn._take()  # nothing left to take: it ends the exchange
        else:
            conn._close()

    release = close
