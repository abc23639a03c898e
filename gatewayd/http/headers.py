"""Header rewriting between client and upstream (RFC 9110 §7.6.1 hop-by-hop)."""

from __future__ import annotations

from collections.abc import Iterable

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
    # OWS is spaces and tabs only (RFC 9110 §5.6.3): str.strip() would also eat \xa0
    tokens = {t.strip(" \t").lower() for v in values for t in v.split(",") if t.strip(" \t")} - END_TO_END
    return tokens or None


_REQUEST_SKIP = frozenset(n.encode() for n in REQUEST_DROP) | {b"content-length"}


def request_fields(raw_headers: tuple[tuple[bytes, bytes], ...], client_ip: str, host: str,
                   secure: bool = False) -> bytes:
    """The header lines sent upstream (each ending in CRLF), made from the request's
    raw headers: hop-by-hop removed, X-Forwarded-* set, and no framing header (the
    upstream request's own framing is added by H1Pool). Bytes in, bytes out.

    X-Forwarded-For from the client is kept and the client's address appended:
    the gateway never trusts it, it only passes the chain on.
    Names with an underscore are dropped, as nginx does by default: CGI-style
    servers read ``X_Forwarded_For`` as ``X-Forwarded-For`` (a spoofing path).

    Raises ValueError when a CR or LF would end up inside a line (request splitting):
    the parser refuses those, this makes sure."""
    prior: list[bytes] = []
    named: list[bytes] | None = None
    out: list[bytes] = []
    for name, value in raw_headers:
        lname = name.lower()
        if lname in _REQUEST_SKIP:
            if lname == b"x-forwarded-for":
                prior.append(value)
            elif lname == b"connection":
                if named is None:
                    named = []
                named.append(value)
            continue
        if b"_" in lname:
            continue
        out.append(name + b": " + value + b"\r\n")
    if named is not None:
        tokens = _tokens(v.decode("latin-1") for v in named)
        if tokens is not None:
            # rare (HTTP/1.1 clients seldom send Connection): filter again without those named
            drop = {t.encode("latin-1") for t in tokens}
            out = [line for line in out if line[:line.index(b":")].lower() not in drop]
    ip = client_ip.encode("ascii", "surrogateescape")
    out.append(b"X-Forwarded-For: " + b", ".join((*prior, ip)) + b"\r\n" if prior
               else b"X-Forwarded-For: " + ip + b"\r\n")
    out.append(b"X-Forwarded-Proto: https\r\n" if secure else b"X-Forwarded-Proto: http\r\n")
    if host:
        out.append(b"X-Forwarded-Host: " + host.encode("utf-8", "surrogateescape") + b"\r\n")
    block = b"".join(out)
    if block.count(b"\n") != len(out) or block.count(b"\r") != len(out):
        raise ValueError("CR or LF in a header")
    return block


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
