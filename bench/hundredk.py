"""100,000 concurrent keep-alive connections to one gatewayd (issue 8).

    python -m bench.hundredk [--connections 100000] [--workers 7] [--interval 20]
                             [--hold 60] [--procs 6] [--open-rate 3000]

One process may hold at most 20,000 file descriptors here, so both sides are
split: gatewayd runs ``workers`` processes (SO_REUSEPORT), and the load comes
from ``procs`` generator processes, each opening its share of connections from
its own 127.0.0.x source address (a fresh set of ephemeral ports each). Every
connection sends ``GET /`` through the ``simulated_io`` handler (10 ms), then
again every ``interval`` seconds (with jitter) while all are held.

Reported: connections opened and held, errors, requests/s while held, p50/p99
latency, the gateway's total RSS (master + workers) and KiB per held
connection (RSS growth over the idle baseline divided by connections), and the
time it took to open them all. Everything started is stopped; bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gatewayd.control.cli import call

REQUEST = b"GET /?ms=10 HTTP/1.1\r\nHost: bench\r\n\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree(pid: int) -> list[int]:
    out = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            for child in fh.read().split():
                out += tree(int(child))
    except OSError:
        pass
    return out


# ----------------------------------------------------------------------------- load generator
async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def _generator(index: int, count: int, port: int, source: str, interval: float,
                     open_timeout: float, hold: float, open_rate: float, out: Any) -> None:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    opened = 0
    held = 0
    requests = 0
    held_requests = 0
    all_open = asyncio.Event()
    loop = asyncio.get_running_loop()
    hold_start = 0.0
    hold_until = float("inf")  # set once every connection is open

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    async def one(i: int) -> None:
        nonlocal opened, held, requests, held_requests
        try:
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((source, 0))
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 30)
            reader, writer = await asyncio.open_connection(sock=sock)
        except (TimeoutError, OSError) as exc:
            error(type(exc).__name__)
            return
        opened += 1
        try:
            first = True
            while True:
                t0 = loop.time()
                writer.write(REQUEST)
                status = await asyncio.wait_for(_read_response(reader), 60)
                dt = loop.time() - t0
                requests += 1
                if status != 200:
                    error(f"status {status}")
                if hold_start and t0 >= hold_start:
                    latencies.append(dt)
                    held_requests += 1
                if first:
                    first = False
                    held += 1
                    if held == count:
                        all_open.set()
                await asyncio.sleep(interval * (0.5 + random.random()))
                if loop.time() >= hold_until:
                    break
        except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
            error(type(exc).__name__)
        finally:
            writer.close()

    t_start = loop.time()
    tasks = []
    # Paced on the clock, in batches of 50: a burst of SYNs faster than the gateway
    # accepts overflows the listen backlog, and the connections the kernel drops
    # time out in connect() (the generator's doing, not the gateway's).
    for i in range(count):
        tasks.append(loop.create_task(one(i)))
        if i % 50 == 49:
            due = t_start + (i + 1) / open_rate
            delay = due - loop.time()
            await asyncio.sleep(max(0.0, delay))
    try:
        await asyncio.wait_for(all_open.wait(), open_timeout)
    except TimeoutError:
        pass
    open_time = loop.time() - t_start
    hold_start = loop.time()
    hold_until = hold_start + hold
    await asyncio.gather(*tasks)
    held_for = max(1e-9, min(hold_until, loop.time()) - hold_start)
    out.put({"index": index, "opened": opened, "held": held, "errors": errors,
             "requests": requests, "held_requests": held_requests, "held_for": held_for,
             "open_time": open_time, "latencies": sorted(latencies)[:: max(1, len(latencies) // 2000)]})


def _generator_main(*args: Any) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.run(_generator(*args))
    except ImportError:
        asyncio.run(_generator(*args))


# ----------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hundredk", description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=7)
    p.add_argument("--procs", type=int, default=6, help="load generator processes")
    p.add_argument("--interval", type=float, default=20.0, help="seconds between a connection's requests")
    p.add_argument("--hold", type=float, default=60.0, help="seconds to hold all connections")
    p.add_argument("--open-timeout", type=float, default=180.0)
    p.add_argument("--open-rate", type=float, default=3000.0,
                   help="connections opened per second, all generators together")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="gatewayd-100k-"))
    port = free_port()
    (tmp / "gw.toml").write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
workers = {args.workers}
max_connections = {args.connections + 5000}
backlog = 8192
keepalive_timeout = {args.interval * 3 + args.hold}
[control]
socket = "gw.sock"
[log]
access_log = "off"
level = "warning"
[upstreams.demo]
handler = "gatewayd.handlers:simulated_io"
[[routes]]
name = "demo"
upstream = "demo"
max_concurrency = 100000
max_queue = 100000
queue_timeout = 30
""")
    gw = subprocess.Popen([sys.executable, "-m", "gatewayd", "--config", str(tmp / "gw.toml")],
                          stderr=open(tmp / "gw.err", "wb"), start_new_session=True)
    procs: list[mp.Process] = []
    try:
        deadline = time.monotonic() + 30
        while not (tmp / "gw.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
        baseline = sum(rss_kib(x) for x in tree(gw.pid))
        out: mp.Queue[dict[str, Any]] = mp.Queue()
        per = [args.connections // args.procs + (1 if i < args.connections % args.procs else 0)
               for i in range(args.procs)]
        t0 = time.monotonic()
        for i, n in enumerate(per):
            pr = mp.Process(target=_generator_main, args=(i, n, port, f"127.0.0.{10 + i}", args.interval,
                                                          args.open_timeout, args.hold,
                                                          args.open_rate / args.procs, out))
            pr.start()
            procs.append(pr)
        peak_rss = 0
        held_rss = 0
        held_snapshot: dict[str, Any] = {}
        results: list[dict[str, Any]] = []
        # opening, holding, every connection's last interval, and slack for a slow machine
        limit = time.monotonic() + args.open_timeout + args.hold + args.interval * 1.5 + 300
        while len(results) < len(procs) and time.monotonic() < limit:
            rss = sum(rss_kib(x) for x in tree(gw.pid))
            peak_rss = max(peak_rss, rss)
            try:
                results.append(out.get(timeout=1.0))
            except Exception:
                pass
            if not held_rss and time.monotonic() - t0 > 5:
                snap = _snapshot(tmp / "gw.sock")
                if snap and snap.get("connections", 0) >= args.connections * 0.999:
                    held_rss = sum(rss_kib(x) for x in tree(gw.pid))
                    held_snapshot = snap
        opened = sum(r["opened"] for r in results)
        held = sum(r["held"] for r in results)
        errors: dict[str, int] = {}
        for r in results:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        lat = sorted(x for r in results for x in r["latencies"])
        rate = sum(r["held_requests"] / r["held_for"] for r in results)
        open_time = max((r["open_time"] for r in results), default=0.0)
        rss_for = held_rss or peak_rss
        report = {
            "connections_target": args.connections, "opened": opened, "held": held,
            "errors": errors, "requests_per_s_while_held": round(rate, 1),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 2) if lat else None,
            "open_time_s": round(open_time, 1), "workers": args.workers, "generators": args.procs,
            "gateway_rss_baseline_mib": round(baseline / 1024, 1),
            "gateway_rss_held_mib": round(rss_for / 1024, 1),
            "kib_per_connection": round((rss_for - baseline) / max(1, held), 2),
            "gateway_connections_seen": (held_snapshot if held_rss else {}).get("connections"),
        }
        if args.json:
            print(json.dumps(report))
        else:
            for k, v in report.items():
                print(f"{k:28} {v}")
        return 0 if held == args.connections and not errors else 1
    finally:
        for pr in procs:
            if pr.is_alive():
                pr.terminate()
            pr.join(5)
        os.killpg(gw.pid, signal.SIGTERM)
        try:
            gw.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(gw.pid, signal.SIGKILL)


def _snapshot(path: Path) -> dict[str, Any] | None:
    try:
        return call(path, {"cmd": "snapshot"}, timeout=5)["snapshot"]
    except (OSError, ValueError, KeyError):
        return None


if __name__ == "__main__":
    sys.exit(main())
