"""What the request path reads of the running generation, and nothing more.

The runtime owns one ``Serving`` and swaps its fields in one step on reload;
the gateway holds it instead of the runtime, so the request path cannot reach
(or come to depend on) the reload, worker or control machinery.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config.settings import ServerConfig
from ..http.bodymemory import BodyMemory
from .accesslog import AccessLog
from .router import Table


@dataclass(slots=True, eq=False)
class Serving:
    server: ServerConfig  # the [server] settings in force
    access_log: AccessLog
    body_memory: BodyMemory  # what buffered request bodies may hold in this process
    table: Table = field(init=False)  # routes and upstreams; set once built
