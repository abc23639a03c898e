"""HTTP upstreams: a pool of servers, each with its own keep-alive connections;
a balancer picks one per request; failures feed the servers' health and, where
that cannot repeat a request, are retried on another server; bodies stream
both ways.

Retries happen inside ``serve``, so the route's admission slot, taken once per
client request, is held across them. An attempt is retried when
- it failed to connect (refused, DNS, connect timeout): nothing was sent, so
  any request may go to another server, its body still unread;
- the connection was reset before the response head, for a method without side
  effects beyond its first run (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) and a
  request without a body: nothing needs to be replayed.
Nothing else is retried: a POST whose bytes reached a server may have been
acted on. Retries stop after ``retries`` more attempts, when no other server is
in rotation, or once ``read_timeout`` has passed since the first attempt.

Whether a failure is retried and whether it counts against its server
(``fail_on``, see servers.py) are separate questions: a reset is retried where
that is safe whether it counts or not.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp.resolver import AsyncResolver

from ..config.settings import UpstreamConfig
from ..http.body import RequestBody
from ..http.client import SMALL_BODY, H1Pool, Response
from ..http.headers import response_headers
from ..http.turn import Turn
from ..http.wire import IDEMPOTENT, NO_BODY_STATUS
from ..proxy.exchange import Cancellable, Exchange, Sink, Upstream, UpstreamFailure, raising
from .balance import Balancer
from .health import HealthChecker
from .names import is_address, unresolvable
from .servers import ServerState, counted_reasons
from .tls import UpstreamTls, upstream_tls

if TYPE_CHECKING:
    from ..http.server import Request
    from ..proxy.exchange import Route
    from .state import UpstreamExport

_NOTHING_SENT = frozenset(("upstream_connect", "upstream_connect_timeout", "upstream_dns", "upstream_tls"))
_NONE: tuple[ServerState, ...] = ()


class _CachedResolver:
    """Server names resolved by aiodns, each answer reused for ``ttl`` seconds
    (``dns_ttl``), as aiohttp's connector cache did."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._resolver: AsyncResolver | None = None
        self._cache: dict[tuple[str, int], tuple[float, list[str]]] = {}

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        loop = asyncio.get_running_loop()
        key = (host, port)
        hit = self._cache.get(key)
        now = loop.time()
        if hit is not None and hit[0] > now:
            return hit[1]
        if self._resolver is None:
            self._resolver = AsyncResolver()
        answers = await self._resolver.resolve(host, port, family=socket.AF_UNSPEC)
        addresses = [a["host"] for a in answers]
        if addresses and self._ttl > 0:
            self._cache[key] = (now + self._ttl, addresses)
        return addresses

    async def close(self) -> None:
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None


class HttpUpstream(Upstream):
    """One ``[upstreams.X]`` with ``servers``: an H1Pool (keep-alive connections) per server."""

    def __init__(self, config: UpstreamConfig, turn: Turn) -> None:
        super().__init__(config, turn)
        assert config.servers
        self._turn = turn  # the gateway's end of turn, where the pools' request heads go out
        self.servers = [ServerState(config.name, s) for s in config.servers]
        peers = tuple(self.servers)
        for s in self.servers:
            s.peers = peers  # passive health never ejects the last server in rotation
        self._counted = counted_reasons(config.fail_on)
        self._max_fails = config.max_fails
        self._fail_timeout = config.fail_timeout
        self._fail_on_5xx = config.fail_on_5xx
        self._retries = config.retries if len(self.servers) > 1 else 0
        self._balancer: Balancer | None = None
        # a one-server upstream skips the balancer while its server is in rotation
        self._only = self.servers[0] if len(self.servers) == 1 else None
        self._checker: HealthChecker | None = None
        self._resolver: _CachedResolver | None = None
        self._tls: UpstreamTls | None = None  # the https:// servers' context, made at start
        self._now: Callable[[], float] = time.monotonic  # the loop's clock once started
        self.retried = 0  # attempts made again on another server
        self.no_healthy = 0  # requests answered 502 no_healthy_server

    async def start(self) -> None:
        await self._check_names()
        c = self.config
        self._tls = tls = upstream_tls(c)
        for s in self.servers:
            resolve = None
            if not is_address(s.host):
                if self._resolver is None:
                    self._resolver = _CachedResolver(c.dns_ttl)
                resolve = self._resolver
            s.session = H1Pool(  # type: ignore[assignment]
                s.host, s.port,
                max_connections=c.max_connections,
                keepalive_timeout=c.keepalive_timeout,
                connect_timeout=c.connect_timeout,
                read_timeout=c.read_timeout,
                resolve=resolve,
                turn=self._turn,
                tls=tls.context if tls is not None and s.tls else None,
                server_hostname=tls.server_hostname(s.host) if tls is not None and s.tls else None,
            )
        loop = asyncio.get_running_loop()
        self._now = loop.time
        self._balancer = Balancer(c.balance, self.servers, c.fail_timeout, loop.time)
        if c.health_check is not None:
            self._checker = HealthChecker(c.health_check, self.servers, c.dns_ttl, tls)
            self._checker.start()

    async def _check_names(self) -> None:
        """Every server host name must resolve now: a name that does not is a
        start-up (or reload) error, not a surprise at the first request."""
        failed = await unresolvable([(self.config, self.name)])
        if failed:
            raise failed[0]

    def current(self) -> bool:
        """Whether the TLS files read at start still hold the same bytes (a reload keeps
        this upstream only then)."""
        return self._tls is None or self._tls.current()

    @property
    def closed(self) -> bool:
        """Whether every server's pool is closed."""
        return all(s.session is None or s.session.closed for s in self.servers)

    async def _close(self) -> None:
        if self._checker is not None:
            await self._checker.close()
        for s in self.servers:
            if s.session is not None:
                await s.session.close()
        if self._resolver is not None:
            await self._resolver.close()

    # -- the request ---------------------------------------------------------------
    def _pick(self) -> ServerState:
        server = self._only
        if server is None or server.blocked_until:
            assert self._balancer is not None
            server = self._balancer.pick(_NONE) or self._balancer.last_resort()
            if server is None:
                self.no_healthy += 1
                raise UpstreamFailure(502, "no_healthy_server")
        return server

    def _failed(self, server: ServerState, reason: str) -> None:
        """A failed attempt, held against its server when ``fail_on`` counts its kind."""
        server.failed(reason, self._now(), self._max_fails, self._fail_timeout,
                      reason in self._counted)

    def serve_inline(self, request: Request, route: Route, path: str, start: float,
                     sink: Sink) -> Cancellable | None:
        """The common case without a task: a bodiless GET (HEAD, ...) sent at once on
        an idle pooled connection, its response written from the connection's read
        callback. Anything less common on the way (a failure, a body that streams) is
        handed to ``sink`` as a coroutine that carries on from there, so the outcome is
        ``serve``'s. None, with nothing done, when it does not apply: use ``serve``."""
        server = self._only
        if server is None or server.blocked_until:
            return None  # the balancer's choice: the general path
        try:
            headers = request.upstream_fields()
            ex = _Inline(request, route, path, start, sink, server, headers)
            conn = server.session.send_idle(request.method, path, headers, ex)  # type: ignore[union-attr]
        except ValueError:
            return None  # a head that cannot be sent: serve says so
        if conn is None:
            return None
        ex.conn = conn
        server.in_flight += 1
        server.requests += 1
        return ex

    async def serve(self, ex: Exchange) -> None:
        server = self._pick()
        request = ex.request
        method = request.method
        headers = request.upstream_fields() if ex.fields is None else ex.fields
        body: RequestBody | None = ex.body
        began = self._now() if self._retries else 0.0
        server.in_flight += 1
        server.requests += 1
        pool: H1Pool = server.session  # type: ignore[assignment]
        if body is None:
            attempt = pool.request(method, ex.path, headers)
        else:
            attempt = pool.request(method, ex.path, headers, body=body.chunks(),
                                   body_length=body.length)
        await self._carry_on(ex, server, headers, began, attempt)

    async def serve_upgrade(self, ex: Exchange, protocol: str) -> tuple[asyncio.Transport, bytes] | None:
        """An upgrade (see ``Upstream.serve_upgrade``): sent with its ``Connection`` and
        ``Upgrade`` headers on a pooled or new connection (retried as a GET without a
        body is); on 101 that connection leaves its pool for good and becomes the
        upstream side of a tunnel; any other answer is relayed as ``serve`` would."""
        server = self._pick()
        request = ex.request
        headers = request.upstream_fields() + f"Connection: upgrade\r\nUpgrade: {protocol}\r\n".encode()
        began = self._now() if self._retries else 0.0
        server.in_flight += 1
        server.requests += 1
        pool: H1Pool = server.session  # type: ignore[assignment]
        try:
            up = await pool.request(request.method, ex.path, headers, upgrade=True)
        except UpstreamFailure as fail:
            server.in_flight -= 1
            up, server = await self._retry(ex, headers, server, fail, began, upgrade=True)
        except BaseException:
            server.in_flight -= 1
            if server.trial:
                server.trial_abandoned()
            raise
        if up.status != 101:
            await self._respond(ex, server, up)
            return None
        server.in_flight -= 1
        switched = up.detach()
        if switched is None:  # a 101 without Upgrade: not a switch the client could follow
            up.close()
            self._failed(server, "upstream_invalid")
            raise UpstreamFailure(502, "upstream_invalid")
        if server.fails or server.ejected_until:
            server.succeeded()
        request.write(request.switching_head(up.reason, response_headers(up.headers), protocol))
        ex.status = 101
        ex.head_sent = True
        return switched

    async def _resume(self, ex: Exchange, server: ServerState, headers: bytes,
                      conn: Any) -> None:
        """``serve`` from the point an inline exchange failed before its head."""
        began = self._now() if self._retries else 0.0
        pool: H1Pool = server.session  # type: ignore[assignment]
        attempt = pool.resume(conn, ex.request.method, ex.path, headers)
        await self._carry_on(ex, server, headers, began, attempt)

    async def _carry_on(self, ex: Exchange, server: ServerState, headers: bytes, began: float,
                        attempt: Coroutine[Any, Any, Response]) -> None:
        """The first attempt's response, or the retries after its failure; then the
        response to the client."""
        try:
            up = await attempt
        except UpstreamFailure as fail:
            server.in_flight -= 1
            up, server = await self._retry(ex, headers, server, fail, began)
        except BaseException:
            # cancelled (its client left) or the client's body failed: no verdict on the server
            server.in_flight -= 1
            if server.trial:
                server.trial_abandoned()
            raise
        await self._respond(ex, server, up)

    async def _respond(self, ex: Exchange, server: ServerState, up: Response) -> None:
        """The head is here: the response to the client, then the server is done with."""
        try:
            if not self._reply(ex, server, up):
                await self._stream(ex, server, up)
        finally:
            up.close()  # a no-op after a complete read (the connection is back in the pool)
            server.in_flight -= 1

    async def _stream_rest(self, ex: Exchange, server: ServerState, up: Response) -> None:
        try:
            await self._stream(ex, server, up)
        finally:
            up.close()
            server.in_flight -= 1

    def _reply(self, ex: Exchange, server: ServerState, up: Response) -> bool:
        """Judge the server by the head; write the whole response if it is all here
        (no body, or a small one already received). Whether it was."""
        status = up.status
        if self._fail_on_5xx and status >= 500:
            server.failed(f"status_{status}", self._now(), self._max_fails, self._fail_timeout)
        elif server.fails or server.ejected_until:
            server.succeeded()
        request = ex.request
        if request.method == "HEAD" or status < 200 or status in NO_BODY_STATUS:
            request.write(request.head(status, up.reason, response_headers(up.headers), None))
            ex.status = status
            ex.head_sent = True
            return True
        data = up.read_small(SMALL_BODY)  # the whole body, when it is already here: out with its head
        if data is None:
            return False
        # head and body in one write, framed by their length whatever the upstream's
        n = len(data)
        request.write(request.head_for(status, up.reason, up.fields, n) + data)
        ex.status = status
        ex.head_sent = True
        ex.sent = n  # the whole body
        return True

    async def _stream(self, ex: Exchange, server: ServerState, up: Response) -> None:
        """The head now, the body as it comes."""
        request = ex.request
        request.write(request.head(up.status, up.reason, response_headers(up.headers), _length(up.headers)))
        ex.status = up.status
        ex.head_sent = True
        try:
            while chunk := await up.read_chunk():
                ex.sent += len(chunk)
                await request.send(chunk, up.complete)
                if up.complete:
                    break
            else:
                await request.send(b"", True)
        except UpstreamFailure as fail:
            # the head is out: all we can do is cut the response short
            ex.truncated = fail.reason
            self._failed(server, fail.reason)
            request.abort()

    async def _retry(self, ex: Exchange, headers: bytes, server: ServerState,
                     fail: UpstreamFailure, began: float,
                     upgrade: bool = False) -> tuple[Response, ServerState]:
        """After a failed attempt: retry on other servers where that is safe (see the
        module docstring), or raise. The response returned is counted in flight."""
        request = ex.request
        body = ex.body
        c = self.config
        connect_timeout: float | None = None
        tried = _NONE
        while True:
            if body is not None and body.error is not None:
                if server.trial:
                    server.trial_abandoned()  # the client's body failed, not the server
                raise body.error from None
            self._failed(server, fail.reason)
            now = self._now()
            if len(tried) >= self._retries or not _may_retry(fail, request.method, body):
                raise fail from None
            left = began + c.read_timeout - now
            tried = (*tried, server)
            assert self._balancer is not None
            nxt = self._balancer.pick(tried) if left > 0 else None
            if nxt is None:
                raise fail from None
            self.retried += 1
            server = nxt
            if left < c.connect_timeout:
                connect_timeout = left
            server.in_flight += 1
            server.requests += 1
            try:
                pool: H1Pool = server.session  # type: ignore[assignment]
                up = await pool.request(
                    request.method, ex.path, headers,
                    body=body.chunks() if body is not None else None,
                    body_length=body.length if body is not None else None,
                    connect_timeout=connect_timeout, upgrade=upgrade,
                )
            except UpstreamFailure as f:
                server.in_flight -= 1
                fail = f
                continue
            except BaseException:
                server.in_flight -= 1
                if server.trial:
                    server.trial_abandoned()
                raise
            return up, server

    # -- state, for the snapshot and the control socket ----------------------------
    def pool_export(self) -> UpstreamExport:
        """This process's view of the servers (merged over workers by control.merge)."""
        now = self._now()
        return {
            "balance": self.config.balance,
            "retried": self.retried,
            "no_healthy_server": self.no_healthy,
            "servers": [s.export(now) for s in self.servers],
        }

    def set_server_state(self, server: str, up: bool) -> list[str]:
        """Set matching servers (by URL or host:port) up or down by hand; their URLs."""
        want = server.rstrip("/")
        matched = [s for s in self.servers
                   if want in (s.url, f"{s.host}:{s.port}", f"[{s.host}]:{s.port}")]
        for s in matched:
            s.set_admin(up)
        return [s.url for s in matched]


class _Inline(Exchange):
    """An exchange followed by its connection's callbacks (``HttpUpstream.serve_inline``):
    the exchange is also what the client's connection cancels and what the upstream
    connection wakes, so the common request makes one object, not three."""

    __slots__ = ("conn", "headers", "server", "sink", "task")

    def __init__(self, request: Request, route: Route, path: str, start: float, sink: Sink,
                 server: ServerState, headers: bytes) -> None:
        Exchange.__init__(self, request, route, path, start, None)
        self.sink = sink
        self.server = server
        self.headers = headers
        self.conn: Any = None  # until the head is in or the exchange failed
        self.task: Cancellable | None = None  # what carries it on, if anything does

    def wake(self) -> None:
        conn = self.conn
        if conn is None or (not conn._head_done and conn._exc is None):
            return  # the head is still to come
        self.conn = None
        conn._listener = None
        upstream: HttpUpstream = self.route.upstream  # type: ignore[assignment]  # (serve_inline's)
        server = self.server
        if not conn._head_done:
            self.task = self.sink.handover(self, upstream._resume(self, server, self.headers, conn))
            return
        up = Response(conn)
        try:
            whole = upstream._reply(self, server, up)
        except Exception as exc:
            up.close()
            server.in_flight -= 1
            self.task = self.sink.handover(self, raising(exc))  # mapped to a status as serve's would be
            return
        if whole:
            if not up.complete:
                up.close()  # recycles the connection when read_small has not (a no-op when it has)
            server.in_flight -= 1
            self.sink.settle(self)
        else:
            self.task = self.sink.handover(self, upstream._stream_rest(self, server, up))

    def cancel(self) -> None:
        """The client left: abort the upstream exchange (or the task that carries it on)."""
        conn = self.conn
        if conn is None:
            if self.task is not None:
                # from the next turn: a task made in this one has not run its first step,
                # and cancelled before it, its coroutine would not release the slot
                asyncio.get_running_loop().call_soon(self.task.cancel)
            return
        self.conn = None
        conn.cancel()
        server = self.server
        server.in_flight -= 1
        if server.trial:
            server.trial_abandoned()
        self.sink.cancelled(self)


def _length(headers: list[tuple[str, str]]) -> int | None:
    """The upstream's Content-Length, when it framed its body by one (the client has
    checked it); None for chunked or until-close bodies, re-framed for the client."""
    for name, value in headers:
        if len(name) == 14 and name.lower() == "content-length":
            return int(value)
    return None


def _may_retry(fail: UpstreamFailure, method: str, body: RequestBody | None) -> bool:
    """Whether a failed attempt can go to another server without risk of doing twice
    what the client asked once (see the module docstring)."""
    if fail.reason in _NOTHING_SENT:
        return True
    return body is None and method in IDEMPOTENT and fail.reason == "upstream_reset"
