"""Memory per held client connection, gatewayd's side only.

    python -m bench.conn_memory [--connections 10000] [--request]

A Runtime runs in this process (one route to the ``simulated_io`` handler); a
child process opens the connections (and, with ``--request``, sends one request
on each and reads its answer), then holds them. Reported: RSS growth per
connection, and the Python objects each connection added (by type), so a
change in the protocol's footprint shows where it comes from.
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

from gatewayd.config.loader import parse
from gatewayd.process.single import new_loop
from gatewayd.runtime.state import Runtime

CLIENT = r"""
import socket, sys
port, n, send = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    if send:
        s.sendall(b"GET /?ms=0 HTTP/1.1\r\nHost: x\r\n\r\n")
    socks.append(s)
for s in socks:
    if send:
        s.recv(65536)
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


async def measure(connections: int, request: bool) -> None:
    folder = tempfile.mkdtemp(prefix="gatewayd-connmem-")
    port = free_port()
    text = f"""
[server]
listen = ["127.0.0.1:{port}"]
max_connections = {connections + 100}
[control]
socket = "{folder}/gw.sock"
[log]
access_log = "off"
[upstreams.h]
handler = "gatewayd.handlers:simulated_io"
[[routes]]
name = "r"
path_prefix = "/"
upstream = "h"
"""
    runtime = Runtime(parse(text, "conn_memory.toml"))
    await runtime.start()
    try:
        gc.collect()
        rss_before = rss_kib()
        before = collections.Counter(type(o).__name__ for o in gc.get_objects())
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, str(port), str(connections), "1" if request else "0",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            if not line.startswith(b"ready"):
                raise SystemExit("the client process failed")
            async with asyncio.timeout(30):
                while runtime.connections < connections:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            gc.collect()
            rss_after = rss_kib()
            after = collections.Counter(type(o).__name__ for o in gc.get_objects())
        finally:
            proc.stdin.write(b"\n")
            await proc.stdin.drain()
            await proc.wait()
    finally:
        await runtime.shutdown(1.0)
    print(f"connections held: {connections}{' (one request each)' if request else ''}")
    print(f"RSS growth: {(rss_after - rss_before) / connections:.2f} KiB per connection")
    print("objects added per connection:")
    added = {k: (after[k] - before[k]) / connections for k in after
             if after[k] - before[k] >= connections // 2}
    for name, per in sorted(added.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28s} {per:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--request", action="store_true", help="send one request on each first")
    args = parser.parse_args()
    loop = new_loop()
    try:
        loop.run_until_complete(measure(args.connections, args.request))
    finally:
        loop.close()


if __name__ == "__main__":
    main()
