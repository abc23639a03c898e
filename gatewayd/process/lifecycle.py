"""Start, signals and stop, once for one process and for the master of workers.

Like gunicorn's arbiter: signal handlers only put the signal on a queue; one
loop takes them off and acts, so a reload and a shutdown never run at the same
time. What differs between the two (starting a runtime or workers, draining
them) is a ``Role``'s.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Protocol

from ..config.settings import Config
from ..control.prometheus import MetricsListener
from ..control.server import ControlError, Controller, ControlServer
from ..exits import EXIT_FAILURE, EXIT_OK
from . import notify
from .startup import ignore_late_signals

log = logging.getLogger("gatewayd")

SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Role(Protocol):
    """What one process and the master of workers do differently at start and stop."""

    @property
    def config(self) -> Config:
        """The configuration in force (a reload replaces it)."""

    @property
    def failure(self) -> str | None:
        """Set when the gateway must stop with EXIT_FAILURE (a worker failed at boot)."""

    async def start(self, stop: Callable[[], None]) -> bool:
        """Start serving clients; False when it could not (said in the log, undone).
        ``stop`` asks the loop to stop, as SIGTERM does."""

    async def undo(self) -> None:
        """Stop at once: a later start-up step failed."""

    def ready(self) -> bool:
        """Whether clients are being served (``/readyz``)."""

    def serving(self) -> None:
        """The last steps before ``READY=1``: everything is up."""

    def banner(self) -> str:
        """The log line that says the gateway serves."""

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen the access log (after rotation)."""

    async def drain(self) -> None:
        """Stop serving: in-flight requests get ``shutdown_timeout``."""


async def run(role: Role, controller: Controller) -> int:
    """Start ``role`` and its control socket (and /metrics), act on signals until
    SIGTERM/SIGINT, stop; the exit status."""
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[int] = asyncio.Queue()
    if not await role.start(lambda: signals.put_nowait(signal.SIGTERM)):
        return EXIT_FAILURE
    config = role.config
    # /metrics before the control socket: a gateway whose control socket answers is
    # listening on everything its configuration names (scripts and tests wait on it)
    metrics = None
    if config.metrics.listen:
        metrics = MetricsListener(config.metrics.listen, controller.snapshot, role.ready,
                                  config.metrics.allow)
        try:
            await metrics.start()
        except OSError as exc:
            log.error("cannot listen on %s (metrics): %s", config.metrics.listen, exc.strerror)
            await role.undo()
            return EXIT_FAILURE
    control = ControlServer(controller, config.socket_path, config.control.mode)
    try:
        await control.start()
    except (ControlError, OSError) as exc:
        log.error("%s", exc)
        if metrics is not None:
            await metrics.close()
        await role.undo()
        return EXIT_FAILURE

    for sig in SIGNALS:
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    role.serving()
    notify.ready()
    log.info("%s", role.banner())
    try:
        while True:
            got = await signals.get()
            if got == signal.SIGHUP:
                log.info("SIGHUP: reloading %s", role.config.path)
                await controller.reload(False)
            elif got == signal.SIGUSR1:
                role.reopen_logs()
            else:
                if role.failure is None:  # else the reason is in the log already
                    log.info("%s: shutting down (up to %.1f s for in-flight requests)",
                             signal.Signals(got).name, role.config.server.shutdown_timeout)
                break
    finally:
        notify.stopping()
        for sig in SIGNALS:
            # the drain is bounded by shutdown_timeout; more signals change nothing
            loop.add_signal_handler(sig, log.info, "%s: already shutting down", sig)
        await role.drain()
        if metrics is not None:
            await metrics.close()
        await control.close()
    ignore_late_signals(loop)
    log.info("stopped")
    return EXIT_FAILURE if role.failure else EXIT_OK
