"""sd_notify, seen from systemd's side: a real gatewayd process and a datagram
socket the test binds in place of systemd's notify socket."""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gatewayd.process import notify

from ..builders import handler_route
from ..conftest import wait_for_sync

BODY = handler_route(max_concurrency=10)


class NotifySocket:
    """What systemd would read: one datagram per notification, fields one a line."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # the sender's pid comes with each datagram, as systemd checks it for NotifyAccess=main
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        # the value for $NOTIFY_SOCKET: '@' stands for the abstract namespace's NUL
        self.env = "@" + address[1:] if address.startswith("\0") else address

    def next(self, timeout: float = 20.0) -> dict[str, str]:
        """The next notification's fields; ``_PID`` is the process that sent it."""
        self.sock.settimeout(timeout)
        data, ancillary, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(struct.calcsize("3i")))
        fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        for level, kind, cred in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                fields["_PID"] = str(struct.unpack("3i", cred[: struct.calcsize("3i")])[0])
        return fields

    def nothing_within(self, seconds: float) -> bool:
        try:
            self.next(seconds)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(str(tmp_path / "notify"))
    yield ns
    ns.close()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def assert_reload_cycle(ns: NotifySocket, before: int) -> None:
    """RELOADING=1 with a MONOTONIC_USEC taken during the reload, then READY=1."""
    msg = ns.next()
    assert msg.get("RELOADING") == "1", msg
    assert before <= int(msg["MONOTONIC_USEC"]) <= monotonic_usec()
    msg = ns.next()
    assert msg.get("READY") == "1", msg


def test_ready_reload_stopping(gateway_process, notify_socket):
    """1. gatewayd starts with NOTIFY_SOCKET set 2. its first notification is READY=1,
    and by then the control socket answers 3. SIGHUP: RELOADING=1 with MONOTONIC_USEC,
    then READY=1 4. the control socket's reload: the same 5. a dry run: nothing
    6. SIGTERM: STOPPING=1, and the process exits 0."""
    gp = gateway_process(BODY, wait_ready=False, env={"NOTIFY_SOCKET": notify_socket.env})
    msg = notify_socket.next()
    assert msg.get("READY") == "1", msg
    assert msg["_PID"] == str(gp.proc.pid)
    assert str(gp.proc.pid) in msg.get("STATUS", "")
    assert gp.answers(), "READY=1 came before the control socket answered"

    before = monotonic_usec()
    gp.signal(signal.SIGHUP)
    assert_reload_cycle(notify_socket, before)
    assert gp.command({"cmd": "snapshot"})["snapshot"]["generation"] == 2

    before = monotonic_usec()
    assert gp.command({"cmd": "reload"})["ok"] is True
    assert_reload_cycle(notify_socket, before)

    assert gp.command({"cmd": "reload", "dry_run": True})["ok"] is True
    assert notify_socket.nothing_within(0.3)

    gp.signal(signal.SIGTERM)
    assert notify_socket.next().get("STOPPING") == "1"
    assert gp.wait() == 0


def test_failed_reload_still_ends_with_ready(gateway_process, notify_socket):
    """1. gatewayd is READY 2. the file becomes invalid 3. SIGHUP: RELOADING=1, then
    READY=1 (systemd must leave the reloading state: the old configuration serves on)
    4. last_reload holds the error."""
    gp = gateway_process(BODY, wait_ready=False, env={"NOTIFY_SOCKET": notify_socket.env})
    assert notify_socket.next().get("READY") == "1"
    gp.config_path.write_text(gp.config_path.read_text() + "\n[bogus]\n")
    before = monotonic_usec()
    gp.signal(signal.SIGHUP)
    assert_reload_cycle(notify_socket, before)
    snap = gp.command({"cmd": "snapshot"})["snapshot"]
    assert snap["generation"] == 1
    assert snap["last_reload"]["ok"] is False
    assert "bogus" in snap["last_reload"]["error"]


def test_abstract_namespace_socket(gateway_process):
    """NOTIFY_SOCKET=@name reaches a socket in the abstract namespace."""
    ns = NotifySocket(f"\0gatewayd-test-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        assert ns.env.startswith("@")
        gp = gateway_process(BODY, wait_ready=False, env={"NOTIFY_SOCKET": ns.env})
        assert ns.next().get("READY") == "1"
        assert gp.answers()
        gp.signal(signal.SIGTERM)
        assert ns.next().get("STOPPING") == "1"
        assert gp.wait() == 0
    finally:
        ns.close()


def test_not_under_systemd(monkeypatch):
    """Without a usable NOTIFY_SOCKET nothing is sent and nothing fails."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # systemd >= 254 form we do not speak
    assert notify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert notify.stopping() is False


def test_workers_only_the_master_notifies(gateway_process, notify_socket):
    """With workers = 2: 1. READY=1 comes from the master (systemd's NotifyAccess=main
    ignores any other pid) once the control socket answers 2. a reload is framed by
    RELOADING=1 and READY=1 from the master 3. no worker says anything 4. SIGTERM:
    STOPPING=1 from the master, exit 0."""
    gp = gateway_process(BODY, wait_ready=False, env={"NOTIFY_SOCKET": notify_socket.env}, workers=2)
    master = str(gp.proc.pid)
    msg = notify_socket.next()
    assert msg.get("READY") == "1" and msg["_PID"] == master, msg
    assert gp.answers()

    # workers push their figures a few times a second: both are listed shortly
    def worker_pids() -> set[str] | None:
        workers = gp.command({"cmd": "snapshot"})["snapshot"]["workers"]
        return {str(w["pid"]) for w in workers} if len(workers) == 2 else None

    pids = wait_for_sync(worker_pids, timeout=5)
    assert master not in pids

    before = monotonic_usec()
    gp.signal(signal.SIGHUP)
    msg = notify_socket.next()
    assert msg.get("RELOADING") == "1" and msg["_PID"] == master, msg
    assert before <= int(msg["MONOTONIC_USEC"]) <= monotonic_usec()
    msg = notify_socket.next()
    assert msg.get("READY") == "1" and msg["_PID"] == master, msg
    assert notify_socket.nothing_within(0.5)

    gp.signal(signal.SIGTERM)
    msg = notify_socket.next()
    assert msg.get("STOPPING") == "1" and msg["_PID"] == master, msg
    assert gp.wait() == 0
    assert notify_socket.nothing_within(0.1)


def test_workers_failed_reload_still_ends_with_ready(gateway_process, notify_socket):
    """With workers = 2, as with one process (the reload policy is the same): 1. the
    master is READY 2. the file becomes invalid 3. SIGHUP: RELOADING=1, then READY=1,
    both from the master 4. last_reload holds the error."""
    gp = gateway_process(BODY, wait_ready=False, env={"NOTIFY_SOCKET": notify_socket.env}, workers=2)
    master = str(gp.proc.pid)
    assert notify_socket.next().get("READY") == "1"
    gp.config_path.write_text(gp.config_path.read_text() + "\n[bogus]\n")
    before = monotonic_usec()
    gp.signal(signal.SIGHUP)
    msg = notify_socket.next()
    assert msg.get("RELOADING") == "1" and msg["_PID"] == master, msg
    assert before <= int(msg["MONOTONIC_USEC"]) <= monotonic_usec()
    msg = notify_socket.next()
    assert msg.get("READY") == "1" and msg["_PID"] == master, msg
    snap = gp.command({"cmd": "snapshot"})["snapshot"]
    assert snap["generation"] == 1
    assert snap["last_reload"]["ok"] is False
    assert "bogus" in snap["last_reload"]["error"]
