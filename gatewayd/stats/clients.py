"""Who is being refused: per-client counts of a route's refusals by client
(rate-limited, over a per-client cap), for the ``clients`` control command.

Counted on the refusal paths only, never for a served request. Bounded: a
flood from many addresses cannot grow it past ``capacity`` clients; when it is
full, the lower half by count is dropped at once (amortized O(1) per refusal),
so the clients refused most stay while one-off addresses come and go.
"""

from __future__ import annotations

REASONS = ("rate_limited", "client_queue_full")  # what is counted per client
CAPACITY = 1024


class ClientCounts:
    __slots__ = ("_counts", "capacity")

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._counts: dict[str, list[int]] = {}

    def count(self, client: str, reason: str) -> None:
        """One refusal of ``client`` for ``reason`` (one of ``REASONS``)."""
        counts = self._counts.get(client)
        if counts is None:
            if len(self._counts) >= self.capacity:
                self._trim()
            counts = self._counts[client] = [0] * len(REASONS)
        counts[REASONS.index(reason)] += 1

    def _trim(self) -> None:
        kept = sorted(self._counts.items(), key=lambda item: -sum(item[1]))[: self.capacity // 2]
        self._counts = dict(kept)

    def export(self) -> dict[str, dict[str, int]]:
        """client -> reason -> count (reasons with a count only)."""
        return {client: {r: n for r, n in zip(REASONS, counts, strict=True) if n}
                for client, counts in self._counts.items()}
