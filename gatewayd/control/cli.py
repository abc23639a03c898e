"""``gatewayctl``: the control socket for scripts and people.

Exit status: 0 ok, 1 the gateway answered ``ok: false``, 2 usage, 3 cannot connect,
141 standard output closed before all was written (``| head``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.loader import DEFAULT_CONFIG
from ..exits import EXIT_CONNECT, EXIT_OK, EXIT_PIPE, EXIT_REFUSED, EXIT_USAGE

if TYPE_CHECKING:  # types only: importing them would load the proxy and aiohttp (~0.3 s a command)
    from .protocol import Request, RouteSnapshot, ServerSnapshot, SetLimitRequest, Snapshot, Waiter


class Unreachable(ConnectionError):
    """No gatewayd answered on the socket (an OSError, for callers that catch those)."""


def socket_from_config(config: str) -> Path:
    """The control socket path a config file names (relative to the file's folder)."""
    with open(config, "rb") as fh:
        data = tomllib.load(fh)
    raw = data.get("control", {}).get("socket", "gatewayd.sock")
    p = Path(raw)
    return p if p.is_absolute() else Path(config).resolve().parent / p


def call(path: Path, request: Request, timeout: float = 60.0) -> dict[str, Any]:
    """One request line, one answer line (as sent: read with care, the gateway may be
    another version)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
    except OSError as exc:
        raise Unreachable(f"{path}: {exc.strerror or exc}") from None
    if not buf:
        raise Unreachable(f"{path}: connection closed without an answer")
    answer: dict[str, Any] = json.loads(buf)
    return answer


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}"


def print_status(s: Snapshot) -> None:
    lr = s.get("last_reload")
    reload_text = "never" if not lr else ("ok" if lr.get("ok") else f"FAILED: {lr.get('error')}")
    print(f"gatewayd {s.get('version')}  pid {s.get('pid')}  up {s.get('uptime_s', 0):.0f}s  "
          f"generation {s.get('generation')}  last reload {reload_text}")
    lag = s.get("loop_lag_ms", {})
    gcp = s.get("gc", {}).get("pause_ms", {})
    print(f"connections {s.get('connections')}  tasks {s.get('tasks')}  workers "
          f"{len(s.get('workers', []))}  loop lag {_ms(lag.get('last'))}/{_ms(lag.get('max'))} ms  "
          f"gc pause {_ms(gcp.get('last'))}/{_ms(gcp.get('max'))} ms")
    tls = tls_line(s)
    if tls:
        print(tls)
    print()
    # 80 columns: the served and gateway-answered counts beside the latency (which is
    # the served requests' only), then a line of what else became of the requests
    print(f"{'ROUTE':<12} {'IN-FLIGHT':>11} {'QUEUED':>11} {'OLDEST':>8} {'SERVED':>8} "
          f"{'GATEWAY':>8} {'P50MS':>7} {'P99MS':>7}")
    for r in s.get("routes", []):
        lat = r.get("latency_ms", {})
        rej = r.get("rejected", {})
        print(f"{r['name']:<12} {r['in_flight']:>5}/{r['max_concurrency']:<5} "
              f"{r['queued']:>5}/{r['max_queue']:<5} {r.get('oldest_wait_ms', 0) / 1000:>7.2f}s "
              f"{r.get('served', 0):>8} {r.get('gateway_answers', 0):>8} "
              f"{_ms(lat.get('p50')):>7} {_ms(lat.get('p99')):>7}")
        print(f"  requests {r['requests']}  full {rej.get('queue_full', 0)}  "
              f"timeout {rej.get('queue_timeout', 0)}  cancelled {r.get('cancelled', 0)}  "
              f"upstream errors {r.get('upstream_errors', 0)}")
        tunnels = tunnels_line(r)
        if tunnels:
            print(tunnels)
        deadlines = deadlines_line(r)
        if deadlines:
            print(deadlines)


def tunnels_line(r: RouteSnapshot) -> str | None:
    """``  tunnels 12/10000  opened 345  full 2`` for a route that carries WebSocket
    (``max_tunnels`` above 0); None for another route, or from a gatewayd without it."""
    cap = r.get("max_tunnels")
    if not cap:
        return None
    return (f"  tunnels {r.get('tunnels', 0)}/{cap}  opened {r.get('tunnels_total', 0)}  "
            f"full {r.get('rejected', {}).get('tunnels_full', 0)}")


def deadlines_line(r: RouteSnapshot) -> str | None:
    """``  service 100.0 ms  completes 200.0/s  deadline 3  preempted 1  route timeout 0``:
    the route's estimates and its deadline and class refusals (SPEC §12), for a route
    with an estimate or one of those refusals; None for another, or from a gatewayd
    without them."""
    est = r.get("estimates")
    rej = r.get("rejected", {})
    counts = [rej.get(k, 0) for k in ("deadline", "preempted", "route_timeout")]
    service = est.get("service_ms") if est else None
    rate = est.get("completion_rate", 0.0) if est else 0.0
    if service is None and not rate and not any(counts):
        return None
    return (f"  service {_ms(service)} ms  completes {rate:.1f}/s  deadline {counts[0]}  "
            f"preempted {counts[1]}  route timeout {counts[2]}")


def waiter_line(w: Waiter) -> str:
    """A waiter of ``queue``: its wait, request and client, then its class and the seconds
    left of its deadline (SPEC §12) when the gatewayd says them."""
    line = f"{w['wait_ms'] / 1000:8.3f}s  {w['method']:<7} {w['path']}  from {w['client']}"
    priority = w.get("priority")
    if priority is not None:
        left = w.get("deadline_in")
        line += f"  {priority}  " + ("no deadline" if left is None else f"{left:.3f}s left")
    return line


def expiry_text(not_after: float, now: float) -> str:
    """``2026-12-12 (5 days left)``, ``2026-12-12 (7 h left)`` or ``2026-11-01 (EXPIRED
    3 days ago)``: the date in UTC, whole days (or hours) rounded down."""
    date = time.strftime("%Y-%m-%d", time.gmtime(not_after))
    left = not_after - now
    if left <= 0:
        days = int(-left // 86400)
        return f"{date} (EXPIRED {days} day{'s' * (days != 1)} ago)" if days else f"{date} (EXPIRED today)"
    days = int(left // 86400)
    if days:
        return f"{date} ({days} day{'s' * (days != 1)} left)"
    return f"{date} ({int(left // 3600)} h left)"


def tls_line(s: Snapshot, width: int = 80) -> str | None:
    """``tls handshakes N  errors N  expires DATE (N days left) CERT``: the soonest to
    expire of the certificates in force, its path cut from the left to ``width``; None
    without TLS."""
    tls = s.get("tls")
    if not tls or not (tls.get("certificates") or tls.get("handshakes") or tls.get("handshake_errors")):
        return None
    line = f"tls handshakes {tls.get('handshakes', 0)}  errors {tls.get('handshake_errors', 0)}"
    certs = [c for c in tls.get("certificates", []) if isinstance(c.get("not_after"), (int, float))]
    if not certs:
        return line
    soonest = min(certs, key=lambda c: c["not_after"])
    line += "  expires " + expiry_text(soonest["not_after"], s.get("time") or time.time()) + " "
    name = str(soonest.get("cert", "?"))
    room = max(width - len(line), 12)
    return line + (name if len(name) <= room else "…" + name[-(room - 1):])


def upstream_lines(s: Snapshot, width: int = 80) -> list[str]:
    """Each upstream with servers as ``upstream NAME: SERVER STATE, ...``, wrapped at
    ``width`` between servers onto indented lines (handler upstreams have none)."""
    now = s.get("time") or time.time()
    out = []
    for u in s.get("upstreams", []):
        head = f"upstream {u['name']}: "
        indent = " " * (len(head) if len(head) <= width // 2 else 4)
        servers = u.get("servers", [])
        line, fresh = head, True
        for i, server in enumerate(servers):
            piece = server_text(server, now) + ("," if i + 1 < len(servers) else "")
            if not fresh and len(line) + 1 + len(piece) > width:
                out.append(line)
                line, fresh = indent, True
            line += piece if fresh else " " + piece
            fresh = False
        out.append(line)
    return out


def server_text(s: ServerSnapshot, now: float) -> str:
    """``host:port state``, with why and for how long when it is out of rotation."""
    state = s.get("state", "?")
    why = []
    if state == "ejected":
        until = s.get("ejected_until")
        if until is not None:
            why.append(f"{max(0, math.ceil(until - now))} s left")
        why.append(s.get("last_error") or "")
    elif state == "kept":
        why += [f"{s.get('consecutive_failures', 0)} failed in a row", s.get("last_error") or ""]
    elif state == "unhealthy":
        why.append(s.get("last_check") or "")
    elif state == "down":
        why.append("by hand")
    workers, healthy = s.get("workers", 1), s.get("healthy_workers", 0)
    if not s.get("healthy", True) and 0 < healthy < workers:
        why.append(f"in {workers - healthy} of {workers} workers")
    why = [w for w in why if w]
    name = s.get("url", "?").removeprefix("http://").rstrip("/")
    return f"{name} {state}" + (f" ({', '.join(why)})" if why else "")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gatewayctl", description="Talk to a running gatewayd.")
    _common_options(p, None)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        # the common options after the command too (``status --config c.toml``); unset
        # there, they leave what was given before the command in place
        c = sub.add_parser(name, help=help)
        _common_options(c, argparse.SUPPRESS)
        return c

    command("status", "one-screen summary")
    command("snapshot", "the full snapshot as JSON")
    q = command("queue", "a route's waiters, oldest first")
    q.add_argument("route")
    cl = command("clients", "a route's clients: the most queue places, then the most refused")
    cl.add_argument("route")
    cl.add_argument("--top", type=int, default=10, metavar="N", help="how many (default 10)")
    sl = command("set-limit", "change a route's limits until the next reload")
    sl.add_argument("route")
    sl.add_argument("concurrency", nargs="?", type=int, help="max_concurrency")
    sl.add_argument("--concurrency", dest="concurrency_opt", type=int, metavar="N")
    sl.add_argument("--queue", type=int, metavar="M", help="max_queue")
    r = command("reload", "reload the configuration and print what changed")
    r.add_argument("--dry-run", action="store_true", help="validate and diff only, change nothing")
    return p


def _common_options(p: argparse.ArgumentParser, default: Any) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", "-s", metavar="PATH", default=default, help="control socket path")
    where.add_argument("--config", "-c", metavar="PATH", default=default,
                       help="read the socket path from this configuration file")
    p.add_argument("--json", action="store_true", default=False if default is None else default,
                   help="print the JSON answer on one line")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if args.socket is not None and args.config is not None:  # one before the command, one after
        p.error("argument --config/-c: not allowed with argument --socket/-s")
    return args


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    if os.environ.get("GATEWAYD_SOCKET") and not args.config:
        return Path(os.environ["GATEWAYD_SOCKET"])
    return socket_from_config(args.config or os.environ.get("GATEWAYD_CONFIG", DEFAULT_CONFIG))


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit statuses in ``exits``."""
    try:
        code = run(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader left early (``gatewayctl status | head -1``): no traceback, as ``ls``
        # prints none; what is still buffered goes nowhere instead of failing again at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())
        return EXIT_PIPE
    return code


def run(argv: list[str] | None) -> int:
    args = parse(argv)
    try:
        path = _socket_path(args)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        print(f"gatewayctl: cannot read the configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    cmd = args.command
    if cmd in ("status", "snapshot"):
        request: Request = {"cmd": "snapshot"}
    elif cmd == "queue":
        request = {"cmd": "queue", "route": args.route}
    elif cmd == "clients":
        request = {"cmd": "clients", "route": args.route, "top": args.top}
    elif cmd == "set-limit":
        mc = args.concurrency if args.concurrency is not None else args.concurrency_opt
        if mc is None and args.queue is None:
            print("gatewayctl: set-limit needs a concurrency and/or --queue", file=sys.stderr)
            return EXIT_USAGE
        limits: SetLimitRequest = {"cmd": "set_limit", "route": args.route}
        if mc is not None:
            limits["max_concurrency"] = mc
        if args.queue is not None:
            limits["max_queue"] = args.queue
        request = limits
    else:
        request = {"cmd": "reload", "dry_run": bool(args.dry_run)}
    try:
        answer = call(path, request)
    except Unreachable as exc:
        print(f"gatewayctl: cannot reach gatewayd: {exc}", file=sys.stderr)
        return EXIT_CONNECT
    if not answer.get("ok"):
        if args.json:
            print(json.dumps(answer))
        print(f"gatewayctl: {answer.get('error', 'failed')}", file=sys.stderr)
        return EXIT_REFUSED
    if args.json:  # the answer as it came, on one line (gatewayctl(1))
        print(json.dumps(answer))
    elif cmd == "snapshot":
        print(json.dumps(answer["snapshot"], indent=2))
    elif cmd == "status":
        print_status(answer["snapshot"])
        upstreams = upstream_lines(answer["snapshot"])
        if upstreams:
            print()
            print("\n".join(upstreams))
    elif cmd == "queue":
        waiters = answer.get("waiters", [])
        print(f"{len(waiters)} waiting on route {args.route}")
        for w in waiters:
            print(waiter_line(w))
    elif cmd == "clients":
        rows = answer.get("clients", [])
        print(f"{'client':<39} {'queued':>7} {'rate_limited':>12} {'queue_full':>10}")
        for c in rows:
            print(f"{c['client']:<39} {c['queued']:>7} {c['rate_limited']:>12} {c['client_queue_full']:>10}")
    elif cmd == "set-limit":
        print(f"route {answer['route']}: max_concurrency {answer['max_concurrency']}, "
              f"max_queue {answer['max_queue']} (until the next reload)")
    else:
        label = "would change" if answer.get("dry_run") else f"generation {answer.get('generation')}"
        changes = answer.get("changes", [])
        print(f"reload ok: {label}; {len(changes)} change(s)")
        for c in changes:
            print(f"  {c}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
