"""WebSocket tunnels (issue 22): gatewayd beside nginx (``map $http_upgrade``
proxy config), the proxy pinned to its CPU, the peers (bench.ws_peers: a
uvloop WebSocket upstream, raw-socket clients) on the load CPU. Every tunnel
is a real upgrade: ``Sec-WebSocket-Key`` out, ``101`` with the matching
``Sec-WebSocket-Accept`` back, checked by the client.

- idle: N concurrent idle tunnels (10,000 with 2 workers each; 9,000 with 1,
  the most one process holds under the 20,000-fd limit at two fds a tunnel),
  opened by 4 client processes from 4 source addresses (127.0.0.11-14). The
  proxy's RSS (all its processes) after a warm-up (200 tunnels echoing for a
  second, then closed) and again SETTLE seconds after the last tunnel opened;
  growth per tunnel, both sockets included (kernel socket buffers are in no
  process's RSS). After the reading every client sends one frame down each of
  its tunnels: ``alive`` is how many came back;
- echo: 1,000 tunnels, one 64-byte binary frame in flight on each (the
  upstream echoes it), round trips per second over the run's duration after
  1 s of warm-up, and the proxy's CPU per round trip (1 worker);
- bulk: the upstream sends BULK_MIB MiB down one tunnel (1 MiB WebSocket
  frames) to a client reading as fast as it can: MB/s and proxy CPU per GiB;
- back-pressure: the upstream sends FLOOD_MIB MiB down a tunnel whose client
  (64 KiB receive buffer) does not read for FLOOD_PAUSE s: the proxy's RSS
  growth meanwhile (peak, sampled every 0.1 s), then the client reads it all
  (the tunnel must still deliver every byte).

Echo and bulk run ``--repeats`` rounds, the proxies alternating, a fresh proxy
and upstream each round; the median is kept. Idle and back-pressure run once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

from gatewayd.http.server import PARSER_IDLE, SWEEP_INTERVAL

from ..context import Context
from ..procs import Proc, free_port, tree
from ..report import Table, median, ratio
from ..servers import ROUTE, Server, _repo, control, tunnel_proxy

PROXIES = ("gatewayd", "nginx")
IDLE = ((2, 10_000), (1, 9_000))  # (workers, tunnels)
IDLE_QUICK = ((2, 1_000),)
CLIENTS = 4  # idle: client processes, one source address each
BUSY = 1_000
BULK_MIB, BULK_MIB_QUICK = 1024, 256
FLOOD_MIB, FLOOD_PAUSE = 200, 5.0
SETTLE = PARSER_IDLE + SWEEP_INTERVAL + 1.0  # as the idle scenario: past gatewayd's parser drop
WAIT = 180.0  # longest wait for any client


def run(ctx: Context) -> list[Table]:
    proxies = [p for p in PROXIES if p in ctx.options.proxies]
    if not proxies:
        return []
    idle: dict[tuple[str, int], dict[str, Any]] = {}
    for workers, n in (IDLE_QUICK if ctx.options.quick else IDLE):
        for kind in proxies:
            ctx.say(f"tunnels: idle, {kind}, {workers} worker(s), {n:,} tunnels")
            idle[kind, workers] = _idle(ctx, kind, workers, n)
    echo: dict[str, list[dict[str, Any]]] = {k: [] for k in proxies}
    bulk: dict[str, list[dict[str, Any]]] = {k: [] for k in proxies}
    mib = BULK_MIB_QUICK if ctx.options.quick else BULK_MIB
    for rnd in range(ctx.options.repeats):
        for kind in proxies:
            ctx.say(f"tunnels: round {rnd + 1}/{ctx.options.repeats}, {kind}: echo and bulk")
            with _Setup(ctx, kind, 1) as (server, up):
                echo[kind].append(_client(ctx, server, "echo", "--tunnels", str(BUSY), "--seconds",
                                          str(ctx.options.duration), "--warmup", "1", "--peer", str(up.pid)))
                bulk[kind].append(_client(ctx, server, "bulk", "--mib", str(mib)))
    flood: dict[str, dict[str, Any]] = {}
    for kind in proxies:
        ctx.say(f"tunnels: back-pressure, {kind}")
        with _Setup(ctx, kind, 1) as (server, up):
            flood[kind] = _client(ctx, server, "flood", "--mib", str(FLOOD_MIB), "--pause", str(FLOOD_PAUSE))
            try:  # the upstream's first pause: what it got out before the proxy stopped reading it
                flood[kind]["upstream_paused_mib"] = _event(up, "paused", 1.0)["sent_mib"]
            except RuntimeError:
                flood[kind]["upstream_paused_mib"] = None
    tables = [_idle_table(idle), _echo_table(ctx, proxies, echo), _bulk_table(ctx, proxies, bulk, mib),
              _flood_table(proxies, flood)]
    ctx.figures["tunnels"] = {"idle": {f"{k}/{w}": v for (k, w), v in idle.items()}, "echo": echo,
                              "bulk": bulk, "flood": flood}
    return tables


# ----------------------------------------------------------------------------- processes
class _Setup:
    """A WebSocket upstream and the proxy ``kind`` with ``workers`` in front of it; both stopped on exit."""

    def __init__(self, ctx: Context, kind: str, workers: int) -> None:
        self.ctx, self.kind, self.workers = ctx, kind, workers
        self.up: Proc | None = None
        self.server: Server | None = None

    def __enter__(self) -> tuple[Server, Proc]:
        env = self.ctx.env
        port = free_port()
        self.up = _start(self.ctx, "ws-upstream", "upstream", "--port", str(port))
        self.up.wait_port(port)
        try:
            self.server = tunnel_proxy(env, self.kind, port, self.workers)
        except BaseException:
            env.procs.stop(self.up)
            raise
        return self.server, self.up

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.ctx.env.procs.stop(self.server.proc)
        if self.up is not None:
            self.ctx.env.procs.stop(self.up)


def _start(ctx: Context, name: str, mode: str, *args: str) -> Proc:
    env = ctx.env
    n = env.counter[name] = env.counter.get(name, 0) + 1  # a log of its own per process
    argv = [env.python, "-m", "bench.ws_peers", mode, *args]
    return env.procs.start(f"{name}-{n}", argv, env.load_cpu, cwd=_repo())


def _event(proc: Proc, event: str, timeout: float = WAIT) -> dict[str, Any]:
    """The first JSON line ``{"event": event, ...}`` the peer printed; raise if it died first or
    gave up (``{"event": "error"}``) or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = proc.log.read_text(errors="replace")
        except OSError:
            text = ""
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    got = json.loads(line)
                except ValueError:
                    continue
                if got.get("event") == event:
                    return dict(got)
                if got.get("event") == "error":
                    raise RuntimeError(f"{proc.name}: {got.get('why')}")
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited before {event!r}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: no {event!r} after {timeout:.0f} s:\n{proc.log_tail()}")
        time.sleep(0.05)


def _client(ctx: Context, server: Server, mode: str, *args: str) -> dict[str, Any]:
    """Run one client to its end; its result line, or ``{"error": why}``."""
    proc = _start(ctx, f"ws-{mode}", mode, "--port", str(server.port), "--watch", str(server.proc.pid), *args)
    try:
        return _event(proc, mode)
    except RuntimeError as exc:
        ctx.say(f"tunnels: {server.kind} {mode}: {exc}")
        return {"error": str(exc).splitlines()[0]}
    finally:
        ctx.env.procs.stop(proc)


# ----------------------------------------------------------------------------- idle
def _idle(ctx: Context, kind: str, workers: int, n: int) -> dict[str, Any]:
    with _Setup(ctx, kind, workers) as (server, _up):
        warm = _client(ctx, server, "echo", "--tunnels", "200", "--seconds", "1", "--warmup", "0.5")
        server.proc.wait_quiet()
        time.sleep(1.0)
        before = server.proc.usage().rss
        fds_before = _fds(server)
        clients = [_start(ctx, "ws-idle", "idle", "--port", str(server.port), "--tunnels",
                          str(n // CLIENTS + (1 if i < n % CLIENTS else 0)), "--source", f"127.0.0.{11 + i}",
                          "--hold", str(WAIT + 60))
                   for i in range(CLIENTS)]
        try:
            started = time.monotonic()
            ready = [_event(c, "ready") for c in clients]
            open_s = time.monotonic() - started
            time.sleep(SETTLE)
            after = server.proc.usage().rss
            fds_after = _fds(server)
            counted = _counted(server)
            for c in clients:
                c.signal(signal.SIGUSR1)
            checked = [_event(c, "checked", 60.0) for c in clients]
        except RuntimeError as exc:
            ctx.say(f"tunnels: idle {kind}: {exc}")
            return {"error": str(exc).splitlines()[0], "tunnels": n, "workers": workers}
        finally:
            for c in clients:
                ctx.env.procs.stop(c)
    opened = sum(r["opened"] for r in ready)
    failed: dict[str, int] = {}
    for r in ready:
        for why, count in r["failed"].items():
            failed[why] = failed.get(why, 0) + count
    return {"tunnels": n, "workers": workers, "opened": opened, "failed": failed,
            "alive": sum(c["alive"] for c in checked), "rss_before": before, "rss_after": after,
            "kib_per_tunnel": (after - before) / 1024 / opened if opened else float("nan"),
            "fds_per_tunnel": (fds_after - fds_before) / opened if opened else float("nan"),
            "open_seconds": open_s, "counted": counted, "warmup": warm}


def _counted(server: Server) -> int | None:
    """The open tunnels gatewayd's snapshot gives for the route (all workers summed); None for
    nginx, or if the snapshot has no such figure."""
    if server.kind != "gatewayd":
        return None
    try:
        answer = control(server.workdir / "gatewayd.sock", {"cmd": "snapshot"})
    except (OSError, ValueError):
        return None
    snap = answer.get("snapshot")
    routes = snap.get("routes", []) if isinstance(snap, dict) else []
    for r in routes:
        if isinstance(r, dict) and r.get("name") == ROUTE and isinstance(r.get("tunnels"), int):
            return int(r["tunnels"])
    return None


def _fds(server: Server) -> int:
    total = 0
    for pid in tree(server.proc.pid):
        try:
            total += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            pass
    return total


def _failures(failed: dict[str, int]) -> str:
    return "; ".join(f"{count:,} {why}" for why, count in sorted(failed.items(), key=lambda x: -x[1])) or "-"


def _idle_table(idle: dict[tuple[str, int], dict[str, Any]]) -> Table:
    table = Table("WebSocket tunnels, idle: the proxy's RSS per open tunnel (all its processes, both sockets)",
                  ["proxy", "workers", "tunnels asked", "opened", "counted by the proxy", "alive after",
                   "RSS before MiB",
                   "RSS after MiB", "KiB per tunnel", "vs nginx", "fds per tunnel", "failed upgrades"])
    for (kind, workers), r in idle.items():
        if "error" in r:
            table.add(kind, workers, r["tunnels"], None, None, None, None, None, None, None, None, r["error"])
            continue
        base = idle.get(("nginx", workers), {}).get("kib_per_tunnel")
        table.add(kind, workers, r["tunnels"], r["opened"], r["counted"], r["alive"], r["rss_before"] / 2**20,
                  r["rss_after"] / 2**20, r["kib_per_tunnel"], ratio(r["kib_per_tunnel"], base),
                  r["fds_per_tunnel"], _failures(r["failed"]))
    table.notes += [
        "Goal: gatewayd <= 8 KiB per idle tunnel (nginx measured 17.6 KiB).",
        f"RSS read after a warm-up (200 tunnels echoing 1 s, closed) and {SETTLE:g} s after the last "
        f"tunnel opened; {CLIENTS} client processes, source addresses 127.0.0.11-{10 + CLIENTS}. "
        "alive after: tunnels that echoed a frame once the RSS was read. counted by the proxy: "
        "gatewayd's snapshot, the route's tunnels (n/a: nginx has no such figure).",
    ]
    return table


# ----------------------------------------------------------------------------- echo, bulk, flood
def _ok(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that measured something (the client's echo runs: with tunnels opened)."""
    return [r for r in runs if "error" not in r and r.get("opened", 1)]


def _echo_table(ctx: Context, proxies: list[str], runs: dict[str, list[dict[str, Any]]]) -> Table:
    table = Table(f"WebSocket tunnels, echo: {BUSY:,} busy tunnels, one 64-byte frame in flight each, "
                  f"{ctx.options.duration:g} s (1 worker; median of {ctx.options.repeats})",
                  ["proxy", "round trips/s", "vs nginx", "CPU µs/round trip", "CPU vs nginx", "proxy CPU %",
                   "CPU wait %", "load CPU %", "tunnels opened", "closed during run", "failed upgrades"])
    med: dict[str, dict[str, float]] = {}
    for kind in proxies:
        ok = _ok(runs[kind])
        med[kind] = {
            "rps": median([r["round_trips"] / r["seconds"] for r in ok]),
            "cpu_us": median([r["cpu"] * 1e6 / r["round_trips"] for r in ok if r["round_trips"]]),
            "cpu_pct": median([100 * r["cpu"] / r["seconds"] for r in ok]),
            "load_pct": median([100 * r["load_cpu"] / r["seconds"] for r in ok]),
            "wait_pct": median([100 * r["waited"] / r["seconds"] for r in ok]),
        }
    base = med.get("nginx", {})
    for kind in proxies:
        ok = _ok(runs[kind])
        m = med[kind]
        failed: dict[str, int] = {}
        for r in runs[kind]:
            for why, count in r.get("failed", {}).items():
                failed[why] = failed.get(why, 0) + count
        errors = [r["error"] for r in runs[kind] if "error" in r]
        table.add(kind, m["rps"], ratio(m["rps"], base.get("rps")), m["cpu_us"],
                  ratio(m["cpu_us"], base.get("cpu_us")), m["cpu_pct"], m["wait_pct"], m["load_pct"],
                  min((r["opened"] for r in ok), default=None), sum(r["closed"] for r in ok),
                  "; ".join([_failures(failed), *errors]))
    table.notes.append("Goal: gatewayd >= 0.5 x nginx's round trips per second. The clients and the echo "
                       "upstream share the load CPU (load CPU %: theirs, of one core), which bounds the rate "
                       "when it nears 100: CPU per round trip is then the figure to compare.")
    ctx.figures["tunnels_echo"] = med
    return table


def _bulk_table(ctx: Context, proxies: list[str], runs: dict[str, list[dict[str, Any]]], mib: int) -> Table:
    table = Table(f"WebSocket tunnels, bulk: {mib:,} MiB down one tunnel to a client reading as fast as it "
                  f"can (1 worker; median of {ctx.options.repeats})",
                  ["proxy", "MB/s", "vs nginx", "proxy CPU s per GiB", "proxy CPU %", "CPU wait %",
                   "client CPU %", "bytes complete", "errors"])
    med: dict[str, dict[str, float]] = {}
    for kind in proxies:
        ok = _ok(runs[kind])
        med[kind] = {
            "mbs": median([r["bytes"] / r["seconds"] / 1e6 for r in ok if r["seconds"]]),
            "cpu_gib": median([r["cpu"] / (r["bytes"] / 2**30) for r in ok if r["bytes"]]),
            "cpu_pct": median([100 * r["cpu"] / r["seconds"] for r in ok if r["seconds"]]),
            "wait_pct": median([100 * r["waited"] / r["seconds"] for r in ok if r["seconds"]]),
            "client_pct": median([100 * r["client_cpu"] / r["seconds"] for r in ok if r["seconds"]]),
        }
    base = med.get("nginx", {})
    for kind in proxies:
        m = med[kind]
        ok = _ok(runs[kind])
        complete = bool(ok) and all(r["bytes"] >= r["wanted"] for r in ok)
        table.add(kind, m["mbs"], ratio(m["mbs"], base.get("mbs")), m["cpu_gib"], m["cpu_pct"], m["wait_pct"],
                  m["client_pct"], complete,
                  "; ".join(r["error"] for r in runs[kind] if "error" in r) or "-")
    return table


def _flood_table(proxies: list[str], runs: dict[str, dict[str, Any]]) -> Table:
    table = Table(f"WebSocket tunnels, back-pressure: {FLOOD_MIB} MiB sent down a tunnel whose client does not "
                  f"read for {FLOOD_PAUSE:g} s (1 worker)",
                  ["proxy", "upstream held back after MiB", "RSS growth, peak KiB", "RSS growth at the end KiB",
                   "MiB read after", "seconds to read", "errors"])
    for kind in proxies:
        r = runs[kind]
        if "error" in r:
            table.add(kind, None, None, None, None, None, r["error"])
            continue
        table.add(kind, r.get("upstream_paused_mib"), r["peak_growth"] // 1024, r["held_growth"] // 1024,
                  r["read_after"] / 2**20, r["read_seconds"], "-")
    table.notes.append("Bounded if the growth stays far below the flood (a few write buffers, not "
                       f"{FLOOD_MIB} MiB); the client's receive buffer is 64 KiB. MiB read after: every "
                       "byte must still arrive once it reads. upstream held back after: the MiB the upstream had "
                       "written when its transport first paused (n/a: it never paused, the proxy took it all).")
    return table
