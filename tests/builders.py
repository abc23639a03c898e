"""Config files for tests, built from keyword arguments: a test names only the keys it
is about, and the tables around them are written the same way everywhere.

``gateway_config`` writes the whole file ([server], [control] and [log] filled in
for a test); ``upstream_toml`` and ``route_toml`` write one table each; ``app_route`` and
``route_to`` are the one upstream ``app`` and one route ``app`` to it that most
tests need. Every value goes through ``toml`` (strings quoted, floats stay floats,
lists and inline tables as TOML writes them), so a test that rewrites the text
(``text.replace("read_timeout = 2.0", ...)``) can rely on the spelling.
"""

from __future__ import annotations

import json
import socket
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SIMULATED_IO = "gatewayd.handlers:simulated_io"


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for a config's listen address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml(value: Any) -> str:
    """``value`` as a TOML literal (JSON's spelling is TOML's for strings, numbers and booleans)."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return json.dumps(value)


def lines(keys: Mapping[str, Any]) -> str:
    """One ``key = value`` line per key, in the order given."""
    return "".join(f"{k} = {toml(v)}\n" for k, v in keys.items())


def upstream_toml(name: str, **keys: Any) -> str:
    """``[upstreams.NAME]`` with ``keys`` (``servers=[...]`` or ``handler="module:fn"``, ...)."""
    return f"[upstreams.{name}]\n{lines(keys)}\n"


def route_toml(name: str, upstream: str, **keys: Any) -> str:
    """One ``[[routes]]`` entry ``name`` to ``upstream``, with ``keys``."""
    return f"[[routes]]\n{lines({'name': name, 'upstream': upstream, **keys})}\n"


def app_route(url: str, upstream_keys: Mapping[str, Any] | None = None, **route_keys: Any) -> str:
    """Upstream ``app`` on the one server ``url`` (with ``upstream_keys``) and route ``app``
    to it (with ``route_keys``): the config most tests run."""
    return upstream_toml("app", servers=[url], **(upstream_keys or {})) + route_toml("app", "app", **route_keys)


def route_to(url: str, **route_keys: Any) -> str:
    """``app_route`` with a read_timeout no slow test reaches (30 s): the hardening tests'
    upstream, where a timeout would hide what the test is about."""
    return app_route(url, {"read_timeout": 30.0}, **route_keys)


def handler_route(name: str = "demo", handler: str = SIMULATED_IO, **route_keys: Any) -> str:
    """Upstream ``name`` served in-process by ``handler`` and route ``name`` to it: for tests
    about the process or the control socket, where no upstream server is needed."""
    return upstream_toml(name, handler=handler) + route_toml(name, name, **route_keys)


def gateway_config(tmp_path: Path, body: str, port: int | None = None, *, tls: str = "",
                   proxy_protocol: bool = False, **server: Any) -> Path:
    """Write a config file: ``body`` holds upstreams and routes; [server], [control]
    and [log] are filled in with a free port, a socket in ``tmp_path`` and no access log.
    ``tls``: a [tls] section (tests/certs.py ``tls_section``); the port then listens
    with TLS. ``proxy_protocol``: the port reads a PROXY protocol header first."""
    port = port or free_port()
    options = (", tls = true" if tls else "") + (", proxy_protocol = true" if proxy_protocol else "")
    listen = f'[{{address = "127.0.0.1:{port}"{options}}}]' if options else f'["127.0.0.1:{port}"]'
    text = (
        f'[server]\nlisten = {listen}\n{lines(server)}\n'
        f'[control]\nsocket = "gw.sock"\n\n'
        f'[log]\naccess_log = "off"\nlevel = "warning"\n\n'
        + tls
        + textwrap.dedent(body)
    )
    path = tmp_path / "gatewayd.toml"
    path.write_text(text)
    return path
