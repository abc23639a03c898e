"""The daemon's state in one object, built from a frozen configuration.

Reload is build-then-swap: the new routing table (routes, upstreams, listeners,
access log) is built completely beside the running one; only when every part
stands is it swapped in, in one step. Any error leaves everything as it was.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..config.diff import diff, restart_only_changes
from ..config.loader import ConfigError, load
from ..config.settings import Config, RouteConfig, worker_count
from ..http.bodymemory import BodyMemory
from ..http.listener import Acceptor, bind
from ..http.server import H1Server
from ..http.turn import Turn
from ..proxy.accesslog import AccessLog
from ..proxy.admission import Gate, share
from ..proxy.exchange import Route, Upstream
from ..proxy.gateway import Gateway
from ..proxy.router import Router, Table
from ..proxy.serving import Serving
from ..stats.metrics import Registry
from ..stats.process import GcMonitor, LoopLag, TaskCounter
from ..upstreams.factory import build

log = logging.getLogger("gatewayd")


class ReloadFailed(Exception):
    pass


@dataclass
class Pending:
    """A reload built and bound, not yet swapped in."""

    config: Config
    table: Table
    started: list[Upstream]
    bound: dict[str, Any]
    access: AccessLog | None


class Runtime:
    """Everything a running gateway (one worker process) holds."""

    def __init__(self, config: Config, *, worker_index: int = 0, worker_count: int = 1,
                 reuse_port: bool = False) -> None:
        self.config = config
        self.worker_index = worker_index
        self.worker_count = worker_count
        self.reuse_port = reuse_port
        self.generation = 1
        self.last_reload: dict[str, Any] | None = None
        self.started = time.time()
        self.registry = Registry()
        self.tasks = TaskCounter()
        self.lag = LoopLag()
        self.gc = GcMonitor()
        self.turn = Turn()  # shared by the client side and the upstream pools (turn.py)
        self.draining = False
        self.ready = False
        self.overrides: dict[str, dict[str, int]] = {}
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

    def _route_limits(self, rc: RouteConfig) -> tuple[int, int]:
        o = self.overrides.get(rc.name, {})
        mc = o.get("max_concurrency", rc.max_concurrency)
        mq = o.get("max_queue", rc.max_queue)
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
                if prev is not None and prev.config == uc:
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
            routes[rc.name] = Route(rc, gate, self.registry.route(rc.name), upstreams[rc.upstream])
        router = Router((r.config, r) for r in routes.values())
        return Table(router, routes, upstreams), started

    def _server(self, config: Config) -> H1Server:
        s = config.server
        return H1Server(
            Gateway(self.serving),
            head_timeout=s.request_header_timeout,
            send_timeout=s.send_timeout,
            keepalive_timeout=s.keepalive_timeout,
            on_close=self._connection_closed,
            turn=self.turn,
            log_refusal=self._log_refusal,
        )

    def _log_refusal(self, client: str, method: str, target: str, version: str, status: int,
                     reason: str, duration: float) -> None:
        # a request refused before it had a route (H1Server.refused), in the access log
        access = self.access_log
        if access.enabled:
            access.write(client, method, target, version, status, 0, "", "", "-", duration, reason)

    def _connection_closed(self) -> None:
        self.acceptor.closed_one()

    @property
    def connections(self) -> int:
        return self.acceptor.open

    # -- lifecycle -----------------------------------------------------------------
    async def start(self, sockets: dict[str, Any] | None = None) -> None:
        """Build everything and start accepting. ``sockets`` are pre-bound listeners."""
        loop = asyncio.get_running_loop()
        self.tasks.install(loop)
        self.lag.start()
        self.gc.install()
        self.access_log.open()
        self.serving.table, _ = await self._build_table(self.config, None)
        self.server = self._server(self.config)
        self.acceptor = Acceptor(self.server, self._share(self.config.server.max_connections, 1))
        bound = dict(sockets or {})
        try:
            for address in self.config.server.listen:
                if address not in bound:
                    bound[address] = bind(address, self.config.server.backlog,
                                          reuse_port=self.reuse_port)
        except OSError:
            for sock in bound.values():
                sock.close()
            raise
        for address, sock in bound.items():
            self.acceptor.serve(address, sock)
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

    # -- reload --------------------------------------------------------------------
    async def reload(self, *, dry_run: bool = False, config: Config | None = None) -> dict[str, Any]:
        """Re-read the file (or take ``config``), build, swap. The outcome as a control answer."""
        try:
            new = config if config is not None else load(self.config.path)
        except ConfigError as exc:
            return self._reload_failed("\n".join(exc.errors), dry_run)
        changes = diff(self.config, new)
        refused = restart_only_changes(self.config, new)
        if new.server.workers != self.config.server.workers and worker_count(new) > 1:
            refused.append("server.workers (from one process to several)")
        if refused:
            return self._reload_failed(
                f"{new.path}: " + "; ".join(f"{k} cannot change on reload (restart needed)" for k in refused),
                dry_run,
            )
        if dry_run:
            return {"ok": True, "dry_run": True, "generation": self.generation, "changes": changes}
        try:
            await self._apply(new)
        except ReloadFailed as exc:
            return self._reload_failed(f"{new.path}: {exc}", False)
        self.generation += 1
        self.last_reload = {"ok": True, "time": time.time(), "error": None, "changes": changes}
        log.info("reloaded %s: generation %d; %s", new.path, self.generation,
                 "; ".join(changes) or "no changes")
        return {"ok": True, "generation": self.generation, "changes": changes}

    def _reload_failed(self, error: str, dry_run: bool) -> dict[str, Any]:
        if not dry_run:
            self.last_reload = {"ok": False, "time": time.time(), "error": error, "changes": []}
            log.error("reload failed, configuration unchanged: %s", error)
        return {"ok": False, "error": error}

    async def _apply(self, new: Config) -> None:
        await self.commit(await self.prepare(new))

    async def prepare(self, new: Config) -> Pending:
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
            raise ReloadFailed(f"upstreams: {exc}") from None
        pending = Pending(new, table, started, {}, access)
        old_addresses = set(old_config.server.listen)
        for address in new.server.listen:
            if address in old_addresses:
                continue
            try:
                pending.bound[address] = bind(address, new.server.backlog, reuse_port=self.reuse_port)
            except OSError as exc:
                await self.abort(pending)
                raise ReloadFailed(f"server.listen: cannot bind {address}: {exc.strerror}") from None
        return pending

    async def abort(self, pending: Pending) -> None:
        """Undo a prepared reload that will not be committed."""
        for sock in pending.bound.values():
            sock.close()
        for u in pending.started:
            await u.close(0)
        if pending.access is not None:
            pending.access.close()

    async def commit(self, pending: Pending) -> None:
        """Swap the prepared generation in; retire what it no longer uses."""
        old_config, old_table = self.config, self.table
        new, table = pending.config, pending.table
        # the swap, in one step as far as requests can see
        self.overrides.clear()  # set_limit lasts until the next reload
        self.config = new
        self.serving.table = table
        self.serving.server = new.server
        self._apply_limits()
        s = new.server
        self.server.keepalive_timeout = s.keepalive_timeout
        self.server.head_timeout = s.request_header_timeout
        self.server.send_timeout = s.send_timeout
        logging.getLogger("gatewayd").setLevel(new.log.level.upper())
        if pending.access is not None:
            old_access, self.serving.access_log = self.access_log, pending.access
            old_access.close()
        for address, sock in pending.bound.items():
            self.acceptor.serve(address, sock)
        # retire what the new generation no longer uses
        for address in set(old_config.server.listen) - set(new.server.listen):
            await self.acceptor.stop(address)
        kept = {id(u) for u in table.upstreams.values()}
        for u in old_table.upstreams.values():
            if id(u) not in kept:
                task = asyncio.get_running_loop().create_task(u.close(None))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    def _apply_limits(self) -> None:
        for route in self.table.routes.values():
            route.gate.set_limits(*self._route_limits(route.config))
        self.acceptor.set_limit(self._share(self.config.server.max_connections, 1))
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
        o = self.overrides.setdefault(route, {})
        if max_concurrency is not None:
            o["max_concurrency"] = max_concurrency
        if max_queue is not None:
            o["max_queue"] = max_queue
        r.gate.set_limits(*self._route_limits(r.config))

    def limits(self, route: str) -> tuple[int, int]:
        """The gateway-wide limits in force for a route (overrides included)."""
        rc = self.table.routes[route].config
        o = self.overrides.get(route, {})
        return o.get("max_concurrency", rc.max_concurrency), o.get("max_queue", rc.max_queue)

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def version(self) -> str:
        return __version__
