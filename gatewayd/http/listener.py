"""Listen sockets and our own accept loop (the connections are gatewayd.h1server's).

Owning the accept loop lets the gateway stop accepting at ``max_connections``
(new connections wait in the kernel's backlog, as with nginx's
``worker_connections``), survive EMFILE, and bind or close listen addresses
one by one on reload.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

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


class Acceptor:
    """Accept loops for the listen sockets, sharing one connection budget."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], limit: int) -> None:
        self._factory = factory
        self.limit = limit
        self.open = 0
        self.accepted = 0
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sockets: dict[str, socket.socket] = {}
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

    def serve(self, address: str, sock: socket.socket) -> None:
        self._sockets[address] = sock
        self._tasks[address] = asyncio.get_running_loop().create_task(
            self._accept_loop(sock), name=f"accept {address}"
        )

    async def stop(self, address: str) -> None:
        """Stop accepting on one address and close its socket."""
        task = self._tasks.pop(address, None)
        sock = self._sockets.pop(address, None)
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

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
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
            await self._start(loop, conn)
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
                await self._start(loop, conn)

    async def _start(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        self.open += 1
        self.accepted += 1
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.connect_accepted_socket(self._factory, conn)
        except OSError:
            self.open -= 1
            conn.close()

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
