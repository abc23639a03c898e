"""Shared test fixtures: real upstream servers on 127.0.0.1, gatewayd in-process
(our own runtime wiring, as in production) or as a subprocess, and raw clients.

Nothing here mocks a socket, aiohttp or asyncio.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from gatewayd.config.loader import parse
from gatewayd.control.server import ControlServer
from gatewayd.process.single import LocalController
from gatewayd.runtime.state import Runtime

from .builders import free_port, gateway_config
from .proxy.wsupstream import WsUpstream

ROOT = Path(__file__).resolve().parent.parent


async def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def wait_for_sync(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


# ----------------------------------------------------------------------------- upstreams
class Upstream:
    """A real aiohttp upstream recording what reached it.

    Paths: ``/slow?ms=N`` waits N ms (records start, finish or abort),
    ``/echo`` answers JSON with the method, target, headers and body it got,
    ``/big?bytes=N`` streams N bytes, anything else answers ``ok``.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[dict[str, Any]] = []
        self.started = 0
        self.finished = 0
        self.aborted: list[float] = []  # loop times at which a request was cancelled
        self.active = 0
        self.connections = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append({
            "method": request.method, "target": request.raw_path,
            "headers": list(request.headers.items()), "body": body,
        })
        self.started += 1
        self.active += 1
        try:
            path = request.path
            if path.startswith("/slow"):
                await asyncio.sleep(int(request.query.get("ms", "1000")) / 1000)
                return web.Response(text="slow done\n")
            if path.startswith("/echo"):
                return web.json_response({
                    "method": request.method, "target": request.raw_path,
                    "headers": [[k, v] for k, v in request.headers.items()],
                    "body": body.decode("latin-1"),
                })
            if path.startswith("/big"):
                n = int(request.query.get("bytes", "1048576"))
                resp = web.StreamResponse()
                resp.content_length = n
                await resp.prepare(request)
                chunk = b"x" * 65536
                while n > 0:
                    await resp.write(chunk[: min(n, len(chunk))])
                    n -= len(chunk)
                await resp.write_eof()
                return resp
            if path.startswith("/status/"):
                return web.Response(status=int(path.split("/")[2]), text="status\n")
            return web.Response(text="ok\n")
        except asyncio.CancelledError:
            self.aborted.append(asyncio.get_running_loop().time())
            raise
        finally:
            self.active -= 1
            self.finished += 1

    async def start(self) -> None:
        server = web.Server(self.handle, handler_cancellation=True)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """One certificate authority for the session's TLS tests (tests/certs.py issues
    leaves from it)."""
    return trustme.CA()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    u = Upstream()
    await u.start()
    yield u
    await u.stop()


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    """A real WebSocket upstream (aiohttp's server; see tests/proxy/wsupstream.py)."""
    u = WsUpstream()
    await u.start()
    yield u
    await u.stop()


class TasksMade:
    """Counts the tasks made on the running loop while it is installed (``with``):
    the loop's task factory, put back as it was after."""

    def __init__(self) -> None:
        self.made = 0
        self._loop = asyncio.get_running_loop()
        self._before: Any = None

    def _factory(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        self.made += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    def __enter__(self) -> TasksMade:
        self._before = self._loop.get_task_factory()
        self._loop.set_task_factory(self._factory)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.set_task_factory(self._before)


# ----------------------------------------------------------------------------- gateway in-process
class InProcessGateway:
    """gatewayd's runtime and control socket on the test's loop, wired as in production
    (our listener, ``handler_cancellation=True``), without signal handling."""

    def __init__(self, config_path: Path, runtime: Runtime, control: ControlServer) -> None:
        self.config_path = config_path
        self.runtime = runtime
        self.control = control
        self.port = int(runtime.config.server.addresses[0].rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.socket_path = runtime.config.socket_path

    async def command(self, obj: dict[str, Any]) -> dict[str, Any]:
        return await control_command(self.socket_path, obj)


async def control_command(path: Path, obj: dict[str, Any]) -> dict[str, Any]:
    """One request line on the control socket at ``path``; its answer."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(json.dumps(obj).encode() + b"\n")
        await writer.drain()
        return json.loads(await reader.readline())
    finally:
        writer.close()


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await start_gateway(body, **server_keys)`` -> InProcessGateway."""
    started: list[InProcessGateway] = []

    async def start(body: str, **server: Any) -> InProcessGateway:
        path = gateway_config(tmp_path, body, **server)
        config = parse(path.read_text(), str(path))
        runtime = Runtime(config)
        await runtime.start()
        control = ControlServer(LocalController(runtime), config.socket_path, config.control.mode)
        await control.start()
        gw = InProcessGateway(path, runtime, control)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.control.close()
        await gw.runtime.shutdown(1.0)


# ----------------------------------------------------------------------------- gateway subprocess
class GatewayProcess:
    """``gatewayd --config PATH`` as a real process, stopped at teardown."""

    def __init__(self, config_path: Path, workdir: Path) -> None:
        self.config_path = config_path
        self.stdout_path = workdir / "gatewayd.stdout"
        self.stderr_path = workdir / "gatewayd.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, env: dict[str, str] | None = None) -> GatewayProcess:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gatewayd", "--config", str(self.config_path)],
                stdout=out, stderr=err, env={**os.environ, **(env or {})}, cwd=str(ROOT),
            )
        if wait_ready:
            wait_for_sync(lambda: self.answers() or self.proc.poll() is not None, timeout=20)
            if self.proc.poll() is not None:
                raise AssertionError(f"gatewayd exited {self.proc.returncode}: {self.stderr()}")
        return self

    @property
    def socket_path(self) -> Path:
        return self.config_path.parent / "gw.sock"

    def answers(self) -> bool:
        try:
            self.command({"cmd": "hello"}, timeout=0.5)
            return True
        except OSError:
            return False

    def command(self, obj: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.socket_path))
            s.sendall(json.dumps(obj).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            return json.loads(buf)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """``gateway_process(body, **server_keys)`` -> a started GatewayProcess."""
    procs: list[GatewayProcess] = []

    def start(body: str, *, wait_ready: bool = True, env: dict[str, str] | None = None,
              **server: Any) -> GatewayProcess:
        path = gateway_config(tmp_path, body, **server)
        gp = GatewayProcess(path, tmp_path)
        procs.append(gp)
        return gp.start(wait_ready=wait_ready, env=env)

    yield start
    for gp in procs:
        gp.stop()


def run_gatewayd(config: Path, tmp_path: Path, **popen: Any) -> subprocess.Popen[bytes]:
    """``gatewayd --config CONFIG`` started and not waited for; its output in ``tmp_path``'s
    ``out`` and ``err``. For tests that need the bare process (its rlimits, its signals)."""
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "gatewayd", "--config", str(config)],
                                stdout=out, stderr=err, cwd=str(ROOT), **popen)


def refused(port: int) -> bool:
    """Whether a connection to 127.0.0.1:``port`` is refused now."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return False
    except OSError:
        return True


# ----------------------------------------------------------------------------- raw clients
async def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes or ``timeout``; the bytes received."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    out += chunk
        except TimeoutError:
            pass
        return out
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    """The status code of a raw HTTP response (0 when there is none)."""
    if not response.startswith(b"HTTP/"):
        return 0
    return int(response.split(b" ", 2)[1])


# ----------------------------------------------------------------------------- hardening
@pytest.fixture
def no_error_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing a client or an upstream does may make the gateway log an ERROR (a
    traceback per hostile request is a log flood). The hardening modules use it
    for every test (``pytestmark``)."""
    yield
    errors = [r for r in caplog.get_records("call") if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


async def settled(gw: Any) -> None:
    """Wait until route ``app`` holds nothing: no connection, slot, waiter, upstream
    exchange or buffered body byte is left behind."""
    runtime = gw.runtime
    route = runtime.table.routes["app"]
    await wait_for(lambda: runtime.connections == 0 and route.gate.in_flight == 0
                   and not route.gate.waiters and route.upstream.active == 0
                   and runtime.body_memory.held == 0, timeout=5)
