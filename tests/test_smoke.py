"""The shortest path through the gateway: a request proxied to a real upstream."""

import aiohttp

from .builders import app_route


async def test_proxies_to_http_upstream(start_gateway, upstream):
    gw = await start_gateway(app_route(upstream.url))
    async with aiohttp.ClientSession() as s, s.get(gw.url + "/echo?x=1") as r:
        assert r.status == 200
        got = await r.json()
    assert got["target"] == "/echo?x=1"
    headers = dict(got["headers"])
    assert headers["X-Forwarded-For"] == "127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
