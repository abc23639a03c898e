"""The ``clients`` command and ``gatewayctl clients``: who holds a route's queue
places and who is refused most, so an operator can see who is flooding."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from gatewayd.stats.clients import ClientCounts

from ..builders import app_route
from ..conftest import ROOT, wait_for


async def _queue_from(port: int, source: str, n: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(n):
        _, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        writers.append(writer)
    return writers


async def test_the_clients_holding_the_queue_ranked(start_gateway, upstream):
    """One slot held by a slow request; 127.0.0.5 queues three requests, 127.0.0.6 one:
    1. clients lists 127.0.0.5 with 3 places first, then 127.0.0.6 with 1 2. top = 1
    keeps only the first 3. gatewayctl clients prints the same 4. bad requests get
    ok: false and the connection lives on."""
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1))
    _, holder = await asyncio.open_connection("127.0.0.1", gw.port)
    holder.write(b"GET /slow?ms=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_for(lambda: upstream.active == 1)
    writers = await _queue_from(gw.port, "127.0.0.5", 3) + await _queue_from(gw.port, "127.0.0.6", 1)
    await wait_for(lambda: gw.runtime.table.routes["app"].gate.queued == 4)
    answer = await gw.command({"cmd": "clients", "route": "app"})
    assert answer == {"ok": True, "route": "app", "clients": [
        {"client": "127.0.0.5", "queued": 3, "rate_limited": 0, "client_queue_full": 0},
        {"client": "127.0.0.6", "queued": 1, "rate_limited": 0, "client_queue_full": 0}]}
    top = await gw.command({"cmd": "clients", "route": "app", "top": 1})
    assert [c["client"] for c in top["clients"]] == ["127.0.0.5"]
    printed = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "gatewayd.control.cli", "clients", "app", "--socket", str(gw.socket_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.splitlines()
    assert lines[1].split() == ["127.0.0.5", "3", "0", "0"] and lines[2].split() == ["127.0.0.6", "1", "0", "0"]
    assert (await gw.command({"cmd": "clients", "route": "nope"}))["ok"] is False
    for bad in (0, 1001, "3", True):
        refused = await gw.command({"cmd": "clients", "route": "app", "top": bad})
        assert refused == {"ok": False, "error": "top: expected an integer from 1 to 1000"}
    for w in [holder, *writers]:
        w.close()


def test_refusal_counts_stay_bounded_and_keep_the_heaviest():
    """A flood from 10,000 addresses with one heavy client among them: at most
    ``capacity`` clients are kept, and the heavy one is among them with its count."""
    counts = ClientCounts(capacity=64)
    for i in range(10_000):
        counts.count(f"10.0.{i // 256}.{i % 256}", "rate_limited")
        counts.count("192.0.2.1", "rate_limited")
    kept = counts.export()
    assert len(kept) <= 64
    assert kept["192.0.2.1"] == {"rate_limited": 10_000}
    counts.count("192.0.2.1", "client_queue_full")
    assert counts.export()["192.0.2.1"] == {"rate_limited": 10_000, "client_queue_full": 1}


async def test_client_queue_full_refusals_are_counted_per_client(start_gateway, upstream):
    """max_queue_per_client = 1: 127.0.0.7 asks three times while the slot is held; two
    are refused 429 client_queue_full, and the clients command counts them against it."""
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1, max_queue_per_client=1))
    _, holder = await asyncio.open_connection("127.0.0.1", gw.port)
    holder.write(b"GET /slow?ms=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_for(lambda: upstream.active == 1)
    writers = await _queue_from(gw.port, "127.0.0.7", 3)
    await wait_for(lambda: gw.runtime.table.routes["app"].stats.client_queue_full == 2)
    answer = await gw.command({"cmd": "clients", "route": "app"})
    assert answer["clients"] == [{"client": "127.0.0.7", "queued": 1, "rate_limited": 0, "client_queue_full": 2}]
    for w in [holder, *writers]:
        w.close()
