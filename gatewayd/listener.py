"""Client connections: our own accept loop over aiohttp's protocol.

Owning the accept loop lets the gateway stop accepting at ``max_connections``
(new connections wait in the kernel's backlog, as with nginx's
``worker_connections``), survive EMFILE, and bind or close listen addresses
one by one on reload. aiohttp's ``RequestHandler`` still parses and writes
HTTP; a thin subclass adds the request-head timeout aiohttp lacks.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from .kinds import parse_hostport

log = logging.getLogger("gatewayd")

_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_BAD_REQUEST_HEADERS = {"X-Gatewayd-Reason": "bad_request", "Content-Type": "text/plain; charset=utf-8"}
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class GatewayProtocol(RequestHandler):
    """aiohttp's HTTP/1.1 protocol plus a timer from a request head's first byte to its end,
    and one for a client that stops reading its response (nginx's ``send_timeout``)."""

    __slots__ = ("_awaiting_head", "_head_timeout", "_head_timer", "_send_timeout", "_send_timer")

    def __init__(self, manager: GatewayServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._awaiting_head = True
        self._head_timeout = manager.head_timeout
        self._send_timer: asyncio.TimerHandle | None = None
        self._send_timeout = manager.send_timeout

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head and self._head_timer is None and data:
            self._head_timer = self._loop.call_later(self._head_timeout, self._head_timed_out)
        super().data_received(data)

    def head_done(self) -> None:
        """The head is parsed: its timer stops (the body has its own)."""
        self._awaiting_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def request_done(self) -> None:
        """The exchange ended: the next bytes start a new head."""
        self._awaiting_head = True

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is not None and self._awaiting_head:
            transport.write(_REQUEST_TIMEOUT)
            self.force_close()

    def pause_writing(self) -> None:
        # the kernel's buffer toward the client is full and ours passed its high mark
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self._loop.call_later(self._send_timeout, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        # the client took nothing for send_timeout: it counts as gone (the handler is
        # cancelled, its slot and upstream connection released)
        self._send_timer = None
        transport = self.transport
        if transport is not None:
            log.debug("client %s accepted nothing for %.1f s; disconnecting",
                      transport.get_extra_info("peername"), self._send_timeout)
            transport.abort()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # A request the parser refused: the client's fault, and any client can send
        # one, so no traceback at ERROR (a log flood) and no parser text echoed back.
        log.debug("bad request from %s: %s", request.remote, exc)
        if isinstance(self._manager, GatewayServer):
            self._manager.bad_requests += 1
        resp = web.Response(status=400, body=b"400 bad request\n", headers=_BAD_REQUEST_HEADERS)
        resp.force_close()
        return resp

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().connection_lost(exc)


class GatewayServer(web.Server):
    """aiohttp's low-level server, counting open connections for the accept loop."""

    def __init__(self, handler: Any, *, head_timeout: float, send_timeout: float,
                 on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.head_timeout = head_timeout
        self.send_timeout = send_timeout
        self._on_close = on_close
        self.bad_requests = 0  # refused by the HTTP parser (400 bad_request)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self._on_close()

    def __call__(self) -> GatewayProtocol:
        return GatewayProtocol(self, loop=self._loop, **self._kwargs)


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
