"""Security properties of the edges (issue 9 §6) not covered elsewhere.

Covered in other files: the control socket's mode under a permissive umask
(test_control.py), upstream headers that try to inject hop-by-hop fields or
X-Gatewayd-Reason (test_proxy.py), X-Forwarded-For appended and never trusted
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

from gatewayd.control import ControlError, ControlServer
from gatewayd.daemon import LocalController
from gatewayd.loader import parse

from .conftest import gateway_config

NOBODY = 65534
ROUTE = """
    [upstreams.demo]
    handler = "gatewayd.handlers:simulated_io"

    [[routes]]
    name = "demo"
    upstream = "demo"
"""


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
    with pytest.raises(ControlError, match="writable by others"):
        await server.start()
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
    example = Path(__file__).resolve().parent.parent / "config.toml"
    text = example.read_text()
    if "[metrics]" in text:
        listen = parse(text, str(example)).metrics.listen
        assert listen is None or listen.startswith(("127.", "[::1]", "localhost")), listen
