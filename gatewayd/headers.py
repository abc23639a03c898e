"""Header rewriting between client and upstream (RFC 9110 §7.6.1 hop-by-hop)."""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDictProxy

# Lower-case names never forwarded in either direction.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
})
# Never forwarded upstream: Expect is answered by the gateway itself.
REQUEST_DROP = HOP_BY_HOP | {"expect", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
# An upstream must not be able to forge the gateway's own reason header.
RESPONSE_DROP = HOP_BY_HOP | {"x-gatewayd-reason"}
# Never removed because Connection names them: a client must not make the upstream
# see another Host than the one the request was routed by.
END_TO_END = frozenset({"host"})


def _tokens(values: Iterable[str]) -> set[str] | None:
    tokens = {t.strip().lower() for v in values for t in v.split(",") if t.strip()} - END_TO_END
    return tokens or None


def request_headers(headers: CIMultiDictProxy[str], client_ip: str, host: str) -> list[tuple[str, str]]:
    """The headers sent upstream, as (name, value) pairs: hop-by-hop removed,
    X-Forwarded-* set.

    X-Forwarded-For from the client is kept and the client's address appended:
    the gateway never trusts it, it only passes the chain on.
    Names with an underscore are dropped, as nginx does by default: CGI-style
    servers read ``X_Forwarded_For`` as ``X-Forwarded-For`` (a spoofing path).
    """
    connection = headers.getall("Connection", None)
    named = _tokens(connection) if connection else None
    out: list[tuple[str, str]] = []
    for name, value in headers.items():
        lname = name.lower()
        if lname in REQUEST_DROP or (named is not None and lname in named) or "_" in lname:
            continue
        out.append((name, value))
    prior = headers.getall("X-Forwarded-For", None)
    out.append(("X-Forwarded-For", ", ".join((*prior, client_ip)) if prior else client_ip))
    out.append(("X-Forwarded-Proto", "http"))
    if host:
        out.append(("X-Forwarded-Host", host))
    return out


def response_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's response headers, (name, value) pairs in its order, as sent to
    the client (a list web.StreamResponse takes as its headers)."""
    pairs = headers if isinstance(headers, list) else list(headers)
    connection = [v for n, v in pairs if len(n) == 10 and n.lower() == "connection"]
    named = _tokens(connection) if connection else None
    out: list[tuple[str, str]] = []
    for name, value in pairs:
        lname = name.lower()
        if lname in RESPONSE_DROP or (named is not None and lname in named):
            continue
        out.append((name, value))
    return out


def split_fields(fields: bytes) -> list[tuple[str, str]]:
    """Header lines, CRLF between them, as (name, value) pairs in order, decoded like
    aiohttp (UTF-8, surrogateescape: bytes survive the round trip). The lines must
    have passed a strict parser (llhttp): each splits at its first colon."""
    if not fields:
        return []
    out = []
    for line in fields.decode("utf-8", "surrogateescape").split("\r\n"):
        name, _, value = line.partition(":")
        out.append((name, value.strip(" \t")))
    return out
