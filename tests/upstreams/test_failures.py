"""Failing upstreams (SPEC §3): every way an upstream can fail gets the right
answer (502/504 before the head, a response cut short and closed after it), is
counted by its reason, and leaves nothing behind: no slot, no task, no
connection on either side, no file descriptor.

The upstreams are raw sockets from ``faults.py`` that misbehave on purpose.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from .. import faults
from ..builders import app_route, free_port
from ..conftest import raw_request, status_of, wait_for
from ..faults import RawUpstream

READ_TIMEOUT = 0.5


pytestmark = pytest.mark.usefixtures("no_error_logged")


def route_to(url: str, max_fails: int = 0, retries: int = 0) -> str:
    # max_fails 0: the failing server is never ejected, each failure is seen
    return app_route(url, {"read_timeout": READ_TIMEOUT, "connect_timeout": 1.0,
                           "max_fails": max_fails, "retries": retries})


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Baseline:
    """Tasks and fds of this process (gateway, relay and test share it) before a case."""

    def __init__(self, gw) -> None:
        self.gw = gw
        self.tasks = gw.runtime.tasks.live
        self.fds = open_fds()

    async def settled(self, relay: RawUpstream | None, pooled: int = 0) -> None:
        """Wait until everything the case used is released again."""
        runtime = self.gw.runtime
        route = runtime.table.routes["app"]

        def clean() -> bool:
            return (route.gate.in_flight == 0 and not route.gate.waiters
                    and route.upstream.active == 0 and runtime.connections == 0
                    and (relay is None or relay.open <= pooled)
                    and runtime.tasks.live <= self.tasks + (relay.open if relay else 0)
                    and open_fds() <= self.fds + 2 * pooled)

        try:
            await wait_for(clean, timeout=5)
        except AssertionError:
            raise AssertionError(
                f"left behind: in_flight={route.gate.in_flight} waiters={len(route.gate.waiters)} "
                f"upstream.active={route.upstream.active} connections={runtime.connections} "
                f"relay.open={relay.open if relay else '-'} tasks={runtime.tasks.live}/{self.tasks} "
                f"fds={open_fds()}/{self.fds}"
            ) from None


async def _one(gw, data: bytes = b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") -> bytes:
    return await raw_request(gw.port, data, timeout=5)


def _reason(resp: bytes) -> str | None:
    for line in resp.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"x-gatewayd-reason:"):
            return line.split(b":", 1)[1].strip().decode()
    return None


BEFORE_HEAD = [
    # (fault, status, reason)
    ("reset_before_head", 502, "upstream_reset"),
    ("hang", 504, "upstream_timeout"),
    ("invalid_status_line", 502, "upstream_invalid"),
    ("not_http", 502, "upstream_invalid"),
    ("ambiguous_framing", 502, "upstream_invalid"),
    ("oversized_headers", 502, "upstream_invalid"),
    ("too_many_headers", 502, "upstream_invalid"),
]


@pytest.mark.parametrize(("fault", "status", "reason"), BEFORE_HEAD)
async def test_failure_before_the_head(fault: str, status: int, reason: str, start_gateway) -> None:
    """1. the upstream fails before a response head 2. the client gets status + reason
    3. the failure is counted under its reason 4. nothing is left behind, the failed
    connection is not pooled; the next request gets the same answer (no stale state)."""
    relay = await RawUpstream(getattr(faults, fault)).start()
    try:
        gw = await start_gateway(route_to(relay.url))
        base = Baseline(gw)
        for attempt in (1, 2):
            for method in ("GET", "POST"):
                body = b"Content-Length: 5\r\n\r\nhello" if method == "POST" else b"\r\n"
                resp = await _one(gw, f"{method} /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode() + body)
                assert status_of(resp) == status, (fault, resp[:300])
                assert _reason(resp) == reason, (fault, resp[:300])
            stats = gw.runtime.table.routes["app"].stats
            assert stats.upstream_errors == {reason: 2 * attempt}, stats.upstream_errors
            await base.settled(relay)
        # a POST whose bytes were sent is never repeated; a GET may be, once (RFC 9112 9.3.1)
        methods = [r.request_line.split(" ")[0] for r in relay.requests]
        assert methods.count("POST") == 2 and methods.count("GET") in (2, 3, 4), methods
    finally:
        await relay.stop()


async def test_refused_connection(start_gateway) -> None:
    gw = await start_gateway(route_to(f"http://127.0.0.1:{free_port()}"))
    base = Baseline(gw)
    for _ in range(3):
        resp = await _one(gw)
        assert status_of(resp) == 502 and _reason(resp) == "upstream_connect", resp[:300]
    assert gw.runtime.table.routes["app"].stats.upstream_errors == {"upstream_connect": 3}
    await base.settled(None)


MID_BODY = [
    ("reset_mid_body", 1_000_000, {"upstream_reset"}),
    ("short_body", 100_000, {"upstream_invalid"}),
    # aiohttp's C parser never reports a malformed later chunk: the gateway's own
    # read timeout ends it (upstream_timeout, after read_timeout)
    ("bad_chunked_body", None, {"upstream_invalid", "upstream_timeout"}),
]


@pytest.mark.parametrize(("fault", "length", "reasons"), MID_BODY)
async def test_failure_after_the_head(fault: str, length: int | None, reasons: set[str], start_gateway) -> None:
    """The head already went to the client: the response is cut short and the connection
    closed (never a clean end that would pass a truncated body off as whole), counted
    under its reason, with nothing left behind."""
    relay = await RawUpstream(getattr(faults, fault)).start()
    try:
        gw = await start_gateway(route_to(relay.url))
        base = Baseline(gw)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive: the gateway must close
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
        rest = await asyncio.wait_for(reader.read(), READ_TIMEOUT + 3)  # until the gateway closes
        writer.close()
        if length is not None:
            assert f"content-length: {length}".encode() in head.lower()
            assert len(rest) < length
        else:  # re-chunked: the terminating chunk must never be sent
            assert not rest.endswith(b"0\r\n\r\n"), rest[-50:]
        stats = gw.runtime.table.routes["app"].stats
        await wait_for(lambda: sum(stats.upstream_errors.values()) == 1)
        assert len(stats.upstream_errors) == 1 and set(stats.upstream_errors) <= reasons, stats.upstream_errors
        await base.settled(relay)
    finally:
        await relay.stop()


async def test_random_keepalive_closes(start_gateway) -> None:
    """An upstream that drops half of its keep-alive connections right after a response,
    without announcing it: 1. 200 mixed GETs and POSTs, 4 at a time 2. GETs are always
    200 (a pooled connection found closed is retried on a new one), POSTs are 200 or a
    counted 502 upstream_reset, nothing else 3. the upstream never sees a request twice
    on a connection it closed, nor a torn one 4. nothing is left behind but idle pooled
    connections."""
    relay = await RawUpstream(faults.random_close(seed=9)).start()
    try:
        gw = await start_gateway(route_to(relay.url))
        base = Baseline(gw)
        rng = random.Random(9)
        sem = asyncio.Semaphore(4)
        results: list[tuple[str, int, str | None]] = []

        async def one(i: int) -> None:
            method = rng.choice(("GET", "POST"))
            body = b"Content-Length: 5\r\n\r\nhello" if method == "POST" else b"\r\n"
            async with sem:
                resp = await _one(gw, f"{method} /r{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode() + body)
            results.append((method, status_of(resp), _reason(resp)))

        await asyncio.gather(*(one(i) for i in range(200)))
        bad = [r for r in results if r[1] != 200]
        assert all(m == "POST" and s == 502 and why == "upstream_reset" for m, s, why in bad), bad
        stats = gw.runtime.table.routes["app"].stats
        assert stats.upstream_errors == ({"upstream_reset": len(bad)} if bad else {})
        assert not relay.errors, relay.errors
        targets = [r.request_line.split(" ")[1] for r in relay.requests]
        assert sorted(set(targets)) == sorted(f"/r{i}" for i in range(200))
        await base.settled(relay, pooled=relay.open)
    finally:
        await relay.stop()
