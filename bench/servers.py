"""The servers under test and their configurations, each on 127.0.0.1 only.

Every server gets its own files (configuration, pid, logs, temp paths) under
the run's temporary folder. The proxies run pinned to the proxy CPU; upstreams
on the load CPU.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from .certs import Pem
from .deps import tool
from .procs import Proc, Processes, free_port

BODY = b"x" * 99 + b"\n"  # the upstream's fixed 100-byte body
ROUTE = "bench"
PROXIES = ("gatewayd", "nginx", "haproxy", "naive")


@dataclass
class Limits:
    """A route's admission limits (HAProxy: server maxconn and timeout queue)."""

    max_concurrency: int = 1_000_000
    max_queue: int = 0
    queue_timeout: float = 1.0

    @property
    def binding(self) -> bool:
        return self.max_concurrency < 1_000_000


@dataclass
class Env:
    """Where a run keeps its files and which CPUs it pins to."""

    tmp: Path
    procs: Processes
    proxy_cpu: int | None
    load_cpu: int | None
    python: str = sys.executable
    counter: dict[str, int] = field(default_factory=dict)

    def folder(self, name: str) -> Path:
        n = self.counter[name] = self.counter.get(name, 0) + 1
        d = self.tmp / f"{name}-{n}"
        d.mkdir(parents=True)
        return d


@dataclass
class Server:
    """A started server: its process, port and configuration file."""

    kind: str
    proc: Proc
    port: int
    config: Path | None
    workdir: Path
    scheme: str = "http"  # https: the server terminates TLS on ``port``


# ----------------------------------------------------------------------------- upstreams
def nginx_upstream(env: Env) -> Server:
    """nginx answering every request with the fixed 100-byte body (1 worker, load CPU)."""
    d = env.folder("upstream-nginx")
    port = free_port()
    body = BODY.decode().rstrip("\n")
    conf = _nginx_main(d, f"""
        server {{
            listen 127.0.0.1:{port} reuseport backlog=4096;
            keepalive_requests 1000000;
            keepalive_timeout 75s;
            location / {{ default_type text/plain; return 200 "{body}\\n"; }}
        }}
    """)
    return _start_nginx(env, "upstream-nginx", d, conf, port, env.load_cpu)


def python_upstream(env: Env, delay: float, slots: int, report: float = 0.0) -> Server:
    """bench.upstream: answers after ``delay`` s, at most ``slots`` at once (load CPU); with
    ``report``, it logs its count of served requests that often (see ``served_rate``)."""
    d = env.folder("upstream-py")
    port = free_port()
    argv = [env.python, "-m", "bench.upstream", "--port", str(port), "--delay", str(delay),
            "--slots", str(slots)]
    if report:
        argv += ["--report", str(report)]
    proc = env.procs.start("upstream-py", argv, env.load_cpu, cwd=_repo())
    proc.wait_port(port)
    return Server("upstream-py", proc, port, None, d)


def served_rate(upstream: Server, start: float, end: float) -> float:
    """Requests per second a ``report``-ing python_upstream served between two
    ``time.monotonic()`` instants (the samples closest inside them); NaN with fewer than two."""
    samples = []
    for line in upstream.proc.log.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "served" and parts[1] == str(upstream.proc.pid):
            t, n = float(parts[2]), int(parts[3])
            if start <= t <= end:
                samples.append((t, n))
    if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
        return float("nan")
    return (samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])


@dataclass
class LateCounts:
    """What a ``report``-ing python_upstream counted between two instants."""

    tagged: int = 0  # requests with X-Bench-Give-Up finished
    late: int = 0  # ... of them after that instant
    budgeted: int = 0  # requests received with X-Request-Timeout
    budget_ms: float = float("nan")  # its mean value, ms

    @property
    def late_share(self) -> float:
        return 100 * self.late / self.tagged if self.tagged else float("nan")


def late_counts(upstream: Server, start: float, end: float) -> LateCounts:
    """A ``report``-ing python_upstream's counts between two ``time.monotonic()`` instants
    (the samples closest inside them); zeros with fewer than two."""
    samples = []
    for line in upstream.proc.log.read_text(errors="replace").splitlines():
        parts = line.split()
        if (len(parts) == 7 and parts[0] == "late" and parts[1] == str(upstream.proc.pid)
                and start <= float(parts[2]) <= end):
            samples.append((int(parts[3]), int(parts[4]), int(parts[5]), float(parts[6])))
    if len(samples) < 2:
        return LateCounts()
    (t0, l0, b0, s0), (t1, l1, b1, s1) = samples[0], samples[-1]
    return LateCounts(t1 - t0, l1 - l0, b1 - b0, (s1 - s0) / (b1 - b0) if b1 > b0 else float("nan"))


# ----------------------------------------------------------------------------- proxies
def start_proxy(env: Env, kind: str, upstream_port: int, limits: Limits | None = None,
                nogate: bool = False, tls: Pem | None = None) -> Server:
    """Start the proxy ``kind`` (one of PROXIES) in front of ``upstream_port``; with ``tls``,
    its listener terminates TLS with that certificate (TLS 1.2 and 1.3, session tickets on)."""
    limits = limits or Limits()
    if kind == "gatewayd":
        return gatewayd(env, upstream_port, limits, nogate=nogate, tls=tls)
    if kind == "nginx":
        return nginx_proxy(env, upstream_port, tls=tls)
    if kind == "haproxy":
        return haproxy(env, upstream_port, limits, tls=tls)
    if kind == "naive" and tls is None:
        return naive(env, upstream_port)
    raise ValueError(kind if tls is None else f"{kind} over TLS")


def gatewayd_head(port: int, upstream_port: int, sock: Path, access_log: str = "off",
                  tls: Pem | None = None, workers: int = 1, max_connections: int = 15000,
                  upstream_connections: int = 1000) -> str:
    """The [server], [control], [log] and upstream tables every gatewayd run uses (and [tls]
    with a TLS listener)."""
    listen = f'{{address = "127.0.0.1:{port}", tls = true}}' if tls else f'"127.0.0.1:{port}"'
    return textwrap.dedent(f"""\
        [server]
        listen = [{listen}]
        workers = {workers}
        max_connections = {max_connections}
        keepalive_timeout = 75.0
        shutdown_timeout = 1.0

        [control]
        socket = "{sock}"

        [log]
        level = "warning"
        access_log = "{access_log}"

        [upstreams.up]
        servers = ["http://127.0.0.1:{upstream_port}"]
        max_connections = {upstream_connections}
    """) + (_gatewayd_tls(tls) if tls else "")


def _gatewayd_tls(tls: Pem) -> str:
    return textwrap.dedent(f"""
        [tls]
        min_version = "1.2"
        session_tickets = true

        [[tls.certificates]]
        cert = "{tls.cert}"
        key = "{tls.key}"
    """)


def gatewayd_config(port: int, upstream_port: int, sock: Path, limits: Limits, tls: Pem | None = None,
                    route_keys: str = "") -> str:
    """The route every scenario measures, with ``route_keys`` (TOML lines) added;
    ``$GATEWAYD_ROUTE_KEYS`` adds keys to it, to measure what a feature costs:
    ``GATEWAYD_ROUTE_KEYS='rate_limit = {rate = 1e6, burst = 1000000}' bench/run --scenarios
    instructions``."""
    return gatewayd_head(port, upstream_port, sock, tls=tls) + textwrap.dedent(f"""
        [[routes]]
        name = "{ROUTE}"
        path_prefix = "/"
        upstream = "up"
        max_concurrency = {limits.max_concurrency}
        max_queue = {limits.max_queue}
        queue_timeout = {limits.queue_timeout}
    """) + route_keys + os.environ.get("GATEWAYD_ROUTE_KEYS", "") + "\n"


def gatewayd(env: Env, upstream_port: int, limits: Limits, nogate: bool = False, tls: Pem | None = None,
             route_keys: str = "") -> Server:
    """gatewayd, one worker; ``nogate`` swaps the admission gate for a no-op (bench only);
    ``route_keys``: TOML lines added to the route."""
    d = env.folder("gatewayd")
    port = free_port()
    conf = d / "gatewayd.toml"
    conf.write_text(gatewayd_config(port, upstream_port, d / "gatewayd.sock", limits, tls, route_keys))
    module = "bench.gatewayd_nogate" if nogate else "gatewayd"
    argv = [env.python, "-m", module, "--config", str(conf)]
    name = "gatewayd" if module == "gatewayd" else module.removeprefix("bench.").replace("_", "-")
    proc = env.procs.start(name, argv, env.proxy_cpu, cwd=_repo())
    proc.wait_port(port)
    return Server("gatewayd", proc, port, conf, d, _scheme(tls))


def gatewayd_app(env: Env, app: str, limits: Limits, interface: str = "asgi") -> Server:
    """gatewayd, one worker, serving the application ``app`` ("module:callable", imported from
    the repository's root) in-process on the route every scenario measures."""
    d = env.folder("gatewayd-app")
    port = free_port()
    conf = d / "gatewayd.toml"
    conf.write_text(textwrap.dedent(f"""\
        [server]
        listen = ["127.0.0.1:{port}"]
        workers = 1
        backlog = 4096
        max_connections = 15000
        keepalive_timeout = 75.0
        shutdown_timeout = 1.0

        [control]
        socket = "{d / 'gatewayd.sock'}"

        [log]
        level = "warning"
        access_log = "off"

        [upstreams.app]
        handler = "{app}"
        interface = "{interface}"

        [[routes]]
        name = "{ROUTE}"
        path_prefix = "/"
        upstream = "app"
        max_concurrency = {limits.max_concurrency}
        max_queue = {limits.max_queue}
        queue_timeout = {limits.queue_timeout}
    """))
    proc = env.procs.start("gatewayd-app", [env.python, "-m", "gatewayd", "--config", str(conf)],
                           env.proxy_cpu, cwd=_repo())
    proc.wait_port(port)
    return Server("gatewayd", proc, port, conf, d)


def uvicorn(env: Env, app: str, limit_concurrency: int | None = None) -> Server:
    """uvicorn serving the ASGI application ``app`` as its users run it in production: one
    process (no --workers supervisor), uvloop and httptools (``uvicorn[standard]``), no access
    log, log level warning; ``limit_concurrency``: ``--limit-concurrency`` (a 503 past it)."""
    d = env.folder("uvicorn")
    port = free_port()
    argv = [env.python, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
            "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
            "--backlog", "4096", "--timeout-keep-alive", "75"]
    if limit_concurrency is not None:
        argv += ["--limit-concurrency", str(limit_concurrency)]
    proc = env.procs.start("uvicorn", argv, env.proxy_cpu, cwd=_repo())
    proc.wait_port(port)
    return Server("uvicorn", proc, port, None, d)


def nginx_proxy(env: Env, upstream_port: int, tls: Pem | None = None) -> Server:
    """nginx ``proxy_pass`` with upstream keep-alive, one worker; ``tls``: ``listen ... ssl``."""
    d = env.folder("nginx")
    port = free_port()
    ssl = textwrap.indent(textwrap.dedent(f"""
        ssl_certificate {tls.cert};
        ssl_certificate_key {tls.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets on;"""), " " * 12) if tls else ""
    conf = _nginx_main(d, f"""
        upstream up {{
            server 127.0.0.1:{upstream_port};
            keepalive 256;
            keepalive_requests 1000000;
            keepalive_timeout 60s;
        }}
        server {{
            listen 127.0.0.1:{port}{" ssl" if tls else ""} backlog=4096;{ssl}
            keepalive_requests 1000000;
            keepalive_timeout 75s;
            location / {{
                proxy_pass http://up;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_buffering on;
            }}
        }}
    """)
    return _start_nginx(env, "nginx", d, conf, port, env.proxy_cpu, _scheme(tls))


def haproxy(env: Env, upstream_port: int, limits: Limits, tls: Pem | None = None,
            backend: tuple[str, ...] = ()) -> Server:
    """HAProxy ``mode http``, one thread; limits become ``maxconn`` and ``timeout queue``;
    ``tls``: ``bind ... ssl crt``; ``backend``: more lines for the backend section."""
    d = env.folder("haproxy")
    port = free_port()
    server_opts = f" maxconn {limits.max_concurrency}" if limits.binding else ""
    conf = d / "haproxy.cfg"
    conf.write_text(textwrap.dedent(f"""\
        global
            nbthread 1
            maxconn 9000
            pidfile {d}/haproxy.pid
            log stderr format short local0 warning

        defaults
            mode http
            option http-keep-alive
            timeout connect 2s
            timeout client 75s
            timeout server 30s
            timeout http-keep-alive 75s
            timeout http-request 10s
            timeout queue {limits.queue_timeout:g}s

        frontend fe
            bind 127.0.0.1:{port}{f" ssl crt {tls.combined} alpn http/1.1" if tls else ""}
            default_backend be

        backend be
            http-reuse always
    """) + "".join(f"    {line}\n" for line in backend) + f"    server s1 127.0.0.1:{upstream_port}{server_opts}\n")
    proc = env.procs.start("haproxy", [tool("haproxy"), "-db", "-f", str(conf)], env.proxy_cpu)
    proc.wait_port(port)
    return Server("haproxy", proc, port, conf, d, _scheme(tls))


def naive(env: Env, upstream_port: int) -> Server:
    """bench.naive_proxy: web.Application + one default ClientSession."""
    d = env.folder("naive")
    port = free_port()
    argv = [env.python, "-m", "bench.naive_proxy", "--port", str(port),
            "--upstream", f"http://127.0.0.1:{upstream_port}"]
    proc = env.procs.start("naive", argv, env.proxy_cpu, cwd=_repo())
    proc.wait_port(port)
    return Server("naive", proc, port, None, d)


def tunnel_proxy(env: Env, kind: str, upstream_port: int, workers: int = 1) -> Server:
    """A WebSocket-carrying proxy (gatewayd or nginx) with ``workers`` processes in front of a
    WebSocket upstream: gatewayd with a ``websocket = true`` route (tunnel cap, idle timeout
    and connection limits far above the tunnels scenario's counts, no upstream connection
    limit); nginx with the ``map $http_upgrade $connection_upgrade`` proxy config, its workers
    on ``reuseport`` as gatewayd's are. Each worker may hold up to 20,000 fds (two a tunnel)."""
    port = free_port()
    if kind == "gatewayd":
        d = env.folder("gatewayd")
        conf = d / "gatewayd.toml"
        conf.write_text(gatewayd_head(port, upstream_port, d / "gatewayd.sock", workers=workers,
                                      max_connections=40000, upstream_connections=0) + textwrap.dedent(f"""
            [[routes]]
            name = "{ROUTE}"
            path_prefix = "/"
            upstream = "up"
            max_concurrency = 1000000
            max_queue = 0
            websocket = true
            max_tunnels = 100000
            tunnel_idle_timeout = 3600.0
        """))
        proc = env.procs.start("gatewayd", [env.python, "-m", "gatewayd", "--config", str(conf)], env.proxy_cpu,
                               cwd=_repo())
        proc.wait_port(port)
        return Server("gatewayd", proc, port, conf, d)
    if kind != "nginx":
        raise ValueError(f"{kind} in the tunnels scenario")
    d = env.folder("nginx")
    conf = _nginx_main(d, f"""
        map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
        server {{
            listen 127.0.0.1:{port} reuseport backlog=4096;
            location / {{
                proxy_pass http://127.0.0.1:{upstream_port};
                proxy_http_version 1.1;
                proxy_set_header Upgrade $http_upgrade;
                proxy_set_header Connection $connection_upgrade;
                proxy_read_timeout 3600s;
                proxy_send_timeout 3600s;
            }}
        }}
    """, workers=workers, worker_connections=19500)
    return _start_nginx(env, "nginx", d, conf, port, env.proxy_cpu)


# ----------------------------------------------------------------------------- control
def reload(server: Server) -> dict[str, object]:
    """Ask a running server to reload its configuration; gatewayd answers with the outcome."""
    if server.kind == "gatewayd":
        return control(server.workdir / "gatewayd.sock", {"cmd": "reload"})
    server.proc.signal(signal.SIGHUP)
    return {"ok": True}


def control(path: Path, request: dict[str, object], timeout: float = 10.0) -> dict[str, object]:
    """One request line on gatewayd's control socket, one answer line back."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    assert isinstance(answer, dict)
    return answer


# ----------------------------------------------------------------------------- helpers
def _repo() -> Path:
    return Path(__file__).resolve().parent.parent


def _nginx_main(d: Path, http_block: str, workers: int = 1, worker_connections: int = 15000) -> Path:
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi", "logs"):
        (d / sub).mkdir()
    conf = d / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        daemon off;
        master_process on;{_as_root()}
        worker_processes {workers};
        worker_rlimit_nofile 20000;
        pid {d}/nginx.pid;
        error_log {d}/logs/error.log warn;
        events {{ worker_connections {worker_connections}; }}
        http {{
            access_log off;
            client_body_temp_path {d}/client_body;
            proxy_temp_path {d}/proxy;
            fastcgi_temp_path {d}/fastcgi;
            uwsgi_temp_path {d}/uwsgi;
            scgi_temp_path {d}/scgi;
        """) + textwrap.indent(textwrap.dedent(http_block), "    ") + "}\n")
    return conf


def _as_root() -> str:
    # Started as root, nginx's workers would run as nobody, who cannot enter the run's
    # folder (0700): a request body past client_body_buffer_size (16 KiB), written to
    # client_body_temp_path, would be answered 500.
    return "\n        user root;" if os.geteuid() == 0 else ""


def _start_nginx(env: Env, name: str, d: Path, conf: Path, port: int, cpu: int | None,
                 scheme: str = "http") -> Server:
    argv = [tool("nginx"), "-p", f"{d}/", "-e", str(d / "logs" / "error.log"), "-c", str(conf)]
    proc = env.procs.start(name, argv, cpu)
    proc.wait_port(port)
    return Server("nginx", proc, port, conf, d, scheme)


def _scheme(tls: Pem | None) -> str:
    return "https" if tls else "http"
