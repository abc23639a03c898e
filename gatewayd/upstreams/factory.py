"""The upstream kinds, chosen from the configuration by name.

Each kind is an import string, imported the first time a configuration uses it
(as uvicorn picks its protocol classes): the proxy's contract
(``gatewayd.proxy.exchange.Upstream``, whose docstring is the interface a kind
implements) never names its implementations. Every kind is built as
``Kind(config, turn)``.

A new kind (ASGI, WSGI: SPEC §16) is a module beside the others, one entry in
``KINDS`` and one line in ``kind_of`` saying which configurations it serves
(for them, the ``interface`` key); a kind that runs a Python application
subclasses ``gatewayd.upstreams.application.Application``.
"""

from __future__ import annotations

from ..config.importing import resolve
from ..config.settings import UpstreamConfig
from ..http.turn import Turn
from ..proxy.exchange import Upstream

KINDS: dict[str, str] = {
    "http": "gatewayd.upstreams.http:HttpUpstream",  # servers = [...]: pooled HTTP/1.1
    "handler": "gatewayd.upstreams.handler:HandlerUpstream",  # async handler on the loop
    "process": "gatewayd.upstreams.process:ProcessUpstream",  # plain function, process pool
    "asgi": "gatewayd.upstreams.asgi:AsgiUpstream",  # an ASGI 3 application on the loop
    "wsgi": "gatewayd.upstreams.wsgi:WsgiUpstream",  # a WSGI application on a thread pool
}


def kind_of(config: UpstreamConfig) -> str:
    """Which entry of KINDS serves a validated upstream configuration."""
    if config.servers is not None:
        return "http"
    if config.interface != "aiohttp":
        return config.interface
    if config.executor == "process":
        return "process"
    return "handler"


def build(config: UpstreamConfig, turn: Turn) -> Upstream:
    """The upstream object for a validated configuration; ``turn``: the gateway's."""
    name = kind_of(config)
    kind = resolve(KINDS[name])
    if not (isinstance(kind, type) and issubclass(kind, Upstream)):
        raise TypeError(f"upstream kind {name!r}: {KINDS[name]} is not an Upstream")
    return kind(config, turn)
