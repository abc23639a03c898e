"""Request heads refused before routing (SPEC §3: a malformed or ambiguous request
gets a 4xx and never reaches an upstream).

aiohttp's C parser (llhttp, which http/server_connection.py drives) already refuses
most smuggling shapes with 400 (CL+TE, repeated Content-Length, bad chunk sizes,
bare LF, obs-fold, ...). These are the ones it lets through that a gateway must
not forward as they are:

- HTTP/0.9 and HTTP/2.0+ request lines on an HTTP/1.1 port: 400;
- Transfer-Encoding other than exactly ``chunked`` (``gzip, chunked``): 400 (nginx
  answers 501, which RFC 9112 §6.1 suggests; SPEC §3 keeps the client's errors in
  4xx); any Transfer-Encoding on HTTP/1.0: 400 (§6.1: "MUST treat the message as
  if the framing is faulty");
- a head over ``MAX_HEAD`` in all (aiohttp bounds each line and the number
  of lines, not their sum): 431;
- header values that are not UTF-8: aiohttp's client would drop the odd bytes
  when forwarding, silently changing the value: 400;
- a Host that is not ``host[:port]``: 400;
- ``TRACE`` and ``CONNECT``: 405 ``method_not_allowed`` (as nginx answers TRACE):
  a reverse proxy tunnels nothing, and TRACE would echo to the client the fields
  the gateway adds for the upstream;
- a target that is neither origin-form (``/path``) nor absolute-form naming the
  same authority as Host (``*``, ``host:port``, ``http://other/``; the default
  port and a trailing dot of the host name do not count): 400;
- a path that has no normal form (gatewayd.http.paths: dot-segments, also encoded or
  across ``%2F``, ``%00``, malformed escapes): 400 ``bad_target``; a path whose
  normal form differs is routed and forwarded in that form, so what matched is
  what the upstream serves;
- an escaped slash or a backslash in the path: 400 ``bad_target`` unless the route
  it matches (as sent, escapes kept) says ``escaped_slashes = "keep"``: raised as a
  Refused carrying the target, which ``kept_target`` then judges.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from aiohttp.http import HttpVersion10, HttpVersion11

from .paths import BadPath, normalize
from .wire import MAX_HEAD

if TYPE_CHECKING:
    from .request import Request


# RFC 3986 host (reg-name or IP literal) with an optional port.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]{1,5})?\Z")
_ABSOLUTE = re.compile(r"(https?)://([^/?#]*)([^#]*)\Z", re.IGNORECASE)
_DEFAULT_PORT = {"http": ":80", "https": ":443"}
# no reverse-proxy request: CONNECT asks for a tunnel, TRACE echoes the request as
# the upstream got it (forwarding fields included) back to the client
_NOT_PROXIED = frozenset(("TRACE", "CONNECT"))


class Refused(Exception):
    """The request must be answered ``status`` without routing it."""

    def __init__(self, status: int, reason: str, target: str | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        # set for an escaped slash or a backslash: the normal target its route may keep
        self.target = target


def origin_target(request: Request) -> str:
    """The request's target in origin form (``/path?query``), to route and forward.

    Raises Refused for a request the gateway must not forward.
    """
    version = request.version
    # (the parser gives HTTP/1.1 and 1.0 as these very objects: "is" spares a tuple compare)
    if version is not HttpVersion11 and version != HttpVersion11 and version != HttpVersion10:
        raise Refused(400, "http_version")
    headers = request.headers
    raw = request.raw_headers
    protocol = request.protocol
    checked = protocol.checked_headers
    seen = checked is not None and checked[0] is raw  # equal fields are one object (http.request.Request)
    if seen:
        # the same fields as an earlier request of the connection, which passed the
        # checks on fields alone (and had no Transfer-Encoding, so whatever its version)
        fields_size = checked[1]  # type: ignore[index]
    else:
        fields_size = _check_fields(headers, raw, version)
    target = request.raw_path
    if len(request.method) + len(target) + 12 + fields_size > MAX_HEAD:
        raise Refused(431, "header_too_large")
    if not seen:
        host = headers.get("Host")
        if host is not None and _HOST.match(host) is None:
            raise Refused(400, "bad_host")
        if "Transfer-Encoding" not in headers:
            protocol.checked_headers = (raw, fields_size)
    if request.method in _NOT_PROXIED:
        raise Refused(405, "method_not_allowed")
    if not target.startswith("/"):
        target = _absolute_path(target, headers.get("Host"))
    # (a dot-segment starts "/."; after an escape or a backslash the slow path looks)
    if "%" in target or "/." in target or "\\" in target or "//" in target:
        path, sep, query = target.partition("?")
        try:
            normal, escaped = normalize(path)
        except BadPath:
            raise Refused(400, "bad_target") from None
        target = normal + sep + query
        if escaped:
            raise Refused(400, "bad_target", target)
    return target


def _absolute_path(target: str, host: str | None) -> str:
    """The path of an absolute-form target, when it names Host's authority.

    Routed by its path, and only when Host names the same authority (RFC 9112
    §3.2.2 lets the target win; refusing a mismatch leaves nothing to guess)."""
    m = _ABSOLUTE.match(target)
    if m is None or host is None:
        raise Refused(400, "bad_target")
    scheme = m.group(1).lower()
    authority = m.group(2)
    if _HOST.match(authority) is None or _authority(scheme, authority) != _authority(scheme, host):
        raise Refused(400, "bad_target")
    path = m.group(3)
    return path if path.startswith("/") else "/" + path


def _authority(scheme: str, value: str) -> str:
    """``Example.COM.:80`` -> ``example.com`` for http: what names the same server
    (RFC 3986 §6.2.3: the scheme's default port is as good as none; a fully
    qualified name's trailing dot is the same name)."""
    value = value.lower()
    default = _DEFAULT_PORT[scheme]
    if value.endswith(default):
        value = value[: -len(default)]
    if value.endswith("."):
        value = value[:-1]
    elif ".:" in value and not value.startswith("["):
        value = value.replace(".:", ":", 1)
    return value


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
