"""Resolving ``module:callable`` import paths named in the configuration."""

from __future__ import annotations

import importlib
from typing import Any


def resolve(path: str) -> Any:
    """The object at ``module:attr.attr``; raises ImportError/AttributeError."""
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
