"""The control commands, once: what the control socket calls into.

One process and the master of workers answer every command the same way; a
``Backend`` does only what differs (its own runtime, or every worker over IPC).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from ..config.settings import Config
from ..control.merge import top_clients
from ..control.protocol import (
    ClientRow,
    ClientsAnswer,
    QueueAnswer,
    ReloadAnswer,
    ServerStateAnswer,
    SetLimitAnswer,
    Snapshot,
    Waiter,
)
from ..runtime.limits import Overrides
from ..runtime.reload import Reloadable, reload
from . import notify

log = logging.getLogger("gatewayd")


def no_route(route: str, config: Config) -> str:
    """The error for a route name ``config`` does not have: with the names it has, as a
    configuration error lists the upstreams a route may name."""
    names = ", ".join(r.name for r in config.routes) or "none"
    return f"no route {route!r} (routes: {names})"


class Backend(Reloadable, Protocol):
    """What one process and a master do differently behind the same commands."""

    @property
    def overrides(self) -> Overrides:
        """The limits set by hand, gateway-wide."""

    def snapshot(self) -> Snapshot: ...

    async def set_limit(self, route: str, max_concurrency: int | None,
                        max_queue: int | None) -> str | None:
        """Change a known route's limits (None: that one unchanged), recorded in
        ``overrides``; what went wrong, or None."""

    async def waiters(self, route: str) -> list[Waiter]:
        """The route's waiters, longest waiting first."""

    async def clients(self, route: str) -> list[ClientRow]:
        """The route's clients in every process (``export.clients``), unsorted."""

    async def server_state(self, upstream: str, server: str, state: str) -> ServerStateAnswer:
        """Set a server up or down by hand; the control answer."""


class GatewayController:
    """The control socket's commands (it satisfies control.server.Controller) over a backend."""

    def __init__(self, backend: Backend, lock: asyncio.Lock | None = None) -> None:
        self.backend = backend
        # one reload at a time; a master also holds it while it starts a worker, so a
        # worker never boots from a configuration being replaced
        self.lock = lock if lock is not None else asyncio.Lock()

    def snapshot(self) -> Snapshot:
        return self.backend.snapshot()

    async def reload(self, dry_run: bool) -> ReloadAnswer:
        """A SIGHUP and the ``reload`` command both land here."""
        async with self.lock:
            if not dry_run:
                notify.reloading()
            try:
                return await reload(self.backend, dry_run)
            finally:
                if not dry_run:
                    notify.ready()  # also after a failure: the old configuration serves on

    def _known(self, route: str) -> bool:
        return any(r.name == route for r in self.backend.config.routes)

    async def set_limit(self, route: str, max_concurrency: int | None,
                        max_queue: int | None) -> SetLimitAnswer:
        if not self._known(route):
            return {"ok": False, "error": no_route(route, self.backend.config)}
        error = await self.backend.set_limit(route, max_concurrency, max_queue)
        if error is not None:
            return {"ok": False, "error": error}
        mc, mq = self.backend.overrides.limits(self.backend.config.route(route))
        log.info("set_limit %s: max_concurrency=%d max_queue=%d (until the next reload)", route, mc, mq)
        return {"ok": True, "route": route, "max_concurrency": mc, "max_queue": mq}

    async def queue(self, route: str) -> QueueAnswer:
        if not self._known(route):
            return {"ok": False, "error": no_route(route, self.backend.config)}
        return {"ok": True, "route": route, "waiters": await self.backend.waiters(route)}

    async def clients(self, route: str, top: int) -> ClientsAnswer:
        if not self._known(route):
            return {"ok": False, "error": no_route(route, self.backend.config)}
        return {"ok": True, "route": route,
                "clients": top_clients(await self.backend.clients(route), top)}

    async def server_state(self, upstream: str, server: str, state: str) -> ServerStateAnswer:
        return await self.backend.server_state(upstream, server, state)
