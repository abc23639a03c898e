"""Client connections: HTTP/1.1 on aiohttp's C parser, without aiohttp's server.

aiohttp's ``RequestHandler`` keeps a task, a future and the last request alive
on every idle keep-alive connection, and builds a request object, a response
object and a task for every request, shed or not. Here an idle connection is a
transport, this protocol, its parser and one timer; a request is a small
``Request`` around the parser's message, and the gateway answers what it can
(shed, 404, refusals) synchronously, inside ``data_received``: a shed costs no
task, no coroutine and no response object. Only a request that goes upstream
gets a task, which the connection cancels when its client leaves.

What the protocol owns (the gateway never sees it):
- pipelining: a read is parsed one head at a time while fewer than
  ``MAX_PIPELINED`` requests wait their turn; the rest waits as bytes (at most
  ``READ_AHEAD`` of them: past that the requests parsed are answered and the
  connection closes) and reading pauses; a client that does not take its
  responses (pause_writing) is neither read nor answered until it does;
- the request-head timer (first byte to end of head, for every head the parser
  holds, also behind requests being answered; 408), the keep-alive timer, and
  the send timer (a client that takes none of its response for
  ``send_timeout`` is disconnected, as nginx's ``send_timeout``);
- a body left unread when the response is out is read and dropped for up to
  ``LINGER`` seconds before the next request, as aiohttp did;
- bytes the parser refuses: the requests before them are answered, then 400
  ``bad_request`` and the connection closes (bytes after a request that ends
  the connection are ignored); refusals and 408s are logged and counted as
  answers without a route (H1Server.refused);
- graceful shutdown: idle connections close, busy ones after their response.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpVersion10
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestPayloadError

from .headers import request_fields, response_headers, split_fields
from .responses import prebuilt
from .turn import CLIENT_READS, CLIENT_WRITES, Turn

log = logging.getLogger("gatewayd")

MAX_LINE = 8190  # the request line and each header line (as aiohttp's server)
MAX_HEADERS = 128
READ_BUFFER = 65536  # a body's bytes buffered before reading from the client pauses
MAX_PIPELINED = 4  # requests parsed ahead of the one being answered before reading pauses
COMPACT_AT = 32768  # bytes parsed off the front of read-ahead bytes before they are copied away
# Pipelined bytes kept unparsed behind the MAX_PIPELINED parsed requests; past it the
# connection answers those and closes (_read_too_far_ahead).
READ_AHEAD = 32768
PIPELINED_WRITE_BUFFER = 16384  # the high-water mark of output buffered for a pipelining client
LINGER = 2.0  # seconds an unread body may take to arrive after the response
# Client reads handled in one turn of the event loop; the rest wait for the next
# turn, in arrival order (see H1Server.admit_read).
READS_PER_TURN = 16
SWEEP_INTERVAL = 1.0  # seconds between the keep-alive sweeps over the idle connections
HEADS_KEPT = 256  # response heads remembered (Request.head_for), forgotten all at once when full
HEAD_KEPT_SIZE = 4096  # bytes of upstream header lines beyond which a head is not remembered
PARSER_IDLE = 2.0  # seconds idle after which a connection's parser is dropped (made again on its next bytes)

_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_BAD_REQUEST = prebuilt(400, "bad_request", None, True)
_NO_BODY_STATUS = frozenset((204, 304))
# what the access log shows of a refused request: its request line, when it has one
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}) (\S{1,8190}) HTTP/(\d)\.(\d)\r\n")


class ServerSettings(Protocol):
    """The ``[server]`` settings a connection reads (config.settings.ServerConfig)."""

    @property
    def keepalive_timeout(self) -> float: ...
    @property
    def request_header_timeout(self) -> float: ...
    @property
    def send_timeout(self) -> float: ...


class Cancellable(Protocol):
    """What a connection cancels when its client leaves: a task, or an inline exchange."""

    def cancel(self) -> object: ...


class Refusal:
    """The answer a connection ends with when the parser refuses its bytes (400) or a
    head does not arrive in time (408): sent once the requests before it are answered,
    then logged and counted as any answer (H1Server.refused)."""

    __slots__ = ("duration", "line", "logged", "reason", "response", "status")

    def __init__(self, response: bytes, status: int, reason: str,
                 line: re.Match[bytes] | None, duration: float, logged: bool = False) -> None:
        self.logged = logged  # counted and logged already, by the request whose body it ends
        self.response = response
        self.status = status
        self.reason = reason
        self.line = line  # the refused request's line, when the refused bytes start with one
        self.duration = duration

    def request_line(self) -> tuple[str, str, str]:
        """Method, target and version as far as known, else "-"."""
        line = self.line
        if line is None:
            return "-", "-", "-"
        method, target, major, minor = (g.decode("latin-1") for g in line.groups())
        return method, target, f"{major}.{minor}"


class Request:
    """One request, as the gateway sees it; lives until its response is out."""

    __slots__ = ("_chunked", "body_exists", "content", "headers", "keep_alive",
                 "message", "method", "protocol", "raw_headers", "raw_path", "task", "version")

    def __init__(self, message: RawRequestMessage, payload: StreamReader, protocol: H1Protocol) -> None:
        self.message = message
        self.method: str = message.method
        self.raw_path: str = message.path
        self.version = message.version
        self.headers = message.headers
        raw = message.raw_headers
        if raw == protocol._last_raw:
            # One object for the fields a client repeats request after request: the
            # connection's memos of them (upstream_fields, requestcheck.origin_target)
            # compare by identity, and the fields are compared once, here.
            raw = protocol._last_raw
        else:
            protocol._last_raw = raw
        self.raw_headers = raw
        self.content = payload
        self.body_exists = payload is not EMPTY_PAYLOAD
        self.keep_alive = not message.should_close and not protocol.server.closing
        self.protocol = protocol
        self.task: Cancellable | None = None  # what serves it: a task, or an inline exchange
        self._chunked = False

    @property
    def transport(self) -> asyncio.Transport | None:
        return self.protocol.transport

    @property
    def remote(self) -> str | None:
        protocol = self.protocol
        host = protocol._peer_host  # known after the connection's first request
        return host if host is not None else protocol.peer_host

    @property
    def content_length(self) -> int | None:
        """The length of the body to read, as Content-Length declares it; None when
        there is none to read (no body, or ``Content-Length: 0``) or it is chunked."""
        if not self.body_exists:
            return None
        value = self.headers.get("Content-Length")
        return int(value) if value is not None else None

    # -- answering ----------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Bytes to the client (a head, a small response, 100 Continue), sent with the
        others of this loop turn (H1Server.flush)."""
        self.protocol.send_later(data)

    def upstream_fields(self) -> bytes:
        """``headers.request_fields`` for this request, remembered per connection: a
        client sends the same headers request after request on a keep-alive
        connection, and comparing them with the last ones costs far less than
        filtering them again."""
        protocol = self.protocol
        raw = self.raw_headers
        memo = protocol._fields_memo
        if memo is not None and memo[0] is raw:  # equal fields are one object (__init__)
            return memo[1]
        fields = request_fields(raw, self.remote or "", self.headers.get("Host", ""))
        protocol._fields_memo = (raw, fields)
        return fields

    def force_close(self) -> None:
        """The connection closes once this request's response is out."""
        self.keep_alive = False

    def abort(self) -> None:
        """Cut the connection now (a response that cannot be finished)."""
        self.keep_alive = False
        self.protocol.abort()

    def head(self, status: int, reason: str, headers: list[tuple[str, str]],
             length: int | None) -> bytes:
        """A response head for ``headers`` (hop-by-hop already removed) with this
        request's framing: ``length`` bytes, or chunked when None (close-delimited for
        an HTTP/1.0 client). A response without a body (HEAD, 1xx, 204, 304) keeps
        the headers as they are."""
        parts = [f"HTTP/1.1 {status} {reason}\r\n"]
        if self.method == "HEAD" or status < 200 or status in _NO_BODY_STATUS:
            parts.extend(f"{n}: {v}\r\n" for n, v in headers)
        else:
            parts.extend(f"{n}: {v}\r\n" for n, v in headers if n.lower() != "content-length")
            if length is not None:
                parts.append(f"Content-Length: {length}\r\n")
            elif self.version == HttpVersion10:
                self.keep_alive = False  # the end of the body is the end of the connection
            else:
                self._chunked = True
                parts.append("Transfer-Encoding: chunked\r\n")
        if not self.keep_alive or self.protocol.server.closing:
            self.keep_alive = False
            parts.append("Connection: close\r\n")
        elif self.version == HttpVersion10:
            parts.append("Connection: keep-alive\r\n")
        parts.append("\r\n")
        return "".join(parts).encode("utf-8", "surrogateescape")

    def head_for(self, status: int, reason: str, fields: bytes, length: int) -> bytes:
        """``head`` for an upstream's header lines as received (``Response.fields``) and
        a body of ``length`` bytes (not for HEAD, 1xx, 204 or 304). Heads are
        remembered by the server: an upstream sends the same head response after
        response (its Date aside, once a second), and filtering and formatting it
        costs more than the rest of a small response."""
        server = self.protocol.server
        if not self.keep_alive or server.closing:
            mode = 2
        elif self.version is HttpVersion10:  # (the parser's own object: no tuple compare)
            mode = 1
        else:
            mode = 0
        key = (status, reason, fields, length, mode)
        heads = server.heads
        head = heads.get(key)
        if head is None:
            head = self.head(status, reason, response_headers(split_fields(fields)), length)
            if len(fields) <= HEAD_KEPT_SIZE:  # a longer one is rare, and not worth the memory
                if len(heads) >= HEADS_KEPT:
                    heads.clear()
                heads[key] = head
        elif mode == 2:
            self.keep_alive = False  # as head() decides
        return head

    async def send(self, data: bytes, last: bool = False) -> None:
        """Body bytes (chunk-encoded if the head said so); ``last`` ends the body.
        Waits while the client's buffer is full; raises ConnectionResetError when
        the client is gone."""
        protocol = self.protocol
        transport = protocol.transport
        if transport is None:
            raise ConnectionResetError("client gone")
        protocol.uncork()  # what went before (the head), then this
        if self._chunked:
            if data:
                transport.write(b"%x\r\n%s\r\n" % (len(data), data))
            if last:
                transport.write(b"0\r\n\r\n")
        elif data:
            transport.write(data)
        if protocol._paused:
            await protocol._drain_helper()

    def as_aiohttp(self, client_max_size: int, rel_url: str | None = None) -> web.BaseRequest:
        """This request as aiohttp's, for an inline handler written against aiohttp."""
        protocol = self.protocol
        writer = StreamWriter(protocol, protocol._loop)  # type: ignore[arg-type]
        task = asyncio.current_task()
        request = web.BaseRequest(self.message, self.content, protocol, writer,  # type: ignore[arg-type]
                                  task, protocol._loop, client_max_size=client_max_size)  # type: ignore[arg-type]
        if not self.keep_alive:
            request._cache["keep_alive"] = False  # type: ignore[attr-defined]
        if rel_url is not None:
            request = request.clone(rel_url=rel_url)
        return request


class H1Server:
    """The protocol factory for the accept loop; holds the settings every connection
    reads (changed in place on reload: ``configure``) and the open connections (for
    shutdown)."""

    def __init__(self, handler: Callable[[Request], None], settings: ServerSettings, *,
                 on_close: Callable[[], None], turn: Turn | None = None,
                 log_refusal: Callable[[str, str, str, str, int, str, float], None] | None = None) -> None:
        self.handler = handler
        # shared with the upstream pools, whose request heads go out first at each turn's end
        self.turn = turn if turn is not None else Turn()
        self.head_timeout = self.send_timeout = self.keepalive_timeout = 0.0
        self.configure(settings)
        self._on_close = on_close
        self.connections: set[H1Protocol] = set()
        self.closing = False
        self.heads: dict[tuple[int, str, bytes, int, int], bytes] = {}  # see Request.head_for
        self.bad_requests = 0  # refused by the HTTP parser (400 bad_request)
        self.read_ahead_closes = 0  # connections closed for pipelining too far ahead
        # answers given without a route (parser refusals, head timeouts, no_route), by status:
        # gatewayd_requests_total{route="-"}
        self.unrouted: dict[int, int] = {}
        self.log_refusal = log_refusal
        self.deferred_reads = 0  # client reads put off to a later loop turn (saturated)
        self._empty: asyncio.Event | None = None
        self._turn_left = READS_PER_TURN
        self._turn_armed = False
        self._deferred: deque[H1Protocol] = deque()
        self._backlog: deque[H1Protocol] = deque()  # pipelined requests put off (defer)
        self._sweeper: asyncio.TimerHandle | None = None
        self.sweeps = 0
        self._corked: list[H1Protocol] = []  # connections with output held for this turn's flush

    def configure(self, settings: ServerSettings) -> None:
        """Take the settings in force (at start and at every reload). They are copied
        into this object's own attributes because connections read them per request,
        and one attribute load is what the request path can afford."""
        self.head_timeout = settings.request_header_timeout
        self.send_timeout = settings.send_timeout
        self.keepalive_timeout = settings.keepalive_timeout

    def __call__(self) -> H1Protocol:
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)
        return H1Protocol(self)

    def _sweep(self) -> None:
        """Close the connections idle for ``keepalive_timeout`` and drop the parsers of
        those idle for ``PARSER_IDLE``. One timer for all: a timer per connection costs
        about 600 bytes and a parser 1,200, on every idle connection (the 100,000
        connection goal); the price is a keep-alive timeout within a second of exact."""
        loop = asyncio.get_running_loop()
        self.sweeps += 1
        now = loop.time()
        close_before = now - self.keepalive_timeout
        trim_before = now - PARSER_IDLE
        for protocol in tuple(self.connections):
            since = protocol.idle_since
            if since is None:
                continue
            if since <= close_before:
                protocol.close_idle()
            elif since <= trim_before and protocol._clean:
                protocol._parser = None
                protocol._last_raw = protocol._fields_memo = protocol.checked_headers = None
        if self.connections or not self.closing:
            self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)
        else:
            self._sweeper = None

    # -- fairness between clients and upstreams under saturation ---------------------------
    def admit_read(self, protocol: H1Protocol) -> bool:
        """Whether a client's bytes are handled now or in a later loop turn.

        With thousands of clients sending at once, one turn of the event loop would
        otherwise handle all of them (shedding most) before it comes back to the
        upstream connections: every admitted request then waits a whole turn per
        step, tens of milliseconds, and a 100 ms backend serves half its capacity.
        Bounding the client reads handled per turn keeps a turn short, so upstream
        responses (read by other protocols, not counted) move at once; the clients
        put off are handled first in the turns that follow, in arrival order.
        Nothing changes below ``READS_PER_TURN`` ready clients."""
        if self._turn_left > 0 and not self._deferred:
            self._turn_left -= 1
            if not self._turn_armed:
                self._turn_armed = True
                self.turn.hold(CLIENT_READS, self._new_turn)
            return True
        self._deferred.append(protocol)
        self.deferred_reads += 1
        if not self._turn_armed:
            self._turn_armed = True
            self.turn.hold(CLIENT_READS, self._new_turn)
        return False

    def defer(self, protocol: H1Protocol) -> None:
        """Put off the rest of ``protocol``'s pipelined requests to a later turn, behind
        the reads of clients put off (their first requests come first: a pipelining
        client has had its turn)."""
        self._backlog.append(protocol)
        if not self._turn_armed:
            self._turn_armed = True
            self.turn.hold(CLIENT_READS, self._new_turn)

    def _new_turn(self) -> None:
        # runs once per loop turn, at its end, after the turn's writes (see turn.py)
        self._turn_left = READS_PER_TURN
        deferred = self._deferred
        while deferred and self._turn_left > 0:
            protocol = deferred.popleft()
            if protocol.transport is not None:
                self._turn_left -= 1
                protocol._undefer()
        backlog = self._backlog
        left = READS_PER_TURN  # (as many again as reads, however many read)
        while backlog and left > 0:
            protocol = backlog.popleft()
            if protocol.transport is not None:
                left -= 1
                protocol._undefer()
        if deferred or backlog:
            self.turn.hold(CLIENT_READS, self._new_turn)
        else:
            self._turn_armed = False

    # -- writes: one burst per loop turn ----------------------------------------------------
    def flush(self) -> None:
        """Write the output held this turn (H1Protocol.send_later), at its end (turn.py)."""
        corked, self._corked = self._corked, []
        for protocol in corked:
            protocol.uncork()

    def refused(self, protocol: H1Protocol, refusal: Refusal) -> None:
        """A refusal is out: counted and logged as any answer (route "-")."""
        self.count_unrouted(refusal.status)
        if self.log_refusal is not None:
            method, target, version = refusal.request_line()
            self.log_refusal(protocol.peer_host or "-", method, target, version,
                             refusal.status, refusal.reason, refusal.duration)

    def count_unrouted(self, status: int) -> None:
        codes = self.unrouted
        codes[status] = codes.get(status, 0) + 1

    def _closed(self, protocol: H1Protocol) -> None:
        self.connections.discard(protocol)
        self._on_close()
        if not self.connections and self._empty is not None:
            self._empty.set()

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections now and the others once their response is out;
        after ``timeout``, cancel what is left and cut those connections."""
        self.closing = True
        for protocol in list(self.connections):
            protocol.close_when_idle()
        if self.connections:
            self._empty = asyncio.Event()
            try:
                await asyncio.wait_for(self._empty.wait(), timeout)
            except TimeoutError:
                pass
        for protocol in list(self.connections):
            protocol.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class H1Protocol(BaseProtocol):
    """One client connection. See the module docstring."""

    __slots__ = (
        "_clean",
        "_close_after",
        "_fields_memo",
        "_final",
        "_head_timer",
        "_idle_at",
        "_last_raw",
        "_out",
        "_peer",
        "_peer_host",
        "_pending",
        "_put_off",
        "_send_timer",
        "_stepping",
        "_tail",
        "_unparsed",
        "_unparsed_at",
        "_write_held",
        "checked_headers",
        "current",
        "server",
    )

    def __init__(self, server: H1Server) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(loop)
        self.server = server
        self._parser: HttpRequestParser | None = None  # made on the first bytes
        self._clean = True  # the parser holds no part of a request (it may be dropped)
        self.current: Request | None = None
        self._pending: deque[tuple[RawRequestMessage, StreamReader]] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._idle_at = 0.0
        self._close_after = False  # the parser failed or the client's framing ended: no more requests
        self._stepping = False
        self._final: Refusal | None = None  # the answer after the requests parsed before it, then close
        self._unparsed: bytes | None = None  # bytes read ahead, parsed as requests are answered
        self._unparsed_at = 0  # where the unparsed part of _unparsed starts
        self._write_held = False  # responses are not leaving: nothing more is read or answered
        # after an upgrade request, the bytes that follow it, unparsed until it is answered
        # (never 101: upgrades are not proxied, and the next request is HTTP again)
        self._tail: bytes | None = None
        self._put_off: bytes | None = None  # bytes read while other clients had the turn
        self._peer: Any = None
        self._peer_host: str | None = None  # the client's address, as the gateway logs and forwards it
        self._out: list[bytes] | None = None  # output held until the turn's flush (send_later)
        self._last_raw: tuple[tuple[bytes, bytes], ...] | None = None  # see Request.__init__
        self._fields_memo: tuple[Any, bytes] | None = None  # see Request.upstream_fields
        self.checked_headers: tuple[Any, int] | None = None  # see requestcheck.origin_target

    # -- what aiohttp's request needs of its protocol -----------------------------------
    ssl_context = None
    max_field_size = MAX_LINE
    max_headers = MAX_HEADERS

    @property
    def peername(self) -> Any:
        if self._peer is None and self.transport is not None:
            self._peer = self.transport.get_extra_info("peername")
        return self._peer

    @property
    def sockname(self) -> Any:
        return self.transport.get_extra_info("sockname") if self.transport is not None else None

    @property
    def peer_host(self) -> str | None:
        host = self._peer_host
        if host is None:
            peer = self.peername
            if isinstance(peer, (list, tuple)) and peer:
                host = self._peer_host = str(peer[0])
        return host

    # -- connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TCP_NODELAY is set by the accept loop, on the socket
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self._idle()

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._head_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._send_timer = None
        self._out = None
        super().connection_lost(exc)
        current = self.current
        self.current = None
        self._pending = None
        if current is not None:
            payload = current.content
            if payload is not EMPTY_PAYLOAD and not payload.is_eof():
                payload.set_exception(ConnectionResetError("client gone"))
            if current.task is not None:
                # the handler's task stops: its queue place, slot and upstream request go.
                # Cancelled from the next loop turn: a task created in this one has not
                # started, and a coroutine cancelled before its first step runs none of
                # its cleanup (the slot it was given would leak).
                self._loop.call_soon(current.task.cancel)
        self._parser = None
        self.server._closed(self)

    def abort(self) -> None:
        if self.transport is not None:
            self._out = None
            self.transport.abort()

    def close_when_idle(self) -> None:
        self._close_after = True
        if self.current is None and not self._pending and self.transport is not None:
            self._close()

    # -- output, held for the turn's flush -----------------------------------------------
    def send_later(self, data: bytes) -> None:
        """``data`` to the client, in order, at the end of this loop turn's callbacks."""
        if self.transport is None:
            return
        out = self._out
        if out is None:
            self._out = [data]
            corked = self.server._corked  # the connections the turn's flush writes
            if not corked:
                self.server.turn.hold(CLIENT_WRITES, self.server.flush)
            corked.append(self)
        else:
            out.append(data)

    def uncork(self) -> None:
        """Write what is held now (before any other write, close or end of the turn)."""
        out = self._out
        if out:
            self._out = None
            if self.transport is not None:
                self.transport.writelines(out)

    def _close(self) -> None:
        """Close after what is held and what is buffered are sent."""
        self._close_after = True  # (nothing read after this is parsed)
        self.uncork()
        if self.transport is not None:
            self.transport.close()

    # -- reading ------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._put_off is not None:
            # already waiting for its turn: keep the bytes (bounded: reading pauses)
            self._put_off += data
            if len(self._put_off) >= READ_BUFFER and not self._buffer_paused:
                self._pause_reading_for_buffer()
            return
        # (a read larger than READ_AHEAD is handled at once: put off, a thousand of them
        # would hold a read each, up to 256 KiB; handled, a body's flow control or
        # _read_too_far_ahead lets it go)
        if not self.server.admit_read(self) and len(data) <= READ_AHEAD:
            self._put_off = data  # (a larger read finds its place in the queue empty)
            return
        self._feed(data)

    def _undefer(self) -> None:
        data, self._put_off = self._put_off, None
        if data:
            self._feed(data)
        elif self.current is None and (self._pending or self._unparsed is not None):
            self._step()  # (put off by _step itself)
        if self._buffer_paused:
            self._may_read()

    def _feed(self, data: bytes) -> None:
        if self.transport is None or self._close_after:
            return
        parser = self._parser
        if parser is None:
            parser = self._parser = HttpRequestParser(
                self, self._loop, READ_BUFFER, max_line_size=MAX_LINE, max_field_size=MAX_LINE,
                max_headers=MAX_HEADERS, payload_exception=RequestPayloadError,
                auto_decompress=False,  # a proxy passes bodies on as they are
            )
        if self._tail is not None:
            self._tail += data
            if len(self._tail) >= READ_BUFFER and not self._buffer_paused:
                self._pause_reading_for_buffer()
            return
        if self._unparsed is not None:
            # bytes read before these wait to be parsed (a read under way as reading paused)
            self._unparsed = self._unparsed[self._unparsed_at:] + data
            self._unparsed_at = 0
            if len(self._unparsed) > READ_AHEAD:
                self._read_too_far_ahead()
            return
        if (self.current is not None or self._pending is not None
                or data.find(b"\r\n\r\n") != len(data) - 4):
            # a request under way (these bytes may be its body, or requests behind it), or
            # not one head ending where these bytes end (part of a head, a body, several
            # heads): parsed one head at a time (_parse_ahead)
            self._unparsed = data
            self._unparsed_at = 0
            self._parse_ahead()
            if self.current is None:
                self._step()
            return
        # one head ending where these bytes end, on a connection with nothing under way
        # (the common case: one request per read)
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            self._bad_request(exc, data)
            return
        if upgraded:
            self._tail = bytes(tail)
        if not messages:  # (the end of a head the parser never saw begin: it refuses it)
            self._clean = False
            self._head_arriving(data, None)
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        message, payload = messages[-1]
        # Whether the parser is between requests: the bytes ended a head whose request
        # has no body. Anything else (a body, a part of a head) keeps the parser.
        self._clean = payload is EMPTY_PAYLOAD
        if len(messages) == 1:
            self._dispatch(message, payload)
            return
        pending = self._pending
        if pending is None:
            pending = self._pending = deque()
        pending.extend(messages)
        if len(pending) >= MAX_PIPELINED and not self._buffer_paused:
            self._pause_reading_for_buffer()
        if self.current is None:
            self._step()

    def _parse_ahead(self) -> None:
        """Parse the bytes read ahead, one head per call of the parser, while fewer than
        ``MAX_PIPELINED`` requests wait; the rest stay bytes, and reading pauses until
        they are parsed. A flood of pipelined requests (a 256 KiB read is ~9,700 small
        GETs) then costs a bounded number of parsed messages, not megabytes of them.
        One head per call also keeps the requests before bytes the parser refuses: a
        call that fails drops what it parsed."""
        data = self._unparsed
        parser = self._parser
        if data is None or parser is None:
            return
        pos = self._unparsed_at
        size = len(data)
        pending = self._pending
        while pos < size and (pending is None or len(pending) < MAX_PIPELINED):
            end = data.find(b"\r\n\r\n", pos)
            stop = size if end < 0 else end + 4
            piece = data[pos:stop]
            pos = stop
            body = self._open_body()
            try:
                messages, upgraded, tail = parser.feed_data(piece)
            except HttpProcessingError as exc:
                self._unparsed = None
                self._bad_request(exc, piece)
                return
            if messages:
                if self._head_timer is not None:
                    self._head_timer.cancel()
                    self._head_timer = None
                if pending is None:
                    pending = self._pending = deque()
                pending.extend(messages)
                self._clean = messages[-1][1] is EMPTY_PAYLOAD and end >= 0
            else:
                self._clean = False
                self._head_arriving(piece, body)
            if upgraded:
                self._tail = bytes(tail) + data[pos:]
                pos = size
        if pos < size:
            if size - pos > READ_AHEAD:
                self._read_too_far_ahead()
                return
            if pos >= COMPACT_AT:
                # what is parsed is let go (the bytes may wait long: a client not reading)
                self._unparsed = data = data[pos:]
                pos = 0
            self._unparsed_at = pos
            if not self._buffer_paused:
                self._pause_reading_for_buffer()
                if self.transport is not None:
                    # a pipelining client: less of its output buffered before it counts
                    # as not taking it (pause_writing)
                    self.transport.set_write_buffer_limits(PIPELINED_WRITE_BUFFER)
        else:
            self._unparsed = None
            if self._buffer_paused:
                self._may_read()

    def _read_too_far_ahead(self) -> None:
        """The client sent more than ``READ_AHEAD`` bytes beyond the ``MAX_PIPELINED``
        requests parsed ahead: those are answered, the last with ``Connection: close``,
        and the bytes after them are dropped unread, as a server may close a
        persistent connection at any time (RFC 9112 §9.3.2 has a pipelining client
        send again what was not answered). Otherwise every such connection holds a
        whole read, up to 256 KiB (the event loop's read size): a thousand clients
        that pipeline and never read would hold hundreds of MiB, where nginx reads
        no more than its header buffers hold."""
        self._unparsed = None
        self.server.read_ahead_closes += 1
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        pending = self._pending
        if pending:
            payload = pending[-1][1]
            if payload is not EMPTY_PAYLOAD and not payload.is_eof():
                pending.pop()  # its body is in the bytes dropped: not answered either
        self._close_after = True
        if not self._buffer_paused:
            self._pause_reading_for_buffer()
        if self.current is None and not self._pending:
            self._close()

    def _may_read(self) -> None:
        """Read again, unless something read is still waiting."""
        if self._buffer_paused and not (
                self._unparsed is not None or self._tail is not None or self._write_held
                or self._close_after or self._put_off is not None
                or (self._pending is not None and len(self._pending) >= MAX_PIPELINED)):
            self._resume_reading_for_buffer()

    def pause_reading(self) -> None:
        # a body's buffer is full (StreamReader's flow control): stop reading the socket
        self._reading_paused = True
        self._pause_transport_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False
        if not self._buffer_paused:
            self._resume_transport_reading()

    def _dispatch(self, message: RawRequestMessage, payload: StreamReader) -> None:
        request = Request(message, payload, self)
        if self._close_after and self._final is None and not self._pending:
            request.keep_alive = False  # the last request the connection answers
        self.current = request
        self.server.handler(request)

    def _step(self) -> None:
        """Answer the requests waiting their turn, as long as each is done at once and
        the client takes its responses; parse ahead as they go."""
        if self._stepping:
            return  # an outer _step continues the loop
        self._stepping = True
        budget = MAX_PIPELINED
        try:
            while self.transport is not None and not self._write_held:
                pending = self._pending
                if self._unparsed is not None and (pending is None or len(pending) < MAX_PIPELINED):
                    # (also while a request is answered: its body may be in these bytes)
                    self._parse_ahead()
                    pending = self._pending
                if self.current is not None or not pending:
                    break
                if budget == 0:
                    # MAX_PIPELINED answered at once: the rest waits its turn with the
                    # other clients' reads (H1Server.admit_read), after this output
                    if self._put_off is None:
                        self._put_off = b""
                        self.server.defer(self)
                    return
                budget -= 1
                message, payload = pending.popleft()
                self._dispatch(message, payload)
        finally:
            self._stepping = False
        if self.current is None and self.transport is not None and not self._pending:
            if self._unparsed is not None:
                return  # (responses not leaving: resume_writing goes on)
            self._pending = None
            if self._tail is not None:
                self._declined_upgrade()
                return
            if self._final is not None:
                self._say_final()
                return
            if self._buffer_paused:
                self._may_read()
            self._idle()

    def _declined_upgrade(self) -> None:
        """The upgrade request was answered (never with 101): parse what followed it."""
        tail, self._tail = self._tail, None
        if self._parser is None:
            return
        self._parser.set_upgraded(False)
        if self._buffer_paused:
            self._may_read()
        self._idle()
        if tail:
            self._feed(tail)

    def finish(self, request: Request) -> None:
        """The response to ``request`` is out (or abandoned): the next request, or close."""
        if self.current is not request:
            return  # the connection was lost meanwhile
        transport = self.transport
        if transport is None:
            self.current = None
            return
        if not request.keep_alive or self.server.closing or (self._close_after and not self._pending):
            self.current = None
            # (a logged refusal is this request's own answer: its body broke)
            if self._final is not None and (request.keep_alive or self._final.logged):
                self._say_final()  # (it closes)
            else:
                self._close()  # after what is held and buffered is sent
            return
        if request.body_exists and not request.content.is_eof():
            request.task = self._loop.create_task(self._linger(request))
            return
        self.current = None
        if self._pending is None and self._tail is None and not self._buffer_paused:
            # nothing parsed ahead (the common keep-alive case): idle at once, as
            # _step ends (_idle, inline: this runs for every request)
            self._idle_at = self._loop.time()
        elif self._pending or self._unparsed is not None:
            # the next pipelined request waits its turn behind other clients' reads:
            # else a thousand pipelining clients, each answered as soon as its last
            # answer is out, leave a new client's request waiting for seconds
            if self._put_off is None and not self._stepping:  # (else _step's loop goes on)
                self._put_off = b""
                self.server.defer(self)
        else:
            self._step()

    async def _linger(self, request: Request) -> None:
        payload = request.content
        try:
            async with asyncio.timeout(LINGER):
                while not payload.is_eof():
                    await payload.readany()
        except (TimeoutError, ConnectionError, RequestPayloadError, asyncio.CancelledError):
            request.keep_alive = False
        except Exception:  # the body failed (BodyTimeout, a parser error): its framing is gone
            request.keep_alive = False
        if self.current is not request:
            return
        if not request.keep_alive:
            self.current = None
            self._close()
            return
        request.task = None
        self.current = None
        self._step()

    # -- timers -------------------------------------------------------------------------
    def _idle(self) -> None:
        """Nothing to answer: the connection may wait ``keepalive_timeout`` for a
        request (the server's sweep closes it after that)."""
        self._idle_at = self._loop.time()

    @property
    def idle_since(self) -> float | None:
        """When the connection last became idle; None while a request is under way
        (or a head is arriving: its own timer decides)."""
        if (self.current is not None or self._pending or self._put_off is not None
                or self._head_timer is not None or self.transport is None
                or self._unparsed is not None):
            return None
        return self._idle_at

    def close_idle(self) -> None:
        self._close()

    def _open_body(self) -> tuple[RawRequestMessage, StreamReader, int] | None:
        """The last request read, its body and the bytes of it read so far, while that
        body is still arriving (taken before a feed: see _head_arriving)."""
        pending = self._pending
        if pending:
            message, payload = pending[-1]
        elif self.current is not None:
            message, payload = self.current.message, self.current.content
        else:
            return None
        if payload is EMPTY_PAYLOAD or payload.is_eof():
            return None
        return message, payload, payload.total_bytes

    def _head_arriving(self, data: bytes, body: tuple[RawRequestMessage, StreamReader, int] | None) -> None:
        """``data`` was parsed and no head ended in it. If it holds part of a head (it
        is not all a body's: ``body`` is the body that was arriving before it), that
        head has ``head_timeout`` from its first byte, whether a request is being
        answered or not. The bytes that end a body are no head: taken for one, an idle
        keep-alive connection got a 408 after every upload."""
        if self._head_timer is not None:
            return
        if body is not None:
            message, payload, before = body
            if not payload.is_eof():
                return  # all of it the body's
            # the body ended in these bytes: a head begins only if bytes follow it
            if message.chunked:
                if data.endswith(b"\r\n\r\n"):  # (its last chunk, or trailers)
                    return
            elif payload.total_bytes - before >= len(data):
                return
        self._head_timer = self._loop.call_later(self.server.head_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._buffer_paused and not self._close_after:
            # the rest of the head may be waiting in the socket: reading is paused for
            # this client's own backlog or unread answers (send_timeout judges those)
            self._head_timer = self._loop.call_later(self.server.head_timeout, self._head_timed_out)
            return
        if self.transport is not None:
            self._conclude(Refusal(_REQUEST_TIMEOUT, 408, "header_timeout", None, self.server.head_timeout))

    def _bad_request(self, exc: HttpProcessingError, fed: bytes) -> None:
        """The parser refused ``fed`` (bytes it was given in one call)."""
        self._unparsed = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        pending = self._pending
        if pending:
            last, payload = pending[-1]
        elif self.current is not None:
            last, payload = self.current.message, self.current.content
        else:
            last = None
        if last is not None and payload is not EMPTY_PAYLOAD and not payload.is_eof():
            # the refused bytes are that request's body: refused with it, when it has not
            # gone to the gateway yet; else whoever reads the body learns now, not at its
            # timeout (the gateway counts and logs the 400 with its route; it is sent here)
            if pending:
                pending.pop()
            else:
                payload.set_exception(RequestPayloadError("bad body framing"))
                self.server.bad_requests += 1
                self._conclude(Refusal(_BAD_REQUEST, 400, "bad_request", None, 0.0, logged=True))
                return
        elif last is not None and last.should_close:
            # bytes after a request that ends the connection (Connection: close, HTTP/1.0):
            # not read, as nginx ignores them; that request is answered, then the close
            self._close_after = True
            if not self._buffer_paused:
                self._pause_reading_for_buffer()
            return
        # The client's fault, and any client can send one: no traceback at ERROR (a
        # log flood) and no parser text echoed back.
        self.server.bad_requests += 1
        log.debug("bad request from %s: %s", self.peer_host, exc)
        self._conclude(Refusal(_BAD_REQUEST, 400, "bad_request", _REQUEST_LINE.match(fed), 0.0))

    def _conclude(self, refusal: Refusal) -> None:
        """No more requests from this client: ``refusal`` once those parsed before it
        are answered, then close."""
        self._close_after = True
        self._unparsed = None
        self._final = refusal
        if self.current is None and not self._pending:
            self._say_final()
        elif not self._buffer_paused:
            self._pause_reading_for_buffer()

    def _say_final(self) -> None:
        refusal, self._final = self._final, None
        if refusal is not None and self.transport is not None:
            self.send_later(refusal.response)
            if not refusal.logged:
                self.server.refused(self, refusal)
        self._close()

    # -- writing ------------------------------------------------------------------------
    def pause_writing(self) -> None:
        # the kernel's buffer toward the client is full and ours passed its high mark
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self._loop.call_later(self.server.send_timeout, self._send_timed_out)
        current = self.current
        if current is None or not current.body_exists or current.content.is_eof():
            # A client that does not take its responses gets nothing more read or answered
            # until it does (as nginx): else a pipelined flood fills our buffer with them.
            # Not while a body arrives: its upstream may answer as it reads (an echo).
            self._write_held = True
            if not self._buffer_paused:
                self._pause_reading_for_buffer()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._write_held:
            self._write_held = False
            self._may_read()
            if self.current is None and (self._pending or self._unparsed is not None):
                self._loop.call_soon(self._step)  # (not inside the transport's write callback)

    def _send_timed_out(self) -> None:
        # the client took nothing for send_timeout: it counts as gone (its request is
        # cancelled, its slot and upstream connection released)
        self._send_timer = None
        transport = self.transport
        if transport is not None:
            log.debug("client %s accepted nothing for %.1f s; disconnecting",
                      self.peername, self.server.send_timeout)
            self.abort()
