"""The metrics listener: Prometheus text at /metrics, /healthz and /readyz.

The exposition is prometheus_client's, fed by a custom collector that reads
one snapshot per scrape, so Prometheus and the control socket always agree.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from ..http.addresses import in_networks, parse_hostport
from ..stats.metrics import LATENCY_BUCKETS, PAUSE_BUCKETS, HistogramExport
from .protocol import Snapshot


def _buckets(bounds: tuple[float, ...], h: HistogramExport) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for le, count in zip((*bounds, float("inf")), h["counts"], strict=True):
        running += count
        out.append(("+Inf" if le == float("inf") else repr(le), running))
    return out


class SnapshotCollector(Collector):
    """A prometheus_client collector over gatewayd snapshots (SPEC §7 names)."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        routes = s["routes"]
        req = CounterMetricFamily("gatewayd_requests", "Responses by route and status code",
                                  labels=["route", "code"])
        inflight = GaugeMetricFamily("gatewayd_in_flight", "Requests at the upstream now",
                                     labels=["route"])
        depth = GaugeMetricFamily("gatewayd_queue_depth", "Requests waiting for a slot",
                                  labels=["route"])
        oldest = GaugeMetricFamily("gatewayd_queue_oldest_wait_seconds",
                                   "How long the oldest waiter has waited", labels=["route"])
        limit = GaugeMetricFamily("gatewayd_route_max_concurrency", "Concurrency limit",
                                  labels=["route"])
        qlimit = GaugeMetricFamily("gatewayd_route_max_queue", "Queue limit", labels=["route"])
        rejected = CounterMetricFamily("gatewayd_rejected", "Requests refused or shed (503, 429) by reason",
                                       labels=["route", "reason"])
        cancelled = CounterMetricFamily("gatewayd_cancelled", "Requests whose client left",
                                        labels=["route"])
        cancelled_q = CounterMetricFamily("gatewayd_cancelled_queued",
                                          "Requests whose client left while queued",
                                          labels=["route"])
        uperr = CounterMetricFamily("gatewayd_upstream_errors", "Upstream failures by reason",
                                    labels=["route", "reason"])
        duration = HistogramMetricFamily("gatewayd_request_duration_seconds",
                                         "Time from arrival to the end of a response the upstream made",
                                         labels=["route"])
        own = HistogramMetricFamily("gatewayd_gateway_answer_duration_seconds",
                                    "Time from arrival to the end of an answer the gateway made itself",
                                    labels=["route"])
        qwait = HistogramMetricFamily("gatewayd_queue_wait_seconds",
                                      "Time spent waiting for a slot", labels=["route"])
        tunnels = GaugeMetricFamily("gatewayd_tunnels", "WebSocket tunnels open now", labels=["route"])
        opened = CounterMetricFamily("gatewayd_tunnels", "WebSocket tunnels opened (upgrades answered 101)",
                                     labels=["route"])
        tlimit = GaugeMetricFamily("gatewayd_route_max_tunnels",
                                   "Tunnel limit (0: the route does not carry WebSocket)", labels=["route"])
        by_class = GaugeMetricFamily("gatewayd_queue_depth_by_priority", "Requests waiting for a slot, by class",
                                     labels=["route", "priority"])
        service = GaugeMetricFamily("gatewayd_route_service_seconds",
                                    "The route's typical service time (absent while unknown)", labels=["route"])
        completion = GaugeMetricFamily("gatewayd_route_completion_rate",
                                       "Requests the route completes a second (recent estimate)", labels=["route"])
        for r in routes:
            name = r["name"]
            for code, n in sorted(r["codes"].items()):
                req.add_metric([name, code], n)
            inflight.add_metric([name], r["in_flight"])
            depth.add_metric([name], r["queued"])
            oldest.add_metric([name], r["oldest_wait_ms"] / 1000)
            limit.add_metric([name], r["max_concurrency"])
            qlimit.add_metric([name], r["max_queue"])
            for reason, n in r["rejected"].items():
                rejected.add_metric([name, reason], n)
            cancelled.add_metric([name], r["cancelled"])
            cancelled_q.add_metric([name], r["cancelled_queued"])
            for reason, n in sorted(r["upstream_error_reasons"].items()):
                uperr.add_metric([name, reason], n)
            h = r["latency_histogram"]
            duration.add_metric([name], _buckets(LATENCY_BUCKETS, h), h["sum"])
            h = r["gateway_latency_histogram"]
            own.add_metric([name], _buckets(LATENCY_BUCKETS, h), h["sum"])
            h = r["queue_wait_histogram"]
            qwait.add_metric([name], _buckets(LATENCY_BUCKETS, h), h["sum"])
            tunnels.add_metric([name], r["tunnels"])
            opened.add_metric([name], r["tunnels_total"])
            tlimit.add_metric([name], r["max_tunnels"])
            for priority, n in r["queued_by_priority"].items():
                by_class.add_metric([name, priority], n)
            est = r["estimates"]
            if est["service_ms"] is not None:
                service.add_metric([name], est["service_ms"] / 1000)
            completion.add_metric([name], est["completion_rate"])
        for code, n in sorted(s.get("unrouted", {}).items()):
            req.add_metric(["-", code], n)  # answered before or without a route
        yield from (req, inflight, depth, oldest, limit, qlimit, rejected, cancelled,
                    cancelled_q, uperr, duration, own, qwait, tunnels, opened, tlimit, by_class, service,
                    completion)

        gcp = HistogramMetricFamily("gatewayd_gc_pause_seconds", "GC pause per collection",
                                    labels=["generation"])
        gcc = CounterMetricFamily("gatewayd_gc_collections", "GC collections",
                                  labels=["generation"])
        for g in s["gc"]["generations"]:
            h = g["histogram"]
            gcp.add_metric([str(g["generation"])], _buckets(PAUSE_BUCKETS, h), h["sum"])
            gcc.add_metric([str(g["generation"])], g["count"])
        yield gcp
        yield gcc
        for name, doc, value in (
            ("gatewayd_tasks", "Live asyncio tasks", s["tasks"]),
            ("gatewayd_event_loop_lag_seconds", "Latest event-loop lag (max over workers)",
             s["loop_lag_ms"]["last"] / 1000),
            ("gatewayd_event_loop_lag_max_seconds", "Largest event-loop lag seen",
             s["loop_lag_ms"]["max"] / 1000),
            ("gatewayd_connections", "Open client connections", s["connections"]),
            ("gatewayd_open_fds", "Open file descriptors", s["open_fds"]),
            ("gatewayd_resident_memory_bytes", "Resident memory", s["rss_bytes"]),
            ("gatewayd_config_generation", "Configuration generation", s["generation"]),
            ("gatewayd_workers", "Worker processes", len(s["workers"])),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        up = GaugeMetricFamily("gatewayd_upstream_server_up",
                               "1 when the server takes requests", labels=["upstream", "server"])
        ureq = CounterMetricFamily("gatewayd_upstream_server_requests",
                                   "Requests sent to the server", labels=["upstream", "server"])
        ufail = CounterMetricFamily("gatewayd_upstream_server_failures",
                                    "Failures of the server", labels=["upstream", "server"])
        for u in s.get("upstreams", []):
            for srv in u.get("servers", []):
                labels = [u["name"], srv["url"]]
                up.add_metric(labels, 1 if srv.get("healthy", True) else 0)
                ureq.add_metric(labels, srv.get("requests", 0))
                ufail.add_metric(labels, srv.get("failures", 0))
        yield from (up, ureq, ufail)
        yield CounterMetricFamily("gatewayd_client_connections_refused",
                                  "Connections closed over max_connections_per_client",
                                  value=s.get("client_connections_refused", 0))
        yield from _tls(s)
        yield _proxy_protocol(s)


def _proxy_protocol(s: Snapshot) -> Metric:
    """PROXY protocol headers by result, always (zeros without such a listener)."""
    figures = s.get("proxy_protocol")
    headers = CounterMetricFamily("gatewayd_proxy_protocol_headers",
                                  "PROXY protocol headers by result (refused: malformed, missing or late)",
                                  labels=["result"])
    headers.add_metric(["ok"], figures["headers"] if figures else 0)
    headers.add_metric(["refused"], figures["refused"] if figures else 0)
    return headers


def _tls(s: Snapshot) -> Iterator[Metric]:
    """Handshakes by result, always (zeros without TLS, so a rate query has a series
    from the start); each certificate's expiry, for an alert before it comes."""
    tls = s.get("tls")
    handshakes = CounterMetricFamily("gatewayd_tls_handshakes",
                                     "Client TLS handshakes by result (error: failed, timed out, not TLS)",
                                     labels=["result"])
    handshakes.add_metric(["ok"], tls["handshakes"] if tls else 0)
    handshakes.add_metric(["error"], tls["handshake_errors"] if tls else 0)
    yield handshakes
    expiry = GaugeMetricFamily("gatewayd_tls_certificate_not_after_seconds",
                               "When the certificate expires (Unix time)", labels=["cert"])
    for c in tls["certificates"] if tls else []:
        expiry.add_metric([c["cert"]], c["not_after"])
    yield expiry


class MetricsListener:
    """An aiohttp app on ``[metrics] listen``.

    ``allow`` (``[metrics] allow``) limits who reads /metrics: route names, upstream
    addresses and traffic figures are for the operator's scraper. The health
    endpoints stay open to anyone: they tell only "up" and "ready", and a kubelet
    probes them from the node's address, which an allow list for the scraper
    would not name."""

    def __init__(self, address: str, snapshot: Callable[[], Snapshot],
                 ready: Callable[[], bool], allow: tuple[str, ...] | None = None) -> None:
        self.address = address
        self._ready = ready
        self._allow = None if allow is None else tuple(ipaddress.ip_network(n) for n in allow)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(SnapshotCollector(snapshot))
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = parse_hostport(self.address)
        await web.TCPSite(self._runner, host, port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._allow is not None and not (request.remote and in_networks(request.remote, self._allow)):
            return web.Response(status=403, text="403 forbidden\n")
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        # answering at all proves the loop turns
        return web.Response(text="ok\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")
