"""One gatewayd process (``workers = 1``): the runtime serves clients itself.

What is particular to it: the control commands act on its own runtime
(``RuntimeBackend``), and start and stop are the runtime's (``OneProcess``);
the commands, the reload policy and the signal loop are shared with the master
(controller.py, runtime/reload.py, lifecycle.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

from ..config.settings import Config
from ..control.protocol import ClientRow, ServerStateAnswer, Snapshot, Waiter
from ..control.snapshot import clients, snapshot, waiters
from ..runtime.limits import Overrides
from ..runtime.reload import LastReload
from ..runtime.state import Runtime
from ..stats.process import raise_fd_limit
from ..upstreams.lifespan import StartupFailed
from ..upstreams.names import KeyProblem
from ..upstreams.state import set_server_state
from . import lifecycle
from .controller import GatewayController, no_route
from .startup import new_loop, setup_logging

log = logging.getLogger("gatewayd")


class RuntimeBackend:
    """The control commands' backend for one process: its runtime."""

    several = False

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @property
    def config(self) -> Config:
        return self.runtime.config

    @property
    def overrides(self) -> Overrides:
        return self.runtime.overrides

    @property
    def generation(self) -> int:
        return self.runtime.generation

    @generation.setter
    def generation(self, value: int) -> None:
        self.runtime.generation = value

    @property
    def last_reload(self) -> LastReload | None:
        return self.runtime.last_reload

    @last_reload.setter
    def last_reload(self, value: LastReload | None) -> None:
        self.runtime.last_reload = value

    async def prepare(self, new: Config, text: str) -> str | None:
        return await self.runtime.prepare(new, text)

    async def commit(self, generation: int) -> None:
        await self.runtime.commit(generation)

    async def abort(self) -> None:
        await self.runtime.abort()

    def snapshot(self) -> Snapshot:
        return snapshot(self.runtime)

    async def set_limit(self, route: str, max_concurrency: int | None,
                        max_queue: int | None) -> str | None:
        try:
            self.runtime.set_limit(route, max_concurrency, max_queue)
        except KeyError:
            return no_route(route, self.runtime.config)
        return None

    async def waiters(self, route: str) -> list[Waiter]:
        return waiters(self.runtime, route)

    async def clients(self, route: str) -> list[ClientRow]:
        return clients(self.runtime, route)

    async def server_state(self, upstream: str, server: str, state: str) -> ServerStateAnswer:
        return set_server_state(self.runtime.table.upstreams, upstream, server, state)


class LocalController(GatewayController):
    """Control commands for a single-process gateway."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(RuntimeBackend(runtime))
        self.runtime = runtime


class OneProcess:
    """Start and stop of a single-process gateway (lifecycle.Role)."""

    failure = None

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @property
    def config(self) -> Config:
        return self.runtime.config

    async def start(self, stop: Callable[[], None]) -> bool:
        config = self.runtime.config
        try:
            await self.runtime.start()
        except KeyProblem as exc:  # a server name that does not resolve, a certificate file
            log.error("%s", exc.located(config.path))
            return False
        except StartupFailed as exc:  # an ASGI application's lifespan startup, with its message
            log.error("%s", exc)
            return False
        except OSError as exc:
            log.error("cannot listen on %s: %s", ", ".join(config.server.addresses), exc.strerror or exc)
            return False
        return True

    async def undo(self) -> None:
        await self.runtime.shutdown(0)

    def ready(self) -> bool:
        return self.runtime.ready

    def serving(self) -> None:
        # Everything alive now lives as long as the process: keep it out of the
        # collector's sight so full collections stay short (see gatewayd(8), GC).
        gc.collect()
        gc.freeze()
        self.runtime.gc.reset()  # the deliberate start-up collection is not a pause anyone waited on

    def banner(self) -> str:
        config = self.runtime.config
        return (f"gatewayd {self.runtime.version} serving on {', '.join(config.server.addresses)} "
                f"(control {config.socket_path})")

    def reopen_logs(self) -> None:
        self.runtime.access_log.reopen()

    async def drain(self) -> None:
        await self.runtime.shutdown(self.runtime.config.server.shutdown_timeout)


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; return the exit status."""
    runtime = Runtime(config)
    return await lifecycle.run(OneProcess(runtime), LocalController(runtime))


def run(config: Config) -> int:
    setup_logging(config.log.level)
    soft, _hard = raise_fd_limit()
    if soft < config.server.max_connections + 64:
        log.warning("open-file limit %d is below max_connections %d (+64 for upstreams and "
                    "files): accepting will pause at the limit", soft, config.server.max_connections)
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(serve(config))
