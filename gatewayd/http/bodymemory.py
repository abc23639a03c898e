"""The memory the request bodies buffered before admission may hold, in one process.

Buffering a body before it takes a route slot (body.RequestBody.fill) trades the
slot for memory; this bounds that memory, whatever the number of uploads: bytes
are counted as they arrive (never reserved ahead), so a thousand slow uploads
hold what they sent, not what they announced.
"""

from __future__ import annotations


class BodyMemory:
    """Bytes held by buffered request bodies in this process, against ``limit``
    (``request_buffer_memory``, or this worker's share of it)."""

    __slots__ = ("held", "limit", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.refused = 0  # bodies answered 503 body_buffer_full: the bound was reached

    def take(self, n: int) -> bool:
        """Count ``n`` more bytes as held if they fit under the bound; whether they did."""
        held = self.held + n
        if held > self.limit:
            return False
        self.held = held
        return True

    def give(self, n: int) -> None:
        self.held -= n

    @property
    def full(self) -> bool:
        return self.held >= self.limit
