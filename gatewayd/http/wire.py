"""What the server and the client sides of HTTP/1.1 share, each written once: the
limits on a head, and the methods and statuses whose framing or replay RFC 9110
fixes (as Pingora's ``protocols/http/v1/common.rs`` holds for both directions)."""

from __future__ import annotations

# bytes of a request or status line, and of each header line (aiohttp's limit, both ways)
MAX_LINE = 8190
# bytes of a whole head: start line and header lines together (Envoy's default is
# 60 KiB; nginx's 4 x 8 KiB). A request over it is answered 431; a response over it
# is upstream_invalid.
MAX_HEAD = 64 * 1024
MAX_REQUEST_HEADERS = 128  # header lines of a client's request (as aiohttp's server)
MAX_RESPONSE_HEADERS = 100  # header lines of an upstream's response (as aiohttp's client)

# RFC 9110 §9.2.2: a request of these methods, without a body, may be sent again
# when its connection closed before any answer (the keep-alive race).
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
# Responses without a body whatever their headers say (RFC 9112 §6.3), besides
# those to HEAD and the 1xx ones.
NO_BODY_STATUS = frozenset((204, 304))
