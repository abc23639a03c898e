"""Handlers shipped with gatewayd, for the example configuration and for tests.

``simulated_io`` is an async aiohttp handler (``executor = "inline"``);
``cpu_hash`` is a plain function for ``executor = "process"`` (see
``gatewayd.toml(5)``, HANDLERS, for both signatures).
"""

from __future__ import annotations

import asyncio
import hashlib

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
