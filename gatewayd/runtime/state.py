"""The daemon's state in one object, built from a frozen configuration.

Reload is build-then-swap: the new routing table (routes, upstreams, listeners,
access log) is built completely beside the running one; only when every part
stands is it swapped in, in one step. Any error leaves everything as it was.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass

from .. import __version__
from ..config.settings import Config, RouteConfig, ServerConfig
from ..http.bodymemory import BodyMemory
from ..http.listener import PLAIN, Acceptor, Opener, bind
from ..http.proxy_protocol import ProxyHeaderCounts, ProxyOpener
from ..http.server import H1Server
from ..http.tls import Certificate, CertificateProblem, HandshakeCounts, Terminator, TlsOpener, load_certificate
from ..http.turn import Turn
from ..proxy.accesslog import AccessLog
from ..proxy.admission import Gate, share
from ..proxy.exchange import Route, Upstream
from ..proxy.gateway import Gateway
from ..proxy.ratelimit import Limiter, RateTable
from ..proxy.router import Router, Table
from ..proxy.serving import Serving
from ..stats.metrics import Registry
from ..stats.process import GcMonitor, LoopLag, TaskCounter
from ..upstreams.factory import build
from ..upstreams.names import KeyProblem
from .limits import Overrides
from .reload import LastReload

log = logging.getLogger("gatewayd")


class ReloadFailed(Exception):
    pass


@dataclass
class Pending:
    """A reload built and bound, not yet swapped in."""

    config: Config
    table: Table
    started: list[Upstream]
    bound: dict[str, socket.socket]
    access: AccessLog | None
    openers: dict[str, Opener]
    certificates: tuple[Certificate, ...]


class Runtime:
    """Everything a running gateway (one worker process) holds. As one process it is
    also what a reload changes (runtime.reload.Reloadable); a worker's is changed by
    its master through ``prepare``, ``commit`` and ``abort``."""

    several = False  # never the master of workers

    def __init__(self, config: Config, *, worker_index: int = 0, worker_count: int = 1,
                 reuse_port: bool = False, rate_table: RateTable | None = None) -> None:
        self.config = config
        # the keys of the routes' rate limits: the master's, shared by its workers, or our own
        self.rate_table = rate_table or RateTable.private()
        self.worker_index = worker_index
        self.worker_count = worker_count
        self.reuse_port = reuse_port
        self.generation = 1
        self.last_reload: LastReload | None = None
        self.started = time.time()
        self.registry = Registry()
        self.tasks = TaskCounter()
        self.lag = LoopLag()
        self.gc = GcMonitor()
        self.turn = Turn()  # shared by the client side and the upstream pools (turn.py)
        self.draining = False
        self.ready = False
        self.overrides = Overrides()
        self.pending: Pending | None = None  # a reload prepared, not yet committed
        self.handshakes = HandshakeCounts()  # TLS, across reloads
        self.proxy_headers = ProxyHeaderCounts()  # the PROXY protocol, across reloads
        self.certificates: tuple[Certificate, ...] = ()  # the generation's, for the snapshot
        self.serving = Serving(
            config.server,
            AccessLog(config.access_log_path(), config.log.access_format),
            BodyMemory(self._share(config.server.request_buffer_memory, 0)),
        )
        self._retiring: set[asyncio.Task[None]] = set()
        self.server: H1Server
        self.acceptor: Acceptor

    @property
    def table(self) -> Table:
        return self.serving.table

    @property
    def access_log(self) -> AccessLog:
        return self.serving.access_log

    @property
    def body_memory(self) -> BodyMemory:
        return self.serving.body_memory

    # -- limits divided among workers ------------------------------------------------
    def _share(self, total: int, minimum: int) -> int:
        return share(total, self.worker_index, self.worker_count, minimum)

    def _per_client(self, total: int) -> int:
        """This worker's share of a per-client cap (0: none). A client's connections
        spread over the workers as the kernel hashes them, so each enforces its share."""
        return self._share(total, 1) if total else 0

    def _tunnel_limit(self, rc: RouteConfig) -> int:
        """This worker's share of a websocket route's max_tunnels; 0 without websocket."""
        return self._share(rc.max_tunnels, 1) if rc.websocket else 0

    def _route_limits(self, rc: RouteConfig) -> tuple[int, int]:
        mc, mq = self.overrides.limits(rc)
        return self._share(mc, 1), self._share(mq, 0)

    # -- building ------------------------------------------------------------------
    async def _build_table(self, config: Config, old: Table | None) -> tuple[Table, list[Upstream]]:
        """A complete table for ``config``; the upstreams it had to start are returned
        too so that a failed reload can close them."""
        started: list[Upstream] = []
        upstreams: dict[str, Upstream] = {}
        try:
            for uc in config.upstreams:
                prev = old.upstreams.get(uc.name) if old else None
                if prev is not None and prev.config == uc and prev.current():
                    upstreams[uc.name] = prev
                    continue
                u = build(uc, self.turn)
                await u.start()
                started.append(u)
                upstreams[uc.name] = u
        except BaseException:
            for u in started:
                await u.close(0)
            raise
        routes: dict[str, Route] = {}
        for rc in config.routes:
            prev_route = old.routes.get(rc.name) if old else None
            if prev_route is not None:
                gate = prev_route.gate  # the queue and in-flight count carry over
            else:
                gate = Gate(*self._route_limits(rc))
            limiter = None if rc.rate_limit is None else Limiter(rc.name, rc.rate_limit, self.rate_table)
            route = routes[rc.name] = Route(rc, gate, self.registry.route(rc.name), upstreams[rc.upstream],
                                            limiter)
            route.tunnel_limit = self._tunnel_limit(rc)
        router = Router((r.config, r) for r in routes.values())
        return Table(router, routes, upstreams), started

    def _openers(self, config: Config) -> tuple[dict[str, Opener], tuple[Certificate, ...]]:
        """Each listen address's opener, and the certificates: every file read again, as
        every reload must (a renewed certificate and a SIGHUP is how operators rotate)."""
        tls = config.tls
        certificates = []
        for i, c in enumerate(tls.certificates):
            try:
                certificates.append(load_certificate(
                    c.cert, config.file_path(c.cert), config.file_path(c.key), c.hosts,
                    tls.min_version, tls.session_tickets))
            except CertificateProblem as problem:
                raise ReloadFailed(f"tls.certificates[{i}].{problem.key}: {problem}") from None
        if self.worker_index == 0:  # once, not once per worker
            for cert in certificates:
                if cert.expired:
                    log.warning("tls.certificates: %s expired on %s", cert.name,
                                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(cert.not_after)))
        timeout = config.server.request_header_timeout
        secure: Opener = PLAIN
        if any(e.tls for e in config.server.listen):
            secure = TlsOpener(Terminator(certificates, timeout, self.handshakes))
        openers: dict[str, Opener] = {}
        for e in config.server.listen:
            inner = secure if e.tls else PLAIN
            openers[e.address] = (ProxyOpener(inner, timeout, self.proxy_headers)
                                  if e.proxy_protocol else inner)
        return openers, tuple(certificates)

    def _server(self, config: Config) -> H1Server:
        return H1Server(
            Gateway(self.serving),
            config.server,
            on_close=self._connection_closed,
            turn=self.turn,
            log_refusal=self._log_refusal,
        )

    def _log_refusal(self, client: str, method: str, target: str, version: str, status: int,
                     size: int, reason: str, duration: float) -> None:
        # a request refused before it had a route (H1Server.refused), in the access log
        access = self.access_log
        if access.enabled:
            access.write(client, method, target, version, status, size, "", "", "-", duration, reason)

    def _connection_closed(self) -> None:
        self.acceptor.closed_one()

    @property
    def connections(self) -> int:
        return self.acceptor.open

    # -- lifecycle -----------------------------------------------------------------
    async def start(self, sockets: dict[str, socket.socket] | None = None) -> None:
        """Build everything and start accepting. ``sockets`` are pre-bound listeners."""
        loop = asyncio.get_running_loop()
        self.tasks.install(loop)
        self.lag.start()
        self.gc.install()
        self.access_log.open()
        self.serving.table, _ = await self._build_table(self.config, None)
        self.server = self._server(self.config)
        self.acceptor = Acceptor(self.server, 1)
        self._use(self.config.server)  # as a reload would: the acceptor's limit, the gates'
        openers, self.certificates = self._openers(self.config)
        bound = dict(sockets or {})
        try:
            for address in self.config.server.addresses:
                if address not in bound:
                    bound[address] = bind(address, self.config.server.backlog,
                                          reuse_port=self.reuse_port)
        except OSError:
            for sock in bound.values():
                sock.close()
            raise
        for address, sock in bound.items():
            self.acceptor.serve(address, sock, openers.get(address, PLAIN))
        self.ready = True

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, let in-flight requests finish within ``timeout``, close pools."""
        self.draining = True
        self.ready = False
        await self.acceptor.stop_all()
        await self.server.shutdown(timeout)
        for u in self.table.upstreams.values():
            await u.close(1.0)
        for task in list(self._retiring):
            task.cancel()
        self.lag.stop()
        self.gc.uninstall()
        self.access_log.close()

    # -- reload (runtime.reload) -----------------------------------------------------
    async def prepare(self, new: Config, text: str = "") -> str | None:
        """Build what ``new`` needs beside the running generation and keep it for
        ``commit``; why it cannot be built (everything undone), or None."""
        await self.abort()  # a reload prepared before and never committed
        try:
            self.pending = await self._prepare(new)
        except ReloadFailed as exc:
            return str(exc)
        return None

    async def _prepare(self, new: Config) -> Pending:
        """Build everything ``new`` needs beside the running generation; raise
        ReloadFailed (having undone its own work) if any part cannot be built."""
        old_config = self.config
        access = None
        if (new.access_log_path(), new.log.access_format) != (
            old_config.access_log_path(), old_config.log.access_format
        ):
            try:
                access = AccessLog(new.access_log_path(), new.log.access_format)
                access.open()
            except OSError as exc:
                raise ReloadFailed(f"log.access_log: cannot open {new.log.access_log}: {exc.strerror}") from None
        try:
            table, started = await self._build_table(new, self.table)
        except Exception as exc:
            if access is not None:
                access.close()
            if isinstance(exc, KeyProblem):  # as start-up says it: file:line: key
                raise ReloadFailed(exc.located(new.path)) from None
            raise ReloadFailed(f"upstreams: {exc}") from None
        try:
            openers, certificates = self._openers(new)
        except ReloadFailed:
            for u in started:
                await u.close(0)
            if access is not None:
                access.close()
            raise
        pending = Pending(new, table, started, {}, access, openers, certificates)
        old_addresses = set(old_config.server.addresses)
        for address in new.server.addresses:
            if address in old_addresses:
                continue
            try:
                pending.bound[address] = bind(address, new.server.backlog, reuse_port=self.reuse_port)
            except OSError as exc:
                await self._undo(pending)
                raise ReloadFailed(f"server.listen: cannot bind {address}: {exc.strerror}") from None
        return pending

    async def abort(self) -> None:
        """Undo the prepared reload, which will not be committed (if there is one)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            await self._undo(pending)

    async def _undo(self, pending: Pending) -> None:
        for sock in pending.bound.values():
            sock.close()
        for u in pending.started:
            await u.close(0)
        if pending.access is not None:
            pending.access.close()

    async def commit(self, generation: int) -> None:
        """Swap the prepared generation in as ``generation``; retire what it no longer uses."""
        pending, self.pending = self.pending, None
        if pending is None:
            raise ReloadFailed("nothing prepared")
        old_config, old_table = self.config, self.table
        new, table = pending.config, pending.table
        # the swap, in one step as far as requests can see
        self.overrides.clear()  # set_limit lasts until the next reload
        self.config = new
        self.generation = generation
        self.serving.table = table
        self._use(new.server)
        logging.getLogger("gatewayd").setLevel(new.log.level.upper())
        if pending.access is not None:
            old_access, self.serving.access_log = self.access_log, pending.access
            old_access.close()
        self.certificates = pending.certificates
        for address, opener in pending.openers.items():
            self.acceptor.set_opener(address, opener)
        for address, sock in pending.bound.items():
            self.acceptor.serve(address, sock, pending.openers[address])
        # retire what the new generation no longer uses
        for address in set(old_config.server.addresses) - set(new.server.addresses):
            await self.acceptor.stop(address)
        kept = {id(u) for u in table.upstreams.values()}
        for u in old_table.upstreams.values():
            if id(u) not in kept:
                task = asyncio.get_running_loop().create_task(u.close(None))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    def _use(self, settings: ServerConfig) -> None:
        """Put ``[server]`` settings in force, at start and on reload: the one place
        they reach what runs. The request path reads them from ``Serving.server``;
        H1Server takes the ones its connections read (``configure``); the limits
        divided among workers are divided again. The rest are read where they are
        used, from the configuration in force (``backlog`` when binding,
        ``shutdown_timeout`` when draining, ``worker_timeout`` by the master)."""
        self.serving.server = settings
        self.server.configure(settings)
        self._apply_limits()

    def _apply_limits(self) -> None:
        for route in self.table.routes.values():
            route.tunnel_limit = self._tunnel_limit(route.config)
            route.gate.set_limits(*self._route_limits(route.config))
            route.gate.set_policy(route.config.queue_order, self._per_client(route.config.max_queue_per_client),
                                  route.config.priority_header is not None)
        self.acceptor.set_limit(self._share(self.config.server.max_connections, 1))
        self.server.set_client_limit(self._per_client(self.config.server.max_connections_per_client))
        self.body_memory.limit = self._share(self.config.server.request_buffer_memory, 0)

    def set_share(self, index: int, count: int) -> None:
        """This worker is now ``index`` of ``count`` live workers: re-divide the limits."""
        self.worker_index, self.worker_count = index, count
        self._apply_limits()

    # -- live limits ---------------------------------------------------------------
    def set_limit(self, route: str, max_concurrency: int | None, max_queue: int | None) -> None:
        """Change a route's gateway-wide limits until the next reload."""
        r = self.table.routes.get(route)
        if r is None:
            raise KeyError(route)
        self.overrides.set(route, max_concurrency, max_queue)
        r.gate.set_limits(*self._route_limits(r.config))

    def limits(self, route: str) -> tuple[int, int]:
        """The gateway-wide limits in force for a route (overrides included)."""
        return self.overrides.limits(self.table.routes[route].config)

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def version(self) -> str:
        return __version__
