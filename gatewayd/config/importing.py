"""Resolving ``module:callable`` import paths named in the configuration."""

from __future__ import annotations

import importlib
import sys
from typing import Any


def resolve(path: str, folder: str = "") -> Any:
    """The object at ``module:attr.attr``; raises ImportError/AttributeError.

    ``folder`` (the configuration file's) is put first on the import path, once, as
    uvicorn puts its app directory: an operator's ``main:app`` beside the file is
    found however gatewayd was started."""
    if folder and folder not in sys.path:
        sys.path.insert(0, folder)
    module, _, attr = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
