"""What handler upstreams (in-process, and in a process pool) show the client, and
how a gateway with a process pool stops."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from ..builders import handler_route, route_toml, upstream_toml

CPU = upstream_toml("cpu", handler="gatewayd.handlers:cpu_hash", executor="process", processes=1) \
    + route_toml("cpu", "cpu", path_prefix="/cpu")


async def own_server(request: web.BaseRequest) -> web.StreamResponse:
    """A handler that names its own Server."""
    return web.Response(text="mine", headers={"Server": "myapp/2"})


async def streams(request: web.BaseRequest) -> web.StreamResponse:
    """A handler that prepares its response itself."""
    resp = web.StreamResponse()
    await resp.prepare(request)
    await resp.write(b"streamed")
    return resp


async def test_handler_answers_advertise_no_versions(start_gateway):
    """1. routes to an inline handler (a whole response, one it streams, one with its own
    Server) and to a process-pool handler 2. GET each 3. no Server header names aiohttp
    or Python; the handler's own Server is kept."""
    gw = await start_gateway(
        handler_route("demo", path_prefix="/")
        + handler_route("own", "tests.upstreams.test_handlers:own_server", path_prefix="/own")
        + handler_route("streams", "tests.upstreams.test_handlers:streams", path_prefix="/streams")
        + CPU)
    async with aiohttp.ClientSession() as s:
        for path in ("/hello", "/streams", "/cpu?n=10"):
            async with s.get(gw.url + path) as r:
                assert r.status == 200
                await r.read()
                assert "Server" not in r.headers, (path, r.headers.get("Server"))
        async with s.get(gw.url + "/own") as r:
            assert r.status == 200 and r.headers["Server"] == "myapp/2"
