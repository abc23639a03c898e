"""What a client connection becomes after a 101: the part of H1Protocol that
answers an upgrade request.

After a request the parser stops at (``Upgrade: websocket``), the bytes that
follow it are kept unparsed in ``_tail`` until the request is answered. A
declined upgrade (any answer but 101) goes back to HTTP (H1Protocol's
``_declined_upgrade``). A 101 from an upstream hands the transport to a tunnel
(``take_over``, http/tunnel.py); a 101 from an in-process aiohttp handler
(``WebSocketResponse``) keeps the connection and feeds the client's bytes to
the response's frame reader (``set_parser``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .request import Connection, Request, Server


class Switching(Connection):
    """The upgrade side of a client connection (H1Protocol extends it)."""

    __slots__ = ("_frames", "_tail")

    # what aiohttp's WebSocketResponse reads of its request's protocol (receive timeouts)
    _timeout_ceil_threshold = 5

    def __init__(self, server: Server) -> None:
        super().__init__(server)
        # after an upgrade request, the bytes that follow it, unparsed until it is answered
        self._tail: bytes | None = None
        # an in-process handler's WebSocket (set_parser): its frame reader and its callback
        self._frames: tuple[Any, Callable[[], None] | None] | None = None

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self._frames is not None:
            self._frames[0].feed_eof()
            self._frames = None

    # -- a 101 from an upstream: the connection is a tunnel's ------------------------------
    def take_over(self, request: Request) -> tuple[asyncio.Transport, bytes] | None:
        """The 101 to ``request`` is written: the connection becomes a tunnel's. What
        was held for the client goes out first; the HTTP state is dropped (a tunnel
        keeps none of it); the server's books move the connection to its tunnels
        (``H1Server.tunnel_opened``)."""
        transport = self.transport
        if self.current is not request or transport is None or transport.is_closing():
            return None
        tail = self._tail
        if tail is None:  # the parser did not stop at this request: its bytes went on as HTTP
            return None
        self.uncork()
        tail += self._end_http()
        self._tail = None
        self.current = None
        self.transport = None  # nothing of this protocol touches it again
        return transport, tail

    def _end_http(self) -> bytes:
        """Drop the HTTP state; the bytes read after ``_tail`` and not yet handled."""
        raise NotImplementedError

    # -- a 101 from an in-process handler (aiohttp's WebSocketResponse) --------------------
    def set_parser(self, parser: Any, data_received_cb: Callable[[], None] | None = None) -> None:
        """aiohttp's WebSocketResponse, prepared (its 101 written): from now on the
        client's bytes are its frames. The connection stays this protocol's: the
        response writes through it and its slot is the handler's until it returns."""
        self._frames = (parser, data_received_cb)
        tail, self._tail = self._tail, b""
        if tail:
            self._feed_frames(tail)
        if self._buffer_paused:
            self._resume_reading_for_buffer()

    def keep_alive(self, val: bool) -> None:
        """(aiohttp's WebSocketResponse says the connection ends with it: it does, as
        the handler's request is answered with ``Connection`` closed.)"""
        if not val and self.current is not None:
            self.current.keep_alive = False

    def _feed_frames(self, data: bytes) -> None:
        assert self._frames is not None
        parser, callback = self._frames
        if callback is not None:
            callback()
        eof, _ = parser.feed_data(data)
        if eof:
            self.close_idle()  # (after what is held and buffered: the close frame)
