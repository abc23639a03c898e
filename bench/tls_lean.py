"""A prototype for gatewayd's TLS listener: OpenSSL on the socket itself, as nginx
does, instead of uvloop's TLS transport. Not part of gatewayd; measured by
bench/gatewayd_tlslean.py (the tls scenario's ``gatewayd-lean`` row) and
``python -m bench.conn_memory --tls --lean``; see docs/BENCHMARKS.md, "TLS".

Why: uvloop's TLS transport (sslproto) allocates a 256 KiB read buffer per
connection and keeps two ``MemoryBIO`` whose buffers never shrink from their
largest use; an idle connection costs about 40 KiB there. Here OpenSSL reads
and writes the descriptor (a socket BIO: no memory BIOs), and with
``SSL_MODE_RELEASE_BUFFERS`` (CPython sets it on every context) its 16 KiB
record buffers are freed whenever they are empty, so an idle connection keeps
only OpenSSL's ``SSL`` object (about 7 KiB in OpenSSL 3.0), its two cipher
contexts and its session: about 12 KiB.

Two rules keep the buffers released:
- never call ``SSL_read`` on an empty socket: one that finds nothing allocates
  the read buffer again and keeps it while the connection idles. Reading stops
  when the read returned data and OpenSSL holds no more (``pending()``); the
  event loop's reader is level-triggered, so unread bytes call back;
- writes are ``SSL_write`` calls that finish or are retried, unchanged, when
  the socket is writable again (OpenSSL's rule); later writes queue behind.

The socket stays the accepted ``socket.socket`` (the listener closes it if the
handshake fails); the TLS object is ``SSLContext._wrap_socket`` (CPython's
own building block under ``SSLSocket``; ``owner`` is this transport, so an SNI
callback's ``conn.context = ...`` lands on it). The transport is what
H1Protocol uses of uvloop's: write, writelines, close, abort, pause/resume
reading, write buffer limits with pause_writing/resume_writing, get_extra_info.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from typing import Any

_BUFFER = bytearray(256 * 1024)  # every connection's plaintext lands here first (one loop thread)
_VIEW = memoryview(_BUFFER)
_EXPECTED = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class TlsSocketTransport(asyncio.Transport):
    """One TLS connection on its socket, driven by the loop's add_reader/add_writer."""

    __slots__ = ("__weakref__", "_closing", "_fd", "_high", "_inflight", "_loop", "_lost", "_low", "_paused",
                 "_protocol", "_queue", "_queued", "_reading", "_sock", "_tls", "_waiter", "_writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, context: ssl.SSLContext) -> None:
        # (no BaseTransport.__init__: its _extra dict would be unused, get_extra_info is our own)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._tls: Any = context._wrap_socket(sock, server_side=True, owner=self)  # type: ignore[attr-defined]
        self._protocol: Any = None
        self._closing = False
        self._lost = False
        self._reading = False
        self._writing = False  # a writer is registered
        self._paused = False  # the protocol was told pause_writing
        self._inflight: bytes | None = None  # an SSL_write to repeat, unchanged, when writable
        self._queue: deque[bytes] | None = None  # made when a write must wait (a deque is 600 bytes)
        self._queued = 0  # bytes in _inflight and _queue
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._waiter: asyncio.Future[None] | None = None

    # -- the SNI callback's view: conn.context ---------------------------------------
    @property
    def context(self) -> ssl.SSLContext:
        ctx: ssl.SSLContext = self._tls.context
        return ctx

    @context.setter
    def context(self, ctx: ssl.SSLContext) -> None:
        self._tls.context = ctx

    # -- handshake ----------------------------------------------------------------------
    async def handshake(self) -> None:
        """Complete the handshake (the caller bounds the time); raise on failure."""
        waiter = self._waiter = self._loop.create_future()
        self._loop.add_reader(self._fd, self._handshake_step)
        try:
            self._handshake_step()
            await waiter
        finally:
            self._waiter = None
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

    def start(self, protocol: asyncio.Protocol) -> None:
        """The handshake is done: hand the connection to ``protocol``."""
        self._protocol = protocol
        protocol.connection_made(self)
        if not self._closing:
            self.resume_reading()

    # -- reading ------------------------------------------------------------------------
    def _readable(self) -> None:
        tls = self._tls
        while self._reading:
            try:
                n = tls.read(len(_BUFFER), _BUFFER)
            except _EXPECTED:
                return
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            if not n:  # end of stream, or the peer's close_notify
                self._eof()
                return
            self._protocol.data_received(bytes(_VIEW[:n]))
            if not tls.pending():
                return  # no read on an empty socket (see the module's docstring)

    def _eof(self) -> None:
        self.pause_reading()
        keep_open = self._protocol.eof_received()
        if not keep_open:
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
                self._loop.call_soon(self._readable)  # plaintext already decrypted: no event for it

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
        """One SSL_write; what it could not finish waits for the socket (same bytes again)."""
        try:
            self._tls.write(data)
        except _EXPECTED:
            self._inflight = data
            self._queued += len(data)
            if not self._writing:
                self._writing = True
                self._loop.add_writer(self._fd, self._writable)
            self._check_high()
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)

    def _writable(self) -> None:
        data = self._inflight
        if data is not None:
            try:
                self._tls.write(data)
            except _EXPECTED:
                return
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            self._inflight = None
            self._queued -= len(data)
        while self._queue and self._inflight is None:
            assert self._queue is not None
            nxt = self._queue.popleft()
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
            high = 64 * 1024 if low is None else 4 * low
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
                self._tls.shutdown()  # one close_notify, no waiting for the peer's
            except (ssl.SSLError, OSError, ValueError):
                pass
        self._sock.close()
        if self._protocol is not None:
            self._loop.call_soon(self._protocol.connection_lost, exc)

    # -- the rest of the transport API ------------------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "sslcontext":
            return self._tls.context
        if name == "ssl_object":
            return self._tls
        if name == "socket":
            return self._sock
        if name == "peername":
            try:
                return self._sock.getpeername()
            except OSError:
                return default
        if name == "sockname":
            try:
                return self._sock.getsockname()
            except OSError:
                return default
        if name == "cipher":
            return self._tls.cipher()
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        protocol: asyncio.BaseProtocol = self._protocol
        return protocol


async def open_tls(loop: asyncio.AbstractEventLoop, conn: socket.socket, context: ssl.SSLContext,
                   factory: Any, handshake_timeout: float) -> None:
    """What an opener does: the handshake within ``handshake_timeout``, then the protocol.
    Raises (the socket left to the caller to close) when the handshake fails or times out."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    transport = TlsSocketTransport(loop, conn, context)
    try:
        async with asyncio.timeout(handshake_timeout):
            await transport.handshake()
    except BaseException:
        _drain(conn)
        raise
    transport.start(factory())


def _drain(conn: socket.socket) -> None:
    """Read what the peer sent and OpenSSL did not (plain HTTP on a TLS port: OpenSSL stops
    at the first record header), so that closing sends a FIN, not a reset."""
    for _ in range(16):
        try:
            if not conn.recv(65536):
                return
        except OSError:
            return
