"""The end of an event-loop turn: output held during the turn, written in one order.

Writes are held to the end of a turn's callbacks and sent in one burst (each send
on loopback also wakes its reader, and a reader asleep on another CPU costs an
inter-processor interrupt, dear in a VM). The order of that burst matters when the
gateway is saturated: the request head for a slot that has just freed must not
wait behind the turn's client reads put off under a flood (``H1Server.admit_read``),
each of which sheds or queues a request. Held as separate ``loop.call_soon``
callbacks, the put-off reads came first: they re-arm themselves while the loop runs
its ready callbacks, so they lead the next turn, ahead of the writes the I/O of that
turn holds, and every slot stayed idle for their time (about 0.5 ms) on each cycle.
Here one callback does it all, always in this order: upstream request heads, then
client output, then the put-off reads, then what those reads wrote.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

UPSTREAM_WRITES = 0  # request heads to upstream servers (H1Pool)
CLIENT_WRITES = 1  # responses to clients (H1Server.flush)
CLIENT_READS = 2  # client reads put off to this turn (H1Server.admit_read)


class Turn:
    """Callbacks held to the end of this loop turn's callbacks, run there by rank."""

    __slots__ = ("_armed", "_held", "turns")

    def __init__(self) -> None:
        self._held: list[list[Callable[[], None]]] = [[], [], []]
        self._armed = False
        self.turns = 0  # ends of turn run (a loop turn with nothing held has none)

    def hold(self, rank: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` at the end of this turn, after those of lower ``rank``.
        Held again from a ``CLIENT_READS`` callback, it runs at the next turn's end."""
        self._held[rank].append(callback)
        if not self._armed:
            self._armed = True
            asyncio.get_running_loop().call_soon(self._end)

    def _end(self) -> None:
        self.turns += 1
        run = self._run
        run(UPSTREAM_WRITES)
        run(CLIENT_WRITES)
        if self._held[CLIENT_READS]:
            run(CLIENT_READS)  # a read held again from here waits for the next turn
            run(UPSTREAM_WRITES)
            run(CLIENT_WRITES)
        held = self._held
        if held[CLIENT_READS] or held[UPSTREAM_WRITES] or held[CLIENT_WRITES]:
            # (writes held by the last writes themselves, which none does now: not lost)
            asyncio.get_running_loop().call_soon(self._end)
        else:
            self._armed = False

    def _run(self, rank: int) -> None:
        held = self._held
        callbacks = held[rank]
        if callbacks:
            held[rank] = []
            for callback in callbacks:
                try:
                    callback()
                except Exception as exc:  # one broken callback must not hold up everyone's output
                    asyncio.get_running_loop().call_exception_handler(
                        {"message": "end-of-turn callback failed", "exception": exc})
