"""Handlers shipped with gatewayd, for the example configuration and for tests.

``simulated_io`` is an async aiohttp handler (``executor = "inline"``);
``cpu_hash`` is a plain function for ``executor = "process"``; ``hello_asgi``
an ASGI 3 application (``interface = "asgi"``) and ``hello_wsgi`` a WSGI one
(``interface = "wsgi"``) (see ``gatewayd.toml(5)``, HANDLERS, for the
signatures).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from .upstreams.process import ProcessRequest

_BODY = b"hello from gatewayd simulated_io\n"


async def simulated_io(request: web.BaseRequest) -> web.StreamResponse:
    """About 10 ms of awaited I/O, then a short text response.

    ``?ms=N`` waits N milliseconds instead (0 to 60000), for demonstrations.
    """
    delay = 0.010
    ms = request.query.get("ms")
    if ms is not None and ms.isdigit():
        delay = min(int(ms), 60000) / 1000
    await asyncio.sleep(delay)
    return web.Response(body=_BODY, content_type="text/plain")


def cpu_hash(request: ProcessRequest) -> tuple[int, dict[str, str], bytes]:
    """CPU-bound: SHA-256 chained ``n`` times (``?n=``, default 20000, max 5e6)."""
    n = 20000
    for part in request.query_string.split("&"):
        key, _, value = part.partition("=")
        if key == "n" and value.isdigit():
            n = min(int(value), 5_000_000)
    digest = hashlib.sha256(request.body).digest()
    for _ in range(n):
        digest = hashlib.sha256(digest).digest()
    return 200, {"Content-Type": "text/plain"}, digest.hex().encode() + b"\n"


_HELLO = b"hello from gatewayd\n"
_HELLO_HEADERS = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(_HELLO))]


async def hello_asgi(scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[Any], Any]) -> None:
    """The smallest ASGI 3 application: a short text answer to any HTTP request
    (and the lifespan protocol, as a framework speaks it)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": _HELLO_HEADERS})
    await send({"type": "http.response.body", "body": _HELLO})


def hello_wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The smallest WSGI application: a short text answer to any request."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(_HELLO)))])
    return [_HELLO]
