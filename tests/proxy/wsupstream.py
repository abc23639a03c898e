"""A real WebSocket upstream for the tunnel tests: aiohttp's server on 127.0.0.1
with an echo endpoint, one that sends without reading (for back-pressure), one
that closes at once, one that refuses the upgrade, and events the tests wait on."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiohttp import WSMsgType, web

from tests.builders import free_port


class WsUpstream:
    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        self.ssl_context = ssl_context  # an https:// upstream when given
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"
        self.open = 0  # sessions open now
        self.sessions = 0  # sessions ever
        self.closed = asyncio.Event()  # a session ended (set each time; tests clear it)
        self.headers: list[dict[str, str]] = []  # each upgrade request's headers
        self.sent = 0  # bytes /flood pushed into its socket so far
        self.flood_size = 200 * 1024 * 1024
        self.sessions_ws: list[web.WebSocketResponse] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/echo", self.echo)
        app.router.add_get("/flood", self.flood)
        app.router.add_get("/hangup", self.hangup)
        app.router.add_get("/refuse", self.refuse)
        app.router.add_get("/plain", self.plain)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _session(self, request: web.Request, **kw: Any) -> web.WebSocketResponse:
        self.headers.append(dict(request.headers))
        ws = web.WebSocketResponse(max_msg_size=0, **kw)
        await ws.prepare(request)
        self.sessions_ws.append(ws)
        self.open += 1
        self.sessions += 1
        return ws

    def _ended(self) -> None:
        self.open -= 1
        self.closed.set()

    async def echo(self, request: web.Request) -> web.WebSocketResponse:
        ws = await self._session(request)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
        finally:
            self._ended()
        return ws

    async def flood(self, request: web.Request) -> web.WebSocketResponse:
        ws = await self._session(request)
        chunk = b"x" * 65536
        try:
            while self.sent < self.flood_size and not ws.closed:
                await ws.send_bytes(chunk)  # waits while the socket's buffer is full
                self.sent += len(chunk)
            async for _ in ws:
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._ended()
        return ws

    async def hangup(self, request: web.Request) -> web.WebSocketResponse:
        ws = await self._session(request)
        self._ended()
        assert request.transport is not None
        request.transport.close()  # its TCP connection ends (FIN), no closing handshake
        return ws

    async def refuse(self, request: web.Request) -> web.Response:
        return web.Response(status=403, text="no websocket for you")

    async def plain(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        return web.Response(text="plain")


async def ws_echo_handler(request: web.BaseRequest) -> web.StreamResponse:
    """An in-process handler (``handler = "tests.proxy.wsupstream:ws_echo_handler"``)
    that answers with its own WebSocket and echoes text until the client closes."""
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str("handler:" + msg.data)
    return ws
