"""A route's latency is its served requests' (issue 19, item 1): under overload the
gateway's own fast 503s are counted apart (``gateway_answers``) and never pulled
into ``latency_ms``, in the snapshot (one process and merged over workers), in
Prometheus and in ``gatewayctl status``."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..builders import app_route, free_port, route_toml, upstream_toml
from ..conftest import ROOT, raw_request, status_of
from ..process.test_workers import poll, port_of, snap, wait_for_workers

DELAY_MS = 300  # the upstream's time per request: in the bucket (0.25 s, 0.5 s]
ROUNDS = 4
CLIENTS = 20  # at once, each round: one (or one per worker) is served, the rest shed


async def _get(port: int) -> int:
    data = f"GET /slow?ms={DELAY_MS} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    return status_of(await raw_request(port, data, 10))


def _samples(text: str, family: str, suffix: str) -> float:
    for f in text_string_to_metric_families(text):
        if f.name == family:
            return sum(s.value for s in f.samples
                       if s.name == family + suffix and s.labels.get("route") == "app")
    raise AssertionError(f"{family} not exposed")


@pytest.mark.parametrize("workers", [1, 2])
async def test_sheds_are_counted_apart_from_served_latency(gateway_process, upstream, workers):
    mport = free_port()
    body = (app_route(upstream.url, max_concurrency=1, max_queue=0)
            + f'[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    gp = gateway_process(body, workers=workers)
    port = port_of(gp)
    if workers > 1:
        await asyncio.to_thread(wait_for_workers, gp, workers)
    statuses: list[int] = []
    for _ in range(ROUNDS):
        statuses += await asyncio.gather(*(_get(port) for _ in range(CLIENTS)))
    served, shed = statuses.count(200), statuses.count(503)
    assert served + shed == len(statuses) and served >= ROUNDS and shed > 2 * served, statuses

    def counted() -> dict | None:
        (r,) = snap(gp)["routes"]
        return r if sum(r["codes"].values()) == len(statuses) else None

    r = await asyncio.to_thread(poll, counted)
    # the latency is the served requests' (>= 250 ms), not the ~1 ms sheds'
    assert r["latency_ms"]["p50"] >= 250 and r["latency_ms"]["p99"] <= 500, r["latency_ms"]
    assert r["served"] == served and r["gateway_answers"] == shed
    assert r["served"] + r["gateway_answers"] == sum(r["responses"].values()) == r["requests"]
    assert r["rejected"]["queue_full"] == shed
    full = gp.command({"cmd": "snapshot", "histograms": True})["snapshot"]["routes"][0]
    assert full["latency_histogram"]["count"] == served
    assert full["gateway_latency_histogram"]["count"] == shed

    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{mport}/metrics") as resp:
        text = await resp.text()
    assert _samples(text, "gatewayd_request_duration_seconds", "_count") == served
    assert _samples(text, "gatewayd_gateway_answer_duration_seconds", "_count") == shed
    assert _samples(text, "gatewayd_requests", "_total") == len(statuses)
    assert _samples(text, "gatewayd_request_duration_seconds", "_sum") >= served * DELAY_MS / 1000

    out = subprocess.run([sys.executable, "-m", "gatewayd.control.cli", "--config", str(gp.config_path),
                          "status"], capture_output=True, text=True, cwd=str(ROOT), timeout=20)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    head = next(line for line in lines if line.startswith("ROUTE"))
    assert head.split()[4:] == ["SERVED", "GATEWAY", "P50MS", "P99MS"]
    row = next(line for line in lines if line.startswith("app "))
    assert row.split()[4:6] == [str(served), str(shed)]
    assert float(row.split()[6]) >= 250
    table = lines[lines.index(head):lines.index(row) + 2]
    assert all(len(line) <= 80 for line in table), table


async def test_gateway_made_errors_are_answers_upstream_errors_are_served(start_gateway, upstream):
    """A 500 the upstream sent is served (its latency is the route's); a 502 the gateway
    made for an upstream it could not reach is a gateway answer, outside latency_ms."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    gw = await start_gateway(app_route(upstream.url) + upstream_toml("dead", servers=[dead])
                             + route_toml("dead", "dead", path_prefix="/dead"))

    async def get(path: str) -> int:
        return status_of(await raw_request(gw.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                                                    f"Connection: close\r\n\r\n".encode()))

    assert await get("/status/500") == 500
    assert await get("/dead/x") == 502
    routes = {r["name"]: r for r in (await gw.command({"cmd": "snapshot"}))["snapshot"]["routes"]}
    app, down = routes["app"], routes["dead"]
    assert (app["served"], app["gateway_answers"], app["codes"]) == (1, 0, {"500": 1})
    assert app["latency_ms"]["p50"] is not None
    assert (down["served"], down["gateway_answers"], down["codes"]) == (0, 1, {"502": 1})
    assert down["latency_ms"] == {"p50": None, "p90": None, "p99": None}
    assert down["upstream_errors"] == 1
