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
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from .admission import ADMITTED, QUEUE_FULL, QUEUE_TIMEOUT
from .body import BodyTimeout, BodyTooLarge, RequestBody
from .upstream import Exchange, UpstreamFailure

if TYPE_CHECKING:
    from .runtime import Route, Runtime

log = logging.getLogger("gatewayd")

_REASON_TEXT = {
    400: b"400 bad request\n",
    404: b"404 no route for this request\n",
    408: b"408 request body timed out\n",
    413: b"413 request body too large\n",
    500: b"500 internal error\n",
    502: b"502 bad gateway\n",
    503: b"503 service overloaded, retry later\n",
    504: b"504 upstream timed out\n",
}
# A body left unread by a rejected request is drained by aiohttp to keep the
# connection; past this size closing is cheaper than reading.
_DRAIN_LIMIT = 65536


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
            return await self._handle(request)
        finally:
            protocol.request_done()  # type: ignore[attr-defined]

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        start = self._loop.time()
        target = request.raw_path
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
            # the client went away while we wrote to it, before its cancellation
            stats.cancelled_in_flight += 1
            self._log(request, route, 499, ex.sent, start, "client_gone")
            raise
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
        """Answer without forwarding (413, 503): the body, if any, is never read."""
        resp = reply(status, reason, route.retry_after if status == 503 else None)
        if _unread_body_too_big(request) or status == 413:
            resp.force_close()
        route.stats.responded(status, self._loop.time() - start)
        self._log(request, route, status, 0, start, reason)
        return resp

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
        await resp.prepare(request)
        await resp.write_eof()
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
