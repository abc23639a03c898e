"""A TLS connection with OpenSSL on the socket itself, as nginx runs it.

Why not the event loop's own TLS transport: uvloop's (and asyncio's) pass every
byte through two ``ssl.MemoryBIO`` whose buffers never shrink from their
largest use, and allocate a 256 KiB read buffer per connection. An idle
keep-alive connection cost about 26 KiB there, and one that had sent a 256 KiB
answer kept about 540 KiB; at 100,000 connections that is the machine. Here
OpenSSL reads and writes the descriptor, and with ``SSL_MODE_RELEASE_BUFFERS``
(CPython sets it on every context) its 16 KiB record buffers are freed whenever
they are empty, so an idle connection keeps OpenSSL's ``SSL`` object, its two
cipher contexts and its session: about 12 KiB (docs/BENCHMARKS.md, "TLS").

Two rules keep the buffers released:
- never ``SSL_read`` on an empty socket: a read that finds nothing allocates
  the read buffer again and keeps it while the connection idles. Reading stops
  once a read returned data and OpenSSL holds no more (``pending()``); the
  loop's reader is level-triggered, so bytes still in the socket call back.
- a write OpenSSL cannot finish is repeated with the same bytes when the
  socket is writable (OpenSSL's rule); later writes queue behind it, and flow
  control (``pause_writing``/``resume_writing``) counts both.

Only public APIs: ``SSLContext.wrap_socket`` (non-blocking, no handshake on
connect), the loop's ``add_reader``/``add_writer``. The transport is what the
HTTP protocol uses of a loop's: write, close, abort, pause/resume reading, the
write-buffer limits, ``get_extra_info``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections import deque
from typing import Any, cast

READ_SIZE = 256 * 1024  # a read's plaintext lands in the opener's one scratch buffer first
_AGAIN = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_HIGH, _LOW = 64 * 1024, 16 * 1024  # as the loops' transports


class TlsSocketTransport(asyncio.Transport):
    """One TLS connection on its socket, driven by the loop's reader and writer."""

    __slots__ = ("__weakref__", "_closing", "_fd", "_high", "_inflight", "_loop", "_lost", "_low",
                 "_paused", "_protocol", "_queue", "_queued", "_reading", "_scratch", "_tls",
                 "_view", "_waiter", "_writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, context: ssl.SSLContext,
                 scratch: bytearray, view: memoryview) -> None:
        # (no BaseTransport.__init__: its _extra dict would go unused)
        self._loop = loop
        # the accepted socket is detached into the SSLSocket, which owns the descriptor now
        self._tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        self._fd = self._tls.fileno()
        self._scratch = scratch
        self._view = view  # of ``scratch``, shared: one view per connection was 240 bytes more
        self._protocol: Any = None
        self._closing = False
        self._lost = False
        self._reading = False
        self._writing = False  # a writer is registered
        self._paused = False  # the protocol was told pause_writing
        self._inflight: bytes | None = None  # an SSL_write to repeat, unchanged, when writable
        self._queue: deque[bytes] | None = None  # made only when a write must wait
        self._queued = 0  # bytes in _inflight and _queue
        self._high = _HIGH
        self._low = _LOW
        self._waiter: asyncio.Future[None] | None = None

    # -- handshake ----------------------------------------------------------------------
    async def handshake(self) -> None:
        """Complete the handshake (the caller bounds its time); raise on failure, the
        socket then closed."""
        waiter = self._waiter = self._loop.create_future()
        self._loop.add_reader(self._fd, self._handshake_step)
        try:
            self._handshake_step()
            await waiter
        except BaseException:
            self._refuse()
            raise
        finally:
            self._waiter = None
            if not self._lost:
                self._loop.remove_reader(self._fd)
                self._loop.remove_writer(self._fd)

    def _handshake_step(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._loop.remove_writer(self._fd)
            return
        except ssl.SSLWantWriteError:
            self._loop.add_writer(self._fd, self._handshake_step)
            return
        except (ssl.SSLError, OSError) as exc:
            waiter.set_exception(exc)
            return
        waiter.set_result(None)

    def _refuse(self) -> None:
        """A failed handshake: read what the peer sent and OpenSSL did not (plain HTTP
        on a TLS port: OpenSSL stops at the first bytes), so the close is a FIN and not
        a reset, then close."""
        self._lost = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        for _ in range(16):
            try:
                if not os.read(self._fd, 65536):
                    break
            except OSError:
                break
        self._tls.close()

    def start(self, protocol: asyncio.Protocol) -> None:
        """The handshake is done: hand the connection to ``protocol``."""
        self._protocol = protocol
        protocol.connection_made(self)
        if not self._closing:
            self.resume_reading()

    # -- reading ------------------------------------------------------------------------
    def _readable(self) -> None:
        tls = self._tls
        scratch = self._scratch
        while self._reading:
            try:
                # with a buffer, read() gives the count of bytes it put there
                n = cast(int, tls.read(READ_SIZE, scratch))
            except _AGAIN:
                return
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            if not n:  # the end of the stream, or the peer's close_notify
                self._eof()
                return
            self._protocol.data_received(bytes(self._view[:n]))
            if not tls.pending():
                return  # never a read on an empty socket (see the module's docstring)

    def _eof(self) -> None:
        self.pause_reading()
        if not self._protocol.eof_received():
            self.close()

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._readable)
            if self._tls.pending():
                self._loop.call_soon(self._readable)  # decrypted already: no event will say so

    def is_reading(self) -> bool:
        return self._reading

    # -- writing ------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        if self._queued:
            if self._queue is None:
                self._queue = deque()
            self._queue.append(bytes(data))
            self._queued += len(data)
            self._check_high()
            return
        self._send(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def _send(self, data: bytes) -> None:
        """One SSL_write; what it could not finish waits for the socket (the same bytes)."""
        try:
            written = self._tls.write(data)
        except _AGAIN:
            self._wait_writable(data)
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)
        else:
            if written < len(data):  # (only with partial writes on, which CPython leaves off)
                self._wait_writable(data[written:])

    def _wait_writable(self, data: bytes) -> None:
        self._inflight = data
        self._queued += len(data)
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._writable)
        self._check_high()

    def _writable(self) -> None:
        data = self._inflight
        if data is not None:
            try:
                written = self._tls.write(data)
            except _AGAIN:
                return
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            self._inflight = None
            self._queued -= len(data)
            if written < len(data):
                self._inflight = data[written:]
                self._queued += len(self._inflight)
                return
        queue = self._queue
        while queue and self._inflight is None:
            nxt = queue.popleft()
            self._queued -= len(nxt)
            self._send(nxt)
            if self._lost:
                return
        if self._inflight is None:
            self._writing = False
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._finish(None)
                return
        if self._paused and self._queued <= self._low:
            self._paused = False
            self._protocol.resume_writing()

    def _check_high(self) -> None:
        if not self._paused and self._queued > self._high and self._protocol is not None:
            self._paused = True
            self._protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self._queued

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = _HIGH if low is None else 4 * low
        if low is None:
            low = high // 4
        self._high, self._low = high, low
        self._check_high()

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close")

    # -- closing ------------------------------------------------------------------------
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._queued:
            self._loop.call_soon(self._finish, None)

    def abort(self) -> None:
        self._fatal(None)

    def _fatal(self, exc: BaseException | None) -> None:
        self._closing = True
        self._queue = None
        self._inflight = None
        self._queued = 0
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._reading = False
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        if exc is None:
            try:
                self._tls.unwrap()  # sends close_notify; the peer's is not waited for
            except (ssl.SSLError, OSError, ValueError):
                pass
        self._tls.close()
        if self._protocol is not None:
            self._loop.call_soon(self._protocol.connection_lost, exc)

    # -- the rest of the transport API --------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        tls = self._tls
        if name == "sslcontext":
            return tls.context
        if name == "ssl_object":
            return tls
        if name == "socket":
            return tls
        if name in ("peername", "sockname"):
            try:
                return tls.getpeername() if name == "peername" else tls.getsockname()
            except OSError:
                return default
        if name == "cipher":
            return tls.cipher()
        if name == "peercert":
            return tls.getpeercert()
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        protocol: asyncio.BaseProtocol = self._protocol
        return protocol
