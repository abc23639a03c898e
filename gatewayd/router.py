"""Route selection: the longest matching path prefix, per Host, precomputed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar


class _HasMatch(Protocol):
    @property
    def host(self) -> str | None: ...
    @property
    def path_prefix(self) -> str: ...


T = TypeVar("T")


def normalize_host(value: str) -> str:
    """``Example.COM:8080`` -> ``example.com``; ``[::1]:80`` -> ``[::1]``."""
    value = value.lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    return value.partition(":")[0]


class Router(Generic[T]):
    """Routes with a ``host`` are tried first for that host, then the host-less ones.

    Prefixes are plain string prefixes of the raw request target (no decoding),
    so what matches is exactly what is forwarded.
    """

    __slots__ = ("_any", "_by_host", "_host_cache")

    def __init__(self, routes: Iterable[tuple[_HasMatch, T]]) -> None:
        by_host: dict[str, list[tuple[str, T]]] = {}
        any_host: list[tuple[str, T]] = []
        for config, target in routes:
            entry = (config.path_prefix, target)
            if config.host is None:
                any_host.append(entry)
            else:
                by_host.setdefault(config.host, []).append(entry)
        def by_length(e: tuple[str, T]) -> int:
            return -len(e[0])

        any_host.sort(key=by_length)
        # a host's own routes, then the host-less ones, longest prefix first within each
        self._by_host = {h: sorted(es, key=by_length) + any_host for h, es in by_host.items()}
        self._any = any_host
        self._host_cache: dict[str, list[tuple[str, T]]] = {}

    def match(self, host: str | None, target: str) -> T | None:
        """The route for a Host header value and a raw request target."""
        table = self._any
        if self._by_host and host:
            cached = self._host_cache.get(host)
            if cached is None:
                cached = self._by_host.get(normalize_host(host), self._any)
                if len(self._host_cache) > 4096:  # Host is client-chosen: bound the cache
                    self._host_cache.clear()
                self._host_cache[host] = cached
            table = cached
        for prefix, target_ in table:
            if target.startswith(prefix):
                return target_
        return None
