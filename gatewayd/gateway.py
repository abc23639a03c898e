"""The request path: route -> admission -> upstream -> response, with every
way out counted and logged.

Admission follows SPEC §3 exactly: a free slot forwards at once; otherwise the
request queues if the queue has room, else it is shed at once with 503
``queue_full``; a request that waited ``queue_timeout`` gets 503
``queue_timeout``. The slot is held until the response is sent in full and is
released on every path out.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from .admission import ADMITTED, QUEUE_FULL, QUEUE_TIMEOUT
from .body import BodyTimeout, BodyTooLarge, RequestBody
from .requestcheck import Refused, origin_target
from .upstream import Exchange, UpstreamFailure

if TYPE_CHECKING:
    from .runtime import Route, Runtime

log = logging.getLogger("gatewayd")

_REASON_TEXT = {
    400: b"400 bad request\n",
    404: b"404 no route for this request\n",
    408: b"408 request body timed out\n",
    413: b"413 request body too large\n",
    431: b"431 request header fields too large\n",
    500: b"500 internal error\n",
    502: b"502 bad gateway\n",
    503: b"503 service overloaded, retry later\n",
    504: b"504 upstream timed out\n",
}
# A body left unread by a rejected request is drained by aiohttp to keep the
# connection; past this size closing is cheaper than reading.
_DRAIN_LIMIT = 65536


_STATUS_LINES = {413: b"HTTP/1.1 413 Request Entity Too Large\r\n",
                 503: b"HTTP/1.1 503 Service Unavailable\r\n"}


@functools.lru_cache(maxsize=256)
def _prebuilt(status: int, reason: str, retry_after: str | None, close: bool) -> bytes:
    """A whole gateway response as bytes, built once per kind (a pure function, memoized)."""
    body = _REASON_TEXT[status]
    return (_STATUS_LINES[status]
            + b"Content-Type: text/plain; charset=utf-8\r\n"
            + b"Content-Length: %d\r\n" % len(body)
            + (b"Retry-After: %s\r\n" % retry_after.encode() if retry_after is not None else b"")
            + b"X-Gatewayd-Reason: %s\r\n" % reason.encode()
            + (b"Connection: close\r\n" if close else b"")
            + b"\r\n" + body)


def reply(status: int, reason: str, retry_after: str | None = None) -> web.Response:
    """A response the gateway makes itself, marked with ``X-Gatewayd-Reason``."""
    headers = {"X-Gatewayd-Reason": reason, "Content-Type": "text/plain; charset=utf-8"}
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return web.Response(status=status, body=_REASON_TEXT.get(status, b"error\n"), headers=headers)


class Gateway:
    """The aiohttp request handler; reads the runtime's current routing table per request."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._loop = asyncio.get_running_loop()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        protocol.head_done()  # type: ignore[attr-defined]
        try:
            resp = await self._handle(request)
            if not resp.prepared:
                try:
                    await resp.prepare(request)
                    await resp.write_eof()
                except ConnectionError:
                    # the client is gone (or the exchange was cut): as aiohttp's own
                    # finish_response does, close quietly, no traceback at ERROR
                    return _SENT_CLOSE  # type: ignore[return-value]
        finally:
            protocol.request_done()  # type: ignore[attr-defined]
        # aiohttp keeps the returned response (and through it the request) alive
        # until the connection's next request: on an idle keep-alive connection
        # that is kilobytes per connection. Hand it a stand-in that only says
        # whether to keep the connection.
        return _SENT_KEEP_ALIVE if resp.keep_alive else _SENT_CLOSE  # type: ignore[return-value]

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        start = self._loop.time()
        try:
            target = origin_target(request)
        except Refused as refused:
            self._log(request, None, refused.status, 0, start, refused.reason)
            return _refuse_head(request, refused)
        route = self.runtime.table.router.match(request.headers.get("Host"), target)
        if route is None:
            resp = reply(404, "no_route")
            self._log(request, None, 404, 0, start, "no_route")
            return resp
        upstream = route.upstream
        # counted from here, queued or not: a replaced upstream closes only after
        # the last request that chose it is done
        upstream.enter()
        try:
            return await self._admit(request, route, target, start)
        finally:
            upstream.leave()

    async def _admit(self, request: web.BaseRequest, route: Route, target: str,
                     start: float) -> web.StreamResponse:
        now = self._loop.time
        stats = route.stats
        stats.requests += 1
        server = self.runtime.config.server
        length = request.content_length
        if length is not None and length > server.max_body_size:
            return await self._refuse(request, route, 413, "body_too_large", start)

        gate = route.gate
        if not gate.try_enter():
            if gate.queue_full():
                stats.queue_full += 1
                return await self._refuse(request, route, 503, QUEUE_FULL, start)
            try:
                outcome = await gate.wait(route.config.queue_timeout, request.method,
                                          target, request.remote or "")
            except asyncio.CancelledError:
                stats.cancelled_queued += 1
                self._log(request, route, 499, 0, start, "client_gone_queued")
                raise
            if outcome is not ADMITTED:
                assert outcome == QUEUE_TIMEOUT
                stats.queue_timeout += 1
                return await self._refuse(request, route, 503, QUEUE_TIMEOUT, start)
        stats.queue_wait.observe(now() - start)

        upstream = route.upstream
        body = None
        if request.body_exists:
            body = RequestBody(request, server.max_body_size, server.request_body_timeout,
                               server.request_body_min_rate)
        ex = Exchange(request, route.forward_path(target), request.remote or "", body)
        resp: web.StreamResponse
        reason: str | None = None
        try:
            resp = await upstream.serve(ex)
            status = ex.status
            reason = ex.truncated
            if reason is not None:
                stats.upstream_error(reason)
        except asyncio.CancelledError:
            stats.cancelled_in_flight += 1
            self._log(request, route, 499, ex.sent, start, "client_gone")
            raise
        except ConnectionResetError:
            # the client went away while we wrote to it, before its cancellation;
            # re-raised, aiohttp would log it with a traceback at ERROR (any client
            # can cause it: a log flood)
            stats.cancelled_in_flight += 1
            self._log(request, route, 499, ex.sent, start, "client_gone")
            _abort(request)
            return _SENT_CLOSE  # type: ignore[return-value]  # nothing more to send
        except UpstreamFailure as fail:
            stats.upstream_error(fail.reason)
            status, reason = fail.status, fail.reason
            resp = await self._fail(request, status, reason, body, ex.head_sent)
        except BodyTooLarge:
            status, reason = 413, "body_too_large"
            resp = await self._fail(request, status, reason, body, ex.head_sent, close=True)
        except BodyTimeout:
            status, reason = 408, "body_timeout"
            resp = await self._fail(request, status, reason, body, ex.head_sent, close=True)
        except Exception:
            log.exception("route %s: unexpected error", route.name)
            status, reason = 500, "internal_error"
            resp = await self._fail(request, status, reason, body, ex.head_sent, close=True)
        finally:
            gate.release()
            if body is not None:
                body.cancel_timer()
        stats.responded(status, now() - start)
        self._log(request, route, status, ex.sent, start, reason)
        # already sent in full: aiohttp's finish_response only reads keep_alive from it
        return resp

    async def _refuse(self, request: web.BaseRequest, route: Route, status: int,
                      reason: str, start: float) -> web.StreamResponse:
        """Answer without forwarding (413, 503): the body, if any, is never read.

        This is the shedding path, taken most under overload: the response is
        prebuilt bytes written straight to the transport, so a shed costs far
        less than a served request and leaves the CPU to the admitted ones."""
        close = status == 413 or not request.keep_alive or _unread_body_too_big(request)
        transport = request.transport
        if transport is not None and not transport.is_closing():
            transport.write(_prebuilt(status, reason, route.retry_after if status == 503 else None, close))
        route.stats.responded(status, self._loop.time() - start)
        self._log(request, route, status, 0, start, reason)
        if close:
            request.protocol.force_close()  # type: ignore[attr-defined]
        return _SENT_CLOSE if close else _SENT_KEEP_ALIVE  # type: ignore[return-value]

    async def _fail(self, request: web.BaseRequest, status: int, reason: str,
                    body: RequestBody | None, head_sent: bool,
                    close: bool = False) -> web.StreamResponse:
        """Answer a failed exchange from inside its slot; cut it if the head is out."""
        resp = reply(status, reason)
        if head_sent:
            _abort(request)
            resp.force_close()
            return resp
        if close or (body is not None and body.received == 0 and _unread_body_too_big(request)):
            resp.force_close()
        try:
            await resp.prepare(request)
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):
            # the client left while the failure was being answered: nobody to tell
            _abort(request)
        return resp

    def _log(self, request: web.BaseRequest, route: Route | None, status: int, size: int,
             start: float, reason: str | None) -> None:
        access = self.runtime.access_log
        if not access.enabled:
            return
        headers = request.headers
        version = request.version
        access.write(
            request.remote or "-", request.method, request.raw_path,
            f"{version.major}.{version.minor}", status, size,
            headers.get("Referer", ""), headers.get("User-Agent", ""),
            route.name if route is not None else "-", self._loop.time() - start, reason,
        )


def _refuse_head(request: web.BaseRequest, refused: Refused) -> web.StreamResponse:
    """Answer a request refused before routing; the connection closes (its framing is
    not to be trusted). An HTTP/0.9 or 2.0 request line still gets an HTTP/1.1 answer."""
    resp = reply(refused.status, refused.reason)
    resp.force_close()
    if refused.reason == "http_version":
        transport = request.transport
        if transport is not None:
            body = resp.body
            assert isinstance(body, bytes)
            transport.write(b"HTTP/1.1 %d %s\r\nConnection: close\r\nX-Gatewayd-Reason: %s\r\n"
                            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n\r\n%s"
                            % (resp.status, resp.reason.encode(), refused.reason.encode(), len(body), body))
        request.protocol.force_close()  # type: ignore[attr-defined]
    return resp


class _Sent:
    """What aiohttp's protocol reads from a response the gateway already sent."""

    __slots__ = ("keep_alive",)
    prepared = True  # already on the wire: Gateway.__call__ must not send it again

    def __init__(self, keep_alive: bool) -> None:
        self.keep_alive = keep_alive

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


_SENT_KEEP_ALIVE = _Sent(True)
_SENT_CLOSE = _Sent(False)


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _unread_body_too_big(request: web.BaseRequest) -> bool:
    if not request.body_exists:
        return False
    if request.headers.get("Expect", "").lower() == "100-continue":
        return True
    length = request.content_length
    return length is None or length > _DRAIN_LIMIT
