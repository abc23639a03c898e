"""The client's request body: buffered before admission where it can be, streamed
where it cannot; size limit, rate guard, 100-continue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp.streams import StreamReader

if TYPE_CHECKING:
    from .bodymemory import BodyMemory
    from .server import Request

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BodyTooLarge(Exception):
    """The body passed ``max_body_size`` (413)."""


class BufferFull(Exception):
    """The gateway's buffer memory (``request_buffer_memory``) is full (503)."""


class BodyTimeout(TimeoutError):
    """The body arrived slower than the rate guard allows (408).

    A TimeoutError: it is left in the request's payload, where the connection's
    lingering read of an unread body meets it.
    """


class RequestBody:
    """The body of one request, read in up to two phases.

    ``fill`` reads it into memory before the request asks for a slot (request
    buffering, as nginx and HAProxy's ``http-buffer-request``): a slow upload then
    costs its connection and its bytes, never a slot or a queue place. A body too
    large to be buffered is read by ``chunks`` after admission, as it arrives.

    The rate guard, in both phases, is a credit of time: the body starts with
    ``timeout`` seconds, each byte adds ``1 / min_rate`` s, and the credit never
    exceeds ``timeout``; at zero the body is cut (408). So a body is judged by its
    rate over the last ``timeout`` seconds only: bytes sent early bank nothing for
    later (the old rule, ``start + timeout + received / min_rate``, let a body at
    600 B/s live for hours). One timer per phase, re-armed only when it fires early.
    """

    __slots__ = (
        "_deadline",
        "_expect",
        "_held",
        "_limit",
        "_loop",
        "_memory",
        "_min_rate",
        "_parts",
        "_pump",
        "_received",
        "_request",
        "_source",
        "_timeout",
        "_timer",
        "complete",
        "error",
    )

    def __init__(self, request: Request, limit: int, timeout: float, min_rate: int,
                 memory: BodyMemory | None = None) -> None:
        self._request = request
        self._source = request.content  # (as_stream may put another in its place for a handler)
        self._limit = limit
        self._timeout = timeout
        self._min_rate = min_rate
        self._memory = memory
        self._received = 0
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._expect = request.headers.get("Expect", "").lower() == "100-continue"
        self._parts: list[bytes] = []  # what fill read
        self._held = 0  # of it, the bytes counted in ``memory``
        self._pump: asyncio.Task[None] | None = None  # as_stream's, for a body that outgrew the buffer
        self.complete = False  # fill read the whole body: its length is known
        self.error: Exception | None = None
        self._loop = asyncio.get_running_loop()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def received(self) -> int:
        return self._received

    @property
    def length(self) -> int | None:
        """The length to forward: known once the whole body is buffered (so a chunked
        body goes upstream with a Content-Length), else as the client declared it."""
        if self.complete:
            return self._received
        return self._request.content_length

    # -- the rate guard ---------------------------------------------------------------
    def _arm(self) -> None:
        self._deadline = self._loop.time() + self._timeout
        self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def _got(self, n: int) -> None:
        # the credit grows by n / min_rate, capped at timeout (the deadline never moves back)
        deadline = self._deadline + n / self._min_rate
        cap = self._loop.time() + self._timeout
        self._deadline = deadline if deadline < cap else cap

    def _on_timer(self) -> None:
        deadline = self._deadline
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._timer = None
        self.error = BodyTimeout()
        self._source.set_exception(self.error)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def release(self) -> None:
        """Give the buffered bytes back to the buffer memory: they have been handed to
        the upstream (bodies are never replayed), or the exchange is over. Waiting for
        the end of the response instead let a client that reads its answer slowly hold
        its upload's bytes of ``request_buffer_memory`` for as long as it liked."""
        self._parts = []
        if self._held:
            assert self._memory is not None
            self._memory.give(self._held)
            self._held = 0

    def close(self) -> None:
        """The exchange is over: no timer, and the buffered bytes are given back."""
        self.cancel_timer()
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        self.release()

    def send_continue(self) -> None:
        """Answer ``Expect: 100-continue`` (once): the gateway starts reading the body."""
        if self._expect:
            self._expect = False
            self._request.write(CONTINUE)

    # -- phase one: before admission --------------------------------------------------
    async def fill(self, most: int) -> None:
        """Read the whole body into memory, counted in the gateway's buffer memory;
        raise BufferFull when that is full, BodyTooLarge, BodyTimeout, or what the
        connection raises when the client leaves or breaks the body's framing.

        A body (chunked: its size is unknown until its end) that grows past ``most``
        (``request_buffer_size``, or less when that is more than this worker's share
        of the memory) stops being read here and streams once admitted, what it read
        so far first: such a body could never fit, so a 503 would be one no retry
        can cure. A full memory, though, refuses the body rather than letting it
        stream: a body that streams holds a slot, and clients that filled the memory
        with slow bodies would then take the slots too, the attack buffering is there
        to stop; once they are gone a retry fits."""
        memory = self._memory
        assert memory is not None
        self.send_continue()
        self._arm()
        content = self._source
        parts = self._parts
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    self.complete = True
                    return
                n = len(chunk)
                self._received += n
                if self._received > self._limit:
                    self.error = BodyTooLarge()
                    raise self.error
                self._got(n)
                if self._received > most:
                    parts.append(chunk)  # not counted: it is forwarded as soon as admitted
                    return
                if not memory.take(n):
                    memory.refused += 1
                    raise BufferFull()
                parts.append(chunk)
                self._held += n
        finally:
            self.cancel_timer()

    def buffered(self) -> bytes:
        """The whole buffered body (``complete``), as one object."""
        parts = self._parts
        if len(parts) != 1:
            parts[:] = [b"".join(parts)]
        return parts[0]

    def as_stream(self) -> StreamReader:
        """The buffered body as a finished StreamReader, for handlers that read
        ``request.content`` themselves; a limit above the body's size keeps it from
        ever pausing the connection's reading. The handler holds it from now on, in
        its slot: it is no longer counted in the buffer memory.

        A body that outgrew the buffer (``fill``) is fed in by a task, what was read
        first then the rest as it arrives (rate guard included); its limit, above
        ``max_body_size``, keeps it from pausing the connection too: the slot bounds
        the bytes."""
        if not self.complete:
            stream = StreamReader(self._request.protocol, self._limit + 1, loop=self._loop)
            self._pump = self._loop.create_task(self._feed(stream))
            return stream
        data = self.buffered()
        self.release()
        stream = StreamReader(self._request.protocol, len(data) + 1, loop=self._loop)
        if data:
            stream.feed_data(data)
        stream.feed_eof()
        return stream

    async def _feed(self, stream: StreamReader) -> None:
        try:
            async for chunk in self.chunks():
                stream.feed_data(chunk)
        except Exception as exc:  # BodyTooLarge, BodyTimeout, the client's payload error
            stream.set_exception(exc)
            return
        stream.feed_eof()

    # -- phase two: after admission ---------------------------------------------------
    async def chunks(self) -> AsyncIterator[bytes]:
        """Yield the body (from memory when ``fill`` read it, then the rest of a body
        that outgrew it); raise BodyTooLarge or BodyTimeout (also kept in ``error``).

        What ``fill`` read is given back to the buffer memory as it is handed over:
        the upstream's writer writes it at once, and bodies are not replayed."""
        if self._parts:
            data = self.buffered()
            self.release()
            if data:
                yield data
            del data
        if self.complete:
            return
        self.send_continue()
        self._arm()
        content = self._source
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                self._received += len(chunk)
                if self._received > self._limit:
                    self.error = BodyTooLarge()
                    raise self.error
                self._got(len(chunk))
                yield chunk
        finally:
            self.cancel_timer()

    async def read_all(self) -> bytes:
        """The whole body, for handlers that need it at once (process executor)."""
        if self.complete:
            data = self.buffered()
            self.release()  # the caller holds it, in its slot
            return data
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)
