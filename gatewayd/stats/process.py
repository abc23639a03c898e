"""Process-level truths: live tasks, event-loop lag, GC pauses, RSS, open fds.

Each is measured the cheap way: tasks by a counting task factory (never
``asyncio.all_tasks()``, which is O(n)), lag by a re-armed timer, GC pauses by
``gc.callbacks`` timing each collection's start to its stop.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import time
from collections import deque
from typing import NotRequired, TypedDict

from .metrics import PAUSE_BUCKETS, Histogram, HistogramExport

LAG_INTERVAL = 0.05  # seconds between lag probes
_PAGE = os.sysconf("SC_PAGE_SIZE")


class TaskCounter:
    """The live asyncio tasks, counted when asked (a snapshot) from asyncio's own
    registry: no task factory, so a request served in a task pays nothing for
    being counted (a factory cost a Python call and a done callback per task,
    4.5 % of an in-process ASGI request)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    @property
    def live(self) -> int:
        return len(asyncio.all_tasks(self._loop)) if self._loop is not None else 0


class LoopLag:
    """How late a timer re-armed every ``LAG_INTERVAL`` fires."""

    def __init__(self) -> None:
        self.last = 0.0
        self.max = 0.0
        self.total = 0.0
        self.samples = 0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expected = 0.0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._expected = self._loop.time() + LAG_INTERVAL
        self._handle = self._loop.call_at(self._expected, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        lag = max(0.0, now - self._expected)
        self.last = lag
        self.total += lag
        self.samples += 1
        if lag > self.max:
            self.max = lag
        self._expected = now + LAG_INTERVAL
        self._handle = self._loop.call_at(self._expected, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def alive_for(self) -> float:
        """Seconds since the probe last fired: large when the loop is stuck."""
        if self._loop is None:
            return 0.0
        return max(0.0, self._loop.time() - (self._expected - LAG_INTERVAL))


class PauseMs(TypedDict):
    """GC pauses in milliseconds: the latest, the longest, all of them together."""

    last: float
    max: float
    total: float


class GcGeneration(TypedDict):
    """One GC generation's collections and pauses."""

    generation: int
    count: int
    collected: int
    last_ms: float
    max_ms: float
    total_ms: float
    histogram: NotRequired[HistogramExport]  # a snapshot has it only when asked for


class GcPause(TypedDict):
    """One recent collection: when (epoch seconds), which generation, how long."""

    time: float
    generation: int
    ms: float
    pid: NotRequired[int]  # the worker's, once presented


class GcExport(TypedDict):
    """What :meth:`GcMonitor.export` gives: a process's collections and pauses."""

    collections: list[int]
    pauses: int
    pause_ms: PauseMs
    generations: list[GcGeneration]
    recent: list[GcPause]
    frozen: int


class GcMonitor:
    """GC pauses per generation from ``gc.callbacks``: count, last, max, total,
    a histogram, and a ring of the most recent pauses."""

    RING = 64

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.last = [0.0, 0.0, 0.0]
        self.max = [0.0, 0.0, 0.0]
        self.total = [0.0, 0.0, 0.0]
        self.collected = [0, 0, 0]
        self.hist = [Histogram(PAUSE_BUCKETS) for _ in range(3)]
        self.recent: deque[tuple[float, int, float]] = deque(maxlen=self.RING)
        self.last_pause = 0.0
        self.max_pause = 0.0
        # gc.get_freeze_count() walks the permanent generation (milliseconds for a
        # big heap): read it once, after the start-up freeze, not per snapshot
        self.frozen = gc.get_freeze_count()
        self._start = 0
        self._installed = False

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter_ns()
            return
        pause = (time.perf_counter_ns() - self._start) / 1e9
        gen = info["generation"]
        self.count[gen] += 1
        self.last[gen] = pause
        self.total[gen] += pause
        self.collected[gen] += info.get("collected", 0)
        if pause > self.max[gen]:
            self.max[gen] = pause
        self.hist[gen].observe(pause)
        self.recent.append((time.time(), gen, pause))
        self.last_pause = pause
        if pause > self.max_pause:
            self.max_pause = pause

    def reset(self) -> None:
        """Forget what was measured so far (keeps the callback installed)."""
        installed = self._installed
        self.__init__()  # type: ignore[misc]
        self._installed = installed

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def export(self) -> GcExport:
        return {
            "collections": list(self.count),
            "pauses": sum(self.count),
            "pause_ms": {
                "last": self.last_pause * 1000,
                "max": self.max_pause * 1000,
                "total": sum(self.total) * 1000,
            },
            "generations": [
                {
                    "generation": g, "count": self.count[g], "collected": self.collected[g],
                    "last_ms": self.last[g] * 1000, "max_ms": self.max[g] * 1000,
                    "total_ms": self.total[g] * 1000, "histogram": self.hist[g].export(),
                }
                for g in range(3)
            ],
            "recent": [
                {"time": t, "generation": g, "ms": p * 1000} for t, g, p in list(self.recent)[-16:]
            ],
            "frozen": self.frozen,
        }


def rss_bytes() -> int:
    """Resident set size of this process."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def open_fds() -> int:
    """Open file descriptors; -1 when unknown. Linux 6.2 and later give the count as
    the size of /proc/self/fd, in microseconds; listing the folder (the fallback)
    takes milliseconds with thousands of connections, on every snapshot."""
    try:
        n = os.stat("/proc/self/fd").st_size
    except OSError:
        n = 0
    if n > 0:
        return n
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
