"""The control protocol's shapes (SPEC §5): requests, answers and the snapshot, as
they travel, one JSON object per line; and ``check``, which turns a decoded line
into a request the server can trust, or the error its answer carries.

These are the types of what crosses the socket; how a snapshot is built is in
``export`` (one process's figures), ``merge`` (summed over workers) and
``present`` (what an operator reads). A new command adds its request and answer
here, a branch in ``check`` and one in ``ControlServer._dispatch``.
"""

from __future__ import annotations

import json
from typing import Literal, NotRequired, TypedDict

from ..runtime.reload import LastReload, ReloadDone
from ..stats.metrics import Counts, HistogramExport, Quantiles
from ..stats.process import GcExport, PauseMs
from ..upstreams.state import ServerExport, ServerStateSet

PROTOCOL = 1  # the "protocol" hello answers; raised when an answer changes incompatibly
COMMANDS = "hello, snapshot, subscribe, reload, set_limit, queue, clients, server_state"
CLIENTS_TOP, CLIENTS_MAX = 10, 1000  # the clients command's default and largest ``top``


# ----------------------------------------------------------------------------- the snapshot
class Waiter(TypedDict):
    """A request waiting in a route's queue (the queue X-ray)."""

    wait_ms: float
    method: str
    path: str
    client: str
    pid: int  # the worker holding it
    priority: str  # its class: critical, default or sheddable (SPEC §12)
    deadline_in: float | None  # seconds left until its deadline (3 decimals); None without one


class Estimates(TypedDict):
    """A route's estimates (SPEC §12, proxy.deadlines.Estimator): how fast it completes
    requests (a second, summed over the workers) and its typical service time (the
    largest over the workers; None while unknown)."""

    completion_rate: float
    service_ms: float | None


class LoopLag(TypedDict):
    last: float  # milliseconds
    max: float


class RouteSnapshot(TypedDict):
    """A route as an operator reads it: gateway-wide limits, gauges, counters and
    latency quantiles; its bucket counts only when asked for (``histograms``)."""

    name: str
    upstream: str
    path_prefix: str
    host: str | None
    in_flight: int
    max_concurrency: int
    queued: int
    max_queue: int
    queue_timeout: float
    queued_by_priority: Counts  # waiters by class: critical, default, sheddable
    oldest_wait_ms: float
    waiters: list[Waiter]  # the oldest few (export.XRAY_SUMMARY); ``queue`` lists all
    requests: int
    served: int  # responses the upstream made: those latency_ms describes
    gateway_answers: int  # answers the gateway made itself (sheds, refusals, errors)
    responses: Counts  # by class: 1xx ... 5xx
    codes: Counts  # by status code
    # queue_full, queue_timeout, client_queue_full, rate_limited, tunnels_full, deadline,
    # preempted, route_timeout
    rejected: Counts
    cancelled: int
    cancelled_queued: int
    cancelled_in_flight: int
    upstream_errors: int
    upstream_error_reasons: Counts
    latency_ms: Quantiles
    queue_wait_ms: Quantiles
    estimates: Estimates
    tunnels: int  # WebSocket tunnels open now
    max_tunnels: int  # the gateway-wide cap; 0 on a route without ``websocket = true``
    tunnels_total: int  # tunnels opened since start
    latency_histogram: NotRequired[HistogramExport]
    gateway_latency_histogram: NotRequired[HistogramExport]
    queue_wait_histogram: NotRequired[HistogramExport]


class ServerSnapshot(ServerExport):
    """A server merged over the workers that have it."""

    workers: int
    healthy_workers: int


class UpstreamSnapshot(TypedDict):
    name: str
    balance: str
    retried: int
    no_healthy_server: int
    servers: list[ServerSnapshot]


class WorkerSnapshot(TypedDict):
    """One process's own figures (the only one, with a single process)."""

    pid: int
    index: int
    connections: int
    tasks: int
    loop_lag_ms: LoopLag
    rss_bytes: int
    open_fds: int
    fd_limit: int
    cpu_s: float
    generation: int
    accepted: int
    bad_requests: int
    client_connections_refused: int  # connections over max_connections_per_client
    deferred_reads: int
    gc_pause_ms: PauseMs
    requests: int
    in_flight: int
    queued: int


class CertificateSnapshot(TypedDict):
    """A certificate of the configuration in force."""

    cert: str  # its path as the configuration gives it
    hosts: list[str]  # the names SNI picks it for
    not_after: float  # when it expires (Unix time)


class TlsSnapshot(TypedDict):
    """Client TLS: handshakes since start (summed over the workers, those that exited
    included) and the certificates in force; zeros and no certificates without TLS."""

    handshakes: int  # completed
    handshake_errors: int  # failed, timed out, or plain text on a TLS port
    certificates: list[CertificateSnapshot]


class ProxyProtocolSnapshot(TypedDict):
    """The PROXY protocol on listeners with ``proxy_protocol = true``, since start (summed
    over the workers, those that exited included); zeros without such a listener."""

    headers: int  # valid headers read
    refused: int  # connections closed for want of one: malformed, missing or late


class RuntimeInfo(TypedDict):
    """The snapshot's fields that belong to the gateway, not to a worker."""

    version: str
    pid: int
    uptime_s: float
    config_path: str
    generation: int
    last_reload: LastReload | None  # null until the first reload
    draining: bool
    listen: list[str]
    master_rss_bytes: NotRequired[int]  # with workers: the master's own
    workers_configured: NotRequired[int]


class ControlFigures(TypedDict):
    clients: int
    dropped_snapshots: int  # subscriber ticks skipped because it did not read


class Snapshot(RuntimeInfo):
    """The whole snapshot: sums (or maxima, for ``max`` fields) over the workers."""

    time: float
    connections: int
    tasks: int
    loop_lag_ms: LoopLag
    gc: GcExport  # generations' ``histogram`` only when asked for
    rss_bytes: int
    open_fds: int
    fd_limit: int
    routes: list[RouteSnapshot]
    unrouted: Counts  # answers given without a route, by status code
    client_connections_refused: int  # connections over max_connections_per_client (429, closed)
    upstreams: list[UpstreamSnapshot]
    tls: TlsSnapshot
    proxy_protocol: ProxyProtocolSnapshot
    workers: list[WorkerSnapshot]


class ServedSnapshot(Snapshot):
    """A snapshot as the control socket serves it: with the socket's own figures."""

    control: ControlFigures


# ----------------------------------------------------------------------------- requests
class HelloRequest(TypedDict):
    cmd: Literal["hello"]


class SnapshotRequest(TypedDict):
    cmd: Literal["snapshot"]
    histograms: NotRequired[bool]


class SubscribeRequest(TypedDict):
    cmd: Literal["subscribe"]
    interval: NotRequired[float]  # seconds, 0.05 to 3600; 1 when absent
    histograms: NotRequired[bool]


class ReloadRequest(TypedDict):
    cmd: Literal["reload"]
    dry_run: NotRequired[bool]


class SetLimitRequest(TypedDict):
    cmd: Literal["set_limit"]
    route: str
    max_concurrency: NotRequired[int | None]  # absent or null: unchanged
    max_queue: NotRequired[int | None]


class QueueRequest(TypedDict):
    cmd: Literal["queue"]
    route: str


class ClientsRequest(TypedDict):
    cmd: Literal["clients"]
    route: str
    top: int  # how many clients, the most queue places first, then the most refusals


class ServerStateRequest(TypedDict):
    cmd: Literal["server_state"]
    upstream: str
    server: str  # its URL as configured, or host:port
    state: str  # up, down (ready, drain, maint as in HAProxy)


Request = (HelloRequest | SnapshotRequest | SubscribeRequest | ReloadRequest | SetLimitRequest
           | QueueRequest | ClientsRequest | ServerStateRequest)


# ----------------------------------------------------------------------------- answers
class ErrorAnswer(TypedDict):
    ok: Literal[False]
    error: str


class OkAnswer(TypedDict):
    """``subscribe``'s first line, before the snapshots."""

    ok: Literal[True]


class HelloAnswer(TypedDict):
    ok: Literal[True]
    version: str
    protocol: int
    pid: int


class SnapshotAnswer(TypedDict):
    ok: Literal[True]
    snapshot: ServedSnapshot


class LimitSet(TypedDict):
    ok: Literal[True]
    route: str
    max_concurrency: int  # the gateway-wide limits now in force
    max_queue: int


class ClientRow(TypedDict):
    """One client of a route: its queue places now, and its refusals since start."""

    client: str
    queued: int
    rate_limited: int
    client_queue_full: int


class ClientsListed(TypedDict):
    ok: Literal[True]
    route: str
    clients: list[ClientRow]


class QueueListed(TypedDict):
    ok: Literal[True]
    route: str
    waiters: list[Waiter]  # oldest first


ServerStateAnswer = ServerStateSet | ErrorAnswer
ReloadAnswer = ReloadDone | ErrorAnswer
SetLimitAnswer = LimitSet | ErrorAnswer
QueueAnswer = QueueListed | ErrorAnswer
ClientsAnswer = ClientsListed | ErrorAnswer
Answer = (HelloAnswer | SnapshotAnswer | OkAnswer | ReloadAnswer | SetLimitAnswer | QueueAnswer
          | ClientsAnswer | ServerStateAnswer)


# ----------------------------------------------------------------------------- checking
def decode(line: bytes) -> dict[str, object] | str:
    """A request line as a JSON object with a ``cmd`` string, or what is wrong with it."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"malformed JSON: {exc}"
    if not isinstance(obj, dict):
        return "expected a JSON object"
    if not isinstance(obj.get("cmd"), str):
        return 'expected a "cmd" string'
    return obj


def check(obj: dict[str, object]) -> Request | str:
    """A decoded request whose fields have the types its command needs, or the error."""
    cmd = obj["cmd"]
    if cmd == "hello":
        return {"cmd": "hello"}
    if cmd == "snapshot":
        return {"cmd": "snapshot", "histograms": obj.get("histograms") is True}
    if cmd == "subscribe":
        interval = obj.get("interval", 1.0)
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) \
                or not 0.05 <= interval <= 3600:
            return "interval: expected seconds >= 0.05 and <= 3600"
        return {"cmd": "subscribe", "interval": interval, "histograms": obj.get("histograms") is True}
    if cmd == "reload":
        dry = obj.get("dry_run", False)
        if not isinstance(dry, bool):
            return "dry_run: expected true or false"
        return {"cmd": "reload", "dry_run": dry}
    if cmd == "set_limit":
        route = obj.get("route")
        if not isinstance(route, str):
            return "route: expected a route name"
        mc = _limit(obj.get("max_concurrency"), "max_concurrency", 1)
        if isinstance(mc, str):
            return mc
        mq = _limit(obj.get("max_queue"), "max_queue", 0)
        if isinstance(mq, str):
            return mq
        if mc is None and mq is None:
            return "expected max_concurrency and/or max_queue"
        return {"cmd": "set_limit", "route": route, "max_concurrency": mc, "max_queue": mq}
    if cmd == "queue":
        route = obj.get("route")
        if not isinstance(route, str):
            return "route: expected a route name"
        return {"cmd": "queue", "route": route}
    if cmd == "clients":
        route, top = obj.get("route"), obj.get("top", CLIENTS_TOP)
        if not isinstance(route, str):
            return "route: expected a route name"
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= CLIENTS_MAX:
            return f"top: expected an integer from 1 to {CLIENTS_MAX}"
        return {"cmd": "clients", "route": route, "top": top}
    if cmd == "server_state":
        upstream, server, state = (obj.get(k) for k in ("upstream", "server", "state"))
        if not (isinstance(upstream, str) and isinstance(server, str) and isinstance(state, str)):
            return "expected upstream, server and state strings"
        return {"cmd": "server_state", "upstream": upstream, "server": server, "state": state}
    return f"unknown cmd {cmd!r}; expected one of {COMMANDS}"


def _limit(value: object, key: str, lo: int) -> int | str | None:
    """A ``set_limit`` limit: None (unchanged), the integer, or the error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= 1_000_000:
        return f"{key}: expected an integer >= {lo} and <= 1000000"
    return value
