"""workers = N (issue 8): a master supervising worker processes on one port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import aiohttp

from ..builders import app_route, gateway_config, handler_route
from ..conftest import raw_request, status_of, wait_for


def app(url: str, mc: int) -> str:
    """Route ``app`` with ``max_concurrency = mc`` (shared among the workers)."""
    return app_route(url, max_concurrency=mc, max_queue=50, queue_timeout=10)


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
    gp = gateway_process(app(upstream.url, 400), workers=2)
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
    gp = gateway_process(app(upstream.url, 400), workers=2)
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
    gp = gateway_process(app(upstream.url, 3), workers=2)
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
    gp = gateway_process(app(upstream.url, 40), workers=2)
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
            gp.config_path.write_text(head + app(upstream.url, 41 + i))
            answer = await asyncio.to_thread(gp.command, {"cmd": "reload"})
            assert answer["ok"], answer
            assert answer["changes"] == [f"route app: max_concurrency {40 + i} -> {41 + i}"]
        gp.config_path.write_text(head + app(upstream.url, 0))
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
    gp = gateway_process(app(upstream.url, 40), workers=2, shutdown_timeout=10)  # 20 a worker: any split of 16 fits
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
        body = handler_route()
        from ..conftest import GatewayProcess

        cfg = gateway_config(tmp_path, body, port=port, workers=2)
        gp = GatewayProcess(cfg, tmp_path).start(wait_ready=False)
        assert gp.wait(20) == 1
        assert f"127.0.0.1:{port}" in gp.stderr() and "in use" in gp.stderr()
    finally:
        blocker.close()


def proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` (R, S, T for stopped, Z for a zombie), None once reaped."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


async def test_stuck_worker_is_killed_and_replaced(gateway_process, upstream):
    """A worker frozen with SIGSTOP (a real stuck process: no figures reach the master)
    1. is killed by the master once worker_timeout has passed, not before, and the
    master logs why 2. is replaced by a worker with a new pid within 6 s of the kill
    3. while it is stuck the other worker keeps answering; the only failures are
    connections the kernel had queued on the frozen worker's SO_REUSEPORT socket
    (timeouts or resets, never an error status) 4. once replaced, every request succeeds
    and the new worker takes its share 5. the snapshot drops the stuck worker and keeps
    the counters it had reported, once."""
    timeout = 3.0  # short, yet far above a healthy worker's 0.25 s push interval on a busy machine
    gp = gateway_process(app(upstream.url, 400), workers=2, worker_timeout=timeout)
    port = port_of(gp)
    s = await asyncio.to_thread(wait_for_workers, gp, 2)
    victim, healthy = (w["pid"] for w in s["workers"])
    assert {victim, healthy} == children(gp.proc.pid)
    assert await asyncio.gather(*(fresh_get(port) for _ in range(100))) == [200] * 100
    # both workers have pushed everything they served: the frozen one's last figures are whole
    s = await asyncio.to_thread(
        poll, lambda: (lambda s: s if s["routes"][0]["responses"]["2xx"] == 100 else None)(snap(gp)))
    victim_counted = next(w["requests"] for w in s["workers"] if w["pid"] == victim)
    assert victim_counted > 10

    ok = stalled = 0
    bad: list[int] = []
    ok_at_kill: int | None = None
    stop = asyncio.Event()

    async def load() -> None:
        nonlocal ok, stalled
        while not stop.is_set():
            try:
                status = await asyncio.wait_for(
                    raw_request(port, b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 5), 0.5)
            except (TimeoutError, OSError):  # queued on the frozen worker, or reset when it was killed
                stalled += 1
                continue
            if status_of(status) == 200:
                ok += 1
            else:
                bad.append(status_of(status))

    loop = asyncio.get_running_loop()
    clients: list[asyncio.Task[None]] = []
    try:
        os.kill(victim, signal.SIGSTOP)
        t0 = loop.time()
        await asyncio.to_thread(poll, lambda: proc_state(victim) == "T", 5)
        clients += [asyncio.create_task(load()) for _ in range(6)]

        def killed() -> bool:
            return proc_state(victim) in (None, "Z")

        await asyncio.to_thread(poll, killed, timeout + 10)
        killed_after = loop.time() - t0
        ok_at_kill = ok
        stop.set()  # what is timed next is the replacement's boot, not our own load
        await asyncio.gather(*clients)

        def replaced() -> dict | None:
            s = snap(gp)
            pids = {w["pid"] for w in s["workers"]}
            return s if len(pids) == 2 and victim not in pids else None

        s = await asyncio.to_thread(poll, replaced, timeout + 10)
        replaced_after = loop.time() - t0
    finally:
        stop.set()
        if victim in children(gp.proc.pid):  # still ours (not reaped): never leave it frozen
            os.kill(victim, signal.SIGKILL)
            os.kill(victim, signal.SIGCONT)
        await asyncio.gather(*clients)

    (newcomer,) = {w["pid"] for w in s["workers"]} - {healthy}
    assert healthy in {w["pid"] for w in s["workers"]}, "the healthy worker was killed too"
    assert newcomer != victim and children(gp.proc.pid) == {healthy, newcomer}
    assert timeout - 0.5 <= killed_after <= timeout + 3, killed_after
    assert replaced_after - killed_after <= 6, (killed_after, replaced_after)  # backoff 0.5 s + boot
    assert bad == [], bad  # no 5xx or other error status: failures are only the stuck connections
    assert ok_at_kill >= 10, ok_at_kill  # the healthy worker answered while the other was stuck
    assert stalled > 0  # the scenario is real: the kernel did queue connections on the frozen worker
    stderr = gp.stderr()
    assert f"(pid {victim}) silent for" in stderr and "killing it" in stderr, stderr

    # replaced: nothing fails any more, and the newcomer serves its share
    statuses = await asyncio.gather(*(fresh_get(port) for _ in range(100)))
    assert statuses == [200] * 100
    s = await asyncio.to_thread(
        poll, lambda: (lambda s: s if s["routes"][0]["responses"]["2xx"] >= 100 + ok + 100 else None)(snap(gp)))
    per_worker = {w["pid"]: w["requests"] for w in s["workers"]}
    assert set(per_worker) == {healthy, newcomer} and per_worker[newcomer] > 10, per_worker
    # the frozen worker counted nothing after SIGSTOP; what it counted before is kept, once
    assert s["routes"][0]["requests"] - sum(per_worker.values()) == victim_counted
    assert s["routes"][0]["responses"]["5xx"] == 0
    assert gp.proc.poll() is None


async def test_short_worker_timeout_spares_healthy_workers(gateway_process, upstream):
    """worker_timeout below the usual 0.25 s between a worker's figures: healthy workers
    report often enough (a quarter of worker_timeout) and are never killed."""
    timeout = 0.2
    gp = gateway_process(app(upstream.url, 400), workers=2, worker_timeout=timeout)
    port = port_of(gp)
    s = await asyncio.to_thread(wait_for_workers, gp, 2)
    pids = {w["pid"] for w in s["workers"]}
    start = s["uptime_s"]

    def steady_for(seconds: float) -> bool:
        s = snap(gp)
        assert {w["pid"] for w in s["workers"]} == pids == children(gp.proc.pid), s["workers"]
        return s["uptime_s"] - start >= seconds

    # 10 worker_timeouts, serving meanwhile
    for _ in range(4):
        assert await asyncio.gather(*(fresh_get(port) for _ in range(20))) == [200] * 20
    await asyncio.to_thread(poll, lambda: steady_for(10 * timeout))
    assert "silent for" not in gp.stderr()


async def test_control_commands_answer_as_one_process_does(gateway_process, upstream):
    """With workers = 2, every command goes to both workers and comes back as one
    answer: 1. queue lists the waiters of both, longest waiting first 2. server_state
    down, then up, answers what one process answers 3. an unknown route is refused
    by set_limit and queue 4. a reload to workers = 1 is refused: that takes a restart."""
    gp = gateway_process(app(upstream.url, 2), workers=2)
    port = port_of(gp)
    await asyncio.to_thread(wait_for_workers, gp, 2)
    # 1 s each: when the kernel gives all 8 to one worker, the last still ends within
    # queue_timeout and the client's 10 s (1.5 s each did not, 0 from a loaded machine)
    tasks = [asyncio.create_task(fresh_get(port, "/slow?ms=1000")) for _ in range(8)]

    def queued() -> dict | None:
        answer = gp.command({"cmd": "queue", "route": "app"})
        # one slot per worker: 6 wait (7 when the kernel gave all 8 to one worker)
        return answer if len(answer["waiters"]) >= 6 else None

    answer = await asyncio.to_thread(poll, queued)
    assert answer["ok"] and answer["route"] == "app"
    waits = [w["wait_ms"] for w in answer["waiters"]]
    assert waits == sorted(waits, reverse=True)
    assert {w["pid"] for w in answer["waiters"]} <= {w["pid"] for w in snap(gp)["workers"]}
    assert await asyncio.gather(*tasks) == [200] * 8

    for state in ("down", "up"):
        answer = await asyncio.to_thread(gp.command, {"cmd": "server_state", "upstream": "app",
                                                      "server": upstream.url, "state": state})
        assert answer == {"ok": True, "upstream": "app", "servers": [upstream.url], "state": state}
    for cmd in ({"cmd": "set_limit", "route": "nope", "max_queue": 1}, {"cmd": "queue", "route": "nope"}):
        assert await asyncio.to_thread(gp.command, cmd) == {"ok": False, "error": "no route 'nope' (routes: app)"}

    gp.config_path.write_text(gp.config_path.read_text().replace("workers = 2", "workers = 1"))
    answer = await asyncio.to_thread(gp.command, {"cmd": "reload", "dry_run": True})
    assert answer["ok"] is False
    assert "server.workers (to 1: the single-process mode) cannot change on reload" in answer["error"]


async def test_reload_says_which_limits_set_by_hand_it_ends(gateway_process, upstream):
    """With workers = 2, as one process: set_limit app 30, then the file's
    max_concurrency 10 -> 15 and a reload: the dry run, the answer and the log say
    30 (set_limit) -> 15, and every worker's limit is back to the file's."""
    gp = gateway_process(app(upstream.url, 10), workers=2)
    await asyncio.to_thread(wait_for_workers, gp, 2)
    assert (await asyncio.to_thread(gp.command, {"cmd": "set_limit", "route": "app",
                                                 "max_concurrency": 30}))["ok"]
    gp.config_path.write_text(gp.config_path.read_text().replace("max_concurrency = 10", "max_concurrency = 15")
                              .replace('level = "warning"', 'level = "info"'))  # the reload's log line
    said = ["log: level warning -> info", "route app: max_concurrency 30 (set_limit) -> 15"]
    answer = await asyncio.to_thread(gp.command, {"cmd": "reload", "dry_run": True})
    assert answer["ok"] and answer["changes"] == said, answer
    answer = await asyncio.to_thread(gp.command, {"cmd": "reload"})
    assert answer["ok"] and answer["changes"] == said, answer
    assert snap(gp)["routes"][0]["max_concurrency"] == 15
    await asyncio.to_thread(poll, lambda: "generation 2; " + "; ".join(said) in gp.stderr())


async def test_reload_says_where_a_server_name_that_does_not_resolve_is(gateway_process, upstream):
    """With workers = 2, a reload to a server name with no address is refused with
    file:line: key, said once, as one process says it."""
    gp = gateway_process(app(upstream.url, 10), workers=2)
    await asyncio.to_thread(wait_for_workers, gp, 2)
    gp.config_path.write_text(gp.config_path.read_text().replace(upstream.url, "http://nonexistent.invalid:8080"))
    line = next(i for i, x in enumerate(gp.config_path.read_text().splitlines(), 1) if "nonexistent" in x)
    answer = await asyncio.to_thread(gp.command, {"cmd": "reload"})
    assert answer["ok"] is False
    assert answer["error"].startswith(
        f'{gp.config_path}:{line}: upstreams.app.servers[0]: cannot resolve "nonexistent.invalid" ('), answer
    assert ";" not in answer["error"] and snap(gp)["generation"] == 1


async def test_reload_changes_the_worker_count_between_counts_above_one(gateway_process, upstream):
    """What gatewayd(8) and gatewayd.toml(5) RELOAD say of server.workers: 1. two workers
    2. the file says 3, reload: ok, a third worker starts 3. the file says 2 again,
    reload: one stops 4. requests are served throughout."""
    gp = gateway_process(app(upstream.url, 6), workers=2)
    port = port_of(gp)
    await asyncio.to_thread(wait_for_workers, gp, 2)
    for before, after in ((2, 3), (3, 2)):
        gp.config_path.write_text(gp.config_path.read_text().replace(f"workers = {before}", f"workers = {after}"))
        answer = await asyncio.to_thread(gp.command, {"cmd": "reload"})
        assert answer["ok"] is True, answer
        assert any("workers" in c for c in answer["changes"]), answer
        s = await asyncio.to_thread(wait_for_workers, gp, after)
        assert s["workers_configured"] == after
        assert await asyncio.gather(*(fresh_get(port) for _ in range(20))) == [200] * 20
