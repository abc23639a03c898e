"""The control socket: one JSON object per line each way (SPEC §5).

Every request line gets one answer line, ``{"ok": true, ...}`` or ``{"ok":
false, "error": "..."}``; a malformed line is answered and the connection goes
on; a line over 64 KiB is answered and the connection closed. ``subscribe``
then streams snapshots; a subscriber that does not read is skipped (its
snapshots coalesce into the next one it can take) and the skips are counted.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any, Protocol

from .. import __version__
from .encode import snapshot_json, without_histograms
from .protocol import (
    PROTOCOL,
    Answer,
    ClientsAnswer,
    ErrorAnswer,
    QueueAnswer,
    ReloadAnswer,
    Request,
    ServedSnapshot,
    ServerStateAnswer,
    SetLimitAnswer,
    Snapshot,
    SubscribeRequest,
    check,
    decode,
)

log = logging.getLogger("gatewayd")

MAX_MESSAGE = 64 * 1024  # bytes of one request line on the control socket; a longer one closes it
# A subscriber with this much unsent data gets no new snapshot until it reads.
SUBSCRIBER_BACKLOG = 1024 * 1024


class Controller(Protocol):
    """What the control socket calls into (a single runtime, or the master)."""

    def snapshot(self) -> Snapshot: ...
    async def reload(self, dry_run: bool) -> ReloadAnswer: ...
    async def set_limit(self, route: str, max_concurrency: int | None,
                        max_queue: int | None) -> SetLimitAnswer: ...
    async def queue(self, route: str) -> QueueAnswer: ...
    async def clients(self, route: str, top: int) -> ClientsAnswer: ...
    async def server_state(self, upstream: str, server: str, state: str) -> ServerStateAnswer: ...


class ControlError(Exception):
    """Start-up failure of the control socket (exit status 1)."""


class StartupRefused(ControlError):
    pass


def _check_directory(path: Path) -> None:
    parent = path.parent
    try:
        st = parent.stat()
    except OSError as exc:
        raise ControlError(f"control socket directory {parent}: {exc.strerror}") from None
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise ControlError(
            f"control socket directory {parent} is writable by others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); anyone could replace the socket: "
            f"'chmod o-w {parent}', or 'chmod +t {parent}' if others must write there "
            f"(as /tmp), or set control.socket to a path in a folder only gatewayd's user "
            f"can write"
        )


def prepare_path(path: Path) -> None:
    """Remove a stale socket file; refuse when a live gatewayd answers on it."""
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise ControlError(f"control socket path {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)  # stale: left by a process that died
            return
        raise ControlError(f"control socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ControlError(f"control socket {path} is in use by a live gatewayd; not starting")


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    def __init__(self, controller: Controller, path: Path, mode: int) -> None:
        self.controller = controller
        self.path = path
        self.mode = mode
        self.clients = 0
        self.dropped_snapshots = 0
        self.subscriber_backlog = SUBSCRIBER_BACKLOG
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        # the snapshot lines built in this turn of the loop, by "histograms": shared by
        # every subscriber (and snapshot request) served in the same turn
        self._lines: dict[bool, bytes] = {}

    async def start(self) -> None:
        _check_directory(self.path)
        prepare_path(self.path)
        # create the socket with its final mode: no window where it is wider
        old = os.umask(0o777 & ~self.mode)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_MESSAGE + 1
            )
        finally:
            os.umask(old)
        os.chmod(self.path, self.mode)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def snapshot(self, histograms: bool = False) -> ServedSnapshot:
        """The controller's snapshot plus the socket's own figures. Bucket counts
        (the bulk of a many-route snapshot) only when asked for: /metrics has them.
        The controller's route objects may be shared between snapshots: never
        modified here."""
        snap = self._served()
        return snap if histograms else without_histograms(snap)

    def build_line(self, histograms: bool = False) -> bytes:
        """``{"ok": true, "snapshot": {...}}`` and a newline, encoded now."""
        return snapshot_json(self._served(), histograms, '{"ok":true,"snapshot":', "}\n").encode()

    def _served(self) -> ServedSnapshot:
        return {**self.controller.snapshot(),
                "control": {"clients": self.clients, "dropped_snapshots": self.dropped_snapshots}}

    def snapshot_line(self, histograms: bool = False) -> bytes:
        """:meth:`build_line`, built once per turn of the event loop: subscribers whose
        ticks fall in the same turn (see ``_subscribe``) share it."""
        line = self._lines.get(histograms)
        if line is None:
            line = self.build_line(histograms)
            if not self._lines:
                asyncio.get_running_loop().call_soon(self._lines.clear)
            self._lines[histograms] = line
        return line

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.clients += 1
        try:
            uid = _peer_uid(writer)
            # a mode granting group or others access is the operator's choice: the
            # socket file's permissions (group membership included) then decide
            if uid is not None and uid not in (0, os.getuid()) and not self.mode & 0o077:
                await self._send(writer, {"ok": False, "error": "permission denied: peer uid differs"})
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, {"ok": False,
                                              "error": "line longer than 64 KiB; closing"})
                    return
                if not line:
                    return
                if len(line) > MAX_MESSAGE:
                    await self._send(writer, {"ok": False,
                                              "error": "line longer than 64 KiB; closing"})
                    return
                if not line.strip():
                    continue
                obj = decode(line)
                if isinstance(obj, str):
                    await self._send(writer, {"ok": False, "error": obj})
                    continue
                request = check(obj)
                if isinstance(request, str):
                    await self._send(writer, {"ok": False, "error": request})
                    if obj["cmd"] == "subscribe":
                        return  # a refused subscription ends the connection
                    continue
                if request["cmd"] == "subscribe":
                    await self._subscribe(request, reader, writer)
                    return
                if request["cmd"] == "snapshot":
                    try:
                        line = self.snapshot_line(request.get("histograms", False))
                    except Exception as exc:  # as _dispatch: the connection lives on
                        log.exception("control command 'snapshot' failed")
                        await self._send(writer, {"ok": False, "error": f"internal error: {exc}"})
                        continue
                    writer.write(line)
                    await writer.drain()
                    continue
                await self._send(writer, await self._dispatch(request))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self.clients -= 1
            self._handlers.discard(task)
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, obj: Answer) -> None:
        writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
        await writer.drain()

    async def _dispatch(self, req: Request) -> Answer:
        """The answer to a checked request (``subscribe`` is served by ``_subscribe``)."""
        c = self.controller
        try:
            if req["cmd"] == "hello":
                return {"ok": True, "version": __version__, "protocol": PROTOCOL, "pid": os.getpid()}
            if req["cmd"] == "snapshot":  # _serve answers it with snapshot_line, the same bytes
                return {"ok": True, "snapshot": self.snapshot(req.get("histograms", False))}
            if req["cmd"] == "reload":
                return await c.reload(req.get("dry_run", False))
            if req["cmd"] == "set_limit":
                return await c.set_limit(req["route"], req.get("max_concurrency"), req.get("max_queue"))
            if req["cmd"] == "queue":
                return await c.queue(req["route"])
            if req["cmd"] == "clients":
                return await c.clients(req["route"], req["top"])
            if req["cmd"] == "server_state":
                return await c.server_state(req["upstream"], req["server"], req["state"])
        except Exception as exc:  # a command must never take the connection down
            log.exception("control command %r failed", req["cmd"])
            return _refused(f"internal error: {exc}")
        return _refused(f"{req['cmd']}: not a command answered here")

    async def _subscribe(self, req: SubscribeRequest, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        interval = req.get("interval", 1.0)
        await self._send(writer, {"ok": True})
        histograms = req.get("histograms", False)
        # the client's next byte (or EOF) ends the subscription
        closed = asyncio.ensure_future(reader.read(1))
        transport = writer.transport
        loop = asyncio.get_running_loop()
        try:
            while not closed.done():
                if transport.get_write_buffer_size() > self.subscriber_backlog:
                    self.dropped_snapshots += 1
                else:
                    writer.write(self.snapshot_line(histograms))
                # ticks on a grid of the loop's clock, each timer due at the same instant
                # (call_at): subscribers with the same interval wake in the same turn of
                # the loop and share one snapshot line
                now = loop.time()
                tick = (math.floor(now / interval) + 1) * interval
                if tick - now < interval / 2:
                    tick += interval
                waker = loop.create_future()
                timer = loop.call_at(tick, _wake, waker)
                try:
                    await asyncio.wait([closed, waker], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    timer.cancel()
        finally:
            closed.cancel()


def _wake(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)


def _refused(error: str) -> ErrorAnswer:
    return {"ok": False, "error": error}
