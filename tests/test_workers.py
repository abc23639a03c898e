"""workers = N (issue 8): a master supervising worker processes on one port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import aiohttp

from .conftest import raw_request, status_of, wait_for

TWO = """
    [upstreams.app]
    servers = ["{url}"]

    [[routes]]
    name = "app"
    upstream = "app"
    max_concurrency = {mc}
    max_queue = 50
    queue_timeout = 10
"""


def port_of(gp) -> int:
    return int(gp.config_path.read_text().split("127.0.0.1:")[1].split('"')[0])


def snap(gp) -> dict:
    return gp.command({"cmd": "snapshot"})["snapshot"]


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return {int(x) for x in fh.read().split()}


async def fresh_get(port: int, path: str = "/ok") -> int:
    return status_of(await raw_request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(), 10))


async def test_two_workers_serve_and_snapshot_sums(gateway_process, upstream):
    """1. workers = 2: the master has two worker children 2. new connections spread over
    both 3. the snapshot's totals are the sums of the workers' figures."""
    gp = gateway_process(TWO.format(url=upstream.url, mc=400), workers=2)
    port = port_of(gp)
    s = await asyncio.to_thread(wait_for_workers, gp, 2)
    pids = {w["pid"] for w in s["workers"]}
    assert pids == children(gp.proc.pid) and len(pids) == 2
    assert s["pid"] == gp.proc.pid
    statuses = await asyncio.gather(*(fresh_get(port) for _ in range(200)))
    assert statuses == [200] * 200

    def counted() -> dict | None:
        s = snap(gp)
        return s if s["routes"][0]["responses"]["2xx"] == 200 else None

    s = await asyncio.to_thread(poll, counted)
    per_worker = [w["requests"] for w in s["workers"]]
    assert sum(per_worker) == 200 and min(per_worker) > 20, per_worker
    assert s["routes"][0]["responses"]["2xx"] == 200
    assert s["connections"] == sum(w["connections"] for w in s["workers"])
    assert s["tasks"] == sum(w["tasks"] for w in s["workers"])


def poll(fn, timeout: float = 10.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met")


def wait_for_workers(gp, n: int) -> dict:
    return poll(lambda: (lambda s: s if len(s["workers"]) == n and all(
        w["pid"] for w in s["workers"]) else None)(snap(gp)), timeout=20)


async def test_killed_worker_is_replaced_and_counters_kept(gateway_process, upstream):
    """kill -9 of a worker: replaced within 5 s, requests keep succeeding, and the
    totals keep what the dead worker had counted."""
    gp = gateway_process(TWO.format(url=upstream.url, mc=400), workers=2)
    port = port_of(gp)
    await asyncio.to_thread(wait_for_workers, gp, 2)
    assert await asyncio.gather(*(fresh_get(port) for _ in range(100))) == [200] * 100
    s = await asyncio.to_thread(poll, lambda: (lambda s: s if s["routes"][0]["responses"]["2xx"] == 100 else None)(snap(gp)))
    victim = s["workers"][0]["pid"]
    ok = failed = 0
    stop = asyncio.Event()

    async def load() -> None:
        nonlocal ok, failed
        while not stop.is_set():
            try:
                if await fresh_get(port) == 200:
                    ok += 1
                else:
                    failed += 1
            except OSError:
                failed += 1

    clients = [asyncio.create_task(load()) for _ in range(4)]
    await wait_for(lambda: ok > 20)
    os.kill(victim, signal.SIGKILL)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    before = ok
    s = await asyncio.to_thread(
        poll, lambda: (lambda s: s if len(s["workers"]) == 2 and victim not in {w["pid"] for w in s["workers"]}
                       else None)(snap(gp)), 10)
    replaced_in = loop.time() - t0
    await wait_for(lambda: ok > before + 50)
    stop.set()
    await asyncio.gather(*clients)
    assert replaced_in < 5, replaced_in
    assert failed <= 4, failed  # at most the requests that were inside the killed process
    assert s["routes"][0]["requests"] >= 100
    assert gp.proc.poll() is None


async def test_limits_are_gateway_wide(gateway_process, upstream):
    """max_concurrency = 3 over two workers: never more than 3 at the upstream; set_limit
    reaches both workers."""
    gp = gateway_process(TWO.format(url=upstream.url, mc=3), workers=2)
    port = port_of(gp)
    await asyncio.to_thread(wait_for_workers, gp, 2)
    tasks = [asyncio.create_task(fresh_get(port, "/slow?ms=600")) for _ in range(12)]
    peak = 0
    while not all(t.done() for t in tasks):
        peak = max(peak, upstream.active)
        await asyncio.sleep(0.005)
    assert peak <= 3
    assert all(t.result() == 200 for t in tasks)
    answer = await asyncio.to_thread(gp.command, {"cmd": "set_limit", "route": "app", "max_concurrency": 8})
    assert answer["ok"] and answer["max_concurrency"] == 8
    tasks = [asyncio.create_task(fresh_get(port, "/slow?ms=600")) for _ in range(16)]
    peak = 0
    while not all(t.done() for t in tasks):
        peak = max(peak, upstream.active)
        await asyncio.sleep(0.005)
    assert 3 < peak <= 8, peak
    assert snap(gp)["routes"][0]["max_concurrency"] == 8


async def test_reload_under_load_with_two_workers(gateway_process, upstream):
    gp = gateway_process(TWO.format(url=upstream.url, mc=40), workers=2)
    port = port_of(gp)
    await asyncio.to_thread(wait_for_workers, gp, 2)
    head = gp.config_path.read_text().split("[upstreams.", 1)[0]
    failures: list[object] = []
    done = 0
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while not stop.is_set():
            try:
                async with session.get(f"http://127.0.0.1:{port}/ok") as r:
                    await r.read()
                    done += 1
                    if r.status != 200:
                        failures.append(r.status)
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        clients = [asyncio.create_task(client(session)) for _ in range(8)]
        long = asyncio.create_task(fresh_get(port, "/slow?ms=1500"))
        await wait_for(lambda: done > 50, timeout=10)
        for i in range(5):
            gp.config_path.write_text(head + TWO.format(url=upstream.url, mc=41 + i))
            answer = await asyncio.to_thread(gp.command, {"cmd": "reload"})
            assert answer["ok"], answer
            assert answer["changes"] == [f"route app: max_concurrency {40 + i} -> {41 + i}"]
        gp.config_path.write_text(head + TWO.format(url=upstream.url, mc=0))
        bad = await asyncio.to_thread(gp.command, {"cmd": "reload"})
        assert bad["ok"] is False and "max_concurrency" in bad["error"]
        stop.set()
        await asyncio.gather(*clients)
        assert await long == 200
    assert failures == []
    s = snap(gp)
    assert s["generation"] == 6 and s["routes"][0]["max_concurrency"] == 45
    assert s["last_reload"]["ok"] is False


async def test_sigterm_drains_both_workers(gateway_process, upstream):
    gp = gateway_process(TWO.format(url=upstream.url, mc=40), workers=2, shutdown_timeout=10)  # 20 a worker: any split of 16 fits
    port = port_of(gp)
    await asyncio.to_thread(wait_for_workers, gp, 2)
    # enough slow requests on fresh connections that both workers hold some
    tasks = [asyncio.create_task(fresh_get(port, "/slow?ms=4000")) for _ in range(16)]
    s = await asyncio.to_thread(poll, lambda: (lambda s: s if all(w["in_flight"] > 0 for w in s["workers"])
                                               and s["routes"][0]["in_flight"] == 16 else None)(snap(gp)))
    assert len(s["workers"]) == 2
    gp.signal(signal.SIGTERM)
    assert await asyncio.gather(*tasks) == [200] * 16
    assert await asyncio.to_thread(gp.wait, 20) == 0
    assert not gp.socket_path.exists()


def test_boot_failure_stops_instead_of_crash_looping(gateway_process, tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        body = """
            [upstreams.demo]
            handler = "gatewayd.handlers:simulated_io"

            [[routes]]
            name = "demo"
            upstream = "demo"
        """
        from .conftest import GatewayProcess, gateway_config

        cfg = gateway_config(tmp_path, body, port=port, workers=2)
        gp = GatewayProcess(cfg, tmp_path).start(wait_ready=False)
        assert gp.wait(20) == 1
        assert f"127.0.0.1:{port}" in gp.stderr() and "in use" in gp.stderr()
    finally:
        blocker.close()
