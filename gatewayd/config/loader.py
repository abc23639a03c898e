"""Reads a TOML file into a validated ``Config``, or every error in it at once.

Errors read ``file:line: key.path: what was expected, got what``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import pathlib
import re
import tomllib
from typing import Any

import tomli_w

from ..http.tls import CertificateProblem, load_certificate
from . import kinds as k
from .importing import resolve
from .positions import Locator, Path, format_path, toml_key
from .settings import SECTIONS, Config, RouteConfig, ServerConfig, TlsConfig, UpstreamConfig, settings_of

DEFAULT_CONFIG = "/etc/gatewayd/config.toml"  # without --config or $GATEWAYD_CONFIG


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class _Errors:
    """Collects every problem; ``sorted()`` gives them in the file's line order."""

    def __init__(self, filename: str, locator: Locator) -> None:
        self.filename = filename
        self.locator = locator
        self.found: list[tuple[int, str]] = []

    def add(self, path: Path, message: str) -> None:
        line = self.locator.line(path)
        self.found.append((line, f"{self.filename}:{line}: {format_path(path)}: {message}"))

    def sorted(self) -> list[str]:
        return [text for _, text in sorted(self.found, key=lambda found: found[0])]


_TOP = (*SECTIONS, "upstreams", "routes")


def _unknown_key(key: str, declared: list[str]) -> str:
    close = difflib.get_close_matches(key, declared, n=1)
    if close:
        return f'unknown key; did you mean "{close[0]}"?'
    return "unknown key; expected one of " + ", ".join(declared)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _section(cls: type, table: Any, path: Path, errors: _Errors, **extra: Any) -> tuple[Any, dict[str, Any]]:
    """The section's object (None if any of its keys is wrong) and its valid values.

    The valid values, defaults filled in, let checks across keys and sections run
    even where another key of the same table is wrong.
    """
    if not isinstance(table, dict):
        errors.add(path, f"expected a table, got {k.shown(table)}")
        return None, {}
    before = len(errors.found)
    declared = {f.name: f for f in settings_of(cls)}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        decl = declared.get(key)
        if decl is None:
            errors.add((*path, key), _unknown_key(key, list(declared)))
            continue
        try:
            values[key] = decl.metadata["kind"].parse(raw)
        except k.Invalid as exc:
            for problem in exc.every():
                errors.add((*path, key, *problem.at), str(problem))
    for name, decl in declared.items():
        if name in table:
            continue
        if decl.default is dataclasses.MISSING:
            errors.add((*path, name), f"missing; expected {decl.metadata['kind'].describe}")
        else:
            values[name] = decl.default
    if len(errors.found) > before:
        return None, values
    return cls(**values, **extra), values


def _upstreams(data: dict[str, Any], errors: _Errors, folder: str) -> tuple[list[UpstreamConfig], list[str] | None]:
    """The valid upstreams, and the names of all in file order (None when [upstreams] is no table)."""
    raw = data.get("upstreams", {})
    if not isinstance(raw, dict):
        errors.add(("upstreams",), f"expected tables [upstreams.NAME], got {k.shown(raw)}")
        return [], None
    out = []
    for name, table in raw.items():
        path: Path = ("upstreams", name)
        try:
            k.Name().parse(name)
        except k.Invalid as exc:
            errors.add(path, str(exc))
            continue
        u, values = _section(UpstreamConfig, table, path, errors, name=name, folder=folder)
        if isinstance(table, dict):
            _check_upstream(table, values, path, errors, folder)
        if u is not None:
            out.append(u)
    return out, list(raw)


def _check_upstream(table: dict[str, Any], values: dict[str, Any], path: Path, errors: _Errors,
                    folder: str = "") -> None:
    if ("servers" in table) == ("handler" in table):
        got = "both" if "servers" in table else "neither"
        errors.add(path, f"expected exactly one of servers or handler, got {got}")
    executor = values.get("executor")  # None: wrong, and already reported
    if executor == "process" and "handler" not in table:
        errors.add((*path, "executor"), 'expected "inline" for an upstream without a handler, got "process"')
    interface = values.get("interface")
    _check_interface(table, interface, executor, path, errors)
    if values.get("handler") is not None:
        _check_handler(values["handler"], executor, (*path, "handler"), errors, interface, folder)
    _check_upstream_tls(table, values, path, errors)


def _check_interface(table: dict[str, Any], interface: str | None, executor: str | None, path: Path,
                     errors: _Errors) -> None:
    """An application interface needs a handler; each interface's own keys need it."""
    if interface is None:
        return  # wrong, and already reported
    if interface != "aiohttp":
        if "handler" not in table:
            errors.add((*path, "interface"), f'expected "aiohttp" for an upstream without a handler, '
                                             f'got "{interface}"')
        elif executor == "process":
            errors.add((*path, "executor"), f'expected "inline" for interface = "{interface}" (the '
                                            'application runs in the gateway), got "process"')
    for key, wanted in (("lifespan", "asgi"), ("threads", "wsgi")):
        if key in table and interface != wanted:
            errors.add((*path, key), f'expected an upstream with interface = "{wanted}", got '
                                     f'interface = "{interface}"')


# the keys of an upstream's https:// servers (gatewayd.upstreams.tls reads their files)
TLS_KEYS = ("tls_verify", "tls_ca", "tls_server_name", "tls_client_cert", "tls_client_key")


def _check_upstream_tls(table: dict[str, Any], values: dict[str, Any], path: Path, errors: _Errors) -> None:
    """A TLS key needs an https:// server to apply to (written for clear-text servers it
    would encrypt nothing: an error, not a key silently ignored); a client certificate
    needs its key and the other way round."""
    given = [key for key in TLS_KEYS if key in table]
    if not given:
        return
    servers = values.get("servers")
    if "servers" in table and servers is None:
        return  # servers is wrong, and already reported
    if servers is None:
        for key in given:
            errors.add((*path, key), "expected an upstream with https:// servers, got a handler")
    elif not any(s.tls for s in servers):
        for key in given:
            errors.add((*path, key), "expected an upstream with https:// servers, got only http:// "
                                     "ones (nothing would be encrypted)")
    for key, other in (("tls_client_cert", "tls_client_key"), ("tls_client_key", "tls_client_cert")):
        if key in table and other not in table:
            errors.add((*path, key), f"expected {other} beside it (mutual TLS needs both), got none")


def _check_handler(handler: str, executor: str | None, path: Path, errors: _Errors,
                   interface: str | None = "aiohttp", folder: str = "") -> None:
    got = k.shown(handler)
    try:
        obj = resolve(handler, folder)
    except (Exception, SystemExit) as exc:  # an operator's module may fail in any way
        reason = _one_line(f"{type(exc).__name__}: {exc}")
        errors.add(path, f'expected an importable "module:callable", got {got} ({reason})')
        return
    if not callable(obj):
        errors.add(path, f"expected a callable, got {got} (a {type(obj).__name__})")
        return
    function = inspect.unwrap(obj)
    if not (inspect.isfunction(function) or inspect.ismethod(function)):
        return  # a class or a callable object: nothing to tell before it runs
    is_async = inspect.iscoroutinefunction(function)
    if interface == "asgi" and not is_async:
        errors.add(path, f"expected an ASGI 3 application (an async callable: async def app(scope, "
                         f"receive, send)), got {got} (a plain function)")
    elif interface == "wsgi" and is_async:
        errors.add(path, f"expected a WSGI application (a plain callable: def app(environ, "
                         f"start_response)), got {got} (an async function)")
    elif interface != "aiohttp":
        return
    elif executor == "inline" and not is_async:
        errors.add(
            path,
            f'expected an async function for executor = "inline", got {got} (a plain function; '
            'executor = "process" runs those)',
        )
    elif executor == "process" and is_async:
        errors.add(path, f'expected a plain function for executor = "process", got {got} (an async function)')


def _routes(data: dict[str, Any], upstream_names: list[str] | None, errors: _Errors,
            pooled: dict[str, str]) -> list[RouteConfig]:
    raw = data.get("routes")
    if raw is None:
        errors.add(("routes",), "missing; expected one or more [[routes]] tables")
        return []
    if not isinstance(raw, list) or not raw:
        errors.add(("routes",), f"expected one or more [[routes]] tables, got {k.shown(raw)}")
        return []
    out = []
    names: dict[str, int] = {}
    matches: dict[tuple[str | None, str], int] = {}
    for i, table in enumerate(raw):
        r, values = _section(RouteConfig, table, ("routes", i), errors)
        name = values.get("name")
        if name in names:
            errors.add(
                ("routes", i, "name"), f"expected a unique name, got {k.shown(name)} (also routes[{names[name]}])"
            )
        elif name is not None:
            names[name] = i
        if "host" in values and "path_prefix" in values:
            match = (values["host"], values["path_prefix"])
            if match in matches:
                host = "any host" if match[0] is None else f"host {k.shown(match[0])}"
                errors.add(
                    ("routes", i, "path_prefix"),
                    f"expected a host and path_prefix no other route has, got {k.shown(match[1])} "
                    f"on {host} (also routes[{matches[match]}])",
                )
            matches.setdefault(match, i)
        upstream = values.get("upstream")
        if upstream is not None and upstream_names is not None and upstream not in upstream_names:
            known = ", ".join(toml_key(n) for n in upstream_names) or "none defined"
            errors.add(("routes", i, "upstream"), f"expected a key of [upstreams] ({known}), got {k.shown(upstream)}")
        if values.get("websocket") and upstream in pooled:
            errors.add(("routes", i, "websocket"),
                       f"expected false for upstream {k.shown(upstream)} ({pooled[upstream]} cannot "
                       "carry a WebSocket), got true")
        if r is not None:
            out.append(r)
    return out


def _check_tls(server: ServerConfig, tls: TlsConfig, filename: str, errors: _Errors) -> None:
    """A TLS listener has certificates, and every certificate loads (its files are read
    here, so a reload or ``--check`` refuses one that would fail to load)."""
    for i, entry in enumerate(server.listen):
        if entry.tls and not tls.certificates:
            errors.add(("server", "listen", i, "tls"),
                       "expected [[tls.certificates]] for a TLS listener, got none")
    folder = pathlib.Path(filename).resolve().parent
    for i, c in enumerate(tls.certificates):
        try:
            load_certificate(c.cert, folder / c.cert, folder / c.key, c.hosts,
                             tls.min_version, tls.session_tickets)
        except CertificateProblem as problem:
            errors.add(("tls", "certificates", i, problem.key), str(problem))


def _toml_error(exc: tomllib.TOMLDecodeError, text: str, filename: str) -> ConfigError:
    m = re.search(r"\(at line (\d+), column \d+\)$", str(exc))
    # "at end of document": the last line with something on it
    line = int(m.group(1)) if m else text.rstrip().count("\n") + 1
    return ConfigError([f"{filename}:{line}: toml: {_one_line(str(exc))}"])


def _check_top(data: dict[str, Any], errors: _Errors) -> None:
    for key, value in data.items():
        if key in _TOP:
            continue
        owner = next((name for name, cls in SECTIONS.items() if key in {f.name for f in settings_of(cls)}), None)
        if owner is not None and not isinstance(value, dict):
            errors.add((key,), f'unknown key; did you mean "{owner}.{key}" (under [{owner}])?')
        else:
            kind = "section" if isinstance(value, dict) else "key"
            errors.add((key,), _unknown_key(key, list(_TOP)).replace("unknown key", f"unknown {kind}"))


def parse(text: str, filename: str) -> Config:
    """Validate a TOML text; raise ``ConfigError`` listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(exc, text, filename) from None
    except RecursionError:
        raise ConfigError([f"{filename}:1: toml: arrays or tables nested too deeply"]) from None
    errors = _Errors(filename, Locator(text))
    _check_top(data, errors)
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        sections[name], _ = _section(cls, data.get(name, {}), (name,), errors)
    upstreams, upstream_names = _upstreams(data, errors, os.path.dirname(os.path.realpath(filename)))
    # upstreams that cannot carry a WebSocket, and why
    pooled = {u.name: "a function in a process pool" if u.executor == "process" else "a WSGI application"
              for u in upstreams
              if u.servers is None and (u.executor == "process" or u.interface == "wsgi")}
    routes = _routes(data, upstream_names, errors, pooled)
    server, metrics = sections["server"], sections["metrics"]
    if server is not None and metrics is not None and metrics.listen in server.addresses:
        errors.add(("metrics", "listen"), f"expected an address not in server.listen, got {k.shown(metrics.listen)}")
    if server is not None and sections["tls"] is not None:
        _check_tls(server, sections["tls"], filename, errors)
    if errors.found:
        raise ConfigError(errors.sorted())
    return Config(path=filename, upstreams=tuple(upstreams), routes=tuple(routes), **sections)


def load(path: str) -> Config:
    """Read and validate the file at ``path``."""
    return parse(read_text(path), path)


def read_text(path: str) -> str:
    """The text of the file at ``path``, as ``load`` reads it (what a master hands its
    workers to parse, byte for byte); ConfigError when it cannot be read."""
    try:
        with open(path, "rb") as fh:  # as tomllib.load: line breaks are TOML's to read
            data = fh.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{path}:{line}: toml: not UTF-8 ({exc.reason} at byte {exc.start})"]) from None
    return text


def _dump_upstream(upstream: UpstreamConfig) -> dict[str, Any]:
    out = _dump_section(upstream)
    for f in settings_of(UpstreamConfig):
        if not applies(upstream, f.name) and getattr(upstream, f.name) == f.default:
            out.pop(f.name, None)
    return out


def _dump_section(obj: Any) -> dict[str, Any]:
    out = {}
    for f in settings_of(type(obj)):
        value = getattr(obj, f.name)
        if value is not None:  # TOML has no null: an unset optional key is left out
            out[f.name] = f.metadata["kind"].dump(value)
    return out


# The upstream keys that mean something for one kind of upstream only: HTTP servers'
# (the TLS keys: https:// servers'), a handler's, and a process pool's. ``dump`` leaves
# them out of the other kinds.
HTTP_ONLY = frozenset((
    "servers", "connect_timeout", "read_timeout", "max_connections", "keepalive_timeout",
    "balance", "max_fails", "fail_timeout", "fail_on_5xx", "fail_on", "retries",
    "health_check", "dns_ttl", *TLS_KEYS,
))
HANDLER_ONLY = frozenset(("handler", "executor", "interface"))
PROCESS_ONLY = frozenset(("processes",))
INTERFACE_ONLY = {"lifespan": "asgi", "threads": "wsgi"}  # a key of one interface only


def applies(upstream: UpstreamConfig, key: str) -> bool:
    """Whether ``key`` means anything for ``upstream``'s kind."""
    if key in TLS_KEYS:
        return any(s.tls for s in upstream.servers or ())
    if key in HTTP_ONLY:
        return upstream.servers is not None
    if key in HANDLER_ONLY:
        return upstream.handler is not None
    if key in PROCESS_ONLY:
        return upstream.executor == "process"
    if key in INTERFACE_ONLY:
        return upstream.handler is not None and upstream.interface == INTERFACE_ONLY[key]
    return True


def dump(config: Config) -> str:
    """The configuration as TOML, every default filled in; an upstream's keys that do
    not apply to its kind are left out, unless the file gave them another value than
    the default (printed, they read back as the same configuration)."""
    doc: dict[str, Any] = {name: _dump_section(getattr(config, name)) for name in SECTIONS}
    doc["upstreams"] = {u.name: _dump_upstream(u) for u in config.upstreams}
    doc["routes"] = [_dump_section(r) for r in config.routes]
    return tomli_w.dumps(doc)
