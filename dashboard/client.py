"""The control socket, from the dashboard's side (SPEC §5).

One :class:`Feed` owns one connection: it asks for a snapshot every
``interval`` seconds, and between two snapshots sends the commands the app
queued (reload, set_limit), the X-ray's ``queue`` request and, about once a
second while the clients pane is shown, the ``clients`` request, one at a time,
each answered before the next. It posts what it learns as messages; when the
daemon is gone it says so and tries again with a growing delay.
"""

from __future__ import annotations

import asyncio
import errno
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual.message import Message

from .clients import CLIENTS_EVERY, CLIENTS_TOP, unknown_command
from .messages import ClientsReceived, CommandReply, Connected, Disconnected, QueueReceived, SnapshotReceived
from .model import dig, number

READ_LIMIT = 64 * 1024 * 1024  # a snapshot of many routes is one long line
REQUEST_TIMEOUT = 5.0  # a daemon that does not answer within this counts as gone
COMMAND_TIMEOUT = 60.0  # a reload may take a while (new upstreams, binds)
BACKOFF_MIN = 0.25
BACKOFF_MAX = 2.0
WAKE: dict[str, Any] = {}  # put among the commands: look again at what is due (the clients pane opened)


class ProtocolError(Exception):
    """The daemon answered something we cannot use; the connection is dropped."""


class Connection:
    """One Unix-socket connection: a JSON line out, a JSON line back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, path: Path, timeout: float = REQUEST_TIMEOUT) -> Connection:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=READ_LIMIT)
        return cls(reader, writer)

    async def request(self, obj: dict[str, Any], timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        self._writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        async with asyncio.timeout(timeout):
            await self._writer.drain()
            line = await self._reader.readline()
        if not line:
            raise ConnectionResetError("closed by gatewayd")
        if not line.endswith(b"\n"):
            raise ConnectionResetError("closed by gatewayd in the middle of an answer")
        try:
            answer = json.loads(line)
        except ValueError as exc:
            raise ProtocolError(f"not JSON: {exc}") from None
        if not isinstance(answer, dict):
            raise ProtocolError("the answer is not a JSON object")
        return answer

    def close(self) -> None:
        self._writer.close()


def describe(exc: BaseException) -> str:
    """A short reason for the status line."""
    if isinstance(exc, FileNotFoundError):
        return "no socket file (gatewayd not running?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (stale socket: gatewayd not running?)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, TimeoutError):
        return "gatewayd does not answer"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "gatewayd closed the connection (stopping or restarting?)"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, "") + (f": {exc.strerror}" if exc.strerror else "")
    return str(exc) or type(exc).__name__


class Feed:
    """Reads the control socket for the app. Run :meth:`run` in one worker."""

    def __init__(self, path: Path, post: Callable[[Message], Any], interval: float = 0.25) -> None:
        self.path = path
        self.post = post
        self.interval = interval
        self.xray_route: str | None = None  # set by the app: the selected route
        self.connected = False
        self._commands: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._clients_route: str | None = None  # the clients pane's route; None while it is hidden
        self._clients_asked: tuple[str, float] | None = None  # route and loop time of the last clients request
        self._clients_unknown = False  # this connection's gatewayd has no clients command

    def watch_clients(self, route: str | None) -> None:
        """Ask for ``route``'s clients about once a second from now on (at once for a
        new route); None: stop asking (the pane is hidden)."""
        if route == self._clients_route:
            return
        self._clients_route = route
        if route is not None and self.connected:
            self._commands.put_nowait(WAKE)

    def send(self, request: dict[str, Any]) -> None:
        """Queue a command; its answer comes back as :class:`CommandReply`."""
        if not self.connected:
            self.post(CommandReply(request, {"ok": False, "error": "not connected to gatewayd"}))
            return
        self._commands.put_nowait(request)

    async def run(self) -> None:
        delay = BACKOFF_MIN
        failures = 0  # in a row, since the last successful hello
        while True:
            conn = None
            reason = "connection closed"
            try:
                conn = await Connection.open(self.path)
                hello = await conn.request({"cmd": "hello"})
                if hello.get("ok") is not True:
                    raise ProtocolError(f"hello refused: {hello.get('error', 'no reason given')}")
                self.connected = True
                delay, failures = BACKOFF_MIN, 0
                self.post(Connected(hello, time.time()))
                await self._serve(conn)
            except (OSError, TimeoutError, ValueError, ProtocolError) as exc:  # ValueError: a line over the limit
                reason = describe(exc)
            finally:
                self.connected = False
                if conn is not None:
                    conn.close()
                self._fail_queued()
            failures += 1
            self.post(Disconnected(reason, delay, failures, time.time(), waiting=not self.path.exists()))
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _serve(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        self._clients_asked, self._clients_unknown = None, False  # another gatewayd, maybe a newer one
        while True:
            answer = await conn.request({"cmd": "snapshot"})
            snap = answer.get("snapshot")
            if answer.get("ok") is not True or not isinstance(snap, dict):
                raise ProtocolError(f"snapshot refused: {answer.get('error', 'no snapshot in the answer')}")
            self.post(SnapshotReceived(snap, time.monotonic()))
            await self._xray(conn, snap)
            next_tick = max(next_tick + self.interval, loop.time())
            while (left := next_tick - loop.time()) > 0:
                due = self._clients_due(loop.time())
                if due is not None and due <= 0:
                    await self._clients(conn)
                    continue
                try:
                    request = await asyncio.wait_for(self._commands.get(), left if due is None else min(left, due))
                except TimeoutError:
                    continue
                if request is WAKE:
                    continue
                try:
                    reply = await conn.request(request, COMMAND_TIMEOUT)
                except (OSError, TimeoutError, ValueError, ProtocolError) as exc:
                    self.post(CommandReply(request, {"ok": False, "error": f"no answer: {describe(exc)}"}))
                    raise
                self.post(CommandReply(request, reply))

    async def _xray(self, conn: Connection, snap: dict[str, Any]) -> None:
        """All the waiters of the selected route, when it has more than the snapshot lists."""
        route = self.xray_route
        if route is None:
            return
        r = next((r for r in snap.get("routes") or () if isinstance(r, dict) and r.get("name") == route), None)
        queued = number(dig(r, "queued"))
        summary = dig(r, "waiters")
        if not queued or (isinstance(summary, list) and len(summary) >= queued):
            return
        answer = await conn.request({"cmd": "queue", "route": route})
        if answer.get("ok") is True and isinstance(answer.get("waiters"), list):
            self.post(QueueReceived(route, answer["waiters"]))

    def _clients_due(self, now: float) -> float | None:
        """Seconds until the next clients request (0 or less: now); None: none to send."""
        route = self._clients_route
        if route is None or self._clients_unknown:
            return None
        if self._clients_asked is None or self._clients_asked[0] != route:
            return 0.0
        return self._clients_asked[1] + CLIENTS_EVERY - now

    async def _clients(self, conn: Connection) -> None:
        route = self._clients_route
        if route is None:
            return
        self._clients_asked = (route, asyncio.get_running_loop().time())
        answer = await conn.request({"cmd": "clients", "route": route, "top": CLIENTS_TOP})
        # an older gatewayd will not learn the command on this connection: stop asking
        self._clients_unknown = unknown_command(answer)
        self.post(ClientsReceived(route, answer))

    def _fail_queued(self) -> None:
        while not self._commands.empty():
            request = self._commands.get_nowait()
            if request is WAKE:
                continue
            self.post(CommandReply(request, {"ok": False, "error": "connection lost before the answer"}))
