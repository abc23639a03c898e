"""Routes' limits changed by hand (``set_limit``), until the next reload.

One process and the master of workers keep the same record: the master's is
what it answers with and hands to every worker it starts; each worker (and the
one process) divides the gateway-wide figures it holds among the live workers.
"""

from __future__ import annotations

from ..config.settings import RouteConfig


class Overrides(dict[str, dict[str, int]]):
    """Route name -> the limits set by hand (``max_concurrency``, ``max_queue``).

    A plain dict underneath: the snapshot reads it as one and it crosses the
    master/worker channel as JSON.
    """

    def set(self, route: str, max_concurrency: int | None, max_queue: int | None) -> None:
        """Record the limits given (None: that one unchanged)."""
        o = self.setdefault(route, {})
        if max_concurrency is not None:
            o["max_concurrency"] = max_concurrency
        if max_queue is not None:
            o["max_queue"] = max_queue

    def limits(self, rc: RouteConfig) -> tuple[int, int]:
        """The gateway-wide ``(max_concurrency, max_queue)`` in force for a route."""
        o = self.get(rc.name, {})
        return o.get("max_concurrency", rc.max_concurrency), o.get("max_queue", rc.max_queue)
