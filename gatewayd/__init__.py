"""gatewayd: a reverse-proxy gateway daemon that stays predictable under overload."""

__version__ = "0.1.0"
