"""What the figures were measured on: CPU, kernel, and the versions of everything."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from importlib import metadata

from .deps import tool


def _cmd(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def describe() -> dict[str, str]:
    def version_of(name: str, flag: str) -> str:
        try:
            return _cmd([tool(name), flag])
        except FileNotFoundError:
            return "not installed"

    return {
        "cpus": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "gatewayd": _version("gatewayd"),
        "uvicorn / starlette": f"{_version('uvicorn')} / {_version('starlette')}",
        "nginx": version_of("nginx", "-v"),
        "haproxy": version_of("haproxy", "-v"),
        "wrk": version_of("wrk", "-v"),
    }


def _busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU seconds of this process and its waited-for children (every process the run started)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class LoadMeter:
    """How busy the machine was with other people's work while the run lasted."""

    def __init__(self) -> None:
        self.wall = time.monotonic()
        self.busy = _busy_seconds()
        self.own = _own_seconds()

    def foreign(self) -> str:
        wall = time.monotonic() - self.wall
        other = (_busy_seconds() - self.busy) - (_own_seconds() - self.own)
        cpus = os.cpu_count() or 1
        return (f"processes outside this run used {max(0.0, other) / wall:.2f} of {cpus} CPUs on "
                f"average ({os.getloadavg()[0]:.1f} load average at the end)")
