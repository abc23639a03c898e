"""In-process upstreams: an async aiohttp handler run on the event loop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.http import SERVER_SOFTWARE

from ..config.settings import UpstreamConfig
from ..http.turn import Turn
from ..proxy.exchange import Exchange
from .application import Application

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class _Request(web.BaseRequest):
    """aiohttp's request, whose responses do not name aiohttp and Python's versions.

    aiohttp gives every response ``Server: Python/3.x aiohttp/3.x`` unless it has one;
    the gateway's answers advertise no versions to any client (its own have no
    ``Server`` at all), so that default is taken out again just before the head is
    written. A ``Server`` the handler set itself is kept."""

    __slots__ = ()

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        headers = response.headers
        if headers.get(hdrs.SERVER) == SERVER_SOFTWARE:
            del headers[hdrs.SERVER]


class _Session(_Request):
    """The request of an upgrade: the response's 101 opens a WebSocket session, which
    the gateway counts as a tunnel until the handler returns."""

    __slots__ = ("_opened",)
    _opened: Callable[[], None]

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        await super()._prepare_hook(response)
        if response.status == 101:
            self._opened()


class HandlerUpstream(Application):
    """``handler = "module:callable"``: ``async def handler(request) -> StreamResponse``.

    The handler's response is sent inside the route's slot, so the slot is held
    until the client has it all; a client that leaves cancels the handler's task.
    """

    def __init__(self, config: UpstreamConfig, turn: Turn) -> None:
        super().__init__(config, turn)
        self._handler: Handler = self.app

    async def serve_upgrade(self, ex: Exchange, protocol: str) -> None:
        """An upgrade is the handler's to answer (aiohttp's WebSocketResponse); its
        session, from the 101 to the handler's return, is one of the route's tunnels
        (``proxy.tunnels.Upgrade``) and keeps its slot."""
        opened = getattr(ex, "session_opened", None)
        await self.serve(ex, opened)

    async def serve(self, ex: Exchange, opened: Callable[[], None] | None = None) -> None:
        ours = ex.request
        incoming = ex.body
        if incoming is not None:
            if incoming.complete or incoming.received:  # read (or begun) before admission
                ours.content = incoming.as_stream()
            else:
                incoming.send_continue()  # the handler reads request.content itself
        # client_max_size bounds what the handler may read() at once: max_body_size
        limit = ex.body.limit if ex.body is not None else 0
        kind = _Request if opened is None else _Session
        request = ours.as_aiohttp(limit, ex.path if ex.path != ours.raw_path else None, kind)
        if opened is not None:
            request._opened = opened  # type: ignore[attr-defined]  # (a _Session: kind above)
        resp = await self._handler(request)
        ex.status = resp.status
        if not resp.prepared:
            await resp.prepare(request)
        ex.head_sent = True
        await resp.write_eof()
        body = getattr(resp, "body", None)
        ex.sent = len(body) if isinstance(body, bytes) else resp.body_length
        if not resp.keep_alive:
            ours.force_close()
