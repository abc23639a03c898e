"""The PROXY protocol (gatewayd.toml(5) PROXY PROTOCOL, SPEC §10): a listen entry with
``proxy_protocol = true`` reads a v1 or v2 header first on every connection; the
address it carries is the client's (X-Forwarded-For, the access log); a connection
without a valid header in time is closed, unanswered, and counted. Through the front
door with raw sockets, and the parser fuzzed with hypothesis."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gatewayd.http.proxy_protocol import V1_MAX, V2_MAX, V2_SIGNATURE, Header, Malformed, parse

from ..builders import app_route, gateway_config
from ..certs import client_context, issue, tls_section
from ..conftest import ROOT, GatewayProcess, status_of, wait_for, wait_for_sync
from ..faults import ThreadedUpstream

ECHO = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.1.1.1\r\nConnection: close\r\n\r\n"
FUZZ = settings(max_examples=int(os.environ.get("GATEWAYD_FUZZ_EXAMPLES", "300")) * 10, deadline=None,
                derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


def v1(proto: str = "TCP4", src: str = "203.0.113.7", dst: str = "192.0.2.1",
       sport: int = 51000, dport: int = 443) -> bytes:
    if proto == "UNKNOWN":
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def v2(src: str = "203.0.113.7", sport: int = 51000, *, command: int = 1, family: int | None = None,
       tlvs: bytes = b"", block: bytes | None = None) -> bytes:
    """A v2 header: PROXY (1) or LOCAL (0); the family and address block from ``src``
    unless given."""
    ip = ipaddress.ip_address(src)
    if block is None:
        dst = ipaddress.ip_address("192.0.2.1" if ip.version == 4 else "2001:db8::1")
        block = ip.packed + dst.packed + struct.pack("!HH", sport, 443)
    if family is None:
        family = 0x11 if ip.version == 4 else 0x21
    rest = block + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(rest)) + rest


async def send(port: int, *pieces: bytes, pause: float = 0.0, timeout: float = 5.0) -> bytes:
    """``pieces`` written one by one (``pause`` between them: a slow sender, each in a
    segment of its own), then everything the gateway sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for i, piece in enumerate(pieces):
            if i and pause:
                await asyncio.sleep(pause)  # the point of the test: bytes that come late
            writer.write(piece)
            await writer.drain()
        out = b""
        async with asyncio.timeout(timeout):
            try:
                while chunk := await reader.read(65536):
                    out += chunk
            except ConnectionResetError:  # closed with our bytes unread: a reset
                pass
        return out
    finally:
        writer.close()


def forwarded_for(response: bytes) -> list[str]:
    """The X-Forwarded-For values the upstream's /echo saw, one per response."""
    out = []
    for part in response.split(b"HTTP/1.1 ")[1:]:
        assert part.startswith(b"200"), response
        body = json.loads(part.partition(b"\r\n\r\n")[2].split(b"\n")[0])
        out.append(dict(body["headers"])["X-Forwarded-For"])
    return out


async def test_v1_tcp4_tcp6_unknown_name_the_client(start_gateway, upstream):
    """1. a v1 TCP4, a TCP6 and an UNKNOWN header, each before a request 2. the upstream
    sees X-Forwarded-For with the header's source appended (the TCP peer for UNKNOWN)
    3. three headers received, none refused."""
    gw = await start_gateway(app_route(upstream.url), proxy_protocol=True)
    assert forwarded_for(await send(gw.port, v1("TCP4") + ECHO)) == ["10.1.1.1, 203.0.113.7"]
    assert forwarded_for(await send(gw.port, v1("TCP6", "2001:DB8::0:7", "2001:db8::1") + ECHO)) == [
        "10.1.1.1, 2001:db8::7"]
    assert forwarded_for(await send(gw.port, v1("UNKNOWN") + ECHO)) == ["10.1.1.1, 127.0.0.1"]
    assert forwarded_for(await send(gw.port, b"PROXY UNKNOWN ::1 ::2 1 2\r\n" + ECHO)) == ["10.1.1.1, 127.0.0.1"]
    counts = gw.runtime.proxy_headers
    assert (counts.received, counts.refused) == (4, 0)


async def test_v2_inet_inet6_local_and_other_families(start_gateway, upstream):
    """v2 headers: 1. PROXY over IPv4 and over IPv6, with TLVs (ALPN, authority, a
    NOOP), name the client 2. LOCAL (a health check from the balancer itself), and
    PROXY with UNSPEC, UNIX or a family the specification does not define, keep the
    TCP peer, as HAProxy does."""
    gw = await start_gateway(app_route(upstream.url), proxy_protocol=True)
    tlvs = tlv(0x01, b"http/1.1") + tlv(0x02, b"example.com") + tlv(0x04, b"\0" * 300)
    assert forwarded_for(await send(gw.port, v2("198.51.100.9", tlvs=tlvs) + ECHO)) == ["10.1.1.1, 198.51.100.9"]
    assert forwarded_for(await send(gw.port, v2("2001:db8::9", tlvs=tlvs) + ECHO)) == ["10.1.1.1, 2001:db8::9"]
    assert forwarded_for(await send(gw.port, v2("198.51.100.9", command=0) + ECHO)) == ["10.1.1.1, 127.0.0.1"]
    for family, block in ((0x00, b""), (0x31, b"/run/a.sock".ljust(216, b"\0")), (0x99, b"\1\2\3")):
        assert forwarded_for(await send(gw.port, v2(family=family, block=block) + ECHO)) == [
            "10.1.1.1, 127.0.0.1"], hex(family)
    assert (gw.runtime.proxy_headers.received, gw.runtime.proxy_headers.refused) == (6, 0)


async def test_a_header_in_pieces_and_requests_right_after_it(start_gateway, upstream):
    """1. a slow sender: a v1 and a v2 header (with a TLV) in four segments each, cut
    inside the signature, the length and a TLV 2. a header and two pipelined requests
    in one segment: both answered, both from the header's address: not a byte after
    the header was taken from HTTP."""
    gw = await start_gateway(app_route(upstream.url), proxy_protocol=True)
    h1 = v1("TCP4", "198.51.100.1")
    assert forwarded_for(await send(gw.port, h1[:3], h1[3:11], h1[11:-1], h1[-1:] + ECHO, pause=0.05)) == [
        "10.1.1.1, 198.51.100.1"]
    h2 = v2("198.51.100.2", tlvs=tlv(0x02, b"example.com"))
    assert forwarded_for(await send(gw.port, h2[:5], h2[5:15], h2[15:31], h2[31:], ECHO, pause=0.05)) == [
        "10.1.1.1, 198.51.100.2"]
    keep = ECHO.replace(b"Connection: close\r\n", b"")
    assert forwarded_for(await send(gw.port, v1("TCP4", "198.51.100.3") + keep + ECHO)) == [
        "10.1.1.1, 198.51.100.3"] * 2
    assert forwarded_for(await send(gw.port, v2("198.51.100.4") + keep + ECHO)) == ["10.1.1.1, 198.51.100.4"] * 2
    assert gw.runtime.proxy_headers.refused == 0


async def test_max_connections_per_client_counts_the_header_address(start_gateway, upstream):
    """max_connections_per_client = 1, every connection from the same TCP peer: 1. one
    open from 198.51.100.1 (by its header) 2. a second from 198.51.100.1 is answered
    429 client_connections_full 3. one from 198.51.100.2 is served."""
    gw = await start_gateway(app_route(upstream.url), proxy_protocol=True, max_connections_per_client=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(v1("TCP4", "198.51.100.1"))
    await wait_for(lambda: gw.runtime.server.client_connections("198.51.100.1") == 1)
    try:
        second = await send(gw.port, v1("TCP4", "198.51.100.1") + ECHO)
        assert status_of(second) == 429 and b"client_connections_full" in second
        assert forwarded_for(await send(gw.port, v2("198.51.100.2") + ECHO)) == ["10.1.1.1, 198.51.100.2"]
    finally:
        writer.close()


BAD = [
    pytest.param(ECHO, id="plain-http"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40, id="tls-hello"),
    pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 443\n" + ECHO, id="v1-bare-lf"),
    pytest.param(b"PROXY TCP4 203.0.113.7  192.0.2.1 51000 443\r\n" + ECHO, id="v1-two-spaces"),
    pytest.param(b"PROXY TCP4 2001:db8::1 192.0.2.1 51000 443\r\n" + ECHO, id="v1-wrong-family"),
    pytest.param(b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 443\r\n" + ECHO, id="v1-port-range"),
    pytest.param(b"PROXY TCP4 203.0.113.07 192.0.2.1 1 443\r\n" + ECHO, id="v1-leading-zero"),
    pytest.param(b"PROXY UDP4 203.0.113.7 192.0.2.1 1 443\r\n" + ECHO, id="v1-udp"),
    pytest.param(b"PROXY TCP6 " + b"1" * 120 + b"\r\n" + ECHO, id="v1-over-107"),
    pytest.param(v2().replace(b"\x21\x11", b"\x11\x11", 1) + ECHO, id="v2-version-1"),
    pytest.param(v2().replace(b"\x21\x11", b"\x22\x11", 1) + ECHO, id="v2-command-2"),
    pytest.param(v2(tlvs=b"\x01\x00\x09abc") + ECHO, id="v2-tlv-overflows"),
    pytest.param(v2(tlvs=b"\x01\x00") + ECHO, id="v2-tlv-cut"),
    pytest.param(v2(block=b"\1\2\3\4") + ECHO, id="v2-inet-short"),
    pytest.param(V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX) + b"\0" * 64, id="v2-too-long"),
]


@pytest.mark.parametrize("data", BAD)
async def test_a_connection_without_a_valid_header_is_closed_unanswered(start_gateway, upstream, data):
    """Bytes that are no valid PROXY header, each on a connection of its own: closed
    with nothing sent back, never reaching the upstream, counted as refused; the
    gateway goes on serving."""
    gw = await start_gateway(app_route(upstream.url), proxy_protocol=True, request_header_timeout=2.0)
    started = time.monotonic()
    assert await send(gw.port, data) == b""
    assert time.monotonic() - started < 1.5  # refused as read, not at the timeout
    assert (gw.runtime.proxy_headers.received, gw.runtime.proxy_headers.refused) == (0, 1)
    await wait_for(lambda: gw.runtime.acceptor.open == 0)
    assert upstream.started == 0
    assert forwarded_for(await send(gw.port, v1() + ECHO)) == ["10.1.1.1, 203.0.113.7"]


async def test_silent_or_unfinished_headers_are_closed_at_the_header_timeout(start_gateway, upstream):
    """request_header_timeout = 0.5: 1. a connection that sends nothing and one that
    sends half a header are closed near 0.5 s, both counted 2. one that closes before
    sending a byte (a TCP health check) is not counted."""
    gw = await start_gateway(app_route(upstream.url), proxy_protocol=True, request_header_timeout=0.5)
    for data in (b"", v1()[:20]):
        started = time.monotonic()
        assert await send(gw.port, data) == b""
        assert 0.4 < time.monotonic() - started < 3
    assert gw.runtime.proxy_headers.refused == 2
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.close()
    await wait_for(lambda: gw.runtime.acceptor.open == 0)
    assert (gw.runtime.proxy_headers.received, gw.runtime.proxy_headers.refused) == (0, 2)
    assert upstream.started == 0


async def test_proxy_protocol_then_tls_on_one_address(start_gateway, upstream, tls_ca, tmp_path):
    """{tls = true, proxy_protocol = true}: 1. the header in clear, then the TLS
    handshake, then the request 2. the request goes upstream as https from the
    header's address 3. a TLS ClientHello with no header first is refused and no
    handshake is counted."""
    pem = issue(tls_ca, tmp_path / "certs", "a", "a.example")
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(pem), proxy_protocol=True)
    response = await tls_after(gw.port, client_context(tls_ca), v2("198.51.100.5"))
    assert forwarded_for(response) == ["10.1.1.1, 198.51.100.5"]
    assert b'["X-Forwarded-Proto", "https"]' in response
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", gw.port, ssl=client_context(tls_ca), server_hostname="a.example"), 5)
    await wait_for(lambda: gw.runtime.proxy_headers.refused == 1)
    assert (gw.runtime.handshakes.handshakes, gw.runtime.handshakes.errors) == (1, 0)


async def tls_after(port: int, ctx: ssl.SSLContext, *pieces: bytes) -> bytes:
    """``pieces`` of a header in clear (a pause between them), then TLS and ECHO."""
    sock = socket.create_connection(("127.0.0.1", port))
    for i, piece in enumerate(pieces):
        if i:
            await asyncio.sleep(0.05)  # a slow sender
        sock.sendall(piece)
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="a.example")
    writer.write(ECHO)
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return response


async def test_proxy_protocol_then_tls_under_uvloop_with_workers(tmp_path, upstream, tls_ca):
    """A gatewayd process (uvloop, workers = 2) on {tls = true, proxy_protocol = true}:
    headers in pieces, then the handshake: each request goes upstream as https from
    its header's address; the snapshot counts 6 headers and 6 handshakes."""
    pem = issue(tls_ca, tmp_path / "certs", "a", "a.example")
    cfg = gateway_config(tmp_path, app_route(upstream.url), tls=tls_section(pem), proxy_protocol=True, workers=2)
    port = int(cfg.read_text().split("127.0.0.1:")[1].split('"')[0])
    gp = GatewayProcess(cfg, tmp_path).start()
    try:
        for i in range(1, 7):
            header = v1("TCP4", f"198.51.100.{i}") if i % 2 else v2(f"198.51.100.{i}")
            response = await tls_after(port, client_context(tls_ca), header[:7], header[7:])
            assert forwarded_for(response) == [f"10.1.1.1, 198.51.100.{i}"]
            assert b'["X-Forwarded-Proto", "https"]' in response

        def counted() -> bool:
            s = gp.command({"cmd": "snapshot"})["snapshot"]
            return bool(s["proxy_protocol"]["headers"] == 6 and s["tls"]["handshakes"] == 6)

        await asyncio.to_thread(wait_for_sync, counted, 5)
        assert "Traceback" not in gp.stderr()
    finally:
        gp.stop()


def test_check_accepts_proxy_protocol_and_refuses_a_non_boolean(tmp_path):
    """``gatewayd --check``: proxy_protocol = true is a valid listen option (it was
    refused before it was read); a value that is no boolean is a located error."""
    path = gateway_config(tmp_path, app_route("http://127.0.0.1:1"), proxy_protocol=True)
    run = subprocess.run([sys.executable, "-m", "gatewayd", "--check", "--config", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    path.write_text(path.read_text().replace("proxy_protocol = true", 'proxy_protocol = "yes"'))
    run = subprocess.run([sys.executable, "-m", "gatewayd", "--check", "--config", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 78
    assert f"{path}:2: server.listen[0].proxy_protocol: expected" in run.stderr


def logging_gateway(tmp_path: Path, url: str, **server: Any) -> tuple[GatewayProcess, int, Path]:
    """A gatewayd process on a PROXY listener with a JSON access log: it, its port, its log."""
    log_path = tmp_path / "access.json"
    cfg = gateway_config(tmp_path, app_route(url), proxy_protocol=True, **server)
    cfg.write_text(cfg.read_text().replace('access_log = "off"', f'access_log = "{log_path}"\naccess_format = "json"'))
    port = int(cfg.read_text().split("127.0.0.1:")[1].split('"')[0])
    return GatewayProcess(cfg, tmp_path).start(), port, log_path


async def test_trusted_proxies_are_read_after_the_header(tmp_path, upstream):
    """trusted_proxies = ["198.51.100.0/24"]: 1. a header from 198.51.100.1 (a trusted
    proxy) and X-Forwarded-For 10.1.1.1: the client is 10.1.1.1 2. a header from
    203.0.113.5 (not trusted) and the same X-Forwarded-For: the client is 203.0.113.5
    3. upstream, both have the header's address appended. The process runs uvloop,
    so the headers come in pieces (a slow sender) to wait on its socket too."""
    gp, port, log_path = logging_gateway(tmp_path, upstream.url, trusted_proxies=["198.51.100.0/24"])
    try:
        h1, h2 = v1("TCP4", "198.51.100.1"), v2("203.0.113.5")
        assert forwarded_for(await send(port, h1[:9], h1[9:] + ECHO, pause=0.05)) == ["10.1.1.1, 198.51.100.1"]
        assert forwarded_for(await send(port, h2[:14], h2[14:], ECHO, pause=0.05)) == ["10.1.1.1, 203.0.113.5"]
        await wait_for(lambda: log_path.exists() and log_path.read_text().count("\n") == 2, timeout=5)
        assert [json.loads(line)["client"] for line in log_path.read_text().splitlines()] == [
            "10.1.1.1", "203.0.113.5"]
    finally:
        gp.stop()


async def test_workers_log_and_forward_the_header_address(tmp_path, upstream):
    """gatewayd with workers = 2 and a JSON access log: 1. twenty connections, each with
    a v1 or v2 header of its own address 2. every request reaches the upstream with
    that address appended to X-Forwarded-For and is logged with it as the client
    3. a plain request is closed unanswered and is in no log line 4. the snapshot's
    proxy_protocol sums both workers: 20 headers, 1 refused."""
    gp, port, log_path = logging_gateway(tmp_path, upstream.url, workers=2)
    try:
        clients = [f"198.51.100.{i}" for i in range(1, 21)]
        for i, client in enumerate(clients):
            header = v1("TCP4", client) if i % 2 else v2(client)
            assert forwarded_for(await send(port, header + ECHO)) == [f"10.1.1.1, {client}"]
        assert await send(port, ECHO) == b""
        await wait_for(lambda: log_path.exists() and log_path.read_text().count("\n") == 20, timeout=5)
        logged = sorted(json.loads(line)["client"] for line in log_path.read_text().splitlines())
        assert logged == sorted(clients)
        wait_for_sync(lambda: gp.command({"cmd": "snapshot"})["snapshot"]["proxy_protocol"] == {
            "headers": 20, "refused": 1}, timeout=5)  # workers send their figures every tick
        assert "Traceback" not in gp.stderr()
    finally:
        gp.stop()
    assert gp.proc is not None and gp.proc.returncode == 0


# ----------------------------------------------------------------------------- the parser
def _v1_headers() -> st.SearchStrategy[bytes]:
    ipv4 = st.ip_addresses(v=4).map(str)
    ipv6 = st.ip_addresses(v=6).map(str)
    port = st.integers(0, 65535)
    tcp4 = st.tuples(st.just("TCP4"), ipv4, ipv4, port, port)
    tcp6 = st.tuples(st.just("TCP6"), ipv6, ipv6, port, port)
    return (tcp4 | tcp6).map(lambda t: v1(*t)) | st.just(v1("UNKNOWN"))


def _v2_headers() -> st.SearchStrategy[bytes]:
    tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4).map(
        lambda ts: b"".join(tlv(k, v) for k, v in ts))
    inet = st.builds(lambda a, p, t: v2(str(a), p, tlvs=t), st.ip_addresses(), st.integers(0, 65535), tlvs)
    # any family but TCP over IPv4 (0x11) and IPv6 (0x21), whose address block must be
    # whole (inet above makes those): an arbitrary block there is no valid header
    other = st.builds(lambda c, f, b: v2(command=c, family=f, block=b),
                      st.integers(0, 1), st.integers(0, 255).filter(lambda f: f not in (0x11, 0x21)),
                      st.binary(max_size=64))
    return inet | other


HEADERS = _v1_headers() | _v2_headers()


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, at, value in edits:
        at = at % (len(out) + 1)
        if kind == 0 and at < len(out):
            out[at] = value
        elif kind == 1:
            out.insert(at, value)
        elif kind == 2 and at < len(out):
            del out[at]
        else:
            del out[at:]
    return bytes(out)


def _parse_or_refuse(data: bytes) -> Header | None:
    try:
        header = parse(data)
    except Malformed:
        return None
    if header is not None:
        assert 0 < header.length <= len(data)
        assert header.length <= (V1_MAX if data[:1] == b"P" else V2_MAX)
    return header


@FUZZ
@given(st.binary(max_size=200))
@example(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r")
@example(V2_SIGNATURE + b"\x21")
def test_any_bytes_are_parsed_or_refused(data):
    _parse_or_refuse(data)


@FUZZ
@given(HEADERS, st.binary(max_size=40))
def test_a_valid_header_is_found_whole_and_each_prefix_asks_for_more(header, after):
    """What read_header relies on: a valid header is found at its exact length
    whatever follows it, and each of its proper prefixes is None (more bytes)."""
    found = parse(header + after)
    assert found is not None and found.length == len(header)
    assert parse(header) == found
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut


@FUZZ
@given(HEADERS, st.lists(st.tuples(st.integers(0, 3), st.integers(0, 300), st.integers(0, 255)),
                         min_size=1, max_size=4), st.binary(max_size=20))
def test_mutated_headers_are_parsed_or_refused(header, edits, after):
    mutated = _mutate(header, edits) + after
    found = _parse_or_refuse(mutated)
    if found is not None and found.source is not None:
        ipaddress.ip_address(found.source[0])
        assert 0 <= found.source[1] <= 65535


def test_the_process_survives_a_header_storm(tmp_path):
    """A real gatewayd (uvloop) and 200 connections of mutated headers before a
    request: each answered (never a 5xx) or closed, never a traceback, every
    connection released."""
    upstream = ThreadedUpstream()
    relay = upstream.start()
    cfg = gateway_config(tmp_path, app_route(relay.url), proxy_protocol=True, request_header_timeout=0.3)
    port = int(cfg.read_text().split("127.0.0.1:")[1].split('"')[0])
    gp = GatewayProcess(cfg, tmp_path).start()
    try:
        samples: list[bytes] = []

        @settings(max_examples=200, deadline=None, derandomize=True, database=None)
        @given(HEADERS, st.lists(st.tuples(st.integers(0, 3), st.integers(0, 300), st.integers(0, 255)),
                                 max_size=3))
        def collect(header, edits):
            samples.append(_mutate(header, edits) + ECHO)

        collect()
        for data in samples:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                got = b""
                try:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                    while chunk := s.recv(65536):
                        got += chunk
                except (ConnectionResetError, BrokenPipeError, OSError):  # refused, our bytes unread
                    pass
                assert got == b"" or 200 <= status_of(got) < 500, (data, got)
        wait_for_sync(lambda: gp.command({"cmd": "snapshot"})["snapshot"]["connections"] == 0, timeout=5)
        assert gp.proc is not None and gp.proc.poll() is None
        assert "Traceback" not in gp.stderr()
    finally:
        gp.stop()
        upstream.stop()
