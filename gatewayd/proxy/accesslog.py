"""The access log: combined or JSON lines, buffered, reopened on SIGUSR1.

Nothing is formatted when the log is off. Lines are buffered in memory and
written at most every 0.2 s (and at shutdown), so a busy gateway makes a few
write calls a second instead of one per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import IO

log = logging.getLogger("gatewayd")


class AccessLog:
    __slots__ = (
        "_buffer",
        "_fh",
        "_flush_handle",
        "_loop",
        "_stamp",
        "_stamp_second",
        "enabled",
        "fmt",
        "target",
    )

    def __init__(self, target: str, fmt: str) -> None:
        self.target = target  # "-", "off" or an absolute path
        self.fmt = fmt
        self.enabled = target != "off"
        self._fh: IO[bytes] | None = None
        self._buffer: list[str] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._stamp_second = -1
        self._stamp = ""
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        """Open (or reopen) the target; raises OSError for an unusable path."""
        self.close()
        if not self.enabled:
            return
        if self.target == "-":
            self._fh = os.fdopen(os.dup(sys.stdout.fileno()), "ab", buffering=0)
        else:
            self._fh = open(self.target, "ab", buffering=0)

    def reopen(self) -> None:
        """For logrotate (SIGUSR1): flush, close and open the same path again."""
        try:
            self.open()
            log.info("access log reopened: %s", self.target)
        except OSError as exc:
            log.error("cannot reopen access log %s: %s", self.target, exc)

    def close(self) -> None:
        self.flush()
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def flush(self) -> None:
        self._flush_handle = None
        if self._buffer and self._fh is not None:
            data = "".join(self._buffer).encode("utf-8", "backslashreplace")
            self._buffer.clear()
            try:
                self._fh.write(data)
            except OSError as exc:
                log.error("access log write failed: %s", exc)
        else:
            self._buffer.clear()

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._stamp_second:
            self._stamp_second = second
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now))
        return self._stamp

    def write(self, client: str, method: str, target: str, version: str, status: int,
              size: int, referer: str, agent: str, route: str, duration: float,
              reason: str | None, received: int | None = None) -> None:
        """One line. ``size``: bytes sent to the client; ``received``, for a tunnel only
        (its line is written when it ends): bytes from the client (JSON ``bytes_received``)."""
        if self.fmt == "json":
            entry = {
                "time": time.time(), "client": client, "method": method, "target": target,
                "version": version, "status": status, "bytes": size, "route": route,
                "duration_ms": round(duration * 1000, 3), "reason": reason,
                "referer": referer or None, "user_agent": agent or None,
            }
            if received is not None:
                entry["bytes_received"] = received
            line = json.dumps(entry) + "\n"
        else:
            q = _quote
            request = f"{q(method)} {q(target)} HTTP/{version}" if version != "-" else "-"
            line = (f'{client} - - [{self._timestamp()}] "{request}" '
                    f'{status} {size if size else "-"} "{q(referer) or "-"}" "{q(agent) or "-"}"\n')
        self._buffer.append(line)
        if self._flush_handle is None:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(0.2, self.flush)


def _quote(value: str) -> str:
    if '"' in value or "\\" in value or not value.isprintable():
        return value.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return value
