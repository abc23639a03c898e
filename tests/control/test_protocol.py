"""The control protocol's request checking (gatewayd.control.protocol): every refusal
a request can get, word for word, and what a refused request does to its connection."""

from __future__ import annotations

import asyncio
import json

import pytest

from gatewayd.control.protocol import check, decode

REFUSED = [
    (b"{", "malformed JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    (b"[1]", "expected a JSON object"),
    (b'{"cmd": 1}', 'expected a "cmd" string'),
    (b'{"cmd": "nope"}', "unknown cmd 'nope'; expected one of hello, snapshot, subscribe, reload, "
                         "set_limit, queue, clients, server_state"),
    (b'{"cmd": "subscribe", "interval": 0.01}', "interval: expected seconds >= 0.05 and <= 3600"),
    (b'{"cmd": "subscribe", "interval": true}', "interval: expected seconds >= 0.05 and <= 3600"),
    (b'{"cmd": "reload", "dry_run": 1}', "dry_run: expected true or false"),
    (b'{"cmd": "set_limit", "max_queue": 1}', "route: expected a route name"),
    (b'{"cmd": "set_limit", "route": "a", "max_concurrency": 0}',
     "max_concurrency: expected an integer >= 1 and <= 1000000"),
    (b'{"cmd": "set_limit", "route": "a", "max_concurrency": true}',
     "max_concurrency: expected an integer >= 1 and <= 1000000"),
    (b'{"cmd": "set_limit", "route": "a", "max_concurrency": 2, "max_queue": -1}',
     "max_queue: expected an integer >= 0 and <= 1000000"),
    (b'{"cmd": "set_limit", "route": "a", "max_queue": 1000001}',
     "max_queue: expected an integer >= 0 and <= 1000000"),
    (b'{"cmd": "set_limit", "route": "a", "max_concurrency": null}',
     "expected max_concurrency and/or max_queue"),
    (b'{"cmd": "queue"}', "route: expected a route name"),
    (b'{"cmd": "server_state", "upstream": "u", "server": "s"}',
     "expected upstream, server and state strings"),
]


def refusal(line: bytes) -> object:
    obj = decode(line)
    return obj if isinstance(obj, str) else check(obj)


@pytest.mark.parametrize(("line", "error"), REFUSED)
def test_refusals_word_for_word(line: bytes, error: str) -> None:
    assert refusal(line) == error


def test_checked_requests_carry_what_the_server_reads() -> None:
    assert check({"cmd": "snapshot", "histograms": 1}) == {"cmd": "snapshot", "histograms": False}
    assert check({"cmd": "subscribe"}) == {"cmd": "subscribe", "interval": 1.0, "histograms": False}
    assert check({"cmd": "reload"}) == {"cmd": "reload", "dry_run": False}
    assert check({"cmd": "set_limit", "route": "a", "max_queue": 0}) == {
        "cmd": "set_limit", "route": "a", "max_concurrency": None, "max_queue": 0}
    assert check({"cmd": "server_state", "upstream": "u", "server": "s", "state": "x", "more": 1}) == {
        "cmd": "server_state", "upstream": "u", "server": "s", "state": "x"}


async def test_a_refused_subscribe_closes_other_refusals_do_not(start_gateway, upstream):
    """1. a refused set_limit: the answer, then the connection still answers hello
    2. a refused subscribe: the answer, then the gateway closes the connection."""
    gw = await start_gateway(f"""
        [upstreams.app]
        servers = ["{upstream.url}"]

        [[routes]]
        name = "a"
        path_prefix = "/"
        upstream = "app"
    """)
    reader, writer = await asyncio.open_unix_connection(str(gw.socket_path))
    writer.write(b'{"cmd": "set_limit", "route": "a"}\n{"cmd": "hello"}\n')
    assert json.loads(await reader.readline()) == {"ok": False,
                                                   "error": "expected max_concurrency and/or max_queue"}
    assert json.loads(await reader.readline())["ok"] is True
    writer.write(b'{"cmd": "subscribe", "interval": 0}\n')
    assert json.loads(await reader.readline()) == {
        "ok": False, "error": "interval: expected seconds >= 0.05 and <= 3600"}
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
