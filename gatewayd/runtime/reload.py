"""The reload policy, once for one process and for the master of workers.

A reload re-reads the file, refuses what only a restart can change, then has
the new generation built beside the running one (``prepare``) and swapped in
(``commit``) or dropped (``abort``); how those three are done is all that
differs between one process (its own runtime) and a master (every worker, over
IPC). The outcome is the control answer, and is kept as ``last_reload``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Literal, NotRequired, Protocol, TypedDict

from ..config.diff import diff, restart_only_changes
from ..config.loader import ConfigError, parse, read_text
from ..config.settings import Config, worker_count

log = logging.getLogger("gatewayd")


class LastReload(TypedDict):
    """The outcome of the last reload that was not a dry run (the snapshot's ``last_reload``)."""

    ok: bool
    time: float
    error: str | None
    changes: list[str]


class ReloadDone(TypedDict):
    """The reload command's answer when the reload went through (or would, dry run)."""

    ok: Literal[True]
    generation: int
    changes: list[str]
    dry_run: NotRequired[bool]  # true: validated and compared, nothing changed


class ReloadRefused(TypedDict):
    ok: Literal[False]
    error: str


class Reloadable(Protocol):
    """What a reload needs of the process it changes (a ``Runtime``, or the master)."""

    @property
    def config(self) -> Config:
        """The configuration in force."""

    @property
    def overrides(self) -> Mapping[str, Mapping[str, int]]:
        """The limits set by hand in force (runtime.limits), which a reload ends."""

    generation: int  # 1 at start, one more for each reload committed
    last_reload: LastReload | None
    @property
    def several(self) -> bool:
        """Whether this process is the master of workers (workers > 1)."""

    async def prepare(self, new: Config, text: str) -> str | None:
        """Build the new generation beside the running one; why it cannot be, or None."""
    async def commit(self, generation: int) -> None:
        """Swap the prepared generation in as ``generation``."""
    async def abort(self) -> None:
        """Undo what ``prepare`` built."""


def refused_changes(old: Config, new: Config, several: bool) -> list[str]:
    """Key paths of the changes a reload cannot apply (restart needed)."""
    refused = restart_only_changes(old, new)
    # one process and a master with workers are different programs: changing which
    # one runs takes a restart (a change between two worker counts does not)
    if new.server.workers != old.server.workers and (worker_count(new) > 1) != several:
        refused.append("server.workers (to 1: the single-process mode)" if several
                       else "server.workers (from one process to several)")
    return refused


async def reload(target: Reloadable, dry_run: bool) -> ReloadDone | ReloadRefused:
    """Re-read ``target``'s file, check, build, swap. The outcome as a control answer."""
    path = target.config.path
    try:
        text = read_text(path)
        new = parse(text, path)
    except ConfigError as exc:
        return _failed(target, "\n".join(exc.errors), dry_run)
    # what changes is what is in force -> what the file says: limits set by hand included
    changes = diff(target.config, new, target.overrides)
    refused = refused_changes(target.config, new, target.several)
    if refused:
        return _failed(target, f"{path}: " + "; ".join(
            f"{k} cannot change on reload (restart needed)" for k in refused), dry_run)
    if dry_run:
        return {"ok": True, "dry_run": True, "generation": target.generation, "changes": changes}
    error = await target.prepare(new, text)
    if error is not None:
        await target.abort()
        # in the file's words: a located error (file:line:, a server name) is kept as is
        return _failed(target, error if error.startswith(f"{path}:") else f"{path}: {error}", False)
    target.generation += 1
    await target.commit(target.generation)
    target.last_reload = {"ok": True, "time": time.time(), "error": None, "changes": changes}
    log.info("reloaded %s: generation %d; %s", path, target.generation, "; ".join(changes) or "no changes")
    return {"ok": True, "generation": target.generation, "changes": changes}


def _failed(target: Reloadable, error: str, dry_run: bool) -> ReloadRefused:
    if not dry_run:
        target.last_reload = {"ok": False, "time": time.time(), "error": error, "changes": []}
        log.error("reload failed, configuration unchanged: %s", error)
    return {"ok": False, "error": error}
