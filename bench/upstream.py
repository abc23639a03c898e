"""A small HTTP/1.1 upstream on raw asyncio protocols, for the scenarios nginx
cannot play: a fixed service time with a fixed number of workers (overload),
and a record of when each request's connection closed (cancellation).

``/hold/<id>`` records the request's arrival and answers only after ``hold``
seconds; its connection closing before that is recorded as an abort. Any other
path is answered after ``delay`` seconds by one of ``slots`` workers (0: no
limit), first come first served; a queued request whose connection closed is
skipped, as a worker pool that checks its socket would. A request with a
body (Content-Length or chunked) is answered only once its whole body is in.

A request may carry ``X-Bench-Give-Up``: the ``time.monotonic()`` instant its
client gives up (the deadlines scenario); a worker that finishes such a request
after that instant counts it as ``late``, work done for nobody (whether or not
the proxy still holds the connection: the worker spent its slot either way).
The budget a request arrives with in ``X-Request-Timeout`` (seconds; what a
deadline-aware proxy passes on) is summed, to report its mean.

    python -m bench.upstream --port 9000 --delay 0.1 --slots 100
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import deque
from collections.abc import Callable
from typing import cast

from .servers import BODY

RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY


class Upstream:
    """The server; ``arrived``/``aborted`` map hold ids to ``time.monotonic()`` stamps."""

    def __init__(self, delay: float = 0.0, slots: int = 0, hold: float = 5.0) -> None:
        self.delay = delay
        self.slots = slots
        self.hold = hold
        self.busy = 0
        self.waiting: deque[_Conn] = deque()
        self.arrived: dict[int, float] = {}
        self.aborted: dict[int, float] = {}
        self.on_arrival: Callable[[int], None] | None = None
        self.on_abort: Callable[[int], None] | None = None
        self.served = 0
        self.tagged = 0  # served requests that carried X-Bench-Give-Up
        self.late = 0  # ... and were finished after it
        self.budgeted = 0  # requests received with X-Request-Timeout
        self.budget_ms = 0.0  # ... the sum of its values
        self._server: asyncio.Server | None = None

    async def start(self, port: int, host: str = "127.0.0.1") -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), host, port, backlog=4096)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    # -- the worker pool ----------------------------------------------------------
    def submit(self, conn: _Conn) -> None:
        if self.slots and self.busy >= self.slots:
            self.waiting.append(conn)
            return
        self._run(conn)

    def _run(self, conn: _Conn) -> None:
        self.busy += 1
        loop = asyncio.get_running_loop()
        if self.delay:
            loop.call_later(self.delay, self._done, conn)
        else:
            self._done(conn)

    def _done(self, conn: _Conn) -> None:
        self.busy -= 1
        give_up = conn.give_ups.popleft() if conn.give_ups else 0.0
        if give_up:
            self.tagged += 1
            if time.monotonic() > give_up:
                self.late += 1
        conn.respond()
        self.served += 1
        while self.waiting and (not self.slots or self.busy < self.slots):
            nxt = self.waiting.popleft()
            if not nxt.closed:
                self._run(nxt)


class _Conn(asyncio.Protocol):
    """One client connection; requests are handled one at a time, in order."""

    def __init__(self, server: Upstream) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.skip = 0  # request body bytes still to discard
        self.after_body: tuple[bytes, float] | None = None  # a request answered once its body is all in
        self.give_ups: deque[float] = deque()  # X-Bench-Give-Up of each request received (0: none)
        self.chunked = False  # in a chunked body's chunk-size lines
        self.pending = 0  # requests received, not yet answered
        self.hold_id: int | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        while True:
            if self.skip:
                n = min(self.skip, len(buf))
                buf, self.skip = buf[n:], self.skip - n
                if self.skip:
                    break
            if self.chunked:
                # a chunked body: skip each chunk (no trailers), its end ends the body
                line_end = buf.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(buf[:line_end].split(b";", 1)[0], 16)
                buf = buf[line_end + 2:]
                self.skip = size + 2
                if size:
                    continue
                self.chunked = False
                continue
            if self.after_body is not None:
                # as applications do: the whole body is read before the answer begins
                (path, give_up), self.after_body = self.after_body, None
                self._request(path, give_up)
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head, buf = buf[:end], buf[end + 4:]
            lower = head.lower()
            self.skip = _content_length(head)
            self.chunked = b"\r\ntransfer-encoding: chunked" in lower
            path = head.split(b" ", 2)[1]
            give_up = _header_float(lower, b"\r\nx-bench-give-up:")
            budget = _header_float(lower, b"\r\nx-request-timeout:")
            if budget:
                self.server.budgeted += 1
                self.server.budget_ms += budget * 1000
            if self.skip or self.chunked:
                self.after_body = path, give_up
            else:
                self._request(path, give_up)
        self.buf = buf

    def _request(self, path: bytes, give_up: float = 0.0) -> None:
        self.pending += 1
        server = self.server
        if path.startswith(b"/hold/"):
            rid = int(path[6:])
            self.hold_id = rid
            server.arrived[rid] = time.monotonic()
            if server.on_arrival is not None:
                server.on_arrival(rid)
            asyncio.get_running_loop().call_later(server.hold, self.respond)
            return
        self.give_ups.append(give_up)
        if self.pending == 1:
            server.submit(self)

    def respond(self) -> None:
        if self.closed or not self.pending or self.transport is None:
            return
        self.pending -= 1
        self.hold_id = None
        self.transport.write(RESPONSE)
        if self.pending:
            self.server.submit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        rid = self.hold_id
        if rid is not None and self.pending:
            self.server.aborted[rid] = time.monotonic()
            if self.server.on_abort is not None:
                self.server.on_abort(rid)


def _header_float(lower_head: bytes, name: bytes) -> float:
    """The value of header ``name`` (CRLF, lower-case name, colon) in a lower-cased request
    head as a number; 0.0 without it."""
    i = lower_head.find(name)
    if i < 0:
        return 0.0
    end = lower_head.find(b"\r\n", i + 2)
    try:
        return float(lower_head[i + len(name):end if end >= 0 else None])
    except ValueError:
        return 0.0


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.0, help="service time, seconds")
    p.add_argument("--slots", type=int, default=0, help="requests served at once (0: no limit)")
    p.add_argument("--hold", type=float, default=5.0, help="how long /hold/<id> requests are held")
    p.add_argument("--report", type=float, default=0.0,
                   help="every this many seconds print 'served PID MONOTONIC COUNT' and "
                        "'late PID MONOTONIC TAGGED LATE BUDGETED BUDGET_MS_SUM' (0: never)")
    args = p.parse_args()

    async def serve() -> None:
        up = Upstream(args.delay, args.slots, args.hold)
        await up.start(args.port)
        while True:
            if args.report:
                now = time.monotonic()
                print(f"served {os.getpid()} {now:.4f} {up.served}\n"
                      f"late {os.getpid()} {now:.4f} {up.tagged} {up.late} {up.budgeted} {up.budget_ms:.1f}",
                      flush=True)
            await asyncio.sleep(args.report or 3600)

    from .aio import run

    try:
        run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
