"""The upstream kinds, chosen from the configuration by name.

Each kind is an import string, imported the first time a configuration uses it
(as uvicorn picks its protocol classes): the proxy's contract
(``gatewayd.proxy.exchange.Upstream``) never names its implementations, and a
new kind (ASGI, WSGI) is one entry here and one module beside the others.
Every kind is built as ``Kind(config, turn)``.
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
}


def kind_of(config: UpstreamConfig) -> str:
    """Which entry of KINDS serves a validated upstream configuration."""
    if config.servers is not None:
        return "http"
    if config.executor == "process":
        return "process"
    return "handler"


def build(config: UpstreamConfig, turn: Turn) -> Upstream:
    """The upstream object for a validated configuration; ``turn``: the gateway's."""
    kind: type[Upstream] = resolve(KINDS[kind_of(config)])
    return kind(config, turn)
