"""Request heads refused before routing (SPEC §3: a malformed or ambiguous request
gets a 4xx and never reaches an upstream).

aiohttp's C parser (llhttp, which gatewayd.h1server drives) already refuses most smuggling shapes with 400 (CL+TE,
repeated Content-Length, bad chunk sizes, bare LF, obs-fold, ...). These are the
ones it lets through that a gateway must not forward as they are:

- HTTP/0.9 and HTTP/2.0+ request lines on an HTTP/1.1 port: 400;
- Transfer-Encoding other than exactly ``chunked`` (``gzip, chunked``): 400 (nginx
  answers 501, which RFC 9112 §6.1 suggests; SPEC §3 keeps the client's errors in
  4xx); any Transfer-Encoding on HTTP/1.0: 400 (§6.1: "MUST treat the message as
  if the framing is faulty");
- a head over ``MAX_HEAD_SIZE`` in all (aiohttp bounds each line and the number
  of lines, not their sum): 431;
- header values that are not UTF-8: aiohttp's client would drop the odd bytes
  when forwarding, silently changing the value: 400;
- a Host that is not ``host[:port]``: 400;
- a target that is neither origin-form (``/path``) nor absolute-form naming the
  same authority as Host (``*``, ``host:port``, ``http://other/``): 400;
- a path with dot-segments (``/api/../admin``, also ``%2e``-encoded): routes match
  on the path as sent, an upstream may resolve it elsewhere (RFC 3986 §5.2.4 has
  clients remove them before sending): 400.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from aiohttp.http import HttpVersion10, HttpVersion11

if TYPE_CHECKING:
    from .h1server import Request

# All of a request head's bytes together (Envoy's default is 60 KiB; nginx's 4 x 8 KiB).
MAX_HEAD_SIZE = 64 * 1024

# RFC 3986 host (reg-name or IP literal) with an optional port.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]{1,5})?\Z")
_ABSOLUTE = re.compile(r"https?://([^/?#]*)([^#]*)\Z", re.IGNORECASE)
_DOT_SEGMENT = re.compile(r"/(?:\.|%2e){1,2}(?=/|\Z)", re.IGNORECASE)


class Refused(Exception):
    """The request must be answered ``status`` without routing it."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def origin_target(request: Request) -> str:
    """The request's target in origin form (``/path?query``), to route and forward.

    Raises Refused for a request the gateway must not forward.
    """
    version = request.version
    if version != HttpVersion11 and version != HttpVersion10:
        raise Refused(400, "http_version")
    headers = request.headers
    raw = request.raw_headers
    protocol = request.protocol
    checked = protocol.checked_headers
    seen = checked is not None and checked[0] is raw  # equal fields are one object (h1server.Request)
    if seen:
        # the same fields as an earlier request of the connection, which passed the
        # checks on fields alone (and had no Transfer-Encoding, so whatever its version)
        fields_size = checked[1]  # type: ignore[index]
    else:
        fields_size = _check_fields(headers, raw, version)
    target = request.raw_path
    if len(request.method) + len(target) + 12 + fields_size > MAX_HEAD_SIZE:
        raise Refused(431, "header_too_large")
    if not seen:
        host = headers.get("Host")
        if host is not None and _HOST.match(host) is None:
            raise Refused(400, "bad_host")
        if "Transfer-Encoding" not in headers:
            protocol.checked_headers = (raw, fields_size)
    if not target.startswith("/"):
        host = headers.get("Host")
        m = _ABSOLUTE.match(target)
        # absolute-form: routed by its path, and only when Host names the same authority
        # (RFC 9112 §3.2.2 lets the target win; refusing the mismatch leaves nothing to guess)
        if m is None or host is None or m.group(1).lower() != host.lower():
            raise Refused(400, "bad_target")
        target = m.group(2) if m.group(2).startswith("/") else "/" + m.group(2)
    if ("." in target or "%" in target) and _DOT_SEGMENT.search(target.partition("?")[0]) is not None:
        raise Refused(400, "bad_target")
    return target


def _check_fields(headers: Any, raw: tuple[tuple[bytes, bytes], ...], version: Any) -> int:
    """The checks on the header fields alone; their size on the wire. Their outcome
    is remembered on the connection (``H1Protocol.checked_headers``) when they pass
    with a good Host and no Transfer-Encoding: a client repeats its fields request
    after request."""
    te = headers.get("Transfer-Encoding")
    if te is not None:
        if version == HttpVersion10:
            raise Refused(400, "bad_framing")
        if te.strip().lower() != "chunked":
            raise Refused(400, "transfer_coding")
    size = 0
    for name, value in raw:
        size += len(name) + len(value) + 4
        if not value.isascii():
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise Refused(400, "bad_header") from None
    return size
