"""The apps scenario's servers counted by callgrind: user-space instructions per
request of gatewayd (``interface = "asgi"``) and of uvicorn serving the same
application, as the instructions scenario counts the proxies.

Not part of the default run (valgrind and hey; about 3 minutes). req/s and CPU
time move by a fifth and more on a shared machine from one run to the next;
instruction counts repeat within about 1 %, so their ratio is the steady
figure for "how much cheaper is an app under gatewayd than under uvicorn". It
leaves out the kernel's work (the system calls, a similar number per request
for both: one read and one write on a keep-alive connection).

Each server is started as the apps scenario starts it (same argv, same
configuration), stopped, and relaunched under callgrind; after WARMUP requests
the counters are zeroed, ``hey -n REQUESTS -c 50`` is sent and the counters are
dumped. The dumps (``cg.out.PID.N`` in the server's folder) are kept:
``callgrind_annotate`` on one lists the C functions the instructions went to.
"""

from __future__ import annotations

from ..context import Context
from ..deps import tool
from ..report import Table, ratio
from ..servers import Server
from .apps import APPS, servers, start
from .instructions import CONNECTIONS, REQUESTS, ROOT, START_TIMEOUT, WARMUP, _control, _hey, _total

TOOLS = ("hey", "valgrind", "callgrind_control")


def run(ctx: Context) -> list[Table]:
    kinds = servers(ctx)
    per: dict[tuple[str, str], float] = {}
    for label, app, _ in APPS:
        for kind in kinds:
            ctx.say(f"apps-instructions: {label}, {kind} under callgrind, hey -n {REQUESTS} -c {CONNECTIONS}")
            per[(label, kind)] = _instructions(ctx, kind, app) / REQUESTS
    table = Table(f"Apps: instructions per request (callgrind; hey -n {REQUESTS} -c {CONNECTIONS}, after "
                  f"{WARMUP} warm-up requests)", ["app", "server", "instructions/req", "vs uvicorn"])
    for label, _, _ in APPS:
        for kind in kinds:
            table.add(label, kind, round(per[(label, kind)]), ratio(per[(label, kind)], per[(label, "uvicorn")]))
    table.notes.append(
        "User-space instructions of the server process only, counted under valgrind (identical run to run "
        "within about 1 %); not the system calls, which the apps throughput table's CPU µs/req includes.")
    return [table]


def _argv(server: Server) -> list[str]:
    """The argv the server was started with, without its ``taskset -c N`` prefix."""
    args = [str(a) for a in server.proc.popen.args]  # type: ignore[union-attr]
    return args[3:] if args[0] == "taskset" else args


def _instructions(ctx: Context, kind: str, app: str) -> int:
    plain = start(ctx, kind, app)
    ctx.env.procs.stop(plain.proc)
    out = plain.workdir / "cg.out"
    argv = [tool("valgrind"), "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--dump-instr=no",
            *_argv(plain)]
    proc = ctx.env.procs.start(f"{kind}-callgrind", argv, ctx.env.proxy_cpu, cwd=ROOT)
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
