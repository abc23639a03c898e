"""ASGI 3 applications on the event loop (``interface = "asgi"``, SPEC §16):
HTTP, WebSocket on routes that allow upgrades, and the lifespan protocol.

An admitted request runs the application in the gateway's own task for it (no
task of its own): ``await app(scope, receive, send)`` inside the route's slot,
which is held until the application returns. The request body arrives as
``http.request`` messages (in one when it was buffered before admission, else
as it streams, ``max_body_size`` and the body timeouts applying); the response
goes out as it is sent, with back-pressure (``send`` waits while the client is
not reading), a single-message response in one write with its
``Content-Length``. A client that leaves: a ``receive`` waiting for the
response's end returns ``http.disconnect`` and the application's next await is
cancelled; anywhere else the cancellation reaches it at once (SPEC §3: within
100 ms). An exception or no response: ``500 handler_error``, logged with its
traceback.

WebSocket (``serve_upgrade``) is carried by aiohttp's WebSocketResponse on the
client's connection, as an aiohttp handler's is: the session counts as one of
the route's tunnels from ``websocket.accept`` to the application's return and
holds its slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from email.utils import formatdate
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.web_protocol import RequestPayloadError

from ..config.settings import UpstreamConfig
from ..http.body import BodyTimeout, BodyTooLarge
from ..http.errors import UpstreamFailure
from ..http.headers import response_headers, split_fields
from ..http.turn import Turn
from ..http.wire import NO_BODY_STATUS
from ..proxy.exchange import Exchange
from .application import Application, reason_phrase
from .appscope import Target, client_of, server_of
from .handler import _Request, _Session
from .lifespan import Lifespan

log = logging.getLogger("gatewayd")

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}
_DISCONNECT = {"type": "http.disconnect"}


class AsgiUpstream(Application):
    """``handler = "module:app"``, ``interface = "asgi"``: see the module docstring."""

    def __init__(self, config: UpstreamConfig, turn: Turn) -> None:
        super().__init__(config, turn)
        self._mode = config.lifespan
        self._lifespan: Lifespan | None = None
        self.state: dict[str, Any] | None = None  # the lifespan's namespace, when it ran
        self._raw_memo: Any = None  # the last request's raw headers and their ASGI form
        self._headers_memo: list[tuple[bytes, bytes]] = []
        self._fields_memo: tuple[Any, bytes] = (None, b"")  # the last response's headers as lines
        self._reasons: dict[int, str] = {}
        self._date_at = 0
        self._date = b""

    # -- lifespan ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._mode == "off":
            return
        lifespan = Lifespan(self.app, f"upstreams.{self.name}", required=self._mode == "on")
        if await lifespan.startup():
            self._lifespan = lifespan
            self.state = lifespan.state

    async def _close(self) -> None:
        if self._lifespan is not None:
            lifespan, self._lifespan = self._lifespan, None
            await lifespan.shutdown()

    # -- HTTP ----------------------------------------------------------------------------
    def _scope(self, ex: Exchange, kind: str) -> dict[str, Any]:
        request = ex.request
        protocol = request.protocol
        raw = request.raw_headers
        if raw is not self._raw_memo and raw != self._raw_memo:
            # lower-case names (ASGI), values as received; one list per distinct head
            self._headers_memo = [(n.lower(), v) for n, v in raw]
            self._raw_memo = raw
        forwarded = ex.path
        if ex.route.config.strip_prefix or "%" in forwarded:
            target = Target(ex)
            root = target.root_path
            if root:
                # The request's whole path, the stripped prefix as root_path (ASGI: frameworks
                # route on path minus root_path, and build URLs from path).
                path, raw_path = target.full_path, target.full_raw_path
            else:
                path, raw_path = target.path, target.raw_path
            query = target.query
        else:  # (the common case, without a Target: nothing to decode, nothing stripped)
            root = ""
            path, _, text = forwarded.partition("?")
            raw_path = path.encode("utf-8", "surrogateescape")
            query = text.encode("utf-8", "surrogateescape")
        peer = protocol.peername
        if protocol.server.trusted_proxies is None and isinstance(peer, tuple) and len(peer) > 1:
            client: tuple[str, int] = (peer[0], peer[1])  # (appscope.client_of, without proxies)
        else:
            client = client_of(ex)
        scope: dict[str, Any] = {
            "type": kind,
            "asgi": ASGI_VERSION,
            "http_version": "1.1" if request.version.minor == 1 else "1.0",
            "method": request.method,
            "scheme": "https" if protocol.secure else "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": root,
            "headers": self._headers_memo.copy(),  # (an application may change its own)
            "client": client,
            "server": server_of(ex),
        }
        if self.state is not None:
            scope["state"] = self.state.copy()
        return scope

    async def serve(self, ex: Exchange) -> None:
        cycle = _Cycle(self, ex)
        try:
            await self.app(self._scope(ex, "http"), cycle.receive, cycle.send)
        except (asyncio.CancelledError, BodyTooLarge, BodyTimeout, RequestPayloadError, ConnectionError):
            raise  # the client left, or its body failed: the gateway answers those
        except Exception:
            if cycle.gone:
                raise asyncio.CancelledError() from None
            log.exception("upstreams.%s: the application raised", self.name)
            raise UpstreamFailure(500, "handler_error") from None
        if cycle.gone:
            raise asyncio.CancelledError()  # it saw http.disconnect and returned: 499, as any leaver
        if not cycle.finished:
            log.error("upstreams.%s: the application returned without %s", self.name,
                      "finishing its response" if ex.head_sent else "a response")
            raise UpstreamFailure(500, "handler_error")

    def reason(self, status: int) -> str:
        reason = self._reasons.get(status)
        if reason is None:
            reason = self._reasons[status] = reason_phrase(status)
        return reason

    def fields(self, headers: Any) -> bytes:
        """The response's header lines (CRLF between them) and a Date, as the origin
        server sends one; a name or value holding CR or LF is refused."""
        memo = self._fields_memo
        if headers is memo[0]:  # an application that answers with one constant list
            fields = memo[1]
        else:
            lines = [b"%s: %s" % (bytes(n), bytes(v)) for n, v in headers]
            fields = b"\r\n".join(lines)
            if lines and (fields.count(b"\n") >= len(lines) or fields.count(b"\r") >= len(lines)):
                raise ValueError("CR or LF in a response header")
            self._fields_memo = (headers, fields)
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = b"date: " + formatdate(now, usegmt=True).encode()
        return fields + b"\r\n" + self._date if fields else self._date

    # -- WebSocket -----------------------------------------------------------------------
    async def serve_upgrade(self, ex: Exchange, protocol: str) -> None:
        """A WebSocket (``websocket = true`` routes): the ASGI websocket scope, carried
        by aiohttp's WebSocketResponse on the client's connection."""
        session = _WebSocket(self, ex)
        try:
            await self.app(session.scope(), session.receive, session.send)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("upstreams.%s: the application raised", self.name)
            if not ex.head_sent:
                raise UpstreamFailure(500, "handler_error") from None
        finally:
            await session.end()
        if not ex.head_sent:
            log.error("upstreams.%s: the application returned without accepting or closing the "
                      "WebSocket", self.name)
            raise UpstreamFailure(500, "handler_error")


class _Cycle:
    """One HTTP request's receive and send."""

    __slots__ = ("_chunks", "_headers", "_waiter", "ex", "finished", "gone", "more", "status", "upstream")

    def __init__(self, upstream: AsgiUpstream, ex: Exchange) -> None:
        self.upstream = upstream
        self.ex = ex
        self.more = True  # request body messages left to give
        self._chunks: Any = None
        self._waiter: asyncio.Future[None] | None = None
        self.status = 0  # from http.response.start
        self._headers: Any = ()  # its headers
        self.finished = False  # the last body message is out
        self.gone = False  # the client left (http.disconnect given)

    async def receive(self) -> dict[str, Any]:
        if self.more:
            return await self._body()
        if self.finished:
            return _DISCONNECT
        # nothing more to read: what comes next is the end of the response or the client's leaving
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            request = self.ex.request
            if request.protocol.current is request:
                raise  # not its client's leaving: a cancellation of its own
            # The client left: say so, and cancel the application at its next await
            # (a cancellation now would lose the message).
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
            self.gone = True
            asyncio.get_running_loop().call_soon(task.cancel)
        return _DISCONNECT

    async def _body(self) -> dict[str, Any]:
        body = self.ex.body
        if body is None:
            self.more = False
            return {"type": "http.request", "body": b"", "more_body": False}
        if body.complete and self._chunks is None:
            self.more = False
            data = body.buffered()
            body.release()  # the application holds it now, in its slot
            return {"type": "http.request", "body": data, "more_body": False}
        if self._chunks is None:
            self._chunks = body.chunks().__aiter__()
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self.more = False
            return {"type": "http.request", "body": b"", "more_body": False}
        except ConnectionError:
            self.more = False
            self.gone = True
            return _DISCONNECT
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        ex = self.ex
        if kind == "http.response.body":
            if not self.status or self.finished:
                raise RuntimeError("http.response.body " + ("after the response's end" if self.finished
                                                            else "before http.response.start"))
            body = message.get("body", b"")
            more = message.get("more_body", False)
            request = ex.request
            if not ex.head_sent:
                ex.head_sent = True
                if not more:
                    self._whole(body)
                    return
                request.write(self._head(None))
            if body:
                ex.sent += len(body)
            if more:
                if body:
                    await request.send(body)
                return
            self._finish()
            await request.send(body, True)
        elif kind == "http.response.start":
            if self.status:
                raise RuntimeError("a second http.response.start")
            self.status = status = int(message["status"])
            if not 100 <= status <= 999:
                raise ValueError(f"status {status}")
            self._headers = message.get("headers", ())
            ex.status = status
        elif kind == "http.response.trailers":
            pass  # (not sent: HTTP/1.1 clients rarely read trailers; the body has ended)
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    def _whole(self, body: bytes) -> None:
        """The response in one message: head and body in one write."""
        ex = self.ex
        request = ex.request
        status = self.status
        upstream = self.upstream
        if request.method == "HEAD" or status < 200 or status in NO_BODY_STATUS:
            request.write(self._head(None))
        else:
            n = len(body)
            request.write(request.head_for(status, upstream.reason(status), upstream.fields(self._headers), n)
                          + body)
            ex.sent = n
        self._finish()

    def _head(self, length: int | None) -> bytes:
        upstream = self.upstream
        headers = response_headers(split_fields(upstream.fields(self._headers)))
        if length is None:
            for name, value in headers:
                if len(name) == 14 and name.lower() == "content-length":
                    length = int(value)
        return self.ex.request.head(self.status, upstream.reason(self.status), headers, length)

    def _finish(self) -> None:
        self.finished = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _WebSocket:
    """One ASGI websocket session over aiohttp's WebSocketResponse."""

    __slots__ = ("connected", "ex", "request", "upstream", "ws")

    def __init__(self, upstream: AsgiUpstream, ex: Exchange) -> None:
        self.upstream = upstream
        self.ex = ex
        self.ws: web.WebSocketResponse | None = None
        self.request: web.BaseRequest | None = None
        self.connected = False  # websocket.connect given

    def scope(self) -> dict[str, Any]:
        scope = self.upstream._scope(self.ex, "websocket")
        scope["scheme"] = "wss" if scope["scheme"] == "https" else "ws"
        offered = self.ex.request.headers.get("Sec-WebSocket-Protocol", "")
        scope["subprotocols"] = [p.strip() for p in offered.split(",") if p.strip()]
        del scope["method"]
        return scope

    async def receive(self) -> dict[str, Any]:
        if not self.connected:
            self.connected = True
            return {"type": "websocket.connect"}
        ws = self.ws
        if ws is None:
            raise RuntimeError("websocket.receive before websocket.accept")
        msg = await ws.receive()
        if msg.type == WSMsgType.TEXT:
            return {"type": "websocket.receive", "text": msg.data}
        if msg.type == WSMsgType.BINARY:
            return {"type": "websocket.receive", "bytes": msg.data}
        code = ws.close_code if ws.close_code is not None else 1005
        return {"type": "websocket.disconnect", "code": code}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        ex = self.ex
        ws = self.ws
        if kind == "websocket.send":
            if ws is None:
                raise RuntimeError("websocket.send before websocket.accept")
            if message.get("bytes") is not None:
                await ws.send_bytes(message["bytes"])
            else:
                await ws.send_str(message["text"])
        elif kind == "websocket.accept":
            if ws is not None:
                raise RuntimeError("a second websocket.accept")
            chosen = message.get("subprotocol")
            ws = self.ws = web.WebSocketResponse(protocols=(chosen,) if chosen else (), max_msg_size=0)
            for name, value in message.get("headers", ()):
                ws.headers.add(bytes(name).decode("latin-1"), bytes(value).decode("latin-1"))
            opened = getattr(ex, "session_opened", None)
            request = ex.request.as_aiohttp(0, None, _Request if opened is None else _Session)
            if opened is not None:
                request._opened = opened  # type: ignore[attr-defined]  # (a _Session)
            self.request = request
            await ws.prepare(request)
            ex.status = 101
            ex.head_sent = True
        elif kind == "websocket.close":
            if ws is None:  # refused before the handshake: 403, as the ASGI spec says
                if not ex.head_sent:
                    ours = ex.request
                    ours.force_close()
                    ours.write(ours.head(403, "Forbidden", [("Content-Type", "text/plain")], 0))
                    ex.status = 403
                    ex.head_sent = True
                return
            await ws.close(code=message.get("code", 1000), message=(message.get("reason") or "").encode())
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    async def end(self) -> None:
        """The application returned: a session it left open is closed."""
        ws = self.ws
        if ws is not None and not ws.closed:
            try:
                await ws.close()
            except ConnectionError:
                pass
