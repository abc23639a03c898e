"""What every scenario is handed: the options, the process environment, a
shared nginx upstream, and the figures earlier scenarios measured."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

from . import wrk
from .procs import Usage
from .servers import Env, Server, nginx_upstream


@dataclass(frozen=True)
class Options:
    duration: float  # seconds per measured wrk run
    repeats: int  # runs per figure; the median is kept
    warmup: float  # seconds of unmeasured load before measuring a freshly started proxy
    proxies: tuple[str, ...]
    quick: bool
    idle_connections: int
    cancel_requests: int
    overload_duration: float


@dataclass
class Measured:
    """One wrk run with the proxy's CPU time over it."""

    result: wrk.WrkResult
    cpu: float  # proxy CPU seconds (user + system, whole process tree)
    waited: float  # seconds the proxy was runnable but another process had its CPU

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu / self.result.requests * 1e6 if self.result.requests else float("nan")

    @property
    def cpu_share(self) -> float:
        """Proxy CPU use over the run, in percent of one core."""
        return 100 * self.cpu / self.result.seconds if self.result.seconds else float("nan")

    @property
    def wait_share(self) -> float:
        """Time the proxy waited for its CPU over the run, in percent: other processes' doing."""
        return 100 * self.waited / self.result.seconds if self.result.seconds else float("nan")


@dataclass
class Context:
    options: Options
    env: Env
    figures: dict[str, Any] = field(default_factory=dict)  # scenario -> what later ones may reuse
    _upstream: Server | None = None

    def upstream(self) -> Server:
        """The nginx upstream with the fixed 100-byte body, started once per run."""
        if self._upstream is None or not self._upstream.proc.alive():
            self._upstream = nginx_upstream(self.env)
        return self._upstream

    def say(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def wrk(self, server: Server, connections: int, seconds: float, timeout: float = 2.0,
            headers: tuple[str, ...] = ()) -> wrk.WrkResult:
        return wrk.run(server.port, connections, seconds, self.env.tmp, self.env.load_cpu, timeout=timeout,
                       scheme=server.scheme, headers=headers)

    def measure(self, server: Server, connections: int, seconds: float | None = None,
                timeout: float = 2.0, headers: tuple[str, ...] = ()) -> Measured:
        """wrk against ``server`` (over TLS if it is https), with the server's CPU time read
        from /proc around it."""
        before: Usage = server.proc.usage()
        result = self.wrk(server, connections, seconds or self.options.duration, timeout, headers)
        used = server.proc.usage() - before
        return Measured(result, used.cpu, used.waited)

    def warm(self, server: Server, connections: int = 50) -> None:
        if self.options.warmup > 0:
            self.wrk(server, connections, self.options.warmup)
