"""systemd's sd_notify protocol, without a library: datagrams to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> bool:
    """Send ``READY=1``-style fields; False when not under systemd (or it failed)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), path)
        return True
    except OSError:
        return False


def ready() -> bool:
    return notify("READY=1", f"STATUS=serving, pid {os.getpid()}")


def reloading() -> bool:
    # systemd >= 253 needs MONOTONIC_USEC with RELOADING=1, or `systemctl reload` hangs
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")
