"""systemd's sd_notify protocol, without a library: datagrams to $NOTIFY_SOCKET.

Only the main process may notify (systemd's default ``NotifyAccess=main``):
with several workers the master alone calls these.
"""

from __future__ import annotations

import os
import socket
import time

# systemd reads its notify socket at once; never let a stuck reader stall the loop
_SEND_TIMEOUT = 1.0


def _address() -> str | None:
    """$NOTIFY_SOCKET as a socket address: a path, or ``@name`` (abstract namespace)."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if path.startswith("/"):
        return path
    if path.startswith("@") and len(path) > 1:
        return "\0" + path[1:]
    return None  # unset, or a kind we do not speak (vsock:)


def notify(*fields: str) -> bool:
    """Send ``READY=1``-style fields; False when not under systemd (or it failed)."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.sendto("\n".join(fields).encode(), address)
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
    return notify("STOPPING=1", "STATUS=stopping: finishing in-flight requests")
