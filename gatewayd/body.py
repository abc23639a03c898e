"""The client's request body, streamed: size limit, slow-body timeout, 100-continue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .h1server import Request

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BodyTooLarge(Exception):
    """The body passed ``max_body_size`` while streaming (413)."""


class BodyTimeout(TimeoutError):
    """The body did not arrive within the body timeout (408).

    A TimeoutError: it is left in the request's payload, where the connection's
    lingering read of an unread body meets it.
    """


class RequestBody:
    """An async iterator over the body's chunks, with the guards of SPEC §3.

    The deadline is ``start + timeout + received / min_rate``: a slow but steady
    upload is allowed, a dribble is not. One timer per body, re-armed only when
    it fires early.
    """

    __slots__ = (
        "_expect",
        "_limit",
        "_loop",
        "_min_rate",
        "_received",
        "_request",
        "_start",
        "_timeout",
        "_timer",
        "error",
    )

    def __init__(self, request: Request, limit: int, timeout: float, min_rate: int) -> None:
        self._request = request
        self._limit = limit
        self._timeout = timeout
        self._min_rate = min_rate
        self._received = 0
        self._start = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._expect = request.headers.get("Expect", "").lower() == "100-continue"
        self.error: Exception | None = None
        self._loop = asyncio.get_running_loop()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def received(self) -> int:
        return self._received

    def _deadline(self) -> float:
        return self._start + self._timeout + self._received / self._min_rate

    def _on_timer(self) -> None:
        deadline = self._deadline()
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._timer = None
        self.error = BodyTimeout()
        self._request.content.set_exception(self.error)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def send_continue(self) -> None:
        """Answer ``Expect: 100-continue`` (once): the request was admitted."""
        if self._expect:
            self._expect = False
            self._request.write(CONTINUE)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yield the body; raise BodyTooLarge or BodyTimeout (also kept in ``error``)."""
        request = self._request
        self.send_continue()
        self._start = self._loop.time()
        self._timer = self._loop.call_at(self._deadline(), self._on_timer)
        content = request.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                self._received += len(chunk)
                if self._received > self._limit:
                    self.error = BodyTooLarge()
                    raise self.error
                yield chunk
        finally:
            self.cancel_timer()

    async def read_all(self) -> bytes:
        """The whole body, for handlers that need it at once (process executor)."""
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)
