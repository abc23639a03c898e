"""What handler upstreams (in-process, and in a process pool) show the client, and
how a gateway with a process pool stops."""

from __future__ import annotations

import os
import signal

import aiohttp
from aiohttp import web

from ..builders import gateway_config, handler_route, route_toml, upstream_toml
from ..conftest import raw_request, refused, run_gatewayd, status_of, wait_for_sync

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


async def test_signals_to_the_process_group_stop_a_process_pool_quietly(tmp_path):
    """1. gatewayd with a process-pool route, in its own process group as a shell job is
    2. a request warms the pool 3. SIGINT to the whole group, as a terminal's Ctrl-C
    sends it (then SIGTERM, as ``kill %1``) 4. exit 0 and no traceback on stderr, three
    times each (before, the pool's processes died of the KeyboardInterrupt, printing it,
    nearly every time)."""
    for round, sig in enumerate((signal.SIGINT,) * 3 + (signal.SIGTERM,) * 3):
        where = tmp_path / str(round)
        where.mkdir()
        cfg = gateway_config(where, CPU)
        port = int(cfg.read_text().split("127.0.0.1:")[1].split('"')[0])
        proc = run_gatewayd(cfg, where, start_new_session=True)
        try:
            wait_for_sync(lambda p=port: not refused(p), timeout=20)
            response = await raw_request(port, b"GET /cpu?n=10 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert status_of(response) == 200
            os.killpg(proc.pid, sig)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            try:  # what is left of its group (the pool's forkserver, orphaned by the signal)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        err = (where / "err").read_text()
        assert "Traceback" not in err, err
