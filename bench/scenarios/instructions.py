"""User-space CPU instructions each proxy executes per proxied request, counted
by valgrind's callgrind.

Not part of the default run (it needs valgrind and hey, and takes minutes).
Wall-clock and CPU-time figures swing by ±20 % on a shared machine; an
instruction count does not: the same code serving the same requests executes
the same instructions, within about 1 %, which makes it the figure to compare
code changes with. It leaves out the kernel's work for the system calls, which
the throughput table's CPU µs/req includes.

Each proxy is started as the throughput scenario starts it, which writes its
configuration, then stopped and relaunched under callgrind with that
configuration, adjusted so that nginx serves from the one process valgrind
watches and gatewayd's idle pooled upstream connections do not expire (and get
reopened inside the measurement) while valgrind slows it down. After a warm-up
the counters are zeroed, hey sends REQUESTS requests, and the counters are
dumped: the dump's count over REQUESTS is the figure.

With gatewayd, the same is counted for gatewayd with a no-op admission gate
(bench/gatewayd_nogate.py): the difference is admission's cost per request,
end to end, as steady as the instruction counts themselves (the admission
scenario's CPU-time comparison of the two is within a shared machine's noise).

To compare two commits in one invocation, point GATEWAYD_BASE at a checkout of
the other one with its own ``.venv`` (``git worktree add /tmp/base REV``, then
the README's set-up command there): "gatewayd (base)" is counted too, run from
that checkout, and the two are measured in turns, ``--repeats`` rounds, each
figure the median of its rounds, so that a drift of the machine during the run
falls on both alike.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ..context import Context
from ..deps import tool
from ..procs import pinned
from ..report import Table, ratio
from ..servers import Env, Server, start_proxy

TOOLS = ("hey", "valgrind", "callgrind_control")
REQUESTS = 3000
CONNECTIONS = 50
WARMUP = 1000
START_TIMEOUT = 120.0  # start-up under valgrind is 20-50 times slower
ROOT = Path(__file__).resolve().parents[2]


NOGATE = "gatewayd, no-op gate"
BASE = "gatewayd (base)"


def _base_checkout() -> Path | None:
    """The checkout GATEWAYD_BASE names (another commit of gatewayd, with its own .venv)."""
    path = os.environ.get("GATEWAYD_BASE")
    if not path:
        return None
    base = Path(path).resolve()
    if not (base / ".venv" / "bin" / "python").exists():
        raise RuntimeError(f"GATEWAYD_BASE={path}: no .venv/bin/python there (run the README's set-up in it)")
    return base


def _gatewayd(env: Env, s: Server, module: str = "gatewayd") -> list[str]:
    _edit(s.config, "[upstreams.up]\n", "[upstreams.up]\nkeepalive_timeout = 60.0\n")
    return [env.python, "-m", module, "--config", str(s.config)]


def _gatewayd_nogate(env: Env, s: Server) -> list[str]:
    return _gatewayd(env, s, "bench.gatewayd_nogate")


def _gatewayd_base(env: Env, s: Server) -> list[str]:
    base = _base_checkout()
    assert base is not None
    return [str(base / ".venv" / "bin" / "python"), *_gatewayd(env, s)[1:]]


def _nginx(env: Env, s: Server) -> list[str]:
    _edit(s.config, "master_process on;", "master_process off;")
    return [tool("nginx"), "-p", f"{s.workdir}/", "-e", str(s.workdir / "logs" / "error.log"),
            "-c", str(s.config)]


def _haproxy(env: Env, s: Server) -> list[str]:
    return [tool("haproxy"), "-db", "-f", str(s.config)]


def _edit(config: Path | None, old: str, new: str) -> None:
    """Replace ``old`` in the configuration; fail loudly if servers.py no longer writes it."""
    assert config is not None
    text = config.read_text()
    if old not in text:
        raise RuntimeError(f"{config}: {old!r} not found, cannot adjust it for callgrind")
    config.write_text(text.replace(old, new, 1))


RELAUNCH: dict[str, Callable[[Env, Server], list[str]]] = {
    "gatewayd": _gatewayd, NOGATE: _gatewayd_nogate, BASE: _gatewayd_base, "nginx": _nginx,
    "haproxy": _haproxy}


def run(ctx: Context) -> list[Table]:
    upstream = ctx.upstream()
    kinds = [k for k in ctx.options.proxies if k in RELAUNCH]
    base = _base_checkout()
    if "gatewayd" in kinds:
        kinds.insert(kinds.index("gatewayd") + 1, NOGATE)
        if base is not None:
            kinds.insert(kinds.index("gatewayd"), BASE)
    rounds = ctx.options.repeats if base is not None else 1
    runs: dict[str, list[float]] = {kind: [] for kind in kinds}
    for r in range(rounds):
        for kind in kinds:
            ctx.say(f"instructions: {kind} under callgrind, hey -n {REQUESTS} -c {CONNECTIONS}"
                    + (f" (round {r + 1}/{rounds})" if rounds > 1 else ""))
            runs[kind].append(_instructions(ctx, kind, upstream.port) / REQUESTS)
    per = {kind: statistics.median(figures) for kind, figures in runs.items()}
    table = Table(f"Instructions per request (callgrind; hey -n {REQUESTS} -c {CONNECTIONS}, after "
                  f"{WARMUP} warm-up requests)", ["proxy", "instructions/req", "vs nginx", "requests"])
    for kind in kinds:
        table.add(kind, round(per[kind]), ratio(per[kind], per.get("nginx")), REQUESTS)
    table.notes.append(
        "User-space instructions of the proxy process only (not the kernel's, not the upstream's or "
        "the client's), counted under valgrind: identical run to run within about 1 %, which is why "
        "it is the figure to compare code changes with. It does not include the cost of system "
        "calls, which the throughput table's CPU µs/req does.")
    if BASE in per:
        assert base is not None
        rev = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() or "?"
        change = per["gatewayd"] - per[BASE]
        table.notes.append(
            f"gatewayd (base) is commit {rev} from {base}; gatewayd is this checkout. Median of {rounds} "
            f"rounds measured in turns: {change:+,.0f} instructions per request, "
            f"{100 * change / per[BASE]:+.2f} % against the base. Each round, base then this checkout: "
            + "; ".join(f"{b:,.0f} / {g:,.0f}" for b, g in zip(runs[BASE], runs["gatewayd"], strict=True)) + ".")
    if NOGATE in per:
        cost = per["gatewayd"] - per[NOGATE]
        table.notes.append(
            f"Admission, end to end: gatewayd with its gate against a no-op gate (limits that never "
            f"bind): {cost:+,.0f} instructions per request, {100 * cost / per['gatewayd']:+.2f} % of its "
            "total (the counts repeat within about 1 %). Goal: admission <= 5 %.")
    skipped = [k for k in ctx.options.proxies if k not in RELAUNCH]
    if skipped:
        table.notes.append(f"Not measured here: {', '.join(skipped)}.")
    return [table]


def _instructions(ctx: Context, kind: str, upstream_port: int) -> int:
    """Instructions (Ir) ``kind`` executed over REQUESTS requests on a warm proxy."""
    plain = start_proxy(ctx.env, "gatewayd" if kind in (NOGATE, BASE) else kind, upstream_port,
                        nogate=kind == NOGATE)
    ctx.env.procs.stop(plain.proc)
    out = plain.workdir / "cg.out"
    argv = [tool("valgrind"), "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--dump-instr=no",
            *RELAUNCH[kind](ctx.env, plain)]
    # `python -m gatewayd` imports from its working directory first: the base runs from its own
    base = _base_checkout() if kind == BASE else None
    proc = ctx.env.procs.start(f"{kind}-callgrind", argv, ctx.env.proxy_cpu, cwd=base or ROOT)
    try:
        proc.wait_port(plain.port, START_TIMEOUT)
        _hey(ctx, plain.port, WARMUP)
        _control("-z", proc.pid)
        ok = _hey(ctx, plain.port, REQUESTS)
        if ok != REQUESTS:
            raise RuntimeError(f"{kind}: {ok} of {REQUESTS} requests answered 200 under callgrind")
        _control("-d", proc.pid)
        return _total(out, proc.pid)
    finally:
        ctx.env.procs.stop(proc)


def _hey(ctx: Context, port: int, n: int) -> int:
    """Send ``n`` requests over CONNECTIONS connections; the number answered 200."""
    argv = [tool("hey"), "-n", str(n), "-c", str(CONNECTIONS), f"http://127.0.0.1:{port}/"]
    done = subprocess.run(pinned(ctx.env.load_cpu, argv), capture_output=True, text=True, timeout=900,
                          check=True)
    found = re.search(r"^\s*\[200\]\s+(\d+) responses", done.stdout, re.MULTILINE)
    return int(found.group(1)) if found else 0


def _control(flag: str, pid: int) -> None:
    """``callgrind_control -z`` (zero the counters) or ``-d`` (dump them) for the process ``pid``."""
    done = subprocess.run([tool("callgrind_control"), flag, str(pid)], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"callgrind_control {flag} {pid}: {done.stdout}{done.stderr}")


def _total(out: Path, pid: int, timeout: float = 120.0) -> int:
    """Ir of the newest dump (``cg.out.PID.N``, highest N; the file without N is written at exit)
    once it is complete (its "totals:" line, at the end, is there). The figure is its "summary:",
    the instructions counted as they ran since the zeroing; "totals:", the sum of the costs the
    file lists, is up to about 2 % higher for gatewayd (not for nginx or HAProxy), run after run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = sorted(out.parent.glob(f"{out.name}.{pid}.*"), key=lambda p: int(p.suffix[1:]))
        text = parts[-1].read_text() if parts else ""
        summary = re.search(r"^summary:\s+(\d+)", text, re.MULTILINE)
        if summary and re.search(r"^totals:", text, re.MULTILINE):
            return int(summary.group(1))
        time.sleep(0.2)
    raise RuntimeError(f"no complete callgrind dump {out}.{pid}.N after {timeout:g} s")
