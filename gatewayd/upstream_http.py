"""HTTP upstreams: pooled keep-alive connections, bodies streamed both ways."""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
from aiohttp import web
from yarl import URL

from .body import RequestBody
from .config import UpstreamConfig
from .headers import request_headers, response_headers
from .upstream import Exchange, Upstream, UpstreamFailure

# aiohttp would otherwise add its own values: a transparent proxy forwards only
# what the client sent.
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def _failure(exc: BaseException) -> UpstreamFailure:
    """Map a client-side error before the response head to a status and a reason."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamFailure(504, "upstream_connect_timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure(502, "upstream_connect")
    if isinstance(exc, (aiohttp.SocketTimeoutError, asyncio.TimeoutError)):
        return UpstreamFailure(504, "upstream_timeout")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                        ConnectionResetError)):
        return UpstreamFailure(502, "upstream_reset")
    if isinstance(exc, (aiohttp.ClientResponseError, aiohttp.ClientPayloadError)):
        return UpstreamFailure(502, "upstream_invalid")
    return UpstreamFailure(502, "upstream_error")


class HttpUpstream(Upstream):
    """One ``[upstreams.X]`` with ``servers``: a ClientSession shared by all its requests."""

    def __init__(self, config: UpstreamConfig) -> None:
        super().__init__(config)
        assert config.servers
        self._bases = [s.url for s in config.servers for _ in range(s.weight)]
        self._next = itertools.cycle(self._bases).__next__
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=config.connect_timeout,
            sock_read=config.read_timeout,
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections,
            limit_per_host=0,
            keepalive_timeout=self.config.keepalive_timeout,
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # never share one client's cookies with another
            skip_auto_headers=_SKIP_AUTO,
            trust_env=False,
            timeout=self._timeout,
        )

    async def _close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def serve(self, ex: Exchange) -> web.StreamResponse:
        request = ex.request
        assert self._session is not None
        headers = request_headers(request.headers, ex.client_ip, request.headers.get("Host", ""))
        body: RequestBody | None = ex.body
        try:
            up = await self._session._request(
                request.method,
                URL(self._next() + ex.path, encoded=True),
                headers=headers,
                data=body.chunks() if body is not None else None,
                allow_redirects=False,
                timeout=self._timeout,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if body is not None and body.error is not None:
                raise body.error from None
            raise _failure(exc) from None
        done = False
        try:
            resp = web.StreamResponse(status=up.status, reason=up.reason,
                                      headers=response_headers(up.headers))
            await resp.prepare(request)
            ex.status = up.status
            ex.head_sent = True
            content = up.content
            try:
                while True:
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
