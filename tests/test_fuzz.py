"""Fuzzing a live gatewayd (a real subprocess, production wiring) with hypothesis:

- control-socket lines: any bytes get one ``{"ok": false, "error": ...}`` answer
  (or, over 64 KiB, an answer and a close), the connection stays usable, and the
  daemon is unaffected;
- raw request bytes, mutated from the malformed-request corpus and from valid
  requests: never a 5xx (the upstream is healthy, so any 5xx would be the
  gateway's own failure), never a crash or a traceback, never an ambiguous
  request at the upstream, and every connection released at the end;
- request paths made of dots, slashes and escapes: answered 200 or 400, and a
  forwarded path has no dot-segment however its upstream decodes it.

Runs are derandomized (the same examples every time) and keep no database;
``GATEWAYD_FUZZ_EXAMPLES`` sets the number of examples per property (300).
The configuration files have their own hypothesis test in config/test_config.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from .builders import app_route
from .conftest import GatewayProcess, wait_for_sync
from .faults import RawUpstream, ThreadedUpstream
from .http.test_requests import CASES, load

# GATEWAYD_FUZZ_EXAMPLES=5000 for a longer run (docs/RELIABILITY.md)
FUZZ = settings(max_examples=int(os.environ.get("GATEWAYD_FUZZ_EXAMPLES", "300")), deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Live:
    def __init__(self, gp: GatewayProcess, relay: RawUpstream) -> None:
        self.gp = gp
        self.relay = relay
        self.port = int(gp.config_path.read_text().split("127.0.0.1:")[1].split('"')[0])
        self.pid = gp.command({"cmd": "hello"})["pid"]
        self.sent = 0

    def snapshot(self) -> dict[str, Any]:
        return self.gp.command({"cmd": "snapshot"})["snapshot"]

    def unaffected(self) -> None:
        """Same process, answering, nothing held, no traceback logged."""
        assert self.gp.proc is not None and self.gp.proc.poll() is None
        assert self.gp.command({"cmd": "hello"})["pid"] == self.pid

        def released() -> bool:
            snap = self.snapshot()
            return snap["connections"] == 0 and all(r["in_flight"] == 0 and r["queued"] == 0
                                                    for r in snap["routes"])

        wait_for_sync(released, timeout=5)
        assert "Traceback" not in self.gp.stderr(), self.gp.stderr()[-3000:]


@pytest.fixture
def live(gateway_process) -> Iterator[Live]:
    upstream = ThreadedUpstream()
    relay = upstream.start()
    try:
        gp = gateway_process(app_route(relay.url, {"read_timeout": 5.0}), request_header_timeout=0.5,
                             request_body_timeout=0.5, request_body_min_rate=1_000_000, keepalive_timeout=0.5,
                             max_body_size=100_000)
        yield Live(gp, relay)
    finally:
        upstream.stop()


# ----------------------------------------------------------------------------- control socket
def _control_exchange(path: Path, data: bytes) -> list[bytes]:
    """Send ``data`` then a hello on one connection, then end it; every answer line."""
    buf = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        try:
            s.sendall(data + b'{"cmd": "hello"}\n')
            s.shutdown(socket.SHUT_WR)  # the daemon answers what it read, then closes
        except OSError:
            pass  # an over-long line: the daemon answered and closed before reading it all
        while chunk := s.recv(65536):
            buf += chunk
    return buf.splitlines()


def _check_control_answers(live: Live, line: bytes, answers: list[bytes]) -> None:
    live.sent += 1
    if len(line) > 64 * 1024:
        assert len(answers) == 1, answers  # the error, then the connection is closed
        got = json.loads(answers[0])
        assert got["ok"] is False and "64 KiB" in got["error"]
        return
    hello = json.loads(answers[-1])
    assert hello["ok"] is True and hello["pid"] == live.pid, answers  # the connection stayed usable
    if not line.strip():
        assert len(answers) == 1, answers  # a blank line is skipped
        return
    assert len(answers) == 2, answers
    got = json.loads(answers[0])
    assert isinstance(got, dict) and isinstance(got.get("ok"), bool), got
    if not got["ok"]:
        assert isinstance(got.get("error"), str) and got["error"], got


@FUZZ
@given(st.binary(max_size=512))
@example(b"\xff\xfe{\"cmd\"")
@example(b"{" * 5000)
@example(b"[" * 100_000)
@example(b'{"cmd": "hello", "x": "' + b"a" * 70_000 + b'"}')
@example(b"\x00")
@example(b"   \t ")
def test_control_socket_any_bytes(live: Live, data: bytes) -> None:
    line = data.replace(b"\n", b" ")
    _check_control_answers(live, line, _control_exchange(live.gp.socket_path, line + b"\n"))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# every command but subscribe (which streams until the client closes)
_CMDS = st.sampled_from(["hello", "snapshot", "reload", "set_limit", "queue", "server_state", "nope", ""])
_KEYS = st.sampled_from(["route", "max_concurrency", "max_queue", "dry_run", "upstream", "server", "state",
                         "interval", "cmd"])


@st.composite
def commands(draw: st.DrawFn) -> Any:
    """A JSON value; mostly an object with a known or unknown cmd and odd arguments."""
    if draw(st.integers(0, 3)) == 0:
        return draw(_JSON)
    obj = draw(st.dictionaries(_KEYS, _JSON | st.sampled_from(["app", "nope", 0, 1, -1, 10**9]), max_size=4))
    obj["cmd"] = draw(_CMDS | _JSON)
    return obj


@FUZZ
@given(commands())
def test_control_socket_any_json(live: Live, obj: Any) -> None:
    line = json.dumps(obj).encode()
    _check_control_answers(live, line, _control_exchange(live.gp.socket_path, line + b"\n"))


def test_control_fuzz_left_the_daemon_unaffected(live: Live) -> None:
    """After a burst of garbage the daemon still serves traffic and its snapshot."""
    for line in (b"\xff" * 100, b'{"cmd": 1}', b"[]", b'{"cmd": "set_limit", "route": "app", "max_queue": -1}'):
        _check_control_answers(live, line, _control_exchange(live.gp.socket_path, line + b"\n"))
    status = _exchange(live.port, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == [200]
    assert live.snapshot()["routes"][0]["max_queue"] == 1000  # the refused set_limit changed nothing
    live.unaffected()


# ----------------------------------------------------------------------------- raw requests
_END = b"GET /__end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
_SEEDS = [load(name)[0] for name in CASES if len(load(name)[0]) < 4096] + [
    b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
]
_PIECES = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"\0", b",", b";", b"0", b"5", b"f", b"\xff", b"\r\n\r\n",
           b"chunked", b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n", b"Host: y\r\n",
           b"Expect: 100-continue\r\n", b"Connection: close\r\n", b"HTTP/1.1", b"GET / HTTP/1.1\r\n"]


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate"]))
        if op == "insert":
            data[pos:pos] = draw(st.sampled_from(_PIECES) | st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "replace" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        else:
            end = min(len(data), pos + draw(st.integers(1, 64)))
            data[end:end] = data[pos:end]
    return bytes(data)


def _exchange(port: int, data: bytes) -> list[int]:
    """Send the bytes; every status the gateway answers until it closes (or goes quiet)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(data)
        except ConnectionError:
            pass
        buf = b""
        deadline = time.monotonic() + 3
        try:
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        except (TimeoutError, ConnectionError):
            pass
    return [int(m) for m in _STATUS.findall(buf)]


@FUZZ
@given(mutated_requests())
def test_raw_request_bytes(live: Live, data: bytes) -> None:
    statuses = _exchange(live.port, data + _END)
    assert not [s for s in statuses if s >= 500], (data, statuses)
    live.sent += 1
    # whatever reached the upstream parsed as clean, unambiguous requests
    assert not [e for e in live.relay.errors if not e.startswith("incomplete")], live.relay.errors


def test_raw_fuzz_left_the_gateway_clean(live: Live) -> None:
    """A quick burst of the mutations, then the gateway is as it was."""
    before = live.snapshot()["workers"][0]
    for seed in _SEEDS[:40]:
        _exchange(live.port, seed[: len(seed) // 2] + _END)
    assert _exchange(live.port, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") == [200]
    live.unaffected()
    after = live.snapshot()["workers"][0]
    assert after["open_fds"] <= before["open_fds"] + 2  # + pooled upstream connections


# ----------------------------------------------------------------------------- paths
_PATH_PIECES = ["/", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\", "a", "%41", "%7e",
                "%00", "%", "%zz", "%25", "?", "%3F", "%C3%A9", "~", "-"]


@FUZZ
@given(st.lists(st.sampled_from(_PATH_PIECES), max_size=10))
@example(["/", "public", "/", "..", "%2f", "admin", "/"])
@example(["/", ".", "%2e", "%2f", "a"])
def test_paths(live: Live, pieces: list[str]) -> None:
    """Whatever the path, the gateway answers 200 (forwarded) or 400 (bad_target), and
    what it forwards is its routed path: no segment is "." or ".." even to an upstream
    that decodes every escape and takes a backslash for a slash (issue 17 item 4)."""
    target = "/" + "".join(pieces)
    before = len(live.relay.requests)
    statuses = _exchange(live.port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    live.sent += 1
    assert statuses in ([200], [400]), (target, statuses)
    forwarded = live.relay.requests[before:]
    assert len(forwarded) == (1 if statuses == [200] else 0), (target, forwarded)
    if forwarded:
        path = forwarded[0].request_line.split(" ")[1].partition("?")[0]
        decoded = unquote_to_bytes(path).replace(b"\\", b"/")
        assert b"\0" not in decoded, (target, path)
        assert not {b".", b".."} & set(decoded.split(b"/")), (target, path)
