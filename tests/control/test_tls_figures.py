"""Client TLS as an operator sees it (gatewayd(8) Snapshot fields ``tls``, METRICS
``gatewayd_tls_*``): handshakes and handshake errors counted, the certificates in
force with their expiry, one process and two workers, through the front door."""

from __future__ import annotations

import asyncio
import datetime
import functools
import os
import signal
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from gatewayd.control.merge import Retired, merge_tls, retire
from gatewayd.control.prometheus import MetricsListener
from gatewayd.control.snapshot import snapshot

from ..builders import app_route, free_port
from ..certs import Pem, client_context, issue, tls_section
from ..conftest import wait_for, wait_for_sync

REQUEST = b"GET /echo HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"


def expiry_of(pem: Pem) -> float:
    """The certificate's notAfter as Unix time, read by another X.509 parser than the
    gateway's."""
    return x509.load_pem_x509_certificate(pem.cert.read_bytes()).not_valid_after_utc.timestamp()


async def tls_get(port: int, ctx: ssl.SSLContext) -> bytes:
    """One request over a new TLS connection (one handshake); the response's bytes."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="a.example", ssl_handshake_timeout=5), 6)
    try:
        writer.write(REQUEST)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def plain_text(port: int) -> bytes:
    """Clear-text HTTP on the TLS port: a handshake error; what came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(REQUEST)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def scrape(port: int) -> dict[str, list[Any]]:
    """/metrics as {sample name: [(labels, value)]}."""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


@pytest.fixture
def site(tls_ca: trustme.CA, tmp_path: Path) -> Pem:
    not_after = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=60)
    return issue(tls_ca, tmp_path / "certs", "site", "a.example", "www.a.example", not_after=not_after)


async def test_one_process_counts_handshakes_and_shows_its_certificate(start_gateway, upstream, site, tls_ca):
    """1. a verified client is served over TLS 2. a clear-text client on the TLS port is
    closed 3. the snapshot's tls: one handshake, one error, the certificate with its
    hosts and its real expiry 4. /metrics says the same."""
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(site))
    mport = free_port()
    metrics = MetricsListener(f"127.0.0.1:{mport}", lambda: snapshot(gw.runtime), lambda: True)
    await metrics.start()
    try:
        assert (await tls_get(gw.port, client_context(tls_ca))).startswith(b"HTTP/1.1 200")
        assert b"HTTP/1." not in await plain_text(gw.port)

        await wait_for(lambda: gw.runtime.handshakes.errors == 1)
        tls = (await gw.command({"cmd": "snapshot"}))["snapshot"]["tls"]
        assert tls == {"handshakes": 1, "handshake_errors": 1, "certificates": [
            {"cert": str(site.cert), "hosts": ["a.example", "www.a.example"], "not_after": expiry_of(site)}]}
        got = await scrape(mport)
        assert sorted(got["gatewayd_tls_handshakes_total"], key=str) == [
            ({"result": "error"}, 1.0), ({"result": "ok"}, 1.0)]
        assert got["gatewayd_tls_certificate_not_after_seconds"] == [({"cert": str(site.cert)}, expiry_of(site))]
    finally:
        await metrics.close()


async def test_without_tls_the_figures_are_zero_and_no_certificate(start_gateway, upstream):
    """No [tls]: the snapshot still has its tls object (zeros, no certificate), the
    handshake counters are exported at zero, no expiry series."""
    gw = await start_gateway(app_route(upstream.url))
    mport = free_port()
    metrics = MetricsListener(f"127.0.0.1:{mport}", lambda: snapshot(gw.runtime), lambda: True)
    await metrics.start()
    try:
        s = (await gw.command({"cmd": "snapshot"}))["snapshot"]
        assert s["tls"] == {"handshakes": 0, "handshake_errors": 0, "certificates": []}
        got = await scrape(mport)
        assert sorted(got["gatewayd_tls_handshakes_total"], key=str) == [
            ({"result": "error"}, 0.0), ({"result": "ok"}, 0.0)]
        assert "gatewayd_tls_certificate_not_after_seconds" not in got
    finally:
        await metrics.close()


def _snap(gp: Any) -> dict[str, Any]:
    return gp.command({"cmd": "snapshot"})["snapshot"]


async def test_two_workers_sum_handshakes_and_list_the_certificate_once(gateway_process, upstream, site, tls_ca):
    """workers = 2: 1. a clear-text connection, then TLS connections, ten at a time, until
    both workers have taken some (30 at least) 2. the merged snapshot counts every
    handshake and the one error over both workers and lists the certificate once;
    /metrics agrees 3. a worker killed: the totals keep its handshakes, and 10 more
    connections add up on top."""
    mport = free_port()
    gp = gateway_process(app_route(upstream.url) + f'[metrics]\nlisten = "127.0.0.1:{mport}"\n',
                         workers=2, tls=tls_section(site))
    port = int(gp.config_path.read_text().split("127.0.0.1:")[1].split('"')[0])
    s = await asyncio.to_thread(wait_for_sync, lambda: (lambda s: s if len(s["workers"]) == 2 and all(
        w["pid"] for w in s["workers"]) else None)(_snap(gp)), 20)
    ctx = client_context(tls_ca)
    assert b"HTTP/1." not in await plain_text(port)

    def tls_when(handshakes: int) -> dict[str, Any] | None:
        s = _snap(gp)
        t = s["tls"]
        return s if (t["handshakes"], t["handshake_errors"]) == (handshakes, 1) else None

    made = 0
    while made < 30 or not all(w["accepted"] for w in s["workers"]):  # until both took some
        assert made < 200, [w["accepted"] for w in s["workers"]]
        got = await asyncio.gather(*(tls_get(port, ctx) for _ in range(10)))
        assert all(r.startswith(b"HTTP/1.1 200") for r in got)
        made += 10
        s = await asyncio.to_thread(wait_for_sync, functools.partial(tls_when, made), 10)
    assert s["tls"]["certificates"] == [
        {"cert": str(site.cert), "hosts": ["a.example", "www.a.example"], "not_after": expiry_of(site)}]
    assert sum(w["accepted"] for w in s["workers"]) == made + 1
    m = await scrape(mport)
    assert sorted(m["gatewayd_tls_handshakes_total"], key=str) == [
        ({"result": "error"}, 1.0), ({"result": "ok"}, float(made))]
    assert m["gatewayd_tls_certificate_not_after_seconds"] == [({"cert": str(site.cert)}, expiry_of(site))]

    victim = s["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    await asyncio.to_thread(wait_for_sync, lambda: (lambda s: s if len(s["workers"]) == 2 and all(
        w["pid"] and w["pid"] != victim for w in s["workers"]) else None)(_snap(gp)), 20)
    assert _snap(gp)["tls"]["handshakes"] == made  # never backwards
    got = await asyncio.gather(*(tls_get(port, ctx) for _ in range(10)))
    assert all(r.startswith(b"HTTP/1.1 200") for r in got)
    s = await asyncio.to_thread(wait_for_sync, lambda: tls_when(made + 10), 10)
    assert len(s["tls"]["certificates"]) == 1


def test_merge_takes_the_newest_generations_certificates_and_keeps_the_retired_counts():
    """Mid-reload the workers may run two generations: the certificates are the newer
    one's, listed once; handshakes add up with those of a worker that exited."""
    old = {"cert": "old.pem", "hosts": ["a.example"], "not_after": 1.0}
    new = {"cert": "new.pem", "hosts": ["a.example"], "not_after": 2.0}
    exports: list[Any] = [
        {"generation": 1, "tls": {"handshakes": 3, "handshake_errors": 1, "certificates": [old]}},
        {"generation": 2, "tls": {"handshakes": 4, "handshake_errors": 0, "certificates": [new]}},
        {"generation": 2, "tls": {"handshakes": 5, "handshake_errors": 2, "certificates": [new]}},
    ]
    retired: Retired = {}
    retire(retired, {**exports[0], "routes": {}, "upstreams": {}})
    assert merge_tls(exports[1:], retired) == {"handshakes": 12, "handshake_errors": 3, "certificates": [new]}
    assert merge_tls(exports, None) == {"handshakes": 12, "handshake_errors": 3, "certificates": [new]}
    assert merge_tls([], None) == {"handshakes": 0, "handshake_errors": 0, "certificates": []}
