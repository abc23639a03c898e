"""The request path: route -> admission -> upstream -> response, with every
way out counted and logged.

Admission follows SPEC §3 exactly: a free slot forwards at once; otherwise the
request queues if the queue has room, else it is shed at once with 503
``queue_full``; a request that waited ``queue_timeout`` gets 503
``queue_timeout``. The slot is held until the response is sent in full and is
released on every path out. A request with a body asks for its slot only once
the body is read (request buffering, ``_with_body``), unless it cannot be held.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from aiohttp.hdrs import HOST
from aiohttp.web_protocol import RequestPayloadError

from ..http.body import BodyTimeout, BodyTooLarge, BufferFull, RequestBody
from ..http.checks import Refused, origin_target
from ..http.responses import body_size, prebuilt
from .admission import CLIENT_QUEUE_FULL, QUEUE_FULL
from .deadlines import DEADLINE, ROUTE_TIMEOUT
from .exchange import Exchange, UpstreamFailure, raising
from .queued import Queued, QueuedUpgrade
from .ratelimit import RATE_LIMITED
from .timed import Timed, with_budget
from .tunnels import TUNNELS_FULL, Upgrade, is_websocket, reserve, switch

if TYPE_CHECKING:
    from ..http.server import Request
    from .exchange import Route
    from .router import Router
    from .serving import Serving

log = logging.getLogger("gatewayd")

# A body left unread by a rejected request is read and dropped to keep the
# connection; past this size closing is cheaper than reading.
_DRAIN_LIMIT = 65536


def answer(request: Request, status: int, reason: str, retry_after: str | None = None,
           close: bool = False) -> None:
    """Write a response the gateway makes itself (marked with ``X-Gatewayd-Reason``)
    as prebuilt bytes; decide whether the connection stays open after it."""
    if close or not request.keep_alive or _unread_body_too_big(request) or request.protocol.server.closing:
        request.keep_alive = False
    keep = request.keep_alive
    request.write(prebuilt(status, reason, retry_after, not keep,
                           keep and request.version.minor == 0))


class Gateway:
    """The request handler the connections call, synchronously, once a request's head
    is in. What can be answered at once (refusals, 404, 413, a shed 503) is answered
    here, as prebuilt bytes. A queued request is a timer and a ``_Queued``, woken by
    the gate. An admitted one is served inline by its upstream where it can (a GET
    through a warm pool), else by a task. ``request.task`` is whatever serves the
    request now: the connection cancels it when the client leaves. Every path ends
    in ``request.protocol.finish(request)``."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self._loop = asyncio.get_running_loop()

    def __call__(self, request: Request) -> None:
        start = self._loop.time()
        try:
            target = origin_target(request)
        except Refused as refused:
            kept = kept_target(refused, self.serving.table.router, request.headers.get(HOST))
            if kept is None:
                request.protocol.server.count_unrouted(refused.status)
                self._log(request, None, refused.status, body_size(refused.status), start, refused.reason)
                answer(request, refused.status, refused.reason, close=True)
                request.protocol.finish(request)
                return
            target = kept
        # HOST is an istr: the headers' multidict finds it without folding its case again
        route = self.serving.table.router.match(request.headers.get(HOST), target)
        if route is None:
            answer(request, 404, "no_route")
            request.protocol.server.count_unrouted(404)
            self._log(request, None, 404, body_size(404), start, "no_route")
            request.protocol.finish(request)
            return
        stats = route.stats
        stats.requests += 1
        limiter = route.limiter
        if limiter is not None:
            wait = limiter.check(request)  # counted against its key if admitted
            if wait:
                self._rate_limited(request, route, start, wait)
                return
        if route.tunnel_limit and request.message.upgrade and is_websocket(request):
            self._upgrade(request, route, target, start)
            return
        rules = route.rules
        if rules is not None:  # deadlines and classes (SPEC §12): their own admission
            request.deadline = rules.deadline(request, start)
            request.priority = rules.priority_of(request)
            if not request.body_exists:
                self._admit_ruled(request, route, target, start, None)
                return
        if request.body_exists:  # (the parser makes a body for any Content-Length over 0)
            self._with_body(request, route, target, start)
            return
        gate = route.gate
        if gate.try_enter():
            stats.queue_wait.observe_zero()
            route.upstream.enter()
            self._forward(request, route, target, start)
        elif gate.queue_full():
            stats.queue_full += 1
            self._refuse(request, route, 503, QUEUE_FULL, start)
        elif gate.per_client and gate.client_full(request.client):
            self._client_queue_full(request, route, start)
        else:
            # counted from here, queued or not: a replaced upstream closes only after
            # the last request that chose it is done
            route.upstream.enter()
            queued = Queued(self, request, route, target, start)
            queued.waiter = gate.enqueue(queued.wake, route.config.queue_timeout, request.method,
                                         target, request.client)
            request.task = queued

    def _rate_limited(self, request: Request, route: Route, start: float, wait: int) -> None:
        """A request over its route's rate_limit: 429 with its key's Retry-After (``wait``
        seconds), at arrival: no body read, never queued, never forwarded."""
        stats = route.stats
        stats.rate_limited += 1
        stats.clients.count(request.client, RATE_LIMITED)  # (the clients command: who is flooding)
        self._refuse(request, route, 429, RATE_LIMITED, start, str(wait))

    def _upgrade(self, request: Request, route: Route, target: str, start: float) -> None:
        """A WebSocket upgrade on a websocket route (proxy/tunnels.py): a tunnel place
        at arrival (else 503 tunnels_full), then admission as any request without a
        body; admitted, ``tunnels.switch`` serves it in its slot."""
        if not reserve(route):
            self._refuse(request, route, 503, TUNNELS_FULL, start)
            return
        gate = route.gate
        if gate.try_enter():
            route.stats.queue_wait.observe_zero()
            route.upstream.enter()
            self._switch(request, route, target, start)
            return
        if gate.queue_full():
            route.stats.queue_full += 1
            reason = QUEUE_FULL
        elif gate.per_client and gate.client_full(request.client):
            self._client_queue_full(request, route, start)
            route.stats.tunnels_opening -= 1
            return
        else:
            route.upstream.enter()
            queued = QueuedUpgrade(self, request, route, target, start)
            queued.waiter = gate.enqueue(queued.wake, route.config.queue_timeout, request.method,
                                         target, request.client)
            request.task = queued
            return
        route.stats.tunnels_opening -= 1
        self._refuse(request, route, 503, reason, start)

    def _switch(self, request: Request, route: Route, target: str, start: float) -> None:
        ex = Upgrade(request, route, route.forward_path(target), start)
        self.handover(ex, switch(ex, self.serving.access_log))

    def _forward(self, request: Request, route: Route, target: str, start: float) -> None:
        """An admitted request without a body, holding its slot: served inline where its
        upstream can (a GET through a warm pool: it ends in ``settle``, ``handover`` or
        ``cancelled``), else by a task."""
        upstream = route.upstream
        path = route.forward_path(target)
        try:
            inline = upstream.serve_inline(request, route, path, start, self)
        except Exception as exc:  # a bug: answered and counted by _run, as in a task
            self.handover(Exchange(request, route, path, start, None), raising(exc))
            return
        if inline is not None:
            request.task = inline
            return
        ex = Exchange(request, route, path, start, None)
        self.handover(ex, upstream.serve(ex))

    # -- requests with a body ---------------------------------------------------------------
    def _with_body(self, request: Request, route: Route, target: str, start: float) -> None:
        """A request with a body: 413 at once if it declares too much; shed at once if
        its route could not take it anyway; otherwise its body is read into memory
        first (``_buffer``), and only then does it ask for a slot. A body declared
        larger than ``request_buffer_size``, or than this worker's share of the buffer
        memory (it could never fit), asks now and streams once admitted. With the
        buffer memory full, 503 ``body_buffer_full`` (see ``RequestBody.fill``)."""
        server = self.serving.server
        length = request.content_length
        if length is not None and length > server.max_body_size:
            self._refuse(request, route, 413, "body_too_large", start)
            return
        gate = route.gate
        if gate.in_flight >= gate.limit and gate.queue_full():
            route.stats.queue_full += 1
            self._refuse(request, route, 503, QUEUE_FULL, start)
            return
        memory = self.serving.body_memory
        body = RequestBody(request, server.max_body_size, server.request_body_timeout,
                           server.request_body_min_rate, memory)
        most = server.request_buffer_size
        if memory.limit < most:
            most = memory.limit
        # a chunked body is buffered (its size is known only at its end: 413 before
        # the upstream sees a byte), as nginx buffers chunked bodies, up to ``most``
        if most and (length is None or length <= most):
            if memory.full:
                memory.refused += 1
                self._refuse(request, route, 503, "body_buffer_full", start)
                return
            request.task = self._loop.create_task(self._buffer(request, route, target, start, body, most))
            return
        self._admit_body(request, route, target, start, body)

    async def _buffer(self, request: Request, route: Route, target: str, start: float,
                      body: RequestBody, most: int) -> None:
        """Read the body (up to ``most`` bytes) with no slot held, then ask for one. The
        client leaving cancels this (``request.task``)."""
        stats = route.stats
        try:
            await body.fill(most)
        except BodyTooLarge:
            body.close()
            self._end_unadmitted(request, route, 413, "body_too_large", start)
            return
        except BodyTimeout:
            body.close()
            self._end_unadmitted(request, route, 408, "body_timeout", start)
            return
        except BufferFull:
            body.close()
            self._end_unadmitted(request, route, 503, "body_buffer_full", start)
            return
        except asyncio.CancelledError:
            body.close()
            stats.cancelled_queued += 1
            self._log(request, route, 499, 0, start, "client_gone_buffering")
            raise
        except RequestPayloadError:  # the body's framing broke: the connection answers 400 and closes
            body.close()
            request.task = None
            stats.answered(400, self._loop.time() - start)
            self._log(request, route, 400, 0, start, "bad_request")
            request.protocol.finish(request)
            return
        except ConnectionError:  # the client left (set by the connection on its payload)
            body.close()
            request.task = None
            request.keep_alive = False
            stats.cancelled_queued += 1
            self._log(request, route, 499, 0, start, "client_gone_buffering")
            request.protocol.finish(request)
            return
        except Exception:
            log.exception("route %s: unexpected error reading a body", route.name)
            body.close()
            self._end_unadmitted(request, route, 500, "internal_error", start)
            return
        request.task = None
        if request.protocol.current is not request:  # its client left meanwhile
            body.close()
            stats.cancelled_queued += 1
            self._log(request, route, 499, 0, start, "client_gone_buffering")
            return
        self._admit_body(request, route, target, start, body)

    def _end_unadmitted(self, request: Request, route: Route, status: int, reason: str,
                        start: float) -> None:
        request.task = None
        now = self._loop.time()
        retry_after = route.gate.retry_after(now, route.retry_after) if status == 503 else None
        answer(request, status, reason, retry_after, close=True)
        route.stats.answered(status, now - start)
        self._log(request, route, status, body_size(status), start, reason)
        request.protocol.finish(request)

    def _admit_body(self, request: Request, route: Route, target: str, start: float,
                    body: RequestBody) -> None:
        """Admission (as in ``__call__``) for a request whose body is buffered, or is
        to stream once admitted."""
        if route.rules is not None:
            self._admit_ruled(request, route, target, start, body)
            return
        stats = route.stats
        gate = route.gate
        if gate.try_enter():
            stats.queue_wait.observe_zero()
            route.upstream.enter()
            self._forward_body(request, route, target, start, body)
        elif gate.queue_full():
            stats.queue_full += 1
            body.close()
            self._refuse(request, route, 503, QUEUE_FULL, start)
        elif gate.per_client and gate.client_full(request.client):
            body.close()
            self._client_queue_full(request, route, start)
        else:
            route.upstream.enter()
            queued = Queued(self, request, route, target, start, body)
            queued.waiter = gate.enqueue(queued.wake, route.config.queue_timeout, request.method,
                                         target, request.client)
            request.task = queued

    def _forward_body(self, request: Request, route: Route, target: str, start: float,
                      body: RequestBody) -> None:
        ex = Exchange(request, route, route.forward_path(target), start, body)
        self.handover(ex, route.upstream.serve(ex))

    # -- routes with deadlines or classes (SPEC §12, proxy/deadlines.py) ---------------------
    def _admit_ruled(self, request: Request, route: Route, target: str, start: float,
                     body: RequestBody | None) -> None:
        """Admission with the request's deadline and class: a free slot at once; else,
        unless its expected wait and service do not fit its budget (503 deadline), a
        place in the queue, made at a full queue by preempting the newest waiter of a
        lower class (else 503 queue_full)."""
        stats = route.stats
        gate = route.gate
        now = self._loop.time()
        deadline = request.deadline
        if deadline and now >= deadline:
            if body is not None:
                body.close()
            stats.deadline += 1
            self._refuse(request, route, 503, DEADLINE, start)
            return
        if gate.try_enter():
            stats.queue_wait.observe_zero()
            route.upstream.enter()
            self._forward_ruled(request, route, target, start, body, now)
            return
        if gate.per_client and gate.client_full(request.client):
            if body is not None:
                body.close()
            self._client_queue_full(request, route, start)
            return
        priority = request.priority
        if deadline:
            estimate = gate.estimate(now)
            wait = estimate.wait(gate.ahead(priority), gate.limit)
            if wait is not None and now + wait + estimate.needed > deadline:
                if body is not None:
                    body.close()
                stats.deadline += 1
                self._refuse(request, route, 503, DEADLINE, start)
                return
        if gate.queue_full() and not gate.preempt(priority):
            if body is not None:
                body.close()
            stats.queue_full += 1
            self._refuse(request, route, 503, QUEUE_FULL, start)
            return
        route.upstream.enter()
        queued = Queued(self, request, route, target, start, body)
        queued.waiter = gate.enqueue(queued.wake, route.config.queue_timeout, request.method, target,
                                     request.client, priority, deadline)
        request.task = queued

    def _forward_ruled(self, request: Request, route: Route, target: str, start: float,
                       body: RequestBody | None, now: float) -> None:
        """Forward in a timed exchange: 504 route_timeout if the response head is not in
        by the deadline; the remaining budget goes upstream in ``deadline_header``."""
        deadline = request.deadline
        ex = Timed(request, route, route.forward_path(target), start, body, now)
        rules = route.rules
        if deadline:
            assert rules is not None
            if rules.deadline_header is not None:
                ex.fields = with_budget(request.upstream_fields(), rules, deadline - now)
            ex.timer = self._loop.call_at(deadline, ex.expire)
        self.handover(ex, ex.within(route.upstream.serve(ex)))

    def _client_queue_full(self, request: Request, route: Route, start: float) -> None:
        """The request's client holds its route's ``max_queue_per_client`` queue places
        already (SPEC §10): 429, never queued."""
        stats = route.stats
        stats.client_queue_full += 1
        stats.clients.count(request.client, CLIENT_QUEUE_FULL)
        self._refuse(request, route, 429, CLIENT_QUEUE_FULL, start)

    def _refuse(self, request: Request, route: Route, status: int, reason: str, start: float,
                retry_after: str | None = None) -> None:
        """Answer without forwarding (413, 429, 503): the body, if any, is not read
        further. A 503 carries the route's Retry-After; another status ``retry_after``.

        This is the shedding path, taken most under overload: prebuilt bytes written
        straight to the transport, no task, no response object, so a shed costs far
        less than a served request and leaves the CPU to the admitted ones."""
        now = self._loop.time()
        if status == 503:  # the estimated seconds until the route could take it (SPEC §12)
            retry_after = route.gate.retry_after(now, route.retry_after)
        answer(request, status, reason, retry_after, close=status == 413)
        route.stats.answered(status, now - start)
        if self.serving.access_log.enabled:  # (as in settle: an off log costs no call)
            self._log(request, route, status, body_size(status), start, reason)
        request.protocol.finish(request)

    async def _run(self, ex: Exchange, work: Coroutine[Any, Any, None]) -> None:
        """An admitted request: ``work`` (the upstream's ``serve``, or what carries an
        inline exchange on) writes its response inside its slot; then the slot is
        released and the connection goes on (or closes)."""
        request = ex.request
        route = ex.route
        stats = route.stats
        start = ex.start
        reason: str | None = None
        status = 0
        try:
            await work
            status = ex.status
            reason = ex.truncated
            if reason is not None:
                stats.upstream_error(reason)
        except asyncio.CancelledError:
            if type(ex) is Timed and ex.expired and not ex.head_sent:
                # its deadline passed before the response head (Timed.expire): 504, not a leaver
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                stats.route_timeout += 1
                status, reason = 504, ROUTE_TIMEOUT
                self._fail(request, status, reason, False)
            else:
                stats.cancelled_in_flight += 1
                self._log(request, route, 499, ex.sent, start, "client_gone")
                raise
        except ConnectionError:  # (reset, or lost while a write waited for room)
            # the client went away while we wrote to it, before its cancellation
            stats.cancelled_in_flight += 1
            self._log(request, route, 499, ex.sent, start, "client_gone")
            request.abort()
            return
        except UpstreamFailure as fail:
            stats.upstream_error(fail.reason)
            status, reason = fail.status, fail.reason
            self._fail(request, status, reason, ex.head_sent)
        except BodyTooLarge:
            status, reason = 413, "body_too_large"
            self._fail(request, status, reason, ex.head_sent, close=True)
        except BodyTimeout:
            status, reason = 408, "body_timeout"
            self._fail(request, status, reason, ex.head_sent, close=True)
        except RequestPayloadError:
            # a streamed body's framing broke: the connection answers 400 once this is done
            status, reason = 400, "bad_request"
            if ex.head_sent:
                request.abort()
        except Exception:
            log.exception("route %s: unexpected error", route.name)
            status, reason = 500, "internal_error"
            self._fail(request, status, reason, ex.head_sent, close=True)
        finally:
            # on every way out, cancelled included: the next request, or close
            self._release(ex)
        # the upstream's head went out: a served response, however it ended; else the
        # gateway answered (502, 504, 413, ...) with its prebuilt body, timed apart from
        # the served ones
        if ex.head_sent:
            stats.responded(status, self._loop.time() - start)
            if status != 101:  # a tunnel's line is written when it ends (tunnels.TunnelEnd)
                self._log(request, route, status, ex.sent, start, reason)
        else:
            stats.answered(status, self._loop.time() - start)
            self._log(request, route, status, body_size(status), start, reason)

    def _release(self, ex: Exchange) -> None:
        route = ex.route
        try:
            route.gate.release()  # may start the next waiter's request
        finally:
            route.upstream.leave()
            if ex.body is not None:
                ex.body.close()
            request = ex.request
            request.protocol.finish(request)

    # -- where an inline exchange ends (upstream.Sink) ------------------------------------
    def settle(self, ex: Exchange) -> None:
        ex.request.task = None  # the inline exchange, which refers back to the request
        self._release(ex)
        route = ex.route
        route.stats.responded(ex.status, self._loop.time() - ex.start)
        if self.serving.access_log.enabled:  # (_log asks too; asked first here, an off log costs no call)
            self._log(ex.request, route, ex.status, ex.sent, ex.start, None)

    def handover(self, ex: Exchange, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = ex.request.task = self._loop.create_task(self._run(ex, work))
        return task

    def cancelled(self, ex: Exchange) -> None:
        ex.request.task = None
        route = ex.route
        route.stats.cancelled_in_flight += 1
        self._log(ex.request, route, 499, ex.sent, ex.start, "client_gone")
        self._release(ex)

    def _fail(self, request: Request, status: int, reason: str, head_sent: bool,
              close: bool = False) -> None:
        """Answer a failed exchange from inside its slot; cut it if the head is out."""
        if head_sent:
            request.abort()
            return
        answer(request, status, reason, close=close)  # closes too when much body is left unread

    def _log(self, request: Request, route: Route | None, status: int, size: int,
             start: float, reason: str | None) -> None:
        access = self.serving.access_log
        if not access.enabled:
            return
        headers = request.headers
        version = request.version
        access.write(
            request.client or "-", request.method, request.raw_path,
            f"{version.major}.{version.minor}", status, size,
            headers.get("Referer", ""), headers.get("User-Agent", ""),
            route.name if route is not None else "-", self._loop.time() - start, reason,
        )


def kept_target(refused: Refused, router: Router[Route], host: str | None) -> str | None:
    """The target of a request refused for an escaped slash or a backslash, when the
    route it matches keeps them (``escaped_slashes = "keep"``); else None.

    The route is chosen on the target as it is (escapes kept): it is what such a
    route forwards, and no route can be asked before one is chosen."""
    target = refused.target
    if target is None:
        return None
    route = router.match(host, target)
    if route is None or route.config.escaped_slashes != "keep":
        return None
    return target


def _unread_body_too_big(request: Request) -> bool:
    if not request.body_exists or request.content.is_eof():
        return False
    if request.headers.get("Expect", "").lower() == "100-continue":
        return True
    length = request.content_length
    return length is None or length > _DRAIN_LIMIT
