"""``max_connections_per_client`` (SPEC §10): open connections per client address,
over it a 429 client_connections_full and the connection closed at once; counted
in the snapshot; set and lifted by reload; divided among workers. Clients come from
loopback addresses 127.0.0.N."""

from __future__ import annotations

import asyncio
from typing import Any

from ..builders import app_route, gateway_config
from ..conftest import status_of, wait_for

GET = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"


class Client:
    """One keep-alive connection from 127.0.0.``n``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, n: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{n}", 0))
        return cls(reader, writer)

    async def get(self) -> bytes:
        """One request; its response head and body (``ok``), or what came before the close."""
        self.writer.write(GET)
        await self.writer.drain()
        async with asyncio.timeout(5):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            return head + await self.reader.readexactly(length)

    async def unasked(self) -> bytes:
        """Everything the server sends before it closes, asking nothing."""
        async with asyncio.timeout(5):
            return await self.reader.read()

    def close(self) -> None:
        self.writer.close()


async def test_connections_over_the_cap_are_answered_429_and_closed(start_gateway, upstream):
    """1. max_connections_per_client = 3: client 2 opens three keep-alive connections,
    each served 2. its fourth gets 429 client_connections_full unasked, and is closed
    3. client 3's connections are not affected 4. one of client 2's closes: its next
    connection is served 5. counted: client_connections_refused, unrouted 429."""
    gw = await start_gateway(app_route(upstream.url), max_connections_per_client=3)
    server = gw.runtime.server
    mine = [await Client.open(gw.port, 2) for _ in range(3)]
    for c in mine:
        assert status_of(await c.get()) == 200
    fourth = await Client.open(gw.port, 2)
    refused = await fourth.unasked()
    assert status_of(refused) == 429 and b"X-Gatewayd-Reason: client_connections_full" in refused
    assert b"Connection: close" in refused
    others = [await Client.open(gw.port, 3) for _ in range(3)]
    for c in others:
        assert status_of(await c.get()) == 200
    assert server.client_connections("127.0.0.2") == 3 and server.client_connections("127.0.0.3") == 3
    mine.pop().close()
    await wait_for(lambda: server.client_connections("127.0.0.2") == 2)
    again = await Client.open(gw.port, 2)
    assert status_of(await again.get()) == 200
    snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
    assert snap["client_connections_refused"] == 1
    assert snap["workers"][0]["client_connections_refused"] == 1
    assert snap["unrouted"] == {"429": 1}
    for c in [*mine, *others, again, fourth]:
        c.close()
    await wait_for(lambda: server.client_connections("127.0.0.2") == 0 == server.client_connections("127.0.0.3"))
    assert gw.runtime.connections == 0


async def test_a_reload_sets_and_lifts_the_cap(start_gateway, upstream, tmp_path):
    """1. no cap: client 2 opens three connections, nothing is counted 2. a reload sets
    the cap to 2: the three stay open and are counted, a fourth is refused 3. a reload
    lifts it: a fourth is served and nothing is counted."""
    body = app_route(upstream.url)
    gw = await start_gateway(body)
    server = gw.runtime.server
    mine = [await Client.open(gw.port, 2) for _ in range(3)]
    for c in mine:
        assert status_of(await c.get()) == 200
    assert server.client_connections("127.0.0.2") == 0

    async def reload(**keys: Any) -> None:
        gateway_config(tmp_path, body, port=gw.port, **keys)
        answer = await gw.command({"cmd": "reload"})
        assert answer["ok"], answer

    await reload(max_connections_per_client=2)
    assert server.client_connections("127.0.0.2") == 3
    for c in mine:
        assert status_of(await c.get()) == 200
    over = await Client.open(gw.port, 2)
    assert status_of(await over.unasked()) == 429
    over.close()
    await reload()
    fourth = await Client.open(gw.port, 2)
    assert status_of(await fourth.get()) == 200
    assert server.client_connections("127.0.0.2") == 0 and not server._counted
    for c in [*mine, fourth]:
        c.close()


async def test_two_workers_hold_a_client_to_the_cap_gateway_wide(gateway_process, upstream):
    """workers = 2, max_connections_per_client = 4: each worker enforces its share (2),
    whichever worker the kernel gives a connection to. 1. client 2 opens ten
    connections and asks on each 2. at most four are served, at least two (one worker's
    share); the rest were answered 429 and closed 3. the snapshot counts the refusals."""
    gw = gateway_process(app_route(upstream.url), workers=2, max_connections_per_client=4)
    port = int(gw.config_path.read_text().split("127.0.0.1:", 1)[1].split('"', 1)[0])

    def snapshot() -> dict[str, Any]:
        return gw.command({"cmd": "snapshot"})["snapshot"]

    await wait_for(lambda: len(snapshot()["workers"]) == 2, timeout=10)
    clients = [await Client.open(port, 2) for _ in range(10)]
    served = 0
    for c in clients:
        try:
            response = await c.get()
        except (asyncio.IncompleteReadError, ConnectionError):
            continue  # refused: the 429 was lost to the reset of the unread request
        if status_of(response) == 200:
            served += 1
        else:
            assert status_of(response) == 429
    assert 2 <= served <= 4, served
    # (workers send their figures to the master a few times a second)
    await wait_for(lambda: snapshot()["client_connections_refused"] == 10 - served)
    for c in clients:
        c.close()
