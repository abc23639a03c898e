"""Whether every upstream server's host name resolves now: what ``gatewayd --check``
asks before a start or a reload would find out (``HttpUpstream.start`` asks it of
one upstream at a time and stops at the first name that fails)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from aiohttp.resolver import AsyncResolver

from ..config.settings import Config
from .http import RESOLVE_TIMEOUT, UnresolvableServer


async def unresolvable(config: Config) -> list[UnresolvableServer]:
    """Every server of every HTTP upstream whose host name has no address (all of
    them at once, each given ``RESOLVE_TIMEOUT`` seconds), in the file's order."""
    resolver = AsyncResolver()

    async def one(upstream: str, index: int, host: str, port: int) -> UnresolvableServer | None:
        key = ("upstreams", upstream, "servers", index)
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                await resolver.resolve(host, port, family=socket.AF_UNSPEC)
        except TimeoutError:
            return UnresolvableServer(key, host, f"no answer within {RESOLVE_TIMEOUT:g} s")
        except OSError as exc:
            return UnresolvableServer(key, host, exc.strerror or str(exc))
        return None

    try:
        found = await asyncio.gather(*(
            one(u.name, i, s.host, s.port)
            for u in config.upstreams for i, s in enumerate(u.servers or ()) if not _is_address(s.host)))
    finally:
        await resolver.close()
    return [e for e in found if e is not None]


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
