"""Header rewriting between client and upstream (RFC 9110 §7.6.1 hop-by-hop)."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

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


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str] | None:
    values = headers.getall("Connection", None)
    if not values:
        return None
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()} - END_TO_END


def request_headers(headers: CIMultiDictProxy[str], client_ip: str, host: str) -> CIMultiDict[str]:
    """The headers sent upstream: hop-by-hop removed, X-Forwarded-* set.

    X-Forwarded-For from the client is kept and the client's address appended:
    the gateway never trusts it, it only passes the chain on.
    Names with an underscore are dropped, as nginx does by default: CGI-style
    servers read ``X_Forwarded_For`` as ``X-Forwarded-For`` (a spoofing path).
    """
    named = _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        if lname in REQUEST_DROP or (named is not None and lname in named) or "_" in lname:
            continue
        out.add(name, value)
    prior = headers.getall("X-Forwarded-For", None)
    out["X-Forwarded-For"] = ", ".join((*prior, client_ip)) if prior else client_ip
    out["X-Forwarded-Proto"] = "http"
    if host:
        out["X-Forwarded-Host"] = host
    return out


def response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers as sent to the client."""
    named = _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lname = name.lower()
        if lname in RESPONSE_DROP or (named is not None and lname in named):
            continue
        out.add(name, value)
    return out
