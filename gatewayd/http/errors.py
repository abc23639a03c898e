"""The failures of an upstream exchange, as the client will see them: a status and a
reason (``X-Gatewayd-Reason``)."""

from __future__ import annotations


class UpstreamFailure(Exception):
    """The upstream failed before a response head reached the client."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
