"""Listen sockets and our own accept loop (the connections are gatewayd.http.server's).

Owning the accept loop lets the gateway stop accepting at ``max_connections``
(new connections wait in the kernel's backlog, as with nginx's
``worker_connections``), survive EMFILE, and bind or close listen addresses
one by one on reload.

The transport seam: each listen address has an ``Opener``, which turns an
accepted socket into a connection the HTTP protocol reads: ``PLAIN`` (TCP as it
is), ``tls.TlsOpener`` (a handshake first), or ``proxy_protocol.ProxyOpener``
(a PROXY protocol header, SPEC §10, then an inner opener of the two others).
The runtime chooses each address's opener from its listen entry and sets it
again on every reload (new certificates); the acceptor keeps the connection
count whatever the opener does.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

from .addresses import parse_hostport

log = logging.getLogger("gatewayd")

_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def bind(address: str, backlog: int, reuse_port: bool = False) -> socket.socket:
    """A listening, non-blocking socket for ``host:port``; raises OSError."""
    host, port = parse_hostport(address)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def cannot_bind(address: str) -> str | None:
    """Why ``address`` can never be listened on here, or None: binding is tried (with
    SO_REUSEADDR, without listening, at once undone). A port in use (EADDRINUSE) is
    not a reason: it may be the running gatewayd's, which a reload keeps. Anything
    else is (EADDRNOTAVAIL: the address is not one of this host's; EACCES: a port
    this user may not bind; a host name with no address)."""
    host, port = parse_hostport(address)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f'cannot resolve "{host}" ({exc.strerror})'
    family, type_, proto, _, sockaddr = infos[0]
    with socket.socket(family, type_, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return None
            return f"cannot bind {address} ({exc.strerror})"
    return None


ProtocolFactory = Callable[[], asyncio.Protocol]


class Opener(Protocol):
    """How one listener's accepted sockets become connections served by the HTTP
    protocol: plain TCP, or wrapped (TLS, the PROXY protocol) before HTTP sees them."""

    # True: ``open`` waits on the peer (a handshake, a header), so the acceptor runs
    # it in a task of its own and goes on accepting meanwhile
    waits_for_peer: bool

    def open(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
             factory: ProtocolFactory) -> Awaitable[object]:
        """Serve ``conn`` (accepted, non-blocking, TCP_NODELAY on) with a protocol
        from ``factory``. Once it is done, that protocol has the connection and
        reports its close (the server's ``on_close``); if it raises, no protocol
        has it: the acceptor closes ``conn`` and gives its place back."""
        ...


class Plain:
    """TCP as accepted: the protocol reads the socket itself."""

    waits_for_peer = False

    def open(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
             factory: ProtocolFactory) -> Awaitable[object]:
        # the loop's own coroutine, returned rather than awaited: no frame of ours
        return loop.connect_accepted_socket(factory, conn)


PLAIN = Plain()


class Acceptor:
    """Accept loops for the listen sockets, sharing one connection budget."""

    def __init__(self, factory: ProtocolFactory, limit: int) -> None:
        self._factory = factory
        self.limit = limit
        self.open = 0
        self.accepted = 0
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sockets: dict[str, socket.socket] = {}
        self._openers: dict[str, Opener] = {}
        self._opening: set[asyncio.Task[None]] = set()  # openers waiting on their peers
        self._last_resource_log = 0.0

    @property
    def addresses(self) -> list[str]:
        return list(self._sockets)

    def closed_one(self) -> None:
        """A client connection closed (called by the server)."""
        self.open -= 1
        if self.open < self.limit:
            self._room.set()

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        if self.open < limit:
            self._room.set()

    def serve(self, address: str, sock: socket.socket, opener: Opener = PLAIN) -> None:
        """Accept on ``sock``; its connections are opened by ``opener``."""
        self._sockets[address] = sock
        self._openers[address] = opener
        self._tasks[address] = asyncio.get_running_loop().create_task(
            self._accept_loop(address, sock), name=f"accept {address}"
        )

    def set_opener(self, address: str, opener: Opener) -> None:
        """Connections accepted on ``address`` from now on are opened by ``opener``
        (a reload: new certificates, or TLS turned on or off); open ones are not touched."""
        if address in self._openers:
            self._openers[address] = opener

    async def stop(self, address: str) -> None:
        """Stop accepting on one address and close its socket."""
        task = self._tasks.pop(address, None)
        sock = self._sockets.pop(address, None)
        self._openers.pop(address, None)
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if sock is not None:
            sock.close()

    async def stop_all(self) -> None:
        for address in list(self._tasks):
            await self.stop(address)
        for task in list(self._opening):  # connections not yet HTTP's: closed, not drained
            task.cancel()
        if self._opening:
            await asyncio.gather(*self._opening, return_exceptions=True)

    async def _accept_loop(self, address: str, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        openers = self._openers
        while True:
            if self.open >= self.limit:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    await self._out_of_resources(exc)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            opener = openers[address]  # the one in force now: a reload may have changed it
            await self._start(loop, conn, opener)
            # drain what else is waiting without a round trip through the loop
            for _ in range(64):
                if self.open >= self.limit:
                    break
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno in _RESOURCE_ERRORS:
                        await self._out_of_resources(exc)
                    break
                conn.setblocking(False)
                await self._start(loop, conn, opener)

    async def _start(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, opener: Opener) -> None:
        self.open += 1
        self.accepted += 1
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if opener.waits_for_peer:
                task = loop.create_task(self._open_waiting(loop, conn, opener))
                self._opening.add(task)
                task.add_done_callback(self._opening.discard)
                return
            await opener.open(loop, conn, self._factory)
        except OSError:
            self.open -= 1
            conn.close()

    async def _open_waiting(self, loop: asyncio.AbstractEventLoop, conn: socket.socket,
                            opener: Opener) -> None:
        """An opener that waits on its peer; whatever it fails with (a bad handshake or
        header, a timeout, a stop), the connection is closed and its place given back."""
        try:
            await opener.open(loop, conn, self._factory)
        except BaseException as exc:
            conn.close()
            self.closed_one()
            if not isinstance(exc, Exception):
                raise
            log.debug("listener: connection not opened: %r", exc)

    async def _out_of_resources(self, exc: OSError) -> None:
        # Like nginx: log (rate-limited), wait for a connection to close or a
        # short while, and go on; the listener stays open.
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._last_resource_log > 5:
            self._last_resource_log = now
            log.error("accept: %s (open connections: %d); pausing accepts", exc.strerror, self.open)
        self._room.clear()
        try:
            await asyncio.wait_for(self._room.wait(), 0.1)
        except TimeoutError:
            pass
