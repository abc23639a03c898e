"""``gatewayctl``: the control socket for scripts and people.

Exit status: 0 ok, 1 the gateway answered ``ok: false``, 2 usage, 3 cannot connect.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tomllib
from pathlib import Path
from typing import Any

from ..config.loader import DEFAULT_CONFIG
from ..exits import EXIT_CONNECT, EXIT_OK, EXIT_REFUSED, EXIT_USAGE
from .protocol import Request, SetLimitRequest, Snapshot


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
    print()
    head = (f"{'ROUTE':<16} {'IN-FLIGHT':>11} {'QUEUED':>11} {'OLDEST':>8} {'REQUESTS':>9} "
            f"{'FULL':>6} {'TIMEOUT':>7} {'CANCEL':>6} {'UPERR':>6} {'P50MS':>7} {'P99MS':>7}")
    print(head)
    for r in s.get("routes", []):
        lat = r.get("latency_ms", {})
        rej = r.get("rejected", {})
        print(f"{r['name']:<16} {r['in_flight']:>5}/{r['max_concurrency']:<5} "
              f"{r['queued']:>5}/{r['max_queue']:<5} {r.get('oldest_wait_ms', 0) / 1000:>7.2f}s "
              f"{r['requests']:>9} {rej.get('queue_full', 0):>6} {rej.get('queue_timeout', 0):>7} "
              f"{r.get('cancelled', 0):>6} {r.get('upstream_errors', 0):>6} "
              f"{_ms(lat.get('p50')):>7} {_ms(lat.get('p99')):>7}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gatewayctl", description="Talk to a running gatewayd.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", "-s", metavar="PATH", help="control socket path")
    where.add_argument("--config", "-c", metavar="PATH",
                       help="read the socket path from this configuration file")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", help="one-screen summary")
    sub.add_parser("snapshot", help="the full snapshot as JSON")
    q = sub.add_parser("queue", help="a route's waiters, oldest first")
    q.add_argument("route")
    sl = sub.add_parser("set-limit", help="change a route's limits until the next reload")
    sl.add_argument("route")
    sl.add_argument("concurrency", nargs="?", type=int, help="max_concurrency")
    sl.add_argument("--concurrency", dest="concurrency_opt", type=int, metavar="N")
    sl.add_argument("--queue", type=int, metavar="M", help="max_queue")
    r = sub.add_parser("reload", help="reload the configuration and print what changed")
    r.add_argument("--dry-run", action="store_true", help="validate and diff only, change nothing")
    return p


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    if os.environ.get("GATEWAYD_SOCKET") and not args.config:
        return Path(os.environ["GATEWAYD_SOCKET"])
    return socket_from_config(args.config or os.environ.get("GATEWAYD_CONFIG", DEFAULT_CONFIG))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
    elif cmd == "queue":
        waiters = answer.get("waiters", [])
        print(f"{len(waiters)} waiting on route {args.route}")
        for w in waiters:
            print(f"{w['wait_ms'] / 1000:8.3f}s  {w['method']:<7} {w['path']}  from {w['client']}")
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
