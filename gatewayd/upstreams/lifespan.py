"""The ASGI lifespan protocol for one application: startup before the upstream
serves (in each worker), shutdown after its last request.

``lifespan = "auto"``: an application that raises before it answers the
startup message does not speak the protocol (a plain ASGI callable often
raises on an unknown scope type); it is served without, as uvicorn does, with
a line at INFO. ``"on"``: the protocol is required; any failure fails the
start. ``lifespan.startup.failed`` fails the start (or the reload that brought
the application) with the application's message, whatever the mode.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("gatewayd")

ASGI_LIFESPAN = {"version": "3.0", "spec_version": "2.0"}


class StartupFailed(Exception):
    """The application's lifespan startup failed: the gateway does not start (exit 1)."""


class Lifespan:
    """The lifespan task of one application (see the module docstring)."""

    def __init__(self, app: Any, name: str, required: bool) -> None:
        self.app = app
        self.name = name  # "upstreams.NAME", for messages
        self.required = required
        self.state: dict[str, Any] = {}  # the namespace each request's scope copies
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI_LIFESPAN, "state": self.state}
        try:
            await self.app(scope, self._inbox.get, self._answers.put)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # (an application may raise anything, SystemExit included)
            self._error = exc
        finally:
            self._answers.put_nowait({"type": "_returned"})

    async def startup(self) -> bool:
        """Run the startup; False when the application does not speak the protocol
        (``auto``); StartupFailed when it failed."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        await self._inbox.put({"type": "lifespan.startup"})
        answer = await self._answers.get()
        kind = answer["type"]
        if kind == "lifespan.startup.complete":
            return True
        if kind == "lifespan.startup.failed":
            await self._stop()
            raise StartupFailed(f"{self.name}: lifespan startup failed: {answer.get('message', '')}")
        error = self._error
        await self._stop()
        if error is None:
            message = "the application returned before answering lifespan.startup"
        else:
            message = f"{type(error).__name__}: {error}"
        if self.required:
            raise StartupFailed(f"{self.name}: lifespan startup failed: {message}")
        log.info("%s: the application does not speak ASGI lifespan (%s); served without it",
                 self.name, message)
        return False

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Run the shutdown (after the last request); a failure is logged, not raised."""
        if self._task is None or self._task.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        try:
            answer = await asyncio.wait_for(self._answers.get(), timeout)
        except TimeoutError:
            log.error("%s: lifespan shutdown did not finish in %.0f s", self.name, timeout)
            await self._stop()
            return
        if answer["type"] == "lifespan.shutdown.failed":
            log.error("%s: lifespan shutdown failed: %s", self.name, answer.get("message", ""))
        elif answer["type"] != "lifespan.shutdown.complete":
            log.error("%s: lifespan shutdown: %s", self.name, self._error or "the application returned")
        await self._stop()

    async def _stop(self) -> None:
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), 1.0)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()
