"""What the socket worker tells the app: small dataclass messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message


@dataclass
class Connected(Message):
    """The socket answered ``hello``."""

    hello: dict[str, Any]
    at: float  # wall clock


@dataclass
class Disconnected(Message):
    """No connection: not there yet, refused, lost or not answering."""

    reason: str
    retry_in: float
    attempt: int  # the number of the next try: 1 after the first failure
    at: float
    waiting: bool = False  # the socket file does not exist (yet)


@dataclass
class SnapshotReceived(Message):
    snapshot: dict[str, Any]
    received: float  # time.monotonic()


@dataclass
class QueueReceived(Message):
    """The ``queue`` command's waiters for the X-ray's route."""

    route: str
    waiters: list[Any] = field(default_factory=list)


@dataclass
class CommandReply(Message):
    """The answer to a command the app asked for (reload, set_limit)."""

    request: dict[str, Any]
    reply: dict[str, Any]


@dataclass
class ClientsReceived(Message):
    """The answer to the ``clients`` command for the clients pane's route (``ok``
    false too: an older gatewayd says ``unknown cmd``)."""

    route: str
    reply: dict[str, Any]
