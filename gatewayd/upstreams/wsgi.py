"""WSGI applications (PEP 3333, ``interface = "wsgi"``) on a pool of threads.

Each worker runs ``threads`` threads, made in ``start``. A request gets a thread
only once its route admitted it: one waiting for a slot is in the gateway's queue
(its timeout, the X-ray, the 503s) and holds none. The application runs in the
thread; everything that touches the client runs on the loop, the thread waiting
for it (``Job.call``): each chunk of ``wsgi.input`` is fetched from the client's
body as the application reads, each chunk of the response is sent with the
connection's back-pressure (the thread waits while the client does not read).
A response known in full when the application returns (a list) goes back to the
loop with the thread's result and is written in one piece.

A thread cannot be cancelled. When the client leaves, ``serve`` is cancelled; the
job stops feeding the thread (its next read of ``wsgi.input`` or write of the
response raises ``ConnectionResetError``, so the application unwinds and its
iterable's ``close()`` runs) and ``serve`` waits for the thread to be free before
it re-raises, so the slot stays held until then and the pool never runs more
than the route admits. An application that blocks without reading or writing
keeps its thread, and its slot, until it returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, cast

from ..config.settings import UpstreamConfig
from ..http.headers import response_headers
from ..http.turn import Turn
from ..http.wire import NO_BODY_STATUS
from ..proxy.exchange import Exchange, UpstreamFailure
from .application import Application
from .wsgiio import Errors, Input, environ_of

log = logging.getLogger("gatewayd")

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
Head = tuple[int, str, list[tuple[str, str]], int | None]  # status, reason, headers, length
Whole = tuple[Head, bytes]  # a response known in full: its head, its body
WRITE_AT_ONCE = 65536  # a whole body larger than this is sent with back-pressure


def _gone() -> ConnectionResetError:
    return ConnectionResetError("client gone")


def _latin1(s: str, what: str) -> str:
    """A header or status of the application's (PEP 3333: latin-1 native strings) as the
    gateway's head writer encodes it (UTF-8, surrogateescape): the same bytes out."""
    if "\r" in s or "\n" in s or "\0" in s:
        raise ValueError(f"CR, LF or NUL in the response's {what}: {s!r}")
    return s if s.isascii() else s.encode("latin-1").decode("utf-8", "surrogateescape")


class Job:
    """One request in a thread: the bridge between the application's thread and the
    loop, and PEP 3333's ``start_response`` and ``write``."""

    __slots__ = ("_declared", "_headers", "_left", "_lock", "_pending", "_reason", "_started",
                 "_status", "app", "complete", "done", "environ", "error", "ex", "head_out", "loop",
                 "wrote")

    def __init__(self, app: Any, ex: Exchange, environ: dict[str, Any],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.ex = ex
        self.environ = environ
        self.loop = loop
        self.done: asyncio.Future[Whole | None] = loop.create_future()
        self._lock = threading.Lock()
        self._started = False  # a thread took it (under _lock)
        self._left = False  # the client left: feed the thread nothing more (under _lock)
        self._pending: tuple[asyncio.Task[Any], concurrent.futures.Future[Any]] | None = None
        self.error: BaseException | None = None  # what a read or write raised in the thread
        self._status = 0
        self._reason = ""
        self._headers: list[tuple[str, str]] = []
        self._declared: int | None = None  # the application's Content-Length
        self.head_out = False  # the head was handed to the loop (thread's view)
        self.wrote = False  # the write() callable was used
        self.complete = False  # the client has the whole response (loop's view)

    # -- the bridge (thread -> loop) ---------------------------------------------------
    def call(self, work: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """In the thread: run ``work()`` on the loop and wait for its result. Raises
        what it raised, or ConnectionResetError once the client has left."""
        if self._left:
            self.error = _gone()
            raise self.error
        waiter: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            self.loop.call_soon_threadsafe(self._begin, work, waiter)
        except RuntimeError:  # the loop is closed (the process is stopping)
            self.error = _gone()
            raise self.error from None
        try:
            return waiter.result()
        except BaseException as exc:
            self.error = exc
            raise

    def _begin(self, work: Callable[[], Coroutine[Any, Any, Any]],
               waiter: concurrent.futures.Future[Any]) -> None:
        if self._left:
            waiter.set_exception(_gone())
            return
        task = self.loop.create_task(work())
        self._pending = (task, waiter)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[Any]) -> None:
        exc = None if task.cancelled() else task.exception()  # (read, even when unused)
        pending, self._pending = self._pending, None
        if pending is None or pending[1].done():  # failed already: the client left
            return
        waiter = pending[1]
        if task.cancelled():
            waiter.set_exception(_gone())
        elif exc is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(task.result())

    def leave(self) -> bool:
        """On the loop, the client gone: feed the thread nothing more and fail what it
        waits for. Whether a thread runs the job (False: it never will)."""
        with self._lock:
            self._left = True
            started = self._started
        pending, self._pending = self._pending, None
        if pending is not None:
            task, waiter = pending
            task.cancel()
            if not waiter.done():
                waiter.set_exception(_gone())
        return started

    # -- in the thread -----------------------------------------------------------------
    def run(self) -> None:
        """The pool's thread runs the application; its outcome goes back to the loop."""
        with self._lock:
            if self._left:
                return
            self._started = True
        outcome: Whole | None = None
        failure: BaseException | None = None
        try:
            outcome = self._serve()
        except BaseException as exc:
            failure = exc
        try:
            self.loop.call_soon_threadsafe(self._settle, outcome, failure)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass
        del failure

    def _settle(self, outcome: Whole | None, failure: BaseException | None) -> None:
        if self.done.done():
            return
        if failure is not None:
            self.done.set_exception(failure)
        else:
            self.done.set_result(outcome)

    def _serve(self) -> Whole | None:
        result: Iterable[bytes] = self.app(self.environ, self.start_response)
        try:
            if isinstance(result, (list, tuple)) and not self.wrote:
                body = b"".join(map(_bytes, result))
                return self._head(len(body)), body[:0] if self._no_body() else body
            for chunk in result:
                if chunk:
                    self.write(chunk)
                    if self._no_body():
                        break
            if not self.head_out:  # an empty body: known in full
                return self._head(0), b""
            self._end()
            return None  # the loop ends the body, once the thread is free
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: ExcInfo | None = None) -> Callable[[bytes], None]:
        """PEP 3333: the status and headers, checked here (so an error is raised in the
        application); again only with ``exc_info``, and only before the head is out
        (after it, ``exc_info``'s exception is raised again)."""
        if exc_info is not None:
            try:
                if self.head_out:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self._status:
            raise AssertionError("start_response called a second time without exc_info")
        if not isinstance(status, str) or len(status) < 3 or not status[:3].isdigit():
            raise ValueError(f"expected a status like '200 OK', got {status!r}")
        code = int(status[:3])
        reason = _latin1(status[4:] if len(status) > 4 else "", "status")
        out: list[tuple[str, str]] = []
        declared = None
        for name, value in headers:
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f"expected headers as (str, str) pairs, got {(name, value)!r}")
            if name.lower() == "content-length":
                if not value.strip().isdigit():
                    raise ValueError(f"expected a Content-Length of digits, got {value!r}")
                declared = int(value)
            out.append((_latin1(name, "header names"), _latin1(value, "headers")))
        self._status, self._reason, self._headers, self._declared = code, reason, out, declared
        return self.write

    def _no_body(self) -> bool:
        status = self._status
        return self.environ["REQUEST_METHOD"] == "HEAD" or status < 200 or status in NO_BODY_STATUS

    def _head(self, length: int | None) -> Head:
        """The response's head, checked (in the thread; the loop writes it); ``length``:
        the body's, when known in full."""
        if not self._status:
            raise RuntimeError("the application returned a body without calling start_response")
        if self.error is not None:  # the body failed (413, 408, ...) or the client left
            raise self.error
        declared = self._declared
        if declared is not None and length is not None and length != declared and not self._no_body():
            raise ValueError(f"Content-Length is {declared}, but the body has {length} bytes")
        self.head_out = True
        length = declared if declared is not None else length
        return self._status, self._reason, response_headers(self._headers), length

    def write(self, data: bytes) -> None:
        """PEP 3333's ``write`` and each chunk of the iterable: sent on the loop; the
        thread waits until the client's buffer takes it."""
        data = _bytes(data)
        head = None
        if not self.head_out:
            head = self._head(None)
        elif not data:
            return
        self.wrote = True
        if self._no_body():
            self.call(lambda: self._out(head, b"", True))
            return
        declared = self._declared
        if declared is not None and self.ex.sent + len(data) > declared:
            raise ValueError(f"the body is longer than its Content-Length, {declared}")
        self.call(lambda: self._out(head, data, False))

    def _end(self) -> None:
        declared = self._declared
        if declared is not None and self.ex.sent < declared and not self._no_body():
            raise ValueError(f"the body ended at {self.ex.sent} of its Content-Length, {declared}")

    # -- on the loop -------------------------------------------------------------------
    async def _out(self, head: Head | None, data: bytes, last: bool) -> None:
        ex = self.ex
        request = ex.request
        if head is not None:
            ex.status = head[0]
            request.write(request.head(*head))
            ex.head_sent = True
        if data or last:
            await request.send(data, last)
            ex.sent += len(data)
        declared = self._declared
        if last or (declared is not None and ex.sent >= declared):
            self.complete = True  # (a client that leaves now has what it asked for)


def _retrieve(done: asyncio.Future[Any]) -> None:
    """(An abandoned job's outcome: read, so asyncio does not report it.)"""
    if not done.cancelled():
        done.exception()


def _bytes(chunk: Any) -> bytes:
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, (bytearray, memoryview)):
        return bytes(chunk)
    raise TypeError(f"expected bytes from a WSGI application, got {type(chunk).__name__}")


class Pool:
    """``size`` threads taking jobs in turn (daemon threads: an application that never
    returns does not keep the process from exiting)."""

    def __init__(self, name: str, size: int) -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._work, name=f"gatewayd-wsgi-{name}-{i}", daemon=True)
                        for i in range(size)]
        for thread in self.threads:
            thread.start()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            job.run()
            del job

    def shutdown(self) -> None:
        """Each thread ends after the job it runs, if any."""
        for _ in self.threads:
            self._jobs.put(None)


def _in_a_worker() -> bool:
    """Whether this process is one of several workers (``workers`` above one: a single
    process is never a master's worker, and a reload between one and several is
    refused), so the application may run in other processes at once."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "gatewayd.process.worker"


class WsgiUpstream(Application):
    """``interface = "wsgi"``: ``def app(environ, start_response) -> Iterable[bytes]``
    on a pool of ``threads`` threads (see the module's docstring)."""

    def __init__(self, config: UpstreamConfig, turn: Turn) -> None:
        super().__init__(config, turn)
        self._pool: Pool | None = None
        self._errors = Errors(config.name)
        self.multiprocess = _in_a_worker()  # wsgi.multiprocess

    async def start(self) -> None:
        self._pool = Pool(self.name, self.config.threads)

    async def _close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown()

    async def serve(self, ex: Exchange) -> None:
        pool = self._pool
        assert pool is not None
        loop = asyncio.get_running_loop()
        environ = environ_of(ex, self._errors, self.multiprocess)
        job = Job(self.app, ex, environ, loop)
        body = ex.body
        chunks = None
        if body is None:
            environ["wsgi.input"] = Input()
        elif body.complete:
            environ["wsgi.input"] = Input(await body.read_all())
        else:
            chunks = cast(AsyncGenerator[bytes, None], body.chunks())
            step = chunks.__anext__

            async def next_chunk() -> bytes:
                try:
                    return await step()
                except StopAsyncIteration:
                    return b""

            environ["wsgi.input"] = Input(fetch=lambda: job.call(next_chunk))
        pool.submit(job)
        try:
            whole = await asyncio.shield(job.done)
        except asyncio.CancelledError:
            if not await self._left(job) or not job.complete:
                raise
            # the client had the whole response (its Content-Length) and closed while
            # the thread finished (close()): served, not cancelled
            task = asyncio.current_task()
            if task is None or task.uncancel():
                raise
            return
        except BaseException as exc:  # (SystemExit too: an application's exit is its error)
            self._failed(job, exc)
        finally:
            if chunks is not None and job.done.done():
                await chunks.aclose()
        if whole is not None:
            await self._write(job, *whole)
        elif ex.head_sent:  # a streamed body ends after the thread is free
            await ex.request.send(b"", True)

    async def _left(self, job: Job) -> bool:
        """The client left: stop feeding the thread, then wait until it is free (its
        application unwinding, ``close()`` called), so the slot is held until then. A
        second cancellation (the process stopping) waits no longer: False."""
        if not job.leave():
            return True
        try:
            await asyncio.shield(job.done)
        except asyncio.CancelledError:
            log.warning("upstreams.%s: a WSGI thread is still busy with a request whose client "
                        "left; no longer waiting for it", self.name)
            job.done.add_done_callback(_retrieve)
            return False
        except BaseException:
            pass  # the application's way out (ConnectionResetError, mostly)
        return True

    def _failed(self, job: Job, exc: BaseException) -> None:
        """The thread raised: what the gateway's reading or writing raised goes on as it
        is (413, 408, 400 for the body; a client gone); any other exception is the
        application's: logged, ``500 handler_error`` (the connection cut after the head)."""
        if job.error is not None:
            raise job.error
        log.error("upstreams.%s: the WSGI application failed on %s %s", self.name,
                  job.environ["REQUEST_METHOD"], job.ex.path, exc_info=exc)
        raise UpstreamFailure(500, "handler_error") from exc

    async def _write(self, job: Job, head: Head, body: bytes) -> None:
        """A response the application returned whole (a list): one write when small."""
        ex = job.ex
        request = ex.request
        ex.status = head[0]
        ex.head_sent = True
        lines = request.head(*head)
        if len(body) <= WRITE_AT_ONCE:
            request.write(lines + body if body else lines)
        else:
            request.write(lines)
            await request.send(body)
        ex.sent = len(body)
