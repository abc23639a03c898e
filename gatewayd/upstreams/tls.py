"""The TLS of an upstream with https:// servers: one client ``SSLContext``, built
from its ``tls_*`` keys when its generation is built, shared by the connections
of its servers' pools and by its health checks.

The files are read then, and kept as read: ``UpstreamTls.current`` tells a
reload whether they still hold the same bytes. A renewed CA or client
certificate makes a new upstream object with a new context, so a reload reads
them again even when the configuration text did not change; pooled connections
of the old one finish their exchanges with what they were made with.

A file that cannot be used is a ``TlsFileError`` naming its key
(``upstreams.api.tls_client_key: the key does not match the certificate``):
``gatewayd`` checks them with the file (exit 78) and a reload that meets one is
refused.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..config.positions import Path
from ..config.settings import UpstreamConfig
from .names import KeyProblem

ALPN = ("http/1.1",)


class TlsFileError(KeyProblem):
    """A ``tls_*`` file of an upstream cannot be used."""


class _Encrypted(Exception):
    """The private key asks for a password (none is configured)."""


@dataclass(frozen=True, eq=False)
class UpstreamTls:
    """An upstream's client context, the name its connections send and verify (None:
    each server's host), and the files it was made from, as read."""

    context: ssl.SSLContext
    server_name: str | None
    files: tuple[tuple[str, bytes], ...]

    def server_hostname(self, host: str) -> str:
        """SNI, and the name verified, for a server whose URL's host is ``host``."""
        return self.server_name or host

    def current(self) -> bool:
        """Whether every file still holds what was read when the context was made."""
        for path, data in self.files:
            try:
                if _read(path) != data:
                    return False
            except OSError:
                return False  # building it again says why
        return True


def file_of(config: UpstreamConfig, value: str) -> str:
    """A ``tls_*`` path as the gateway opens it: relative to the configuration file's folder."""
    return os.path.join(config.folder, value)


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _no_password() -> bytes:
    raise _Encrypted


def upstream_tls(config: UpstreamConfig) -> UpstreamTls | None:
    """The TLS of ``config``'s https:// servers (None when it has none); TlsFileError
    when a file cannot be used."""
    if not any(s.tls for s in config.servers or ()):
        return None
    at: Path = ("upstreams", config.name)
    files: list[tuple[str, bytes]] = []

    def read(key: str, value: str) -> bytes:
        path = file_of(config, value)
        try:
            data = _read(path)
        except OSError as exc:
            raise TlsFileError((*at, key), f"cannot read {value}: {exc.strerror or exc}") from None
        files.append((path, data))
        return data

    cadata: str | None = None
    if config.tls_ca is not None:
        cadata = read("tls_ca", config.tls_ca).decode("ascii", "replace")
    if config.tls_verify and cadata is None:
        ctx = ssl.create_default_context()  # the system's CA store
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if cadata is not None:  # read and checked even when tls_verify is off: it may be turned on
            try:
                ctx.load_verify_locations(cadata=cadata)
            except (ssl.SSLError, ValueError):  # ValueError: an empty file
                raise TlsFileError((*at, "tls_ca"),
                                   f"expected PEM CA certificates in {config.tls_ca}, found none") from None
    if not config.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if config.tls_client_cert is not None and config.tls_client_key is not None:
        _client_cert(ctx, config, at, read)
    ctx.set_alpn_protocols(list(ALPN))
    name = config.tls_server_name
    if name is not None and name.startswith("["):
        name = name[1:-1]  # an IPv6 address, as HostName keeps it
    return UpstreamTls(ctx, name, tuple(files))


def _client_cert(ctx: ssl.SSLContext, config: UpstreamConfig, at: Path,
                 read: Callable[[str, str], bytes]) -> None:
    """Load the client certificate and its key, each problem said on its own key."""
    cert, key = config.tls_client_cert, config.tls_client_key
    assert cert is not None and key is not None
    if b"-----BEGIN CERTIFICATE-----" not in read("tls_client_cert", cert):
        raise TlsFileError((*at, "tls_client_cert"), f"expected a PEM certificate in {cert}, found none")
    if b"PRIVATE KEY-----" not in read("tls_client_key", key):
        raise TlsFileError((*at, "tls_client_key"), f"expected a PEM private key in {key}, found none")
    try:
        ctx.load_cert_chain(file_of(config, cert), file_of(config, key), password=_no_password)
    except _Encrypted:
        raise TlsFileError((*at, "tls_client_key"),
                           f"expected an unencrypted private key in {key}, got one that asks for a "
                           "password") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TlsFileError((*at, "tls_client_key"),
                               f"the key in {key} does not match the certificate in {cert}") from None
        raise TlsFileError((*at, "tls_client_cert"),
                           f"cannot use {cert} with the key in {key}: {exc.reason or exc}") from None
    except OSError as exc:  # gone since it was read
        raise TlsFileError((*at, "tls_client_cert"), f"cannot read {cert}: {exc.strerror or exc}") from None


def tls_problems(upstreams: Iterable[UpstreamConfig]) -> list[TlsFileError]:
    """Every upstream's TLS file that cannot be used (the first of each upstream), in
    the file's order: what ``gatewayd`` checks beside the file itself."""
    found = []
    for config in upstreams:
        try:
            upstream_tls(config)
        except TlsFileError as exc:
            found.append(exc)
    return found
