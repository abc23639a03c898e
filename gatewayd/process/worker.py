"""A worker process (``workers = N``): serves the listen addresses with
SO_REUSEPORT, pushes its figures to the master several times a second, and
applies what the master decides (reload, limits, its share of the limits).

Started by the master as ``python -m gatewayd.process.worker --fd N``. It exits when
the master goes away (its end of the socketpair closes).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from typing import cast

from ..config.loader import ConfigError, parse
from ..control.snapshot import clients, export, waiters
from ..exits import EXIT_BOOT, EXIT_OK
from ..proxy.ratelimit import RateTable, TableMismatch
from ..runtime.state import Runtime
from ..stats.process import raise_fd_limit
from ..upstreams.state import set_server_state
from .controller import no_route
from .ipc import Answer, Channel, Command, Start, ToWorker
from .startup import new_loop, setup_logging

log = logging.getLogger("gatewayd")

PUSH_INTERVAL = 0.25  # seconds between figures pushed to the master (at most)


class Worker:
    def __init__(self, channel: Channel, rate_fd: int) -> None:
        self.channel = channel
        self.rate_fd = rate_fd  # the master's rate-limit table
        self.runtime: Runtime | None = None
        self.stopping = asyncio.Event()

    def _terminate(self) -> None:
        self.stopping.set()
        # the drain is bounded by shutdown_timeout (and the master's kill after it):
        # a second SIGTERM must not cut it short once the loop has closed
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    async def boot(self) -> bool:
        start: Start | None = await self.channel.receive()
        if start is None or start["t"] != "start":
            return False
        try:
            config = parse(start["text"], start["path"])
        except ConfigError as exc:
            self.channel.send({"t": "boot_error", "error": "; ".join(exc.errors)})
            return False
        setup_logging(config.log.level)
        try:
            table = RateTable.attach(self.rate_fd)
        except (OSError, TableMismatch) as exc:
            self.channel.send({"t": "boot_error", "error": f"rate-limit table: {exc}"})
            return False
        soft, _ = raise_fd_limit()
        runtime = Runtime(config, worker_index=start["index"], worker_count=start["count"],
                          reuse_port=True, rate_table=table)
        runtime.generation = start["generation"]
        runtime.overrides.update(start["overrides"])
        share = runtime._share(config.server.max_connections, 1)
        if soft < share + 64:
            log.warning("worker %d: open-file limit %d is below its share of max_connections "
                        "(%d) + 64: accepting will pause at the limit", start["index"], soft, share)
        try:
            await runtime.start()
        except OSError as exc:
            self.channel.send({"t": "boot_error",
                               "error": f"cannot listen on {', '.join(config.server.addresses)}: "
                                        f"{exc.strerror or exc}"})
            return False
        except Exception as exc:
            self.channel.send({"t": "boot_error", "error": f"start-up failed: {exc}"})
            return False
        self.runtime = runtime
        gc.collect()
        gc.freeze()
        runtime.gc.reset()  # the deliberate start-up collection is not a pause anyone waited on
        self.channel.send({"t": "ready", "pid": os.getpid()})
        return True

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGHUP):
            # the master decides: a terminal's ^C reaches the whole process group
            loop.add_signal_handler(sig, lambda: None)
        loop.add_signal_handler(signal.SIGTERM, self._terminate)
        if not await self.boot():
            return EXIT_BOOT
        runtime = self.runtime
        assert runtime is not None
        loop.add_signal_handler(signal.SIGUSR1, runtime.access_log.reopen)
        pusher = loop.create_task(self._push())
        reader = loop.create_task(self._commands())
        stop = loop.create_task(self.stopping.wait())
        await asyncio.wait([reader, stop], return_when=asyncio.FIRST_COMPLETED)
        pusher.cancel()
        reader.cancel()
        stop.cancel()
        await runtime.shutdown(runtime.config.server.shutdown_timeout)
        self.channel.close()
        return EXIT_OK

    async def _push(self) -> None:
        runtime = self.runtime
        assert runtime is not None
        while True:
            self.channel.send({"t": "stats", "export": export(runtime)})
            # the master kills a worker silent for worker_timeout: report well within it,
            # also after a reload that shortened it
            await asyncio.sleep(min(PUSH_INTERVAL, runtime.config.server.worker_timeout / 4))

    async def _commands(self) -> None:
        while True:
            msg: ToWorker | None = await self.channel.receive()
            if msg is None:
                log.warning("worker %d: master gone; shutting down", os.getpid())
                return
            if msg["t"] == "call":
                command = msg["command"]
                try:
                    answer = await self._call(command)
                except Exception as exc:  # the master gets an answer whatever happens
                    log.exception("worker command %r failed", command["cmd"])
                    answer = {"ok": False, "error": f"worker {os.getpid()}: {exc}"}
                if self.runtime is not None:
                    # figures first: the master presents the last ones it got, and a
                    # status read right after a command must show what it changed
                    self.channel.send({"t": "stats", "export": export(self.runtime)})
                self.channel.send({"t": "reply", "id": msg["id"], "answer": answer})

    async def _call(self, command: Command) -> Answer:
        runtime = self.runtime
        assert runtime is not None
        if command["cmd"] == "prepare":
            try:
                error = await runtime.prepare(parse(command["text"], command["path"]))
            except ConfigError as exc:
                return {"ok": False, "error": str(exc)}
            return {"ok": True} if error is None else {"ok": False, "error": error}
        if command["cmd"] == "commit":
            if runtime.pending is None:
                return {"ok": False, "error": "nothing prepared"}
            await runtime.commit(command["generation"])
            return {"ok": True}
        if command["cmd"] == "abort":
            await runtime.abort()
            return {"ok": True}
        if command["cmd"] == "set_limit":
            try:
                runtime.set_limit(command["route"], command["max_concurrency"], command["max_queue"])
            except KeyError:
                return {"ok": False, "error": no_route(command["route"], runtime.config)}
            return {"ok": True}
        if command["cmd"] == "share":
            runtime.set_share(command["index"], command["count"])
            return {"ok": True}
        if command["cmd"] == "queue":
            return {"ok": True, "waiters": waiters(runtime, command["route"])}
        if command["cmd"] == "clients":
            return {"ok": True, "clients": clients(runtime, command["route"])}
        if command["cmd"] == "server_state":
            return cast(Answer, set_server_state(runtime.table.upstreams, command["upstream"],
                                                 command["server"], command["state"]))
        return {"ok": False, "error": f"unknown worker command {command['cmd']!r}"}


async def _main(fd: int, rate_fd: int) -> int:
    sock = socket.socket(fileno=fd)
    channel = await Channel.open(sock)
    return await Worker(channel, rate_fd).run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gatewayd-worker")
    p.add_argument("--fd", type=int, required=True, help="this worker's end of the socketpair")
    p.add_argument("--rate-fd", type=int, required=True, help="the master's rate-limit table (a memfd)")
    args = p.parse_args(argv)
    setup_logging("info")
    with asyncio.Runner(loop_factory=new_loop) as runner:
        return runner.run(_main(args.fd, args.rate_fd))


if __name__ == "__main__":
    sys.exit(main())
