"""WebSocket peers for the tunnels scenario: an upstream and the clients, each a light
process of its own (raw sockets, uvloop; no WebSocket library).

    python -m bench.ws_peers upstream --port P
    python -m bench.ws_peers idle  --port P --tunnels N [--source 127.0.0.11] [--hold 300]
    python -m bench.ws_peers echo  --port P --tunnels N --seconds S [--warmup 1] [--watch PID]
    python -m bench.ws_peers bulk  --port P --mib N [--watch PID]
    python -m bench.ws_peers flood --port P --mib N [--pause 5] [--watch PID]

Every tunnel is a real WebSocket upgrade: the client sends ``GET`` with
``Upgrade: websocket``, ``Connection: Upgrade``, ``Sec-WebSocket-Key`` and
``Sec-WebSocket-Version: 13``; the upstream answers ``101`` with the
``Sec-WebSocket-Accept`` of that key, and the client checks it. Then frames:
the client's masked, the upstream's not. The upstream echoes every data frame;
a text frame ``STREAM n`` makes it send n MiB of binary frames instead (1 MiB
on the wire each, with back-pressure: it writes only while its transport is
not paused; the first pause of a stream is printed, ``{"event": "paused"}``
with the MiB handed to its transport by then).

The clients print JSON lines ``{"event": ...}`` on stdout (the harness reads
them from the process's log):

- ``idle``: opens --tunnels tunnels (64 upgrades in flight at most), prints
  ``ready`` (opened, failed and why); on SIGUSR1 it sends one small frame down
  every tunnel, prints ``checked`` with how many echoed it back, and exits
  (also after --hold seconds);
- ``echo``: opens --tunnels tunnels, then keeps one 64-byte frame in flight on
  each; after --warmup seconds it counts round trips for --seconds and prints
  ``echo`` (with the CPU seconds of the process tree --watch over that window,
  and its own with --peer's: the load side);
- ``bulk``: one tunnel; asks for --mib MiB and reads them as fast as it can
  (``recv_into``); prints ``bulk`` (bytes, seconds, --watch's CPU);
- ``flood``: one tunnel with a 64 KiB receive buffer; asks for --mib MiB and
  does not read for --pause seconds, sampling --watch's RSS every 0.1 s; then
  reads it all; prints ``flood`` (RSS growth, peak and at the end of the
  pause; bytes read after).

Everything is bounded in time: the clients give up and exit after their
timeouts; the upstream runs until it is stopped (the harness stops it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from typing import Any

from .procs import tree, usage

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"
MIB = 1 << 20
PAYLOAD = 64  # the echo test's message
PARALLEL = 64  # upgrades in flight per client process
OPEN_TIMEOUT = 30.0
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


# ----------------------------------------------------------------------------- frames and handshake
def accept_of(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def upgrade_request(key: bytes) -> bytes:
    return (b"GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")


def client_frame(payload: bytes, opcode: int = 2) -> bytes:
    """A masked frame (payload under 126 bytes), as a client must send."""
    assert len(payload) < 126
    mask = os.urandom(4)
    n = len(payload)
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
    return bytes([0x80 | opcode, 0x80 | n]) + mask + masked


def server_frame(payload: bytes, opcode: int = 2) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
    return head + payload


def check_head(head: bytes, key: bytes) -> str:
    """'' if ``head`` (up to the blank line) is a 101 with the right accept, else why not."""
    lines = head.split(b"\r\n")
    status = lines[0].decode("latin-1")
    if not status.startswith("HTTP/1.1 101"):
        return status[:60]
    want = accept_of(key)
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept":
            return "" if value.strip() == want else "bad Sec-WebSocket-Accept"
    return "no Sec-WebSocket-Accept"


# ----------------------------------------------------------------------------- the upstream
BLOCK = server_frame(b"\0" * (MIB - 10))  # exactly 1 MiB on the wire


class UpstreamConn(asyncio.Protocol):
    """One upstream connection: the handshake, then echo (or a stream of BLOCKs)."""

    __slots__ = ("buf", "left", "paused", "said", "sent", "transport", "upgraded")

    def __init__(self) -> None:
        self.transport: Any = None
        self.buf = b""
        self.upgraded = False
        self.left = 0  # MiB still to stream
        self.sent = 0  # MiB streamed
        self.paused = False
        self.said = False  # the first pause of a stream reported

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            key = b""
            for line in buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            if not key:
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                self.transport.close()
                return
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_of(key) + b"\r\n\r\n")
            self.upgraded = True
            buf = buf[end + 4:]
        while len(buf) >= 2:
            b0, b1 = buf[0], buf[1]
            n, off = b1 & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, off = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, off = int.from_bytes(buf[2:10], "big"), 10
            mask = b""
            if b1 & 0x80:
                mask, off = buf[off:off + 4], off + 4
            if len(buf) < off + n:
                break
            payload = buf[off:off + n]
            buf = buf[off + n:]
            if mask and n:
                payload = (int.from_bytes(payload, "big")
                           ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
            self.frame(b0 & 0x0F, payload)
        self.buf = buf

    def frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 8:  # close: answer it and hang up
            self.transport.write(server_frame(payload[:2], 8))
            self.transport.close()
        elif opcode == 9:
            self.transport.write(server_frame(payload, 10))
        elif opcode == 1 and payload.startswith(b"STREAM "):
            self.left = int(payload.split()[1])
            self.transport.set_write_buffer_limits(high=4 * MIB)
            self.pump()
        elif opcode in (1, 2):
            self.transport.write(server_frame(payload, opcode))

    def pump(self) -> None:
        while self.left and not self.paused and not self.transport.is_closing():
            self.left -= 1
            self.sent += 1
            self.transport.write(BLOCK)  # may call pause_writing

    def pause_writing(self) -> None:
        self.paused = True
        if self.left and not self.said:  # how much got out before the reader's side held it back
            self.said = True
            print(json.dumps({"event": "paused", "sent_mib": self.sent,
                              "buffered": self.transport.get_write_buffer_size()}), flush=True)

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()


async def upstream(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamConn, "127.0.0.1", port, backlog=4096, reuse_address=True)
    print(json.dumps({"event": "listening", "port": port}), flush=True)
    async with server:
        await server.serve_forever()


# ----------------------------------------------------------------------------- the uvloop clients
class Rounds:
    """Round trips completed by every tunnel of this process, and whether to keep going."""

    count = 0
    pump = False


class Tunnel(asyncio.Protocol):
    """The client end: the upgrade, then one message at a time (``send``), counting replies by length."""

    __slots__ = ("buf", "got", "key", "msg", "opened", "reply", "transport", "waiter")

    def __init__(self, key: bytes, opened: asyncio.Future[str]) -> None:
        self.key = key
        self.opened = opened
        self.transport: Any = None
        self.buf = b""
        self.msg = b""
        self.reply = 0  # bytes of the answer to msg
        self.got = 0
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(upgrade_request(self.key))

    def data_received(self, data: bytes) -> None:
        if self.opened is not None:
            buf = self.buf + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            why = check_head(buf[:end], self.key)
            self.buf = b""
            if not self.opened.done():
                self.opened.set_result(why)
            self.opened = None  # type: ignore[assignment]
            data = buf[end + 4:]
            if not data:
                return
        self.got += len(data)
        while self.reply and self.got >= self.reply:
            self.got -= self.reply
            if self.waiter is not None:
                if not self.waiter.done():
                    self.waiter.set_result(None)
                self.waiter = None
            else:
                Rounds.count += 1
                if Rounds.pump:
                    self.transport.write(self.msg)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.opened is not None and not self.opened.done():
            self.opened.set_result(f"closed before the 101 ({exc or 'EOF'})")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("tunnel closed"))

    def start(self, payload: bytes) -> None:
        self.msg = client_frame(payload)
        self.reply = 2 + len(payload)
        self.transport.write(self.msg)

    async def check(self, payload: bytes) -> bool:
        """One message there and back, waited for."""
        self.msg = client_frame(payload)
        self.reply = 2 + len(payload)
        self.waiter = asyncio.get_running_loop().create_future()
        if self.transport.is_closing():
            return False
        self.transport.write(self.msg)
        try:
            await self.waiter
        except ConnectionError:
            return False
        return True


async def open_tunnels(port: int, n: int, source: str) -> tuple[list[Tunnel], Counter[str]]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(PARALLEL)
    tunnels: list[Tunnel] = []
    failed: Counter[str] = Counter()

    async def one() -> None:
        async with gate:
            s = socket.socket()
            try:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((source, 0))
                s.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), OPEN_TIMEOUT)
                opened: asyncio.Future[str] = loop.create_future()
                tunnel = Tunnel(base64.b64encode(os.urandom(16)), opened)
                await loop.create_connection(lambda: tunnel, sock=s)
                why = await asyncio.wait_for(opened, OPEN_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                s.close()
                failed[type(exc).__name__] += 1
                return
            if why:
                tunnel.transport.abort()
                failed[why] += 1
            else:
                tunnels.append(tunnel)

    await asyncio.gather(*(one() for _ in range(n)))
    return tunnels, failed


def watched_cpu(pid: int) -> float:
    return usage(tree(pid)).cpu if pid else 0.0


def watched_wait(pid: int) -> float:
    """Seconds the process tree ``pid`` was runnable but another process had its CPU."""
    return usage(tree(pid)).waited if pid else 0.0


def watched_rss(pid: int) -> int:
    return usage(tree(pid)).rss if pid else 0


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def idle(port: int, n: int, source: str, hold: float) -> None:
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    tunnels, failed = await open_tunnels(port, n, source)
    say("ready", opened=len(tunnels), failed=dict(failed), seconds=round(time.monotonic() - t0, 2))
    go = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, go.set)
    try:
        await asyncio.wait_for(go.wait(), hold)
    except TimeoutError:
        say("hold_expired")
        return
    gate = asyncio.Semaphore(256)

    async def one(t: Tunnel) -> bool:
        async with gate:
            try:
                return await asyncio.wait_for(t.check(b"are you there?"), 10.0)
            except TimeoutError:
                return False

    alive = await asyncio.gather(*(one(t) for t in tunnels))
    say("checked", alive=sum(alive), opened=len(tunnels))
    for t in tunnels:
        t.transport.abort()


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def echo(port: int, n: int, source: str, seconds: float, warmup: float, watch: int, peer: int) -> None:
    tunnels, failed = await open_tunnels(port, n, source)
    payload = b"m" * PAYLOAD
    Rounds.pump = True
    for t in tunnels:
        t.start(payload)
    await asyncio.sleep(warmup)
    c0, cpu0, t0 = Rounds.count, watched_cpu(watch), time.monotonic()
    load0, wait0 = own_cpu() + watched_cpu(peer), watched_wait(watch)
    await asyncio.sleep(seconds)
    c1, cpu1, t1 = Rounds.count, watched_cpu(watch), time.monotonic()
    load1, wait1 = own_cpu() + watched_cpu(peer), watched_wait(watch)
    Rounds.pump = False
    closed = sum(1 for t in tunnels if t.transport.is_closing())
    say("echo", opened=len(tunnels), failed=dict(failed), closed=closed, round_trips=c1 - c0,
        seconds=t1 - t0, cpu=cpu1 - cpu0, load_cpu=load1 - load0,
        waited=wait1 - wait0)
    for t in tunnels:
        t.transport.abort()


# ----------------------------------------------------------------------------- the blocking clients
def blocking_tunnel(port: int, source: str, rcvbuf: int = 0) -> tuple[socket.socket, int]:
    """A tunnel on a blocking socket; the bytes read past the 101's head are returned as a count."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.bind((source, 0))
    s.settimeout(OPEN_TIMEOUT)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16))
    s.sendall(upgrade_request(key))
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise SystemExit(json.dumps({"event": "error", "why": f"closed before the 101: {buf[:80]!r}"}))
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    why = check_head(head, key)
    if why:
        raise SystemExit(json.dumps({"event": "error", "why": why}))
    return s, len(rest)


def read_stream(s: socket.socket, total: int, got: int, timeout: float) -> tuple[int, float]:
    """Read until ``total`` bytes (``got`` already in) or ``timeout``; bytes read and seconds taken."""
    buf = bytearray(MIB)
    t0 = time.monotonic()
    s.settimeout(max(timeout, 0.1))
    try:
        while got < total:
            n = s.recv_into(buf)
            if not n:
                break
            got += n
            if time.monotonic() - t0 > timeout:
                break
    except OSError:
        pass
    return got, time.monotonic() - t0


def bulk(port: int, source: str, mib: int, watch: int, timeout: float) -> None:
    s, got = blocking_tunnel(port, source)
    cpu0, wait0, own0 = watched_cpu(watch), watched_wait(watch), own_cpu()
    s.sendall(client_frame(b"STREAM %d" % mib, opcode=1))
    got, seconds = read_stream(s, mib * MIB, got, timeout)
    cpu1, wait1, own1 = watched_cpu(watch), watched_wait(watch), own_cpu()
    say("bulk", bytes=got, wanted=mib * MIB, seconds=seconds, cpu=cpu1 - cpu0, waited=wait1 - wait0,
        client_cpu=own1 - own0)
    s.close()


def flood(port: int, source: str, mib: int, pause: float, watch: int, timeout: float) -> None:
    s, got = blocking_tunnel(port, source, rcvbuf=65536)
    time.sleep(0.5)
    before = watched_rss(watch)
    s.sendall(client_frame(b"STREAM %d" % mib, opcode=1))
    peak = 0
    end = time.monotonic() + pause
    while time.monotonic() < end:
        time.sleep(0.1)
        peak = max(peak, watched_rss(watch) - before)
    held = watched_rss(watch) - before
    got, seconds = read_stream(s, mib * MIB, got, timeout)
    say("flood", mib=mib, pause=pause, peak_growth=peak, held_growth=held, read_after=got,
        read_seconds=seconds, rss_before=before)
    s.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.ws_peers", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("upstream", "idle", "echo", "bulk", "flood"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tunnels", type=int, default=1)
    p.add_argument("--source", default="127.0.0.1", help="the clients' source address")
    p.add_argument("--hold", type=float, default=300.0, help="idle: exit after this long without SIGUSR1")
    p.add_argument("--seconds", type=float, default=8.0, help="echo: the measured window")
    p.add_argument("--warmup", type=float, default=1.0, help="echo: unmeasured seconds first")
    p.add_argument("--mib", type=int, default=1024, help="bulk, flood: MiB the upstream sends")
    p.add_argument("--pause", type=float, default=5.0, help="flood: seconds the client does not read")
    p.add_argument("--timeout", type=float, default=120.0, help="bulk, flood: longest read")
    p.add_argument("--watch", type=int, default=0, help="pid of the proxy (its process tree is measured)")
    p.add_argument("--peer", type=int, default=0, help="echo: pid of the upstream (its CPU and the client's: "
                                                      "the load CPU's use)")
    a = p.parse_args()
    from .aio import run
    if a.mode == "upstream":
        run(upstream(a.port))
    elif a.mode == "idle":
        run(idle(a.port, a.tunnels, a.source, a.hold))
    elif a.mode == "echo":
        run(echo(a.port, a.tunnels, a.source, a.seconds, a.warmup, a.watch, a.peer))
    elif a.mode == "bulk":
        bulk(a.port, a.source, a.mib, a.watch, a.timeout)
    else:
        flood(a.port, a.source, a.mib, a.pause, a.watch, a.timeout)
    sys.exit(0)


if __name__ == "__main__":
    main()
