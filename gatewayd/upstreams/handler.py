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


class HandlerUpstream(Application):
    """``handler = "module:callable"``: ``async def handler(request) -> StreamResponse``.

    The handler's response is sent inside the route's slot, so the slot is held
    until the client has it all; a client that leaves cancels the handler's task.
    """

    def __init__(self, config: UpstreamConfig, turn: Turn) -> None:
        super().__init__(config, turn)
        self._handler: Handler = self.app

    async def serve(self, ex: Exchange) -> None:
        ours = ex.request
        incoming = ex.body
        if incoming is not None:
            if incoming.complete or incoming.received:  # read (or begun) before admission
                ours.content = incoming.as_stream()
            else:
                incoming.send_continue()  # the handler reads request.content itself
        # client_max_size bounds what the handler may read() at once: max_body_size
        limit = ex.body.limit if ex.body is not None else 0
        request = ours.as_aiohttp(limit, ex.path if ex.path != ours.raw_path else None, _Request)
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
