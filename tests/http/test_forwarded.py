"""The client address behind trusted proxies (server.trusted_proxies): X-Forwarded-For
read from the right, never believed from anyone else; garbage and floods ignored."""

from __future__ import annotations

import asyncio
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gatewayd.http.forwarded import MAX_HOPS, TrustedProxies

from ..builders import app_route, gateway_config
from ..conftest import raw_request, refused, run_gatewayd, status_of, wait_for, wait_for_sync

PROXIES = TrustedProxies(["10.0.0.0/8", "127.0.0.2", "fd00::/8"])


def test_the_first_untrusted_address_from_the_right_is_the_client():
    assert PROXIES.client("127.0.0.2", ["203.0.113.9, 10.1.1.1"]) == "203.0.113.9"
    assert PROXIES.client("127.0.0.2", ["198.51.100.1, 203.0.113.9", "10.1.1.1"]) == "203.0.113.9"
    assert PROXIES.client("127.0.0.2", ["[fd00::1]:443, 203.0.113.9:5555"]) == "203.0.113.9"
    assert PROXIES.client("127.0.0.2", ["2001:db8::7, fd00::1"]) == "2001:db8::7"
    # the peer is no trusted proxy: its X-Forwarded-For is not read at all
    assert PROXIES.client("127.0.0.3", ["203.0.113.9"]) == "127.0.0.3"
    # nobody but trusted proxies on the way: the leftmost of them
    assert PROXIES.client("127.0.0.2", ["10.0.0.7, 10.0.0.8"]) == "10.0.0.7"
    assert PROXIES.client("127.0.0.2", []) == "127.0.0.2"


def test_garbage_stops_the_walk_at_the_last_address_vouched_for():
    assert PROXIES.client("127.0.0.2", ["hello"]) == "127.0.0.2"
    assert PROXIES.client("127.0.0.2", ["203.0.113.9, nonsense, 10.1.1.1"]) == "10.1.1.1"
    assert PROXIES.client("127.0.0.2", [""]) == "127.0.0.2"
    assert PROXIES.client("127.0.0.2", ["10.0.0.1, , 10.0.0.2"]) == "10.0.0.2"


def test_ten_thousand_entries_cost_a_bounded_walk():
    chain = ", ".join(["10.0.0.1"] * 10_000)
    assert PROXIES.client("127.0.0.2", [chain]) == "10.0.0.1"
    assert MAX_HOPS <= 64


@given(st.lists(st.text(max_size=60), max_size=4))
@settings(max_examples=300, deadline=None)
def test_any_header_value_gives_an_address(values):
    """Whatever the header holds: an address comes back (the peer's or one it
    carried), never an exception."""
    got = PROXIES.client("127.0.0.2", values)
    assert got == "127.0.0.2" or "." in got or ":" in got


async def _queued_from(port: int, source: str, forwarded: str | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    extra = f"X-Forwarded-For: {forwarded}\r\n" if forwarded is not None else ""
    writer.write(f"GET /ok HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    await writer.drain()
    return reader, writer


async def test_the_client_address_in_the_queue_xray_the_access_log_and_upstream(tmp_path, upstream):
    """trusted_proxies = ["127.0.0.2", "10.0.0.0/8"], a route of one slot held by a slow
    request: 1. a request from 127.0.0.2 with X-Forwarded-For "203.0.113.9, 10.1.1.1"
    waits as client 203.0.113.9 in the X-ray 2. one from 127.0.0.3 (no proxy) with the
    same header waits as 127.0.0.3 3. the access log says the same 4. upstream, the
    header is the received one with the peer appended."""
    log_path = tmp_path / "access.json"
    cfg = gateway_config(tmp_path, app_route(upstream.url, max_concurrency=1),
                         trusted_proxies=["127.0.0.2", "10.0.0.0/8"], shutdown_timeout=1)
    cfg.write_text(cfg.read_text().replace('access_log = "off"', f'access_log = "{log_path}"\naccess_format = "json"'))
    port = int(cfg.read_text().split("127.0.0.1:")[1].split('"')[0])
    proc = run_gatewayd(cfg, tmp_path)
    try:
        wait_for_sync(lambda: not refused(port))
        holder = await asyncio.open_connection("127.0.0.1", port)
        holder[1].write(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: upstream.active == 1)
        proxied = await _queued_from(port, "127.0.0.2", "203.0.113.9, 10.1.1.1")
        direct = await _queued_from(port, "127.0.0.3", "203.0.113.9, 10.1.1.1")
        sock = cfg.parent / "gw.sock"

        async def waiters() -> list[dict]:
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(json.dumps({"cmd": "queue", "route": "app"}).encode() + b"\n")
            answer = json.loads(await reader.readline())
            writer.close()
            return answer["waiters"]

        seen: list[dict] = []

        async def two() -> bool:
            seen[:] = await waiters()
            return len(seen) == 2
        for _ in range(200):
            if await two():
                break
            await asyncio.sleep(0.02)
        assert [w["client"] for w in seen] == ["203.0.113.9", "127.0.0.3"]
        for _, writer in (holder, proxied, direct):
            writer.close()
        await wait_for(lambda: log_path.exists() and log_path.read_text().count("\n") >= 3, timeout=5)
        clients = {json.loads(line)["client"] for line in log_path.read_text().splitlines()}
        assert {"203.0.113.9", "127.0.0.3", "127.0.0.1"} <= clients
        assert status_of(await raw_request(port, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                           b"X-Forwarded-For: 203.0.113.9\r\n\r\n")) == 200
        got = dict(upstream.requests[-1]["headers"])
        assert got["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
