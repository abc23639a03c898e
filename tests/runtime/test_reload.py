"""Hot reload (SPEC §6): build-then-swap, state carried across, listeners, logs,
and no request lost — in-process for the internals, as a subprocess for SIGHUP."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import socket
import subprocess
import sys
from typing import Any

import aiohttp
import pytest

from gatewayd.config.kinds import ListenEntry
from gatewayd.config.loader import parse
from gatewayd.config.settings import SECTIONS, Config, ServerConfig, restart_only, settings_of
from gatewayd.runtime.reload import refused_changes
from gatewayd.runtime.state import Runtime

from ..builders import free_port, gateway_config, handler_route, route_toml, upstream_toml
from ..conftest import ROOT, Upstream, raw_request, status_of, wait_for

GET_CLOSE = b"GET /slow?ms={ms} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def two_upstreams(a: str, b: str, use: str = "a", mc: int = 10, mq: int = 10, extra_route: str = "") -> str:
    return (upstream_toml("a", servers=[a]) + upstream_toml("b", servers=[b])
            + route_toml("app", use, max_concurrency=mc, max_queue=mq, queue_timeout=10) + extra_route)


def rewrite(gw, body: str) -> None:
    """Replace the upstream/route part of the gateway's config file."""
    text = gw.config_path.read_text()
    head = text.split("[upstreams.", 1)[0]
    gw.config_path.write_text(head + body)


async def get(port: int, ms: int = 1) -> int:
    return status_of(await raw_request(port, GET_CLOSE.replace(b"{ms}", str(ms).encode()), 10))


async def test_reload_switches_upstream_and_inflight_finishes(start_gateway, upstream):
    """1. a 2 s request is in flight on upstream a 2. reload points the route at b
    3. the in-flight request completes 200 on a 4. new requests reach b
    5. the old pool is closed only after its last request."""
    b = Upstream()
    await b.start()
    try:
        gw = await start_gateway(two_upstreams(upstream.url, b.url, "a"))
        old_a = gw.runtime.table.upstreams["a"]
        slow = asyncio.create_task(get(gw.port, 2000))
        await wait_for(lambda: upstream.active == 1)
        rewrite(gw, two_upstreams(upstream.url, b.url, "b", mc=5))
        answer = await gw.command({"cmd": "reload"})
        assert answer["ok"] is True and answer["generation"] == 2
        assert "route app: upstream a -> b, max_concurrency 10 -> 5" in answer["changes"]
        assert await get(gw.port) == 200 and b.started == 1
        assert gw.runtime.table.upstreams["a"] is old_a  # unchanged upstream kept as is
        assert await slow == 200 and upstream.started == 1
        s = (await gw.command({"cmd": "snapshot"}))["snapshot"]
        assert s["generation"] == 2 and s["last_reload"]["ok"] is True
        assert s["routes"][0]["max_concurrency"] == 5
        assert s["routes"][0]["requests"] == 2  # counters carried over
    finally:
        await b.stop()


async def test_replaced_pool_closes_after_last_request(start_gateway, upstream):
    gw = await start_gateway(two_upstreams(upstream.url, upstream.url))
    old_a = gw.runtime.table.upstreams["a"]
    slow = asyncio.create_task(get(gw.port, 800))
    await wait_for(lambda: upstream.active == 1)
    text = two_upstreams(upstream.url, upstream.url).replace('servers = ["' + upstream.url + '"]\n',
                                                             'servers = ["' + upstream.url + '"]\n        read_timeout = 9\n', 1)
    rewrite(gw, text)
    assert (await gw.command({"cmd": "reload"}))["ok"]
    new_a = gw.runtime.table.upstreams["a"]
    assert new_a is not old_a
    assert not old_a.closed  # still serving the slow request
    assert await slow == 200
    await wait_for(lambda: old_a.closed, timeout=3)
    assert not new_a.closed


async def test_invalid_file_changes_nothing(start_gateway, upstream):
    gw = await start_gateway(two_upstreams(upstream.url, upstream.url, mc=7))
    good = gw.config_path.read_text()
    gw.config_path.write_text(good.replace("max_concurrency = 7", "max_concurrency = -1"))
    answer = await gw.command({"cmd": "reload"})
    assert answer["ok"] is False
    assert "routes[0].max_concurrency: expected an integer >= 1" in answer["error"]
    assert ":1" in answer["error"] or "gatewayd.toml:" in answer["error"]
    s = (await gw.command({"cmd": "snapshot"}))["snapshot"]
    assert s["generation"] == 1
    assert s["last_reload"]["ok"] is False and "max_concurrency" in s["last_reload"]["error"]
    assert s["routes"][0]["max_concurrency"] == 7
    assert await get(gw.port) == 200


async def test_limits_change_in_place_and_set_limit_lasts_until_reload(start_gateway, upstream):
    """Waiters keep their places across a reload; raising the limit admits them at once;
    a smaller max_queue drops nobody; a set_limit override ends at the next reload."""
    gw = await start_gateway(two_upstreams(upstream.url, upstream.url, mc=1, mq=5))
    r = gw.runtime.table.routes["app"]
    tasks = [asyncio.create_task(get(gw.port, 600)) for _ in range(4)]
    await wait_for(lambda: r.gate.in_flight == 1 and len(r.gate.waiters) == 3)
    rewrite(gw, two_upstreams(upstream.url, upstream.url, mc=3, mq=1))
    assert (await gw.command({"cmd": "reload"}))["ok"]
    new_route = gw.runtime.table.routes["app"]
    assert new_route.gate is r.gate  # the same queue
    await wait_for(lambda: upstream.active == 3, timeout=0.3)
    assert await asyncio.gather(*tasks) == [200] * 4
    await gw.command({"cmd": "set_limit", "route": "app", "max_concurrency": 9})
    assert gw.runtime.limits("app") == (9, 1)
    assert (await gw.command({"cmd": "reload"}))["ok"]
    assert gw.runtime.limits("app") == (3, 1)


async def test_removed_route_drains(start_gateway, upstream):
    extra = route_toml("old", "b", path_prefix="/slow")
    gw = await start_gateway(two_upstreams(upstream.url, upstream.url, extra_route=extra))
    inflight = asyncio.create_task(get(gw.port, 800))
    await wait_for(lambda: upstream.active == 1)
    rewrite(gw, two_upstreams(upstream.url, upstream.url))
    answer = await gw.command({"cmd": "reload"})
    assert "route old: removed" in answer["changes"] and "upstream b: " not in " ".join(answer["changes"])
    assert await inflight == 200
    assert "old" not in gw.runtime.table.routes
    assert gw.runtime.registry.routes["old"].responses[2] == 1


async def test_listeners_rebound_and_bind_failure_fails_reload(start_gateway, upstream):
    gw = await start_gateway(two_upstreams(upstream.url, upstream.url))
    new_port = free_port()
    text = gw.config_path.read_text()
    gw.config_path.write_text(text.replace(f'listen = ["127.0.0.1:{gw.port}"]', f'listen = ["127.0.0.1:{new_port}"]'))
    keep_alive = await asyncio.open_connection("127.0.0.1", gw.port)
    answer = await gw.command({"cmd": "reload"})
    assert answer["ok"], answer
    assert any(c.startswith("server: listen") for c in answer["changes"])
    assert await get(new_port) == 200
    # a connection accepted on the old address keeps being served
    reader, writer = keep_alive
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readuntil(b"ok\n")).startswith(b"HTTP/1.1 200")
    writer.close()
    try:
        await get(gw.port)
        raise AssertionError("old address still accepting")
    except OSError:
        pass
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    busy = blocker.getsockname()[1]
    try:
        text = gw.config_path.read_text()
        gw.config_path.write_text(text.replace(f'listen = ["127.0.0.1:{new_port}"]',
                                               f'listen = ["127.0.0.1:{new_port}", "127.0.0.1:{busy}"]'))
        answer = await gw.command({"cmd": "reload"})
        assert answer["ok"] is False and f"127.0.0.1:{busy}" in answer["error"]
        assert await get(new_port) == 200 and gw.runtime.generation == 2
    finally:
        blocker.close()


async def test_dry_run_and_restart_only_keys(start_gateway, upstream):
    gw = await start_gateway(two_upstreams(upstream.url, upstream.url, mc=10))
    rewrite(gw, two_upstreams(upstream.url, upstream.url, mc=20))
    answer = await gw.command({"cmd": "reload", "dry_run": True})
    assert answer["ok"] and answer["dry_run"] is True
    assert answer["changes"] == ["route app: max_concurrency 10 -> 20"]
    assert gw.runtime.generation == 1 and gw.runtime.limits("app") == (10, 10)
    text = gw.config_path.read_text()
    gw.config_path.write_text(text.replace('socket = "gw.sock"', 'socket = "other.sock"'))
    answer = await gw.command({"cmd": "reload"})
    assert answer["ok"] is False and "control.socket" in answer["error"]


def _other(value: Any) -> Any:
    """A value unlike ``value`` (of its type, not necessarily valid: the policy only compares)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple) and value and isinstance(value[0], ListenEntry):
        return (*value, ListenEntry("127.0.0.1:1"))
    if isinstance(value, tuple):
        return (*value, "127.0.0.1:1")
    return "x"  # None: an unset optional key


def test_reload_refuses_exactly_the_settings_declared_restart_only():
    """Statically, for every key of every section: changed alone, a reload refuses it
    if and only if its declaration says reload=RELOAD_RESTART; ``workers`` alone is
    refused for what it is, a change between one process and several."""
    old = Config(path="gatewayd.toml")
    for section, cls in SECTIONS.items():
        for f in settings_of(cls):
            before = getattr(old, section)
            changed = dataclasses.replace(before, **{f.name: _other(getattr(before, f.name))})
            new = dataclasses.replace(old, **{section: changed})
            refused = refused_changes(old, new, several=False)
            if (section, f.name) == ("server", "workers"):
                assert refused == ["server.workers (from one process to several)"]
            elif restart_only(f):
                assert refused == [f"{section}.{f.name}"], (section, f.name)
            else:
                assert refused == [], (section, f.name)


def _in_force(runtime: Runtime) -> dict[str, Any]:
    """What the running gateway holds of its [server] settings: what the request path
    reads, the server's own copies (its public figures), the limits it divided."""
    server = {k: v for k, v in vars(runtime.server).items()
              if not k.startswith("_") and type(v) in (int, float)}
    trusted = runtime.server.trusted_proxies
    server["trusted_proxies"] = trusted.networks if trusted is not None else None
    return {"serving": dataclasses.replace(runtime.serving.server, listen=()), "server": server,
            "max_connections": runtime.acceptor.limit, "buffer_memory": runtime.body_memory.limit}


@pytest.mark.parametrize("name", [f.name for f in settings_of(ServerConfig) if f.name != "workers"])
async def test_every_server_setting_is_applied_by_a_reload(start_gateway, upstream, tmp_path, name):
    """Each [server] key (``workers`` aside: test_workers) changed alone in the file:
    1. the reload is refused, naming it, if it is declared restart-only 2. else it is
    taken, and what runs holds exactly what a gateway started from the new file holds:
    a new key copied anywhere the reload does not reach fails here."""
    gw = await start_gateway(two_upstreams(upstream.url, upstream.url))
    f = next(f for f in settings_of(ServerConfig) if f.name == name)
    port = gw.port
    if name == "listen":
        port = free_port()
        changed: dict[str, Any] = {}
    elif name == "trusted_proxies":  # None: no "other" value of its type to derive
        changed = {name: ["10.0.0.0/8"]}
    else:
        changed = {name: _other(getattr(gw.runtime.config.server, name))}
    path = gateway_config(tmp_path, two_upstreams(upstream.url, upstream.url), port=port, **changed)
    assert path == gw.config_path
    answer = await gw.command({"cmd": "reload"})
    if restart_only(f):
        assert answer["ok"] is False and f"server.{name} cannot change" in answer["error"]
        return
    assert answer["ok"], answer
    assert [c for c in answer["changes"] if c.startswith(f"server: {name} ")], answer["changes"]
    new = parse(path.read_text(), str(path))
    fresh = Runtime(dataclasses.replace(new, server=dataclasses.replace(
        new.server, listen=(ListenEntry(f"127.0.0.1:{free_port()}"),))))
    await fresh.start()
    try:
        assert _in_force(gw.runtime) == _in_force(fresh)
    finally:
        await fresh.shutdown(0)


async def test_reload_applies_keepalive_timeout_to_idle_connections(start_gateway, upstream):
    """1. a keep-alive request is answered; the connection sits idle (keepalive_timeout
    30 s) 2. a reload sets keepalive_timeout = 1 3. the gateway closes that connection
    within the new second (plus the once-a-second sweep), not after 30 s."""
    gw = await start_gateway(two_upstreams(upstream.url, upstream.url), keepalive_timeout=30)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"ok\n")).startswith(b"HTTP/1.1 200")
        text = gw.config_path.read_text()
        gw.config_path.write_text(text.replace("keepalive_timeout = 30\n", "keepalive_timeout = 1\n"))
        answer = await gw.command({"cmd": "reload"})
        assert answer["ok"] and "server: keepalive_timeout 30.0 -> 1.0" in answer["changes"], answer
        assert await asyncio.wait_for(reader.read(), 4) == b""  # closed by the gateway
    finally:
        writer.close()


async def test_reload_switches_access_log(start_gateway, upstream, tmp_path):
    gw = await start_gateway(two_upstreams(upstream.url, upstream.url))
    path = tmp_path / "new-access.log"
    text = gw.config_path.read_text()
    gw.config_path.write_text(text.replace('access_log = "off"', f'access_log = "{path}"'))
    assert (await gw.command({"cmd": "reload"}))["ok"]
    assert await get(gw.port) == 200
    await wait_for(lambda: path.exists() and b'"GET /slow?ms=1 HTTP/1.1" 200' in path.read_bytes(), timeout=3)


async def test_sighup_under_load_loses_nothing(gateway_process, upstream):
    """A real process under continuous load (hundreds of requests a second): 20 SIGHUP
    reloads alternating two limits give zero failed requests, and a 2 s request started
    before the first reload completes 200."""
    body = two_upstreams(upstream.url, upstream.url, mc=50, mq=100)
    gp = gateway_process(body)
    port = int(gp.config_path.read_text().split("127.0.0.1:")[1].split('"')[0])
    head = gp.config_path.read_text().split("[upstreams.", 1)[0]
    failures: list[object] = []
    statuses: dict[int, int] = {}
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with session.get(f"http://127.0.0.1:{port}/ok") as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if r.status != 200:
                        failures.append(r.status)
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        long = asyncio.create_task(get(port, 2000))
        clients = [asyncio.create_task(client(session)) for _ in range(16)]
        await wait_for(lambda: sum(statuses.values()) > 100, timeout=10)
        for i in range(20):
            gp.config_path.write_text(head + two_upstreams(upstream.url, upstream.url, mc=50 + i % 2, mq=100))
            gp.signal(signal.SIGHUP)
            await wait_for(lambda i=i: gp.command({"cmd": "snapshot"})["snapshot"]["generation"] == i + 2, timeout=5)
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*clients)
        assert await long == 200
    assert failures == []
    assert statuses[200] > 500
    s = gp.command({"cmd": "snapshot"})["snapshot"]
    assert s["generation"] == 21 and s["last_reload"]["ok"]


def test_gatewayctl_reload_outcome(gateway_process, tmp_path):
    body = handler_route(max_concurrency=10)
    gp = gateway_process(body)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gatewayd.control.cli", "--config", str(gp.config_path), *args],
                              capture_output=True, text=True, cwd=str(ROOT), timeout=30)

    gp.config_path.write_text(gp.config_path.read_text().replace("max_concurrency = 10", "max_concurrency = 12"))
    dry = ctl("reload", "--dry-run")
    assert dry.returncode == 0 and "would change" in dry.stdout and "max_concurrency 10 -> 12" in dry.stdout
    done = ctl("reload")
    assert done.returncode == 0 and "generation 2" in done.stdout and "max_concurrency 10 -> 12" in done.stdout
    gp.config_path.write_text(gp.config_path.read_text().replace("max_concurrency = 12", "max_concurrency = 0"))
    bad = ctl("reload")
    assert bad.returncode == 1 and "routes[0].max_concurrency" in bad.stderr
    assert json.loads(ctl("--json", "snapshot").stdout)["snapshot"]["generation"] == 2


async def test_reload_says_which_limits_set_by_hand_it_ends(start_gateway, upstream, caplog):
    """set_limit app 30, then the file's max_concurrency 10 -> 15: the dry run, the
    answer and the log say 30 (set_limit) -> 15, the change the live limit makes; with
    the file unchanged, the override ending is still said (not "no changes")."""
    gw = await start_gateway(two_upstreams(upstream.url, upstream.url, mc=10, mq=10))
    await gw.command({"cmd": "set_limit", "route": "app", "max_concurrency": 30})
    rewrite(gw, two_upstreams(upstream.url, upstream.url, mc=15, mq=10))
    gw.config_path.write_text(gw.config_path.read_text().replace('level = "warning"', 'level = "info"'))
    said = ["log: level warning -> info", "route app: max_concurrency 30 (set_limit) -> 15"]
    answer = await gw.command({"cmd": "reload", "dry_run": True})
    assert answer["ok"] and answer["changes"] == said
    caplog.set_level("INFO", logger="gatewayd")
    answer = await gw.command({"cmd": "reload"})
    assert answer["ok"] and answer["changes"] == said and gw.runtime.limits("app") == (15, 10)
    assert "generation 2; " + "; ".join(said) in caplog.text
    assert (await gw.command({"cmd": "reload"}))["changes"] == []  # nothing by hand left
    await gw.command({"cmd": "set_limit", "route": "app", "max_queue": 3})
    answer = await gw.command({"cmd": "reload"})
    assert answer["changes"] == ["route app: max_queue 3 (set_limit) -> 10"]
    assert "no changes" not in caplog.records[-1].getMessage()


async def test_reload_says_where_a_server_name_that_does_not_resolve_is(start_gateway, upstream):
    """A reload to a server name with no address is refused with file:line: key, as
    start-up and every other configuration error say it (not "file: upstreams: ...")."""
    gw = await start_gateway(two_upstreams(upstream.url, upstream.url))
    rewrite(gw, two_upstreams(upstream.url, "http://nonexistent.invalid:8080"))
    line = next(i for i, x in enumerate(gw.config_path.read_text().splitlines(), 1) if "nonexistent" in x)
    answer = await gw.command({"cmd": "reload"})
    assert answer["ok"] is False
    assert answer["error"].startswith(
        f'{gw.config_path}:{line}: upstreams.b.servers[0]: cannot resolve "nonexistent.invalid" ('), answer
    assert gw.runtime.generation == 1 and await get(gw.port) == 200
