"""A lean HTTP/1.1 client for upstream servers: pooled keep-alive connections
parsed by llhttp (httptools), with none of aiohttp's per-request machinery.

Why: a proxied request through aiohttp's ClientSession costs several times the
CPU the gateway's own server side costs (NOTES.md, "speed"). Here a request is
one head written in one ``transport.write``, four parser callbacks (llhttp
validates the head and finds its end; we split it in one pass instead of one
callback per header), one future while waiting, and one small :class:`Response`.

API::

    pool = H1Pool(host, port, max_connections=1000, keepalive_timeout=4.0,
                  connect_timeout=2.0, read_timeout=30.0)
    resp = await pool.request(method, target, headers, body=None, body_length=None,
                              connect_timeout=None)  # None: the pool's
    resp.status, resp.reason, resp.headers, resp.keep_alive
    resp.fields                        # the header lines as received (bytes), for passing on as they are
    data = resp.read_small(65536)      # whole body if already here (sync, no await), else None
    async for chunk in resp: ...       # or resp.body(), await resp.read_chunk() (b"" at the end)
    data = await resp.read()           # everything (tests, small bodies)
    resp.buffered                      # body bytes received, not yet read
    resp.complete                      # the whole body was handed over (e.g. after the last read_chunk)
    resp.release()                     # = resp.close(); always call it (try/finally)
    pool.snapshot(); await pool.close()

    # no task, no future: a bodiless GET (HEAD, ...) on an idle connection, followed by callbacks
    conn = pool.send_idle(method, target, headers, listener)  # None: nothing idle, use request()
    listener.wake()                    # then: conn._head_done -> Response(conn); conn._exc -> resume
    resp = await pool.resume(conn, method, target, headers)   # replays a stale one, or raises
    conn.cancel()                      # the caller left

The connection returns to the pool as soon as the last body byte is handed to the
caller (``read_small``, the last ``read_chunk``), so ``release()`` after a full
read is a no-op; before that it closes the connection. A Response that is never
released keeps its connection and slot: always release in a ``finally``.

Requests:

- ``target`` is sent as given (the raw request target), less a ``#fragment``. ``headers`` is a list of
  ``(name, value)`` str pairs, already filtered by the caller, or header lines as bytes,
  each ending in CRLF, without framing headers (``headers.request_fields`` makes them). Framing is the
  client's: any ``Content-Length``/``Transfer-Encoding`` in ``headers`` is
  dropped and replaced from ``body``/``body_length`` (``Content-Length: N`` when
  the length is known, chunked when not, ``Content-Length: 0`` for a body-less
  POST/PUT/PATCH). ``Host: host:port`` is added when ``headers`` has none. A CR or
  LF inside a name, value or target raises ValueError (no request splitting).
- ``body`` is an async iterable of bytes, written by its own task while the
  response is awaited (an upstream may answer early, and a full-duplex upstream
  must not deadlock against us). If it raises, the connection is closed and that
  same exception comes out of ``request()`` (or of the body read, once the head
  is in). A body shorter or longer than ``body_length`` raises ValueError. The
  iterator is closed (``aclose``) when the writer ends, whatever the reason.
- A request sent on a pooled connection that turns out closed before any
  response byte (the server's keep-alive close racing our write) is retried
  once on a new connection, like aiohttp, when the method is idempotent and has
  no body; otherwise it fails as ``upstream_reset`` and the caller decides. For
  those (POST, bodies), a pooled connection is first checked with one poll(2):
  a server that closed it right after its last response, its FIN not yet seen
  by the loop, does not cost the request. Only a close racing the write itself
  remains.

Failures are :class:`gatewayd.upstream.UpstreamFailure` (``.status``, ``.reason``):

- ``upstream_connect`` (502): refused, unreachable;
- ``upstream_dns`` (502): the name did not resolve;
- ``upstream_connect_timeout`` (504): no connection within ``connect_timeout``
  (name resolution included);
- ``upstream_timeout`` (504): no upstream byte for ``read_timeout`` while we wait
  for one, before the head or between body reads; not while our reading is
  paused for a slow consumer, nor while the request body waits for its source;
- ``upstream_reset`` (502): reset or EOF before the head, reset in the body;
- ``upstream_invalid`` (502): unparsable, a 101 or unknown 1xx, a head over
  64 KiB, a line over 8190 bytes or over 100 headers, bad chunking, a clean EOF
  before the body's announced end (as aiohttp's ClientPayloadError maps today).

Nothing was sent when the reason is one of the three connect ones. Before the
head the failure comes out of ``request()``; after it, out of the body reads
(the caller can only cut the response short).

Responses: ``headers`` keeps the upstream's order and duplicates, decoded like
aiohttp (UTF-8, surrogateescape: bytes survive a round trip). Interim 100/102/103
responses are skipped. HEAD, 1xx, 204 and 304 have no body; otherwise
Content-Length, chunked (decoded; trailers dropped) or until-close. Bytes after
a complete response (a body sent to HEAD — aiohttp's StreamResponse does — or a
late 408) are never taken for the next response: the connection is dropped. At
most ``read_buffer`` bytes (plus one socket read) are buffered: past that the
upstream socket stops being read until the consumer takes the data (bounded
memory behind a slow client).

Connections: LIFO reuse of idle ones (the warmest; the coldest expire), at most
``max_connections`` open or connecting (0 = no limit) with FIFO waiters, and a
released connection is handed straight to the first waiter. An idle connection
is closed after ``keepalive_timeout`` (keep it below the server's; 0 = no reuse)
or as soon as the server closes it or sends anything. A connection goes back to the pool only
when its response was read completely, both sides allow keep-alive and the
request body was sent in full; otherwise it is closed (never reused with
unread bytes). Cancelling the caller anywhere (in ``request()``, in a body read)
aborts the connection at once and frees its slot; a caller cancelled while doing
something else must call ``close()`` in its ``finally``. Waiting for a slot has
no timeout of its own (the gateway's admission bounds it; wrap in
``asyncio.timeout`` otherwise). Host names are resolved per new connection by
the loop's getaddrinfo (no cache: connections are long-lived), or by ``resolve``
when given: ``async (host, port) -> [address, ...]`` (e.g. aiohttp's
AsyncResolver behind a TTL cache), tried in order.

Timers: no timer per request. Each connection has one timer that fires at least
every ``min(read_timeout, keepalive_timeout)`` and compares the clock with the
last progress stamp (set on every read, write and state change), so arming and
cancelling never happens on the request path.
"""

from __future__ import annotations

import asyncio
import select
import socket
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

import httptools

from .errors import UpstreamFailure
from .headers import split_fields
from .turn import UPSTREAM_WRITES, Turn

__all__ = ["H1Pool", "PoolStats", "Response", "UpstreamFailure"]

MAX_HEAD = 65536  # bytes of response head (status line and headers)
MAX_LINE = 8190  # bytes of one status or header line (aiohttp's client limit)
MAX_HEADERS = 100
# a head of at most this many bytes is within the limits: more than MAX_HEADERS header lines
# take more (each at least "a:" and its CRLF), as does a line over MAX_LINE. The common head
# needs no counting.
_SMALL_HEAD = 4 * MAX_HEADERS
READ_BUFFER = 131072  # body bytes buffered before the upstream socket is paused (as aiohttp: 2 x 64 KiB)

# RFC 9110 §9.2.2; only these may be replayed after a stale keep-alive connection
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# methods that define a meaning for content: sent with "Content-Length: 0" when bodiless (RFC 9110 §8.6)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_INTERIM = frozenset({100, 102, 103})  # llhttp completes these without a body; a final response follows

_POLLRDHUP = getattr(select, "POLLRDHUP", 0)  # Linux: the peer's FIN, even with bytes pending

# connection states
_NEW, _IDLE, _BUSY, _CLOSED = 0, 1, 2, 3


def _reset() -> UpstreamFailure:
    return UpstreamFailure(502, "upstream_reset")


def _invalid() -> UpstreamFailure:
    return UpstreamFailure(502, "upstream_invalid")


class _Stale(Exception):
    """A pooled connection was closed by the server before any response byte."""


class _Unresolved(OSError):
    """The resolver gave no address."""


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


class H1Pool:
    """Keep-alive HTTP/1.1 connections to one server ``(host, port)``."""

    __slots__ = (
        "_closed", "_connecting", "_conns", "_host_bytes", "_host_line", "_idle", "_limit", "_loop", "_open",
        "_outbox", "_resolve", "_step", "_turn", "_waiters", "connect_timeout", "host", "keepalive_timeout", "port",
        "read_buffer", "read_timeout", "stats",
    )

    def __init__(self, host: str, port: int, *, max_connections: int = 0, keepalive_timeout: float = 4.0,
                 connect_timeout: float = 2.0, read_timeout: float = 30.0,
                 read_buffer: int = READ_BUFFER,
                 resolve: Callable[[str, int], Awaitable[Sequence[str]]] | None = None,
                 turn: Turn | None = None) -> None:
        self.host = host
        self.port = port
        self.keepalive_timeout = keepalive_timeout
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.read_buffer = read_buffer
        self.stats = PoolStats()
        self._limit = max_connections
        self._resolve = resolve  # (host, port) -> addresses to try in order; None: the loop resolves
        # the connection timers' period: no deadline can be missed by more than the loop's lateness
        self._step = max(0.001, min(read_timeout, keepalive_timeout) if keepalive_timeout > 0 else read_timeout)
        bracketed = f"[{host}]" if ":" in host else host
        self._host_line = f"Host: {bracketed}:{port}\r\n" if port != 80 else f"Host: {bracketed}\r\n"
        self._host_bytes = self._host_line.encode("utf-8", "surrogateescape")
        self._idle: list[_Conn] = []  # LIFO: append/pop at the end
        self._conns: set[_Conn] = set()  # every open connection (for close); touched per connect, not per request
        self._waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self._open = 0  # slots taken: connecting + connected
        self._connecting = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list[tuple[_Conn, bytes]] = []
        self._turn = turn if turn is not None else Turn()  # the gateway's: heads go out before its clients' output

    # -- requests ---------------------------------------------------------------------------
    async def request(self, method: str, target: str, headers: Iterable[tuple[str, str]] | bytes,
                      body: AsyncIterable[bytes] | None = None, body_length: int | None = None,
                      connect_timeout: float | None = None, *, _replay: bool = False) -> Response:
        """Send a request and return its response once the head is in (see the module doc).
        ``connect_timeout`` overrides the pool's for a connection this request opens
        (a retry with little time left). ``_replay``: ``send_idle`` already sent it,
        on a connection found stale (counted once; this time on a new connection)."""
        head = self._head(method, target, headers, body is not None, body_length)
        head_only = method == "HEAD"
        stats = self.stats
        if not _replay:
            stats.requests += 1
        replayable = body is None and method in IDEMPOTENT
        fresh = _replay  # the retry after a stale pooled connection takes a new one
        while True:
            idle = self._idle
            if idle and not fresh:  # a closed pool has none
                conn = idle.pop()  # the most recently used connection
                conn._state = _BUSY
                stats.reuses += 1
            else:
                conn = await self._acquire(fresh, connect_timeout)
            if not replayable and conn._reused and conn._state == _BUSY and conn._peer_gone():
                # closed (or written to) by the server while pooled, and the loop has not run its
                # callback yet: a request that cannot be replayed must not be lost on it
                stats.reuses -= 1
                conn._close()
                continue
            # inlined, not a coroutine of the connection's: one frame less per request
            try:
                conn._send(head, head_only, body, body_length)
                while not conn._head_done:
                    exc = conn._exc
                    if exc is not None:
                        raise exc
                    conn._waiter = waiter = conn._loop.create_future()
                    await waiter
                return Response(conn)
            except _Stale:
                conn._close()
                if fresh or not replayable:
                    stats.fail("upstream_reset")
                    raise _reset() from None
                stats.retries += 1
                fresh = True
            except BaseException as exc:
                conn._close()  # failed, timed out, or the caller was cancelled: abort now
                if isinstance(exc, UpstreamFailure):
                    stats.fail(exc.reason)
                raise

    def send_idle(self, method: str, target: str, headers: Iterable[tuple[str, str]] | bytes,
                  listener: Listener) -> _Conn | None:
        """Send a request without a body, of a method that may be replayed, on an idle
        pooled connection, now; None (nothing sent) when no connection is idle.

        The head is written at the end of the loop turn's callbacks, with the
        others of the turn (``_flush``).

        No future and no await: ``listener.wake()`` is called, outside the parser, once
        the response head is in (``Response(conn)`` then reads it as ``request()``'s
        would) or the exchange failed before its head (then ``resume(conn, ...)`` does
        what ``request()`` does on that failure: replay it or raise). It is called
        once per read while the head is awaited: it returns at once while neither has
        happened. ``conn.cancel()`` aborts the exchange (its caller left)."""
        idle = self._idle
        if not idle or method not in IDEMPOTENT:
            return None
        head = self._head(method, target, headers, False, None)
        conn = idle.pop()
        conn._state = _BUSY  # from idle: nothing stray was read on it (that closes an idle one)
        stats = self.stats
        stats.requests += 1
        stats.reuses += 1
        conn._listener = listener
        conn._begin(method == "HEAD")
        # Written at the end of this loop turn's callbacks, with the other heads of the
        # turn and before the clients' output (turn.py). A connection closed meanwhile
        # sends nothing.
        outbox = self._outbox
        if not outbox:
            self._turn.hold(UPSTREAM_WRITES, self._flush)
        outbox.append((conn, head))
        return conn

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, []
        for conn, head in outbox:
            if conn._state == _BUSY:
                conn._transport.write(head)

    async def resume(self, conn: _Conn, method: str, target: str,
                     headers: Iterable[tuple[str, str]] | bytes) -> Response:
        """After ``send_idle``'s exchange failed before its head: what ``request()``
        does on the same failure (a stale connection: once more on a new one)."""
        exc = conn._exc
        conn.cancel()  # closed already, mostly; a timed-out one is aborted
        if isinstance(exc, _Stale):
            self.stats.retries += 1
            return await self.request(method, target, headers, _replay=True)
        if isinstance(exc, UpstreamFailure):
            self.stats.fail(exc.reason)
        assert exc is not None
        raise exc

    def _head(self, method: str, target: str, headers: Iterable[tuple[str, str]] | bytes, has_body: bool,
              length: int | None) -> bytes:
        if "#" in target:
            target = target.partition("#")[0]  # a fragment is not part of a request-target (RFC 9112 §3.2)
        if not isinstance(headers, bytes):
            return self._head_pairs(method, target, headers, has_body, length)
        # header lines already made (headers.request_fields: checked, no framing), the
        # gateway's case: only the request line is checked here
        start = f"{method} {target} HTTP/1.1\r\n".encode("utf-8", "surrogateescape")
        # (on the strs: four ``in`` cost less than two counts on the bytes)
        if "\r" in target or "\n" in target or "\r" in method or "\n" in method:
            raise ValueError("CR or LF in the request target")
        if has_body:
            framing = (b"Content-Length: %d\r\n\r\n" % length if length is not None
                       else b"Transfer-Encoding: chunked\r\n\r\n")
        elif method in _BODY_METHODS:
            framing = b"Content-Length: 0\r\n\r\n"
        else:
            framing = b"\r\n"
        # (a client's Host comes first, as a rule: the whole block is lowered only when not)
        if headers[:5].lower() == b"host:" or b"\nhost:" in headers.lower():
            return start + headers + framing
        return start + headers + self._host_bytes + framing

    def _head_pairs(self, method: str, target: str, headers: Iterable[tuple[str, str]], has_body: bool,
                    length: int | None) -> bytes:
        """``_head`` for ``(name, value)`` pairs, each checked and framing ones dropped."""
        parts = [f"{method} {target} HTTP/1.1\r\n"]
        host = False
        for name, value in headers:
            n = len(name)
            # length first: lower() only for the few names that can match
            if n == 4 and name.lower() == "host":
                host = True
            elif (n == 14 and name.lower() == "content-length") or (n == 17 and name.lower() == "transfer-encoding"):
                continue  # framing is ours (body/body_length): never two conflicting framings
            parts.append(f"{name}: {value}\r\n")
        if not host:
            parts.append(self._host_line)
        if has_body:
            parts.append(f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n")
        elif method in _BODY_METHODS:
            parts.append("Content-Length: 0\r\n")
        parts.append("\r\n")
        text = "".join(parts)
        # every part ends with the one CRLF it may contain: any other CR or LF would split the request
        if text.count("\n") != len(parts) or text.count("\r") != len(parts):
            raise ValueError("CR or LF in the request target or a header")
        return text.encode("utf-8", "surrogateescape")

    # -- connections ------------------------------------------------------------------------
    async def _acquire(self, fresh: bool, connect_timeout: float | None = None) -> _Conn:
        """A connection for one request: pooled (unless ``fresh``), new, or handed over."""
        if self._closed:
            raise RuntimeError("H1Pool is closed")
        idle = self._idle
        if idle and not fresh:
            conn = idle.pop()
            conn._state = _BUSY
            self.stats.reuses += 1
            return conn
        if idle and self._limit and self._open >= self._limit:
            idle[0]._close(graceful=True)  # fresh: make room (FIFO: a waiter, if any, gets the slot first)
        if self._limit and self._open >= self._limit:
            fut: asyncio.Future[_Conn | None] = self._get_loop().create_future()
            self._waiters.append(fut)
            try:
                conn_or_slot = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():  # handed over, then cancelled: pass it on
                    got = fut.result()
                    if got is None:
                        self._free()
                    else:
                        self._recycle(got)
                raise
            if conn_or_slot is not None:
                self.stats.reuses += 1
                return conn_or_slot
            if self._closed:
                self._free()
                raise RuntimeError("H1Pool is closed")
        else:
            self._open += 1  # the slot is ours from here
        try:
            return await self._connect(self.connect_timeout if connect_timeout is None else connect_timeout)
        except BaseException:
            self._free()
            raise

    async def _connect(self, timeout: float) -> _Conn:
        loop = self._get_loop()
        conn = _Conn(self, loop)
        self._connecting += 1
        try:
            async with asyncio.timeout(timeout):  # name resolution included
                if self._resolve is None:
                    await loop.create_connection(lambda: conn, self.host, self.port)
                else:
                    await self._connect_resolved(conn)
        except TimeoutError:
            conn._state = _CLOSED
            self.stats.fail("upstream_connect_timeout")
            raise UpstreamFailure(504, "upstream_connect_timeout") from None
        except OSError as exc:
            conn._state = _CLOSED
            reason = "upstream_dns" if isinstance(exc, (socket.gaierror, _Unresolved)) else "upstream_connect"
            self.stats.fail(reason)
            raise UpstreamFailure(502, reason) from None
        finally:
            self._connecting -= 1
        if conn._state == _CLOSED:  # lost between connection_made and here
            raise UpstreamFailure(502, "upstream_connect")
        if self._closed:  # closed while we connected
            conn._transport.close()
            raise RuntimeError("H1Pool is closed")
        conn._state = _BUSY
        self._conns.add(conn)
        self.stats.connects += 1
        conn._timer = loop.call_at(loop.time() + self._step, conn._on_timer)
        return conn

    async def _connect_resolved(self, conn: _Conn) -> None:
        assert self._resolve is not None
        try:
            addresses = await self._resolve(self.host, self.port)
        except OSError as exc:
            raise _Unresolved(str(exc)) from None
        if not addresses:
            raise _Unresolved(f"no address for {self.host}")
        loop = self._get_loop()
        error: OSError | None = None
        for address in addresses:  # in order: the first that accepts
            try:
                await loop.create_connection(lambda: conn, address, self.port)
                return
            except OSError as exc:
                error = exc
        assert error is not None
        raise error

    def _recycle(self, conn: _Conn) -> None:
        """A connection whose exchange ended cleanly: to the first waiter, else idle."""
        if self._closed:
            conn._close(graceful=True)
            return
        waiters = self._waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(conn)  # stays _BUSY: it is the waiter's now
                return
        conn._state = _IDLE
        self._idle.append(conn)

    def _free(self) -> None:
        """A slot was given up: to the first waiter (who connects), else counted free."""
        waiters = self._waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(None)
                return
        self._open -= 1

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # -- state ------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "open": self._open - self._connecting, "connecting": self._connecting,
            "idle": len(self._idle), "waiting": sum(1 for w in self._waiters if not w.done()),
            "requests": s.requests, "reuses": s.reuses, "connects": s.connects, "retries": s.retries,
            "failures": dict(s.failures),
        }

    async def close(self) -> None:
        """Close every connection (in-flight exchanges fail as ``upstream_reset``) and refuse new requests."""
        self._closed = True
        for conn in list(self._conns):
            conn._close(graceful=conn._state == _IDLE)
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                # a woken waiter owns a slot and, seeing the pool closed, frees it: count that slot
                w.set_result(None)
                self._open += 1
        await asyncio.sleep(0)  # let the transports run connection_lost


class _Conn(asyncio.Protocol):
    """One upstream connection: the protocol, its parser and the current exchange's state."""

    __slots__ = (
        "_buf", "_buffered", "_done", "_drain", "_exc", "_fields", "_garbage", "_got", "_head_done",
        "_head_only", "_head_pos", "_interim", "_keep_alive", "_listener", "_loop", "_parser", "_partial", "_paused",
        "_poller", "_pool", "_raw", "_reason", "_reused", "_sourcing", "_stamp", "_state", "_status", "_timer",
        "_transport", "_waiter", "_write_paused", "_writer",
    )

    def __init__(self, pool: H1Pool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._state = _NEW
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
        if self._state != _BUSY or self._garbage:  # handed over to a waiter, then lost or sent bytes
            raise _Stale() if self._reused else _reset()
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
                if self._state == _CLOSED:
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
                    if self._state == _CLOSED:
                        return
            if self._state == _CLOSED:
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
            if self._paused and self._state != _CLOSED:
                self._resume()
        elif (self._writer is None and self._keep_alive and not self._garbage and self._state == _BUSY
              and self._pool.keepalive_timeout > 0):
            if self._paused:
                self._resume()  # idle, it must see the server's close
            self._reused = True
            self._stamp = self._loop.time()
            pool = self._pool
            if pool._waiters or pool._closed:
                pool._recycle(self)
            else:  # _recycle's common case, without a call: it runs per response
                self._state = _IDLE
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
        if state in (_CLOSED, _NEW):
            return
        pool = self._detach(state)
        if self._exc is None and not self._done:
            self._exc = _reset()  # whoever still waits on this exchange
        if graceful:
            self._transport.close()
        else:
            self._transport.abort()  # unread bytes or a caller that gave up: no lingering
        pool._free()
        self._wake()

    def _detach(self, state: int) -> H1Pool:
        """Leave the pool's books and stop this connection's timer and body writer
        (both ways a connection ends: closed by us, or lost)."""
        pool = self._pool
        if state == _IDLE:
            pool._idle.remove(self)
        pool._conns.discard(self)
        self._state = _CLOSED
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
        if state == _CLOSED:
            return
        pool = self._pool
        loop = self._loop
        now = loop.time()
        step = now + pool._step
        if state == _IDLE:
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
        if self._state != _BUSY or self._done:
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
        else:
            if head and not self._head_done:
                self._head_part(data)
        if self._listener is not None:
            self._listener.wake()

    def _unsolicited(self) -> None:
        # a late 408, garbage after a complete response, or bytes while idle
        self._garbage = True
        if self._state == _IDLE:
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
        if state in (_CLOSED, _NEW):
            self._state = _CLOSED
            return
        pool = self._detach(state)
        if state == _BUSY and not self._done and self._exc is None:
            if self._head_done:
                if exc is not None:
                    self._exc = _reset()
                elif self._until_close():
                    self._done = True  # the body was delimited by this close
                    self._keep_alive = False
                else:  # a clean close before the length or the last chunk: a malformed response
                    self._exc = _invalid()
            elif not self._got and self._reused:
                self._exc = _Stale()
            else:
                self._exc = _reset()
        pool._free()
        self._wake()

    def _until_close(self) -> bool:
        """Whether the body of the response whose head is in is delimited by the close (a
        HEAD's response is done at its head). Asked only when the connection ends mid-body,
        not worked out per response."""
        status = self._status
        return not self._keep_alive and status != 204 and status != 304 and _needs_eof(split_fields(self._fields))

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
        if status < 200:
            if status not in _INTERIM or end < 0 or end - pos > MAX_HEAD:
                raise _Refused  # 101 (we never ask to upgrade), an unknown 1xx, or no end
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
    ``end``) over the limits: MAX_HEAD, MAX_HEADERS, MAX_LINE."""
    if end < 0 or end - pos > MAX_HEAD or raw.count(b"\r\n", eol + 2, end) >= MAX_HEADERS:
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


class Response:
    """A response whose head is in; its body is read from the connection."""

    __slots__ = ("_conn", "_headers", "complete", "fields", "keep_alive", "reason", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn: _Conn | None = conn
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

    def read_small(self, limit: int = 65536) -> bytes | None:
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

    def close(self) -> None:
        """Done with this response: the connection is reused if the body was read in full
        and keep-alive allows it, otherwise closed at once. Idempotent."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if conn._done and not conn._buf and conn._state == _BUSY:
            self.complete = True
            conn._take()  # nothing left to take: it ends the exchange
        else:
            conn._close()

    release = close

