"""What a dashboard costs the gateway: the snapshot a control-socket tick builds.

    python -m bench.control_cost --routes 200 [--active 200] [--ticks 200]
    python -m bench.control_cost --e2e rate --routes 200 [--rate-rps 20] [--repeats 5]
    python -m bench.control_cost --e2e wrk --routes 200 [--repeats 5] [--duration 5]

The first form runs gatewayd's own Runtime and ControlServer in this process
(uvloop when installed, a real configuration of ``--routes`` routes, the
control socket in a temporary folder) and, between two ticks, records traffic
on ``--active`` of the routes through the request path's own recording calls
(``RouteStats.requests``, ``responded``, ``queue_wait.observe``, sheds,
cancellations, upstream errors, in-flight counts). Each tick then times what
every ``subscribe`` tick and ``snapshot`` command does before any per-subscriber
work: build the snapshot and encode its JSON line. It prints the median (wall
and this thread's CPU time), p90 and max of ``--ticks`` ticks in milliseconds,
and the share of one core that 4 ticks a second take. ``--check`` also decodes
each line and compares it with the snapshot built from scratch (slow; for
testing the bench itself).

The ``--e2e`` forms run the real thing: nginx as the upstream on the load CPU,
``gatewayd`` (one process, the configuration above, every route on the same
upstream) pinned to the proxy CPU, and runs that alternate without and with a
subscriber on the load CPU that asks for a snapshot every ``--interval``
seconds the way the dashboard does (``dashboard.client``: a ``snapshot``
request, read the answer, wait for the next tick; the answer is not parsed).

- ``--e2e wrk``: wrk saturates gatewayd through one route; each pair gives the
  ratio of req/s with and without the subscriber, and of requests per second of
  gatewayd CPU; the medians are printed. On a busy machine this is noisy
  (several %), much more than the effect it looks for.
- ``--e2e rate``: an open-loop client (bench.loadgen, in this process, on the
  load CPU) sends ``--rate-rps`` requests a second to one route, so that the
  route changes every tick; gatewayd's CPU time (schedstat) with and without the
  subscriber is compared. The difference is what the subscriber costs the
  gateway, in ms of CPU per second: at saturation each of them is taken from
  requests, so it is the share of throughput lost.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from gatewayd.config.loader import parse
from gatewayd.control.server import ControlServer
from gatewayd.process.single import LocalController
from gatewayd.runtime.state import Runtime

from . import aio
from .procs import Processes, free_port
from .servers import gatewayd_head


def config_text(routes: int, port: int, upstream_port: int, sock: Path, access_log: str = "off") -> str:
    """One upstream, ``routes`` routes (``/r0``, ``/r1``, ...; the first one also ``/``)."""
    head = gatewayd_head(port, upstream_port, sock, access_log)
    parts = [head]
    for i in range(routes):
        prefix = "/" if i == 0 else f"/r{i}"
        parts.append(textwrap.dedent(f"""
            [[routes]]
            name = "route-{i:03d}"
            path_prefix = "{prefix}"
            upstream = "up"
            max_concurrency = {100 + i}
            max_queue = {1000 + i}
            queue_timeout = 1.0
        """))
    return "".join(parts)


# ----------------------------------------------------------------------------- in-process
class Traffic:
    """Records what requests would record on the request path, route by route."""

    STATUSES = (200, 200, 200, 200, 200, 200, 201, 204, 304, 404, 500, 502)
    REASONS = ("connect", "timeout", "reset")

    def __init__(self, runtime: Runtime, active: int, seed: int = 1) -> None:
        self.routes = list(runtime.table.routes.values())[:active]
        self.rng = random.Random(seed)

    def step(self) -> None:
        rng = self.rng
        for r in self.routes:
            stats, gate = r.stats, r.gate
            for _ in range(rng.randint(1, 8)):
                stats.requests += 1
                stats.queue_wait.observe(rng.random() * 0.002)
                status = rng.choice(self.STATUSES)
                if status == 502:
                    stats.upstream_error(rng.choice(self.REASONS))
                stats.responded(status, rng.lognormvariate(-4.5, 1.0))
            roll = rng.random()
            if roll < 0.1:
                stats.requests += 1
                stats.queue_full += 1
            elif roll < 0.15:
                stats.requests += 1
                stats.queue_timeout += 1
            elif roll < 0.2:
                stats.requests += 1
                stats.cancelled_in_flight += 1
            gate.in_flight = rng.randint(0, 10)


def encode_tick(control: ControlServer) -> bytes:
    """One subscribe tick's line, before it is written to any subscriber (built anew:
    not the copy subscribers of the same tick share)."""
    build = getattr(control, "build_line", None)
    if build is not None:
        return build(False)
    # the control server before snapshot_line existed: what its subscribe loop did
    return json.dumps({"ok": True, "snapshot": control.snapshot(False)},
                      separators=(",", ":")).encode() + b"\n"


def _comparable(snap: dict[str, Any]) -> dict[str, Any]:
    """A snapshot without the fields that differ between two builds a moment apart."""
    out = dict(snap)
    for key in ("time", "uptime_s", "rss_bytes", "open_fds", "cpu_s", "control", "tasks",
                "loop_lag_ms", "gc", "workers"):
        out.pop(key, None)
    return out


async def in_process(routes: int, active: int, ticks: int, check: bool, gap: float = 0.0
                     ) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory(prefix="control-cost-") as tmp:
        path = Path(tmp) / "gatewayd.toml"
        path.write_text(config_text(routes, free_port(), free_port(), Path(tmp) / "gw.sock"))
        config = parse(path.read_text(), str(path))
        runtime = Runtime(config)
        await runtime.start()
        control = ControlServer(LocalController(runtime), config.socket_path, config.control.mode)
        await control.start()
        try:
            gc.collect()
            gc.freeze()  # as gatewayd does after start-up
            traffic = Traffic(runtime, active)
            for _ in range(5):  # warm-up
                traffic.step()
                encode_tick(control)
            times, cpu = [], []
            for _ in range(ticks):
                traffic.step()
                await asyncio.sleep(gap)
                t0, c0 = time.perf_counter(), time.thread_time()
                line = encode_tick(control)
                cpu.append(time.thread_time() - c0)
                times.append(time.perf_counter() - t0)
                if check:
                    got = json.loads(line)["snapshot"]
                    want = json.loads(json.dumps(control.snapshot(False)))
                    if _comparable(got) != _comparable(want):
                        raise SystemExit("the tick's line differs from a snapshot built from scratch")
            return times, cpu
        finally:
            await control.close()
            await runtime.shutdown(0.5)


def report_ticks(times: list[float], cpu: list[float], routes: int, active: int, rate: float) -> None:
    ms = sorted(t * 1000 for t in times)
    med = statistics.median(ms)
    p90 = ms[int(len(ms) * 0.9)]
    cpu_med = statistics.median(cpu) * 1000
    print(f"routes {routes}, active {active}, ticks {len(ms)}: build+encode per tick "
          f"median {med:.3f} ms (CPU {cpu_med:.3f} ms), p90 {p90:.3f} ms, max {ms[-1]:.3f} ms; "
          f"{rate:g} ticks/s = {med * rate / 10:.2f} % of a core")


# ----------------------------------------------------------------------------- subscriber
def subscriber(sock: Path, interval: float, mode: str) -> None:
    """A dashboard's traffic on the control socket, without the dashboard: one
    connection, ``hello``, then a snapshot every ``interval`` seconds."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock))
    f = s.makefile("rwb")

    def ask(obj: dict[str, Any]) -> bytes:
        f.write(json.dumps(obj).encode() + b"\n")
        f.flush()
        return f.readline()

    # the answers are read in full but not parsed: this process shares the load CPU
    # with wrk, and what is measured is the gateway's side
    assert json.loads(ask({"cmd": "hello"}))["ok"] is True
    ticks = 0
    if mode == "subscribe":
        assert json.loads(ask({"cmd": "subscribe", "interval": interval}))["ok"] is True
        while f.readline():
            ticks += 1
        return
    nxt = time.monotonic()
    while True:
        answer = ask({"cmd": "snapshot"})
        if not answer.startswith(b'{"ok":true,"snapshot":{') or not answer.endswith(b"}\n"):
            raise SystemExit(f"snapshot refused: {answer[:200]!r}")
        ticks += 1
        nxt = max(nxt + interval, time.monotonic())
        time.sleep(max(0.0, nxt - time.monotonic()))


# ----------------------------------------------------------------------------- end to end
def cpu_ns(pid: int) -> int:
    """Nanoseconds ``pid`` (all its threads) ran on a CPU: schedstat, finer than utime."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total


class Setup:
    """nginx upstream, gatewayd (pinned) with ``routes`` routes, and the subscriber."""

    def __init__(self, args: argparse.Namespace, tmp: Path, procs: Processes) -> None:
        from .servers import Env, nginx_upstream

        self.args = args
        self.procs = procs
        self.root = Path(__file__).resolve().parent.parent
        env = Env(tmp=tmp, procs=procs, proxy_cpu=args.proxy_cpu, load_cpu=args.load_cpu)
        up = nginx_upstream(env)
        d = env.folder("gatewayd")
        self.port = free_port()
        self.sock = d / "gatewayd.sock"
        conf = d / "gatewayd.toml"
        conf.write_text(config_text(args.routes, self.port, up.port, self.sock))
        self.gw = procs.start("gatewayd", [sys.executable, "-m", "gatewayd", "--config", str(conf)],
                              args.proxy_cpu, cwd=self.root)
        self.gw.wait_port(self.port)

    def subscriber(self) -> Any:
        a = self.args
        sp = self.procs.start("subscriber", [
            sys.executable, "-m", "bench.control_cost", "--subscriber", str(self.sock),
            "--interval", str(a.interval), "--mode", a.mode], a.load_cpu, cwd=self.root)
        time.sleep(0.5)
        if not sp.alive():
            raise SystemExit(f"subscriber exited:\n{sp.log_tail()}")
        return sp

    def pairs(self, measure: Any) -> list[dict[bool, Any]]:
        """``measure()`` without and with a subscriber, ``--repeats`` times, alternating
        which comes first so that a drift in the machine's load favours neither."""
        out = []
        for i in range(self.args.repeats):
            pair = {}
            for sub in ((False, True) if i % 2 == 0 else (True, False)):
                sp = self.subscriber() if sub else None
                try:
                    pair[sub] = measure()
                finally:
                    if sp is not None:
                        self.procs.stop(sp)
            out.append(pair)
        return out


def e2e_wrk(setup: Setup) -> None:
    """Throughput A/B: wrk saturating gatewayd's core through one route."""
    from . import wrk

    a = setup.args
    tmp = setup.procs.logdir
    wrk.run(setup.port, a.connections, 2, tmp, a.load_cpu)  # warm-up

    def measure() -> tuple[float, float]:
        before = cpu_ns(setup.gw.pid)
        res = wrk.run(setup.port, a.connections, a.duration, tmp, a.load_cpu)
        cpu = (cpu_ns(setup.gw.pid) - before) / 1e9
        if res.errors:
            print(f"  warning: {res.errors} errors", file=sys.stderr)
        return res.rps, res.requests / cpu if cpu > 0 else 0.0

    ratios, cpu_ratios = [], []
    for i, pair in enumerate(setup.pairs(measure)):
        (rps0, eff0), (rps1, eff1) = pair[False], pair[True]
        ratios.append(rps1 / rps0)
        cpu_ratios.append(eff1 / eff0)
        print(f"  pair {i + 1}: without {rps0:7.0f} req/s ({eff0:6.0f} per CPU-s), with "
              f"{rps1:7.0f} req/s ({eff1:6.0f} per CPU-s): ratio {ratios[-1]:.4f}, per CPU-s "
              f"{cpu_ratios[-1]:.4f}", flush=True)
    med, cmed = statistics.median(ratios), statistics.median(cpu_ratios)
    print(f"wrk: routes {a.routes}, subscriber {a.mode} every {a.interval:g} s, wrk -c{a.connections} "
          f"{a.duration:g} s, {a.repeats} pairs: median ratio with/without {med:.4f} "
          f"({(1 - med) * 100:+.2f} % lost); requests per gatewayd CPU-second {cmed:.4f} "
          f"({(1 - cmed) * 100:+.2f} % lost)")


def e2e_rate(setup: Setup) -> None:
    """What the subscriber costs gatewayd's CPU, measured directly: a fixed request rate
    (open loop, one route) with and without the subscriber, gatewayd's CPU time
    compared. At saturation each of these CPU-seconds is one taken from requests."""
    from .loadgen import OpenLoop

    a = setup.args
    os.sched_setaffinity(0, {a.load_cpu})  # this process generates the load

    def measure() -> tuple[float, float]:
        async def run() -> tuple[float, float]:
            gen = OpenLoop(setup.port, a.rate_rps, a.duration, 2.0, prewarm=8)
            await gen.prewarm_connections()
            before = cpu_ns(setup.gw.pid)
            result = await gen.run()
            cpu = (cpu_ns(setup.gw.pid) - before) / 1e9
            ok = sum(1 for _, status, _ in result.samples if status == 200)
            return cpu / a.duration, ok / a.duration
        return aio.run(run())

    deltas = []
    for i, pair in enumerate(setup.pairs(measure)):
        (c0, r0), (c1, r1) = pair[False], pair[True]
        deltas.append(c1 - c0)
        print(f"  pair {i + 1}: gatewayd CPU without {c0 * 1000:6.1f} ms/s ({r0:.0f} req/s ok), "
              f"with {c1 * 1000:6.1f} ms/s ({r1:.0f} req/s ok): the subscriber "
              f"{deltas[-1] * 1000:+6.2f} ms/s", flush=True)
    med = statistics.median(deltas)
    ticks = 1 / a.interval
    print(f"rate: routes {a.routes}, {a.rate_rps:g} req/s on one route, subscriber {a.mode} every "
          f"{a.interval:g} s, {a.duration:g} s windows, {a.repeats} pairs: median extra gatewayd CPU "
          f"{med * 1000:.2f} ms/s = {med * 100:.2f} % of a core ({med / ticks * 1000:.2f} ms per tick)")


def e2e(args: argparse.Namespace) -> None:
    from .deps import tool

    tool("nginx")
    tool("wrk")
    with tempfile.TemporaryDirectory(prefix="control-cost-e2e-") as tmp_name:
        procs = Processes(Path(tmp_name))
        try:
            setup = Setup(args, Path(tmp_name), procs)
            (e2e_wrk if args.e2e == "wrk" else e2e_rate)(setup)
        finally:
            procs.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.control_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routes", type=int, default=200)
    p.add_argument("--active", type=int, help="routes with traffic between ticks (default: all)")
    p.add_argument("--ticks", type=int, default=200)
    p.add_argument("--rate", type=float, default=4.0, help="ticks per second, for the CPU share")
    p.add_argument("--gap", type=float, default=0.0,
                   help="seconds between ticks (the loop idles; caches go cold as between real ticks)")
    p.add_argument("--check", action="store_true", help="compare each line with a fresh snapshot")
    p.add_argument("--e2e", choices=("wrk", "rate"),
                   help="end to end, with and without a subscriber: wrk's throughput, or "
                        "gatewayd's CPU at a fixed request rate")
    p.add_argument("--repeats", type=int, default=5, help="pairs of runs (--e2e)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (--e2e)")
    p.add_argument("--rate-rps", type=float, default=200.0, help="requests per second (--e2e rate)")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--interval", type=float, default=0.25)
    p.add_argument("--mode", choices=("poll", "subscribe"), default="poll",
                   help="poll: a snapshot request per tick, as the dashboard does")
    p.add_argument("--proxy-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--subscriber", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.subscriber is not None:
        try:
            subscriber(args.subscriber, args.interval, args.mode)
        except (KeyboardInterrupt, BrokenPipeError, ConnectionError):
            pass
        return 0
    if args.e2e:
        e2e(args)
        return 0
    active = args.routes if args.active is None else min(args.active, args.routes)
    times, cpu = aio.run(in_process(args.routes, active, args.ticks, args.check, args.gap))
    report_ticks(times, cpu, args.routes, active, args.rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
