"""The ASGI applications the ``apps`` scenario serves, the same module under
gatewayd (``interface = "asgi"``) and under uvicorn: a raw ASGI hello, a
Starlette hello route, and a raw app that awaits 100 ms per request.

Each answers with the throughput scenario's 100-byte body. The raw ones speak
the lifespan protocol as a framework does (startup and shutdown complete), so
that neither server logs or works around a refusal.

    uvicorn bench.apps:hello      gatewayd: handler = "bench.apps:hello"
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

BODY = b"x" * 99 + b"\n"  # bench.servers.BODY (not imported: the app process loads nothing of the harness)
SLOW_DELAY = 0.1  # seconds the slow app awaits per request
_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]
_START = {"type": "http.response.start", "status": 200, "headers": _HEADERS}
_BODY = {"type": "http.response.body", "body": BODY}


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    """Raw ASGI 3: the 100-byte body to any HTTP request."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await send(_START)
    await send(_BODY)


async def slow(scope: Scope, receive: Receive, send: Send) -> None:
    """Raw ASGI 3: the 100-byte body after ``asyncio.sleep(SLOW_DELAY)``."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    await asyncio.sleep(SLOW_DELAY)
    await send(_START)
    await send(_BODY)


def _starlette() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def index(request: Request) -> PlainTextResponse:
        return PlainTextResponse(BODY)

    return Starlette(routes=[Route("/", index)])


def __getattr__(name: str) -> Any:
    # Starlette is imported only by the server that serves it
    if name == "starlette_hello":
        app = globals()["starlette_hello"] = _starlette()
        return app
    raise AttributeError(name)
