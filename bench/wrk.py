"""Running wrk and reading its results.

wrk's own summary rounds latencies to two digits; a Lua ``done`` hook prints
the exact figures (microseconds) as one JSON line, which is what we parse.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .deps import tool
from .procs import pinned

MARK = "WRKJSON "
SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,'
    .. '"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"max":%d}\\n',
    "MARK", summary.requests, summary.duration, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
""".replace("MARK", MARK)


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    socket_errors: int  # connect + read + write + timeout
    non_2xx: int  # responses with a status >= 400 (wrk counts 4xx and 5xx)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def ok(self) -> int:
        return self.requests - self.non_2xx

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


def parse(output: str) -> WrkResult:
    for line in output.splitlines():
        if line.startswith(MARK):
            d = json.loads(line[len(MARK):])
            return WrkResult(
                requests=d["requests"], seconds=d["duration_us"] / 1e6,
                p50_ms=d["p50"] / 1000, p90_ms=d["p90"] / 1000, p99_ms=d["p99"] / 1000,
                max_ms=d["max"] / 1000,
                socket_errors=d["connect"] + d["read"] + d["write"] + d["timeout"],
                non_2xx=d["status"],
            )
    raise ValueError(f"no wrk summary in output:\n{output[-2000:]}")


def script(folder: Path) -> Path:
    path = folder / "wrk-summary.lua"
    if not path.exists():
        path.write_text(SCRIPT)
    return path


def run(port: int, connections: int, seconds: float, folder: Path, cpu: int | None,
        threads: int = 1, timeout: float = 2.0, path: str = "/", scheme: str = "http",
        headers: tuple[str, ...] = ()) -> WrkResult:
    """One wrk run against 127.0.0.1:port; bounded by ``seconds`` plus a margin. ``scheme``
    https: over TLS (wrk resumes no session: each new connection is a full handshake)."""
    argv = [tool("wrk"), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            f"--timeout={timeout:g}s", "-s", str(script(folder))]
    for h in headers:
        argv += ["-H", h]
    argv.append(f"{scheme}://127.0.0.1:{port}{path}")
    out = subprocess.run(pinned(cpu, argv), capture_output=True, text=True,
                         timeout=seconds + timeout + 30, check=False)
    return parse(out.stdout + out.stderr)


class Background:
    """wrk running while something else is measured; ``result`` waits for it. Use as a
    context manager: leaving the block early kills it."""

    def __init__(self, port: int, connections: int, seconds: float, folder: Path, cpu: int | None,
                 threads: int = 1, timeout: float = 2.0) -> None:
        self.seconds = seconds
        argv = [tool("wrk"), f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                f"--timeout={timeout:g}s", "-s", str(script(folder)), f"http://127.0.0.1:{port}/"]
        self.popen = subprocess.Popen(pinned(cpu, argv), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)

    def result(self) -> WrkResult:
        try:
            out, _ = self.popen.communicate(timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            out, _ = self.popen.communicate()
        return parse(out)

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
