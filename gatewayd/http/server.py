"""The client side: HTTP/1.1 on aiohttp's C parser, without aiohttp's server.

aiohttp's ``RequestHandler`` keeps a task, a future and the last request alive
on every idle keep-alive connection, and builds a request object, a response
object and a task for every request, shed or not. Here an idle connection is a
transport, an H1Protocol (server_connection.py) and its parser, and no timer of
its own (one sweep serves them all); a request is a small ``Request`` around the
parser's message (request.py), and the gateway answers what it can (shed, 404,
refusals) synchronously, inside ``data_received``: a shed costs no task, no
coroutine and no response object. Only a request that goes upstream gets a task,
which the connection cancels when its client leaves.

This module is the state the connections share: the protocol factory the accept
loop calls, the settings every connection reads (changed in place on reload), the
open connections (the keep-alive sweep, shutdown), the books of answers given
without a route, and the fairness between clients within a loop turn. What a
request and its connection see of it is ``request.Server``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol

from .forwarded import TrustedProxies
from .request import Cancellable, Connection, Refusal, Request
from .responses import body_size, prebuilt
from .server_connection import H1Protocol
from .tunnel import Tunnel
from .turn import CLIENT_READS, Turn

# The names the proxy and the upstreams import from here (the request is theirs to
# answer; the connection is the server's).
__all__ = ["Cancellable", "H1Protocol", "H1Server", "Refusal", "Request"]

# Client reads handled in one turn of the event loop; the rest wait for the next
# turn, in arrival order (see H1Server.admit_read).
READS_PER_TURN = 16
SWEEP_INTERVAL = 1.0  # seconds between the keep-alive sweeps over the idle connections
PARSER_IDLE = 2.0  # seconds idle after which a connection's parser is dropped (made again on its next bytes)
CLIENT_CONNECTIONS_FULL = "client_connections_full"
# a connection over max_connections_per_client gets this, unasked, and is closed
_TOO_MANY_CONNECTIONS = prebuilt(429, CLIENT_CONNECTIONS_FULL, None, True)


class ServerSettings(Protocol):
    """The ``[server]`` settings a connection reads (config.settings.ServerConfig)."""

    @property
    def keepalive_timeout(self) -> float: ...
    @property
    def request_header_timeout(self) -> float: ...
    @property
    def send_timeout(self) -> float: ...
    @property
    def trusted_proxies(self) -> tuple[str, ...] | None: ...


class H1Server:
    """The protocol factory for the accept loop; holds the settings every connection
    reads (changed in place on reload: ``configure``) and the open connections (for
    shutdown)."""

    def __init__(self, handler: Callable[[Request], None], settings: ServerSettings, *,
                 on_close: Callable[[], None], turn: Turn | None = None,
                 log_refusal: Callable[[str, str, str, str, int, int, str, float], None] | None = None) -> None:
        self.handler = handler
        # shared with the upstream pools, whose request heads go out first at each turn's end
        self.turn = turn if turn is not None else Turn()
        self.head_timeout = self.send_timeout = self.keepalive_timeout = 0.0
        self.trusted_proxies: TrustedProxies | None = None
        self.configure(settings)
        self._on_close = on_close
        self.connections: set[Connection] = set()
        # open tunnels (upgraded connections): out of ``connections``, still counted open
        # by the accept loop until they end (tunnel_closed)
        self.tunnels: set[Tunnel] = set()
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
        self._deferred: deque[Connection] = deque()
        self._backlog: deque[Connection] = deque()  # pipelined requests put off (defer)
        self._sweeper: asyncio.TimerHandle | None = None
        self.sweeps = 0
        self.corked: list[Connection] = []  # connections with output held for this turn's flush
        # max_connections_per_client (this worker's share; 0: none, and nothing is counted)
        self.client_limit = 0
        self.client_connections_refused = 0
        self._by_client: dict[str, int] = {}  # open connections by client address, while a cap is set
        # the address each counted connection (or tunnel) is counted under
        self._counted: dict[Connection | Tunnel, str] = {}

    def configure(self, settings: ServerSettings) -> None:
        """Take the settings in force (at start and at every reload). They are copied
        into this object's own attributes because connections read them per request,
        and one attribute load is what the request path can afford."""
        self.head_timeout = settings.request_header_timeout
        self.send_timeout = settings.send_timeout
        self.keepalive_timeout = settings.keepalive_timeout
        networks = settings.trusted_proxies
        self.trusted_proxies = TrustedProxies(networks) if networks else None

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
            elif since <= trim_before:
                protocol.forget_parser()
        for tunnel in tuple(self.tunnels):
            tunnel.swept(now)
        if self.connections or self.tunnels or not self.closing:
            self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)
        else:
            self._sweeper = None

    # -- fairness between clients and upstreams under saturation ---------------------------
    def admit_read(self, protocol: Connection) -> bool:
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

    def defer(self, protocol: Connection) -> None:
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
                protocol.undefer()
        backlog = self._backlog
        left = READS_PER_TURN  # (as many again as reads, however many read)
        while backlog and left > 0:
            protocol = backlog.popleft()
            if protocol.transport is not None:
                left -= 1
                protocol.undefer()
        if deferred or backlog:
            self.turn.hold(CLIENT_READS, self._new_turn)
        else:
            self._turn_armed = False

    # -- writes: one burst per loop turn ----------------------------------------------------
    def flush(self) -> None:
        """Write the output held this turn (H1Protocol.send_later), at its end (turn.py)."""
        corked, self.corked = self.corked, []
        for protocol in corked:
            protocol.uncork()

    def refused(self, protocol: Connection, refusal: Refusal) -> None:
        """A refusal is out: counted and logged as any answer (route "-")."""
        self.count_unrouted(refusal.status)
        if self.log_refusal is not None:
            method, target, version = refusal.request_line()
            self.log_refusal(protocol.peer_host or "-", method, target, version,
                             refusal.status, refusal.body_size(), refusal.reason, refusal.duration)

    def count_unrouted(self, status: int) -> None:
        codes = self.unrouted
        codes[status] = codes.get(status, 0) + 1

    def opened(self, protocol: Connection) -> None:
        if self.client_limit and not self._count_client(protocol):
            return
        self.connections.add(protocol)

    def closed(self, protocol: Connection) -> None:
        self.connections.discard(protocol)
        self._gone(protocol)

    def _gone(self, connection: Connection | Tunnel) -> None:
        """A client connection (HTTP or a tunnel) has ended: out of every count."""
        if self._counted:
            self._uncount_client(connection)
        self._on_close()
        if not self.connections and not self.tunnels and self._empty is not None:
            self._empty.set()

    def tunnel_opened(self, protocol: Connection, tunnel: Tunnel) -> None:
        """``protocol``'s connection is ``tunnel``'s now: still open (for the accept
        loop's count and the client's connection cap), no longer an HTTP connection."""
        self.connections.discard(protocol)
        self.tunnels.add(tunnel)
        host = self._counted.pop(protocol, None)
        if host is not None:
            self._counted[tunnel] = host

    def tunnel_closed(self, tunnel: Tunnel) -> None:
        self.tunnels.discard(tunnel)
        self._gone(tunnel)

    # -- open connections per client (max_connections_per_client) -----------------------
    def set_client_limit(self, limit: int) -> None:
        """Cap the open connections of one client address (0: no cap). Set at start and
        on every reload; the connections open when a cap is set are counted then, none
        is closed; without a cap nothing is counted."""
        if limit and not self.client_limit:
            for protocol in self.connections:
                host = protocol.peer_host or ""
                self._by_client[host] = self._by_client.get(host, 0) + 1
                self._counted[protocol] = host
        elif not limit:
            self._by_client.clear()
            self._counted.clear()
        self.client_limit = limit

    def _count_client(self, protocol: Connection) -> bool:
        """Count a new connection under its client address (the peer's, or the one a
        PROXY protocol header gave); over the cap it is answered 429 and closed."""
        host = protocol.peer_host or ""
        n = self._by_client.get(host, 0)
        if n >= self.client_limit:
            self.client_connections_refused += 1
            self.count_unrouted(429)
            if self.log_refusal is not None:
                self.log_refusal(host or "-", "-", "-", "-", 429, body_size(429), CLIENT_CONNECTIONS_FULL, 0.0)
            transport = protocol.transport
            if transport is not None:
                transport.write(_TOO_MANY_CONNECTIONS)
                transport.close()
            return False
        self._by_client[host] = n + 1
        self._counted[protocol] = host
        return True

    def _uncount_client(self, protocol: Connection | Tunnel) -> None:
        host = self._counted.pop(protocol, None)
        if host is not None:
            n = self._by_client[host] - 1
            if n:
                self._by_client[host] = n
            else:
                del self._by_client[host]

    def client_connections(self, host: str) -> int:
        """Open connections counted under ``host`` (0 without a cap)."""
        return self._by_client.get(host, 0)

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections now and the others once their response is out;
        after ``timeout``, cancel what is left and cut those connections."""
        self.closing = True
        for protocol in list(self.connections):
            protocol.close_when_idle()
        if self.connections or self.tunnels:  # (tunnels are left to end until the timeout)
            self._empty = asyncio.Event()
            try:
                await asyncio.wait_for(self._empty.wait(), timeout)
            except TimeoutError:
                pass
        for protocol in list(self.connections):
            protocol.abort()
        for tunnel in list(self.tunnels):
            tunnel.close(abort=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
