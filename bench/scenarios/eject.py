"""Ejection by a client (issue 17, item 3): can a client take an upstream out of
rotation with what it sends?

The upstream is nginx with the usual ``location /old/ { return 301
https://$host$request_uri; }``: a path of ``/old/`` + 8,160 x ``a`` makes its
Location line over 8,190 bytes, which both proxies refuse with a 502. The
attacker sends three such requests at once at the start and again every
ATTACK_EVERY seconds (gatewayd's default max_fails is 3, fail_timeout 10 s);
meanwhile LEGIT keep-alive clients each send ``GET /`` every PACE seconds, a
modest site's traffic (a busy one interleaves successes, which reset a run of
failures; the attacker then sends a few more at once). A proxy that counts the
502 against its only server answers the legitimate clients ``502
no_healthy_server`` from the first three attack requests on; nginx never marks
a lone server down.
"""

from __future__ import annotations

import asyncio
import time

from ..aio import run as run_async
from ..client import Conn
from ..context import Context
from ..procs import free_port
from ..report import Table, median_rows, percentile
from ..servers import Env, Server, _nginx_main, _start_nginx, control, start_proxy

LONG = b"/old/" + b"a" * 8160
ATTACK_EVERY = 10.0
LEGIT = 4  # keep-alive clients, one request at a time each
PACE = 0.08  # seconds from one legitimate request to the next, per client: 50 requests/s in all
PROXIES = ("gatewayd", "nginx")


def redirect_upstream(env: Env) -> Server:
    """nginx as the application: 301 to https for /old/..., 200 for anything else."""
    d = env.folder("upstream-redirect")
    port = free_port()
    conf = _nginx_main(d, f"""
        server {{
            listen 127.0.0.1:{port};
            keepalive_requests 1000000;
            location /old/ {{ return 301 https://$host$request_uri; }}
            location / {{ default_type text/plain; return 200 "ok\\n"; }}
        }}
    """)
    return _start_nginx(env, "upstream-redirect", d, conf, port, env.load_cpu)


def run(ctx: Context) -> list[Table]:
    proxies = [p for p in PROXIES if p in ctx.options.proxies]
    seconds = 6.0 if ctx.options.quick else 2 * ATTACK_EVERY + 2
    upstream = redirect_upstream(ctx.env)
    table = Table(
        f"Ejection by a client: 3 requests at once with an 8,165-byte path every {ATTACK_EVERY:g} s, "
        f"{LEGIT} keep-alive clients sending GET / every {PACE * 1000:g} ms for {seconds:g} s; "
        f"median of {ctx.options.repeats}",
        ["proxy", "attack answers", "legit requests", "legit errors", "legit errors %",
         "legit p99 ms", "no_healthy_server"],
    )
    rows: dict[str, list[list[object]]] = {k: [] for k in proxies}
    try:
        for rnd in range(ctx.options.repeats):
            for kind in proxies:
                ctx.say(f"eject: round {rnd + 1}/{ctx.options.repeats}, {kind}")
                server = start_proxy(ctx.env, kind, upstream.port)
                try:
                    attack, ok, errors, lat = run_async(_measure(server.port, seconds))
                    no_healthy = None
                    if kind == "gatewayd":
                        snap = control(server.workdir / "gatewayd.sock", {"cmd": "snapshot"})
                        no_healthy = snap["snapshot"]["upstreams"][0]["no_healthy_server"]  # type: ignore[index]
                finally:
                    ctx.env.procs.stop(server.proc)
                total = ok + errors
                answers = ", ".join(f"{s} x{n}" for s, n in sorted(attack.items()))
                rows[kind].append([kind, answers, total, errors, 100 * errors / total if total else None,
                                   percentile(lat, 99), no_healthy])
    finally:
        ctx.env.procs.stop(upstream.proc)
    for r in rows.values():
        table.add(*median_rows(r))
    table.notes += [
        "attack answers: the statuses the attack requests got (the 502 for the oversized "
        "response is right); legit errors: anything but 200, or no answer within 2 s.",
        "no_healthy_server: gatewayd's snapshot counter (nginx has no such answer).",
    ]
    return [table]


async def _measure(port: int, seconds: float) -> tuple[dict[int, int], int, int, list[float]]:
    stop = time.monotonic() + seconds
    attack: dict[int, int] = {}
    lat: list[float] = []
    counts = [0, 0]  # ok, errors

    async def attacker() -> None:
        while True:
            for status in await asyncio.gather(*(_one(port, LONG) for _ in range(3))):
                attack[status] = attack.get(status, 0) + 1
            left = stop - time.monotonic()
            if left <= ATTACK_EVERY:
                return
            await asyncio.sleep(ATTACK_EVERY)

    async def client() -> None:
        conn = await Conn.open(port)
        try:
            while time.monotonic() < stop:
                t = time.perf_counter()
                try:
                    resp = await asyncio.wait_for(conn.request(b"/"), 2.0)
                except Exception:  # a timeout, a reset, a close: an error either way
                    counts[1] += 1
                    conn.abort()
                    conn = await Conn.open(port)
                    continue
                lat.append((time.perf_counter() - t) * 1000)
                counts[0 if resp.status == 200 else 1] += 1
                if not resp.keep_alive:
                    conn.close()
                    conn = await Conn.open(port)
                await asyncio.sleep(max(0.0, PACE - (time.perf_counter() - t)))
        finally:
            conn.close()

    await asyncio.gather(attacker(), *(client() for _ in range(LEGIT)))
    return attack, counts[0], counts[1], lat


async def _one(port: int, path: bytes) -> int:
    """One request on its own connection; its status (0: none within 5 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n" % path)
        async with asyncio.timeout(5):
            line = await reader.readline()
        parts = line.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    except (TimeoutError, ConnectionError):
        return 0
    finally:
        writer.close()
