"""The responses the gateway makes itself, as whole bytes built once per kind.

Every one carries ``X-Gatewayd-Reason`` (SPEC §3) and a short text body; the
shedding path and the connection's own refusals write them straight to the
transport.
"""

from __future__ import annotations

import functools

_REASON_TEXT = {
    400: b"400 bad request\n",
    404: b"404 no route for this request\n",
    405: b"405 method not allowed\n",
    408: b"408 request body timed out\n",
    413: b"413 request body too large\n",
    429: b"429 too many requests\n",
    431: b"431 request header fields too large\n",
    500: b"500 internal error\n",
    502: b"502 bad gateway\n",
    503: b"503 service overloaded, retry later\n",
    504: b"504 upstream timed out\n",
}
_STATUS_LINES = {
    400: b"HTTP/1.1 400 Bad Request\r\n",
    404: b"HTTP/1.1 404 Not Found\r\n",
    405: b"HTTP/1.1 405 Method Not Allowed\r\n",
    408: b"HTTP/1.1 408 Request Timeout\r\n",
    413: b"HTTP/1.1 413 Request Entity Too Large\r\n",
    429: b"HTTP/1.1 429 Too Many Requests\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
    500: b"HTTP/1.1 500 Internal Server Error\r\n",
    502: b"HTTP/1.1 502 Bad Gateway\r\n",
    503: b"HTTP/1.1 503 Service Unavailable\r\n",
    504: b"HTTP/1.1 504 Gateway Timeout\r\n",
}


def body_size(status: int) -> int:
    """The length of the body of the gateway's own ``status`` response (0: none), for
    the access log."""
    body = _REASON_TEXT.get(status)
    return 0 if body is None else len(body)


@functools.lru_cache(maxsize=4096)  # (reasons x Retry-After values 1-60 x framing)
def prebuilt(status: int, reason: str, retry_after: str | None, close: bool,
             http10_keep_alive: bool = False) -> bytes:
    """A whole gateway response as bytes, built once per kind (a pure function, memoized)."""
    body = _REASON_TEXT[status]
    return (_STATUS_LINES[status]
            + b"Content-Type: text/plain; charset=utf-8\r\n"
            + b"Content-Length: %d\r\n" % len(body)
            + (b"Retry-After: %s\r\n" % retry_after.encode() if retry_after is not None else b"")
            + b"X-Gatewayd-Reason: %s\r\n" % reason.encode()
            + (b"Connection: close\r\n" if close else
               b"Connection: keep-alive\r\n" if http10_keep_alive else b"")
            + b"\r\n" + body)
