"""HTTP upstreams: a pool of servers, each with its own keep-alive connections;
a balancer picks one per request; failures feed the servers' health and, where
that cannot repeat a request, are retried on another server; bodies stream
both ways.

Retries happen inside ``serve``, so the route's admission slot, taken once per
client request, is held across them. An attempt is retried when
- it failed to connect (refused, DNS, connect timeout): nothing was sent, so
  any request may go to another server, its body still unread;
- the connection was reset before the response head, for a method without side
  effects beyond its first run (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) and a
  request without a body: nothing needs to be replayed.
Nothing else is retried: a POST whose bytes reached a server may have been
acted on. Retries stop after ``retries`` more attempts, when no other server is
in rotation, or once ``read_timeout`` has passed since the first attempt.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.resolver import AsyncResolver
from yarl import URL

from .balance import Balancer
from .body import RequestBody
from .config import UpstreamConfig
from .headers import request_headers, response_headers
from .health import HealthChecker
from .servers import ServerState
from .tomlpos import Locator, Path, format_path
from .upstream import Exchange, Upstream, UpstreamFailure

# aiohttp would otherwise add its own values: a transparent proxy forwards only
# what the client sent.
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
IDEMPOTENT = frozenset(("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"))
RESOLVE_TIMEOUT = 5.0  # seconds for each server name resolved at start-up
_NOTHING_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
_RESET = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionResetError)
_NONE: tuple[ServerState, ...] = ()


def _failure(exc: BaseException) -> UpstreamFailure:
    """Map a client-side error before the response head to a status and a reason."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamFailure(504, "upstream_connect_timeout")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return UpstreamFailure(502, "upstream_dns")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure(502, "upstream_connect")
    if isinstance(exc, (aiohttp.SocketTimeoutError, asyncio.TimeoutError)):
        return UpstreamFailure(504, "upstream_timeout")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                        ConnectionResetError)):
        return UpstreamFailure(502, "upstream_reset")
    if isinstance(exc, aiohttp.ClientPayloadError) and "ConnectionResetError" in str(exc):
        # a body cut by a reset: aiohttp tells it apart from a malformed body only in the text
        return UpstreamFailure(502, "upstream_reset")
    if isinstance(exc, (aiohttp.ClientResponseError, aiohttp.ClientPayloadError)):
        return UpstreamFailure(502, "upstream_invalid")
    return UpstreamFailure(502, "upstream_error")


class UnresolvableServer(Exception):
    """A server's host name has no address at start-up (or when a reload builds it)."""

    def __init__(self, key: Path, host: str, reason: str) -> None:
        super().__init__(f'{format_path(key)}: cannot resolve "{host}" ({reason})')
        self.key = key

    def located(self, config_path: str) -> str:
        """The message with the file and line, as configuration errors are written."""
        try:
            with open(config_path, encoding="utf-8") as fh:
                line = Locator(fh.read()).line(self.key)
        except (OSError, UnicodeDecodeError):
            return f"{config_path}: {self}"
        return f"{config_path}:{line}: {self}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HttpUpstream(Upstream):
    """One ``[upstreams.X]`` with ``servers``: a ClientSession (a pool) per server."""

    def __init__(self, config: UpstreamConfig) -> None:
        super().__init__(config)
        assert config.servers
        self.servers = [ServerState(config.name, s) for s in config.servers]
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )
        self._max_fails = config.max_fails
        self._fail_timeout = config.fail_timeout
        self._fail_on_5xx = config.fail_on_5xx
        self._retries = config.retries if len(self.servers) > 1 else 0
        self._balancer: Balancer | None = None
        # a one-server upstream skips the balancer while its server is in rotation
        self._only = self.servers[0] if len(self.servers) == 1 else None
        self._checker: HealthChecker | None = None
        self._now: Callable[[], float] = time.monotonic  # the loop's clock once started
        self.retried = 0  # attempts made again on another server
        self.no_healthy = 0  # requests answered 502 no_healthy_server

    async def start(self) -> None:
        await self._check_names()
        c = self.config
        for s in self.servers:
            connector = aiohttp.TCPConnector(
                limit=c.max_connections,
                limit_per_host=0,
                keepalive_timeout=c.keepalive_timeout,
                ttl_dns_cache=c.dns_ttl,  # type: ignore[arg-type]
            )
            s.session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),  # never share one client's cookies with another
                skip_auto_headers=_SKIP_AUTO,
                trust_env=False,
                timeout=self._timeout,
            )
        loop = asyncio.get_running_loop()
        self._now = loop.time
        self._balancer = Balancer(c.balance, self.servers, c.fail_timeout, loop.time)
        if c.health_check is not None:
            self._checker = HealthChecker(c.health_check, self.servers, c.dns_ttl)
            self._checker.start()

    async def _check_names(self) -> None:
        """Every server host name must resolve now: a name that does not is a
        start-up (or reload) error, not a surprise at the first request."""
        assert self.config.servers
        names = [(i, s) for i, s in enumerate(self.config.servers) if not _is_ip(s.host)]
        if not names:
            return
        resolver = AsyncResolver()
        try:
            for i, s in names:
                key: Path = ("upstreams", self.name, "servers", i)
                try:
                    async with asyncio.timeout(RESOLVE_TIMEOUT):
                        await resolver.resolve(s.host, s.port, family=socket.AF_UNSPEC)
                except TimeoutError:
                    raise UnresolvableServer(key, s.host, f"no answer within {RESOLVE_TIMEOUT:g} s") from None
                except OSError as exc:
                    raise UnresolvableServer(key, s.host, exc.strerror or str(exc)) from None
        finally:
            await resolver.close()

    @property
    def closed(self) -> bool:
        """Whether every server's pool is closed."""
        return all(s.session is None or s.session.closed for s in self.servers)

    async def _close(self) -> None:
        if self._checker is not None:
            await self._checker.close()
        for s in self.servers:
            if s.session is not None:
                await s.session.close()

    # -- the request ---------------------------------------------------------------
    async def serve(self, ex: Exchange) -> web.StreamResponse:
        server = self._only
        if server is None or server.blocked_until:
            assert self._balancer is not None
            server = self._balancer.pick(_NONE)
            if server is None:
                self.no_healthy += 1
                raise UpstreamFailure(502, "no_healthy_server")
        request = ex.request
        headers = request_headers(request.headers, ex.client_ip, request.headers.get("Host", ""))
        body: RequestBody | None = ex.body
        began = self._now() if self._retries else 0.0
        server.in_flight += 1
        server.requests += 1
        try:
            up = await server.session._request(  # type: ignore[union-attr]
                request.method,
                URL(server.url + ex.path, encoded=True),
                headers=headers,
                data=body.chunks() if body is not None else None,
                allow_redirects=False,
                timeout=self._timeout,
            )
        except asyncio.CancelledError:
            server.in_flight -= 1
            if server.trial:
                server.trial_abandoned()  # no verdict: its client left
            raise
        except Exception as exc:
            server.in_flight -= 1
            up, server = await self._retry(ex, headers, server, exc, began)
        # the head is here
        try:
            status = up.status
            if self._fail_on_5xx and status >= 500:
                server.failed(f"status_{status}", self._now(), self._max_fails, self._fail_timeout)
            elif server.fails or server.ejected_until:
                server.succeeded()
            done = False
            try:
                resp = web.StreamResponse(status=status, reason=up.reason,
                                          headers=response_headers(up.headers))
                await resp.prepare(request)
                ex.status = status
                ex.head_sent = True
                content = up.content
                try:
                    while True:
                        # aiohttp's C parser drops the read timer and never wakes the body's
                        # reader when a later chunk header is malformed: bound each read here
                        async with asyncio.timeout(self.config.read_timeout):
                            chunk = await content.readany()
                        if not chunk:
                            break
                        ex.sent += len(chunk)
                        if content.at_eof():
                            await resp.write_eof(chunk)
                            break
                        await resp.write(chunk)
                    if not resp._eof_sent:
                        await resp.write_eof()
                except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                    if isinstance(exc, aiohttp.ClientConnectionResetError):
                        raise  # the client went away while we wrote to it
                    # the head is out: all we can do is cut the response short
                    ex.truncated = _failure(exc).reason
                    server.failed(ex.truncated, self._now(), self._max_fails, self._fail_timeout)
                    transport = request.transport
                    if transport is not None:
                        transport.abort()
                    return resp
                done = True
                return resp
            finally:
                if done:
                    up.release()
                else:
                    up.close()  # unread bytes: the connection cannot go back to the pool
        finally:
            server.in_flight -= 1

    async def _retry(self, ex: Exchange, headers: Any, server: ServerState, exc: Exception,
                     began: float) -> tuple[aiohttp.ClientResponse, ServerState]:
        """After a failed attempt: retry on other servers where that is safe (see the
        module docstring), or raise. The response returned is counted in flight."""
        request = ex.request
        body = ex.body
        c = self.config
        timeout = self._timeout
        tried = _NONE
        while True:
            if body is not None and body.error is not None:
                if server.trial:
                    server.trial_abandoned()  # the client's body failed, not the server
                raise body.error from None
            fail = _failure(exc)
            now = self._now()
            server.failed(fail.reason, now, self._max_fails, self._fail_timeout)
            if len(tried) >= self._retries or not _may_retry(exc, request.method, body):
                raise fail from None
            left = began + c.read_timeout - now
            tried = (*tried, server)
            assert self._balancer is not None
            nxt = self._balancer.pick(tried) if left > 0 else None
            if nxt is None:
                raise fail from None
            self.retried += 1
            server = nxt
            if left < c.connect_timeout:
                timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=left,
                                                sock_read=c.read_timeout)
            server.in_flight += 1
            server.requests += 1
            try:
                up = await server.session._request(  # type: ignore[union-attr]
                    request.method,
                    URL(server.url + ex.path, encoded=True),
                    headers=headers,
                    data=body.chunks() if body is not None else None,
                    allow_redirects=False,
                    timeout=timeout,
                )
            except asyncio.CancelledError:
                server.in_flight -= 1
                if server.trial:
                    server.trial_abandoned()
                raise
            except Exception as e:
                server.in_flight -= 1
                exc = e
                continue
            return up, server

    # -- state, for the snapshot and the control socket ----------------------------
    def pool_export(self) -> dict[str, Any]:
        """This process's view of the servers (see upstream_state)."""
        now = self._now()
        return {
            "balance": self.config.balance,
            "retried": self.retried,
            "no_healthy_server": self.no_healthy,
            "servers": [s.export(now) for s in self.servers],
        }

    def set_server_state(self, server: str, up: bool) -> list[str]:
        """Set matching servers (by URL or host:port) up or down by hand; their URLs."""
        want = server.rstrip("/")
        matched = [s for s in self.servers
                   if want in (s.url, f"{s.host}:{s.port}", f"[{s.host}]:{s.port}")]
        for s in matched:
            s.set_admin(up)
        return [s.url for s in matched]


def _may_retry(exc: Exception, method: str, body: RequestBody | None) -> bool:
    """Whether a failed attempt can go to another server without risk of doing twice
    what the client asked once (see the module docstring)."""
    if isinstance(exc, _NOTHING_SENT):
        return True
    return body is None and method in IDEMPOTENT and isinstance(exc, _RESET)
