"""Where an idle TLS connection's memory goes in a Python server: bare servers
(no gatewayd) that each answer a fixed 100-byte response, one design each.

    python -m bench.tls_memory [--connections 2000] [--variants uvloop,bio,...]
                               [--tls 1.3] [--key ecdsa] [--tickets 2] [--rps]

Variants (the server under test, one process pinned to --server-cpu):

- ``asyncio``: the standard loop's TLS transport (``create_server(ssl=...)``);
- ``uvloop``: uvloop's TLS transport (its sslproto, same API);
- ``bio``: uvloop's plain TCP transport and a hand-written protocol over
  ``ssl.SSLObject`` and two ``ssl.MemoryBIO`` (what sslproto does, minus its
  per-connection buffers): ciphertext in from ``data_received``, plaintext read
  into one buffer shared by every connection, ciphertext out with one write;
- ``sock``: OpenSSL on the socket itself (``SSLSocket``, non-blocking, socket
  BIO, as nginx does), driven by ``loop.add_reader``; no memory BIOs at all.
- ``plain``: uvloop, no TLS (the baseline the TLS designs add to).

For each: warm up (connections opened and closed), read the server's RSS and
the bytes malloc holds (glibc ``mallinfo2``: OpenSSL and uvloop allocate
there, CPython's small objects do not), open N connections from a client
process on the other CPU (handshake, one request, its answer read, then
idle), read both again a second later; close everything. With ``--rps`` also
``wrk`` over HTTPS at 50 connections for a few seconds: requests per second
and the server's CPU microseconds per request. Everything is bounded and
stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import certs
from .procs import CLOCK_TICKS, pinned
from .servers import BODY


def response(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)) + body


RESPONSE = response(BODY)  # the server's answer (serve --body makes it larger)
VARIANTS = ("asyncio", "uvloop", "bio", "sock", "plain")


# ----------------------------------------------------------------------------- the servers
class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


def malloc_in_use() -> int:
    """Bytes handed out by glibc's malloc (heap and mmapped chunks); 0 off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _Mallinfo2
    except (OSError, AttributeError):
        return 0
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _response() -> bytes:
    return RESPONSE


def server_context(pem: certs.Pem, version: str, tickets: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem.cert, pem.key)
    ctx.set_alpn_protocols(["http/1.1"])
    v = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ctx.maximum_version = v
    ctx.num_tickets = tickets
    if tickets == 0:
        ctx.options |= ssl.OP_NO_TICKET
    return ctx


class _Http:
    """The application: a request is answered once its head is in (no bodies)."""

    __slots__ = ("head",)

    def __init__(self) -> None:
        self.head = b""

    def feed(self, data: bytes | memoryview) -> int:
        """Requests completed by ``data``."""
        buf = self.head + bytes(data)
        n = buf.count(b"\r\n\r\n")
        self.head = buf[buf.rfind(b"\r\n\r\n") + 4:] if n else buf
        return n


class PlainProtocol(asyncio.Protocol):
    """No TLS; also the application side of the ``asyncio``/``uvloop`` variants."""

    def __init__(self) -> None:
        self.http = _Http()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        n = self.http.feed(data)
        if n:
            self.transport.write(_response() * n)


_SHARED = bytearray(256 * 1024)  # plaintext lands here, one buffer for every connection
_VIEW = memoryview(_SHARED)


class BioProtocol(asyncio.Protocol):
    """TLS over a plain transport: SSLObject + two MemoryBIOs, nothing else per connection."""

    __slots__ = ("ctx", "http", "incoming", "outgoing", "ready", "tls", "transport")

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.ready = False
        self.http = _Http()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = self.ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        tls = self.tls
        try:
            if not self.ready:
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    return self._flush()
                self.ready = True
            requests = 0
            # Read only while there is ciphertext in or plaintext decrypted: a read that finds
            # nothing makes OpenSSL allocate its 16 KiB record buffer again (SSL_MODE_RELEASE_BUFFERS,
            # which CPython sets, freed it when the last record was consumed) and keep it while idle.
            while self.incoming.pending or tls.pending():
                try:
                    n = tls.read(len(_SHARED), _SHARED)
                except ssl.SSLWantReadError:
                    break
                if not n:
                    self.transport.close()
                    return None
                requests += self.http.feed(_VIEW[:n])
            if requests:
                tls.write(_response() * requests)
        except ssl.SSLError:
            self.transport.abort()
            return None
        return self._flush()

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.transport.write(self.outgoing.read())

    def eof_received(self) -> bool:
        return False


class SockConn:
    """TLS on the socket (OpenSSL reads and writes the descriptor), driven by add_reader."""

    __slots__ = ("http", "loop", "pending", "ready", "sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket) -> None:
        self.loop = loop
        self.sock = sock
        self.ready = False
        self.http = _Http()
        self.pending = b""
        loop.add_reader(sock.fileno(), self.readable)

    def readable(self) -> None:
        s = self.sock
        try:
            if not self.ready:
                try:
                    s.do_handshake()
                except ssl.SSLWantReadError:
                    return
                except ssl.SSLWantWriteError:
                    return  # a handshake flight larger than the socket buffer: not on loopback
                self.ready = True
                # no read now: one that finds nothing reallocates OpenSSL's record buffer; if the
                # request came with the Finished, the descriptor is still readable (level-triggered)
                return
            requests = 0
            while True:
                try:
                    n = s.recv_into(_SHARED)
                except ssl.SSLWantReadError:
                    break
                if not n:
                    return self.close()
                requests += self.http.feed(_VIEW[:n])
                if not s.pending():
                    break
            if requests:
                self.send(_response() * requests)
        except (ssl.SSLError, OSError):
            self.close()
        return None

    def send(self, data: bytes) -> None:
        try:
            sent = self.sock.send(data)
        except ssl.SSLWantWriteError:
            sent = 0
        if sent < len(data):  # OpenSSL wants the same bytes again once writable
            self.pending = data[sent:]
            self.loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        self.loop.remove_writer(self.sock.fileno())
        data, self.pending = self.pending, b""
        self.send(data)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.loop.remove_writer(self.sock.fileno())
        self.sock.close()


async def serve(variant: str, port: int, ctx: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    if variant in ("asyncio", "uvloop"):
        server = await loop.create_server(PlainProtocol, "127.0.0.1", port, ssl=ctx, backlog=4096)
    elif variant == "plain":
        server = await loop.create_server(PlainProtocol, "127.0.0.1", port, backlog=4096)
    elif variant == "bio":
        server = await loop.create_server(lambda: BioProtocol(ctx), "127.0.0.1", port, backlog=4096)
    else:
        server = None
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(4096)
        listener.setblocking(False)
        conns: set[SockConn] = set()

        def accept() -> None:
            while True:
                try:
                    raw, _ = listener.accept()
                except BlockingIOError:
                    return
                raw.setblocking(False)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = SockConn(loop, ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False))
                conns.add(conn)

        loop.add_reader(listener.fileno(), accept)
    print(f"ready {os.getpid()}", flush=True)
    done = asyncio.Event()

    def command() -> None:
        line = sys.stdin.readline()
        if not line or line.strip() == "quit":
            done.set()
            return
        import gc
        gc.collect()
        print(f"malloc {malloc_in_use()}", flush=True)

    loop.add_reader(sys.stdin.fileno(), command)
    await done.wait()
    if server is not None:
        server.close()


def serve_main(args: argparse.Namespace) -> None:
    global RESPONSE
    RESPONSE = response(b"x" * args.body)
    pem = certs.Pem(Path(args.cert), Path(args.key))
    ctx = server_context(pem, args.tls, args.tickets)
    coro = serve(args.variant, args.port, ctx)
    if args.variant == "asyncio":
        asyncio.run(coro)
    else:
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(coro)


# ----------------------------------------------------------------------------- the client
CLIENT = r"""
import socket, ssl, sys
port, n, tls, size = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
conns = []
for _ in range(n):
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = ctx.wrap_socket(raw) if tls else raw
    s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    got = b""
    while len(got) < size:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    conns.append(s)
print("ready", flush=True)
sys.stdin.readline()
"""


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class Server:
    def __init__(self, variant: str, pem: certs.Pem, args: argparse.Namespace) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        argv = [sys.executable, "-m", "bench.tls_memory", "serve", "--variant", variant, "--port", str(self.port),
                "--cert", str(pem.cert), "--key", str(pem.key), "--tls", args.tls, "--tickets", str(args.tickets),
                "--body", str(args.body)]
        self.popen = subprocess.Popen(pinned(args.server_cpu, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, cwd=Path(__file__).resolve().parent.parent)
        assert self.popen.stdout is not None and self.popen.stdin is not None
        line = self.popen.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"{variant} did not start")
        self.pid = int(line.split()[1])  # taskset execs: the same process

    def malloc(self) -> int:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write("stat\n")
        self.popen.stdin.flush()
        return int(self.popen.stdout.readline().split()[1])

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                assert self.popen.stdin is not None
                self.popen.stdin.write("quit\n")
                self.popen.stdin.flush()
                self.popen.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.popen.kill()
                self.popen.wait()


def hold(port: int, n: int, tls: bool, cpu: int | None, size: int = len(RESPONSE)) -> subprocess.Popen[str]:
    """A client process holding ``n`` connections, one answered request each; returns once
    they are all open (write a line to its stdin to close them)."""
    p = subprocess.Popen(pinned(cpu, [sys.executable, "-c", CLIENT, str(port), str(n), "1" if tls else "0",
                                         str(size)]),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("ready"):
        p.kill()
        raise RuntimeError("the client failed")
    return p


def release(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.write("\n")
    p.stdin.flush()
    p.wait(30)


def measure(variant: str, pem: certs.Pem, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    server = Server(variant, pem, args)
    tls = variant != "plain"
    try:
        size = len(response(b"x" * args.body))
        release(hold(server.port, min(200, args.connections), tls, args.client_cpu, size))  # warm-up
        time.sleep(0.5)
        before_rss, before_malloc = rss(server.pid), server.malloc()
        client = hold(server.port, args.connections, tls, args.client_cpu, size)
        try:
            time.sleep(1.0)
            after_rss, after_malloc = rss(server.pid), server.malloc()
        finally:
            release(client)
        out = {"rss_kib": (after_rss - before_rss) / 1024 / args.connections,
               "malloc_kib": (after_malloc - before_malloc) / 1024 / args.connections}
        if args.rps and args.body == len(BODY):
            out.update(throughput(server, tls, args, folder))
        return out
    finally:
        server.stop()


def throughput(server: Server, tls: bool, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    from . import wrk
    scheme = "https" if tls else "http"
    subprocess.run(pinned(args.client_cpu, ["wrk", "-t1", "-c50", "-d1s", f"{scheme}://127.0.0.1:{server.port}/"]),
                   capture_output=True, timeout=30, check=False)
    cpu = cpu_seconds(server.pid)
    argv = ["wrk", "-t1", "-c50", f"-d{args.seconds}s", "-s", str(wrk.script(folder)),
            f"{scheme}://127.0.0.1:{server.port}/"]
    out = subprocess.run(pinned(args.client_cpu, argv), capture_output=True, text=True, timeout=args.seconds + 30,
                         check=False)
    r = wrk.parse(out.stdout + out.stderr)
    used = cpu_seconds(server.pid) - cpu
    return {"rps": r.rps, "cpu_us": used / r.requests * 1e6 if r.requests else float("nan"),
            "errors": float(r.errors)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tls_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("serve")
    s.add_argument("--variant", choices=VARIANTS, required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    for q in (p, s):
        q.add_argument("--body", type=int, default=len(BODY),
                       help="response body bytes (default 100); a large one shows which buffers keep their size")
        q.add_argument("--tls", choices=("1.2", "1.3"), default="1.3")
        q.add_argument("--tickets", type=int, default=2, help="TLS 1.3 tickets per handshake; 0 also sets OP_NO_TICKET")
    p.add_argument("--variants", default="asyncio,uvloop,bio,sock,plain")
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--key", choices=("ecdsa", "rsa"), default="ecdsa")
    p.add_argument("--rps", action="store_true", help="also wrk -c50 over HTTPS: req/s and CPU per request")
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--client-cpu", type=int, default=1)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve_main(args)
        return
    folder = Path(tempfile.mkdtemp(prefix="tls-memory-"))
    pem = certs.make(folder, args.key)
    print(f"TLS {args.tls}, {args.key} key, tickets {args.tickets}, {args.connections} idle connections "
          f"(one request each, a {args.body:,}-byte answer); KiB per connection", flush=True)
    print(f"{'variant':8s} {'RSS':>8s} {'malloc':>8s}" + (f" {'req/s':>8s} {'CPU us/req':>10s}" if args.rps else ""))
    for variant in args.variants.split(","):
        m = measure(variant, pem, args, folder)
        line = f"{variant:8s} {m['rss_kib']:8.1f} {m['malloc_kib']:8.1f}"
        if "rps" in m:
            line += f" {m['rps']:8.0f} {m['cpu_us']:10.1f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
