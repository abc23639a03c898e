"""A lean HTTP/1.1 client for upstream servers: pooled keep-alive connections
parsed by llhttp (httptools), with none of aiohttp's per-request machinery.

Why: a proxied request through aiohttp's ClientSession costs several times the
CPU the gateway's own server side costs (NOTES.md, "speed"). Here a request is
one head written in one ``transport.write``, four parser callbacks (llhttp
validates the head and finds its end; we split it in one pass instead of one
callback per header), one future while waiting, and one small :class:`Response`.

API::

    pool = H1Pool(host, port, max_connections=1000, keepalive_timeout=4.0,
                  connect_timeout=2.0, read_timeout=30.0)
    resp = await pool.request(method, target, headers, body=None, body_length=None,
                              connect_timeout=None)  # None: the pool's
    resp.status, resp.reason, resp.headers, resp.keep_alive
    resp.fields                        # the header lines as received (bytes), for passing on as they are
    data = resp.read_small(65536)      # whole body if already here (sync, no await), else None
    async for chunk in resp: ...       # or resp.body(), await resp.read_chunk() (b"" at the end)
    data = await resp.read()           # everything (tests, small bodies)
    resp.buffered                      # body bytes received, not yet read
    resp.complete                      # the whole body was handed over (e.g. after the last read_chunk)
    resp.release()                     # = resp.close(); always call it (try/finally)
    pool.snapshot(); await pool.close()

    # no task, no future: a bodiless GET (HEAD, ...) on an idle connection, followed by callbacks
    conn = pool.send_idle(method, target, headers, listener)  # None: nothing idle, use request()
    listener.wake()                    # then: conn._head_done -> Response(conn); conn._exc -> resume
    resp = await pool.resume(conn, method, target, headers)   # replays a stale one, or raises
    conn.cancel()                      # the caller left

The connection returns to the pool as soon as the last body byte is handed to the
caller (``read_small``, the last ``read_chunk``), so ``release()`` after a full
read is a no-op; before that it closes the connection. A Response that is never
released keeps its connection and slot: always release in a ``finally``.

Requests:

- ``target`` is sent as given (the raw request target), less a ``#fragment``. ``headers`` is a list of
  ``(name, value)`` str pairs, already filtered by the caller, or header lines as bytes,
  each ending in CRLF, without framing headers (``headers.request_fields`` makes them). Framing is the
  client's: any ``Content-Length``/``Transfer-Encoding`` in ``headers`` is
  dropped and replaced from ``body``/``body_length`` (``Content-Length: N`` when
  the length is known, chunked when not, ``Content-Length: 0`` for a body-less
  POST/PUT/PATCH). ``Host: host:port`` is added when ``headers`` has none. A CR or
  LF inside a name, value or target raises ValueError (no request splitting).
- ``body`` is an async iterable of bytes, written by its own task while the
  response is awaited (an upstream may answer early, and a full-duplex upstream
  must not deadlock against us). If it raises, the connection is closed and that
  same exception comes out of ``request()`` (or of the body read, once the head
  is in). A body shorter or longer than ``body_length`` raises ValueError. The
  iterator is closed (``aclose``) when the writer ends, whatever the reason.
- A request sent on a pooled connection that turns out closed before any
  response byte (the server's keep-alive close racing our write) is retried
  once on a new connection, like aiohttp, when the method is idempotent and has
  no body; otherwise it fails as ``upstream_reset`` and the caller decides. For
  those (POST, bodies), a pooled connection is first checked with one poll(2):
  a server that closed it right after its last response, its FIN not yet seen
  by the loop, does not cost the request. Only a close racing the write itself
  remains.

Failures are :class:`gatewayd.http.errors.UpstreamFailure` (``.status``, ``.reason``):

- ``upstream_connect`` (502): refused, unreachable;
- ``upstream_dns`` (502): the name did not resolve;
- ``upstream_connect_timeout`` (504): no connection within ``connect_timeout``
  (name resolution included);
- ``upstream_timeout`` (504): no upstream byte for ``read_timeout`` while we wait
  for one, before the head or between body reads; not while our reading is
  paused for a slow consumer, nor while the request body waits for its source;
- ``upstream_reset`` (502): reset or EOF before the head, reset in the body;
- ``upstream_invalid`` (502): unparsable, a 101 or unknown 1xx, a head over
  ``wire.MAX_HEAD`` (64 KiB), a line over ``wire.MAX_LINE`` (8190 bytes) or over
  ``wire.MAX_RESPONSE_HEADERS`` (100) headers, bad chunking, a clean EOF
  before the body's announced end (as aiohttp's ClientPayloadError maps today).

Nothing was sent when the reason is one of the three connect ones. Before the
head the failure comes out of ``request()``; after it, out of the body reads
(the caller can only cut the response short).

Responses: ``headers`` keeps the upstream's order and duplicates, decoded like
aiohttp (UTF-8, surrogateescape: bytes survive a round trip). Interim 100/102/103
responses are skipped. HEAD, 1xx, 204 and 304 have no body; otherwise
Content-Length, chunked (decoded; trailers dropped) or until-close. Bytes after
a complete response (a body sent to HEAD — aiohttp's StreamResponse does — or a
late 408) are never taken for the next response: the connection is dropped. At
most ``read_buffer`` bytes (plus one socket read) are buffered: past that the
upstream socket stops being read until the consumer takes the data (bounded
memory behind a slow client).

Connections: LIFO reuse of idle ones (the warmest; the coldest expire), at most
``max_connections`` open or connecting (0 = no limit) with FIFO waiters, and a
released connection is handed straight to the first waiter. An idle connection
is closed after ``keepalive_timeout`` (keep it below the server's; 0 = no reuse)
or as soon as the server closes it or sends anything. A connection goes back to the pool only
when its response was read completely, both sides allow keep-alive and the
request body was sent in full; otherwise it is closed (never reused with
unread bytes). Cancelling the caller anywhere (in ``request()``, in a body read)
aborts the connection at once and frees its slot; a caller cancelled while doing
something else must call ``close()`` in its ``finally``. Waiting for a slot has
no timeout of its own (the gateway's admission bounds it; wrap in
``asyncio.timeout`` otherwise). Host names are resolved per new connection by
the loop's getaddrinfo (no cache: connections are long-lived), or by ``resolve``
when given: ``async (host, port) -> [address, ...]`` (e.g. aiohttp's
AsyncResolver behind a TTL cache), tried in order.

Timers: no timer per request. Each connection has one timer that fires at least
every ``min(read_timeout, keepalive_timeout)`` and compares the clock with the
last progress stamp (set on every read, write and state change), so arming and
cancelling never happens on the request path.
"""

from __future__ import annotations

from .client_connection import ClientConnection, Listener, PoolStats
from .client_pool import READ_BUFFER, H1Pool
from .client_response import SMALL_BODY, Response
from .errors import UpstreamFailure

__all__ = ["READ_BUFFER", "SMALL_BODY", "ClientConnection", "H1Pool", "Listener", "PoolStats", "Response",
           "UpstreamFailure"]
