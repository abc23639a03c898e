"""Process-pool upstreams: a plain function run in worker processes, never on
the event loop, for CPU-heavy handlers.

The function takes a ``ProcessRequest`` and returns ``(status, headers, body)``
with ``headers`` a dict or a list of pairs and ``body`` bytes or str. The
route's admission bounds how many jobs are queued or running: the pool never
holds more than the route's ``max_concurrency``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import multiprocessing
import signal
from dataclasses import dataclass
from typing import Any

from ..config.importing import resolve
from ..config.settings import UpstreamConfig
from ..http.turn import Turn
from ..proxy.exchange import Exchange, UpstreamFailure
from .application import Application, respond


@dataclass(frozen=True)
class ProcessRequest:
    """What a process handler receives (picklable)."""

    method: str
    path: str
    query_string: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    client: str


_functions: dict[str, Any] = {}  # per worker process: import once


def _run(path: str, request: ProcessRequest) -> tuple[int, list[tuple[str, str]], bytes]:
    fn = _functions.get(path)
    if fn is None:
        fn = _functions[path] = resolve(path)
    status, headers, body = fn(request)
    pairs = list(headers.items()) if isinstance(headers, dict) else list(headers)
    if isinstance(body, str):
        body = body.encode()
    return int(status), [(str(k), str(v)) for k, v in pairs], bytes(body)


def _leave_signals_to_the_gateway() -> None:
    """A pool process's first act: ignore SIGINT and SIGTERM.

    The pool's processes are in the gateway's process group, so a terminal's Ctrl-C
    and a shell's ``kill %1`` reach them too: each died at once, with a
    KeyboardInterrupt traceback on the gateway's stderr after it said "stopped", or
    (SIGTERM) in the middle of a job the gateway was letting finish. The gateway stops
    its pool itself, after the requests in flight, when it shuts down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ProcessUpstream(Application):
    """``executor = "process"``: jobs in a pool of ``processes`` processes.

    A job that has started cannot be interrupted safely: when its client leaves,
    a job not yet started is dropped at once, a running one finishes and keeps
    its slot until then, so the pool never holds more than the route admits.
    """

    def __init__(self, config: UpstreamConfig, turn: Turn) -> None:
        super().__init__(config, turn)  # imports it here too: a bad name fails the start
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    async def start(self) -> None:
        # forkserver: forking a process that runs an event loop (and maybe
        # uvloop's threads) is unsafe; the server forks from a clean process.
        ctx = multiprocessing.get_context("forkserver")
        self._pool = concurrent.futures.ProcessPoolExecutor(
            self.config.processes, mp_context=ctx, initializer=_leave_signals_to_the_gateway)

    async def _close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(pool.shutdown, wait=True, cancel_futures=True)
            )

    async def serve(self, ex: Exchange) -> None:
        request = ex.request
        assert self._pool is not None
        body = await ex.body.read_all() if ex.body is not None else b""
        path, _, query = ex.path.partition("?")
        job = ProcessRequest(request.method, path, query, tuple(request.headers.items()),
                             body, ex.client_ip)
        cfuture = self._pool.submit(_run, self.target, job)
        future = asyncio.wrap_future(cfuture)
        try:
            status, headers, payload = await asyncio.shield(future)
        except asyncio.CancelledError:
            if not cfuture.cancel():
                try:
                    await future
                except BaseException:
                    pass
            raise
        except concurrent.futures.process.BrokenProcessPool:
            raise UpstreamFailure(502, "handler_crashed") from None
        except Exception as exc:
            raise UpstreamFailure(500, "handler_error") from exc
        respond(ex, status, headers, payload)
