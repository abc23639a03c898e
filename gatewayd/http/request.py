"""A request as the gateway sees it, and the two interfaces it is served through:
the client connection it came on (``Connection``, which H1Protocol implements for
HTTP/1.1) and the server's state shared by every connection (``Server``, which
H1Server provides).

The connection and the server are named here by their interfaces, not imported:
they make requests and each other, so the request is the module they both build
on (server.py -> server_connection.py -> request.py, no way back).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpVersion10
from aiohttp.http_parser import RawRequestMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from .forwarded import TrustedProxies
from .headers import request_fields, response_headers, split_fields
from .turn import CLIENT_WRITES, Turn
from .wire import MAX_LINE, MAX_REQUEST_HEADERS, NO_BODY_STATUS

HEADS_KEPT = 256  # response heads remembered (Request.head_for), forgotten all at once when full
HEAD_KEPT_SIZE = 4096  # bytes of upstream header lines beyond which a head is not remembered


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

    def body_size(self) -> int:
        """The length of the response's body, for the access log."""
        response = self.response
        return len(response) - response.index(b"\r\n\r\n") - 4

    def request_line(self) -> tuple[str, str, str]:
        """Method, target and version as far as known, else "-"."""
        line = self.line
        if line is None:
            return "-", "-", "-"
        method, target, major, minor = (g.decode("latin-1") for g in line.groups())
        return method, target, f"{major}.{minor}"


class Server(Protocol):
    """What a connection and its requests need of the server that made them: the
    settings every connection reads (changed in place on reload), the books, and
    the turn's fairness and output (see H1Server)."""

    handler: Callable[[Request], None]
    turn: Turn
    head_timeout: float
    send_timeout: float
    closing: bool
    trusted_proxies: TrustedProxies | None  # None: X-Forwarded-For is never believed
    heads: dict[tuple[int, str, bytes, int, int], bytes]  # see Request.head_for
    corked: list[Connection]  # the connections with output held for this turn's flush
    bad_requests: int
    read_ahead_closes: int

    def opened(self, connection: Connection) -> None: ...
    def closed(self, connection: Connection) -> None: ...
    def admit_read(self, connection: Connection) -> bool: ...
    def defer(self, connection: Connection) -> None: ...
    def flush(self) -> None: ...
    def refused(self, connection: Connection, refusal: Refusal) -> None: ...
    def count_unrouted(self, status: int) -> None: ...
    def tunnel_opened(self, connection: Connection, tunnel: Any) -> None: ...
    def tunnel_closed(self, tunnel: Any) -> None: ...


class Connection(BaseProtocol):
    """A client connection as its requests and its server see it: who the client is,
    what requests remember per connection, the output held for the turn's flush, and
    what the server asks of it. H1Protocol is the HTTP/1.1 one."""

    __slots__ = ("_fields_memo", "_last_raw", "_out", "_peer", "_peer_host", "_sock", "checked_headers",
                 "current", "secure", "server")

    # what aiohttp's request needs of its protocol (Request.as_aiohttp)
    max_field_size = MAX_LINE
    max_headers = MAX_REQUEST_HEADERS

    def __init__(self, server: Server) -> None:
        super().__init__(asyncio.get_running_loop())
        self.server = server
        self.current: Request | None = None
        self._peer: Any = None
        self._sock: Any = None  # our address on this connection, once asked (an ASGI scope's server)
        self._peer_host: str | None = None  # the client's address, as the gateway logs and forwards it
        self._out: list[bytes] | None = None  # output held until the turn's flush (send_later)
        self._last_raw: tuple[tuple[bytes, bytes], ...] | None = None  # see Request.__init__
        self._fields_memo: tuple[Any, bytes] | None = None  # see Request.upstream_fields
        self.checked_headers: tuple[Any, int] | None = None  # see checks.origin_target
        self.secure = False  # came over TLS (set by tls.TlsOpener before connection_made)

    @property
    def ssl_context(self) -> Any:
        """The TLS context of the connection (aiohttp's request.scheme reads it), or None."""
        if not self.secure or self.transport is None:
            return None
        return self.transport.get_extra_info("sslcontext")

    @property
    def peername(self) -> Any:
        if self._peer is None and self.transport is not None:
            self._peer = self.transport.get_extra_info("peername")
        return self._peer

    def set_peer(self, host: str, port: int) -> None:
        """The client is ``host:port``, not the TCP peer (a PROXY protocol header said
        so): set before ``connection_made``, so every request, the access log and
        X-Forwarded-For see it."""
        self._peer = (host, port)
        self._peer_host = host

    @property
    def sockname(self) -> Any:
        if self._sock is None and self.transport is not None:
            self._sock = self.transport.get_extra_info("sockname")  # (a system call: asked once)
        return self._sock

    @property
    def peer_host(self) -> str | None:
        host = self._peer_host
        if host is None:
            peer = self.peername
            if isinstance(peer, (list, tuple)) and peer:
                host = self._peer_host = str(peer[0])
        return host

    # -- output, held for the turn's flush -----------------------------------------------
    def send_later(self, data: bytes) -> None:
        """``data`` to the client, in order, at the end of this loop turn's callbacks."""
        if self.transport is None:
            return
        out = self._out
        if out is None:
            self._out = [data]
            corked = self.server.corked  # the connections the turn's flush writes
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

    def abort(self) -> None:
        """Cut the connection now; what is held is dropped."""
        if self.transport is not None:
            self._out = None
            self.transport.abort()

    # -- what the gateway and the server ask ---------------------------------------------
    def finish(self, request: Request) -> None:
        """The response to ``request`` is out (or abandoned): the next request, or close."""
        raise NotImplementedError

    @property
    def idle_since(self) -> float | None:
        """When the connection last became idle; None while it is not."""
        raise NotImplementedError

    def close_idle(self) -> None:
        """Close now: idle for the keep-alive timeout."""
        raise NotImplementedError

    def close_when_idle(self) -> None:
        """Close once nothing is under way (the server is shutting down)."""
        raise NotImplementedError

    def forget_parser(self) -> None:
        """Idle for a while: let go of the parser, if it holds no part of a request."""
        raise NotImplementedError

    def undefer(self) -> None:
        """Handle what was put off to this turn (Server.admit_read, Server.defer)."""
        raise NotImplementedError

    def take_over(self, request: Request) -> tuple[asyncio.Transport, bytes] | None:
        """``request`` was answered 101 (its head is written): give the connection up to
        a tunnel. Its transport (output held so far written first) and the bytes the
        client sent after the request's head; None when the client has left."""
        raise NotImplementedError


class Request:
    """One request, as the gateway sees it; lives until its response is out."""

    __slots__ = ("_chunked", "_client", "body_exists", "content", "deadline", "headers", "keep_alive",
                 "message", "method", "priority", "protocol", "raw_headers", "raw_path", "task", "version")
    _client: str  # set on first use of ``client`` behind trusted proxies only
    # set (and read) only on routes with deadline or class rules (proxy.deadlines): a
    # request of another route pays nothing for them
    deadline: float  # on the loop's clock; 0.0: none
    priority: int  # its class: 0 critical, 1 default, 2 sheddable

    def __init__(self, message: RawRequestMessage, payload: StreamReader, protocol: Connection) -> None:
        self.message = message
        self.method: str = message.method
        self.raw_path: str = message.path
        self.version = message.version
        self.headers = message.headers
        raw = message.raw_headers
        if raw == protocol._last_raw:
            # One object for the fields a client repeats request after request: the
            # connection's memos of them (upstream_fields, checks.origin_target)
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
    def client(self) -> str:
        """The client address (SPEC §10): the peer, or the address its PROXY protocol
        header carried; behind ``server.trusted_proxies``, the first address from the
        right of X-Forwarded-For that is not a trusted proxy. The one place it is
        computed: the access log, the queue X-ray, rate-limit keys and fairness read it."""
        trusted = self.protocol.server.trusted_proxies
        if trusted is None:
            return self.remote or ""
        try:
            known: str = self._client
            return known
        except AttributeError:  # (left unset in __init__: a gateway without proxies pays nothing)
            client: str = trusted.client(self.remote or "", self.headers.getall("X-Forwarded-For", ()))
            self._client = client
            return client

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
        fields = request_fields(raw, self.remote or "", self.headers.get("Host", ""), protocol.secure)
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
        if self.method == "HEAD" or status < 200 or status in NO_BODY_STATUS:
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

    def switching_head(self, reason: str, headers: list[tuple[str, str]], upgrade: str) -> bytes:
        """The 101 for an upgrade the upstream accepted: its headers (hop-by-hop
        removed) and the two that say what the connection becomes."""
        parts = [f"HTTP/1.1 101 {reason}\r\n"]
        parts.extend(f"{n}: {v}\r\n" for n, v in headers)
        parts.append(f"Connection: upgrade\r\nUpgrade: {upgrade}\r\n\r\n")
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

    def as_aiohttp(self, client_max_size: int, rel_url: str | None = None,
                   kind: type[web.BaseRequest] = web.BaseRequest) -> web.BaseRequest:
        """This request as aiohttp's (of class ``kind``), for an inline handler written
        against aiohttp."""
        protocol = self.protocol
        writer = StreamWriter(protocol, protocol._loop)
        task = asyncio.current_task()
        request = kind(self.message, self.content, protocol, writer,  # type: ignore[arg-type]
                       task, protocol._loop, client_max_size=client_max_size)  # type: ignore[arg-type]
        if not self.keep_alive:
            request._cache["keep_alive"] = False
        if rel_url is not None:
            request = request.clone(rel_url=rel_url)
        return request
