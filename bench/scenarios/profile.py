"""Where gatewayd's time goes: py-spy samples it under wrk -c50.

Not part of the default run (it needs py-spy, which the project does not
depend on: ``pip install py-spy``). Samples are taken without pausing the
process (``--nonblocking``); each sample's innermost Python frame gets the
sample as "own" time, every frame on the stack as "total" time. Time in C
code (uvloop, aiohttp's parser) is charged to the Python frame that called it.

``GATEWAYD_APP=bench.apps:hello bench/run --scenarios profile``: gatewayd serving
that ASGI application in-process (as the apps scenario does) instead of
proxying to nginx.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from .. import wrk
from ..context import Context
from ..procs import pinned
from ..report import Table
from ..servers import Limits, gatewayd, gatewayd_app

TOP = 25
ROOT = str(Path(__file__).resolve().parents[2]) + "/"
RATE = 250  # samples per second


def run(ctx: Context) -> list[Table]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return [Table("Profile: skipped (py-spy not installed: pip install py-spy)", ["-"])]
    app = os.environ.get("GATEWAYD_APP")
    seconds = max(ctx.options.duration, 10.0)
    raw = ctx.env.tmp / "gatewayd.pyspy.txt"
    what = f"gatewayd serving {app}" if app else "gatewayd"
    ctx.say(f"profile: {what} under wrk -c50 for {seconds:g} s")
    if app:
        server = gatewayd_app(ctx.env, app, Limits())
    else:
        server = gatewayd(ctx.env, ctx.upstream().port, Limits())
    try:
        ctx.warm(server)
        argv = [spy, "record", "--pid", str(server.proc.pid), "--duration", str(round(seconds)),
                "--rate", str(RATE), "--nonblocking", "--function", "--format", "raw",
                "--output", str(raw)]
        with wrk.Background(server.port, 50, seconds + 2, ctx.env.tmp, ctx.env.load_cpu) as load:
            subprocess.run(pinned(ctx.env.load_cpu, argv), capture_output=True, timeout=seconds + 60,
                           check=True)
            result = load.result()
    finally:
        ctx.env.procs.stop(server.proc)
    own, total, samples = _fold(raw.read_text())
    table = Table(
        f"Profile: {what} under wrk -c50 ({result.rps:,.0f} req/s while sampled), "
        f"{samples:,} samples, top {TOP} by own time",
        ["function", "own %", "total %"],
    )
    for frame, n in own.most_common(TOP):
        table.add(frame, 100 * n / samples, 100 * total[frame] / samples)
    table.notes.append(f"raw stacks: {raw} (flamegraph-compatible folded format)")
    return [table]


def _fold(text: str) -> tuple[Counter[str], Counter[str], int]:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        samples += n
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    return own, total, samples


def _short(frame: str) -> str:
    """``handler (/x/site-packages/aiohttp/web_protocol.py:123)`` -> ``handler (aiohttp/web_protocol.py:123)``."""
    name, _, where = frame.partition(" (")
    for marker in ("site-packages/", "/lib/python3", ROOT):
        i = where.find(marker)
        if i >= 0:
            where = where[i + len(marker):]
            if marker == "/lib/python3":
                where = "stdlib" + where[where.find("/"):]
            break
    return f"{name} ({where}" if where else name
