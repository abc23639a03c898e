"""WebSocket upgrades on ``websocket = true`` routes (SPEC §11): which requests
are upgrades, the tunnel place each holds from arrival, and what is counted and
logged when a tunnel ends.

An upgrade request is admitted like any request (rate limit, slot, queue). From
its arrival it holds a place against the route's ``max_tunnels`` (this
worker's share; ``RouteStats.tunnels_opening``), so that the cap holds however
many upgrades are on their way at once: at the cap it is answered ``503
tunnels_full`` at once. If the upstream answers ``101`` the place becomes an
open tunnel (``RouteStats.tunnels``) and the slot is released as the ``101``
goes out; any other answer is relayed as a response and the place is given
back. The access log gets the tunnel's line when it ends (``TunnelEnd``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..http.tunnel import Tunnel, open_tunnel
from .exchange import Exchange

if TYPE_CHECKING:
    from ..http.server import Request
    from .accesslog import AccessLog
    from .exchange import Route

TUNNELS_FULL = "tunnels_full"
WEBSOCKET = "websocket"


def is_websocket(request: Request) -> bool:
    """Whether a request the parser marked as an upgrade (``Connection: upgrade`` and
    an ``Upgrade`` header) asks for a WebSocket in a form that can become a tunnel:
    a GET over HTTP/1.1 without a body, ``Upgrade: websocket``: the one upgrade the
    client side's parser stops at (the bytes after it are the tunnel's), so the two
    never disagree. Anything else (``h2c``, a list of protocols, a POST) is served as
    a plain request, its upgrade headers not forwarded."""
    if request.method != "GET" or request.body_exists or request.version.minor != 1:
        return False
    return request.headers.get("Upgrade", "").lower() == WEBSOCKET


def reserve(route: Route) -> bool:
    """Take a tunnel place for an arriving upgrade; False at the cap."""
    stats = route.stats
    if stats.tunnels + stats.tunnels_opening >= route.tunnel_limit:
        stats.tunnels_full += 1
        return False
    stats.tunnels_opening += 1
    return True


class Upgrade(Exchange):
    """An admitted upgrade. An upstream that serves it in-process (an aiohttp handler
    answering with its own WebSocket) says when its session opens (its 101 written)
    and closes, so the session counts as one of the route's tunnels meanwhile; it
    keeps its slot, as the handler's call is the session."""

    __slots__ = ("in_session",)

    def __init__(self, request: Request, route: Route, path: str, start: float) -> None:
        Exchange.__init__(self, request, route, path, start, None)
        self.in_session = False

    def session_opened(self) -> None:
        if not self.in_session:
            self.in_session = True
            stats = self.route.stats
            stats.tunnels_opening -= 1
            stats.tunnels += 1
            stats.tunnels_total += 1

    def session_closed(self) -> None:
        if self.in_session:
            self.in_session = False
            stats = self.route.stats
            stats.tunnels -= 1
            stats.tunnels_opening += 1  # (given back with the place, as switch ends)


class TunnelEnd:
    """What a tunnel remembers of its request for the end: the route's counters and
    the access log's fields (none when the log is off), not the request itself."""

    __slots__ = ("fields", "log", "start", "stats")

    def __init__(self, route: Route, request: Request, start: float, log: AccessLog) -> None:
        self.stats = route.stats
        self.start = start
        self.log = log
        if log.enabled:
            headers = request.headers
            version = request.version
            self.fields: tuple[str, ...] | None = (
                request.client or "-", request.method, request.raw_path,
                f"{version.major}.{version.minor}", headers.get("Referer", ""),
                headers.get("User-Agent", ""), route.name)
        else:
            self.fields = None

    def ended(self, tunnel: Tunnel) -> None:
        self.stats.tunnels -= 1
        self.write(tunnel.sent, tunnel.received)

    def write(self, sent: int, received: int | None) -> None:
        """The access log's line for the tunnel (or in-process session) that ended."""
        fields = self.fields
        if fields is not None and self.log.enabled:
            client, method, target, version, referer, agent, route = fields
            duration = asyncio.get_running_loop().time() - self.start
            self.log.write(client, method, target, version, 101, sent, referer, agent, route,
                           duration, None, received)


async def switch(ex: Upgrade, log: AccessLog) -> None:
    """Serve an admitted upgrade (``Gateway._run`` runs it in the request's slot): the
    upstream's answer relayed, or on its 101 the tunnel opened. The place taken by
    ``reserve`` is an open tunnel or given back, whichever way this ends."""
    route = ex.route
    stats = route.stats
    try:
        try:
            switched = await route.upstream.serve_upgrade(ex, WEBSOCKET)
        finally:
            ex.session_closed()
        if switched is None:
            if ex.status == 101:  # an in-process handler's own WebSocket, over now
                TunnelEnd(route, ex.request, ex.start, log).write(ex.sent, None)
            return  # else answered as a plain response, logged by the gateway
        transport, early = switched
        request = ex.request
        owner = TunnelEnd(route, request, ex.start, log)
        tunnel = open_tunnel(request, transport, early, route.config.tunnel_idle_timeout, owner)
        if tunnel is None:  # the client left as the 101 went out
            transport.abort()
            raise ConnectionResetError("client gone")
        stats.tunnels += 1
        stats.tunnels_total += 1
    finally:
        stats.tunnels_opening -= 1
