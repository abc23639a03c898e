"""Certificates made for the TLS tests (trustme): one CA per session, leaves and
client certificates written as PEM files where a configuration can name them."""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Pem:
    cert: Path  # the leaf and its chain
    key: Path


def issue(ca: trustme.CA, directory: Path, name: str, *hosts: str,
          not_after: datetime.datetime | None = None) -> Pem:
    """A leaf certificate for ``hosts`` signed by ``ca``, written to ``directory``."""
    leaf = ca.issue_cert(*hosts, not_after=not_after) if not_after else ca.issue_cert(*hosts)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return Pem(cert, key)


def write_ca(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path


def client_context(ca: trustme.CA, server_hostname_check: bool = True) -> ssl.SSLContext:
    """A client context that trusts ``ca`` (and only it)."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.check_hostname = server_hostname_check
    return ctx


def tls_section(*pems: Pem, hosts: list[list[str] | None] | None = None, **options: object) -> str:
    """A [tls] section naming ``pems`` (``hosts[i]`` for the i-th, when given), for
    ``builders.gateway_config(..., tls=...)``."""
    text = "[tls]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in options.items()) + "\n"
    for i, pem in enumerate(pems):
        text += f'[[tls.certificates]]\ncert = "{pem.cert}"\nkey = "{pem.key}"\n'
        names = hosts[i] if hosts is not None else None
        if names is not None:
            text += "hosts = [" + ", ".join(f'"{h}"' for h in names) + "]\n"
        text += "\n"
    return text


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
