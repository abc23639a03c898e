"""Active health checks: each server probed with ``GET path`` every ``interval``.

A probe passes on a 2xx or 3xx answer within ``timeout``. Probes use their own
connections (one per probe, closed after it), so a full pool never fails a
check and a check proves that a new connection can be made (an https:// server's with the
upstream's TLS context, its name and certificate verified as requests' are). The verdicts feed
the servers' state (``ServerState.check_passed`` / ``check_failed``). Servers
start as up: a fresh gateway serves at once, and a dead server goes down after
``unhealthy`` probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence

import aiohttp

from .. import __version__
from ..config.kinds import HealthCheck
from .servers import ServerState
from .tls import UpstreamTls

_HEADERS = {"User-Agent": f"gatewayd/{__version__} health check"}


class HealthChecker:
    """The probing tasks of one upstream object."""

    def __init__(self, check: HealthCheck, servers: Sequence[ServerState], dns_ttl: float,
                 tls: UpstreamTls | None = None) -> None:
        self.check = check
        self.servers = tuple(servers)
        self._dns_ttl = dns_ttl
        self._tls = tls
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=True, ttl_dns_cache=self._dns_ttl)  # type: ignore[arg-type]
        self._session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False,
            timeout=aiohttp.ClientTimeout(total=self.check.timeout), headers=_HEADERS,
        )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(s)) for s in self.servers]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()

    async def _run(self, server: ServerState) -> None:
        check = self.check
        # spread the first probes of many servers (and workers) over one interval
        await asyncio.sleep(random.random() * min(check.interval, 1.0))
        while True:
            reason = await self.probe(server)
            if reason is None:
                server.check_passed(check.healthy)
            else:
                server.check_failed(reason, check.unhealthy)
            await asyncio.sleep(check.interval)

    async def probe(self, server: ServerState) -> str | None:
        """None when the server passes, else why it did not."""
        assert self._session is not None
        tls = self._tls if server.tls else None
        try:
            async with self._session.get(
                server.url + self.check.path, allow_redirects=False,
                ssl=tls.context if tls is not None else True,
                server_hostname=tls.server_hostname(server.host) if tls is not None else None,
            ) as r:
                status = r.status
        except asyncio.CancelledError:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return "timeout"
        except aiohttp.ClientConnectorDNSError:
            return "dns"
        except aiohttp.ClientSSLError:  # the handshake failed, or the certificate's verification
            return "tls"
        except aiohttp.ClientConnectorError:
            return "connect"
        except (aiohttp.ClientError, OSError) as exc:
            return type(exc).__name__
        if 200 <= status < 400:
            return None
        return f"status {status}"
