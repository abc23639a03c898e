"""H1Pool: keep-alive HTTP/1.1 connections to one upstream server, how requests
are sent on them, and the slots and waiters that bound them (see gatewayd.http.client
for what it promises)."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Sequence
from typing import Any

from .client_connection import BUSY, CLOSED, IDLE, ClientConnection, Listener, PoolStats, Stale, reset, tls_failure
from .client_response import Response
from .errors import UpstreamFailure
from .turn import UPSTREAM_WRITES, Turn
from .wire import IDEMPOTENT

READ_BUFFER = 131072  # body bytes buffered before the upstream socket is paused (as aiohttp: 2 x 64 KiB)
# methods that define a meaning for content: sent with "Content-Length: 0" when bodiless (RFC 9110 §8.6)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

log = logging.getLogger("gatewayd")


class _Unresolved(OSError):
    """The resolver gave no address."""


class H1Pool:
    """Keep-alive HTTP/1.1 connections to one server ``(host, port)``."""

    __slots__ = (
        "_closed", "_connecting", "_conns", "_host_bytes", "_host_line", "_idle", "_limit", "_loop", "_open",
        "_outbox", "_resolve", "_server_hostname", "_ssl", "_step", "_tls_said", "_turn", "_waiters",
        "connect_timeout", "host", "keepalive_timeout", "port", "read_buffer", "read_timeout", "stats",
    )

    def __init__(self, host: str, port: int, *, max_connections: int = 0, keepalive_timeout: float = 4.0,
                 connect_timeout: float = 2.0, read_timeout: float = 30.0,
                 read_buffer: int = READ_BUFFER,
                 resolve: Callable[[str, int], Awaitable[Sequence[str]]] | None = None,
                 turn: Turn | None = None, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> None:
        self.host = host
        self.port = port
        self.keepalive_timeout = keepalive_timeout
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.read_buffer = read_buffer
        self.stats = PoolStats()
        self._limit = max_connections
        self._resolve = resolve  # (host, port) -> addresses to try in order; None: the loop resolves
        self._ssl = tls  # an https server's: every connection made with it (its handshake in connect_timeout)
        self._server_hostname = (server_hostname or host) if tls is not None else None  # SNI, the name verified
        self._tls_said = ""  # the last handshake failure logged (each new one is logged once)
        # the connection timers' period: no deadline can be missed by more than the loop's lateness
        self._step = max(0.001, min(read_timeout, keepalive_timeout) if keepalive_timeout > 0 else read_timeout)
        bracketed = f"[{host}]" if ":" in host else host
        default_port = 80 if tls is None else 443
        self._host_line = f"Host: {bracketed}:{port}\r\n" if port != default_port else f"Host: {bracketed}\r\n"
        self._host_bytes = self._host_line.encode("utf-8", "surrogateescape")
        self._idle: list[ClientConnection] = []  # LIFO: append/pop at the end
        self._conns: set[ClientConnection] = set()  # every open connection (for close); touched per connect only
        self._waiters: deque[asyncio.Future[ClientConnection | None]] = deque()
        self._open = 0  # slots taken: connecting + connected
        self._connecting = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list[tuple[ClientConnection, bytes]] = []
        self._turn = turn if turn is not None else Turn()  # the gateway's: heads go out before its clients' output

    # -- requests ---------------------------------------------------------------------------
    async def request(self, method: str, target: str, headers: Iterable[tuple[str, str]] | bytes,
                      body: AsyncIterable[bytes] | None = None, body_length: int | None = None,
                      connect_timeout: float | None = None, *, _replay: bool = False,
                      upgrade: bool = False) -> Response:
        """Send a request and return its response once the head is in (see the module doc).
        ``connect_timeout`` overrides the pool's for a connection this request opens
        (a retry with little time left). ``_replay``: ``send_idle`` already sent it,
        on a connection found stale (counted once; this time on a new connection).
        ``upgrade``: the request asks to switch protocols (its headers say to what); a
        101 ends the exchange and ``Response.detach`` takes the connection out of the
        pool for good."""
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
                conn._state = BUSY
                stats.reuses += 1
            else:
                conn = await self._acquire(fresh, connect_timeout)
            if not replayable and conn._reused and conn._state == BUSY and conn._peer_gone():
                # closed (or written to) by the server while pooled, and the loop has not run its
                # callback yet: a request that cannot be replayed must not be lost on it
                stats.reuses -= 1
                conn._close()
                continue
            # inlined, not a coroutine of the connection's: one frame less per request
            try:
                if upgrade:
                    conn._upgrading = True
                conn._send(head, head_only, body, body_length)
                while not conn._head_done:
                    exc = conn._exc
                    if exc is not None:
                        raise exc
                    conn._waiter = waiter = conn._loop.create_future()
                    await waiter
                if upgrade and conn._status != 101:
                    conn._upgrading = False  # refused: an HTTP connection again, pooled if it may be
                return Response(conn)
            except Stale:
                conn._close()
                if fresh or not replayable:
                    stats.fail("upstream_reset")
                    raise reset() from None
                stats.retries += 1
                fresh = True
            except BaseException as exc:
                conn._close()  # failed, timed out, or the caller was cancelled: abort now
                if isinstance(exc, UpstreamFailure):
                    stats.fail(exc.reason)
                raise

    def send_idle(self, method: str, target: str, headers: Iterable[tuple[str, str]] | bytes,
                  listener: Listener) -> ClientConnection | None:
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
        conn._state = BUSY  # from idle: nothing stray was read on it (that closes an idle one)
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
            if conn._state == BUSY:
                conn._transport.write(head)

    async def resume(self, conn: ClientConnection, method: str, target: str,
                     headers: Iterable[tuple[str, str]] | bytes) -> Response:
        """After ``send_idle``'s exchange failed before its head: what ``request()``
        does on the same failure (a stale connection: once more on a new one)."""
        exc = conn._exc
        conn.cancel()  # closed already, mostly; a timed-out one is aborted
        if isinstance(exc, Stale):
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
    async def _acquire(self, fresh: bool, connect_timeout: float | None = None) -> ClientConnection:
        """A connection for one request: pooled (unless ``fresh``), new, or handed over."""
        if self._closed:
            raise RuntimeError("H1Pool is closed")
        idle = self._idle
        if idle and not fresh:
            conn = idle.pop()
            conn._state = BUSY
            self.stats.reuses += 1
            return conn
        if idle and self._limit and self._open >= self._limit:
            idle[0]._close(graceful=True)  # fresh: make room (FIFO: a waiter, if any, gets the slot first)
        if self._limit and self._open >= self._limit:
            fut: asyncio.Future[ClientConnection | None] = self._get_loop().create_future()
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

    async def _connect(self, timeout: float) -> ClientConnection:
        loop = self._get_loop()
        conn = ClientConnection(self, loop)
        self._connecting += 1
        try:
            async with asyncio.timeout(timeout):  # name resolution included
                if self._resolve is None:
                    await loop.create_connection(lambda: conn, self.host, self.port, ssl=self._ssl,
                                                 server_hostname=self._server_hostname)
                else:
                    await self._connect_resolved(conn)
        except TimeoutError:
            conn._state = CLOSED
            self.stats.fail("upstream_connect_timeout")
            raise UpstreamFailure(504, "upstream_connect_timeout") from None
        except ssl.SSLError as exc:  # (an OSError) the handshake failed, or the certificate's verification
            conn._state = CLOSED
            self.stats.fail("upstream_tls")
            self._tls_failed(exc)
            raise tls_failure() from None
        except OSError as exc:
            conn._state = CLOSED
            reason = "upstream_dns" if isinstance(exc, (socket.gaierror, _Unresolved)) else "upstream_connect"
            self.stats.fail(reason)
            raise UpstreamFailure(502, reason) from None
        finally:
            self._connecting -= 1
        if conn._state == CLOSED:  # lost between connection_made and here
            raise UpstreamFailure(502, "upstream_connect")
        if self._closed:  # closed while we connected
            conn._transport.close()
            raise RuntimeError("H1Pool is closed")
        conn._state = BUSY
        self._conns.add(conn)
        self.stats.connects += 1
        conn._timer = loop.call_at(loop.time() + self._step, conn._on_timer)
        return conn

    async def _connect_resolved(self, conn: ClientConnection) -> None:
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
                await loop.create_connection(lambda: conn, address, self.port, ssl=self._ssl,
                                             server_hostname=self._server_hostname)
                return
            except ssl.SSLError:
                raise  # the server answered: another address of the name would show the same certificate
            except OSError as exc:
                error = exc
        assert error is not None
        raise error

    def _tls_failed(self, exc: ssl.SSLError) -> None:
        """Log why a handshake failed (or a server refused it with an alert after it), once
        for each new why: a server that fails every handshake the same way is said once."""
        why = getattr(exc, "verify_message", None) or exc.reason or str(exc)
        if why != self._tls_said:
            self._tls_said = why
            log.warning("upstream %s:%d (TLS name %s): TLS handshake failed: %s", self.host, self.port,
                        self._server_hostname, why)

    def _recycle(self, conn: ClientConnection) -> None:
        """A connection whose exchange ended cleanly: to the first waiter, else idle."""
        if self._closed:
            conn._close(graceful=True)
            return
        waiters = self._waiters
        while waiters:
            w = waiters.popleft()
            if not w.done():
                w.set_result(conn)  # stays BUSY: it is the waiter's now
                return
        conn._state = IDLE
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
            conn._close(graceful=conn._state == IDLE)
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                # a woken waiter owns a slot and, seeing the pool closed, frees it: count that slot
                w.set_result(None)
                self._open += 1
        await asyncio.sleep(0)  # let the transports run connection_lost
