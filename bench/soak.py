"""Soak: a long, bounded run of mixed traffic with clients that give up at random
points, through gatewayd with several workers, reloaded every few seconds. At
the end the gateway must stand where it started: live tasks, open fds, pooled
upstream connections and RSS back within a small margin, and no 5xx but the
expected ones (admission 503s, should the route ever fill up).

    python -m bench.soak                      # 200 000 requests, 2 workers, reload every 10 s
    python -m bench.soak --requests 20000     # a quicker look
    python -m bench.soak --json out.json      # keep the figures
    python -m bench.soak --slow-readers 50    # memory held per client that never reads

Exit status 0 when every check held, 1 otherwise. Not part of the test suite.

Traffic, per client connection (keep-alive, 1-8 requests): 70 % small GETs,
10 % 256 KiB downloads, 10 % slow answers (20-200 ms), 10 % POSTs of 1-64 KiB.
A fifth of the connections abort once, at a random point: before sending
anything, in the middle of a request head, in the middle of a request body,
while waiting for a slow answer, or in the middle of a download, closing with
a FIN or a RST. The upstream (a raw asyncio server in its own process) counts
its open connections, which is the gateway's pool seen from outside.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from gatewayd.control.cli import call

ROOT = Path(__file__).resolve().parent.parent
SMALL = b"s" * 100
CHUNK = b"b" * 65536
BIG_KIB = 256
POOL_KEEPALIVE = 2.0  # the gateway's upstream keepalive_timeout in this run
ABORTS = ("before_request", "mid_head", "mid_body", "waiting", "mid_response")


# ----------------------------------------------------------------------------- the upstream
class UpstreamConn(asyncio.Protocol):
    """Minimal HTTP/1.1 server side: Content-Length bodies only (what gatewayd sends
    when it knows the length; chunked request bodies are read to their end too)."""

    open = 0

    def __init__(self) -> None:
        self.buf = b""
        self.transport: Any = None
        self.busy = False
        self.paused = False
        self.left = 0  # bytes of a large body still to write, as the client takes them

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        UpstreamConn.open += 1

    def connection_lost(self, exc: BaseException | None) -> None:
        UpstreamConn.open -= 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next()

    def _next(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            rest = self.buf[end + 4:]
            if fields.get("transfer-encoding", "").lower() == "chunked":
                size, pos = 0, 0
                while True:
                    eol = rest.find(b"\r\n", pos)
                    if eol < 0:
                        return
                    n = int(rest[pos:eol].split(b";")[0], 16)
                    if len(rest) < eol + 2 + n + 2:
                        return
                    size += n
                    pos = eol + 2 + n + 2
                    if n == 0:
                        break
                self.buf = rest[pos:]
            else:
                length = int(fields.get("content-length", "0"))
                if len(rest) < length:
                    return
                size = length
                self.buf = rest[length:]
            self._answer(lines[0].split(" ")[1], size)

    def _answer(self, target: str, body_size: int) -> None:
        assert self.transport is not None
        if target.startswith("/__stats"):
            body = json.dumps({"open": UpstreamConn.open - 1}).encode()
        elif target.startswith("/big"):
            kib = int(target.split("kib=")[1]) if "kib=" in target else BIG_KIB
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (kib * 1024))
            self.busy = True
            self.left = kib * 1024
            self._stream()
            return
        elif target.startswith("/post"):
            body = b"%d\n" % body_size
        else:
            body = SMALL
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        if target.startswith("/slow"):
            ms = int(target.split("ms=")[1]) if "ms=" in target else 50
            self.busy = True
            asyncio.get_running_loop().call_later(ms / 1000, self._late, head + body)
            return
        self.transport.write(head + body)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._stream()

    def _stream(self) -> None:
        while self.left and not self.paused and self.transport is not None:
            n = min(self.left, len(CHUNK))
            self.transport.write(CHUNK[:n])
            self.left -= n
        if not self.left and self.busy:
            self.busy = False
            self._next()

    def _late(self, data: bytes) -> None:
        self.busy = False
        if self.transport is not None:
            self.transport.write(data)
            self._next()


async def serve_upstream(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamConn, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


# ----------------------------------------------------------------------------- gatewayd
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, port: int, upstream_port: int, workers: int, generation: int) -> None:
    # the reload alternates queue_timeout: a real change each time, applied in place
    path.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
workers = {workers}
request_header_timeout = 5.0
request_body_timeout = 5.0
keepalive_timeout = 15.0

[control]
socket = "gw.sock"

[log]
access_log = "off"
level = "warning"

[upstreams.app]
servers = ["http://127.0.0.1:{upstream_port}"]
keepalive_timeout = {POOL_KEEPALIVE}
read_timeout = 10.0

[[routes]]
name = "app"
upstream = "app"
max_concurrency = 1000
max_queue = 1000
queue_timeout = {2.0 + (generation % 2) * 0.5}
""")


def control(sock: Path, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    return call(sock, request, timeout)


def proc_figures(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/statm") as fh:
        rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"rss_bytes": rss, "open_fds": len(os.listdir(f"/proc/{pid}/fd"))}


# ----------------------------------------------------------------------------- the load
class Load:
    def __init__(self, port: int, total: int, abort_share: float, seed: int) -> None:
        self.port = port
        self.total = total
        self.abort_share = abort_share
        self.rng = random.Random(seed)
        self.issued = 0
        self.statuses: Counter[int] = Counter()
        self.reasons: Counter[str] = Counter()
        self.aborts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.connections = 0

    def _request(self, kind: str) -> tuple[bytes, bytes]:
        rng = self.rng
        if kind == "post":
            size = rng.randint(1024, 65536)
            return (b"POST /post HTTP/1.1\r\nHost: soak\r\nContent-Length: %d\r\n\r\n" % size, b"p" * size)
        if kind == "big":
            return b"GET /big HTTP/1.1\r\nHost: soak\r\n\r\n", b""
        if kind == "slow":
            return b"GET /slow?ms=%d HTTP/1.1\r\nHost: soak\r\n\r\n" % rng.randint(20, 200), b""
        return b"GET /small HTTP/1.1\r\nHost: soak\r\n\r\n", b""

    async def client(self) -> None:
        rng = self.rng
        n = rng.randint(1, 8)
        abort = rng.choice(ABORTS) if rng.random() < self.abort_share else None
        abort_at = rng.randrange(n)
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.connections += 1
        try:
            for i in range(n):
                if self.issued >= self.total:
                    return
                self.issued += 1
                point = abort if i == abort_at else None
                kind = rng.choices(("small", "big", "slow", "post"), (70, 10, 10, 10))[0]
                if point == "mid_body":
                    kind = "post"
                elif point == "waiting":
                    kind = "slow"
                elif point == "mid_response":
                    kind = "big"
                head, body = self._request(kind)
                if point == "before_request":
                    return self._abort(writer, point)
                if point == "mid_head":
                    writer.write(head[: rng.randrange(1, len(head) - 2)])
                    await writer.drain()
                    return self._abort(writer, point)
                if point == "mid_body":
                    writer.write(head + body[: rng.randrange(1, len(body))])
                    await writer.drain()
                    return self._abort(writer, point)
                writer.write(head + body)
                if point == "waiting":
                    await asyncio.sleep(0.01)
                    return self._abort(writer, point)
                status, reason = await self._response(reader, partial=point == "mid_response")
                if point == "mid_response":
                    return self._abort(writer, point)
                self.statuses[status] += 1
                if reason:
                    self.reasons[f"{status} {reason}"] += 1
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.errors[type(exc).__name__] += 1
        finally:
            writer.close()

    def _abort(self, writer: asyncio.StreamWriter, point: str) -> None:
        self.aborts[point] += 1
        if self.rng.random() < 0.5:  # half with a RST
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _response(self, reader: asyncio.StreamReader, partial: bool) -> tuple[int, str | None]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        length = int(fields.get("content-length", "0"))
        if partial:
            await reader.readexactly(min(length, 10_000))
            return status, None
        if fields.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            await reader.readexactly(length)
        return status, fields.get("x-gatewayd-reason")

    async def run(self, clients: int) -> None:
        async def loop() -> None:
            while self.issued < self.total:
                try:
                    await self.client()
                except OSError as exc:
                    self.errors[f"connect: {exc.strerror}"] += 1
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(loop() for _ in range(clients)))


# ----------------------------------------------------------------------------- the run
def figures(sock: Path, master: int, upstream_port: int) -> dict[str, Any]:
    snap = control(sock, {"cmd": "snapshot"})["snapshot"]
    with socket.create_connection(("127.0.0.1", upstream_port), timeout=5) as s:
        s.sendall(b"GET /__stats HTTP/1.1\r\nHost: soak\r\n\r\n")
        data = b""
        while b"}" not in data:
            data += s.recv(4096)
    pooled = json.loads(data.split(b"\r\n\r\n", 1)[1])["open"]
    workers = sorted(snap["workers"], key=lambda w: w["index"])
    return {
        "generation": snap["generation"],
        "connections": snap["connections"],
        "pooled_upstream_connections": pooled,
        "master": proc_figures(master),
        "workers": [{k: w[k] for k in ("pid", "tasks", "open_fds", "rss_bytes", "connections", "in_flight")}
                    for w in workers],
        "tasks": sum(w["tasks"] for w in workers),
        "open_fds": sum(w["open_fds"] for w in workers),
        "rss_bytes": sum(w["rss_bytes"] for w in workers),
        "routes": {r["name"]: {"codes": r["codes"], "cancelled": r["cancelled"],
                               "upstream_errors": r["upstream_error_reasons"], "requests": r["requests"]}
                   for r in snap["routes"]},
    }


async def quiesce(sock: Path, master: int, upstream_port: int) -> dict[str, Any]:
    """Wait until nothing is in flight and idle pooled connections timed out; the figures."""
    deadline = time.monotonic() + 60
    while True:
        f = figures(sock, master, upstream_port)
        if f["connections"] == 0 and all(w["in_flight"] == 0 for w in f["workers"]):
            break
        if time.monotonic() > deadline:
            return f
        await asyncio.sleep(0.5)
    pooled_idle = f["pooled_upstream_connections"]  # kept alive, idle, before their timeout
    await asyncio.sleep(POOL_KEEPALIVE + 1.5)
    return {**figures(sock, master, upstream_port), "pooled_before_idle_timeout": pooled_idle}


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="gatewayd-soak-"))
    upstream_port, port = free_port(), free_port()
    config = tmp / "gatewayd.toml"
    sock = tmp / "gw.sock"
    write_config(config, port, upstream_port, args.workers, 1)
    up = subprocess.Popen([sys.executable, "-m", "bench.soak", "--serve-upstream", str(upstream_port)], cwd=ROOT)
    gw = subprocess.Popen([sys.executable, "-m", "gatewayd", "--config", str(config)], cwd=ROOT,
                          stderr=open(tmp / "gatewayd.stderr", "wb"))
    result: dict[str, Any] = {"requests": args.requests, "clients": args.clients, "workers": args.workers,
                              "abort_share": args.abort_share, "reload_every_s": args.reload_every}
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() or not _answers(sock):
            if time.monotonic() > deadline or gw.poll() is not None:
                raise SystemExit(f"gatewayd did not start: {(tmp / 'gatewayd.stderr').read_text()}")
            await asyncio.sleep(0.1)
        # warm up (imports, pools, allocator), then the baseline at rest
        warm = Load(port, 2000, 0.0, args.seed + 1)
        await warm.run(args.clients)
        start = await quiesce(sock, gw.pid, upstream_port)
        result["start"] = start

        load = Load(port, args.requests, args.abort_share, args.seed)
        reloads: list[dict[str, Any]] = []

        async def reloader() -> None:
            generation = 1
            while True:
                await asyncio.sleep(args.reload_every)
                generation += 1
                write_config(config, port, upstream_port, args.workers, generation)
                answer = await asyncio.to_thread(control, sock, {"cmd": "reload"})
                reloads.append({"ok": answer.get("ok"), "error": answer.get("error")})

        t0 = time.monotonic()
        task = asyncio.create_task(reloader())
        try:
            await asyncio.wait_for(load.run(args.clients), args.max_seconds)
        except TimeoutError:
            result["stopped_early"] = True
        finally:
            task.cancel()
        elapsed = time.monotonic() - t0
        end = await quiesce(sock, gw.pid, upstream_port)
        result.update({
            "elapsed_s": round(elapsed, 1), "issued": load.issued, "rate_per_s": round(load.issued / elapsed),
            "client_connections": load.connections, "statuses": dict(load.statuses),
            "gateway_reasons": dict(load.reasons), "aborts": dict(load.aborts),
            "client_errors": dict(load.errors), "reloads": len(reloads),
            "reloads_failed": [r for r in reloads if not r["ok"]], "end": end,
            "gatewayd_alive": gw.poll() is None,
            "stderr_tracebacks": (tmp / "gatewayd.stderr").read_text(errors="replace").count("Traceback"),
        })
        result["checks"] = checks(result)
        return result
    finally:
        for p in (gw, up):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()


def _answers(sock: Path) -> bool:
    try:
        return bool(control(sock, {"cmd": "hello"}, timeout=1)["ok"])
    except OSError:
        return False


def checks(r: dict[str, Any]) -> dict[str, bool]:
    s, e = r["start"], r["end"]
    expected_5xx = {"queue_full", "queue_timeout"}
    unexpected_5xx = sum(n for code, n in r["statuses"].items() if code >= 500) - sum(
        n for key, n in r["gateway_reasons"].items() if key.startswith("503 ") and key[4:] in expected_5xx)
    return {
        "no unexpected 5xx": unexpected_5xx == 0,
        "every reload ok": not r["reloads_failed"] and r["reloads"] > 0,
        "gatewayd alive, no traceback": r["gatewayd_alive"] and r["stderr_tracebacks"] == 0,
        "nothing in flight at the end": e["connections"] == 0 and all(w["in_flight"] == 0 for w in e["workers"]),
        "tasks back (+-2 per worker)": abs(e["tasks"] - s["tasks"]) <= 2 * len(e["workers"]),
        "fds back (+-2 per worker)": abs(e["open_fds"] - s["open_fds"]) <= 2 * len(e["workers"])
        and abs(e["master"]["open_fds"] - s["master"]["open_fds"]) <= 2,
        "pooled connections back": e["pooled_upstream_connections"] <= s["pooled_upstream_connections"],
        "RSS back (within 20 % or 16 MiB)": e["rss_bytes"] <= max(s["rss_bytes"] * 1.2, s["rss_bytes"] + (16 << 20)),
    }


async def slow_readers(args: argparse.Namespace) -> dict[str, Any]:
    """RSS of one worker holding ``n`` clients that asked for 64 MiB each and read nothing."""
    tmp = Path(tempfile.mkdtemp(prefix="gatewayd-slowread-"))
    upstream_port, port = free_port(), free_port()
    config = tmp / "gatewayd.toml"
    sock = tmp / "gw.sock"
    write_config(config, port, upstream_port, 1, 1)
    up = subprocess.Popen([sys.executable, "-m", "bench.soak", "--serve-upstream", str(upstream_port)], cwd=ROOT)
    gw = subprocess.Popen([sys.executable, "-m", "gatewayd", "--config", str(config)], cwd=ROOT)
    clients: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() or not _answers(sock):
            if time.monotonic() > deadline:
                raise SystemExit("gatewayd did not start")
            await asyncio.sleep(0.1)
        warm = Load(port, 500, 0.0, 1)
        await warm.run(16)
        before = control(sock, {"cmd": "snapshot"})["snapshot"]["workers"][0]["rss_bytes"]
        for _ in range(args.slow_readers):
            c = socket.socket()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            c.connect(("127.0.0.1", port))
            c.sendall(b"GET /big?kib=65536 HTTP/1.1\r\nHost: soak\r\n\r\n")
            clients.append(c)
        samples = []
        for _ in range(15):
            await asyncio.sleep(1)
            w = control(sock, {"cmd": "snapshot"})["snapshot"]["workers"][0]
            samples.append(w["rss_bytes"])
        growth = samples[-1] - before
        return {"slow_readers": args.slow_readers, "rss_before": before, "rss_samples": samples,
                "rss_per_reader_kib": round(growth / args.slow_readers / 1024),
                "rss_last_5s_change_kib": round((samples[-1] - samples[-6]) / 1024)}
    finally:
        for c in clients:
            c.close()
        for p in (gw, up):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--clients", type=int, default=64, help="concurrent client connections")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--abort-share", type=float, default=0.2, help="share of connections that abort once")
    p.add_argument("--reload-every", type=float, default=10.0, help="seconds between reloads")
    p.add_argument("--max-seconds", type=float, default=1800.0, help="stop the load after this long")
    p.add_argument("--seed", type=int, default=9)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--slow-readers", type=int, metavar="N",
                   help="instead: measure a worker's RSS with N clients that never read a 64 MiB answer")
    p.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        import uvloop
        new_loop = uvloop.new_event_loop
    except ImportError:
        new_loop = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=new_loop) as runner:
        if args.serve_upstream:
            runner.run(serve_upstream(args.serve_upstream))
            return 0
        if args.slow_readers:
            print(json.dumps(runner.run(slow_readers(args)), indent=2))
            return 0
        result = runner.run(soak(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    failed = [name for name, ok in result["checks"].items() if not ok]
    print("soak:", "all checks held" if not failed else "FAILED: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
