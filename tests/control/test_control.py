"""The control socket (SPEC §5), the queue X-ray, GC and lag figures, Prometheus
and health endpoints, and gatewayctl — against a real gateway."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import stat
import subprocess
import sys
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from ..builders import app_route, free_port, gateway_config, handler_route
from ..conftest import ROOT, raw_request, wait_for, wait_for_sync


def slow_route(url: str) -> str:
    return app_route(url, max_concurrency=2, max_queue=10, queue_timeout=30)


async def _hold(port: int, n: int, ms: int = 3000) -> list[asyncio.StreamWriter]:
    writers = []
    for i in range(n):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /slow?ms={ms}&n={i} HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\n\r\n".encode())
        await writer.drain()
        writers.append(writer)
    return writers


async def test_snapshot_fields_with_known_load(start_gateway, upstream):
    """Two requests in flight and three queued: the snapshot says exactly that, with
    every SPEC §5 field present and typed."""
    gw = await start_gateway(slow_route(upstream.url))
    gate = gw.runtime.table.routes["app"].gate
    writers = await _hold(gw.port, 2)
    await wait_for(lambda: gate.in_flight == 2)
    writers += await _hold(gw.port, 3)
    await wait_for(lambda: len(gate.waiters) == 3)
    hello = await gw.command({"cmd": "hello"})
    assert hello == {"ok": True, "version": gw.runtime.version, "protocol": 1, "pid": os.getpid()}
    answer = await gw.command({"cmd": "snapshot"})
    assert answer["ok"] is True
    s = answer["snapshot"]
    for key, kind in (("version", str), ("pid", int), ("uptime_s", float), ("time", float),
                      ("config_path", str), ("generation", int), ("connections", int),
                      ("tasks", int), ("loop_lag_ms", dict), ("gc", dict), ("routes", list),
                      ("workers", list)):
        assert isinstance(s[key], kind), key
    assert s["last_reload"] is None and s["generation"] == 1
    assert s["connections"] == 5
    assert s["tasks"] >= 5  # at least one task per open connection
    assert set(s["loop_lag_ms"]) >= {"last", "max"}
    assert len(s["gc"]["collections"]) == 3 and {"last", "max", "total"} <= set(s["gc"]["pause_ms"])
    (r,) = s["routes"]
    assert (r["name"], r["in_flight"], r["max_concurrency"], r["queued"], r["max_queue"]) == ("app", 2, 2, 3, 10)
    assert r["requests"] == 5 and r["responses"]["2xx"] == 0
    assert r["rejected"] == {"queue_full": 0, "queue_timeout": 0, "client_queue_full": 0, "rate_limited": 0,
                             "tunnels_full": 0, "deadline": 0, "preempted": 0, "route_timeout": 0}
    assert r["queued_by_priority"] == {"critical": 0, "default": 3, "sheddable": 0}  # a route without classes
    assert {w["priority"] for w in r["waiters"]} == {"default"} and {w["deadline_in"] for w in r["waiters"]} == {None}
    assert (r["tunnels"], r["max_tunnels"], r["tunnels_total"]) == (0, 0, 0)  # not a websocket route
    assert r["cancelled"] == 0 and r["upstream_errors"] == 0
    assert set(r["latency_ms"]) >= {"p50", "p99"}
    assert r["oldest_wait_ms"] > 0 and len(r["waiters"]) == 3
    assert s["workers"][0]["pid"] == os.getpid()
    for w in writers:
        w.close()


async def test_queue_xray_oldest_first_and_ages_grow(start_gateway, upstream):
    gw = await start_gateway(slow_route(upstream.url))
    gate = gw.runtime.table.routes["app"].gate
    writers = await _hold(gw.port, 2)
    await wait_for(lambda: gate.in_flight == 2)
    for i in range(3):
        writers += await _hold(gw.port, 1)
        await wait_for(lambda i=i: len(gate.waiters) == i + 1)
        await asyncio.sleep(0.02)  # distinct ages
    first = await gw.command({"cmd": "queue", "route": "app"})
    await asyncio.sleep(0.1)
    second = await gw.command({"cmd": "queue", "route": "app"})
    assert first["ok"] and len(first["waiters"]) == 3
    ages = [w["wait_ms"] for w in first["waiters"]]
    assert ages == sorted(ages, reverse=True)  # oldest first
    assert all(b["wait_ms"] > a["wait_ms"] + 50 for a, b in zip(first["waiters"], second["waiters"], strict=True))
    w = first["waiters"][0]
    assert w["method"] == "GET" and w["path"].startswith("/slow") and w["client"] == "127.0.0.1"
    assert (await gw.command({"cmd": "queue", "route": "nope"}))["ok"] is False
    for wr in writers:
        wr.close()


async def test_malformed_and_oversized_lines(start_gateway, upstream):
    gw = await start_gateway(slow_route(upstream.url))
    reader, writer = await asyncio.open_unix_connection(str(gw.socket_path))

    async def ask(line: bytes) -> dict:
        writer.write(line)
        await writer.drain()
        return json.loads(await asyncio.wait_for(reader.readline(), 2))

    for bad in (b"not json\n", b"[1,2]\n", b'{"cmd": 5}\n', b'{"cmd": "nope"}\n', b"\xff\xfe\n",
                b'{"cmd": "set_limit", "route": "app", "max_concurrency": -1}\n',
                b'{"cmd": "set_limit", "route": "app"}\n', b'{"cmd": "subscribe", "interval": 0}\n'):
        answer = await ask(bad)
        assert answer["ok"] is False and answer["error"], bad
    writer.close()
    reader, writer = await asyncio.open_unix_connection(str(gw.socket_path))
    assert (await ask(b'{"cmd": "hello"}\n'))["ok"] is True  # the connection lives on
    writer.write(b'{"cmd": "hello", "pad": "' + b"x" * 70000 + b'"}\n')
    await writer.drain()
    answer = json.loads(await asyncio.wait_for(reader.readline(), 2))
    assert answer["ok"] is False and "64" in answer["error"]
    assert await asyncio.wait_for(reader.read(), 2) == b""  # and then closed
    writer.close()


async def test_subscribe_cadence_and_slow_subscriber(start_gateway, upstream):
    gw = await start_gateway(slow_route(upstream.url))
    reader, writer = await asyncio.open_unix_connection(str(gw.socket_path))
    writer.write(b'{"cmd": "subscribe", "interval": 0.1}\n')
    await writer.drain()
    assert json.loads(await reader.readline()) == {"ok": True}
    t0 = time.monotonic()
    snaps = [json.loads(await asyncio.wait_for(reader.readline(), 2)) for _ in range(6)]
    elapsed = time.monotonic() - t0
    assert all(s["ok"] and "routes" in s["snapshot"] for s in snaps)
    assert 0.35 < elapsed < 1.5, elapsed
    writer.close()

    # a subscriber that never reads: the gateway skips it instead of buffering without bound
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(str(gw.socket_path))
    sock.sendall(b'{"cmd": "subscribe", "interval": 0.05}\n')
    control = gw.control
    control.subscriber_backlog = 16384  # reach the limit in a test's time
    await wait_for(lambda: control.dropped_snapshots > 5, timeout=20)
    assert (await gw.command({"cmd": "hello"}))["ok"]  # others are still served
    sock.close()


async def test_gc_pauses_are_recorded(start_gateway, upstream):
    gw = await start_gateway(slow_route(upstream.url))
    before = gw.runtime.gc.count[2]
    gc.collect()
    after = gw.runtime.gc
    assert after.count[2] == before + 1
    assert after.last[2] > 0 and after.max_pause >= after.last[2]
    s = (await gw.command({"cmd": "snapshot"}))["snapshot"]
    assert s["gc"]["collections"][2] >= before + 1
    assert s["gc"]["pause_ms"]["total"] > 0
    assert s["gc"]["recent"][-1]["generation"] in (0, 1, 2)


async def test_loop_lag_sees_a_blocked_loop(start_gateway, upstream):
    gw = await start_gateway(slow_route(upstream.url))
    await asyncio.sleep(0.12)
    time.sleep(0.3)  # block the loop on purpose
    await wait_for(lambda: gw.runtime.lag.max > 0.2, timeout=1)
    s = (await gw.command({"cmd": "snapshot"}))["snapshot"]
    assert s["loop_lag_ms"]["max"] > 200


async def test_socket_mode_under_permissive_umask(tmp_path, start_gateway, upstream):
    old = os.umask(0)
    try:
        gw = await start_gateway(slow_route(upstream.url))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(gw.socket_path).st_mode) == 0o600


def _run(cfg, tmp_path, name):
    with open(tmp_path / f"{name}.out", "wb") as out, open(tmp_path / f"{name}.err", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "gatewayd", "--config", str(cfg)],
                                stdout=out, stderr=err, cwd=str(ROOT))


def _answers(path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            return True
    except OSError:
        return False


def test_stale_socket_replaced_live_socket_refused(tmp_path):
    body = handler_route()
    cfg = gateway_config(tmp_path, body)
    sock_path = tmp_path / "gw.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))  # a socket file nobody listens on
    stale.close()
    first = _run(cfg, tmp_path, "first")
    try:
        wait_for_sync(lambda: _answers(sock_path))
        other = tmp_path / "other"
        other.mkdir()
        cfg2 = gateway_config(other, body)
        cfg2.write_text(cfg2.read_text().replace('socket = "gw.sock"', f'socket = "{sock_path}"'))
        second = _run(cfg2, tmp_path, "second")
        assert second.wait(15) == 1
        err = (tmp_path / "second.err").read_text()
        assert "live gatewayd" in err and str(sock_path) in err
        assert first.poll() is None and _answers(sock_path)
    finally:
        first.terminate()
        assert first.wait(10) == 0
    assert not sock_path.exists()


async def test_prometheus_and_health(tmp_path, upstream):
    mport = free_port()
    cfg = gateway_config(tmp_path, slow_route(upstream.url))
    cfg.write_text(cfg.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    port = int(cfg.read_text().split('127.0.0.1:')[1].split('"')[0])
    proc = _run(cfg, tmp_path, "gw")
    try:
        await asyncio.to_thread(wait_for_sync, lambda: _answers(tmp_path / "gw.sock"))
        await raw_request(port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{mport}/metrics") as r:
                text = await r.text()
            async with s.get(f"http://127.0.0.1:{mport}/healthz") as r:
                assert r.status == 200
            async with s.get(f"http://127.0.0.1:{mport}/readyz") as r:
                assert r.status == 200
            families = {f.name: f for f in text_string_to_metric_families(text)}
            for name in ("gatewayd_requests", "gatewayd_in_flight", "gatewayd_queue_depth",
                         "gatewayd_rejected", "gatewayd_cancelled", "gatewayd_request_duration_seconds",
                         "gatewayd_queue_wait_seconds", "gatewayd_gc_pause_seconds", "gatewayd_tasks",
                         "gatewayd_event_loop_lag_seconds", "gatewayd_connections"):
                assert name in families, name
            req = [x for x in families["gatewayd_requests"].samples if x.name == "gatewayd_requests_total"]
            assert any(x.labels == {"route": "app", "code": "200"} and x.value == 1 for x in req)
            hist = families["gatewayd_request_duration_seconds"].samples
            assert any(x.name.endswith("_bucket") and x.labels["le"] == "+Inf" and x.value == 1 for x in hist)
            assert any(x.name.endswith("_count") for x in hist) and any(x.name.endswith("_sum") for x in hist)
            # readyz turns 503 while draining
            hold = asyncio.create_task(raw_request(port, b"GET /slow?ms=1500 HTTP/1.1\r\nHost: x\r\n\r\n", 5))
            await wait_for(lambda: upstream.active == 1)
            proc.terminate()
            statuses = []
            for _ in range(40):
                try:
                    async with s.get(f"http://127.0.0.1:{mport}/readyz") as r:
                        statuses.append(r.status)
                        if r.status == 503:
                            break
                except aiohttp.ClientError:
                    break
                await asyncio.sleep(0.025)
            assert 503 in statuses
            await hold
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


async def test_gatewayctl(start_gateway, upstream):
    gw = await start_gateway(slow_route(upstream.url))
    gate = gw.runtime.table.routes["app"].gate
    writers = await _hold(gw.port, 3, ms=20000)
    await wait_for(lambda: len(gate.waiters) == 1)

    async def ctl(*args: str, where: tuple[str, ...] = ("--config", str(gw.config_path))) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gatewayd.control.cli", *where, *args,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT))
        out, err = await proc.communicate()
        return proc.returncode, out.decode(), err.decode()

    code, out, _ = await ctl("status")
    assert code == 0 and "app" in out and "2/2" in out
    code, out, _ = await ctl("--json", "snapshot")
    assert code == 0 and json.loads(out)["snapshot"]["routes"][0]["queued"] == 1
    # --json prints the gateway's answer as it came (gatewayctl(1)), one line, for every command
    assert json.loads(out)["ok"] is True and out.count("\n") == 1
    code, out, _ = await ctl("--json", "status")
    assert code == 0 and json.loads(out)["ok"] is True and "routes" in json.loads(out)["snapshot"]
    code, out, _ = await ctl("snapshot")  # without --json: the snapshot itself, indented
    assert code == 0 and json.loads(out)["routes"][0]["queued"] == 1 and out.count("\n") > 1
    code, out, _ = await ctl("queue", "app")
    assert code == 0 and "1 waiting" in out and "/slow" in out
    code, out, _ = await ctl("set-limit", "app", "3")
    assert code == 0 and "max_concurrency 3" in out
    await wait_for(lambda: gate.in_flight == 3)
    code, _, err = await ctl("set-limit", "nope", "3")
    assert code == 1 and "nope" in err
    code, _, err = await ctl("status", where=("--socket", str(gw.socket_path.parent / "missing.sock")))
    assert code == 3
    for w in writers:
        w.close()
