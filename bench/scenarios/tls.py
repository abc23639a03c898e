"""TLS termination: each proxy terminates TLS (the same ECDSA P-256 certificate,
made at bench time; TLS 1.2 and 1.3, session tickets on) in front of the same
nginx upstream as the throughput scenario, one core each, the load on the other.

- keep-alive: ``wrk`` over HTTPS at 50 connections (one handshake per
  connection, then requests): req/s and the proxy's CPU per request;
- new connections: ``hey -disable-keepalive`` over HTTPS at 50 workers: every
  request on a new connection with a full handshake (hey keeps no TLS
  sessions; wrk with ``Connection: close`` would resume its session on every
  reconnection, an abbreviated handshake). The load generator's own handshake
  work (its ECDSA verify costs more than the proxy's sign) can make it, not
  the proxy, the limit on one core: the table gives the proxy's CPU per
  connection and its capacity (1 s / that CPU) beside the rate achieved;
- idle: RSS per TLS keep-alive connection held after a handshake and one
  request (as the idle scenario, over TLS);
- overload: ``wrk -c2000`` over HTTPS at the overload scenario's backend
  (1,000 req/s capacity) and limits: goodput as a share of capacity, over the
  whole run and steady (the backend's own count from 2 s in, after the
  handshakes).
"""

from __future__ import annotations

import re
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .. import certs
from ..aio import run as run_async
from ..context import Context, Measured
from ..deps import tool
from ..procs import pinned
from ..report import Table, median, median_rows, ratio
from ..servers import Server, python_upstream, served_rate, start_proxy
from ..wrk import WrkResult
from . import idle, overload

TOOLS = ("hey",)

PROXIES = ("gatewayd", "nginx", "haproxy")
KEEPALIVE = 50
NEW = 50
OVERLOAD_SKIP = 2.0  # seconds of the overload run left out of the steady goodput (the handshakes)
REPORT = 0.25  # the overload backend logs its served count this often


def client_context() -> ssl.SSLContext:
    """The harness's own TLS client: no verification (the certificate is made for the run)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def run(ctx: Context) -> list[Table]:
    proxies = [p for p in PROXIES if p in ctx.options.proxies]
    pem = certs.make(ctx.env.tmp / "tls", "ecdsa")
    upstream = ctx.upstream()
    keep: dict[str, list[Measured]] = {k: [] for k in proxies}
    new: dict[str, list[Measured]] = {k: [] for k in proxies}
    for rnd in range(ctx.options.repeats):
        for kind in proxies:
            ctx.say(f"tls: round {rnd + 1}/{ctx.options.repeats}, {kind}")
            server = start_proxy(ctx.env, kind, upstream.port, tls=pem)
            try:
                ctx.warm(server, KEEPALIVE)
                keep[kind].append(ctx.measure(server, KEEPALIVE))
                new[kind].append(_new_connections(ctx, server, ctx.options.duration))
            finally:
                ctx.env.procs.stop(server.proc)
    tables = [_keepalive_table(ctx, proxies, keep), _new_table(ctx, proxies, new),
              _idle_table(ctx, proxies, pem), _overload_table(ctx, proxies, pem)]
    return tables


def _keepalive_table(ctx: Context, proxies: list[str], runs: dict[str, list[Measured]]) -> Table:
    table = Table(
        f"TLS keep-alive: wrk over HTTPS, {KEEPALIVE} connections (proxy on 1 core; median of "
        f"{ctx.options.repeats})",
        ["proxy", "req/s", "req/s vs nginx", "p50 ms", "p99 ms", "errors", "CPU µs/req", "CPU vs nginx",
         "proxy CPU %", "CPU wait %"])
    med = {k: _medians(runs[k]) for k in proxies}
    base = med.get("nginx", {})
    for kind in proxies:
        m = med[kind]
        table.add(kind, m["rps"], ratio(m["rps"], base.get("rps")), m["p50"], m["p99"], int(m["errors"]),
                  m["cpu_us"], ratio(m["cpu_us"], base.get("cpu_us")), m["cpu_pct"], m["wait_pct"])
    table.notes.append("Goal: gatewayd >= 0.6 x nginx's req/s. ECDSA P-256 certificate; each connection's "
                       "one handshake is in the figures (wrk opens its connections once).")
    ctx.figures["tls_keepalive"] = med
    return table


def _new_table(ctx: Context, proxies: list[str], runs: dict[str, list[Measured]]) -> Table:
    table = Table(
        f"TLS new connections: hey -disable-keepalive over HTTPS, {NEW} workers, one request and a full "
        f"handshake per connection (median of {ctx.options.repeats})",
        ["proxy", "connections/s", "vs nginx", "p99 ms", "errors", "CPU µs/connection", "capacity/s",
         "capacity vs nginx", "proxy CPU %", "CPU wait %"])
    med = {k: _medians(runs[k]) for k in proxies}
    for m in med.values():
        m["capacity"] = 1e6 / m["cpu_us"] if m["cpu_us"] else float("nan")
    base = med.get("nginx", {})
    for kind in proxies:
        m = med[kind]
        table.add(kind, m["rps"], ratio(m["rps"], base.get("rps")), m["p99"], int(m["errors"]), m["cpu_us"],
                  m["capacity"], ratio(m["capacity"], base.get("capacity")), m["cpu_pct"], m["wait_pct"])
    table.notes += [
        "Goal: gatewayd >= 0.7 x nginx's new TLS connections per second.",
        "capacity/s: 1 s divided by the proxy's CPU per connection (handshake, request, proxying, "
        "close): the rate the proxy would reach on a whole core. When proxy CPU % is well under 100 "
        "the load generator (one core: its own handshakes and the upstream) was the limit, and the "
        "capacity ratio is the figure to read.",
    ]
    ctx.figures["tls_new"] = med
    return table


def _idle_table(ctx: Context, proxies: list[str], pem: certs.Pem) -> Table:
    n = ctx.options.idle_connections
    upstream = ctx.upstream()
    table = Table(f"Idle TLS keep-alive connections: RSS for {n:,} connections held after a handshake and one "
                  "request each",
                  ["proxy", "connections held", "RSS before MiB", "RSS after MiB", "KiB per connection",
                   "vs nginx"])
    rows: list[tuple[str, int, float, float, float]] = []
    for kind in proxies:
        ctx.say(f"tls: idle, {kind}")
        server = start_proxy(ctx.env, kind, upstream.port, tls=pem)
        try:
            ctx.wrk(server, KEEPALIVE, 1.0)
            _hey(ctx, server, 1.0)
            before = server.proc.usage().rss
            held, after = run_async(idle._hold(server, n, client_context()))
        finally:
            ctx.env.procs.stop(server.proc)
        rows.append((kind, held, before / 2**20, after / 2**20, (after - before) / 1024 / held if held else
                     float("nan")))
    base = next((r[4] for r in rows if r[0] == "nginx"), None)
    for kind, held, mib_before, mib_after, kib in rows:
        table.add(kind, held, mib_before, mib_after, kib, ratio(kib, base))
    table.notes.append("Goal: <= 16 KiB per idle TLS keep-alive connection (gatewayd). Kernel socket buffers "
                       "are in no process's RSS and are not counted.")
    ctx.figures["tls_idle"] = {r[0]: r[4] for r in rows}
    return table


def _overload_table(ctx: Context, proxies: list[str], pem: certs.Pem) -> Table:
    kinds = [k for k in proxies if k in overload.PROXIES]
    seconds = ctx.options.overload_duration
    table = Table(
        f"TLS overload, closed loop: wrk -c2000 over HTTPS for {seconds:g} s, backend of "
        f"{overload.CAPACITY:,.0f} req/s, the overload scenario's limits; median of {ctx.options.repeats}",
        ["proxy", "responses/s", "2xx req/s", "goodput % of capacity", "steady goodput %", "non-2xx/s",
         "p50 ms (all)", "p99 ms (all)", "socket errors", "CPU µs/response", "proxy CPU %", "CPU wait %"])
    rows: dict[str, list[list[object]]] = {k: [] for k in kinds}
    skip = min(OVERLOAD_SKIP, seconds / 4)
    for rnd in range(ctx.options.repeats):
        for kind in kinds:
            ctx.say(f"tls: overload round {rnd + 1}/{ctx.options.repeats}, {kind}")
            with _overload_setup(ctx, kind, pem) as (server, up):
                started = time.monotonic()
                m = ctx.measure(server, 2000, seconds, timeout=5.0)
                steady = served_rate(up, started + skip, time.monotonic())
            r = m.result
            rows[kind].append([
                kind, r.rps, r.ok / r.seconds, 100 * r.ok / r.seconds / overload.CAPACITY,
                100 * steady / overload.CAPACITY, r.non_2xx / r.seconds, r.p50_ms, r.p99_ms, r.socket_errors,
                m.cpu_us_per_request, m.cpu_share, m.wait_share])
    for kind in kinds:
        table.add(*median_rows(rows[kind]))
    table.notes += [
        "Goal: goodput >= 95 % of capacity, as in clear text. wrk opens its 2,000 connections at the "
        "start, each with a full handshake, which take the proxy's core for the first second or so: "
        "goodput over the whole run counts that ramp.",
        f"steady goodput: requests the backend served per second from {skip:g} s after the start to the "
        f"end (its own count, logged every {REPORT:g} s), as a share of its capacity; wrk timeout 5 s.",
    ]
    return table


def _new_connections(ctx: Context, server: Server, seconds: float) -> Measured:
    """hey against ``server`` for ``seconds``, a new TLS connection per request, with the
    server's CPU time read from /proc around it."""
    before = server.proc.usage()
    result = _hey(ctx, server, seconds)
    used = server.proc.usage() - before
    return Measured(result, used.cpu, used.waited)


def _hey(ctx: Context, server: Server, seconds: float) -> WrkResult:
    argv = [tool("hey"), "-z", f"{max(1, round(seconds))}s", "-c", str(NEW), "-cpus", "1", "-t", "5",
            "-disable-keepalive", f"{server.scheme}://127.0.0.1:{server.port}/"]
    done = subprocess.run(pinned(ctx.env.load_cpu, argv), capture_output=True, text=True, timeout=seconds + 60,
                          check=False)
    return parse_hey(done.stdout)


def parse_hey(out: str) -> WrkResult:
    """hey's summary as a WrkResult: responses by status, errors, latency percentiles."""
    total = re.search(r"^\s*Total:\s+([\d.]+) secs", out, re.MULTILINE)
    if total is None:
        raise ValueError(f"no hey summary in output:\n{out[-2000:]}")
    statuses = {int(code): int(n) for code, n in re.findall(r"^\s*\[(\d{3})\]\s+(\d+) responses", out,
                                                           re.MULTILINE)}
    errors = sum(int(n) for n in re.findall(r"^\s*\[(\d+)\]\s+Get ", out, re.MULTILINE))

    def pct(q: int) -> float:
        found = re.search(rf"^\s*{q}% in ([\d.]+) secs", out, re.MULTILINE)
        return float(found.group(1)) * 1000 if found else float("nan")

    answered = sum(statuses.values())
    return WrkResult(requests=answered, seconds=float(total.group(1)), p50_ms=pct(50), p90_ms=pct(90),
                     p99_ms=pct(99), max_ms=float("nan"), socket_errors=errors,
                     non_2xx=sum(n for code, n in statuses.items() if code >= 400))


@contextmanager
def _overload_setup(ctx: Context, kind: str, pem: certs.Pem) -> Iterator[tuple[Server, Server]]:
    up = python_upstream(ctx.env, overload.DELAY, overload.SLOTS, report=REPORT)
    try:
        proxy = start_proxy(ctx.env, kind, up.port, overload.LIMITS, tls=pem)
        try:
            yield proxy, up
        finally:
            ctx.env.procs.stop(proxy.proc)
    finally:
        ctx.env.procs.stop(up.proc)


def _medians(runs: list[Measured]) -> dict[str, float]:
    return {
        "rps": median([r.result.rps for r in runs]),
        "p50": median([r.result.p50_ms for r in runs]),
        "p99": median([r.result.p99_ms for r in runs]),
        "errors": median([r.result.errors for r in runs]),
        "cpu_us": median([r.cpu_us_per_request for r in runs]),
        "cpu_pct": median([r.cpu_share for r in runs]),
        "wait_pct": median([r.wait_share for r in runs]),
    }
