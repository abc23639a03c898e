"""The master of ``workers = N``: supervises worker processes and is the
gateway's one face (control socket, metrics listener, signals).

Like gunicorn's arbiter: signal handlers only queue; one loop acts. Workers
bind the listen addresses themselves with SO_REUSEPORT (the kernel spreads
connections evenly); the master never touches client traffic. A worker that
dies is replaced with backoff; one that fails at boot stops the gateway (no
crash loop); one whose figures stop arriving for ``worker_timeout`` is killed
and replaced. Route limits and max_connections are gateway-wide and divided
among the live workers, re-divided whenever that set changes.
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
from typing import Any

from .. import __version__
from ..config.diff import RESTART_ONLY, diff
from ..config.loader import ConfigError, parse
from ..config.settings import Config, worker_count
from ..control.prometheus import MetricsListener
from ..control.server import ControlError, ControlServer
from ..control.snapshot import present, retire, route_order_from
from ..stats.process import raise_fd_limit, rss_bytes
from ..upstreams.state import COMMAND_STATES, check_state
from . import notify
from .ipc import Channel
from .startup import ignore_late_signals, setup_logging

log = logging.getLogger("gatewayd")

EXIT_OK, EXIT_FAILURE = 0, 1
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
        self.export: dict[str, Any] | None = None
        self.last_seen = time.monotonic()
        self.started = time.monotonic()
        self.calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.retiring = False
        self.reader: asyncio.Task[None] | None = None


class Master:
    def __init__(self, config: Config, text: str) -> None:
        self.config = config
        self.text = text  # exactly what was validated: workers parse the same bytes
        self.generation = 1
        self.last_reload: dict[str, Any] | None = None
        self.started = time.time()
        self.overrides: dict[str, dict[str, int]] = {}
        self.workers: dict[int, WorkerHandle] = {}  # slot -> handle
        self.retired: dict[str, Any] = {}
        self.draining = False
        self.fatal: str | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._backoff: dict[int, float] = {}
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        # server_state set by hand: (upstream, server) -> (command, upstream config then)
        self.server_states: dict[tuple[str, str], tuple[dict[str, Any], Any]] = {}

    # -- workers -------------------------------------------------------------------
    async def spawn(self, slot: int) -> WorkerHandle:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gatewayd.process.worker", "--fd", str(child.fileno()),
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child.close()
        channel = await Channel.open(parent)
        handle = WorkerHandle(slot, proc, channel)
        self.workers[slot] = handle
        # its place among all configured workers until it is ready and shares are redone
        channel.send({"t": "start", "text": self.text, "path": self.config.path,
                      "index": slot, "count": max(slot + 1, worker_count(self.config)),
                      "generation": self.generation,
                      "overrides": self.overrides})
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
            msg = await h.channel.receive()
            if msg is None:
                return
            h.last_seen = time.monotonic()
            t = msg.get("t")
            if t == "stats":
                h.export = msg["export"]
            elif t == "reply":
                fut = h.calls.pop(msg.pop("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif t == "ready":
                if not h.ready.done():
                    h.ready.set_result(True)
                log.info("worker %d (pid %d) ready", h.slot, h.pid)
                await self.reshare()
                self._spawn_task(self._restore_server_states(h))
            elif t == "boot_error":
                h.boot_error = msg.get("error")

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
        if h.boot_error is not None or code == 3:
            self.fatal = h.boot_error or f"worker exited with status {code} at boot"
            log.error("worker %d failed to start: %s; stopping", h.slot, self.fatal)
            self._signals.put_nowait(signal.SIGTERM)
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

    async def call(self, h: WorkerHandle, msg: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        ident = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        h.calls[ident] = fut
        h.channel.send({"t": "call", "id": ident, **msg})
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return {"ok": False, "error": f"worker {h.pid} did not answer {msg['cmd']} in {timeout}s"}
        finally:
            h.calls.pop(ident, None)

    async def call_all(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.call(h, msg) for h in self.live())))

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

    # -- the controller (control socket) -------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        exports = [h.export for h in sorted(self.workers.values(), key=lambda h: h.slot)
                   if h.export is not None and h.proc.returncode is None]
        info = {
            "version": __version__, "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 3),
            "config_path": os.path.abspath(self.config.path),
            "generation": self.generation, "last_reload": self.last_reload,
            "draining": self.draining, "listen": list(self.config.server.listen),
            "master_rss_bytes": rss_bytes(), "workers_configured": worker_count(self.config),
        }
        return present(info, exports, route_order_from(self.config, self.overrides), self.retired)

    async def reload(self, dry_run: bool) -> dict[str, Any]:
        async with self._lock:
            return await self._reload(dry_run)

    async def _reload(self, dry_run: bool) -> dict[str, Any]:
        path = self.config.path
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            new = parse(text, path)
        except OSError as exc:
            return self._failed(f"{path}: cannot read: {exc.strerror}", dry_run)
        except ConfigError as exc:
            return self._failed("\n".join(exc.errors), dry_run)
        changes = diff(self.config, new)
        refused = [f"{s}.{k}" for s, k in RESTART_ONLY
                   if getattr(getattr(self.config, s), k) != getattr(getattr(new, s), k)]
        if new.server.workers != self.config.server.workers and worker_count(new) == 1:
            refused.append("server.workers (to 1: the single-process mode)")
        if refused:
            return self._failed(f"{path}: " + "; ".join(
                f"{k} cannot change on reload (restart needed)" for k in refused), dry_run)
        if dry_run:
            return {"ok": True, "dry_run": True, "generation": self.generation, "changes": changes}
        if not dry_run:
            notify.reloading()
        try:
            answers = await self.call_all({"cmd": "prepare", "text": text, "path": path})
            errors = sorted({a["error"] for a in answers if not a.get("ok")})
            if errors:
                await self.call_all({"cmd": "abort"})
                return self._failed(f"{path}: " + "; ".join(errors), False)
            self.generation += 1
            await self.call_all({"cmd": "commit", "generation": self.generation})
            self.config, self.text = new, text
            self.overrides.clear()
            logging.getLogger("gatewayd").setLevel(new.log.level.upper())
            await self._resize()
        finally:
            notify.ready()
        self.last_reload = {"ok": True, "time": time.time(), "error": None, "changes": changes}
        log.info("reloaded %s: generation %d; %s", path, self.generation, "; ".join(changes) or "no changes")
        return {"ok": True, "generation": self.generation, "changes": changes}

    def _failed(self, error: str, dry_run: bool) -> dict[str, Any]:
        if not dry_run:
            self.last_reload = {"ok": False, "time": time.time(), "error": error, "changes": []}
            log.error("reload failed, configuration unchanged: %s", error)
        return {"ok": False, "error": error}

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
                        max_queue: int | None) -> dict[str, Any]:
        if route not in {r.name for r in self.config.routes}:
            return {"ok": False, "error": f"no route {route!r}"}
        o = self.overrides.setdefault(route, {})
        if max_concurrency is not None:
            o["max_concurrency"] = max_concurrency
        if max_queue is not None:
            o["max_queue"] = max_queue
        answers = await self.call_all({"cmd": "set_limit", "route": route,
                                       "max_concurrency": max_concurrency, "max_queue": max_queue})
        errors = [a["error"] for a in answers if not a.get("ok")]
        if errors:
            return {"ok": False, "error": "; ".join(errors)}
        rc = self.config.route(route)
        mc = o.get("max_concurrency", rc.max_concurrency)
        mq = o.get("max_queue", rc.max_queue)
        log.info("set_limit %s: max_concurrency=%d max_queue=%d (until the next reload)", route, mc, mq)
        return {"ok": True, "route": route, "max_concurrency": mc, "max_queue": mq}

    async def queue(self, route: str) -> dict[str, Any]:
        if route not in {r.name for r in self.config.routes}:
            return {"ok": False, "error": f"no route {route!r}"}
        answers = await self.call_all({"cmd": "queue", "route": route})
        waiters = [w for a in answers if a.get("ok") for w in a["waiters"]]
        waiters.sort(key=lambda w: -w["wait_ms"])
        return {"ok": True, "route": route, "waiters": waiters}

    async def server_state(self, upstream: str, server: str, state: str) -> dict[str, Any]:
        """Every worker sets the server; a worker started later (a replacement) gets
        the same state while the upstream's configuration is the one it was set under."""
        error = check_state(state)
        if error is not None:
            return {"ok": False, "error": error}
        msg = {"cmd": "server_state", "upstream": upstream, "server": server, "state": state}
        answers = await self.call_all(msg)
        errors = sorted({a["error"] for a in answers if not a.get("ok")})
        if errors or not answers:
            return {"ok": False, "error": "; ".join(errors) or "no live worker"}
        if COMMAND_STATES[state]:
            self.server_states.pop((upstream, server), None)  # a new worker starts with it up
        else:
            self.server_states[(upstream, server)] = (msg, self.config.upstream(upstream))
        return answers[0]

    async def _restore_server_states(self, h: WorkerHandle) -> None:
        for msg, config in list(self.server_states.values()):
            current = next((u for u in self.config.upstreams if u.name == msg["upstream"]), None)
            if current == config:
                await self.call(h, msg)

    # -- lifecycle -----------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        n = worker_count(self.config)
        async with self._lock:
            first = [await self.spawn(slot) for slot in range(n)]
        ok = await asyncio.gather(*(h.ready for h in first))
        if not all(ok):
            await asyncio.sleep(0)  # let the reapers record why
            reason = next((h.boot_error for h in first if h.boot_error), None) or self.fatal
            log.error("%s", reason or "a worker failed to start")
            await self._stop_workers(5.0)
            return EXIT_FAILURE
        control = ControlServer(self, self.config.socket_path, self.config.control.mode)
        try:
            await control.start()
        except (ControlError, OSError) as exc:
            log.error("%s", exc)
            await self._stop_workers(5.0)
            return EXIT_FAILURE
        metrics = None
        if self.config.metrics.listen:
            metrics = MetricsListener(self.config.metrics.listen, self.snapshot,
                                      lambda: not self.draining and bool(self.live()),
                                      self.config.metrics.allow)
            try:
                await metrics.start()
            except OSError as exc:
                log.error("cannot listen on %s (metrics): %s", self.config.metrics.listen, exc.strerror)
                await control.close()
                await self._stop_workers(5.0)
                return EXIT_FAILURE
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.add_signal_handler(sig, self._signals.put_nowait, sig)
        watcher = self._spawn_task(self._watch())
        notify.ready()
        log.info("gatewayd %s master serving on %s with %d workers (control %s)", __version__,
                 ", ".join(self.config.server.listen), n, self.config.socket_path)
        try:
            while True:
                got = await self._signals.get()
                if got == signal.SIGHUP:
                    log.info("SIGHUP: reloading %s", self.config.path)
                    await self.reload(False)
                elif got == signal.SIGUSR1:
                    for h in self.workers.values():
                        with contextlib.suppress(ProcessLookupError):
                            h.proc.send_signal(signal.SIGUSR1)
                elif self.fatal is None:
                    log.info("%s: shutting down (up to %.1f s for in-flight requests)",
                             signal.Signals(got).name, self.config.server.shutdown_timeout)
                    break
                else:
                    break
        finally:
            notify.stopping()
            self.draining = True
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                loop.add_signal_handler(sig, log.info, "%s: already shutting down", sig)
            watcher.cancel()
            await self._stop_workers(self.config.server.shutdown_timeout + 5.0)
            if metrics is not None:
                await metrics.close()
            await control.close()
        ignore_late_signals(loop)
        log.info("stopped")
        return EXIT_FAILURE if self.fatal else EXIT_OK

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
    with open(config.path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        config = parse(text, config.path)  # what the workers will parse, byte for byte
    except ConfigError as exc:  # the file changed since it was checked
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 78
    with asyncio.Runner() as runner:
        return runner.run(Master(config, text).run())

