"""Whether upstream servers' host names resolve now: asked by every HTTP upstream
as it starts (a name that does not resolve is a start-up or reload error, not a
surprise at the first request) and by ``gatewayd --check`` for the whole file."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

from aiohttp.resolver import AsyncResolver

from ..config.positions import Locator, Path, format_path
from ..config.settings import Config, UpstreamConfig

RESOLVE_TIMEOUT = 5.0  # seconds for each server name


class KeyProblem(Exception):
    """What start-up (or a reload) found wrong with what a key of the file names: a
    server name, a certificate file (``upstreams.tls``); ``str()`` starts with the key."""

    def __init__(self, key: Path, message: str) -> None:
        super().__init__(f"{format_path(key)}: {message}")
        self.key = key

    def located(self, config_path: str) -> str:
        """The message with the file and line, as configuration errors are written."""
        try:
            with open(config_path, encoding="utf-8") as fh:
                line = Locator(fh.read()).line(self.key)
        except (OSError, UnicodeDecodeError):
            return f"{config_path}: {self}"
        return f"{config_path}:{line}: {self}"


class UnresolvableServer(KeyProblem):
    """A server's host name has no address at start-up (or when a reload builds it)."""

    def __init__(self, key: Path, host: str, reason: str) -> None:
        super().__init__(key, f'cannot resolve "{host}" ({reason})')


def is_address(host: str) -> bool:
    """An IP address, which needs no resolving."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def unresolvable(upstreams: Iterable[tuple[UpstreamConfig, str]]) -> list[UnresolvableServer]:
    """Every server of the given (configuration, name) upstreams whose host name has
    no address, in the file's order; all asked at once, each given RESOLVE_TIMEOUT."""
    names = [(("upstreams", name, "servers", i), s.host, s.port)
             for config, name in upstreams for i, s in enumerate(config.servers or ())
             if not is_address(s.host)]
    if not names:  # addresses only (the usual case): no resolver to make
        return []
    resolver = AsyncResolver()

    async def one(key: Path, host: str, port: int) -> UnresolvableServer | None:
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                await resolver.resolve(host, port, family=socket.AF_UNSPEC)
        except TimeoutError:
            return UnresolvableServer(key, host, f"no answer within {RESOLVE_TIMEOUT:g} s")
        except OSError as exc:
            return UnresolvableServer(key, host, exc.strerror or str(exc))
        return None

    try:
        found = await asyncio.gather(*(one(key, host, port) for key, host, port in names))
    finally:
        await resolver.close()
    return [e for e in found if e is not None]


async def unresolvable_in(config: Config) -> list[UnresolvableServer]:
    """What ``gatewayd --check`` reports: every server name of the file that has no address."""
    return await unresolvable((u, u.name) for u in config.upstreams)
