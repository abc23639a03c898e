"""HTTPS upstreams (gatewayd.toml(5), UPSTREAMS, "HTTPS servers"): real TLS servers on 127.0.0.1
with certificates made for the test; the gateway verifies them with ``tls_ca``
(or not, ``tls_verify = false``), sends and verifies ``tls_server_name``,
presents a client certificate for mutual TLS, keeps its TLS connections alive,
probes them with its health checks, and answers ``502 upstream_tls`` when a
handshake or a verification fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from ..builders import app_route, free_port, gateway_config, route_toml, toml, upstream_toml
from ..certs import Pem, issue, write_ca
from ..conftest import Upstream, run_gatewayd, wait_for


class TlsUpstream(Upstream):
    """The conftest upstream behind TLS, with ``cert``; it records the SNI names it
    was sent, the client ports it saw (one per connection) and the client
    certificates presented. ``client_ca``: a client certificate signed by it is
    required (mutual TLS)."""

    def __init__(self, cert: Pem, client_ca: trustme.CA | None = None) -> None:
        super().__init__()
        self.url = f"https://127.0.0.1:{self.port}"
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(str(cert.cert), str(cert.key))
        self.ctx.sni_callback = self._sni
        if client_ca is not None:
            client_ca.configure_trust(self.ctx)
            self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.sni: list[str | None] = []
        self.peers: set[int] = set()
        self.client_certs: list[Any] = []

    def _sni(self, sock: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        self.sni.append(name)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer is not None:
            self.peers.add(peer[1])
        self.client_certs.append(request.transport.get_extra_info("peercert") if request.transport else None)
        return await super().handle(request)

    async def start(self) -> None:
        server = web.Server(self.handle, handler_cancellation=True)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ctx).start()


@pytest.fixture
async def tls_upstreams():
    """``await tls_upstreams(cert, client_ca=None)`` -> a started TlsUpstream."""
    started: list[TlsUpstream] = []

    async def start(cert: Pem, client_ca: trustme.CA | None = None) -> TlsUpstream:
        u = TlsUpstream(cert, client_ca)
        await u.start()
        started.append(u)
        return u

    yield start
    for u in started:
        await u.stop()


@pytest.fixture
def pki(tmp_path: Path, tls_ca: trustme.CA) -> dict[str, Any]:
    """The session's CA in ``ca.pem`` beside the configuration, a leaf for 127.0.0.1
    and api.internal, and a second CA that signed nothing the upstreams show."""
    other = trustme.CA()
    return {
        "ca": tls_ca,
        "ca_file": write_ca(tls_ca, tmp_path / "ca.pem"),
        "other_ca_file": write_ca(other, tmp_path / "other-ca.pem"),
        "leaf": issue(tls_ca, tmp_path / "up", "leaf", "127.0.0.1", "api.internal"),
    }


async def get(url: str, path: str = "/", method: str = "GET", **kw: Any) -> tuple[int, str, str]:
    """Status, X-Gatewayd-Reason and body of one request to the gateway."""
    async with aiohttp.ClientSession() as s, s.request(method, url + path, **kw) as r:
        return r.status, r.headers.get("X-Gatewayd-Reason", ""), await r.text()


def two_upstreams(url: str, first: dict[str, Any], second: dict[str, Any]) -> str:
    """Upstream and route ``a`` (prefix /) and ``b`` (prefix /b) to the same server."""
    return (upstream_toml("a", servers=[url], **first) + upstream_toml("b", servers=[url], **second)
            + route_toml("a", "a") + route_toml("b", "b", path_prefix="/b"))


# -- verification ------------------------------------------------------------------------
async def test_verified_with_tls_ca(start_gateway, tls_upstreams, pki) -> None:
    """1. an upstream shows a certificate for 127.0.0.1 signed by the CA in ``tls_ca``
    2. a request through the gateway is answered by it, over TLS, with SNI-less
       verification of the IP address (an IP is never sent as SNI)."""
    up = await tls_upstreams(pki["leaf"])
    gw = await start_gateway(app_route(up.url, {"tls_ca": "ca.pem"}))
    status, reason, body = await get(gw.url, "/echo")
    assert (status, reason, json.loads(body)["target"]) == (200, "", "/echo")
    assert up.started == 1 and up.sni == [None]


@pytest.mark.parametrize("keys", [
    {"tls_ca": "other-ca.pem"},  # a CA that did not sign it
    {},  # the system's store, which does not hold the test CA
    {"tls_ca": "ca.pem", "tls_server_name": "other.example"},  # a name the certificate does not hold
], ids=["other_ca", "system_store", "other_name"])
async def test_verification_fails(keys, start_gateway, tls_upstreams, pki, caplog) -> None:
    """A certificate the gateway cannot verify: 502 upstream_tls, the request never
    reaches the upstream, the reason is counted, and the cause logged once."""
    up = await tls_upstreams(pki["leaf"])
    gw = await start_gateway(app_route(up.url, {**keys, "max_fails": 0}))
    for _ in range(2):
        assert await get(gw.url) == (502, "upstream_tls", "502 bad gateway\n")
    assert up.started == 0
    snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
    (route,) = snap["routes"]
    assert route["upstream_error_reasons"] == {"upstream_tls": 2}
    said = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(said) == 1, said  # once, not per request


async def test_server_name_sent_and_verified(start_gateway, tls_upstreams, tmp_path, tls_ca) -> None:
    """1. the upstream's certificate holds only the name api.internal; its URL is an address
    2. upstream a, tls_server_name = "api.internal": sent in SNI and verified: 200
    3. upstream b, without it: the address is verified against the certificate: 502 upstream_tls
    4. a's health check sends and verifies the same name: it passes."""
    write_ca(tls_ca, tmp_path / "ca.pem")
    up = await tls_upstreams(issue(tls_ca, tmp_path / "up", "named", "api.internal"))
    gw = await start_gateway(two_upstreams(up.url, {"tls_ca": "ca.pem", "tls_server_name": "api.internal"},
                                           {"tls_ca": "ca.pem"}))
    assert (await get(gw.url))[:2] == (200, "")
    assert up.sni == ["api.internal"]
    assert (await get(gw.url, "/b"))[:2] == (502, "upstream_tls")
    assert up.started == 1
    check = {"path": "/", "interval": 0.05, "timeout": 1.0}
    text = gw.config_path.read_text().replace('tls_server_name = "api.internal"\n',
                                              f'tls_server_name = "api.internal"\nhealth_check = {toml(check)}\n')
    gw.config_path.write_text(text)
    assert (await gw.command({"cmd": "reload"}))["ok"]
    server = gw.runtime.table.upstreams["a"].servers[0]
    await wait_for(lambda: server.last_check is not None)
    assert server.last_check == "ok" and up.sni[-1] == "api.internal"


async def test_verify_off_accepts_any_certificate(start_gateway, tls_upstreams, tmp_path) -> None:
    """tls_verify = false: a certificate from a CA nobody trusts, for another name, is accepted."""
    stranger = trustme.CA()
    up = await tls_upstreams(issue(stranger, tmp_path / "up", "stranger", "elsewhere.example"))
    gw = await start_gateway(app_route(up.url, {"tls_verify": False}))
    assert await get(gw.url) == (200, "", "ok\n")


async def test_plain_http_server_behind_an_https_url(start_gateway, upstream) -> None:
    """An https:// URL whose server speaks clear text: the handshake fails, 502 upstream_tls;
    a port nothing listens on stays 502 upstream_connect."""
    body = (upstream_toml("a", servers=[upstream.url.replace("http:", "https:")], tls_verify=False)
            + upstream_toml("b", servers=[f"https://127.0.0.1:{free_port()}"], tls_verify=False)
            + route_toml("a", "a") + route_toml("b", "b", path_prefix="/b"))
    gw = await start_gateway(body)
    assert (await get(gw.url))[:2] == (502, "upstream_tls")
    assert (await get(gw.url, "/b"))[:2] == (502, "upstream_connect")


# -- mutual TLS --------------------------------------------------------------------------
class BlockingTlsServer:
    """A TLS server on OpenSSL's own sockets, one thread per connection, answering
    every request ``ok``: as nginx does, it sends its alert when it refuses a
    handshake (asyncio's server side does not flush it), here the TLS 1.3 alert
    ``certificate required`` after the client's half of the handshake. It reads what
    the client sent before closing, so its close cannot overtake the alert."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}"
        self.served = 0
        self.refused = 0
        self.client_certs: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._open.add(sock)
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(5)
        conn = self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self._lock:  # (the wrapper owns the descriptor from here)
            self._open.discard(sock)
            self._open.add(conn)
        sock = conn
        try:
            try:
                conn.do_handshake()
                data = conn.recv(65536)  # the TLS 1.3 verdict on the client's certificate comes here
            except (ssl.SSLError, OSError):
                self.refused += 1
                raw = socket.socket(fileno=os.dup(conn.fileno()))
                with raw:
                    raw.shutdown(socket.SHUT_WR)
                    while raw.recv(65536):
                        pass
                return
            self.client_certs.append(conn.getpeercert())
            while data:
                if b"\r\n\r\n" in data:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                    self.served += 1
                    data = b""
                data += conn.recv(65536)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(sock)
            sock.close()

    def stop(self) -> None:
        self.listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)


@pytest.fixture
def mtls_server(pki, tmp_path):
    """A BlockingTlsServer showing the 127.0.0.1 leaf that requires a client certificate
    signed by a CA of its own; that CA's certificate for the gateway in gw-client.pem/.key."""
    clients = trustme.CA()
    issue(clients, tmp_path, "gw-client", "gateway.internal")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki["leaf"].cert), str(pki["leaf"].key))
    clients.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    server = BlockingTlsServer(ctx)
    yield server
    server.stop()


async def test_mutual_tls(start_gateway, mtls_server) -> None:
    """1. the upstream requires a client certificate signed by a CA of its own
    2. route b's upstream has none: 502 upstream_tls, no request was served
    3. route a's presents tls_client_cert and tls_client_key: 200, and the upstream saw it."""
    keys = {"tls_ca": "ca.pem", "max_fails": 0}
    gw = await start_gateway(two_upstreams(
        mtls_server.url, {**keys, "tls_client_cert": "gw-client.pem", "tls_client_key": "gw-client.key"}, keys))
    assert (await get(gw.url, "/b"))[:2] == (502, "upstream_tls")
    # the server's thread counts its refusal after sending the alert the gateway answered on
    await wait_for(lambda: mtls_server.refused == 1)
    assert mtls_server.served == 0
    assert await get(gw.url) == (200, "", "ok\n")
    assert mtls_server.served == 1
    (cert,) = mtls_server.client_certs
    assert ("DNS", "gateway.internal") in cert["subjectAltName"]


# -- connections -------------------------------------------------------------------------
async def test_keepalive_over_tls(start_gateway, tls_upstreams, pki) -> None:
    """Twenty requests one after another, GETs and POSTs with bodies, go over one TLS
    connection: one handshake, one client port at the upstream."""
    up = await tls_upstreams(pki["leaf"])
    gw = await start_gateway(app_route(up.url, {"tls_ca": "ca.pem"}))
    async with aiohttp.ClientSession() as s:
        for i in range(20):
            if i % 2:
                async with s.post(gw.url + "/echo", data=b"x" * 1000) as r:
                    assert r.status == 200 and len((await r.json())["body"]) == 1000
            else:
                async with s.get(gw.url + "/") as r:
                    assert r.status == 200
    assert up.started == 20
    assert len(up.peers) == 1 and up.sni == [None]
    pool = gw.runtime.table.upstreams["app"].servers[0].session
    assert pool.stats.connects == 1 and pool.stats.reuses == 19


# -- health checks -----------------------------------------------------------------------
async def test_health_check_over_https(start_gateway, tls_upstreams, pki) -> None:
    """The active check uses the upstream's TLS context: upstream a, with the right CA,
    passes (``last_check`` ok); upstream b, with a CA that did not sign the server's
    certificate, fails with ``tls`` and is taken out after ``unhealthy`` probes."""
    up = await tls_upstreams(pki["leaf"])
    check = {"path": "/", "interval": 0.05, "timeout": 1.0, "unhealthy": 2, "healthy": 1}
    gw = await start_gateway(two_upstreams(up.url, {"tls_ca": "ca.pem", "health_check": check},
                                           {"tls_ca": "other-ca.pem", "health_check": check}))
    good = gw.runtime.table.upstreams["a"].servers[0]
    bad = gw.runtime.table.upstreams["b"].servers[0]
    await wait_for(lambda: good.last_check == "ok" and bad.state(0) == "unhealthy")
    assert bad.last_check == "tls" and good.state(0) == "up"
    assert (await get(gw.url, "/b"))[:2] == (502, "no_healthy_server")
    assert (await get(gw.url))[:2] == (200, "")


# -- reload ------------------------------------------------------------------------------
async def test_reload_reads_the_ca_again(start_gateway, tls_upstreams, pki, tmp_path) -> None:
    """1. tls_ca names a file holding a CA that did not sign the upstream's certificate: 502
    2. the file is replaced by the right CA; a reload with the same text: 200
    3. the file is replaced by garbage; the reload is refused, naming the key and line,
       and the running upstream keeps serving."""
    ca_file = tmp_path / "rotating-ca.pem"
    ca_file.write_bytes(pki["other_ca_file"].read_bytes())
    up = await tls_upstreams(pki["leaf"])
    gw = await start_gateway(app_route(up.url, {"tls_ca": "rotating-ca.pem", "max_fails": 0}))
    assert (await get(gw.url))[:2] == (502, "upstream_tls")
    ca_file.write_bytes(pki["ca_file"].read_bytes())
    answer = await gw.command({"cmd": "reload"})
    assert answer["ok"], answer
    assert await get(gw.url) == (200, "", "ok\n")
    kept = gw.runtime.table.upstreams["app"]
    assert (await gw.command({"cmd": "reload"}))["ok"]
    assert gw.runtime.table.upstreams["app"] is kept  # unchanged files: the same upstream and pools
    ca_file.write_text("not a certificate\n")
    answer = await gw.command({"cmd": "reload"})
    assert not answer["ok"]
    line = gw.config_path.read_text().splitlines().index('tls_ca = "rotating-ca.pem"') + 1
    assert f"{gw.config_path}:{line}: upstreams.app.tls_ca: expected PEM CA certificates in " \
           "rotating-ca.pem, found none" in answer["error"], answer
    assert await get(gw.url) == (200, "", "ok\n")


# -- configuration errors ----------------------------------------------------------------
@pytest.mark.parametrize(("keys", "key", "message"), [
    ({"tls_ca": "missing.pem"}, "tls_ca", "cannot read missing.pem: No such file or directory"),
    ({"tls_ca": "ca.key"}, "tls_ca", "expected PEM CA certificates in ca.key, found none"),
    ({"tls_client_cert": "gw.pem", "tls_client_key": "other.key"}, "tls_client_key",
     "the key in other.key does not match the certificate in gw.pem"),
    ({"tls_client_cert": "gw.key", "tls_client_key": "gw.key"}, "tls_client_cert",
     "expected a PEM certificate in gw.key, found none"),
    ({"tls_client_cert": "gw.pem", "tls_client_key": "gw.pem"}, "tls_client_key",
     "expected a PEM private key in gw.pem, found none"),
])
def test_unusable_files_are_configuration_errors(keys, key, message, tmp_path, tls_ca) -> None:
    """A file that cannot be used stops gatewayd before it starts, exit 78, with
    ``file:line: upstreams.app.KEY: ...``, as any configuration error."""
    issue(tls_ca, tmp_path, "gw", "gateway.internal")
    issue(tls_ca, tmp_path, "other", "other.internal")
    (tmp_path / "ca.key").write_bytes((tmp_path / "other.key").read_bytes())
    path = gateway_config(tmp_path, app_route(f"https://127.0.0.1:{free_port()}", keys))
    code = run_gatewayd(path, tmp_path).wait(20)
    err = (tmp_path / "err").read_text()
    assert code == 78, err
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith(f"{key} ="))
    assert err.strip() == f"{path}:{line}: upstreams.app.{key}: {message}"


def test_gatewayd_check_reports_them(tmp_path) -> None:
    """``gatewayd --check`` says the same and exits 78."""
    path = gateway_config(tmp_path, app_route(f"https://127.0.0.1:{free_port()}", {"tls_ca": "nope.pem"}))
    proc = subprocess.run([sys.executable, "-m", "gatewayd", "--check", "--config", str(path)],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 78
    assert "upstreams.app.tls_ca: cannot read nope.pem: No such file or directory" in proc.stderr


# -- through the real process (uvloop) ---------------------------------------------------
def test_gatewayd_process_speaks_tls_to_upstreams(gateway_process, mtls_server) -> None:
    """The daemon as it runs (uvloop's TLS transport): verified, mutual TLS, kept alive;
    without the client certificate 502 upstream_tls."""
    keys = {"tls_ca": "ca.pem", "max_fails": 0}
    gp = gateway_process(two_upstreams(
        mtls_server.url, {**keys, "tls_client_cert": "gw-client.pem", "tls_client_key": "gw-client.key"}, keys))
    url = f"http://127.0.0.1:{_port_of(gp)}"

    async def scenario() -> None:
        for _ in range(5):
            assert await get(url) == (200, "", "ok\n")
        assert (await get(url, "/b"))[:2] == (502, "upstream_tls")

    asyncio.run(scenario())
    assert mtls_server.served == 5 and len(mtls_server.client_certs) == 1  # one connection, kept alive
    assert mtls_server.refused == 1


def _port_of(gp: Any) -> int:
    for line in gp.config_path.read_text().splitlines():
        if line.startswith("listen"):
            return int(line.rsplit(":", 1)[1].rstrip('"]'))
    raise AssertionError("no listen line")



def test_workers_reload_reads_the_ca_again(gateway_process, tls_ca, tmp_path) -> None:
    """With two workers: a renewed CA file and a reload reach every worker; a CA file
    made unusable refuses the reload with the key and line, and both keep serving."""
    leaf = issue(tls_ca, tmp_path / "up", "leaf", "127.0.0.1")
    ca_file = write_ca(trustme.CA(), tmp_path / "ca.pem")  # a CA that did not sign it
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(leaf.cert), str(leaf.key))
    server = BlockingTlsServer(ctx)
    try:
        gp = gateway_process(app_route(server.url, {"tls_ca": "ca.pem", "max_fails": 0}), workers=2)
        url = f"http://127.0.0.1:{_port_of(gp)}"

        async def statuses(n: int) -> set[tuple[int, str]]:
            return {(await get(url))[:2] for _ in range(n)}

        assert asyncio.run(statuses(6)) == {(502, "upstream_tls")}
        write_ca(tls_ca, ca_file)
        answer = gp.command({"cmd": "reload"})
        assert answer["ok"], answer
        assert asyncio.run(statuses(6)) == {(200, "")}
        ca_file.write_text("")
        answer = gp.command({"cmd": "reload"})
        line = gp.config_path.read_text().splitlines().index('tls_ca = "ca.pem"') + 1
        assert not answer["ok"]
        assert f"{gp.config_path}:{line}: upstreams.app.tls_ca: expected PEM CA certificates in ca.pem, " \
               "found none" in answer["error"], answer
        assert asyncio.run(statuses(6)) == {(200, "")}
    finally:
        server.stop()
