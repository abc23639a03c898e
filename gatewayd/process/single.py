"""Running one gatewayd process: start-up, signals, graceful shutdown.

Signal handlers only put the signal on a queue; one loop takes them off and
acts, so a reload and a shutdown never run at the same time.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from typing import Any

from ..config.settings import Config
from ..control.prometheus import MetricsListener
from ..control.server import ControlError, ControlServer
from ..control.snapshot import snapshot, waiters
from ..exits import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK  # noqa: F401  (re-exported)
from ..runtime.state import Runtime
from ..stats.process import raise_fd_limit
from ..upstreams.http import UnresolvableServer
from ..upstreams.state import set_server_state
from . import notify
from .startup import ignore_late_signals, new_loop, setup_logging

log = logging.getLogger("gatewayd")


class LocalController:
    """Control commands for a single-process gateway."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._reload_lock = asyncio.Lock()

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self.runtime)

    async def reload(self, dry_run: bool) -> dict[str, Any]:
        async with self._reload_lock:
            if not dry_run:
                notify.reloading()
            try:
                return await self.runtime.reload(dry_run=dry_run)
            finally:
                if not dry_run:
                    notify.ready()

    async def set_limit(self, route: str, max_concurrency: int | None,
                        max_queue: int | None) -> dict[str, Any]:
        try:
            self.runtime.set_limit(route, max_concurrency, max_queue)
        except KeyError:
            return {"ok": False, "error": f"no route {route!r}"}
        mc, mq = self.runtime.limits(route)
        log.info("set_limit %s: max_concurrency=%d max_queue=%d (until the next reload)",
                 route, mc, mq)
        return {"ok": True, "route": route, "max_concurrency": mc, "max_queue": mq}

    async def queue(self, route: str) -> dict[str, Any]:
        if route not in self.runtime.table.routes:
            return {"ok": False, "error": f"no route {route!r}"}
        return {"ok": True, "route": route, "waiters": waiters(self.runtime, route)}

    async def server_state(self, upstream: str, server: str, state: str) -> dict[str, Any]:
        return set_server_state(self.runtime.table.upstreams, upstream, server, state)


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; return the exit status."""
    loop = asyncio.get_running_loop()
    runtime = Runtime(config)
    try:
        await runtime.start()
    except UnresolvableServer as exc:
        log.error("%s", exc.located(config.path))
        return EXIT_FAILURE
    except OSError as exc:
        log.error("cannot listen on %s: %s", ", ".join(config.server.listen), exc.strerror or exc)
        return EXIT_FAILURE
    controller = LocalController(runtime)
    control = ControlServer(controller, config.socket_path, config.control.mode)
    try:
        await control.start()
    except (ControlError, OSError) as exc:
        log.error("%s", exc)
        await runtime.shutdown(0)
        return EXIT_FAILURE
    metrics = None
    if config.metrics.listen:
        metrics = MetricsListener(config.metrics.listen, controller.snapshot, lambda: runtime.ready,
                                  config.metrics.allow)
        try:
            await metrics.start()
        except OSError as exc:
            log.error("cannot listen on %s (metrics): %s", config.metrics.listen, exc.strerror)
            await control.close()
            await runtime.shutdown(0)
            return EXIT_FAILURE

    signals: asyncio.Queue[int] = asyncio.Queue()
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    # Everything alive now lives as long as the process: keep it out of the
    # collector's sight so full collections stay short (see gatewayd(8), GC).
    gc.collect()
    gc.freeze()
    runtime.gc.reset()  # the deliberate start-up collection is not a pause anyone waited on
    notify.ready()
    log.info("gatewayd %s serving on %s (control %s)", runtime.version,
             ", ".join(config.server.listen), config.socket_path)
    try:
        while True:
            got = await signals.get()
            if got == signal.SIGHUP:
                log.info("SIGHUP: reloading %s", runtime.config.path)
                await controller.reload(False)
            elif got == signal.SIGUSR1:
                runtime.access_log.reopen()
            else:
                log.info("%s: shutting down (up to %.1f s for in-flight requests)",
                         signal.Signals(got).name, runtime.config.server.shutdown_timeout)
                break
    finally:
        notify.stopping()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            # the drain is bounded by shutdown_timeout; more signals change nothing
            loop.add_signal_handler(sig, log.info, "%s: already shutting down", sig)
        await runtime.shutdown(runtime.config.server.shutdown_timeout)
        if metrics is not None:
            await metrics.close()
        await control.close()
    ignore_late_signals(loop)
    log.info("stopped")
    return EXIT_OK


def run(config: Config) -> int:
    setup_logging(config.log.level)
    soft, _hard = raise_fd_limit()
    if soft < config.server.max_connections + 64:
        log.warning("open-file limit %d is below max_connections %d (+64 for upstreams and "
                    "files): accepting will pause at the limit", soft, config.server.max_connections)
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(serve(config))
