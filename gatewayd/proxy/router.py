"""Route selection: the longest matching path prefix, per Host, precomputed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from .exchange import Route, Upstream


class _HasMatch(Protocol):
    @property
    def host(self) -> str | None: ...
    @property
    def path_prefix(self) -> str: ...
    @property
    def strip_prefix(self) -> bool: ...


T = TypeVar("T")


def normalize_host(value: str) -> str:
    """``Example.COM.:8080`` -> ``example.com``; ``[::1]:80`` -> ``[::1]``.

    A trailing dot is dropped: ``example.com.`` is the same fully qualified name
    (RFC 1034 §3.1), and a client that sends it must not miss its host's routes."""
    value = value.lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    value = value.partition(":")[0]
    return value[:-1] if value.endswith(".") else value


class Router(Generic[T]):
    """Routes with a ``host`` are tried first for that host, then the host-less ones.

    Prefixes are plain string prefixes of the request target in normal form
    (gatewayd.http.paths), which is what is forwarded, so what matches is what the
    upstream serves. A route that strips its prefix matches only at a segment
    boundary when the prefix does not end in ``/``: prefix ``/api`` takes ``/api``,
    ``/api/x`` and ``/api?q`` but not ``/apix`` or ``/api..``, whose remainder
    (``x``, ``..``) is no path of its own.
    """

    __slots__ = ("_any", "_by_host", "_host_cache")

    def __init__(self, routes: Iterable[tuple[_HasMatch, T]]) -> None:
        by_host: dict[str, list[tuple[str, bool, T]]] = {}
        any_host: list[tuple[str, bool, T]] = []
        for config, target in routes:
            prefix = config.path_prefix
            entry = (prefix, config.strip_prefix and not prefix.endswith("/"), target)
            if config.host is None:
                any_host.append(entry)
            else:
                by_host.setdefault(config.host, []).append(entry)
        def by_length(e: tuple[str, bool, T]) -> int:
            return -len(e[0])

        any_host.sort(key=by_length)
        # a host's own routes, then the host-less ones, longest prefix first within each
        self._by_host = {h: sorted(es, key=by_length) + any_host for h, es in by_host.items()}
        self._any = any_host
        self._host_cache: dict[str, list[tuple[str, bool, T]]] = {}

    def match(self, host: str | None, target: str) -> T | None:
        """The route for a Host header value and a request target in normal form."""
        table = self._any
        if self._by_host and host:
            cached = self._host_cache.get(host)
            if cached is None:
                cached = self._by_host.get(normalize_host(host), self._any)
                if len(self._host_cache) > 4096:  # Host is client-chosen: bound the cache
                    self._host_cache.clear()
                self._host_cache[host] = cached
            table = cached
        for prefix, whole_segments, target_ in table:
            if target.startswith(prefix) and (not whole_segments or _at_boundary(target, len(prefix))):
                return target_
        return None


def _at_boundary(target: str, end: int) -> bool:
    return len(target) == end or target[end] in "/?"


@dataclass(frozen=True)
class Table:
    """What one generation routes with; replaced as a whole on reload."""

    router: Router[Route]
    routes: dict[str, Route]
    upstreams: dict[str, Upstream]
