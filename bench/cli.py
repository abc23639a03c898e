"""``python -m bench``: run the scenarios, print the tables, keep a report.

Everything the run starts is stopped on the way out: normal end, error,
Ctrl-C, SIGTERM, or the --max-minutes deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from . import deps, machine
from .context import Context, Options
from .procs import Processes
from .report import Table
from .scenarios import DEFAULT, NEEDS, SCENARIOS
from .servers import PROXIES, Env

RESULTS = Path(__file__).resolve().parent / "results"


class Deadline(Exception):
    pass


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(DEFAULT),
                   help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: {', '.join(DEFAULT)}); "
                        "tls: keep-alive and new-connection rates, idle memory and overload over HTTPS "
                        "(gatewayd, nginx, HAProxy; a certificate made for the run); tunnels: WebSocket tunnels, idle "
                        "memory at 10,000, echo over 1,000, bulk, back-pressure (gatewayd, nginx)")
    p.add_argument("--proxies", default=",".join(PROXIES), help=f"comma-separated, from: {', '.join(PROXIES)}")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, short runs (< 2 minutes)")
    p.add_argument("--duration", type=float, help="seconds per measured wrk run (default 8; quick 2)")
    p.add_argument("--repeats", type=int, help="runs per figure, median kept (default 3; quick 1)")
    p.add_argument("--proxy-cpu", type=int, default=0, help="CPU the proxy under test is pinned to")
    p.add_argument("--load-cpu", type=int, default=1, help="CPU for wrk, the upstreams and the harness")
    p.add_argument("--out", type=Path, help="folder for the report and logs (default bench/results/<time>)")
    p.add_argument("--max-minutes", type=float, help="stop everything after this long (default 25; quick 5)")
    p.add_argument("--no-install", action="store_true", help="fail instead of apt-get installing tools")
    return p


def options(args: argparse.Namespace) -> Options:
    quick = args.quick
    proxies = tuple(p for p in args.proxies.split(",") if p)
    unknown = set(proxies) - set(PROXIES)
    if unknown:
        raise SystemExit(f"unknown proxies: {', '.join(sorted(unknown))}")
    return Options(
        duration=args.duration or (2.0 if quick else 8.0),
        repeats=args.repeats or (1 if quick else 3),
        warmup=0.0 if quick else 2.0,
        proxies=proxies,
        quick=quick,
        idle_connections=500 if quick else 5000,
        cancel_requests=100 if quick else 1000,
        overload_duration=2.0 if quick else 8.0,
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    names = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in names if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(unknown)} (have: {', '.join(SCENARIOS)})")
    opts = options(args)
    deps.ensure(install=not args.no_install, extra=[t for n in names for t in NEEDS.get(n, ())])
    proxy_cpu, load_cpu = _cpus(args.proxy_cpu, args.load_cpu)
    _raise_fd_limit()

    # absolute: gatewayd takes a relative control socket path from its configuration's folder
    out = (args.out or RESULTS / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=out))
    procs = Processes(tmp)
    ctx = Context(opts, Env(tmp, procs, proxy_cpu, load_cpu))
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    info = machine.describe()
    tables: list[Table] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGALRM:
            raise Deadline(f"--max-minutes reached after {(time.monotonic() - started) / 60:.1f} min")
        raise KeyboardInterrupt

    started = time.monotonic()
    load = machine.LoadMeter()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(sig, stop)
    signal.alarm(int((args.max_minutes or (5 if opts.quick else 25)) * 60))
    status = 0
    try:
        for name in names:
            ctx.say(f"scenario {name}")
            new = SCENARIOS[name](ctx)
            for t in new:
                print(t.markdown(), flush=True)
            tables += new
    except (KeyboardInterrupt, Deadline) as exc:
        ctx.say(f"stopped: {str(exc) or 'interrupted'}")
        status = 130
    finally:
        signal.alarm(0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        procs.close()
        info["other load"] = load.foreign()
        _write(out, command, info, tables, time.monotonic() - started)
    ctx.say(f"done in {(time.monotonic() - started) / 60:.1f} min; report: {out / 'report.md'}")
    return status


def _cpus(proxy_cpu: int, load_cpu: int) -> tuple[int | None, int | None]:
    """Pin the harness itself to the load CPU; no pinning at all on a single CPU."""
    allowed = os.sched_getaffinity(0)
    if {proxy_cpu, load_cpu} <= allowed and proxy_cpu != load_cpu:
        os.sched_setaffinity(0, {load_cpu})
        return proxy_cpu, load_cpu
    print(f"warning: CPUs {proxy_cpu} and {load_cpu} not both available ({sorted(allowed)}): "
          "running unpinned, figures are not comparable", file=sys.stderr)
    return None, None


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _write(out: Path, command: str, info: dict[str, str], tables: list[Table], seconds: float) -> None:
    lines = [f"# gatewayd benchmark, {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Command: `{command}` ({seconds / 60:.1f} min)", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines.append("")
    lines += [t.markdown() for t in tables]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(
        {"command": command, "machine": info, "seconds": seconds, "tables": [t.as_dict() for t in tables]},
        indent=1, default=str))
