"""Malformed and ambiguous requests (SPEC §3), data-driven: one case per file in
``tests/corpus/requests/``.

``NAME.http`` holds the raw bytes the client sends, in a readable escaped form:
the file's own line breaks are layout only and dropped; ``\\r``, ``\\n``,
``\\t``, ``\\0``, ``\\\\`` and ``\\xHH`` are the bytes they name, and ``{{N*TEXT}}``
repeats TEXT N times (long lines, many headers).

``NAME.expect`` (TOML) says what must happen:

- ``why``: what the case is about;
- ``status`` (an int, or a list of acceptable ones) for the one response, or
  ``responses`` for every response on the connection, in order (1xx included);
- ``reason``: the ``X-Gatewayd-Reason`` of the last response;
- ``closed = true``: the gateway then closes the connection;
- ``upstream``: the number of complete requests the upstream receives (0: not
  one byte reaches it); ``upstream_partial = true`` also allows a request cut
  short (a body timed out after forwarding began);
- ``[[forwarded]]``, one per upstream request: ``line`` (its request line),
  ``body`` (escaped as above), ``has`` (``"Name: value"`` fields it must carry)
  and ``lacks`` (field names it must not);
- ``head = true``: responses have no body (HEAD); ``[server]``: settings for
  this case's gateway.

The upstream is a relay recording the exact bytes it receives; it parses them
strictly, so anything ambiguous that reaches it fails the case. After each case
no slot, queue place, connection or upstream exchange is left behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ..builders import app_route
from ..conftest import wait_for
from ..faults import RawUpstream

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "requests"
CASES = sorted(p.stem for p in CORPUS.glob("*.http"))
# A short head and body timeout, so the cases that end in a timeout end soon.
SERVER = {"request_header_timeout": 1.0, "request_body_timeout": 1.0,
          "request_body_min_rate": 1_000_000, "keepalive_timeout": 5.0}

_REPEAT = re.compile(r"\{\{(\d+)\*(.*?)\}\}", re.S)
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[rnt0\\])")
_NAMED = {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\0", "\\": b"\\"}


@pytest.fixture(autouse=True)
def no_error_logged(caplog):
    """Nothing a client or an upstream does may make the gateway log an ERROR (a
    traceback per hostile request is a log flood)."""
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def decode(text: str) -> bytes:
    """The bytes an escaped corpus text stands for (see the module docstring)."""
    text = text.replace("\r", "").replace("\n", "")
    text = _REPEAT.sub(lambda m: m.group(2) * int(m.group(1)), text)
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        out += text[pos:m.start()].encode("ascii")
        esc = m.group(1)
        out += bytes([int(esc[1:], 16)]) if esc[0] == "x" else _NAMED[esc]
        pos = m.end()
    out += text[pos:].encode("ascii")
    return bytes(out)


def load(name: str) -> tuple[bytes, dict[str, Any]]:
    raw = decode((CORPUS / f"{name}.http").read_text(encoding="ascii"))
    expect = tomllib.loads((CORPUS / f"{name}.expect").read_text(encoding="utf-8"))
    assert expect.get("why"), f"{name}.expect: says nothing about why"
    assert ("status" in expect) != ("responses" in expect), f"{name}.expect: status or responses"
    return raw, expect


def test_decode() -> None:
    assert decode("GET / HTTP/1.1\\r\\n\nX: {{3*ab}}\\x00\\t\\\\\n") == b"GET / HTTP/1.1\r\nX: ababab\x00\t\\"


def test_corpus_is_complete() -> None:
    """Every case has both files, and the corpus covers what the issue lists."""
    expects = {p.stem for p in CORPUS.glob("*.expect")}
    assert expects == set(CASES)
    assert len(CASES) >= 100


# ----------------------------------------------------------------------------- responses
class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


async def read_response(reader: asyncio.StreamReader, head_only: bool) -> Response | None:
    """One response from the gateway; None when the connection closed first."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        assert not exc.partial, f"truncated response head {exc.partial[:200]!r}"
        return None
    lines = head[:-4].decode("latin-1").split("\r\n")
    assert re.fullmatch(r"HTTP/1\.[01] \d{3} .*", lines[0]), lines[0]
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if status >= 200 and status not in (204, 304) and not head_only:
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                body += data[:-2]
        else:
            body = await reader.read()
    return Response(status, headers, body)


def statuses_allowed(expect: dict[str, Any]) -> list[list[int]]:
    if "responses" in expect:
        return [[s] for s in expect["responses"]]
    status = expect["status"]
    return [status if isinstance(status, list) else [status]]


def check_forwarded(name: str, got: Any, want: dict[str, Any]) -> None:
    if "line" in want:
        assert got.request_line == want["line"], f"{name}: upstream request line {got.request_line!r}"
    if "body" in want:
        assert got.body == decode(want["body"]), f"{name}: upstream body {got.body!r}"
    head_lines = [line.lower() for line in got.head.split(b"\r\n")[1:] if line]
    for field in want.get("has", ()):
        fname, _, value = decode(field).partition(b":")
        line = fname.strip().lower() + b": " + value.strip().lower()
        assert line in head_lines, f"{name}: upstream head lacks {field!r}: {got.head!r}"
    names = {line.split(b":", 1)[0] for line in head_lines}
    for field in want.get("lacks", ()):
        assert field.lower().encode() not in names, f"{name}: upstream head has {field!r}: {got.head!r}"


# ----------------------------------------------------------------------------- the cases
@pytest.mark.parametrize("name", CASES)
async def test_request_case(name: str, start_gateway) -> None:
    raw, expect = load(name)
    relay = await RawUpstream().start()
    try:
        gw = await start_gateway(app_route(relay.url, {"read_timeout": 3.0}), **{**SERVER, **expect.get("server", {})})
        allowed = statuses_allowed(expect)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(raw)
        await writer.drain()
        got: list[Response] = []
        closed = False
        async with asyncio.timeout(8):
            while len(got) < len(allowed):
                resp = await read_response(reader, expect.get("head", False))
                if resp is None:
                    closed = True
                    break
                got.append(resp)
            statuses = [r.status for r in got]
            assert len(got) == len(allowed), f"{name}: responses {statuses}, then closed"
            for status, ok in zip(statuses, allowed, strict=True):
                assert status in ok, f"{name}: statuses {statuses}, expected {allowed}"
            if "reason" in expect:
                assert got[-1].headers.get("x-gatewayd-reason") == expect["reason"], (name, got[-1].headers)
            if expect.get("closed") and not closed:
                rest = await reader.read()
                assert rest == b"", f"{name}: more bytes after the last response: {rest[:200]!r}"
        writer.close()

        want = expect.get("upstream", 0)
        assert not relay.errors or (
            expect.get("upstream_partial") and all(e.startswith("incomplete") for e in relay.errors)
        ), f"{name}: the upstream got unparseable bytes: {relay.errors} {relay.received[:300]!r}"
        if want == 0 and not expect.get("upstream_partial"):
            assert relay.received == b"", f"{name}: bytes reached the upstream: {relay.received[:300]!r}"
        await wait_for(lambda: len(relay.requests) >= want, timeout=3)
        assert len(relay.requests) == want, f"{name}: upstream got {[r.request_line for r in relay.requests]}"
        for i, fw in enumerate(expect.get("forwarded", ())):
            check_forwarded(name, relay.requests[i], fw)

        runtime = gw.runtime
        route = runtime.table.routes["app"]
        await wait_for(lambda: runtime.connections == 0 and route.gate.in_flight == 0
                       and not route.gate.waiters and route.upstream.active == 0, timeout=3)
    finally:
        await relay.stop()


# ----------------------------------------------------------------------------- refusals seen
@pytest.mark.parametrize("fmt", ["combined", "json"])
async def test_refusals_are_logged_and_counted(fmt: str, tmp_path, upstream) -> None:
    """Every answer the gateway gives before a request has a route is seen like any
    other: 1. a smuggling probe (CL + TE), a NUL byte, an oversized request line, TLS
    bytes, a head that never ends and a request no route matches are sent, each on
    its own connection, and two the request checks refuse (an escaped dot-segment, a
    TRACE) 2. each gets its 400 / 408 / 404 / 405 3. each has an access-log line
    with its status (method and target as far as known, else "-") and route "-"
    4. the snapshot's ``unrouted`` and gatewayd_requests_total{route="-"} count them
    by status."""
    from gatewayd.config.loader import parse
    from gatewayd.control.prometheus import MetricsListener
    from gatewayd.control.server import ControlServer
    from gatewayd.process.single import LocalController
    from gatewayd.runtime.state import Runtime

    from ..builders import free_port, gateway_config
    from ..conftest import control_command, raw_request

    log_path = tmp_path / "access.log"
    cfg = gateway_config(tmp_path, app_route(upstream.url, host="app.example"), request_header_timeout=0.5)
    mport = free_port()
    cfg.write_text(cfg.read_text().replace(
        'access_log = "off"', f'access_log = "{log_path}"\naccess_format = "{fmt}"')
        + f'\n[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    config = parse(cfg.read_text(), str(cfg))
    runtime = Runtime(config)
    await runtime.start()
    controller = LocalController(runtime)
    control = ControlServer(controller, config.socket_path, config.control.mode)
    await control.start()
    metrics = MetricsListener(config.metrics.listen, controller.snapshot, lambda: True)
    await metrics.start()
    port = int(config.server.addresses[0].rsplit(":", 1)[1])
    try:
        sent = [
            (b"POST /probe HTTP/1.1\r\nHost: app.example\r\nContent-Length: 4\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
            (b"GET /nul HTTP/1.1\r\nHost: app.example\r\nX-A: a\0b\r\n\r\n", 400),
            (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: app.example\r\n\r\n", 400),
            (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n", 400),
            (b"GET /never HTTP/1.1\r\nHost: app.exa", 408),
            (b"GET /nowhere HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n", 404),
            (b"GET /a/..%2fb HTTP/1.1\r\nHost: app.example\r\n\r\n", 400),
            (b"TRACE / HTTP/1.1\r\nHost: app.example\r\n\r\n", 405),
        ]
        for data, status in sent:
            out = await raw_request(port, data)
            assert out.startswith(b"HTTP/1.1 %d " % status), (data[:40], out[:80])
        assert upstream.requests == []
        await wait_for(lambda: log_path.exists() and log_path.read_text().count("\n") >= len(sent), timeout=3)
        lines = log_path.read_text().splitlines()
        assert len(lines) == len(sent), lines
        if fmt == "json":
            entries = [json.loads(line) for line in lines]
            got = [(e["status"], e["method"], e["target"][:8], e["route"]) for e in entries]
            assert got == [(400, "POST", "/probe", "-"), (400, "GET", "/nul", "-"),
                           (400, "-", "-", "-"), (400, "-", "-", "-"), (408, "-", "-", "-"),
                           (404, "GET", "/nowhere", "-"), (400, "GET", "/a/..%2f", "-"),
                           (405, "TRACE", "/", "-")]
            assert entries[0]["reason"] == "bad_request" and entries[4]["reason"] == "header_timeout"
        else:
            assert '"POST /probe HTTP/1.1" 400 ' in lines[0]
            assert '"GET /nul HTTP/1.1" 400 ' in lines[1]
            assert '"-" 400 ' in lines[3] and '"-" 408 ' in lines[4]
            assert '"GET /nowhere HTTP/1.1" 404 ' in lines[5]
            assert '"GET /a/..%2fb HTTP/1.1" 400 ' in lines[6] and '"TRACE / HTTP/1.1" 405 ' in lines[7]
        snap = (await control_command(config.socket_path, {"cmd": "snapshot"}))["snapshot"]
        assert snap["unrouted"] == {"400": 5, "408": 1, "404": 1, "405": 1}
        assert snap["workers"][0]["bad_requests"] == 4
        text = (await raw_request(mport, b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")).decode()
        for code, n in (("400", 5), ("408", 1), ("404", 1), ("405", 1)):
            assert f'gatewayd_requests_total{{code="{code}",route="-"}} {n}.0' in text, text[:2000]
    finally:
        await metrics.close()
        await control.close()
        await runtime.shutdown(1.0)

