"""The access log: combined and JSON lines from a real gatewayd process, and SIGUSR1
reopening a rotated file."""

from __future__ import annotations

import asyncio
import json
import os
import signal

from ..builders import app_route, free_port, gateway_config, route_toml, upstream_toml
from ..conftest import raw_request, refused, run_gatewayd, status_of, wait_for, wait_for_sync


async def test_access_log_and_sigusr1_reopen(tmp_path, upstream):
    """Combined lines (499 for a client that left), and SIGUSR1 reopening a rotated file."""
    log_path = tmp_path / "access.log"
    cfg = gateway_config(tmp_path, app_route(upstream.url))
    cfg.write_text(cfg.read_text().replace('access_log = "off"', f'access_log = "{log_path}"'))
    port = int(cfg.read_text().split('127.0.0.1:')[1].split('"')[0])
    proc = run_gatewayd(cfg, tmp_path)
    try:
        wait_for_sync(lambda: not refused(port))
        assert status_of(await raw_request(port, b"GET /ok?a=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: ua/1\r\n"
                                           b"Connection: close\r\n\r\n")) == 200
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await wait_for(lambda: upstream.active == 1)
        writer.close()
        await wait_for(lambda: log_path.exists() and b" 499 " in log_path.read_bytes(), timeout=3)
        lines = log_path.read_text().splitlines()
        assert lines[0].startswith('127.0.0.1 - - [')
        assert '"GET /ok?a=1 HTTP/1.1" 200 3 "-" "ua/1"' in lines[0]
        os.rename(log_path, tmp_path / "access.log.1")
        proc.send_signal(signal.SIGUSR1)
        await wait_for(lambda: log_path.exists(), timeout=3)
        assert status_of(await raw_request(port, b"GET /ok?b=2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")) == 200
        await wait_for(lambda: b"/ok?b=2" in log_path.read_bytes(), timeout=3)
        assert b"/ok?b=2" not in (tmp_path / "access.log.1").read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


async def test_json_access_log(tmp_path, upstream):
    log_path = tmp_path / "access.json"
    cfg = gateway_config(tmp_path, app_route(upstream.url))
    cfg.write_text(cfg.read_text().replace('access_log = "off"', f'access_log = "{log_path}"\naccess_format = "json"'))
    port = int(cfg.read_text().split('127.0.0.1:')[1].split('"')[0])
    proc = run_gatewayd(cfg, tmp_path)
    try:
        wait_for_sync(lambda: not refused(port))
        await raw_request(port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await wait_for(lambda: log_path.exists() and log_path.read_bytes().endswith(b"\n"), timeout=3)
        entry = json.loads(log_path.read_text().splitlines()[0])
        assert entry["status"] == 200 and entry["route"] == "app" and entry["target"] == "/ok"
        assert entry["duration_ms"] >= 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


async def test_gateway_answers_are_logged_with_their_body_size(tmp_path, upstream):
    """1. a gateway with one route under /app/ and a JSON access log 2. a 404 (no route),
    a 400 (bad_target) and a 502 (upstream refused) 3. each line's bytes are the
    length of the body the client received, not 0."""
    log_path = tmp_path / "access.json"
    dead = f"http://127.0.0.1:{free_port()}"
    body = app_route(upstream.url, path_prefix="/app/") + upstream_toml("dead", servers=[dead]) \
        + route_toml("dead", "dead", path_prefix="/dead/")
    cfg = gateway_config(tmp_path, body)
    cfg.write_text(cfg.read_text().replace('access_log = "off"', f'access_log = "{log_path}"\naccess_format = "json"'))
    port = int(cfg.read_text().split('127.0.0.1:')[1].split('"')[0])
    proc = run_gatewayd(cfg, tmp_path)
    try:
        wait_for_sync(lambda: not refused(port))
        sizes = {}
        for target, status in (("/nowhere", 404), ("/app/a/../b", 400), ("/dead/x", 502)):
            response = await raw_request(port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            assert status_of(response) == status
            sizes[target] = len(response.partition(b"\r\n\r\n")[2])
            assert sizes[target] > 0
        # the parser's own 400 (a request line it cannot read), logged by the connection
        response = await raw_request(port, b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        assert status_of(response) == 400
        sizes["/x"] = len(response.partition(b"\r\n\r\n")[2])
        await wait_for(lambda: log_path.exists() and log_path.read_text().count("\n") == 4, timeout=3)
        logged = {e["target"]: e["bytes"] for e in map(json.loads, log_path.read_text().splitlines())}
        assert logged == sizes
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
