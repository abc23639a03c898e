"""An ASGI application's lifespan and the process (issue 23): a failed startup
fails the start (exit 1, the application's message), the shutdown runs after
the drain, a reload keeps an application whose upstream is unchanged and
starts a new one before the swap. gatewayd as a real subprocess."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from ..builders import route_toml, upstream_toml
from ..conftest import wait_for
from .test_workers import port_of, snap, wait_for_workers

APPS = "tests.upstreams.asgi_apps"


def app(handler: str = "lifespanned", **keys: object) -> str:
    return (upstream_toml("a", handler=f"{APPS}:{handler}", interface="asgi", **keys)
            + route_toml("a", "a"))


def events(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_startup_fails_the_start(gateway_process, workers) -> None:
    gp = gateway_process(app("failing_startup"), wait_ready=False, workers=workers)
    assert gp.wait(20) == 1
    assert "lifespan startup failed: database unreachable" in gp.stderr()


async def test_shutdown_runs_after_the_drain(gateway_process, tmp_path) -> None:
    log = tmp_path / "events"
    gp = gateway_process(app(), env={"GATEWAYD_TEST_EVENTS": str(log)}, shutdown_timeout=5)
    port = port_of(gp)
    assert events(log) == ["startup"]
    async with aiohttp.ClientSession() as s:
        slow = asyncio.ensure_future(s.get(f"http://127.0.0.1:{port}/?ms=600"))
        await wait_for(lambda: snap(gp)["routes"][0]["in_flight"] == 1)
        gp.signal(signal.SIGTERM)
        r = await slow
        assert r.status == 200 and await r.json(content_type=None) == {"state": "db-pool"}
        r.release()
    assert await asyncio.to_thread(gp.wait, 10) == 0
    assert events(log) == ["startup", "request", "shutdown"]


async def test_a_reload_keeps_an_unchanged_app_and_starts_a_new_one_first(gateway_process, tmp_path) -> None:
    log = tmp_path / "events"
    gp = gateway_process(app(), env={"GATEWAYD_TEST_EVENTS": str(log)}, workers=2)
    await asyncio.to_thread(wait_for_workers, gp, 2)
    assert events(log) == ["startup", "startup"]  # one per worker
    text = gp.config_path.read_text()
    gp.config_path.write_text(text.replace("max_concurrency = 100", "max_concurrency = 50")
                              if "max_concurrency = 100" in text else text + "\n")
    assert gp.command({"cmd": "reload"})["ok"]
    assert events(log) == ["startup", "startup"]  # the same application: kept, not started again
    gp.config_path.write_text(text.replace('interface = "asgi"', 'interface = "asgi"\nlifespan = "on"'))
    assert gp.command({"cmd": "reload"})["ok"]
    # a new upstream: started in each worker before the swap, the old one shut down after
    await wait_for(lambda: events(log).count("shutdown") == 2, timeout=10)
    assert events(log)[:4] == ["startup"] * 4
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port_of(gp)}/") as r:
        assert r.status == 200
