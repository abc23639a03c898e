"""``[[tls.certificates]]``: the kind of the array, and the check that every file
named there loads (the loader's, so ``gatewayd --check``, start and reload all
refuse a certificate that cannot be used, naming its key path)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..http.addresses import HOST_RE
from .kinds import Invalid, Kind, shown
from .positions import Path

_WILDCARD = re.compile(r"\*\.[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)+", re.ASCII)
_KEYS = ("cert", "key", "hosts")


@dataclass(frozen=True)
class CertificateEntry:
    cert: str  # paths as written; relative ones are taken from the file's folder
    key: str
    hosts: tuple[str, ...] | None = None  # None: the certificate's own DNS names


@dataclass(frozen=True)
class CertificateList(Kind):
    describe = ('an array of tables {cert = "site.pem", key = "site.key", '
                'hosts = ["example.com", "*.example.com"]} (hosts optional)')

    def parse(self, value: Any) -> tuple[CertificateEntry, ...]:
        if not isinstance(value, list):
            raise _expected(self.describe, value)
        out = []
        problems: list[Invalid] = []
        for i, item in enumerate(value):
            try:
                out.append(self._one(item))
            except Invalid as exc:
                problems.extend(Invalid(str(p), (i, *p.at)) for p in exc.every())
        if problems:
            raise Invalid.of_items(problems)
        return tuple(out)

    def _one(self, item: Any) -> CertificateEntry:
        if not isinstance(item, dict):
            raise _expected("a table {cert, key, hosts}", item)
        problems = []
        for key in item:
            if key not in _KEYS:
                problems.append(Invalid(f"unknown key; expected one of {', '.join(_KEYS)}", (key,)))
        paths = {}
        for key in ("cert", "key"):
            raw = item.get(key)
            if not isinstance(raw, str) or not raw or "\0" in raw:
                what = "a PEM file path (certificate and chain)" if key == "cert" else "a PEM private key path"
                problems.append(Invalid(f"missing; expected {what}" if raw is None
                                        else f"expected {what}, got {shown(raw)}", (key,)))
            else:
                paths[key] = raw
        hosts = None
        if "hosts" in item:
            try:
                hosts = _hosts(item["hosts"])
            except Invalid as exc:
                problems.append(Invalid(str(exc), ("hosts", *exc.at)))
        if problems:
            raise Invalid.of_items(problems)
        return CertificateEntry(paths["cert"], paths["key"], hosts)

    def dump(self, value: Any) -> Any:
        out = []
        for c in value:
            table: dict[str, Any] = {"cert": c.cert, "key": c.key}
            if c.hosts is not None:
                table["hosts"] = list(c.hosts)
            out.append(table)
        return out


def _hosts(value: Any) -> tuple[str, ...]:
    what = 'an array of host names ("example.com", or "*.example.com" for one label)'
    if not isinstance(value, list) or not value:
        raise _expected(what, value)
    out = []
    for i, host in enumerate(value):
        if not isinstance(host, str) or not (HOST_RE.fullmatch(host) or _WILDCARD.fullmatch(host)):
            raise _expected(what, host, (i,))
        out.append(host.lower())
    return tuple(out)


def _expected(what: str, value: Any, at: Path = ()) -> Invalid:
    return Invalid(f"expected {what}, got {shown(value)}", at)
