"""TLS as an operator meets it from outside: configuration errors from
``gatewayd --check`` and at start (exit 78, ``file:line: key: ...``), and a real
gatewayd process (uvloop's TLS transport, workers, SIGHUP rotation under load)."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

from ..builders import app_route, gateway_config
from ..certs import client_context, issue, tls_section
from ..conftest import ROOT
from .test_tls import connect, der_of

EX_CONFIG = 78


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gatewayd", "--check", "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def line_of(path: Path, start: str, nth: int = 0) -> int:
    return [i for i, x in enumerate(path.read_text().splitlines(), 1) if x.startswith(start)][nth]


def test_certificate_errors_name_the_key(tmp_path, tls_ca):
    """Four certificates, each wrong another way: every error at once, each with its
    line and key path; exit 78, nothing on stdout. Then a host that is no host name."""
    d = tmp_path / "certs"
    good, other = issue(tls_ca, d, "good", "a.example"), issue(tls_ca, d, "other", "b.example")
    (d / "notpem.pem").write_text("hello\n")
    (d / "enc.key").write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")
    tls = (
        "[tls]\n\n"
        f'[[tls.certificates]]\ncert = "{good.cert}"\nkey = "{other.key}"\n\n'  # mismatch
        f'[[tls.certificates]]\ncert = "certs/missing.pem"\nkey = "{good.key}"\n\n'  # unreadable
        f'[[tls.certificates]]\ncert = "certs/notpem.pem"\nkey = "{good.key}"\n\n'  # not PEM
        f'[[tls.certificates]]\ncert = "certs/good.pem"\nkey = "certs/enc.key"\n\n'  # encrypted
    )
    path = gateway_config(tmp_path, app_route("http://127.0.0.1:1"), tls=tls)
    run = check(path)
    assert (run.returncode, run.stdout) == (EX_CONFIG, ""), run
    said = run.stderr.splitlines()
    key0, cert1 = line_of(path, "key = ", 0), line_of(path, "cert = ", 1)
    cert2, key3 = line_of(path, "cert = ", 2), line_of(path, "key = ", 3)
    assert said[0] == f"{path}:{key0}: tls.certificates[0].key: the key does not match the certificate"
    assert said[1].startswith(f"{path}:{cert1}: tls.certificates[1].cert: cannot read ")
    assert said[1].endswith("certs/missing.pem: No such file or directory")
    assert said[2].startswith(f"{path}:{cert2}: tls.certificates[2].cert: expected a PEM certificate")
    assert said[3].startswith(f"{path}:{key3}: tls.certificates[3].key: expected an unencrypted private key")
    assert len(said) == 4
    path.write_text(path.read_text().replace('key = "certs/enc.key"\n',
                                             'key = "certs/enc.key"\nhosts = ["a.example", "*"]\n'))
    run = check(path)
    assert run.returncode == EX_CONFIG
    assert run.stderr.startswith(f"{path}:{line_of(path, 'hosts = ')}: tls.certificates[3].hosts[1]: "
                                 'expected an array of host names ("example.com", or "*.example.com" '
                                 'for one label), got "*"')


def test_a_tls_listener_needs_certificates(tmp_path):
    path = gateway_config(tmp_path, app_route("http://127.0.0.1:1"), tls="[tls]\nmin_version = \"1.3\"\n\n")
    run = check(path)
    assert run.returncode == EX_CONFIG
    assert run.stderr == (f"{path}:{line_of(path, 'listen')}: server.listen[0].tls: "
                          "expected [[tls.certificates]] for a TLS listener, got none\n")
    started = subprocess.run([sys.executable, "-m", "gatewayd", "--config", str(path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert started.returncode == EX_CONFIG and "server.listen[0].tls" in started.stderr


async def _hammer(port: int, ctx: ssl.SSLContext, stop: asyncio.Event, statuses: list[int],
                  served: set[bytes]) -> None:
    """New TLS connections one after another, a request on each, until ``stop``."""
    while not stop.is_set():
        client = await connect(port, ctx)
        served.add(client.served)
        statuses.append((await client.get())[0])
        client.close()


async def test_workers_rotate_a_certificate_on_sighup_under_load(gateway_process, upstream, tls_ca, tmp_path):
    """gatewayd with workers = 2 (uvloop, SO_REUSEPORT) on a TLS listener; four clients
    open new TLS connections without pause: 1. the certificate files are replaced and
    SIGHUP sent 2. the reload is reported ok and new handshakes get the new certificate
    3. no request failed, before, during or after."""
    pem = issue(tls_ca, tmp_path / "certs", "a", "a.example")
    first = der_of(pem)
    gp = gateway_process(app_route(upstream.url), workers=2, tls=tls_section(pem))
    port = int(gp.config_path.read_text().split('address = "127.0.0.1:')[1].split('"')[0])
    ctx = client_context(tls_ca)
    stop = asyncio.Event()
    statuses: list[int] = []
    served: set[bytes] = set()
    clients = [asyncio.ensure_future(_hammer(port, ctx, stop, statuses, served)) for _ in range(4)]
    try:
        await _until(lambda: len(statuses) >= 40)
        renewed = issue(tls_ca, tmp_path / "renewed", "a", "a.example")
        pem.cert.write_bytes(renewed.cert.read_bytes())
        pem.key.write_bytes(renewed.key.read_bytes())
        gp.signal(signal.SIGHUP)
        await _until(lambda: (gp.command({"cmd": "snapshot"})["snapshot"]["last_reload"] or {}).get("ok") is True)
        seen = len(statuses)
        await _until(lambda: len(statuses) >= seen + 40)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert set(statuses) == {200}, statuses
    assert served == {first, der_of(pem)}
    newest = await connect(port, ctx)
    assert newest.served == der_of(pem)
    newest.close()


async def _until(predicate, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def test_a_uvloop_process_serves_tls(gateway_process, tls_ca, tmp_path):
    """One process under uvloop: a blocking client's request over TLS is answered."""
    pem = issue(tls_ca, tmp_path / "certs", "a", "a.example")
    gp = gateway_process(app_route("http://127.0.0.1:1"), tls=tls_section(pem))
    port = int(gp.config_path.read_text().split('address = "127.0.0.1:')[1].split('"')[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, \
            client_context(tls_ca).wrap_socket(sock, server_hostname="a.example") as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        got = b""
        while chunk := tls.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 502 "), got[:100]  # nothing listens on port 1
