"""What the upstream kinds that run Python code share: an application named by
``handler = "module:callable"``, imported when the upstream is built, and the
writing of a whole response the application returned as a value.

``HandlerUpstream`` (aiohttp handlers on the loop) and ``ProcessUpstream`` (plain
functions in a process pool) build on it; ASGI and WSGI kinds (SPEC §16) are
modules beside them that do the same: subclass ``Application``, translate the
exchange into the interface's request and its answer back into ``ex``.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from ..config.importing import resolve
from ..config.settings import UpstreamConfig
from ..http.headers import response_headers
from ..http.turn import Turn
from ..proxy.exchange import Exchange, Upstream

DEFAULT_CONTENT_TYPE = "application/octet-stream"


class Application(Upstream):
    """An upstream that is a Python callable, ``app``, named by ``handler``.

    It is imported as the upstream is built, so a name that does not import fails
    the start (or refuses the reload), never the first request."""

    def __init__(self, config: UpstreamConfig, turn: Turn) -> None:
        super().__init__(config, turn)
        if not config.handler:  # (the factory picks these kinds only for a handler)
            raise ValueError(f"upstreams.{config.name}: an application upstream needs handler")
        self.target: str = config.handler
        self.app: Any = resolve(config.handler, config.folder)


def reason_phrase(status: int) -> str:
    """The standard reason phrase for ``status``; "Unknown" for a code without one."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def respond(ex: Exchange, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    """Send a whole response an application returned, in one write: hop-by-hop
    fields dropped, ``Content-Length`` set by us, a default ``Content-Type``."""
    request = ex.request
    out = response_headers(headers)
    if not any(n.lower() == "content-type" for n, _ in out):
        out.append(("Content-Type", DEFAULT_CONTENT_TYPE))
    ex.status = status
    request.write(request.head(status, reason_phrase(status), out, len(body)) + body)
    ex.head_sent = True
    ex.sent = len(body)
