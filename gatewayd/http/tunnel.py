"""A tunnel: an upgraded connection (WebSocket after a 101), the client's
transport and the upstream's spliced, bytes both ways, unparsed.

Both transports are the ones the HTTP exchange ran on (the client's: uvloop's,
or the TLS one of ``tls_transport``; the upstream's, taken out of its pool for
good); each is moved with ``set_protocol`` to an ``_End`` of a few slots, so an
idle tunnel keeps no parser, no buffers and no timer of its own: two
transports, three small objects and the counters (issue 22 measured 2.8 KiB
for a bare pair on uvloop, nginx 17.7).

Back-pressure, each way: bytes read on one side are written to the other at
once; when that transport's buffer passes its high-water mark (``pause_writing``)
the first side is not read again until it drains (``resume_writing``). So a
peer that does not read holds at most a high-water mark (64 KiB) and one read
in the gateway, whatever the other side sends.

Ends: either side's close (or reset) closes the other at once: a clean close
after what is buffered for it is written (cut after ``LINGER`` seconds if it is
not taken), a reset at once. A tunnel with no bytes either way for its
``idle_timeout`` is closed by the server's sweep (``swept``), which compares
byte counts, so the data path reads no clock.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from .request import Request

LINGER = 5.0  # seconds a closing side may take to accept what is buffered for it


class Owner(Protocol):
    """Who is told when a tunnel ends (the gateway: its route's counters, the access log)."""

    def ended(self, tunnel: Tunnel) -> None: ...


class Books(Protocol):
    """The open tunnels of a server (H1Server): told when one ends."""

    def tunnel_closed(self, tunnel: Tunnel) -> None: ...


class _End(asyncio.Protocol):
    """One side of a tunnel: what is read here is written to ``peer``'s transport."""

    __slots__ = ("peer", "received", "transport", "tunnel")

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = transport  # None once lost
        self.peer: _End = self
        self.received = 0  # bytes read on this side (and written to the other)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        out = self.peer.transport
        if out is not None:
            out.write(data)

    def eof_received(self) -> bool:
        return False  # a half-close ends the tunnel, as nginx ends one (the transport closes)

    def pause_writing(self) -> None:
        # this side's buffer is full: stop reading what would be written to it
        source = self.peer.transport
        if source is not None:
            source.pause_reading()

    def resume_writing(self) -> None:
        source = self.peer.transport
        if source is not None and not source.is_closing():
            source.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.tunnel._lost(self, exc)


class Tunnel:
    """Two transports spliced. Made by ``open`` once the 101 is on its way to the
    client; ends once, when either side is lost (``Owner.ended``)."""

    __slots__ = ("_quiet_since", "_seen", "books", "client", "idle_timeout", "opened", "owner",
                 "upstream")

    def __init__(self, client: asyncio.Transport, upstream: asyncio.Transport, idle_timeout: float,
                 owner: Owner, books: Books, now: float) -> None:
        self.client = _End(self, client)
        self.upstream = _End(self, upstream)
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        self.idle_timeout = idle_timeout
        self.owner: Owner | None = owner  # None once ended
        self.books = books
        self.opened = now
        self._seen = 0
        self._quiet_since = now

    @property
    def sent(self) -> int:
        """Bytes from the upstream to the client."""
        return self.upstream.received

    @property
    def received(self) -> int:
        """Bytes from the client to the upstream."""
        return self.client.received

    def start(self, to_upstream: bytes, to_client: bytes) -> None:
        """Splice: each transport to its end, the bytes that arrived before the splice
        (after the request's head from the client, after the 101's from the upstream)
        on their way, reading resumed where the other side has room."""
        ends = (self.client, self.upstream)
        for end in ends:
            assert end.transport is not None
            end.transport.set_protocol(end)
        if to_client:
            self.upstream.data_received(to_client)
        if to_upstream:
            self.client.data_received(to_upstream)
        for end in ends:
            transport = end.transport
            if transport is None or transport.is_closing():
                continue
            out = end.peer.transport
            if out is not None and out.get_write_buffer_size() > out.get_write_buffer_limits()[1]:
                transport.pause_reading()  # (its peer will say resume_writing)
            else:
                transport.resume_reading()

    def _lost(self, end: _End, exc: BaseException | None) -> None:
        other = end.peer.transport
        if other is not None:
            if exc is not None:
                other.abort()  # a reset: no point finishing the other side's output
            elif not other.is_closing():
                other.close()  # after what is buffered for it
                if other.get_write_buffer_size():
                    asyncio.get_running_loop().call_later(LINGER, other.abort)
        owner = self.owner
        if owner is not None:
            self.owner = None
            self.books.tunnel_closed(self)
            owner.ended(self)

    def close(self, abort: bool = False) -> None:
        """End the tunnel from the gateway's side (idle, shutdown): each side closed,
        or cut when ``abort`` or when output is stuck in its buffer (a peer that
        takes nothing would hold a clean close open)."""
        for end in (self.client, self.upstream):
            transport = end.transport
            if transport is not None:
                if abort or transport.get_write_buffer_size():
                    transport.abort()
                elif not transport.is_closing():
                    transport.close()

    @property
    def ended(self) -> bool:
        return self.owner is None

    def swept(self, now: float) -> None:
        """The server's periodic sweep: close the tunnel if no byte moved either way
        for ``idle_timeout`` (to within the sweep's period)."""
        moved = self.client.received + self.upstream.received
        if moved != self._seen:
            self._seen = moved
            self._quiet_since = now
        elif now - self._quiet_since >= self.idle_timeout:
            self.close()


def open_tunnel(request: Request, upstream: asyncio.Transport, from_upstream: bytes,
                idle_timeout: float, owner: Owner) -> Tunnel | None:
    """Turn ``request``'s connection, whose 101 is written, and ``upstream`` (the
    upstream's transport, its 101 read; ``from_upstream`` what followed it) into a
    tunnel; None, with nothing done, when the client has left."""
    protocol = request.protocol
    taken = protocol.take_over(request)
    if taken is None:
        return None
    client, from_client = taken
    server = protocol.server
    tunnel = Tunnel(client, upstream, idle_timeout, owner, server, protocol._loop.time())
    server.tunnel_opened(protocol, tunnel)
    tunnel.start(from_client, from_upstream)
    return tunnel
