"""The contract between the proxy and its upstreams: the route a request was
admitted on, the exchange an upstream serves, how it ends (``Sink``), its
failures, and the ``Upstream`` base with a close that waits for the last request
it is serving (reloads replace pools). An upstream kind needs nothing else from
the proxy; the kinds themselves are chosen in ``gatewayd.upstreams.factory``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from ..config.settings import RouteConfig, UpstreamConfig
from ..http.errors import UpstreamFailure
from ..http.server import Cancellable
from .deadlines import Rules

__all__ = ["Cancellable", "Exchange", "Route", "Sink", "Upstream", "UpstreamFailure", "raising"]

if TYPE_CHECKING:
    from ..http.body import RequestBody
    from ..http.server import Request
    from ..http.turn import Turn
    from ..stats.metrics import RouteStats
    from .admission import Gate
    from .ratelimit import Limiter


class Route:
    """A route of one configuration generation; its gate and stats outlive it."""

    __slots__ = ("_strip", "config", "gate", "limiter", "name", "retry_after", "rules", "stats",
                 "tunnel_limit", "upstream")

    def __init__(self, config: RouteConfig, gate: Gate, stats: RouteStats, upstream: Upstream,
                 limiter: Limiter | None = None) -> None:
        self.config = config
        self.limiter = limiter  # its rate_limit, if it has one
        self.name = config.name
        self.gate = gate
        self.stats = stats
        self.upstream = upstream
        self.retry_after = str(config.retry_after)  # a 503's Retry-After while the gate knows nothing
        self.rules = Rules.of(config)  # deadlines and classes (SPEC §12); None: the route has none
        self._strip = len(config.path_prefix) if config.strip_prefix else 0
        # this worker's share of max_tunnels on a websocket route (set by the runtime);
        # 0: upgrades are not forwarded
        self.tunnel_limit = 0

    def forward_path(self, target: str) -> str:
        """The request target as sent upstream: never a dot-segment or a path not
        starting with ``/``, as the target is in normal form and the router matches a
        stripped prefix only where a segment or the query begins."""
        if not self._strip:
            return target
        rest = target[self._strip:]
        return rest if rest.startswith("/") else "/" + rest


class Exchange:
    """One admitted request on its way through an upstream."""

    __slots__ = ("body", "fields", "head_sent", "path", "request", "route", "sent", "start", "status",
                 "truncated")

    def __init__(self, request: Request, route: Route, path: str, start: float,
                 body: RequestBody | None) -> None:
        self.request = request
        self.route = route
        self.path = path  # the target as sent upstream (prefix stripped if asked)
        self.start = start  # the loop's clock when the request's head was in
        self.body = body
        self.status = 0
        self.head_sent = False
        self.sent = 0  # response body bytes written to the client
        self.truncated: str | None = None  # reason, when the upstream failed mid-body
        # the header lines to send upstream when not the request's own (a deadline's budget)
        self.fields: bytes | None = None

    @property
    def client_ip(self) -> str:
        """The client's address as forwarded and logged; "" when unknown. Read where an
        upstream needs it, not stored for every exchange."""
        return self.request.client


class Sink(Protocol):
    """Where an exchange served inline (``Upstream.serve_inline``) ends: exactly one of
    these, once."""

    def settle(self, ex: Exchange) -> None:
        """The response is out in full."""

    def handover(self, ex: Exchange, work: Coroutine[Any, Any, None]) -> Cancellable:
        """``work`` carries the exchange on, as ``serve`` would have, in a task."""
        ...

    def cancelled(self, ex: Exchange) -> None:
        """The client left; the upstream side is stopped already."""


async def raising(exc: BaseException) -> None:
    """A coroutine that raises ``exc``: an error met outside a task, handed to the
    task that answers and counts errors (Gateway._run)."""
    raise exc


class Upstream:
    """Base of the upstream kinds: what serves an admitted request. A kind is a
    subclass in ``gatewayd.upstreams`` listed in ``gatewayd.upstreams.factory.KINDS``;
    the proxy calls it only through the methods below.

    Lifecycle. ``Kind(config, turn)`` builds it from a validated configuration
    (no I/O; an error here, as in ``start``, fails the start or refuses the reload,
    and the old generation keeps serving). ``start`` runs once, on the loop, before
    the first request. A reload that changes the upstream's configuration builds a
    new one; the old one gets ``close`` once the last request it is serving ends.

    What a kind may assume. Every call to ``serve`` or ``serve_inline`` is for a
    request the route admitted: its slot is held (the route's ``max_concurrency``
    bounds the calls in progress) and is released by the gateway after the call
    ends, whichever way; a kind never takes or releases slots, nor calls
    ``enter``/``leave``. The request's head is checked and routed; its body
    (``Exchange.body``) may be buffered already or stream from the client.

    What a kind must do. Write the whole response to the client through
    ``ex.request`` and record it in the exchange: ``status``, ``head_sent`` (from
    the first byte on), ``sent`` (body bytes), ``truncated`` (a reason, when it
    cut a response short after its head). A failure is reported by raising
    ``UpstreamFailure(status, reason)``: before the head, the client gets
    ``status`` with ``X-Gatewayd-Reason: reason``; after it, the connection is cut.
    Either way the reason is counted as the upstream's error. Any other exception
    is a bug: ``500 internal_error``, logged. A ``ConnectionError`` from a write
    means the client left.

    Cancellation. A client that leaves cancels whatever serves its request: the
    task running ``serve`` (a ``CancelledError`` at its next await), or the
    ``Cancellable`` that ``serve_inline`` returned. A kind stops its work and
    re-raises; work that cannot be stopped safely (a started process job) may be
    awaited first, keeping the slot until it ends.

    Optional, for kinds with servers (HTTP pools): ``pool_export()`` (the
    snapshot's upstream figures, an ``upstreams.state.UpstreamExport``, found by
    ``gatewayd.control.export``) and ``set_server_state(server, up)`` (the control
    command, found by ``gatewayd.upstreams.state``).
    """

    def __init__(self, config: UpstreamConfig, turn: Turn) -> None:
        self.config = config
        self.name = config.name
        self.active = 0
        self._idle: asyncio.Event | None = None

    async def start(self) -> None:
        """Open what the upstream needs (pools, sessions, an application's startup);
        called once, on the loop; raising fails the start or the reload."""

    def current(self) -> bool:
        """Whether a reload whose configuration of this upstream is unchanged may keep
        it: False when what it read at start (certificate files) changed since, so a
        new one is built from them. True by default."""
        return True

    def serve_inline(self, request: Request, route: Route, path: str, start: float,
                     sink: Sink) -> Cancellable | None:
        """Optional fast path: serve an admitted request without a body (``path`` as
        ``Exchange.path``) as an exchange without a task that ends in exactly one of
        ``sink``'s calls, and return what the client's leaving cancels (see
        HttpUpstream). None, with nothing done, to have ``serve`` do it: the default."""
        return None

    async def serve(self, ex: Exchange) -> None:
        """Send the response for ``ex`` to its client in full (``ex.request.keep_alive``
        says afterwards whether the connection may carry another request); failures
        as ``UpstreamFailure``."""
        raise NotImplementedError

    async def serve_upgrade(self, ex: Exchange, protocol: str) -> tuple[asyncio.Transport, bytes] | None:
        """An admitted upgrade request (SPEC §11: a WebSocket on a ``websocket = true``
        route) asking to switch to ``protocol``. Where the upstream accepts with a
        101 over a connection of its own, the kind writes the 101 to the client
        (``Request.switching_head``; ``status`` 101, ``head_sent``) and returns that
        connection's transport, out of any pool, reading paused, with the bytes that
        followed the 101: the gateway splices it to the client's (http.tunnel). Else
        it serves the request as ``serve`` would and returns None: by default, with
        ``serve`` (an aiohttp handler sees the upgrade headers and may answer with
        its own ``WebSocketResponse``)."""
        await self.serve(ex)
        return None

    # the gateway's count of the requests that chose this upstream, queued or served
    def enter(self) -> None:
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        if self._idle is not None and not self.active:  # (closing: rare, so asked first)
            self._idle.set()

    async def close(self, timeout: float | None = None) -> None:
        """Close after the requests being served finished (or ``timeout`` passed);
        a kind releases its resources in ``_close``, not here."""
        if self.active:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                pass
        await self._close()

    async def _close(self) -> None:
        """Release what ``start`` opened (pools, processes, an application's shutdown)."""
