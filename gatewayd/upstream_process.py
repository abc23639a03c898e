"""Kept for configurations and handlers written before the package had
subpackages: ``gatewayd.upstream_process.ProcessRequest`` is public."""

from .upstreams.process import ProcessRequest

__all__ = ["ProcessRequest"]
