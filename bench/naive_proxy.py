"""The naive aiohttp proxy: web.Application, one catch-all route, one default
ClientSession. What a first attempt looks like; the reference for "naive" in
docs/BENCHMARKS.md. No admission limits: aiohttp's connector default of 100
upstream connections (an unbounded wait for one) is its only bound.

    python -m bench.naive_proxy --port 8081 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "te", "trailer"}


def app(upstream: str) -> web.Application:
    application = web.Application()

    async def session_ctx(_: web.Application) -> AsyncIterator[None]:
        application["session"] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await application["session"].close()

    async def proxy(request: web.Request) -> web.Response:
        session: aiohttp.ClientSession = request.app["session"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        data = request.content if request.body_exists else None
        async with session.request(request.method, upstream + request.raw_path, headers=headers,
                                   data=data, allow_redirects=False) as up:
            body = await up.read()
            out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
            return web.Response(status=up.status, body=body, headers=out)

    application.cleanup_ctx.append(session_ctx)
    application.router.add_route("*", "/{tail:.*}", proxy)
    return application


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    args = p.parse_args()
    try:
        import uvloop  # the same loop as gatewayd, so the comparison is about the design
        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    web.run_app(app(args.upstream), host="127.0.0.1", port=args.port, access_log=None,
                print=None, shutdown_timeout=1.0, loop=loop_factory() if loop_factory else None)


if __name__ == "__main__":
    main()
