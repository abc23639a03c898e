"""What a reload changes, in words an operator can read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .settings import SECTIONS, Config, restart_only, settings_of

# (section, key) of the settings that only a restart can change: those declared
# ``reload=RELOAD_RESTART`` (the man page says so for each).
RESTART_ONLY: tuple[tuple[str, str], ...] = tuple(
    (section, f.name) for section, cls in SECTIONS.items() for f in settings_of(cls) if restart_only(f)
)


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in settings_of(type(obj))}


def _changed(old: Any, new: Any, live: Mapping[str, int] | None = None) -> list[str]:
    """``key old -> new`` for each setting that changes; a value in ``live`` (a limit
    set by hand, which the reload ends) is the one in force, said whatever the file."""
    a, b = _fields(old), _fields(new)
    live = live or {}
    return [f"{k} {live[k]} (set_limit) -> {_show(b[k])}" if k in live else f"{k} {_show(a[k])} -> {_show(b[k])}"
            for k in a if k in live or a[k] != b[k]]


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(getattr(v, "url", str(v)) for v in value) + "]"
    return str(value)


def diff(old: Config, new: Config, overrides: Mapping[str, Mapping[str, int]] | None = None) -> list[str]:
    """One line per change: routes added/removed/changed, upstreams, sections.

    ``overrides`` are the limits set by hand in force (route name -> key -> value,
    gateway-wide): a reload ends them, so each is a change from its live value
    (``max_concurrency 300 (set_limit) -> 150``), even where the file did not change."""
    overrides = overrides or {}
    out: list[str] = []
    for name in SECTIONS:
        for change in _changed(getattr(old, name), getattr(new, name)):
            out.append(f"{name}: {change}")
    old_u = {u.name: u for u in old.upstreams}
    new_u = {u.name: u for u in new.upstreams}
    for name in new_u.keys() - old_u.keys():
        out.append(f"upstream {name}: added")
    for name in old_u.keys() - new_u.keys():
        out.append(f"upstream {name}: removed")
    for name in sorted(old_u.keys() & new_u.keys()):
        changes = _changed(old_u[name], new_u[name])
        if changes:
            out.append(f"upstream {name}: " + ", ".join(changes))
    old_r = {r.name: r for r in old.routes}
    new_r = {r.name: r for r in new.routes}
    for r in new.routes:
        if r.name not in old_r:
            out.append(f"route {r.name}: added ({r.path_prefix} -> {r.upstream})")
    for r in old.routes:
        if r.name not in new_r:
            out.append(f"route {r.name}: removed")
    for r in new.routes:
        if r.name in old_r:
            changes = _changed(old_r[r.name], r, overrides.get(r.name))
            if changes:
                out.append(f"route {r.name}: " + ", ".join(changes))
    return out


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """Key paths of settings that changed but need a restart."""
    return [f"{s}.{k}" for s, k in RESTART_ONLY
            if getattr(getattr(old, s), k) != getattr(getattr(new, s), k)]
