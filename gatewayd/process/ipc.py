"""Master <-> worker messages: JSON lines over a socketpair, every kind declared here.

The master sends ``start`` once, then ``call``s (a worker ``Command``); a worker
sends ``ready`` or ``boot_error`` once, then ``stats`` several times a second
and a ``reply`` to every call. Both ends are the same installed gatewayd, so
the format is free to change between versions.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any, Literal, NotRequired, TypedDict

from ..control.export import ProcessExport
from ..control.protocol import ClientRow, Waiter

# Snapshots of many routes are large; one line may be several MiB.
LINE_LIMIT = 64 * 1024 * 1024


# -- master -> worker --------------------------------------------------------------
class Start(TypedDict):
    """What a worker boots from: the configuration text the master validated, its place."""

    t: Literal["start"]
    text: str
    path: str
    index: int  # this worker's place among ``count``: its share of the limits
    count: int
    generation: int
    overrides: dict[str, dict[str, int]]  # the limits set by hand in force (runtime.limits)


class Prepare(TypedDict):
    """Build a reload of ``text`` beside the running generation (reply: ok, or why not)."""

    cmd: Literal["prepare"]
    text: str
    path: str


class Commit(TypedDict):
    """Swap the prepared reload in as ``generation``."""

    cmd: Literal["commit"]
    generation: int


class Abort(TypedDict):
    """Drop the prepared reload."""

    cmd: Literal["abort"]


class SetLimit(TypedDict):
    """A route's gateway-wide limits, by hand (None: unchanged)."""

    cmd: Literal["set_limit"]
    route: str
    max_concurrency: int | None
    max_queue: int | None


class Share(TypedDict):
    """This worker is ``index`` of ``count`` live workers: divide the limits again."""

    cmd: Literal["share"]
    index: int
    count: int


class Queue(TypedDict):
    """The route's waiters in this worker (reply: ``waiters``)."""

    cmd: Literal["queue"]
    route: str


class ServerState(TypedDict):
    """Set an upstream's server up or down by hand (reply: the control answer)."""

    cmd: Literal["server_state"]
    upstream: str
    server: str
    state: str


class Clients(TypedDict):
    """The route's clients in this worker (reply: ``clients``)."""

    cmd: Literal["clients"]
    route: str


Command = Prepare | Commit | Abort | SetLimit | Share | Queue | Clients | ServerState


class Call(TypedDict):
    t: Literal["call"]
    id: int
    command: Command


# -- worker -> master --------------------------------------------------------------
class Answer(TypedDict):
    """A worker's answer to a command: a control-protocol answer (``ok``, or ``error``)."""

    ok: bool
    error: NotRequired[str]
    waiters: NotRequired[list[Waiter]]  # queue
    clients: NotRequired[list[ClientRow]]  # clients
    upstream: NotRequired[str]  # server_state
    servers: NotRequired[list[str]]
    state: NotRequired[str]


class Reply(TypedDict):
    t: Literal["reply"]
    id: int
    answer: Answer


class Ready(TypedDict):
    t: Literal["ready"]
    pid: int


class BootError(TypedDict):
    """The worker could not start (it exits EXIT_BOOT): the master stops, not retries."""

    t: Literal["boot_error"]
    error: str


class Stats(TypedDict):
    """The worker's figures (control.snapshot.export), pushed; also its heartbeat."""

    t: Literal["stats"]
    export: ProcessExport


ToWorker = Start | Call
ToMaster = Ready | BootError | Stats | Reply


class Channel:
    """One end of a master/worker socketpair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock, limit=LINE_LIMIT)
        return cls(reader, writer)

    def send(self, message: ToWorker | ToMaster) -> None:
        """Queue a message; never blocks the loop (the peer is our own process)."""
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def receive(self) -> Any:
        """The next message (a ``ToWorker`` or a ``ToMaster``: the receiving end knows
        which), or None when the peer has gone."""
        try:
            line = await self.reader.readline()
        except (ConnectionError, ValueError):
            return None
        if not line:
            return None
        return json.loads(line)

    def close(self) -> None:
        self.writer.close()
