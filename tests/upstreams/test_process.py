"""Handlers in the process pool (``executor = "process"``): CPU-heavy jobs leave the
loop free for other routes."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from ..builders import route_toml, upstream_toml


async def test_process_executor_keeps_loop_free(start_gateway, upstream):
    """CPU-heavy jobs run in the process pool: another route's loop lag stays low."""
    gw = await start_gateway(
        upstream_toml("cpu", handler="gatewayd.handlers:cpu_hash", executor="process", processes=2)
        + upstream_toml("app", servers=[upstream.url])
        + route_toml("cpu", "cpu", path_prefix="/cpu", max_concurrency=2, queue_timeout=60)
        + route_toml("app", "app", path_prefix="/"))
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/cpu?n=10") as r:  # warm the pool
            assert r.status == 200
        gw.runtime.lag.max = 0.0
        t0 = time.monotonic()
        jobs = [asyncio.create_task(s.get(gw.url + "/cpu?n=400000")) for _ in range(4)]
        while not all(j.done() for j in jobs):
            async with s.get(gw.url + "/ok") as r:
                assert r.status == 200
            await asyncio.sleep(0.02)
        for j in jobs:
            resp = await j
            assert resp.status == 200 and len(await resp.read()) == 65
        busy = time.monotonic() - t0
    assert busy > 0.3  # the jobs really took CPU time
    assert gw.runtime.lag.max < 0.1, gw.runtime.lag.max
