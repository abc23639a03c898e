"""The end of a loop turn (gatewayd/http/turn.py): upstream request heads are written
before client output, and both before the client reads put off under a flood."""

from __future__ import annotations

import asyncio
from typing import Any

from gatewayd.http.turn import CLIENT_READS, CLIENT_WRITES, UPSTREAM_WRITES, Turn


async def test_held_work_runs_at_the_end_of_the_turn_by_rank() -> None:
    """1. callbacks held in the reverse of their ranks 2. nothing runs while the
    turn's callbacks are still going 3. at its end: upstream writes, client
    writes, put-off reads, each rank in the order held."""
    turn = Turn()
    ran: list[str] = []
    turn.hold(CLIENT_READS, lambda: ran.append("read"))
    turn.hold(CLIENT_WRITES, lambda: ran.append("client 1"))
    turn.hold(UPSTREAM_WRITES, lambda: ran.append("upstream"))
    turn.hold(CLIENT_WRITES, lambda: ran.append("client 2"))
    assert ran == []
    await asyncio.sleep(0)
    assert ran == ["upstream", "client 1", "client 2", "read"]
    assert turn.turns == 1


async def test_writes_held_by_a_put_off_read_go_out_in_the_same_end() -> None:
    """1. a put-off read admits a request (an upstream head) and sheds one (a client
    answer) 2. both are written in the same end of turn, upstream first, with no
    second loop callback."""
    turn = Turn()
    ran: list[str] = []

    def read() -> None:
        ran.append("read")
        turn.hold(CLIENT_WRITES, lambda: ran.append("503"))
        turn.hold(UPSTREAM_WRITES, lambda: ran.append("head"))

    turn.hold(CLIENT_READS, read)
    await asyncio.sleep(0)
    assert ran == ["read", "head", "503"]
    await asyncio.sleep(0)
    assert turn.turns == 1


async def test_a_read_held_again_waits_for_the_next_turn() -> None:
    """1. a put-off read holds itself again (more clients wait than a turn takes)
    2. it does not run twice in one end 3. it runs at the next turn's end, after
    the writes that turn's I/O held."""
    turn = Turn()
    ran: list[str] = []
    rounds = 0

    def read() -> None:
        nonlocal rounds
        rounds += 1
        ran.append(f"read {rounds}")
        if rounds == 1:
            turn.hold(CLIENT_READS, read)
            asyncio.get_running_loop().call_soon(
                lambda: turn.hold(UPSTREAM_WRITES, lambda: ran.append("head")))

    turn.hold(CLIENT_READS, read)
    await asyncio.sleep(0)
    assert ran == ["read 1"]
    await asyncio.sleep(0)
    assert ran == ["read 1", "head", "read 2"]
    assert turn.turns == 2


async def test_a_failing_callback_holds_up_nobody() -> None:
    """1. one held callback raises 2. the others of its end still run 3. the loop's
    exception handler is told 4. work held later still runs."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        turn = Turn()
        ran: list[str] = []

        def broken() -> None:
            raise RuntimeError("broken flush")

        turn.hold(UPSTREAM_WRITES, broken)
        turn.hold(UPSTREAM_WRITES, lambda: ran.append("upstream"))
        turn.hold(CLIENT_WRITES, lambda: ran.append("client"))
        await asyncio.sleep(0)
        assert ran == ["upstream", "client"]
        assert [str(c["exception"]) for c in reported] == ["broken flush"]
        turn.hold(CLIENT_WRITES, lambda: ran.append("later"))
        await asyncio.sleep(0)
        assert ran == ["upstream", "client", "later"]
    finally:
        loop.set_exception_handler(None)


async def test_a_write_held_by_the_last_writes_is_not_lost() -> None:
    """1. a client write, run in the end's last pass, holds another 2. that one runs
    at the next turn's end instead of waiting for someone else to hold work."""
    turn = Turn()
    ran: list[str] = []

    def write() -> None:
        ran.append("first")
        turn.hold(CLIENT_WRITES, lambda: ran.append("second"))

    turn.hold(CLIENT_WRITES, write)
    await asyncio.sleep(0)
    assert ran == ["first"]
    await asyncio.sleep(0)
    assert ran == ["first", "second"]
