"""TLS for clients (gatewayd.toml(5) [tls], gatewayd(8) TLS): real handshakes
with certificates made for the test, through the front door."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import socket
import ssl
from pathlib import Path

import pytest
import trustme

from ..builders import app_route, gateway_config
from ..certs import Pem, client_context, issue, tls_section
from ..conftest import wait_for

REQUEST = b"GET /echo HTTP/1.1\r\nHost: example\r\n\r\n"


def der_of(pem: Pem) -> bytes:
    text = pem.cert.read_text()
    first = text[: text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return ssl.PEM_cert_to_DER_cert(first)


def anything_context() -> ssl.SSLContext:
    """A client that takes any certificate (to see which one is served)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return int(head.split()[1]), head, body


class TlsClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self.writer.get_extra_info("ssl_object")

    @property
    def served(self) -> bytes:
        return self.ssl_object.getpeercert(binary_form=True)

    async def get(self, request: bytes = REQUEST) -> tuple[int, bytes, bytes]:
        self.writer.write(request)
        return await read_response(self.reader)

    def close(self) -> None:
        self.writer.close()


async def connect(port: int, ctx: ssl.SSLContext, name: str | None = "a.example") -> TlsClient:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=name, ssl_handshake_timeout=5), 6)
    return TlsClient(reader, writer)


@pytest.fixture
def pems(tls_ca: trustme.CA, tmp_path: Path) -> dict[str, Pem]:
    d = tmp_path / "certs"
    return {
        "a": issue(tls_ca, d, "a", "a.example"),
        "wild": issue(tls_ca, d, "wild", "*.b.example"),
        "c": issue(tls_ca, d, "c", "c.example", "www.c.example"),
    }


async def test_sni_picks_exact_then_wildcard_then_the_first(start_gateway, upstream, pems, tls_ca):
    """Three certificates: 1. a verifying client naming each host gets that host's
    certificate (exact, one-label wildcard, a second DNS name) 2. two labels below a
    wildcard, an unknown host and no SNI get the first certificate 3. ALPN offers
    http/1.1 4. the request goes upstream with X-Forwarded-Proto: https."""
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(pems["a"], pems["wild"], pems["c"]))
    verify = client_context(tls_ca)
    verify.set_alpn_protocols(["h2", "http/1.1"])
    for name, pem in [("a.example", "a"), ("x.b.example", "wild"), ("www.c.example", "c"),
                      ("C.Example", "c")]:
        client = await connect(gw.port, verify, name)
        assert client.served == der_of(pems[pem]), name
        assert client.ssl_object.selected_alpn_protocol() == "http/1.1"
        status, _, body = await client.get()
        assert status == 200
        assert ["X-Forwarded-Proto", "https"] in json.loads(body)["headers"]
        client.close()
    for name in ["y.x.b.example", "unknown.example", None]:
        client = await connect(gw.port, anything_context(), name)
        assert client.served == der_of(pems["a"]), name
        client.close()
    await wait_for(lambda: gw.runtime.handshakes.handshakes == 7)
    assert gw.runtime.handshakes.errors == 0


async def test_hosts_key_overrides_the_certificate_names(start_gateway, upstream, pems, tls_ca):
    """hosts = [...] decides what a certificate is picked for, not its DNS names."""
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(
        pems["a"], pems["c"], hosts=[None, ["a.example"]]))
    client = await connect(gw.port, anything_context(), "a.example")
    assert client.served == der_of(pems["a"])  # the first named it first
    client.close()
    client = await connect(gw.port, anything_context(), "c.example")
    assert client.served == der_of(pems["a"])  # c is no longer for c.example: the default
    client.close()


async def test_min_version_refuses_older_clients(start_gateway, upstream, pems, tls_ca):
    """min_version = "1.3": a TLS 1.2-only client fails its handshake (counted), a 1.3
    client is served."""
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(pems["a"], min_version="1.3"))
    old = client_context(tls_ca)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await connect(gw.port, old)
    await wait_for(lambda: gw.runtime.handshakes.errors == 1)
    client = await connect(gw.port, client_context(tls_ca))
    assert client.ssl_object.version() == "TLSv1.3"
    assert (await client.get())[0] == 200
    client.close()


@pytest.mark.parametrize("tickets", [True, False])
async def test_session_tickets_resume_or_not(start_gateway, upstream, pems, tls_ca, tickets):
    """TLS 1.2 with session_tickets on: the client is given a ticket and a second
    connection resumes with it; off: no ticket is given."""
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(pems["a"], session_tickets=tickets))
    ctx = client_context(tls_ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    first = await connect(gw.port, ctx)
    assert (await first.get())[0] == 200
    session = first.ssl_object.session
    first.close()
    assert session is not None and session.has_ticket is tickets
    if tickets:  # asyncio's streams take no session: resume over a blocking socket
        assert await asyncio.to_thread(_resumed, gw.port, ctx, session)


def _resumed(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, \
            ctx.wrap_socket(sock, server_hostname="a.example", session=session) as tls:
        return tls.session_reused


async def test_plain_http_on_a_tls_port_is_closed_and_counted(start_gateway, upstream, pems):
    """A clear-text request to the TLS listener: no HTTP answer, the connection closed,
    one handshake error, nothing upstream."""
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(pems["a"]))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: example\r\n\r\n")
    got = await asyncio.wait_for(reader.read(), 5)
    assert b"HTTP/1." not in got
    writer.close()
    await wait_for(lambda: gw.runtime.handshakes.errors == 1)
    await wait_for(lambda: gw.runtime.connections == 0)
    assert upstream.requests == []


async def test_a_silent_client_is_closed_at_request_header_timeout(start_gateway, upstream, pems, tls_ca):
    """request_header_timeout = 0.5: 1. a client that connects and never starts its
    handshake holds a connection, not the listener: another client is served meanwhile
    2. the silent one is closed within the timeout (plus slack), counted as an error."""
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(pems["a"]),
                             request_header_timeout=0.5)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    opened = loop.time()
    await wait_for(lambda: gw.runtime.connections == 1)
    client = await connect(gw.port, client_context(tls_ca))
    assert (await client.get())[0] == 200
    client.close()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert 0.4 <= loop.time() - opened < 2.0
    writer.close()
    await wait_for(lambda: gw.runtime.handshakes.errors == 1)
    await wait_for(lambda: gw.runtime.connections == 0)


def _rewrite(pem: Pem, ca: trustme.CA, *hosts: str) -> None:
    fresh = issue(ca, pem.cert.parent / "fresh", "x", *hosts)
    pem.cert.write_bytes(fresh.cert.read_bytes())
    pem.key.write_bytes(fresh.key.read_bytes())


async def test_a_reload_rotates_the_certificate_and_open_connections_keep_theirs(
        start_gateway, upstream, pems, tls_ca):
    """1. a keep-alive connection is served the first certificate 2. the files are
    replaced by a renewed certificate; the TOML is unchanged 3. a reload succeeds 4. a
    new connection gets the renewed certificate 5. the open connection still serves
    requests (with its old certificate)."""
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(pems["a"]))
    before = der_of(pems["a"])
    old = await connect(gw.port, client_context(tls_ca))
    assert old.served == before and (await old.get())[0] == 200
    _rewrite(pems["a"], tls_ca, "a.example")
    answer = await gw.command({"cmd": "reload"})
    assert answer["ok"], answer
    new = await connect(gw.port, client_context(tls_ca))
    assert new.served == der_of(pems["a"]) != before
    assert (await new.get())[0] == 200
    assert (await old.get())[0] == 200 and old.served == before
    old.close()
    new.close()


async def test_a_reload_with_a_bad_key_changes_nothing(start_gateway, upstream, pems, tls_ca):
    """The key file is replaced by another certificate's key: 1. the reload is refused,
    naming tls.certificates[0].key and the mismatch 2. new connections still get the
    certificate in force and are served."""
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(pems["a"]))
    pems["a"].key.write_bytes(pems["c"].key.read_bytes())
    answer = await gw.command({"cmd": "reload"})
    assert answer["ok"] is False
    assert "tls.certificates[0].key: the key does not match the certificate" in answer["error"]
    assert str(gw.config_path) in answer["error"]
    client = await connect(gw.port, client_context(tls_ca))
    assert (await client.get())[0] == 200
    client.close()


async def test_an_expired_certificate_is_a_warning(start_gateway, upstream, tls_ca, tmp_path, caplog):
    """An expired certificate starts, with a warning naming it; it is still served."""
    caplog.set_level(logging.WARNING, "gatewayd")
    old = issue(tls_ca, tmp_path / "certs", "old", "a.example",
                not_after=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(old))
    assert any("expired" in r.getMessage() and "old.pem" in r.getMessage() for r in caplog.records)
    client = await connect(gw.port, anything_context())
    assert client.served == der_of(old)
    client.close()
    assert gw.runtime.certificates[0].not_after == datetime.datetime(
        2020, 1, 1, tzinfo=datetime.UTC).timestamp()


async def test_reload_turns_tls_on_for_new_connections(start_gateway, upstream, pems, tls_ca, tmp_path):
    """A clear-text listener becomes a TLS one by a reload: an open clear-text
    keep-alive connection goes on; a new connection must speak TLS."""
    gw = await start_gateway(app_route(upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(REQUEST)
    assert (await read_response(reader))[0] == 200
    gateway_config(tmp_path, app_route(upstream.url), port=gw.port, tls=tls_section(pems["a"]))
    answer = await gw.command({"cmd": "reload"})
    assert answer["ok"], answer
    writer.write(REQUEST)
    assert (await read_response(reader))[0] == 200
    writer.close()
    client = await connect(gw.port, client_context(tls_ca))
    assert (await client.get())[0] == 200
    client.close()


async def test_admission_and_cancellation_work_over_tls(start_gateway, upstream, pems, tls_ca):
    """max_concurrency = 1, max_queue = 0, over TLS: 1. a slow request holds the slot
    2. a second client is shed at once with 503 queue_full 3. the first client leaves:
    its upstream request is aborted within a second and the slot is free again."""
    gw = await start_gateway(app_route(upstream.url, max_concurrency=1, max_queue=0),
                             tls=tls_section(pems["a"]))
    holder = await connect(gw.port, client_context(tls_ca))
    holder.writer.write(b"GET /slow?ms=10000 HTTP/1.1\r\nHost: example\r\n\r\n")
    await wait_for(lambda: upstream.active == 1)
    other = await connect(gw.port, client_context(tls_ca))
    status, head, _ = await other.get()
    assert status == 503 and b"X-Gatewayd-Reason: queue_full" in head
    loop = asyncio.get_running_loop()
    left = loop.time()
    holder.writer.transport.abort()
    await wait_for(lambda: len(upstream.aborted) == 1, timeout=2)
    assert upstream.aborted[0] - left < 1.0
    status, _, _ = await other.get()
    assert status == 200
    other.close()


async def test_a_large_answer_to_a_slow_reader_arrives_whole(start_gateway, upstream, pems, tls_ca):
    """8 MiB through TLS to a client that reads 64 KiB at a time with pauses: every byte
    arrives (the transport's writes that OpenSSL could not finish are repeated, flow
    control pauses the response), then the connection serves another request."""
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(pems["a"]))
    client = await connect(gw.port, client_context(tls_ca))
    size = 8 * 1024 * 1024
    client.writer.write(f"GET /big?bytes={size} HTTP/1.1\r\nHost: example\r\n\r\n".encode())
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    got = 0
    while got < size:
        chunk = await asyncio.wait_for(client.reader.read(65536), 5)
        assert chunk
        got += len(chunk)
        if got < 1024 * 1024:
            await asyncio.sleep(0.002)  # slow at first: the gateway's buffer fills and it waits
    assert got == size
    assert (await client.get())[0] == 200
    client.close()


async def test_uploads_and_pipelined_requests_over_tls(start_gateway, upstream, pems, tls_ca):
    """A 1 MiB body arrives upstream intact; three requests written at once (one TLS
    record or several) are answered in order."""
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(pems["a"]))
    client = await connect(gw.port, client_context(tls_ca))
    body = bytes(range(256)) * 4096
    status, _, answer = await client.get(b"POST /echo HTTP/1.1\r\nHost: example\r\n"
                                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert status == 200 and json.loads(answer)["body"].encode("latin-1") == body
    client.writer.write(b"".join(f"GET /echo?n={i} HTTP/1.1\r\nHost: example\r\n\r\n".encode()
                                 for i in range(3)))
    targets = [json.loads((await read_response(client.reader))[2])["target"] for _ in range(3)]
    assert targets == ["/echo?n=0", "/echo?n=1", "/echo?n=2"]
    client.close()
    await wait_for(lambda: gw.runtime.connections == 0)
