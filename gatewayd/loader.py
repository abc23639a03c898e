"""Reads a TOML file into a validated ``Config``, or every error in it at once.

Errors read ``file:line: key.path: what was expected, got what``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from typing import Any

import tomli_w

from . import kinds as k
from .config import SECTIONS, Config, RouteConfig, UpstreamConfig, settings_of
from .importing import resolve
from .tomlpos import Locator, Path, format_path


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class _Errors:
    def __init__(self, filename: str, locator: Locator) -> None:
        self.filename = filename
        self.locator = locator
        self.lines: list[str] = []

    def add(self, path: Path, message: str) -> None:
        self.lines.append(
            f"{self.filename}:{self.locator.line(path)}: {format_path(path)}: {message}"
        )


def _section(cls: type, table: Any, path: Path, errors: _Errors, **extra: Any) -> Any:
    if not isinstance(table, dict):
        errors.add(path, f"expected a table, got {k.shown(table)}")
        return None
    declared = {f.name: f for f in settings_of(cls)}
    values: dict[str, Any] = dict(extra)
    ok = True
    for key, raw in table.items():
        decl = declared.get(key)
        if decl is None:
            close = difflib.get_close_matches(key, declared, n=1)
            hint = f'did you mean "{close[0]}"?' if close else "expected one of " + ", ".join(declared)
            errors.add((*path, key), f"unknown key; {hint}")
            ok = False
            continue
        try:
            values[key] = decl.metadata["kind"].parse(raw)
        except k.Invalid as exc:
            errors.add((*path, key), str(exc))
            ok = False
    for name, decl in declared.items():
        if name not in table and decl.default is dataclasses.MISSING:
            errors.add((*path, name), f"missing; expected {decl.metadata['kind'].describe}")
            ok = False
    return cls(**values) if ok else None


def _check_upstream(u: UpstreamConfig, path: Path, errors: _Errors) -> None:
    if (u.servers is None) == (u.handler is None):
        got = "both" if u.servers is not None else "neither"
        errors.add(path, f"expected exactly one of servers or handler, got {got}")
    if u.executor == "process" and u.handler is None:
        errors.add((*path, "executor"), 'expected executor = "process" only with a handler')
    if u.handler is not None:
        try:
            obj = resolve(u.handler)
        except Exception as exc:  # an operator's module may fail in any way
            errors.add((*path, "handler"), f"cannot import {u.handler!r}: {exc}")
            return
        if not callable(obj):
            errors.add((*path, "handler"), f"expected a callable, got {type(obj).__name__}")


def parse(text: str, filename: str) -> Config:
    """Validate a TOML text; raise ``ConfigError`` listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)$", msg)
        line = m.group(1) if m else "1"
        raise ConfigError([f"{filename}:{line}: toml: {msg}"]) from None
    locator = Locator(text)
    errors = _Errors(filename, locator)
    values: dict[str, Any] = {}

    for key in data:
        if key not in (*SECTIONS, "upstreams", "routes"):
            close = difflib.get_close_matches(key, [*SECTIONS, "upstreams", "routes"], n=1)
            hint = f'did you mean "{close[0]}"?' if close else "expected a section"
            errors.add((key,), f"unknown key; {hint}")

    for name, cls in SECTIONS.items():
        parsed = _section(cls, data.get(name, {}), (name,), errors)
        if parsed is not None:
            values[name] = parsed

    upstreams: list[UpstreamConfig] = []
    raw_upstreams = data.get("upstreams", {})
    if not isinstance(raw_upstreams, dict):
        errors.add(("upstreams",), f"expected tables [upstreams.NAME], got {k.shown(raw_upstreams)}")
        raw_upstreams = {}
    for name, table in raw_upstreams.items():
        path: Path = ("upstreams", name)
        try:
            k.Name().parse(name)
        except k.Invalid as exc:
            errors.add(path, f"upstream name {exc}")
            continue
        u = _section(UpstreamConfig, table, path, errors, name=name)
        if u is not None:
            _check_upstream(u, path, errors)
            upstreams.append(u)

    routes: list[RouteConfig] = []
    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list) or not raw_routes:
        errors.add(("routes",), f"expected one or more [[routes]] tables, got {k.shown(raw_routes)}")
        raw_routes = []
    seen_names: dict[str, int] = {}
    seen_matches: dict[tuple[str | None, str], int] = {}
    upstream_names = set(raw_upstreams)
    for i, table in enumerate(raw_routes):
        r = _section(RouteConfig, table, ("routes", i), errors)
        if r is None:
            continue
        if r.name in seen_names:
            errors.add(("routes", i, "name"),
                       f'expected a unique name, got "{r.name}" (also routes[{seen_names[r.name]}])')
        seen_names.setdefault(r.name, i)
        match = (r.host, r.path_prefix)
        if match in seen_matches:
            errors.add(("routes", i, "path_prefix"),
                       f"expected a distinct host and path_prefix, got the same as "
                       f"routes[{seen_matches[match]}]")
        seen_matches.setdefault(match, i)
        if r.upstream not in upstream_names:
            known = ", ".join(sorted(upstream_names)) or "none"
            errors.add(("routes", i, "upstream"),
                       f'expected a key of [upstreams] ({known}), got "{r.upstream}"')
        routes.append(r)

    if errors.lines:
        raise ConfigError(errors.lines)
    return Config(path=filename, upstreams=tuple(upstreams), routes=tuple(routes), **values)


def load(path: str) -> Config:
    """Read and validate the file at ``path``."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}:1: toml: not UTF-8 ({exc.reason})"]) from None
    return parse(text, path)


def _dump_section(obj: Any) -> dict[str, Any]:
    out = {}
    for f in settings_of(type(obj)):
        value = getattr(obj, f.name)
        if value is not None:  # TOML has no null: an unset optional key is left out
            out[f.name] = f.metadata["kind"].dump(value)
    return out


def dump(config: Config) -> str:
    """The configuration as TOML, every default filled in."""
    doc: dict[str, Any] = {name: _dump_section(getattr(config, name)) for name in SECTIONS}
    doc["upstreams"] = {u.name: _dump_section(u) for u in config.upstreams}
    doc["routes"] = [_dump_section(r) for r in config.routes]
    return tomli_w.dumps(doc)
