"""One upstream connection of an H1Pool: the asyncio protocol, its llhttp parser
(httptools) and the state of the exchange under way (see gatewayd.http.client for
what the pool promises).

The connection names its pool by the interface it needs (``Pool``), not by import:
the pool makes connections, so the connection is the module the pool builds on.
"""

from __future__ import annotations

import asyncio
import select
import ssl
from collections import deque
from collections.abc import AsyncIterable
from typing import Any, Protocol

import httptools

from .errors import UpstreamFailure
from .headers import split_fields
from .wire import MAX_HEAD, MAX_LINE, MAX_RESPONSE_HEADERS, NO_BODY_STATUS

# a head of at most this many bytes is within the limits: more than MAX_RESPONSE_HEADERS
# header lines take more (each at least "a:" and its CRLF), as does a line over MAX_LINE.
# The common head needs no counting.
_SMALL_HEAD = 4 * MAX_RESPONSE_HEADERS
_INTERIM = frozenset({100, 102, 103})  # llhttp completes these without a body; a final response follows

_POLLRDHUP = getattr(select, "POLLRDHUP", 0)  # Linux: the peer's FIN, even with bytes pending

# connection states
NEW, IDLE, BUSY, CLOSED = 0, 1, 2, 3


def reset() -> UpstreamFailure:
    return UpstreamFailure(502, "upstream_reset")


def _invalid() -> UpstreamFailure:
    return UpstreamFailure(502, "upstream_invalid")


def tls_failure() -> UpstreamFailure:
    return UpstreamFailure(502, "upstream_tls")


class Stale(Exception):
    """A pooled connection was closed by the server before any response byte."""


class _Refused(Exception):
    """Raised in a parser callback to stop parsing (the parser reports a callback error)."""


class Listener(Protocol):
    """Follows an exchange started by :meth:`H1Pool.send_idle`."""

    def wake(self) -> None:
        """The exchange moved on: its head is in, or it failed (see ``send_idle``)."""


class PoolStats:
    """Counters of one pool; ``failures`` maps a reason to a count."""

    __slots__ = ("connects", "failures", "requests", "retries", "reuses")

    def __init__(self) -> None:
        self.requests = 0
        self.reuses = 0  # requests sent on a pooled connection
        self.connects = 0  # connections established
        self.retries = 0  # requests replayed after a stale pooled connection
        self.failures: dict[str, int] = {}

    def fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1


class Pool(Protocol):
    """What a connection needs of the pool it belongs to (H1Pool): its settings, its
    books (the idle list, the open connections, the waiters for a slot) and where a
    connection goes when its exchange ends."""

    stats: PoolStats
    read_buffer: int
    read_timeout: float
    keepalive_timeout: float
    _step: float  # the connection timers' period
    _idle: list[ClientConnection]
    _conns: set[ClientConnection]
    _waiters: deque[asyncio.Future[ClientConnection | None]]
    _closed: bool

    def _recycle(self, conn: ClientConnection) -> None: ...
    def _free(self) -> None: ...
    def _tls_failed(self, exc: ssl.SSLError) -> None: ...


class ClientConnection(asyncio.Protocol):
    """One upstream connection: the protocol, its parser and the current exchange's state."""

    __slots__ = (
        "_buf", "_buffered", "_done", "_drain", "_exc", "_fields", "_garbage", "_got", "_head_done",
        "_head_only", "_head_pos", "_interim", "_keep_alive", "_listener", "_loop", "_parser", "_partial", "_paused",
        "_poller", "_pool", "_raw", "_reason", "_reused", "_sourcing", "_stamp", "_state", "_status", "_timer",
        "_transport", "_upgrading", "_waiter", "_write_paused", "_writer",
    )

    def __init__(self, pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._state = NEW
        self._transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self._parser = httptools.HttpResponseParser(self)
        self._timer: asyncio.TimerHandle | None = None
        self._poller: Any = None  # select.poll on the socket, made at the first _peer_gone
        self._waiter: asyncio.Future[None] | None = None
        self._listener: Listener | None = None  # an exchange driven by callbacks (send_idle)
        self._drain: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._buf: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._write_paused = False
        self._sourcing = False  # the body writer waits for the caller's body: the upstream is not late
        self._reused = False  # a response was read on it before: a close may be the keep-alive race
        self._stamp = 0.0
        self._done = True
        self._head_done = True
        self._head_only = False
        self._got = False
        self._garbage = False
        self._interim = False
        self._upgrading = False  # the request asks for an upgrade: a 101 ends the exchange (detach)
        self._keep_alive = False
        self._exc: BaseException | None = None
        self._status = 0
        self._reason = ""
        self._fields = b""  # the response's header lines, as received (split on demand)
        # The head is split by us, not by one parser callback per header (half the parsing cost):
        # llhttp validates it and finds its end; _raw is the bytes being parsed, _head_pos where the
        # current head starts in it, _partial the head bytes kept from earlier reads.
        self._raw: bytes | bytearray = b""
        self._head_pos = 0
        self._partial: bytearray | None = None

    # -- the exchange -----------------------------------------------------------------------
    def _send(self, head: bytes, head_only: bool, body: AsyncIterable[bytes] | None,
              length: int | None) -> None:
        """Start an exchange: write the head now, start the body's writer."""
        if self._state != BUSY or self._garbage:  # handed over to a waiter, then lost or sent bytes
            raise Stale() if self._reused else reset()
        self._begin(head_only)
        self._transport.write(head)
        if body is not None:
            self._writer = self._loop.create_task(self._write_body(body, length))

    def _begin(self, head_only: bool) -> None:
        """A new exchange, its head about to be written: the response state reset."""
        if self._head_only:  # llhttp still expects the body the last HEAD response announced
            self._parser = httptools.HttpResponseParser(self)
        self._done = self._head_done = self._got = self._interim = False
        self._head_only = head_only
        self._exc = None
        self._head_pos = 0
        self._partial = None
        self._stamp = self._loop.time()

    async def _write_body(self, body: AsyncIterable[bytes], length: int | None) -> None:
        transport = self._transport
        loop = self._loop
        sent = 0
        it = body.__aiter__()
        try:
            while True:
                self._sourcing = True
                try:
                    chunk = await it.__anext__()
                except StopAsyncIteration:
                    break
                finally:
                    self._sourcing = False
                if self._state == CLOSED:
                    return
                n = len(chunk)
                if not n:
                    continue
                sent += n
                if length is None:
                    transport.writelines((b"%x\r\n" % n, chunk, b"\r\n"))
                else:
                    if sent > length:
                        raise ValueError(f"request body longer than body_length={length}")
                    transport.write(chunk)
                self._stamp = loop.time()
                if self._write_paused:
                    self._drain = loop.create_future()
                    await self._drain
                    if self._state == CLOSED:
                        return
            if self._state == CLOSED:
                return
            if length is None:
                transport.write(b"0\r\n\r\n")
            elif sent != length:
                raise ValueError(f"request body shorter than body_length={length}")
            self._stamp = loop.time()
            self._writer = None  # sent in full: the connection may be reused
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._writer = None  # do not cancel ourselves in _close
            self._fail(exc)
        finally:
            # done with the caller's iterator whatever happened: its cleanup (a body's timers) runs now
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:  # running, or its own error: nothing more to do
                    pass

    def cancel(self) -> None:
        """Abort a ``send_idle`` exchange now, without telling its listener."""
        self._listener = None
        self._close()

    def _peer_gone(self) -> bool:
        """Whether the socket of a pooled connection is readable: EOF, a reset or stray bytes
        that the loop has not delivered yet. One poll(2), for requests that cannot be replayed."""
        poller = self._poller
        if poller is None:
            sock = self._transport.get_extra_info("socket")
            if sock is None:
                return False
            self._poller = poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN | _POLLRDHUP)
        return bool(poller.poll(0))

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        self._close()

    def _take(self) -> bytes:
        """The buffered body bytes, handed to the consumer. Once the response is complete
        they are its last: the exchange ends, and the connection is reused if everything
        allows it, else closed (one call for the whole of a small response)."""
        buf = self._buf
        data = b"".join(buf)  # the one chunk itself when there is one (no copy)
        buf.clear()
        self._buffered = 0
        if not self._done:
            if self._paused and self._state != CLOSED:
                self._resume()
        elif (self._writer is None and self._keep_alive and not self._garbage and self._state == BUSY
              and self._pool.keepalive_timeout > 0):
            if self._paused:
                self._resume()  # idle, it must see the server's close
            self._reused = True
            self._stamp = self._loop.time()
            pool = self._pool
            if pool._waiters or pool._closed:
                pool._recycle(self)
            else:  # _recycle's common case, without a call: it runs per response
                self._state = IDLE
                pool._idle.append(self)
        else:  # also when answered before the request body was sent in full
            self._close(graceful=True)
        return data

    def _resume(self) -> None:
        self._paused = False
        self._stamp = self._loop.time()
        self._transport.resume_reading()

    def _close(self, graceful: bool = False) -> None:
        """Close the connection now and free its pool slot (once)."""
        state = self._state
        if state in (CLOSED, NEW):
            return
        pool = self._detach(state)
        if self._exc is None and not self._done:
            self._exc = reset()  # whoever still waits on this exchange
        if graceful:
            self._transport.close()
        else:
            self._transport.abort()  # unread bytes or a caller that gave up: no lingering
        pool._free()
        self._wake()

    def _detach(self, state: int) -> Pool:
        """Leave the pool's books and stop this connection's timer and body writer
        (both ways a connection ends: closed by us, or lost)."""
        pool = self._pool
        if state == IDLE:
            pool._idle.remove(self)
        pool._conns.discard(self)
        self._state = CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        writer = self._writer
        if writer is not None:
            self._writer = None
            writer.cancel()
        return pool

    def _wake(self) -> None:
        """The exchange moved on (or ended): tell whoever follows it."""
        if self._waiter is not None:
            self._wake_waiter()
        elif self._listener is not None:
            self._listener.wake()

    def _wake_waiter(self) -> None:
        # Only the future: safe inside a parser callback. A listener is told after the
        # parser returns, because it may finish the exchange and reuse this connection.
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _on_timer(self) -> None:
        # Fires at least every pool._step; acts when the deadline of the current state has passed.
        self._timer = None
        state = self._state
        if state == CLOSED:
            return
        pool = self._pool
        loop = self._loop
        now = loop.time()
        step = now + pool._step
        if state == IDLE:
            deadline = self._stamp + pool.keepalive_timeout
            if now >= deadline:
                self._close(graceful=True)
                return
        elif not (self._done or self._paused or self._sourcing):
            deadline = self._stamp + pool.read_timeout
            if now >= deadline:
                self._fail(UpstreamFailure(504, "upstream_timeout"))
                return
        else:
            deadline = step
        self._timer = loop.call_at(deadline if deadline < step else step, self._on_timer)

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        # one frame for the common read (the rare cases have their own): it runs per response
        if self._state != BUSY or self._done:
            self._unsolicited()
            return
        self._stamp = self._loop.time()
        self._got = True
        head = not self._head_done
        if head:
            partial = self._partial
            if partial is None:
                self._raw = data  # the common case: the whole head in one read, no copy
            else:
                partial += data
                self._raw = partial
        try:
            self._parser.feed_data(data)  # on_headers_complete lets go of _raw and _partial
        except httptools.HttpParserError:  # the callbacks' exceptions arrive wrapped in it too
            self._parse_error()
        except httptools.HttpParserUpgrade as switched:  # a 101 to an upgrade request
            self._switched(data, switched.args[0])
        else:
            if head and not self._head_done:
                self._head_part(data)
        if self._listener is not None:
            self._listener.wake()

    def _switched(self, data: bytes, end: int) -> None:
        """The upstream answered an upgrade request with 101: the bytes after its head
        are the tunnel's; nothing more is read until the tunnel takes the transport
        (``detach``)."""
        if not (self._upgrading and self._head_done and self._status == 101):
            self._fail(_invalid())  # (on_headers_complete refuses any 101 not asked for)
            return
        self._transport.pause_reading()
        self._buf = [data[end:]] if end < len(data) else []
        self._done = True
        self._keep_alive = False

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Leave the pool for good after a 101 (``_switched``): the transport, reading
        paused, and the bytes the upstream sent after the 101's head."""
        pool = self._detach(self._state)
        self._poller = None
        pool._free()
        early = b"".join(self._buf)
        self._buf = []
        return self._transport, early

    def _unsolicited(self) -> None:
        # a late 408, garbage after a complete response, or bytes while idle
        self._garbage = True
        if self._state == IDLE:
            self._close()

    def _parse_error(self) -> None:
        if self._done:
            self._garbage = True  # after a complete response: it is fine, the connection is not
        else:
            self._fail(_invalid())

    def _head_part(self, data: bytes) -> None:
        """A read that did not complete the head: keep its bytes for the next."""
        if self._partial is None:
            self._partial = bytearray(data)
        if len(self._partial) - self._head_pos > MAX_HEAD:
            self._fail(_invalid())  # a head that does not end

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost tells what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        state = self._state
        if state in (CLOSED, NEW):
            self._state = CLOSED
            return
        pool = self._detach(state)
        if state == BUSY and not self._done and self._exc is None:
            if self._head_done:
                if exc is not None:
                    self._exc = reset()
                elif self._until_close():
                    self._done = True  # the body was delimited by this close
                    self._keep_alive = False
                else:  # a clean close before the length or the last chunk: a malformed response
                    self._exc = _invalid()
            elif not self._got and self._reused:
                self._exc = Stale()
            elif isinstance(exc, ssl.SSLError) and not self._got:
                # an alert instead of a response: TLS 1.3 servers judge a client certificate
                # after the client's handshake is over, so it is refused here, not at connect
                self._exc = tls_failure()
                pool._tls_failed(exc)
            else:
                self._exc = reset()
        pool._free()
        self._wake()

    def _until_close(self) -> bool:
        """Whether the body of the response whose head is in is delimited by the close (a
        HEAD's response is done at its head). Asked only when the connection ends mid-body,
        not worked out per response."""
        return (not self._keep_alive and self._status not in NO_BODY_STATUS
                and _needs_eof(split_fields(self._fields)))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._stamp = self._loop.time()
        w = self._drain
        if w is not None:
            self._drain = None
            if not w.done():
                w.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._done:
            raise _Refused  # a second message on an exchange that is over: stop parsing

    def on_headers_complete(self) -> None:
        # llhttp accepted the head: the version (after any CR or LF it skips), one space, three
        # digits, then a space and the reason or the line's end; strict CRLF lines (no obs-fold,
        # no bare CR or LF, no space before a colon). So the status line ends at the first CRLF
        # after the version's space, the head at the first blank line after that, and each
        # header line splits at its first colon: three finds at most, no split of the head.
        raw = self._raw
        pos = self._head_pos
        # no space before the version's (in "HTTP/d.d" or the CR and LF skipped): a space at
        # pos + 8, the common case, is the first one (an index costs a fraction of a find)
        sp = pos + 8 if raw[pos + 8] == 32 else raw.find(b" ", pos)
        ok = raw[sp + 4:sp + 8] == b" OK\r"  # the common status line: its end and reason known
        eol = sp + 7 if ok else raw.find(b"\r\n", sp)
        end = raw.find(b"\r\n\r\n", eol)
        parser = self._parser
        status = parser.get_status_code()
        if status < 200 and not (status == 101 and self._upgrading):
            if status not in _INTERIM or end < 0 or end - pos > MAX_HEAD:
                raise _Refused  # 101 to a request that asked no upgrade, an unknown 1xx, or no end
            self._interim = True
            self._head_pos = end + 4  # the final response's head follows
            return
        if end - pos > _SMALL_HEAD or end < 0:
            _check_head(raw, pos, eol, end)
        self._status = status
        # "" when the line has none
        self._reason = "OK" if ok else raw[sp + 5:eol].decode("utf-8", "surrogateescape")
        # The header lines stay bytes: most responses are passed on without ever being
        # split into (name, value) pairs (Response.headers does that on demand).
        fields = raw[eol + 2:end]
        if self._partial is not None:  # the head came in parts: raw is the bytearray that gathered them
            fields = bytes(fields)
            self._partial = None
        self._fields = fields  # type: ignore[assignment]  # (bytes: a gathered bytearray is copied above)
        self._keep_alive = parser.should_keep_alive()
        self._head_done = True
        self._raw = b""  # no reference kept to the read's bytes
        if self._head_only:
            self._done = True
        if self._waiter is not None:  # request() awaits it; a send_idle exchange is woken after the read
            self._wake_waiter()

    def on_body(self, data: bytes) -> None:
        if self._done:
            raise _Refused  # a body after a HEAD response
        self._buf.append(data)
        self._buffered = buffered = self._buffered + len(data)
        if buffered > self._pool.read_buffer and not self._paused:
            self._paused = True  # a slow consumer: stop reading, the upstream's send buffer fills
            self._transport.pause_reading()
        if self._waiter is not None:
            self._wake_waiter()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._done = True
        if self._waiter is not None:
            self._wake_waiter()


def _check_head(raw: bytes | bytearray, pos: int, eol: int, end: int) -> None:
    """Refuse a final response's head (from ``pos``, status line to ``eol``, blank line at
    ``end``) over the limits: MAX_HEAD, MAX_RESPONSE_HEADERS, MAX_LINE."""
    if end < 0 or end - pos > MAX_HEAD or raw.count(b"\r\n", eol + 2, end) >= MAX_RESPONSE_HEADERS:
        raise _Refused
    if end - pos > MAX_LINE and max(map(len, raw[pos:end].split(b"\r\n"))) > MAX_LINE:
        raise _Refused  # (a head shorter than the line limit needs no line check)


def _needs_eof(headers: list[tuple[str, str]]) -> bool:
    """Whether a response without keep-alive is delimited by the close (RFC 9112 §6.3), as llhttp decides."""
    te: str | None = None
    cl = False
    for name, value in headers:
        lname = name.lower()
        if lname == "transfer-encoding":
            te = value
        elif lname == "content-length":
            cl = True
    if te is not None:
        return te.rsplit(",", 1)[-1].strip().lower() != "chunked"
    return not cl
