"""Security properties of the edges (issue 9 §6) not covered elsewhere.

Covered in other files: the control socket's mode under a permissive umask
(control/test_control.py), upstream headers that try to inject hop-by-hop fields or
X-Gatewayd-Reason (proxy/test_proxy.py), X-Forwarded-For appended and never trusted
and its underscore spelling dropped (corpus cases x_forwarded_*).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.config.loader import ConfigError, parse
from gatewayd.control.server import ControlError, ControlServer
from gatewayd.process.single import LocalController

from ..builders import free_port, gateway_config, handler_route
from ..conftest import GatewayProcess

NOBODY = 65534
ROUTE = handler_route()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder other users can reach but not write (0755), outside pytest's 0700 tree."""
    d = Path(tempfile.mkdtemp(prefix="gatewayd-sec-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def _hello_as(uid: int, path: Path) -> dict | str:
    """Connect as another user (a forked child) and say hello: the answer, or the error.

    Blocking: run it in a thread, the daemon's loop must keep answering meanwhile."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only plain syscalls, then _exit
        try:
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            try:
                s.connect(str(path))
                try:
                    s.sendall(b'{"cmd": "hello"}\n')
                except BrokenPipeError:
                    pass  # refused at once: the answer is already waiting to be read
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except OSError as exc:
                data = json.dumps(exc.strerror).encode()
            os.write(w, data)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        out = fh.read()
    os.waitpid(pid, 0)
    return json.loads(out)


async def test_control_socket_directory_writable_by_others(tmp_path, start_gateway):
    """A socket in a folder anyone may write is refused at start (anyone could replace
    it); the sticky bit (as on /tmp) makes the folder acceptable."""
    gw = await start_gateway(ROUTE)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    server = ControlServer(LocalController(gw.runtime), open_dir / "c.sock", 0o600)
    with pytest.raises(ControlError, match="writable by others") as refusal:
        await server.start()
    # the error says how to fix it, in commands that can be typed as they are
    assert f"'chmod o-w {open_dir}'" in str(refusal.value)
    assert f"'chmod +t {open_dir}'" in str(refusal.value)
    assert "control.socket" in str(refusal.value)
    open_dir.chmod(0o1777)
    await server.start()
    try:
        assert (open_dir / "c.sock").stat().st_mode & 0o777 == 0o600
    finally:
        await server.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
async def test_control_socket_refuses_other_users(start_gateway, shared_dir):
    """1. mode 0600: another user cannot even connect 2. the same socket loosened to 0666
    behind the daemon's back: the peer's uid (SO_PEERCRED) is refused all the same
    3. a daemon configured with mode 0666 has chosen to let others in: answered."""
    gw = await start_gateway(ROUTE)
    path = shared_dir / "strict.sock"
    strict = ControlServer(LocalController(gw.runtime), path, 0o600)
    await strict.start()
    try:
        assert await asyncio.to_thread(_hello_as, NOBODY, path) == "Permission denied"
        path.chmod(0o666)
        got = await asyncio.to_thread(_hello_as, NOBODY, path)
        assert got == {"ok": False, "error": "permission denied: peer uid differs"}
    finally:
        await strict.close()

    path = shared_dir / "open.sock"
    opened = ControlServer(LocalController(gw.runtime), path, 0o666)
    await opened.start()
    try:
        got = await asyncio.to_thread(_hello_as, NOBODY, path)
        assert isinstance(got, dict) and got["ok"] is True and got["pid"] == os.getpid()
    finally:
        await opened.close()


def test_metrics_listener_is_off_by_default(tmp_path):
    """No [metrics] listen: no Prometheus listener at all (the example binds loopback)."""
    config = parse(gateway_config(tmp_path, ROUTE).read_text(), "x.toml")
    assert config.metrics.listen is None
    example = Path(__file__).resolve().parents[2] / "config.toml"
    text = example.read_text()
    if "[metrics]" in text:
        listen = parse(text, str(example)).metrics.listen
        assert listen is None or listen.startswith(("127.", "[::1]", "localhost")), listen


async def _metrics_get(port: int, path: str, source: str) -> int:
    """The status of GET path on the metrics listener, from the local address ``source``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n")
        return int(head.split(b" ")[1])
    finally:
        writer.close()


async def test_metrics_allow_list(tmp_path):
    """[metrics] allow: /metrics answers only the listed networks (403 to others); the
    health endpoints answer anyone, as the kubelet probes them from the node. The
    Kubernetes example listens on 0.0.0.0, where without this any pod could read it."""
    mport = free_port()
    cfg = gateway_config(tmp_path, ROUTE)
    cfg.write_text(cfg.read_text()
                   + f'\n[metrics]\nlisten = "127.0.0.1:{mport}"\nallow = ["127.0.0.2/32", "10.0.0.0/8"]\n')
    gp = GatewayProcess(cfg, tmp_path)
    try:
        await asyncio.to_thread(gp.start)
        assert await _metrics_get(mport, "/metrics", "127.0.0.2") == 200
        assert await _metrics_get(mport, "/metrics", "127.0.0.1") == 403
        assert await _metrics_get(mport, "/healthz", "127.0.0.1") == 200
        assert await _metrics_get(mport, "/readyz", "127.0.0.1") == 200
    finally:
        await asyncio.to_thread(gp.stop)


def test_metrics_allow_is_validated(tmp_path):
    text = gateway_config(tmp_path, ROUTE).read_text() + '\n[metrics]\nallow = ["10.0.0.1/8", "x"]\n'
    with pytest.raises(ConfigError) as err:
        parse(text, "g.toml")
    assert "metrics.allow[0]: expected a network" in str(err.value), str(err.value)
    assert "metrics.allow[1]: expected a network" in str(err.value), str(err.value)
