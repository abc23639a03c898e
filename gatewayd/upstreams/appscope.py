"""What an ASGI scope and a WSGI environ both say about a request: the path the
application serves (decoded and raw), the query, the prefix the route stripped,
the client (SPEC §10's address) and the server. One place, so the two
interfaces never disagree about a request."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

if TYPE_CHECKING:
    from ..proxy.exchange import Exchange


class Target:
    """The forwarded target split: ``raw_path`` (bytes, as sent, without the query),
    ``path`` (percent-decoded, as UTF-8 with surrogateescape: ASGI's ``path``; WSGI's
    PATH_INFO is its latin-1 view, ``wsgi_path``), ``query`` (bytes, without ``?``)
    and ``root_path`` (the prefix the route stripped, "" if none)."""

    __slots__ = ("_bare", "_decoded", "query", "raw_path", "root_path")

    def __init__(self, ex: Exchange) -> None:
        target = ex.path
        path, _, query = target.partition("?")
        self.raw_path = path.encode("utf-8", "surrogateescape")
        self.query = query.encode("utf-8", "surrogateescape")
        self._decoded: bytes | None = None if "%" in path else self.raw_path
        route = ex.route.config
        self.root_path = root = route.path_prefix.rstrip("/") if route.strip_prefix else ""
        # the client asked for the prefix itself, without a slash after it
        self._bare = bool(root) and ex.request.raw_path.partition("?")[0] == root

    @property
    def decoded(self) -> bytes:
        """The path's bytes, percent escapes decoded."""
        if self._decoded is None:
            self._decoded = unquote_to_bytes(self.raw_path)
        return self._decoded

    @property
    def path(self) -> str:
        return self.decoded.decode("utf-8", "surrogateescape")

    @property
    def full_path(self) -> str:
        """``root_path`` and ``path``: the path the client asked for (in normal form)."""
        return self._full(self.path)

    @property
    def full_raw_path(self) -> bytes:
        return self._full(self.raw_path.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")

    def _full(self, rest: str) -> str:
        # the prefix alone ("/api" for a route on "/api") was forwarded as "/"
        return self.root_path if rest == "/" and self._bare else self.root_path + rest

    @property
    def wsgi_path(self) -> str:
        """PEP 3333: the decoded bytes, each as one character (latin-1)."""
        return self.decoded.decode("latin-1")


def client_of(ex: Exchange) -> tuple[str, int]:
    """The client (SPEC §10: the peer, the PROXY protocol's address or the one a
    trusted proxy gave) and its port (0 when only the address is known)."""
    request = ex.request
    host = request.client
    peer = request.protocol.peername
    port = peer[1] if isinstance(peer, (list, tuple)) and len(peer) > 1 and peer[0] == host else 0
    return host, port


def server_of(ex: Exchange) -> tuple[str, int]:
    """The gateway's address the request came to."""
    sock = ex.request.protocol.sockname
    if isinstance(sock, (list, tuple)) and len(sock) > 1:
        return str(sock[0]), int(sock[1])
    return "", 0


def scheme_of(ex: Exchange) -> str:
    return "https" if ex.request.protocol.secure else "http"
