"""Master <-> worker messages: JSON lines over a socketpair."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

# Snapshots of many routes are large; one line may be several MiB.
LINE_LIMIT = 64 * 1024 * 1024


class Channel:
    """One end of a master/worker socketpair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_connection(sock=sock, limit=LINE_LIMIT)
        return cls(reader, writer)

    def send(self, message: dict[str, Any]) -> None:
        """Queue a message; never blocks the loop (the peer is our own process)."""
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None when the peer has gone."""
        try:
            line = await self.reader.readline()
        except (ConnectionError, ValueError):
            return None
        if not line:
            return None
        return json.loads(line)

    def close(self) -> None:
        self.writer.close()
