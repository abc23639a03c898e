"""The control socket's path from a gatewayd configuration file.

Read with plain ``tomllib`` (the dashboard never imports the daemon): ``[control]
socket``, default ``gatewayd.sock``, a relative path taken from the config file's
folder, as gatewayd itself does (gatewayd.toml(5)).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

DEFAULT_SOCKET = "gatewayd.sock"


class ConfigProblem(Exception):
    """The socket path cannot be read from the file (one line: file and reason)."""


def socket_from_config(config: Path) -> Path:
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigProblem(f"{config}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigProblem(f"{config}: {exc}") from None
    control = data.get("control", {})
    if not isinstance(control, dict):
        raise ConfigProblem(f"{config}: control: expected a table")
    socket = control.get("socket", DEFAULT_SOCKET)
    if not isinstance(socket, str) or not socket:
        raise ConfigProblem(f"{config}: control.socket: expected a path string, got {socket!r}")
    path = Path(socket)
    return path if path.is_absolute() else config.resolve().parent / path
