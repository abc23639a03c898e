"""TLS for client connections: certificates loaded into contexts, SNI, and the
opener that completes a handshake before HTTP sees a byte.

One ``SSLContext`` per certificate: SNI picks among them by switching the
connection's context in the ClientHello callback (an exact host, then a
wildcard one label deep, else the first certificate). A ``Terminator`` is what
one generation of the configuration built; a reload builds a new one (every
file read again), so new handshakes use the new certificates while open
connections keep the context they were made with.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .listener import ProtocolFactory
from .tls_transport import READ_SIZE, TlsSocketTransport
from .x509 import facts, first_pem_certificate

log = logging.getLogger("gatewayd")

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
ALPN = ["http/1.1"]


class CertificateProblem(Exception):
    """A certificate that cannot be used; ``key`` is which of its keys is wrong
    (``cert``, ``key`` or ``hosts``), so the error can name the key path."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass
class HandshakeCounts:
    """Handshakes since start, across reloads (the snapshot's ``tls``)."""

    handshakes: int = 0
    errors: int = 0


@dataclass(frozen=True)
class Certificate:
    name: str  # the cert path as the configuration gives it
    hosts: tuple[str, ...]
    not_after: float
    context: ssl.SSLContext = field(compare=False, repr=False)

    @property
    def expired(self) -> bool:
        return self.not_after < time.time()


def _no_password() -> bytes:
    # without a callback OpenSSL would prompt on the terminal for an encrypted key
    raise CertificateProblem("key", "expected an unencrypted private key")


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateProblem(key, f"cannot read {path}: {exc.strerror or exc}") from None


def server_context(min_version: str, session_tickets: bool) -> ssl.SSLContext:
    """A server context with the listener settings and no certificate yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[min_version]
    ctx.set_alpn_protocols(ALPN)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE | ssl.OP_NO_COMPRESSION
    if not session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0  # TLS 1.3 sends its tickets whatever OP_NO_TICKET says
    return ctx


def load_certificate(name: str, cert: Path, key: Path, hosts: Sequence[str] | None,
                     min_version: str, session_tickets: bool) -> Certificate:
    """A certificate and its key in a context of their own; CertificateProblem names
    what is wrong with which of them."""
    cert_pem = _read(cert, "cert")
    key_pem = _read(key, "key")
    try:
        found = facts(first_pem_certificate(cert_pem))
    except ValueError as exc:
        raise CertificateProblem("cert", f"expected a PEM certificate in {cert} ({exc})") from None
    if b"PRIVATE KEY-----" not in key_pem:
        raise CertificateProblem("key", f"expected a PEM private key in {key}")
    if b"ENCRYPTED" in key_pem:
        raise CertificateProblem("key", f"expected an unencrypted private key in {key}")
    ctx = server_context(min_version, session_tickets)
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CertificateProblem("key", "the key does not match the certificate") from None
        raise CertificateProblem("key", f"cannot load with {cert}: {exc.reason or exc}") from None
    # a certificate for IP addresses only names no host: SNI never picks it, and it
    # serves as the default when it is the first
    names = tuple(h.lower() for h in hosts) if hosts is not None else found.hosts
    return Certificate(name, names, found.not_after, ctx)


class Terminator:
    """The certificates of one generation, SNI among them, and how long a
    handshake may take."""

    def __init__(self, certificates: Sequence[Certificate], handshake_timeout: float,
                 counts: HandshakeCounts) -> None:
        if not certificates:
            raise ValueError("a TLS listener needs a certificate")
        self.certificates = tuple(certificates)
        self.handshake_timeout = handshake_timeout
        self.counts = counts
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcard: dict[str, ssl.SSLContext] = {}  # "example.com" for "*.example.com"
        for c in self.certificates:
            for host in c.hosts:
                if host.startswith("*."):
                    self._wildcard.setdefault(host[2:], c.context)
                else:
                    self._exact.setdefault(host, c.context)
        # connections start on the first certificate's context (also for clients that send
        # no SNI); only that context's callback runs
        self.context = self.certificates[0].context
        if len(self.certificates) > 1:
            self.context.sni_callback = self._pick
        else:
            self.context.sni_callback = None

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        if server_name:
            name = server_name.lower().rstrip(".")
            ctx = self._exact.get(name)
            if ctx is not None:
                return ctx
            _, _, parent = name.partition(".")
            ctx = self._wildcard.get(parent)
            if ctx is not None:
                return ctx
        return self.context

    def _pick(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
              _: ssl.SSLContext) -> None:
        ctx = self.context_for(server_name)
        if ctx is not self.context:
            conn.context = ctx


class _Secure:
    """The protocol factory for TLS connections: marks each connection secure (its
    requests go upstream with ``X-Forwarded-Proto: https``) before connection_made."""

    __slots__ = ("factory",)

    def __init__(self, factory: ProtocolFactory) -> None:
        self.factory = factory

    def __call__(self) -> asyncio.Protocol:
        protocol = self.factory()
        protocol.secure = True  # type: ignore[attr-defined]
        return protocol


class TlsOpener:
    """Completes the TLS handshake (within the terminator's timeout), then hands the
    connection to the HTTP protocol on a ``TlsSocketTransport`` (OpenSSL on the
    socket: see tls_transport.py for why not the loop's TLS transport)."""

    waits_for_peer = True

    def __init__(self, terminator: Terminator) -> None:
        self.terminator = terminator
        # one loop thread: every connection's reads land here before they are copied out
        self._scratch = bytearray(READ_SIZE)
        self._view = memoryview(self._scratch)

    async def open(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                   factory: ProtocolFactory) -> object:
        t = self.terminator
        try:
            transport = TlsSocketTransport(loop, conn, t.context, self._scratch, self._view)
            async with asyncio.timeout(t.handshake_timeout):
                await transport.handshake()
        except asyncio.CancelledError:
            raise
        except Exception:
            t.counts.errors += 1
            raise
        t.counts.handshakes += 1
        transport.start(_Secure(factory)())
        return None
