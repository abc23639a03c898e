"""What every upstream kind shares: the exchange it serves, its failures, and a
close that waits for the last request it is serving (reloads replace pools).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from .config import UpstreamConfig

if TYPE_CHECKING:
    from .body import RequestBody
    from .h1server import Request
    from .runtime import Route
    from .turn import Turn


class UpstreamFailure(Exception):
    """The upstream failed before a response head reached the client."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Exchange:
    """One admitted request on its way through an upstream."""

    __slots__ = ("body", "head_sent", "path", "request", "route", "sent", "start", "status",
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

    @property
    def client_ip(self) -> str:
        """The client's address as forwarded and logged; "" when unknown. Read where an
        upstream needs it, not stored for every exchange."""
        return self.request.remote or ""


class Cancellable(Protocol):
    """What a connection cancels when its client leaves: a task, or an inline exchange."""

    def cancel(self) -> object: ...


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
    """Base of the upstream kinds. ``serve`` writes the whole response to the client."""

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.name = config.name
        self.active = 0
        self._idle: asyncio.Event | None = None

    async def start(self) -> None:
        """Open what the upstream needs (pools, sessions); called once, on the loop."""

    def serve_inline(self, request: Request, route: Route, path: str, start: float,
                     sink: Sink) -> Cancellable | None:
        """Serve an admitted request without a body (``path`` as ``Exchange.path``), as
        an exchange without a task that ends in ``sink``, if this upstream can (see
        HttpUpstream); None, with nothing done, to have ``serve`` do it."""
        return None

    async def serve(self, ex: Exchange) -> None:
        """Send the response for ``ex`` to its client in full (``ex.request.keep_alive``
        says afterwards whether the connection may carry another request)."""
        raise NotImplementedError

    def enter(self) -> None:
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        if self._idle is not None and not self.active:  # (closing: rare, so asked first)
            self._idle.set()

    async def close(self, timeout: float | None = None) -> None:
        """Close after the requests being served finished (or ``timeout`` passed)."""
        if self.active:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                pass
        await self._close()

    async def _close(self) -> None:
        pass


def build(config: UpstreamConfig, turn: Turn) -> Upstream:
    """The upstream object for a validated configuration; ``turn``: the gateway's."""
    if config.servers is not None:
        from .upstream_http import HttpUpstream

        return HttpUpstream(config, turn)
    if config.executor == "process":
        from .upstream_process import ProcessUpstream

        return ProcessUpstream(config)
    from .upstream_handler import HandlerUpstream

    return HandlerUpstream(config)
