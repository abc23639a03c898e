"""What a gatewayd process of any role (one process, master, worker) sets up the
same way: its log, its event loop, and its last moments."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gatewayd[%(process)d]: %(levelname)s: %(message)s"))
    root = logging.getLogger("gatewayd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # aiohttp logs client disconnects at debug; keep its errors visible
    logging.getLogger("aiohttp").addHandler(handler)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (faster accept, parse and write paths), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def ignore_late_signals(loop: asyncio.AbstractEventLoop) -> None:
    """The drain is over and the process is exiting: closing the loop would put
    SIGTERM back to its default action, and a second SIGTERM in that gap would
    turn a clean exit 0 into death by signal."""
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_IGN)
