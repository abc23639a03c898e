"""Fairness: one abusive client against twenty polite ones on a route of 20 slots.

The upstream (bench/upstream.py) answers in 50 ms with 20 workers: capacity
400 req/s. One abusive client (127.0.0.2) keeps 400 connections busy in a
closed loop (each sends its next request the moment the last is answered,
refused or not; a closed connection is opened again at once). Twenty polite
clients (127.0.0.10 to .29), one connection each, send one request at a time
with a 100 ms pause after each answer: about 130 req/s between them, a third
of the capacity. The abuser runs in a process of its own, so its load does not
delay the polite clients' clocks.

Proxies, each tuned as its documentation advises for a per-client limit:

- gatewayd fifo: max_concurrency = 20, max_queue = 200, queue_timeout = 1 (as
  before this issue);
- gatewayd fair: the same with queue_order = "fair" and max_queue_per_client =
  100;
- nginx: limit_req per $binary_remote_addr (rate 20r/s, burst 40 nodelay) and
  limit_conn 20 per address, both answered 429; proxy_pass to the same upstream
  (no queue of its own: the upstream's workers queue);
- HAProxy: a stick table tracking each source's conn_cur and http_req_rate(10s),
  connections over 20 rejected, over 200 requests in 10 s denied 429; server
  maxconn 20 and timeout queue 1s.

Figures over the steady part (the first 2 s left out): the polite clients'
success (2xx) rate and latency, and what the abuser got: the capacity nobody
else wants goes to it in a work-conserving proxy.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection

from ..aio import run as run_async
from ..client import Conn, ConnectionClosed
from ..context import Context
from ..deps import tool
from ..procs import free_port
from ..report import Table, median_rows, percentile
from ..servers import ROUTE, Env, Server, _nginx_main, _repo, _start_nginx, gatewayd_head, python_upstream

DELAY = 0.05
SLOTS = 20
CAPACITY = SLOTS / DELAY
ABUSER = "127.0.0.2"
ABUSER_CONNECTIONS = 400
POLITE = tuple(f"127.0.0.{n}" for n in range(10, 30))
THINK = 0.1  # a polite client's pause between an answer and its next request
CLIENT_TIMEOUT = 5.0
WARM = 2.0
VARIANTS = ("gatewayd fifo", "gatewayd fair", "nginx", "haproxy")


def run(ctx: Context) -> list[Table]:
    variants = [v for v in VARIANTS if v.split()[0] in ctx.options.proxies]
    seconds = 6.0 if ctx.options.quick else 12.0
    rounds = ctx.options.repeats
    table = Table(
        f"Fairness: one client with {ABUSER_CONNECTIONS} connections in a closed loop, "
        f"{len(POLITE)} polite clients (one request at a time, {THINK * 1000:.0f} ms pause), "
        f"a route of {SLOTS} slots on a {DELAY * 1000:.0f} ms upstream ({CAPACITY:.0f} req/s); "
        f"{seconds:g} s, median of {rounds}",
        ["proxy", "polite requests", "polite success %", "polite p50 ms", "polite p99 ms",
         "polite p99 ms (all answers)", "abuser 2xx req/s", "abuser refused req/s",
         "2xx % of capacity", "proxy CPU %"],
    )
    rows: dict[str, list[list[object]]] = {v: [] for v in variants}
    for rnd in range(rounds):
        for variant in variants:
            ctx.say(f"fairness: round {rnd + 1}/{rounds}, {variant}")
            with _setup(ctx.env, variant) as server:
                rows[variant].append(_measure(variant, server, seconds))
    for variant in variants:
        table.add(*median_rows(rows[variant]))
    table.notes += [
        "polite success: 2xx answers of all the polite requests sent in the steady part "
        f"(a request unanswered within {CLIENT_TIMEOUT:g} s, refused or reset counts as a failure); "
        "p50/p99 over the 2xx, and over every answer. abuser refused: its non-2xx answers and "
        "connection errors per second (it asks again at once).",
        "gatewayd fair: queue_order = \"fair\", max_queue_per_client = 100 (max_queue 200). "
        "nginx: limit_req rate=20r/s burst=40 nodelay, limit_conn 20 (per $binary_remote_addr, "
        "429). HAProxy: stick-table conn_cur and http_req_rate(10s) per src, reject over 20 "
        "connections, deny 429 over 200 requests in 10 s; maxconn 20, timeout queue 1s.",
        "Goal (issue 21): polite success >= 95 % and p99 < 1 s with gatewayd fair, the abuser "
        "still served the spare capacity.",
    ]
    return [table]


def _measure(variant: str, server: Server, seconds: float) -> list[object]:
    parent, child = multiprocessing.Pipe()
    abuser = multiprocessing.Process(target=_abuser_main, args=(server.port, seconds, child), daemon=True)
    before = server.proc.usage()
    t0 = time.perf_counter()
    abuser.start()
    try:
        samples = run_async(_polite(server.port, seconds))
        abused: tuple[int, int] = parent.recv() if parent.poll(CLIENT_TIMEOUT + 10) else (0, 0)
    finally:
        abuser.join(5)
        if abuser.is_alive():
            abuser.kill()
    wall = time.perf_counter() - t0
    used = server.proc.usage() - before
    span = seconds - WARM
    steady = [s for s in samples if s[0] >= WARM]
    ok = [lat * 1000 for _, status, lat in steady if status == 200]
    answered = [lat * 1000 for _, status, lat in steady if status > 0]
    abuser_ok, abuser_refused = abused
    return [variant, len(steady), 100 * len(ok) / len(steady) if steady else None,
            percentile(ok, 50), percentile(ok, 99), percentile(answered, 99),
            abuser_ok / span, abuser_refused / span,
            100 * (len(ok) + abuser_ok) / span / CAPACITY, 100 * used.cpu / wall]


async def _open(port: int, source: str) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(Conn, "127.0.0.1", port, local_addr=(source, 0))
    return conn


async def _polite(port: int, seconds: float) -> list[tuple[float, int, float]]:
    """Every polite client's requests: (start from t0, status or 0 for a failure, latency)."""
    samples: list[tuple[float, int, float]] = []
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    end = t0 + seconds

    async def client(source: str) -> None:
        conn: Conn | None = None
        while loop.time() < end:
            start = loop.time()
            status = 0
            try:
                if conn is None or conn.closed:
                    conn = await _open(port, source)
                response = await asyncio.wait_for(conn.request(f"/{ROUTE}".encode()), CLIENT_TIMEOUT)
                status = response.status
            except (OSError, ConnectionClosed, TimeoutError):
                if conn is not None:
                    conn.abort()
                conn = None
            samples.append((start - t0, status, loop.time() - start))
            await asyncio.sleep(THINK)
        if conn is not None:
            conn.close()

    await asyncio.gather(*(client(source) for source in POLITE))
    return samples


def _abuser_main(port: int, seconds: float, out: Connection) -> None:
    out.send(run_async(_abuse(port, seconds)))


async def _abuse(port: int, seconds: float) -> tuple[int, int]:
    """ABUSER_CONNECTIONS closed loops from one address; (2xx, refused) counted in the
    steady part."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    end = t0 + seconds
    counts = [0, 0]

    async def one() -> None:
        conn: Conn | None = None
        while loop.time() < end:
            ok = False
            try:
                if conn is None or conn.closed:
                    conn = await _open(port, ABUSER)
                response = await asyncio.wait_for(conn.request(f"/{ROUTE}".encode()), CLIENT_TIMEOUT)
                ok = response.status == 200
            except (OSError, ConnectionClosed, TimeoutError):
                if conn is not None:
                    conn.abort()
                conn = None
                await asyncio.sleep(0.001)  # (a refused connect: not a spin of the event loop)
            if loop.time() - t0 >= WARM:
                counts[0 if ok else 1] += 1
        if conn is not None:
            conn.close()

    await asyncio.gather(*(one() for _ in range(ABUSER_CONNECTIONS)))
    return counts[0], counts[1]


# ----------------------------------------------------------------------------- the proxies
@contextmanager
def _setup(env: Env, variant: str) -> Iterator[Server]:
    up = python_upstream(env, DELAY, SLOTS)
    try:
        if variant.startswith("gatewayd"):
            server = _gatewayd(env, up.port, fair=variant == "gatewayd fair")
        elif variant == "nginx":
            server = _nginx(env, up.port)
        else:
            server = _haproxy(env, up.port)
        try:
            yield server
        finally:
            env.procs.stop(server.proc)
    finally:
        env.procs.stop(up.proc)


def _gatewayd(env: Env, upstream_port: int, fair: bool) -> Server:
    d = env.folder("gatewayd")
    port = free_port()
    conf = d / "gatewayd.toml"
    policy = 'queue_order = "fair"\nmax_queue_per_client = 100\n' if fair else ""
    conf.write_text(gatewayd_head(port, upstream_port, d / "gatewayd.sock") + textwrap.dedent(f"""
        [[routes]]
        name = "{ROUTE}"
        path_prefix = "/"
        upstream = "up"
        max_concurrency = {SLOTS}
        max_queue = 200
        queue_timeout = 1.0
    """) + policy)
    proc = env.procs.start("gatewayd", [env.python, "-m", "gatewayd", "--config", str(conf)],
                           env.proxy_cpu, cwd=_repo())
    proc.wait_port(port)
    return Server("gatewayd", proc, port, conf, d)


def _nginx(env: Env, upstream_port: int) -> Server:
    d = env.folder("nginx")
    port = free_port()
    conf = _nginx_main(d, f"""
        limit_req_zone $binary_remote_addr zone=perip:10m rate=20r/s;
        limit_conn_zone $binary_remote_addr zone=addr:10m;
        upstream up {{
            server 127.0.0.1:{upstream_port};
            keepalive 256;
            keepalive_requests 1000000;
        }}
        server {{
            listen 127.0.0.1:{port} backlog=4096;
            keepalive_requests 1000000;
            keepalive_timeout 75s;
            location / {{
                limit_req zone=perip burst=40 nodelay;
                limit_req_status 429;
                limit_conn addr 20;
                limit_conn_status 429;
                proxy_pass http://up;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }}
        }}
    """)
    return _start_nginx(env, "nginx", d, conf, port, env.proxy_cpu)


def _haproxy(env: Env, upstream_port: int) -> Server:
    d = env.folder("haproxy")
    port = free_port()
    conf = d / "haproxy.cfg"
    conf.write_text(textwrap.dedent(f"""\
        global
            nbthread 1
            maxconn 9000
            pidfile {d}/haproxy.pid
            log stderr format short local0 warning

        defaults
            mode http
            option http-keep-alive
            timeout connect 2s
            timeout client 75s
            timeout server 30s
            timeout http-keep-alive 75s
            timeout http-request 10s
            timeout queue 1s

        frontend fe
            bind 127.0.0.1:{port}
            stick-table type ip size 100k expire 30s store conn_cur,http_req_rate(10s)
            tcp-request connection track-sc0 src
            tcp-request connection reject if {{ sc_conn_cur(0) gt 20 }}
            http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt 200 }}
            default_backend be

        backend be
            http-reuse always
            server s1 127.0.0.1:{upstream_port} maxconn {SLOTS}
    """))
    proc = env.procs.start("haproxy", [tool("haproxy"), "-db", "-f", str(conf)], env.proxy_cpu)
    proc.wait_port(port)
    return Server("haproxy", proc, port, conf, d)
