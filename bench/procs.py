"""Processes the harness starts: pinned to a CPU, in their own process group,
measured from /proc, and always stopped.

Every process is started through a :class:`Processes` registry, whose ``close``
(run from ``finally`` and on SIGTERM) stops what is still running: SIGTERM to
the process group, SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def pinned(cpu: int | None, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed with ``taskset -c CPU`` (unchanged when ``cpu`` is None)."""
    return list(argv) if cpu is None else ["taskset", "-c", str(cpu), *argv]


@dataclass
class Usage:
    """CPU seconds (user + system) and resident memory of a process tree, and the
    seconds its threads were runnable but waited for a CPU (taken by other processes)."""

    cpu: float
    rss: int  # bytes
    waited: float = 0.0

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.cpu - other.cpu, self.rss - other.rss, self.waited - other.waited)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (nginx master and workers, say)."""
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _run_delay(pid: int) -> float:
    """Seconds the threads of ``pid`` spent runnable, waiting for a CPU (schedstat)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def usage(pids: Sequence[int]) -> Usage:
    """Summed utime+stime (all threads), VmRSS and run-queue wait of ``pids``;
    vanished ones count 0."""
    cpu = 0.0
    rss = 0
    waited = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        # fields[0] is field 3 (state): utime and stime are fields 14 and 15
        cpu += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024
                break
        waited += _run_delay(pid)
    return Usage(cpu, rss, waited)


class Proc:
    """One started process (and its descendants)."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.popen = popen
        self.log = log

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def usage(self) -> Usage:
        return usage(tree(self.pid))

    def wait_quiet(self, share: float = 0.05, interval: float = 0.25, timeout: float = 15.0) -> None:
        """Wait until the process uses less than ``share`` of a CPU (done accepting, say)."""
        deadline = time.monotonic() + timeout
        last = self.usage().cpu
        while time.monotonic() < deadline:
            time.sleep(interval)
            now = self.usage().cpu
            if now - last < share * interval:
                return
            last = now

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_port(self, port: int, timeout: float = 15.0) -> None:
        """Wait until ``port`` accepts connections; raise if the process died or it took too long."""
        deadline = time.monotonic() + timeout
        while not port_open(port):
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: port {port} not open after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds."""
        if self.popen.returncode is not None:
            return
        pgid = self.pid  # started with start_new_session: its own group
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # also children that outlived the leader
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass


class Processes:
    """Starts processes and remembers them until they are stopped."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._running: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], cpu: int | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> Proc:
        log = self.logdir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                pinned(cpu, argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=env, cwd=cwd,
            )
        proc = Proc(name, popen, log)
        self._running.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self._running:
            self._running.remove(proc)

    def close(self) -> None:
        """Stop everything still running, newest first."""
        while self._running:
            self.stop(self._running[-1])
