"""The master of ``workers = N``: supervises worker processes and is the
gateway's one face (control socket, metrics listener, signals).

Workers bind the listen addresses themselves with SO_REUSEPORT (the kernel
spreads connections evenly); the master never touches client traffic. A worker
that dies is replaced with backoff; one that fails at boot stops the gateway
(no crash loop); one whose figures stop arriving for ``worker_timeout`` is
killed and replaced. Route limits and max_connections are gateway-wide and
divided among the live workers, re-divided whenever that set changes.

The control commands, the reload policy and the signal loop are the ones one
process uses (controller.py, runtime/reload.py, lifecycle.py): the master is
their backend and role, doing over IPC to every worker what one process does to
its own runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..config.loader import ConfigError, parse, read_text
from ..config.settings import Config, worker_count
from ..control.export import ProcessExport
from ..control.merge import Retired
from ..control.protocol import ClientRow, RuntimeInfo, ServerStateAnswer, Snapshot, Waiter
from ..control.snapshot import present, retire, route_order_from
from ..exits import EXIT_BOOT, EXIT_CONFIG
from ..proxy.ratelimit import RateTable
from ..runtime.limits import Overrides
from ..runtime.reload import LastReload
from ..stats.process import raise_fd_limit, rss_bytes
from ..upstreams.state import COMMAND_STATES, check_state
from . import lifecycle
from .controller import GatewayController
from .ipc import Answer, Channel, Command, ServerState, ToMaster
from .startup import setup_logging

log = logging.getLogger("gatewayd")

BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0
STABLE_AFTER = 30.0  # a worker that ran this long resets its slot's backoff


class WorkerHandle:
    """The master's view of one worker process."""

    def __init__(self, slot: int, proc: asyncio.subprocess.Process, channel: Channel) -> None:
        self.slot = slot
        self.proc = proc
        self.pid = proc.pid
        self.channel = channel
        self.ready = asyncio.get_running_loop().create_future()
        self.boot_error: str | None = None
        self.export: ProcessExport | None = None
        self.last_seen = time.monotonic()
        self.started = time.monotonic()
        self.calls: dict[int, asyncio.Future[Answer]] = {}
        self.retiring = False
        self.reader: asyncio.Task[None] | None = None


class Master:
    """The workers' supervisor: the control commands' backend (controller.Backend)
    and the gateway's role (lifecycle.Role) when ``workers`` > 1."""

    several = True

    def __init__(self, config: Config, text: str) -> None:
        self.config = config
        self.text = text  # exactly what was validated: workers parse the same bytes
        self.generation = 1
        self.last_reload: LastReload | None = None
        self.started = time.time()
        self.overrides = Overrides()
        self.workers: dict[int, WorkerHandle] = {}  # slot -> handle
        self.retired: Retired = {}
        self.draining = False
        self.fatal: str | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._backoff: dict[int, float] = {}
        self._stop: Callable[[], None] = lambda: None  # lifecycle's: stop as SIGTERM does
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._next: tuple[Config, str] | None = None  # a reload prepared in every worker
        # server_state set by hand: (upstream, server) -> (command, upstream config then)
        self.server_states: dict[tuple[str, str], tuple[ServerState, Any]] = {}
        # the keys of the routes' rate limits, one table for every worker (and every
        # worker that replaces one): a key's allowance is the gateway's
        self.rate_table = RateTable.shared()
        self.controller = GatewayController(self, self._lock)

    # -- workers -------------------------------------------------------------------
    async def spawn(self, slot: int) -> WorkerHandle:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        table = self.rate_table
        assert table.fd is not None
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gatewayd.process.worker", "--fd", str(child.fileno()),
                "--rate-fd", str(table.fd),
                pass_fds=(child.fileno(), table.fd), stdin=asyncio.subprocess.DEVNULL,
                # every worker hashes a rate-limit key to the same slot (proxy/ratelimit.py)
                env={**os.environ, "PYTHONHASHSEED": str(table.seed)},
            )
        finally:
            child.close()
        channel = await Channel.open(parent)
        handle = WorkerHandle(slot, proc, channel)
        self.workers[slot] = handle
        # its place among all configured workers until it is ready and shares are redone
        channel.send({"t": "start", "text": self.text, "path": self.config.path,
                      "index": slot, "count": max(slot + 1, worker_count(self.config)),
                      "generation": self.generation, "overrides": self.overrides})
        handle.reader = self._spawn_task(self._read(handle))
        self._spawn_task(self._reap(handle))
        return handle

    def live(self) -> list[WorkerHandle]:
        """Workers that are ready and not on their way out, in slot order."""
        return [h for _, h in sorted(self.workers.items())
                if h.ready.done() and h.ready.result() is True and not h.retiring
                and h.proc.returncode is None]

    async def _read(self, h: WorkerHandle) -> None:
        while True:
            msg: ToMaster | None = await h.channel.receive()
            if msg is None:
                return
            h.last_seen = time.monotonic()
            if msg["t"] == "stats":
                h.export = msg["export"]
            elif msg["t"] == "reply":
                fut = h.calls.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg["answer"])
            elif msg["t"] == "ready":
                if not h.ready.done():
                    h.ready.set_result(True)
                log.info("worker %d (pid %d) ready", h.slot, h.pid)
                await self.reshare()
                self._spawn_task(self._restore_server_states(h))
            elif msg["t"] == "boot_error":
                h.boot_error = msg["error"]

    async def _reap(self, h: WorkerHandle) -> None:
        code = await h.proc.wait()
        if h.reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(h.reader, 1.0)
        if not h.ready.done():
            h.ready.set_result(False)
        for fut in h.calls.values():
            if not fut.done():
                fut.set_result({"ok": False, "error": f"worker {h.pid} exited"})
        h.channel.close()
        if h.export is not None:
            retire(self.retired, h.export)
        if self.workers.get(h.slot) is h:
            del self.workers[h.slot]
        if h.retiring or self.draining:
            log.info("worker %d (pid %d) exited (%s)", h.slot, h.pid, code)
            await self.reshare()
            return
        if h.boot_error is not None or code == EXIT_BOOT:
            self.fatal = h.boot_error or f"worker exited with status {code} at boot"
            log.error("worker %d failed to start: %s; stopping", h.slot, self.fatal)
            self._stop()
            return
        log.error("worker %d (pid %d) died (status %s); replacing it", h.slot, h.pid, code)
        await self.reshare()
        ran = time.monotonic() - h.started
        delay = BACKOFF_MIN if ran > STABLE_AFTER else min(
            BACKOFF_MAX, self._backoff.get(h.slot, BACKOFF_MIN / 2) * 2)
        self._backoff[h.slot] = delay
        await asyncio.sleep(delay)
        if not self.draining and h.slot not in self.workers and h.slot < worker_count(self.config):
            async with self._lock:
                await self.spawn(h.slot)

    async def reshare(self) -> None:
        """Tell each live worker its index among the live ones: limits re-divide."""
        live = self.live()
        for i, h in enumerate(live):
            self._spawn_task(self.call(h, {"cmd": "share", "index": i, "count": len(live)}))

    async def call(self, h: WorkerHandle, command: Command, timeout: float = 30.0) -> Answer:
        ident = next(self._ids)
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        h.calls[ident] = fut
        h.channel.send({"t": "call", "id": ident, "command": command})
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return {"ok": False, "error": f"worker {h.pid} did not answer {command['cmd']} in {timeout}s"}
        finally:
            h.calls.pop(ident, None)

    async def call_all(self, command: Command) -> list[Answer]:
        return list(await asyncio.gather(*(self.call(h, command) for h in self.live())))

    @staticmethod
    def errors(answers: list[Answer]) -> list[str]:
        """The workers' errors, each said once, sorted."""
        return sorted({a.get("error", "") for a in answers if not a["ok"]})

    async def _watch(self) -> None:
        """Kill a worker whose loop is stuck (no figures for ``worker_timeout``; workers
        push theirs at least every quarter of it)."""
        while True:
            timeout = self.config.server.worker_timeout  # the current one: a reload may change it
            await asyncio.sleep(min(1.0, timeout / 4))
            now = time.monotonic()
            for h in list(self.workers.values()):
                if h.ready.done() and h.proc.returncode is None and not h.retiring \
                        and now - h.last_seen > self.config.server.worker_timeout:
                    log.error("worker %d (pid %d) silent for %.1f s; killing it", h.slot, h.pid,
                              now - h.last_seen)
                    with contextlib.suppress(ProcessLookupError):
                        h.proc.kill()

    def _spawn_task(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- the control commands' backend (controller.Backend) --------------------------
    def snapshot(self) -> Snapshot:
        exports = [h.export for h in sorted(self.workers.values(), key=lambda h: h.slot)
                   if h.export is not None and h.proc.returncode is None]
        info: RuntimeInfo = {
            "version": __version__, "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "config_path": os.path.abspath(self.config.path),
            "generation": self.generation, "last_reload": self.last_reload,
            "draining": self.draining, "listen": list(self.config.server.addresses),
            "master_rss_bytes": rss_bytes(), "workers_configured": worker_count(self.config),
        }
        return present(info, exports, route_order_from(self.config, self.overrides), self.retired)

    async def prepare(self, new: Config, text: str) -> str | None:
        errors = self.errors(await self.call_all({"cmd": "prepare", "text": text, "path": new.path}))
        if errors:
            return "; ".join(errors)
        self._next = (new, text)
        return None

    async def commit(self, generation: int) -> None:
        assert self._next is not None
        (new, text), self._next = self._next, None
        await self.call_all({"cmd": "commit", "generation": generation})
        self.config, self.text = new, text
        self.overrides.clear()
        logging.getLogger("gatewayd").setLevel(new.log.level.upper())
        await self._resize()

    async def abort(self) -> None:
        self._next = None
        await self.call_all({"cmd": "abort"})

    async def _resize(self) -> None:
        """Start or stop workers to match ``workers`` after a reload."""
        want = worker_count(self.config)
        for slot in range(want):
            if slot not in self.workers:
                await self.spawn(slot)
        for slot, h in list(self.workers.items()):
            if slot >= want and not h.retiring:
                h.retiring = True
                with contextlib.suppress(ProcessLookupError):
                    h.proc.send_signal(signal.SIGTERM)
        await self.reshare()

    async def set_limit(self, route: str, max_concurrency: int | None,
                        max_queue: int | None) -> str | None:
        self.overrides.set(route, max_concurrency, max_queue)
        answers = await self.call_all({"cmd": "set_limit", "route": route,
                                       "max_concurrency": max_concurrency, "max_queue": max_queue})
        errors = [a.get("error", "") for a in answers if not a["ok"]]
        return "; ".join(errors) if errors else None

    async def clients(self, route: str) -> list[ClientRow]:
        answers = await self.call_all({"cmd": "clients", "route": route})
        return [row for a in answers if a["ok"] for row in a.get("clients", [])]

    async def waiters(self, route: str) -> list[Waiter]:
        answers = await self.call_all({"cmd": "queue", "route": route})
        waiters = [w for a in answers if a["ok"] for w in a.get("waiters", [])]
        waiters.sort(key=lambda w: -w["wait_ms"])
        return waiters

    async def server_state(self, upstream: str, server: str, state: str) -> ServerStateAnswer:
        """Every worker sets the server; a worker started later (a replacement) gets
        the same state while the upstream's configuration is the one it was set under."""
        error = check_state(state)
        if error is not None:
            return {"ok": False, "error": error}
        command: ServerState = {"cmd": "server_state", "upstream": upstream, "server": server,
                                "state": state}
        answers = await self.call_all(command)
        errors = self.errors(answers)
        if errors or not answers:
            return {"ok": False, "error": "; ".join(errors) or "no live worker"}
        if COMMAND_STATES[state]:
            self.server_states.pop((upstream, server), None)  # a new worker starts with it up
        else:
            self.server_states[(upstream, server)] = (command, self.config.upstream(upstream))
        done = answers[0]  # every worker set the same servers: the first one's answer
        return {"ok": True, "upstream": upstream, "servers": done.get("servers", []),
                "state": done.get("state", state)}

    async def _restore_server_states(self, h: WorkerHandle) -> None:
        for command, config in list(self.server_states.values()):
            current = next((u for u in self.config.upstreams if u.name == command["upstream"]), None)
            if current == config:
                await self.call(h, command)

    # -- start and stop (lifecycle.Role) ---------------------------------------------
    @property
    def failure(self) -> str | None:
        return self.fatal

    async def start(self, stop: Callable[[], None]) -> bool:
        self._stop = stop
        n = worker_count(self.config)
        async with self._lock:
            first = [await self.spawn(slot) for slot in range(n)]
        ok = await asyncio.gather(*(h.ready for h in first))
        if not all(ok):
            await asyncio.sleep(0)  # let the reapers record why
            reason = next((h.boot_error for h in first if h.boot_error), None) or self.fatal
            log.error("%s", reason or "a worker failed to start")
            await self._stop_workers(5.0)
            return False
        return True

    async def undo(self) -> None:
        await self._stop_workers(5.0)

    def ready(self) -> bool:
        return not self.draining and bool(self.live())

    def serving(self) -> None:
        self._watcher = self._spawn_task(self._watch())

    def banner(self) -> str:
        return (f"gatewayd {__version__} master serving on {', '.join(self.config.server.addresses)} "
                f"with {worker_count(self.config)} workers (control {self.config.socket_path})")

    def reopen_logs(self) -> None:
        for h in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                h.proc.send_signal(signal.SIGUSR1)

    async def drain(self) -> None:
        self.draining = True
        if self._watcher is not None:
            self._watcher.cancel()
        await self._stop_workers(self.config.server.shutdown_timeout + 5.0)

    async def _stop_workers(self, timeout: float) -> None:
        self.draining = True
        handles = list(self.workers.values())
        for h in handles:
            with contextlib.suppress(ProcessLookupError):
                h.proc.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(h.proc.wait()) for h in handles]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=timeout)
            for h in handles:
                if h.proc.returncode is None:
                    log.error("worker %d (pid %d) did not stop in time; killing it", h.slot, h.pid)
                    with contextlib.suppress(ProcessLookupError):
                        h.proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for task in list(self._tasks):
            task.cancel()


def run(config: Config) -> int:
    """Run as master of ``workers`` processes; the exit status."""
    setup_logging(config.log.level)
    raise_fd_limit()
    try:
        text = read_text(config.path)
        config = parse(text, config.path)  # what the workers will parse, byte for byte
    except ConfigError as exc:  # the file changed since it was checked
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    with asyncio.Runner() as runner:
        master = Master(config, text)
        return runner.run(lifecycle.run(master, master.controller))
