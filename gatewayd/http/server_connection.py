"""One client connection (H1Protocol): HTTP/1.1 on aiohttp's C parser, without
aiohttp's server (server.py says why).

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

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestPayloadError

from .request import Refusal, Request, Server
from .responses import prebuilt
from .switching import Switching
from .wire import MAX_LINE, MAX_REQUEST_HEADERS

log = logging.getLogger("gatewayd")

READ_BUFFER = 65536  # a body's bytes buffered before reading from the client pauses
MAX_PIPELINED = 4  # requests parsed ahead of the one being answered before reading pauses
COMPACT_AT = 32768  # bytes parsed off the front of read-ahead bytes before they are copied away
READ_AHEAD = 32768  # pipelined bytes kept unparsed behind those; past it _read_too_far_ahead
PIPELINED_WRITE_BUFFER = 16384  # the high-water mark of output buffered for a pipelining client
LINGER = 2.0  # seconds an unread body may take to arrive after the response

_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_BAD_REQUEST = prebuilt(400, "bad_request", None, True)
# what the access log shows of a refused request: its request line, when it has one
_REQUEST_LINE = re.compile(rb"([!#$%%&'*+.^_`|~0-9A-Za-z-]{1,64}) (\S{1,%d}) HTTP/(\d)\.(\d)\r\n" % MAX_LINE)


class H1Protocol(Switching):
    """One client connection. See the module docstring."""

    __slots__ = ("_clean", "_close_after", "_final", "_head_timer", "_idle_at", "_pending", "_put_off",
                 "_send_timer", "_stepping", "_unparsed", "_unparsed_at", "_write_held")

    def __init__(self, server: Server) -> None:
        super().__init__(server)
        self._parser: HttpRequestParser | None = None  # made on the first bytes
        self._clean = True  # the parser holds no part of a request (it may be dropped)
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
        self._put_off: bytes | None = None  # bytes read while other clients had the turn

    # -- connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # TCP_NODELAY is set by the accept loop, on the socket
        self.transport = transport  # type: ignore[assignment]
        self.server.opened(self)
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
        self.server.closed(self)

    def close_when_idle(self) -> None:
        self._close_after = True
        if self.current is None and not self._pending and self.transport is not None:
            self._close()

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

    def undefer(self) -> None:
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
                max_headers=MAX_REQUEST_HEADERS, payload_exception=RequestPayloadError,
                auto_decompress=False,  # a proxy passes bodies on as they are
            )
        if self._tail is not None:
            if self._frames is not None:
                self._feed_frames(data)
                return
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

    def _end_http(self) -> bytes:
        """(take_over) Timers, parser, requests dropped; the bytes put off, returned."""
        for timer in (self._head_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._send_timer = None
        put_off = self._put_off or b""
        self._put_off = self._unparsed = self._pending = self._parser = None
        self._last_raw = self._fields_memo = self.checked_headers = None
        self._close_after = True
        return put_off

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

    def forget_parser(self) -> None:
        if self._clean:
            self._parser = None
            self._last_raw = self._fields_memo = self.checked_headers = None

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
