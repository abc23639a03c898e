"""Memory per held client connection, gatewayd's side only.

    python -m bench.conn_memory [--connections 10000] [--request [--body 100]] [--tls] [--batches 1]

A Runtime runs in this process (one route to ``sized``, an in-process handler
that answers at once with ``--body`` bytes, 100 by default); a
child process opens the connections (and, with ``--request``, sends one request
on each and reads its answer), then holds them; with ``--tls`` the listener
terminates TLS (an ECDSA P-256 certificate made for the run) and every
connection completes a handshake first. Reported: RSS growth per
connection, and the Python objects each connection added (by type), so a
change in the protocol's footprint shows where it comes from; twice: half a
second after the last connection is held, and again once every connection has
been idle past PARSER_IDLE and the server's sweep has dropped its HTTP parser.
Memory freed by the sweep stays in the process's RSS (CPython's small-object
arenas, glibc's heap) while other live objects share its pages; with
``--batches 2`` a second batch opened after the sweep reuses it, and its growth
is what one more idle connection costs a server whose idle connections are
swept.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import socket
import subprocess
import sys
import tempfile
from typing import NamedTuple

from aiohttp import web

from gatewayd.config.loader import parse
from gatewayd.http.server import PARSER_IDLE, SWEEP_INTERVAL
from gatewayd.process.single import new_loop
from gatewayd.runtime.state import Runtime

from .tls_memory import malloc_in_use

SETTLE = PARSER_IDLE + SWEEP_INTERVAL + 1.0  # past the idle time after which the sweep drops a parser

CLIENT = r"""
import socket, ssl, sys
port, n, send, tls, body = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1", int(sys.argv[5])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    if tls:
        s = ctx.wrap_socket(s, server_hostname="localhost")
    if send:
        s.sendall(b"GET /?ms=0&size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % body)
    socks.append(s)
for s in socks:
    got = b""
    while send and (b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + body):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
print("ready", flush=True)
sys.stdin.readline()
"""


def rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def sized(request: web.BaseRequest) -> web.StreamResponse:
    """The handler conn_memory's route uses: ``?size=N`` bytes of body (default 100), at once."""
    size = request.query.get("size", "100")
    return web.Response(body=b"x" * min(int(size) if size.isdigit() else 100, 1 << 24),
                        content_type="text/plain")


async def measure(connections: int, request: bool, tls: bool = False, body: int = 100, batches: int = 1) -> None:
    folder = tempfile.mkdtemp(prefix="gatewayd-connmem-")
    port = free_port()
    listen = f'{{address = "127.0.0.1:{port}", tls = true}}' if tls else f'"127.0.0.1:{port}"'
    tls_table = ""
    if tls:
        from pathlib import Path

        from . import certs
        pem = certs.make(Path(folder), "ecdsa")
        tls_table = f"""
[tls]
min_version = "1.2"
session_tickets = true
[[tls.certificates]]
cert = "{pem.cert}"
key = "{pem.key}"
"""
    text = f"""
[server]
listen = [{listen}]
max_connections = {connections * batches + 100}
[control]
socket = "{folder}/gw.sock"
[log]
access_log = "off"
[upstreams.h]
handler = "bench.conn_memory:sized"
[[routes]]
name = "r"
path_prefix = "/"
upstream = "h"
""" + tls_table
    runtime = Runtime(parse(text, "conn_memory.toml"))
    await runtime.start()
    procs: list[asyncio.subprocess.Process] = []
    samples: list[tuple[str, Sample]] = []
    try:
        gc.collect()
        start = sample()
        for batch in range(1, batches + 1):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLIENT, str(port), str(connections), "1" if request else "0",
                "1" if tls else "0", str(body), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            procs.append(proc)
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            if not line.startswith(b"ready"):
                raise SystemExit("the client process failed")
            async with asyncio.timeout(30):
                while runtime.connections < connections * batch:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            samples.append((f"batch {batch}, 0.5 s after its last connection", sample()))
            await asyncio.sleep(SETTLE)  # every parser dropped by the sweep
            samples.append((f"batch {batch}, {SETTLE:g} s later, past the parser sweep", sample()))
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"\n")
            await proc.stdin.drain()
            await proc.wait()
        await runtime.shutdown(1.0)
    print(f"connections held: {connections} per batch{' over TLS' if tls else ''}"
          f"{f' (one request each, a {body:,}-byte answer)' if request else ''}")
    base = start
    for when, now in samples:
        print(f"{when} (growth since {'the start' if base is start else 'the previous batch was swept'}):")
        print(f"  RSS growth: {(now.rss - base.rss) / connections:.2f} KiB per connection")
        print(f"  malloc growth: {(now.malloc - base.malloc) / 1024 / connections:.2f} KiB per connection "
              "(C allocations: OpenSSL, uvloop, Python objects over 512 bytes)")
        print("  objects added per connection:")
        added = {k: (now.objects[k] - base.objects[k]) / connections for k in now.objects
                 if now.objects[k] - base.objects[k] >= connections // 2}
        for name, per in sorted(added.items(), key=lambda kv: -kv[1]):
            print(f"    {name:28s} {per:.2f}")
        if "past the parser sweep" in when:
            base = now


class Sample(NamedTuple):
    rss: int  # KiB
    malloc: int  # bytes
    objects: collections.Counter[str]  # Python objects by type


def sample() -> Sample:
    gc.collect()
    return Sample(rss_kib(), malloc_in_use(), collections.Counter(type(o).__name__ for o in gc.get_objects()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--request", action="store_true", help="send one request on each first")
    parser.add_argument("--body", type=int, default=100, help="with --request: the answer's body size")
    parser.add_argument("--tls", action="store_true", help="a TLS listener: a handshake on each first")
    parser.add_argument("--batches", type=int, default=1,
                        help="batches of --connections, each opened once the previous one's parsers were "
                             "dropped (their memory is then reused: the cost of a connection in a server "
                             "whose idle connections are swept)")
    args = parser.parse_args()
    loop = new_loop()
    try:
        loop.run_until_complete(measure(args.connections, args.request, args.tls, args.body, args.batches))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
