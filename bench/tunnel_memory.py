"""Which tunnel design fits issue 22's memory goal (8 KiB a tunnel): bare splices, no gatewayd.

    python -m bench.tunnel_memory [--tunnels 2000] [--designs uvloop,asyncio,sock,splice]
                                  [--busy 200] [--seconds 3] [--flood-mib 200]

Each design is a minimal splice between an accepted client socket and an
upstream socket, both ends already "upgraded" (no HTTP: connect, then pump
bytes both ways):

- ``uvloop``: two asyncio Protocols on uvloop transports (``create_connection``
  to the upstream, ``connect_accepted_socket`` for the client), each
  forwarding ``data_received`` to the other's ``transport.write``;
  ``pause_writing``/``resume_writing`` on one side pause/resume reading on the
  other (back-pressure);
- ``asyncio``: the same on the standard loop;
- ``sock``: raw non-blocking sockets, ``loop.add_reader``/``add_writer``
  (uvloop), ``recv_into`` one scratch buffer shared by every tunnel; one small
  object per tunnel holding both sockets; what a send leaves unsent is kept
  (one chunk at most) and reading from that side stops until it is flushed;
- ``splice``: like ``sock``, but bytes move with ``os.splice`` through a pipe
  per direction (zero copy; each tunnel holds 4 more fds).

The proxy under test runs in a child process of its own, pinned to CPU 0;
an upstream process (CPU 1) accepts and holds connections on 127.0.0.2 and
echoes what it gets; a client process (CPU 1) opens the tunnels to the proxy
on 127.0.0.1. Per design: the proxy's RSS and glibc malloc in use
(``mallinfo2``) before and after --tunnels idle tunnels, per tunnel; an echo
round-trip rate over --busy tunnels for --seconds (64-byte messages, one in
flight per tunnel) with the proxy's CPU time per round trip; and back-pressure:
the client asks the upstream to send --flood-mib MiB down one tunnel and does
not read for 3 s: the proxy's RSS growth meanwhile (bounded if it stays far
under the flood). Everything stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

from .tls_memory import malloc_in_use

DESIGNS = ("uvloop", "asyncio", "sock", "splice")
PROXY_HOST, UPSTREAM_HOST = "127.0.0.1", "127.0.0.2"
CHUNK = 65536

# ----------------------------------------------------------------------------- the other processes
UPSTREAM = r"""
import asyncio, os, sys, uvloop
os.sched_setaffinity(0, {int(sys.argv[2])})
port = int(sys.argv[1])
BLOCK = b"y" * 65536
class Echo(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
    def data_received(self, data):
        if data.startswith(b"GET "):  # nginx's upgrade request
            self.t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        elif data.startswith(b"FLOOD "):
            asyncio.get_running_loop().create_task(self.flood(int(data.split()[1])))
        else:
            self.t.write(data)
    async def flood(self, mib):
        for _ in range(mib * 16):
            self.t.write(BLOCK)
            while self.t.get_write_buffer_size() > 1 << 20:
                await asyncio.sleep(0.01)
                if self.t.is_closing():
                    return
async def main():
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.2", port, backlog=4096)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    server.close()
uvloop.run(main())
"""

CLIENT = r"""
import asyncio, json, os, socket, sys, time, uvloop
os.sched_setaffinity(0, {int(sys.argv[3])})
port, mode, arg = int(sys.argv[1]), sys.argv[2], sys.argv[4:]
HTTP = os.environ.get("TUNNEL_HTTP") == "1"  # through nginx: an upgrade request and its 101 first
REQ = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
def upgrade(s):
    if HTTP:
        s.sendall(REQ)
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(4096)
    return s
async def main():
    loop = asyncio.get_running_loop()
    if mode == "idle":
        socks = []
        for _ in range(int(arg[0])):
            socks.append(upgrade(socket.create_connection(("127.0.0.1", port))))
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        return
    if mode == "echo":
        n, seconds = int(arg[0]), float(arg[1])
        conns = [await asyncio.open_connection(sock=upgrade(socket.create_connection(("127.0.0.1", port))))
                 for _ in range(n)]
        msg = b"m" * 64
        count = 0
        stop = False
        async def one(r, w):
            nonlocal count
            while not stop:
                w.write(msg)
                await r.readexactly(64)
                count += 1
        await asyncio.sleep(0.5)
        print("go", flush=True)
        tasks = [asyncio.create_task(one(r, w)) for r, w in conns]
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        stop = True
        n0 = count
        elapsed = time.monotonic() - t0
        await asyncio.gather(*tasks)
        print(json.dumps({"round_trips": n0, "seconds": elapsed}), flush=True)
        return
    if mode == "flood":
        s = upgrade(socket.create_connection(("127.0.0.1", port)))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        time.sleep(0.3)
        s.sendall(b"FLOOD %d" % int(arg[0]))
        print("flooding", flush=True)
        sys.stdin.readline()   # the proxy has measured: read a little, then close
        got = 0
        s.settimeout(2)
        try:
            while got < 8 << 20:
                b = s.recv(1 << 20)
                if not b:
                    break
                got += len(b)
        except OSError:
            pass
        print(json.dumps({"read_after": got}), flush=True)
uvloop.run(main())
"""


# ----------------------------------------------------------------------------- the designs (in the proxy process)
class Stats:
    tunnels = 0


class Side(asyncio.Protocol):
    """One end of a transport pair: what it receives goes to the peer's transport."""

    __slots__ = ("peer", "transport")

    def __init__(self) -> None:
        self.peer: Side | None = None
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.transport.write(data)

    def pause_writing(self) -> None:  # our write buffer is high: stop reading the other side
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
            self.peer.peer = None
            Stats.tunnels -= 1
        self.peer = None


async def transport_tunnel(loop: asyncio.AbstractEventLoop, client: socket.socket, upstream: tuple[str, int]) -> None:
    up = Side()
    await loop.create_connection(lambda: up, *upstream)
    down = Side()
    await loop.connect_accepted_socket(lambda: down, client)
    down.peer, up.peer = up, down
    Stats.tunnels += 1


SCRATCH = bytearray(CHUNK)
VIEW = memoryview(SCRATCH)


class SockTunnel:
    """Both sockets of a tunnel; at most one unsent chunk per direction."""

    __slots__ = ("a", "b", "loop", "pending_a", "pending_b")

    def __init__(self, loop: asyncio.AbstractEventLoop, a: socket.socket, b: socket.socket) -> None:
        self.loop, self.a, self.b = loop, a, b
        self.pending_a: bytes = b""  # unsent bytes for a
        self.pending_b: bytes = b""
        loop.add_reader(a, self.read, a, b)
        loop.add_reader(b, self.read, b, a)
        Stats.tunnels += 1

    def read(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            n = src.recv_into(SCRATCH)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self.close()
            return
        try:
            sent = dst.send(VIEW[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent < n:  # back-pressure: keep the rest, stop reading src until dst drains
            rest = bytes(VIEW[sent:n])
            if dst is self.a:
                self.pending_a = rest
            else:
                self.pending_b = rest
            self.loop.remove_reader(src)
            self.loop.add_writer(dst, self.flush, dst, src)

    def flush(self, dst: socket.socket, src: socket.socket) -> None:
        data = self.pending_a if dst is self.a else self.pending_b
        try:
            sent = dst.send(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        data = data[sent:]
        if dst is self.a:
            self.pending_a = data
        else:
            self.pending_b = data
        if not data:
            self.loop.remove_writer(dst)
            self.loop.add_reader(src, self.read, src, dst)

    def close(self) -> None:
        for s in (self.a, self.b):
            if s.fileno() >= 0:
                self.loop.remove_reader(s)
                self.loop.remove_writer(s)
                s.close()
                Stats.tunnels -= 1 if s is self.a else 0


SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0


class SpliceTunnel:
    """Both sockets and a pipe per direction; bytes never enter user space."""

    __slots__ = ("a", "b", "held", "loop", "pipes")

    def __init__(self, loop: asyncio.AbstractEventLoop, a: socket.socket, b: socket.socket) -> None:
        self.loop, self.a, self.b = loop, a, b
        self.pipes = {a: os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC), b: os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)}
        self.held = {a: 0, b: 0}  # bytes waiting in the pipe read from that socket
        loop.add_reader(a, self.read, a, b)
        loop.add_reader(b, self.read, b, a)
        Stats.tunnels += 1

    def read(self, src: socket.socket, dst: socket.socket) -> None:
        _, w = self.pipes[src]
        try:
            n = os.splice(src.fileno(), w, CHUNK, flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self.close()
            return
        self.held[src] += n
        self.drain(dst, src)

    def drain(self, dst: socket.socket, src: socket.socket) -> None:
        r, _ = self.pipes[src]
        while self.held[src]:
            try:
                m = os.splice(r, dst.fileno(), self.held[src], flags=SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            self.held[src] -= m
        if self.held[src]:  # dst is full: stop reading src until it drains
            self.loop.remove_reader(src)
            self.loop.add_writer(dst, self.flush, dst, src)

    def flush(self, dst: socket.socket, src: socket.socket) -> None:
        self.loop.remove_writer(dst)
        self.drain(dst, src)
        if not self.held[src] and src.fileno() >= 0:
            self.loop.add_reader(src, self.read, src, dst)

    def close(self) -> None:
        if self.a.fileno() < 0:
            return
        for s in (self.a, self.b):
            self.loop.remove_reader(s)
            self.loop.remove_writer(s)
            s.close()
        for r, w in self.pipes.values():
            os.close(r)
            os.close(w)
        Stats.tunnels -= 1


async def sock_tunnel(loop: asyncio.AbstractEventLoop, client: socket.socket, upstream: tuple[str, int],
                      kind: type[SockTunnel] | type[SpliceTunnel]) -> None:
    up = socket.socket()
    up.setblocking(False)
    await loop.sock_connect(up, upstream)
    client.setblocking(False)
    for s in (up, client):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    kind(loop, client, up)


def rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def proxy(design: str, port: int, upstream: tuple[str, int]) -> None:
    """The proxy process: accept, make a tunnel per client, answer the parent's commands on stdin."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((PROXY_HOST, port))
    listener.listen(4096)
    listener.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()

    def accept() -> None:
        for _ in range(64):
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            if design in ("uvloop", "asyncio"):
                task = loop.create_task(transport_tunnel(loop, client, upstream))
            else:
                task = loop.create_task(sock_tunnel(
                    loop, client, upstream, SockTunnel if design == "sock" else SpliceTunnel))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    loop.add_reader(listener, accept)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    import gc
    while line := (await reader.readline()).decode().split():
        if line[0] == "sample":  # wait for N tunnels, then report memory
            want = int(line[1])
            async with asyncio.timeout(60):
                while Stats.tunnels < want:
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            gc.collect()
            out = {"tunnels": Stats.tunnels, "rss": rss_kib(), "malloc": malloc_in_use(), "cpu": cpu_s(),
                   "fds": len(os.listdir("/proc/self/fd"))}
            print(json.dumps(out), flush=True)
        elif line[0] == "now":
            gc.collect()
            print(json.dumps({"tunnels": Stats.tunnels, "rss": rss_kib(), "malloc": malloc_in_use(),
                              "cpu": cpu_s(), "fds": len(os.listdir("/proc/self/fd"))}), flush=True)


# ----------------------------------------------------------------------------- the parent
def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Child:
    def __init__(self, args: list[str]) -> None:
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def line(self) -> str:
        assert self.p.stdout is not None
        out = self.p.stdout.readline()
        if not out:
            raise SystemExit(f"child {self.p.args!r} ended")
        return out

    def json(self) -> dict[str, Any]:
        while True:
            text = self.line()
            if text.startswith("{"):
                return dict(json.loads(text))

    def send(self, text: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()

    def stop(self) -> None:
        try:
            if self.p.stdin is not None:
                self.p.stdin.close()
            self.p.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()
            self.p.wait()


class Nginx:
    """nginx as the proxy under test (``map $http_upgrade`` WebSocket proxying, 1 worker on CPU 0),
    answering the same commands as the proxy child by reading its worker's /proc."""

    def __init__(self, port: int, up_port: int) -> None:
        import tempfile
        from pathlib import Path

        from .deps import tool
        from .servers import _nginx_main
        d = Path(tempfile.mkdtemp(prefix="gatewayd-tunnel-nginx-"))
        conf = _nginx_main(d, f"""
            map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
            server {{
                listen {PROXY_HOST}:{port} backlog=4096;
                location / {{
                    proxy_pass http://{UPSTREAM_HOST}:{up_port};
                    proxy_http_version 1.1;
                    proxy_set_header Upgrade $http_upgrade;
                    proxy_set_header Connection $connection_upgrade;
                    proxy_read_timeout 600s;
                    proxy_send_timeout 600s;
                }}
            }}
            """)
        self.p = subprocess.Popen(["taskset", "-c", "0", tool("nginx"), "-p", f"{d}/", "-e",
                                   str(d / "logs" / "error.log"), "-c", str(conf)])
        for _ in range(100):
            time.sleep(0.05)
            kids = self._children()
            if kids:
                break
        self.worker = kids[0]
        self.cmd = ""

    def _children(self) -> list[int]:
        try:
            with open(f"/proc/{self.p.pid}/task/{self.p.pid}/children") as fh:
                return [int(x) for x in fh.read().split()]
        except OSError:
            return []

    def line(self) -> str:
        return "ready"

    def send(self, text: str) -> None:
        self.cmd = text

    def json(self) -> dict[str, Any]:
        if self.cmd.startswith("sample"):
            time.sleep(0.5)
        w = self.worker
        rss = 0
        with open(f"/proc/{w}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        with open(f"/proc/{w}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return {"rss": rss, "malloc": 0, "cpu": cpu, "fds": len(os.listdir(f"/proc/{w}/fd"))}

    def stop(self) -> None:
        self.p.terminate()
        self.p.wait(10)


def run_design(design: str, tunnels: int, busy: int, seconds: float, flood_mib: int) -> dict[str, Any]:
    up_port, port = free_port(UPSTREAM_HOST), free_port(PROXY_HOST)
    upstream = Child([sys.executable, "-c", UPSTREAM, str(up_port), "1"])
    upstream.line()
    px: Child | Nginx
    if design == "nginx":
        os.environ["TUNNEL_HTTP"] = "1"
        px = Nginx(port, up_port)
    else:
        os.environ.pop("TUNNEL_HTTP", None)
        px = Child([sys.executable, "-m", "bench.tunnel_memory", "--serve", design, "--port", str(port),
                    "--upstream-port", str(up_port)])
    px.line()
    result: dict[str, Any] = {"design": design}
    try:
        # warm-up: one tunnel opened and closed
        c = Child([sys.executable, "-c", CLIENT, str(port), "idle", "1", "1"])
        c.line()
        px.send("sample 1")
        px.json()
        c.stop()
        time.sleep(0.3)
        px.send("now")
        before = px.json()
        c = Child([sys.executable, "-c", CLIENT, str(port), "idle", "1", str(tunnels)])
        c.line()
        px.send(f"sample {tunnels}")
        after = px.json()
        result["rss_kib"] = (after["rss"] - before["rss"]) / tunnels
        result["malloc_kib"] = (after["malloc"] - before["malloc"]) / 1024 / tunnels
        result["fds_per_tunnel"] = (after["fds"] - before["fds"]) / tunnels
        c.stop()
        time.sleep(1.0)
        if busy:
            c = Child([sys.executable, "-c", CLIENT, str(port), "echo", "1", str(busy), str(seconds)])
            c.line()  # "go"
            px.send("now")
            t0 = px.json()
            rt = c.json()
            px.send("now")
            t1 = px.json()
            c.stop()
            result["round_trips_s"] = rt["round_trips"] / rt["seconds"]
            result["cpu_us_rt"] = (t1["cpu"] - t0["cpu"]) * 1e6 / max(rt["round_trips"], 1)
            time.sleep(0.5)
        if flood_mib:
            px.send("now")
            before = px.json()
            c = Child([sys.executable, "-c", CLIENT, str(port), "flood", "1", str(flood_mib)])
            c.line()
            time.sleep(3.0)
            px.send("now")
            held = px.json()
            c.send("")
            got = c.json()
            c.stop()
            result["flood_rss_growth_kib"] = held["rss"] - before["rss"]
            result["flood_malloc_growth_kib"] = (held["malloc"] - before["malloc"]) / 1024
            result["flood_read_after"] = got["read_after"]
    finally:
        px.stop()
        upstream.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=2000)
    parser.add_argument("--designs", default=",".join(DESIGNS), help=f"any of {','.join(DESIGNS)}, and nginx")
    parser.add_argument("--busy", type=int, default=200, help="tunnels in the echo rate test (0: skip)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--flood-mib", type=int, default=200, help="the back-pressure test's flood (0: skip)")
    parser.add_argument("--serve", choices=DESIGNS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        os.sched_setaffinity(0, {0})
        upstream = (UPSTREAM_HOST, args.upstream_port)
        if args.serve == "asyncio":
            asyncio.run(proxy(args.serve, args.port, upstream))
        else:
            import uvloop
            uvloop.run(proxy(args.serve, args.port, upstream))
        return
    rows = []
    for design in args.designs.split(","):
        row = run_design(design, args.tunnels, args.busy, args.seconds, args.flood_mib)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print()
    print("| design | RSS KiB/tunnel | malloc KiB/tunnel | fds/tunnel | echo round trips/s "
          f"({args.busy} tunnels) | CPU µs/round trip | "
          f"{args.flood_mib} MiB to a stopped reader: RSS (malloc) growth |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        nginx = r["design"] == "nginx"  # its worker's malloc is not read
        malloc = "-" if nginx else f"{r['malloc_kib']:.2f}"
        flood_malloc = "" if nginx else f" ({r.get('flood_malloc_growth_kib', 0):,.0f} KiB)"
        print(f"| {r['design']} | {r['rss_kib']:.2f} | {malloc} | {r['fds_per_tunnel']:.1f} | "
              f"{r.get('round_trips_s', 0):,.0f} | {r.get('cpu_us_rt', 0):.1f} | "
              f"{r.get('flood_rss_growth_kib', 0):,} KiB{flood_malloc} |")


if __name__ == "__main__":
    main()
