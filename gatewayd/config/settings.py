"""The configuration, declared once.

Every setting is a field of a frozen dataclass whose metadata holds its kind
(type and bounds), default, unit, one line of documentation and how a reload
treats it. The loader, ``--print-config`` and the man page's key list are all
read from these declarations, so none of them can drift from the others.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import kinds as k
from .certificates import CertificateEntry, CertificateList
from .ratelimit import RateLimit, RateLimitTable

# How a reload treats a setting: the man page prints these words.
RELOAD_LIVE = "applied in place on reload"
RELOAD_NEW = "applies to new connections and requests after a reload"
RELOAD_RESTART = "read at start only; a reload that changes it is refused"


def setting(
    kind: k.Kind,
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    unit: str = "",
    reload: str = RELOAD_LIVE,
) -> Any:
    """Declare one configuration key (see the module docstring)."""
    meta = {"kind": kind, "doc": doc, "unit": unit, "reload": reload}
    return field(default=default, metadata=meta)


def settings_of(cls: type) -> list[dataclasses.Field[Any]]:
    """The declared settings of a section class, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "kind" in f.metadata]


def restart_only(f: dataclasses.Field[Any]) -> bool:
    """Whether a reload that changes this setting is refused (declared ``RELOAD_RESTART``)."""
    return bool(f.metadata["reload"] == RELOAD_RESTART)


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    listen: tuple[k.ListenEntry, ...] = setting(
        k.ListenList(), (k.ListenEntry("127.0.0.1:8080"),),
        'addresses the gateway accepts clients on: "host:port", or {address = "host:port", '
        "tls = true, proxy_protocol = true}: tls for TLS with the certificates of [tls], "
        "proxy_protocol for a PROXY protocol header first on every connection (see PROXY PROTOCOL)",
        reload="new addresses are bound before removed ones close; tls or proxy_protocol on or "
               "off applies to connections accepted after the reload",
    )
    workers: int | str = setting(
        k.Workers(), 1, 'worker processes; "auto" starts one per CPU',
        reload="between two counts above one (\"auto\" counts the CPUs), a reload "
               "starts or stops workers to match (a stopped worker finishes its requests in "
               "flight first) and divides the limits again; a change from one to more, or back, "
               "is refused (restart needed)",
    )
    max_connections: int = setting(
        k.Int(1, 10_000_000), 10000,
        "open client connections for the whole gateway; accepting pauses at the limit",
    )
    max_connections_per_client: int = setting(
        k.Int(0, 10_000_000), 0,
        "open connections one client address may hold (0 = no cap); one more is answered 429 "
        "client_connections_full and closed at once. With N workers each enforces its share "
        "(at least 1) on the connections the kernel gives it",
        reload="applied in place on reload; connections already open are counted, none is closed",
    )
    backlog: int = setting(
        k.Int(1, 65535), 1024, "listen backlog (capped by net.core.somaxconn)",
        reload="applies to addresses bound after the reload"
    )
    keepalive_timeout: float = setting(
        k.Duration(), 75.0, "an idle keep-alive connection is closed after this (checked once a second)",
        unit="seconds", reload=RELOAD_NEW,
    )
    request_header_timeout: float = setting(
        k.Duration(), 10.0, "a request head must arrive in full within this of its first byte",
        unit="seconds", reload=RELOAD_NEW,
    )
    request_body_timeout: float = setting(
        k.Duration(), 20.0,
        "a request body is judged by its rate over the last this many seconds "
        "(it starts with this much credit, never holds more; 408 when it runs out)",
        unit="seconds", reload=RELOAD_NEW,
    )
    request_body_min_rate: int = setting(
        k.Int(1), 500, "each this many bytes of a request body add 1 s to its credit",
        unit="bytes per second", reload=RELOAD_NEW,
    )
    request_buffer_size: int = setting(
        k.Size(), 10 * 1024 * 1024,
        "a body whose Content-Length is up to this (and up to this worker's share of "
        "request_buffer_memory) is read whole before its request asks for a slot; a larger one "
        "streams once admitted, holding its slot meanwhile. A chunked body is read up to the "
        "same bound; one that grows past it streams once admitted, chunked, what was read first "
        "and then the rest. Default 10MiB (the same as max_body_size's default, so every "
        "admissible body is read first unless max_body_size is raised, or the share is smaller)",
        unit="bytes", reload=RELOAD_NEW,
    )
    request_buffer_memory: int = setting(
        k.Size(), 64 * 1024 * 1024,
        "the memory all bodies being read before admission may hold, gateway-wide (each of N "
        "workers holds 1/N of it; a body larger than that share streams as one larger than "
        "request_buffer_size does, so a single body never gets a 503 it could not cure); a body "
        "that finds it full is answered 503 body_buffer_full with Retry-After. A body's bytes "
        "are given back as soon as they are written to the upstream",
        unit="bytes",
    )
    send_timeout: float = setting(
        k.Duration(), 60.0,
        "a client that accepts none of its response for this long is disconnected and its slot freed",
        unit="seconds", reload=RELOAD_NEW,
    )
    max_body_size: int = setting(
        k.Size(), 10 * 1024 * 1024, "larger request bodies are answered 413",
        unit="bytes", reload=RELOAD_NEW,
    )
    worker_timeout: float = setting(
        k.Duration(), 30.0,
        "with workers > 1: a worker whose figures stop arriving this long is killed and replaced",
        unit="seconds",
    )
    shutdown_timeout: float = setting(
        k.Duration(0.0, lo_open=False), 30.0,
        "on SIGTERM, in-flight requests get this long to finish", unit="seconds",
    )

    trusted_proxies: tuple[str, ...] | None = setting(
        k.Networks(), None,
        "networks of proxies whose X-Forwarded-For is believed: a request from one of them is "
        "from the first address, read from the right of X-Forwarded-For, that is not one of "
        "them; unset: none (the client is the peer, or the PROXY protocol's address)",
        reload=RELOAD_NEW,
    )

    @property
    def addresses(self) -> tuple[str, ...]:
        """The listen addresses, without their options."""
        return tuple(e.address for e in self.listen)


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    min_version: str = setting(
        k.Choice(("1.2", "1.3")), "1.2", "the oldest TLS version a client may use",
        reload=RELOAD_NEW,
    )
    session_tickets: bool = setting(
        k.Bool(), True, "let clients resume a TLS session with a ticket (a shorter handshake)",
        reload=RELOAD_NEW,
    )
    certificates: tuple[CertificateEntry, ...] = setting(
        CertificateList(), (),
        "[[tls.certificates]] tables: cert (PEM, certificate then chain), key (PEM, "
        "unencrypted) and optionally hosts (default: the certificate's DNS names); paths "
        "relative to the configuration file's folder. SNI picks an exact host, then a "
        "wildcard one label deep, else the first certificate",
        reload="every file is read again on every reload, changed or not; new handshakes use "
               "them, open connections keep theirs",
    )


@dataclass(frozen=True, kw_only=True)
class ControlConfig:
    socket: str = setting(
        k.Text(), "gatewayd.sock",
        "path of the control socket; relative to the configuration file's folder",
        reload=RELOAD_RESTART,
    )
    mode: int = setting(k.FileMode(), 0o600, "file mode of the control socket", reload=RELOAD_RESTART)


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    listen: str | None = setting(
        k.Listen(), None,
        "address of the Prometheus /metrics, /healthz and /readyz listener; unset: none",
        reload=RELOAD_RESTART,
    )
    allow: tuple[str, ...] | None = setting(
        k.Networks(), None,
        "client networks /metrics answers, 403 to others (/healthz and /readyz answer anyone); "
        "unset: any client",
        reload=RELOAD_RESTART,
    )


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    level: str = setting(
        k.Choice(("debug", "info", "warning", "error")), "info", "daemon log level (stderr)"
    )
    access_log: str = setting(
        k.Text(), "-", 'access log: "-" for stdout, a file path, or "off"',
        reload="a changed file is opened on reload",
    )
    access_format: str = setting(
        k.Choice(("combined", "json")), "combined", "access log line format"
    )


@dataclass(frozen=True, kw_only=True)
class UpstreamConfig:
    name: str = ""  # the table's key in [upstreams]
    folder: str = ""  # the configuration file's folder, where relative tls_* paths start
    servers: tuple[k.Server, ...] | None = setting(
        k.Servers(), None,
        "HTTP servers of this upstream, http:// or https:// URLs (exclusive with handler)",
        reload=RELOAD_NEW,
    )
    handler: str | None = setting(
        k.ImportPath(), None, 'in-process handler "module:callable" (exclusive with servers)',
        reload=RELOAD_NEW,
    )
    executor: str = setting(
        k.Choice(("inline", "process")), "inline",
        'how a handler runs: "inline" (an async aiohttp handler on the event loop) or '
        '"process" (a plain function in a pool of processes)',
        reload=RELOAD_NEW,
    )
    processes: int = setting(
        k.Int(1, 256), 2, 'size of the process pool when executor = "process"', reload=RELOAD_NEW
    )
    interface: str = setting(
        k.Choice(("aiohttp", "asgi", "wsgi")), "aiohttp",
        'what the handler is: "aiohttp" (an aiohttp handler, or a plain function with executor = '
        '"process"), "asgi" (an ASGI 3 application on the event loop) or "wsgi" (a WSGI '
        "application on a pool of threads)",
        reload=RELOAD_NEW,
    )
    lifespan: str = setting(
        k.Choice(("auto", "on", "off")), "auto",
        'interface = "asgi": run the application\'s lifespan startup in each worker before it '
        'serves and shutdown after the drain; "auto": if the application supports it, "on": '
        'it must, "off": never',
        reload=RELOAD_NEW,
    )
    threads: int = setting(
        k.Int(1, 1024), 8,
        'interface = "wsgi": the threads that run the application (per worker); a request '
        "waiting for a slot holds none",
        reload=RELOAD_NEW,
    )
    connect_timeout: float = setting(
        k.Duration(), 2.0, "longest wait for a connection to a server (an https:// server's TLS "
        "handshake included)", unit="seconds",
        reload=RELOAD_NEW,
    )
    read_timeout: float = setting(
        k.Duration(), 30.0, "longest wait for the next bytes from the upstream (504 before the head)",
        unit="seconds", reload=RELOAD_NEW,
    )
    max_connections: int = setting(
        k.Int(0), 1000,
        "connections to each server of this upstream at once, its pool's limit (0 = no limit)",
        reload=RELOAD_NEW,
    )
    keepalive_timeout: float = setting(
        k.Duration(), 4.0,
        "an idle pooled connection is closed after this; keep it below the server's own",
        unit="seconds", reload=RELOAD_NEW,
    )
    balance: str = setting(
        k.Choice(("round_robin", "least_in_flight", "random_two")), "round_robin",
        'how a server is chosen, weights respected: "round_robin" (smooth weighted), '
        '"least_in_flight" (fewest requests in flight per weight) or "random_two" (the less '
        "busy of two servers drawn at random)",
        reload=RELOAD_NEW,
    )
    max_fails: int = setting(
        k.Int(0, 1000), 3,
        "consecutive failed requests of the kinds in fail_on (and 5xx with fail_on_5xx) "
        "that eject a server for fail_timeout, unless no other server is in rotation; "
        "0 = never eject",
        reload=RELOAD_NEW,
    )
    fail_timeout: float = setting(
        k.Duration(), 10.0,
        "how long an ejected server gets no requests; then one request tries it again",
        unit="seconds", reload=RELOAD_NEW,
    )
    fail_on_5xx: bool = setting(
        k.Bool(), False,
        "count a 5xx response as a failure of its server (the response still reaches the client)",
        reload=RELOAD_NEW,
    )
    fail_on: tuple[str, ...] = setting(
        k.ChoiceList(("connect", "reset", "timeout", "invalid")), ("connect",),
        "which failures count against a server for max_fails: connect (refused, unreachable, "
        "connect timeout, name not resolved, TLS handshake or certificate refused: before any "
        "request byte reaches the server's application), reset (closed "
        "or reset before or during the response), timeout (read_timeout passed), invalid (a "
        "response that is not valid HTTP or over the size limits); the default counts only "
        "what no request can cause",
        reload=RELOAD_NEW,
    )
    retries: int = setting(
        k.Int(0, 100), 1,
        "how many times a failed attempt is retried on another server: a connect failure for any "
        "request, a reset before the response head for a GET, HEAD, OPTIONS, TRACE, PUT or DELETE "
        "without a body; never once request bytes were sent otherwise",
        reload=RELOAD_NEW,
    )
    health_check: k.HealthCheck | None = setting(  # noqa: RUF009 (a frozen dataclass)
        k.HealthCheckTable(), None,
        "probe each server with GET path every interval; a 2xx or 3xx within timeout passes; "
        "unhealthy failures in a row take it out, healthy passes in a row bring it back; "
        "unset: no active checks",
        reload=RELOAD_NEW,
    )
    dns_ttl: float = setting(
        k.Duration(), 10.0,
        "how long a server host name's addresses are reused before it is resolved again",
        unit="seconds", reload=RELOAD_NEW,
    )
    tls_verify: bool = setting(
        k.Bool(), True,
        "verify the certificates of the https:// servers (a chain up to a trusted CA, and the "
        "name); false accepts any certificate: the traffic is encrypted, but to whoever answers",
        reload=RELOAD_NEW,
    )
    tls_ca: str | None = setting(
        k.Text(), None,
        "PEM file of the CA certificates trusted to sign the https:// servers' certificates, "
        "instead of the system's store; relative to the configuration file's folder; "
        "unset: the system's CA store",
        reload="read again on every reload; new connections use it",
    )
    tls_server_name: str | None = setting(
        k.HostName(), None,
        "the name sent in SNI to the https:// servers and verified in their certificates; "
        "unset: each server URL's host (an IP address is verified, never sent in SNI)",
        reload=RELOAD_NEW,
    )
    tls_client_cert: str | None = setting(
        k.Text(), None,
        "PEM file of the client certificate (then its chain) presented to the https:// servers "
        "(mutual TLS); needs tls_client_key; relative to the configuration file's folder",
        reload="read again on every reload; new connections use it",
    )
    tls_client_key: str | None = setting(
        k.Text(), None,
        "PEM file of tls_client_cert's private key, unencrypted; needs tls_client_cert; relative "
        "to the configuration file's folder",
        reload="read again on every reload; new connections use it",
    )


@dataclass(frozen=True, kw_only=True)
class RouteConfig:
    name: str = setting(k.Name(), doc="unique route name, used in metrics, logs and the dashboard")
    path_prefix: str = setting(k.PathPrefix(), "/", "the longest matching prefix wins")
    strip_prefix: bool = setting(
        k.Bool(), False,
        "forward the path without the prefix; a prefix not ending in / then matches only "
        "whole segments (/api matches /api, /api/x and /api?q, not /apix)",
    )
    escaped_slashes: str = setting(
        k.Choice(("reject", "keep")), "reject",
        'a path with an escaped slash (%2F), a backslash or %5C: "reject" answers 400 bad_target, '
        '"keep" forwards %2F, %5C and backslashes as sent, the rest of the path in normal form '
        '(the route is chosen with them kept)',
    )
    host: str | None = setting(
        k.HostName(), None, "match only this Host (port ignored); unset: any host"
    )
    upstream: str = setting(k.Name(), doc="a key of [upstreams]")
    max_concurrency: int = setting(
        k.Int(1, 1_000_000), 100, "requests of this route at the upstream at once"
    )
    max_queue: int = setting(
        k.Int(0, 1_000_000), 1000, "requests allowed to wait for a slot; 0 = none wait"
    )
    queue_timeout: float = setting(
        k.Duration(), 2.0, "longest wait in the queue before a 503 queue_timeout", unit="seconds"
    )
    retry_after: int = setting(
        k.Int(0, 86400), 1, "the Retry-After of this route's 503s until the gateway has estimated "
        "when the route could take a request (then that estimate, 1 to 60)", unit="seconds"
    )
    queue_order: str = setting(
        k.Choice(("fifo", "fair")), "fifo",
        'the order in which waiters get freed slots: "fifo" (first come, first served) or "fair" '
        "(round-robin across the client addresses that wait, FIFO within one)",
        reload="applied in place on reload: the waiters move to the new order, none is lost",
    )
    max_queue_per_client: int = setting(
        k.Int(0, 1_000_000), 0,
        "queue places one client address may hold on this route (0 = no cap); one more "
        "request is answered 429 client_queue_full. With N workers each enforces its share "
        "(at least 1)",
    )
    rate_limit: RateLimit | None = setting(  # noqa: RUF009 (a frozen dataclass)
        RateLimitTable(), None,
        "at most rate requests a second per key, burst of them at once (GCRA); more is answered "
        "429 rate_limited with Retry-After, never queued nor forwarded. key: \"client\" (the "
        "client address) or \"header:NAME\" (that header's value; the client address when it is "
        "absent). Gateway-wide: workers share one table of keys. Unset: no limit",
        reload="applied in place on reload; keys keep what they used, up to one new burst",
    )
    timeout: float | None = setting(
        k.Duration(), None,
        "longest time from a request's arrival to its upstream's response head, queue and "
        "retries included; past it 504 route_timeout (unset: none)",
        unit="seconds",
    )
    deadline_header: str | None = setting(
        k.HeaderName(), None,
        "a request header carrying the client's own budget in seconds (capped at timeout); a "
        "malformed value is ignored. The remaining budget goes upstream in the same header "
        "(unset: no client budgets)",
    )
    priority: str = setting(
        k.Choice(("critical", "default", "sheddable")), "default",
        "the class of this route's requests: waiters are served critical first, then default, "
        "then sheddable; a higher class arriving at a full queue takes the place of the newest "
        "waiter of the lowest class below it (503 preempted)",
    )
    priority_header: str | None = setting(
        k.HeaderName(), None,
        "a request header whose value (critical, default or sheddable) overrides priority, for "
        "clients the operator trusts (unset: every request has the route's class)",
    )
    websocket: bool = setting(
        k.Bool(), False,
        "forward WebSocket upgrades (Connection: upgrade, Upgrade: websocket) to the upstream; "
        "on its 101 the connection becomes a tunnel, its slot is released and it counts against "
        "max_tunnels. Other upgrades (h2c, ...) are never forwarded. An in-process handler may "
        "answer with aiohttp's WebSocketResponse",
        reload="applied to upgrades that arrive after the reload; open tunnels are left alone",
    )
    max_tunnels: int = setting(
        k.Int(1, 10_000_000), 10000,
        "open tunnels (upgraded connections) of this route, gateway-wide; one more upgrade is "
        "answered 503 tunnels_full. With N workers each enforces its share (at least 1)",
        reload="applied to upgrades that arrive after the reload; open tunnels are left alone",
    )
    tunnel_idle_timeout: float = setting(
        k.Duration(), 300.0, "a tunnel with no bytes either way this long is closed", unit="seconds",
        reload="applied to tunnels opened after the reload",
    )


@dataclass(frozen=True, kw_only=True)
class Config:
    """A whole validated configuration file."""

    path: str
    server: ServerConfig = field(default_factory=ServerConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    routes: tuple[RouteConfig, ...] = ()

    def upstream(self, name: str) -> UpstreamConfig:
        for u in self.upstreams:
            if u.name == name:
                return u
        raise KeyError(name)

    def route(self, name: str) -> RouteConfig:
        for r in self.routes:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def socket_path(self) -> Path:
        """The control socket's path, relative paths taken from the file's folder."""
        p = Path(self.control.socket)
        return p if p.is_absolute() else Path(self.path).resolve().parent / p

    def file_path(self, path: str) -> Path:
        """A path the file names; relative ones are taken from the file's folder."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.path).resolve().parent / p

    def access_log_path(self) -> str:
        """``-``, ``off`` or an absolute path."""
        a = self.log.access_log
        if a in ("-", "off") or Path(a).is_absolute():
            return a
        return str(Path(self.path).resolve().parent / a)


def worker_count(config: Config) -> int:
    """Worker processes ``server.workers`` asks for ("auto": the CPUs this process may use)."""
    w = config.server.workers
    if w == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return os.cpu_count() or 1
    return int(w)


# Sections of the file: TOML table name -> declaration.
SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "control": ControlConfig,
    "metrics": MetricsConfig,
    "log": LogConfig,
    "tls": TlsConfig,
}
