"""The PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2): the header a
load balancer in front sends first on each connection to say who the client is,
and the opener that reads it before HTTP or TLS sees a byte (SPEC §10).

The parser is strict: a header is taken or refused, never guessed at.

- v1: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` (single spaces, addresses of
  the family named, ports 0-65535 in decimal without leading zeros) or ``PROXY
  UNKNOWN ...\\r\\n`` (the rest of the line ignored); at most 107 bytes.
- v2: the 12-byte signature, version 2, command LOCAL (0) or PROXY (1), a length
  that fits ``V2_MAX``. PROXY with TCP over IPv4 (0x11) or IPv6 (0x21) carries
  the client address; its TLVs are walked (each must fit the header) and
  skipped. LOCAL, and PROXY with any other family (UNSPEC, UNIX, UDP, or a value
  the specification does not define), keep the connection's own peer: what
  HAProxy does (``conn_recv_proxy``: "unsupported protocol, keep local connection
  address"), so a chain of proxies that forwards a UNIX-socket client works.

``Header.source`` is None where the connection's own peer stays the client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

from .listener import Opener, ProtocolFactory
from .request import Connection

V1_MAX = 107  # bytes of a v1 line, CRLF included (proxy-protocol.txt 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version and command, family, length
V2_MAX = 16384  # bytes of a v2 header, TLVs included: HAProxy's default buffer
_V1_PREFIX = b"PROXY "
_V2_INET, _V2_INET6 = 0x11, 0x21  # TCP over IPv4, over IPv6
_V2_LOCAL, _V2_PROXY = 0x0, 0x1
_DIGITS = frozenset(b"0123456789")


class Malformed(ValueError):
    """Bytes that are not a PROXY protocol header; the text says why."""


@dataclass(frozen=True, slots=True)
class Header:
    length: int  # bytes on the wire: what follows is the client's
    source: tuple[str, int] | None  # the client (host, port); None: the connection's peer


def parse(data: bytes) -> Header | None:
    """The header at the start of ``data``; None while ``data`` is a proper prefix of
    one (every byte of it is the header's); Malformed if it is not a header."""
    if data[:1] == b"P":
        return _v1(data)
    if data[:1] == b"\r":
        return _v2(data)
    if not data:
        return None
    raise Malformed("not a PROXY protocol header")


def _v1(data: bytes) -> Header | None:
    end = data.find(b"\n", 0, V1_MAX)
    if end < 0:
        if not _V1_PREFIX.startswith(data[:6]) or b"\r" in data[:-1]:
            raise Malformed("not a PROXY protocol header")
        if len(data) >= V1_MAX:
            raise Malformed(f"a v1 line longer than {V1_MAX} bytes")
        return None
    if not data.startswith(_V1_PREFIX) or data[end - 1] != 0x0D:
        raise Malformed("not a PROXY protocol header")
    line = data[len(_V1_PREFIX):end - 1]
    if b"\r" in line:
        raise Malformed("a v1 line with a bare CR")
    if line == b"UNKNOWN" or line.startswith(b"UNKNOWN "):
        return Header(end + 1, None)
    parts = line.split(b" ")
    if len(parts) != 5 or parts[0] not in (b"TCP4", b"TCP6"):
        raise Malformed("a v1 line other than TCP4, TCP6 or UNKNOWN with four fields")
    version = 4 if parts[0] == b"TCP4" else 6
    source = _address(parts[1], version)
    _address(parts[2], version)
    port = _port(parts[3])
    _port(parts[4])
    return Header(end + 1, (source, port))


def _address(text: bytes, version: int) -> str:
    try:
        s = text.decode("ascii")
        if "%" in s:  # a scope id is no address a header can carry
            raise ValueError(s)
        ip = ipaddress.IPv4Address(s) if version == 4 else ipaddress.IPv6Address(s)
    except ValueError:
        raise Malformed(f"a v1 address that is not IPv{version}") from None
    return str(ip)


def _port(text: bytes) -> int:
    if not text or len(text) > 5 or not _DIGITS.issuperset(text) or (text[0] == 0x30 and len(text) > 1):
        raise Malformed("a v1 port that is not 0-65535 in decimal")
    port = int(text)
    if port > 65535:
        raise Malformed("a v1 port that is not 0-65535 in decimal")
    return port


def _v2(data: bytes) -> Header | None:
    if not data.startswith(V2_SIGNATURE[:len(data)]):
        raise Malformed("not a PROXY protocol header")
    if len(data) < V2_FIXED:
        if len(data) > len(V2_SIGNATURE) and data[12] >> 4 != 2:
            raise Malformed("a v2 header of another version")
        return None
    version_command, family = data[12], data[13]
    if version_command >> 4 != 2:
        raise Malformed("a v2 header of another version")
    command = version_command & 0x0F
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise Malformed("a v2 command other than LOCAL or PROXY")
    total = V2_FIXED + int.from_bytes(data[14:16], "big")
    if total > V2_MAX:
        raise Malformed(f"a v2 header longer than {V2_MAX} bytes")
    if len(data) < total:
        return None
    if command == _V2_LOCAL:
        return Header(total, None)
    if family == _V2_INET:
        size = 12
        if total < V2_FIXED + size:
            raise Malformed("a v2 TCP4 header too short for its addresses")
        source = str(ipaddress.IPv4Address(data[16:20]))
        port = int.from_bytes(data[24:26], "big")
    elif family == _V2_INET6:
        size = 36
        if total < V2_FIXED + size:
            raise Malformed("a v2 TCP6 header too short for its addresses")
        source = str(ipaddress.IPv6Address(data[16:32]))
        port = int.from_bytes(data[48:50], "big")
    else:
        return Header(total, None)  # UNSPEC, UNIX, UDP, undefined: the peer, as HAProxy
    at = V2_FIXED + size
    while at < total:  # TLVs: type, 16-bit length, value; skipped, each must fit
        if at + 3 > total:
            raise Malformed("a v2 TLV cut short")
        at += 3 + int.from_bytes(data[at + 1:at + 3], "big")
        if at > total:
            raise Malformed("a v2 TLV longer than its header")
    return Header(total, (source, port))


def _wanted(got: bytes) -> int:
    """How many bytes a header starting with ``got`` may still need (at least one)."""
    if len(got) >= V2_FIXED and got[:1] == b"\r":
        return max(1, V2_FIXED + int.from_bytes(got[14:16], "big") - len(got))
    return max(1, V1_MAX - len(got))


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    fd = conn.fileno()
    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


class PeerClosed(ConnectionError):
    """The peer closed before a whole header; ``empty``: before sending a byte."""

    def __init__(self, empty: bool) -> None:
        super().__init__("closed before a whole PROXY protocol header")
        self.empty = empty


async def read_header(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> Header:
    """The header ``conn`` starts with, and not a byte more read from it: bytes are
    peeked (MSG_PEEK), and taken only once they are known to be the header's, so what
    the client sent after it stays in the socket for HTTP or TLS."""
    got = b""
    while True:
        try:
            peeked = conn.recv(_wanted(got), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            await _readable(loop, conn)
            continue
        if not peeked:
            raise PeerClosed(not got)
        header = parse(got + peeked)
        if header is None:  # all of it is the header's: take it, wait for the rest
            got += conn.recv(len(peeked))
            continue
        rest = header.length - len(got)
        if rest and len(conn.recv(rest)) != rest:  # peeked, so there; never short
            raise Malformed("a header that could not be read again")
        return header


@dataclass
class ProxyHeaderCounts:
    """PROXY protocol headers since start, across reloads (Runtime.proxy_headers):
    ``received`` valid ones; ``refused``: connections closed for want of one
    (malformed, missing, not whole within the timeout). A connection closed by its
    peer before sending a byte (a TCP health check) is neither."""

    received: int = 0
    refused: int = 0


class _Proxied:
    """The protocol factory once a header named the client: the connection's peer
    is that address (set before connection_made, as tls._Secure marks ``secure``)."""

    __slots__ = ("factory", "host", "port")

    def __init__(self, factory: ProtocolFactory, host: str, port: int) -> None:
        self.factory = factory
        self.host = host
        self.port = port

    def __call__(self) -> asyncio.Protocol:
        protocol = self.factory()
        if isinstance(protocol, Connection):
            protocol.set_peer(self.host, self.port)
        return protocol


class ProxyOpener:
    """Reads the PROXY protocol header within ``timeout`` of the accept, then hands
    the connection to ``inner`` (plain, or TLS whose handshake follows the header)."""

    waits_for_peer = True

    def __init__(self, inner: Opener, timeout: float, counts: ProxyHeaderCounts) -> None:
        self.inner = inner
        self.timeout = timeout
        self.counts = counts

    async def open(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                   factory: ProtocolFactory) -> object:
        try:
            async with asyncio.timeout(self.timeout):
                header = await read_header(loop, conn)
        except PeerClosed as exc:
            if not exc.empty:
                self.counts.refused += 1
            raise
        except Exception:  # malformed, missing, late, or a socket error
            self.counts.refused += 1
            raise
        self.counts.received += 1
        if header.source is not None:
            factory = _Proxied(factory, *header.source)
        return await self.inner.open(loop, conn, factory)
