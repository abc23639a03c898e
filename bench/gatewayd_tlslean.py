"""gatewayd with its TLS listener's opener swapped for bench/tls_lean.py's (OpenSSL
on the socket instead of uvloop's TLS transport): for the tls scenario's
``gatewayd-lean`` row and conn_memory's ``--lean`` only; never a way to run it.

    python -m bench.gatewayd_tlslean --config FILE
"""

from __future__ import annotations

import asyncio
import socket
import sys

from gatewayd.http import tls
from gatewayd.http.listener import ProtocolFactory
from gatewayd.process.cli import main

from .tls_lean import open_tls


async def _open(self: tls.TlsOpener, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                factory: ProtocolFactory) -> object:
    t = self.terminator
    secure = tls._Secure(factory)
    try:
        await open_tls(loop, conn, t.context, secure, t.handshake_timeout)
    except asyncio.CancelledError:
        if secure.made:
            t.counts.handshakes += 1
            return None
        raise
    except Exception:
        t.counts.errors += 1
        raise
    t.counts.handshakes += 1
    return None


def patch() -> None:
    tls.TlsOpener.open = _open  # type: ignore[method-assign]


if __name__ == "__main__":
    patch()
    sys.exit(main())
