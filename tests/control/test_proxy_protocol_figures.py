"""The snapshot's ``proxy_protocol`` object and its Prometheus counter (gatewayd(8)
Snapshot fields, METRICS): headers read and connections refused, summed over the
workers, those that exited included."""

from __future__ import annotations

import asyncio
from typing import Any

from gatewayd.control.merge import Retired, merge_proxy_protocol, retire
from gatewayd.control.prometheus import SnapshotCollector

from ..builders import app_route
from ..conftest import wait_for


def test_merge_keeps_the_counts_of_a_worker_that_exited():
    exports: list[Any] = [
        {"generation": 1, "proxy_protocol": {"headers": 3, "refused": 1}},
        {"generation": 1, "proxy_protocol": {"headers": 4, "refused": 0}},
        {"generation": 1, "proxy_protocol": {"headers": 5, "refused": 2}},
    ]
    retired: Retired = {}
    retire(retired, {**exports[0], "routes": {}, "upstreams": {}})
    assert merge_proxy_protocol(exports[1:], retired) == {"headers": 12, "refused": 3}
    assert merge_proxy_protocol(exports, None) == {"headers": 12, "refused": 3}
    assert merge_proxy_protocol([], None) == {"headers": 0, "refused": 0}


async def test_snapshot_and_metrics_count_headers_and_refusals(start_gateway, upstream):
    """1. zeros at first 2. a valid v1 header, and a plain request on the PROXY
    listener 3. the snapshot shows one of each, and so do the two series of
    gatewayd_proxy_protocol_headers_total."""
    gw = await start_gateway(app_route(upstream.url), proxy_protocol=True)
    assert (await gw.command({"cmd": "snapshot"}))["snapshot"]["proxy_protocol"] == {"headers": 0, "refused": 0}
    for data in (b"PROXY TCP4 198.51.100.1 192.0.2.1 1000 80\r\nGET / HTTP/1.1\r\nHost: x\r\n"
                 b"Connection: close\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(data)
        try:
            await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            pass
        writer.close()
    await wait_for(lambda: gw.runtime.proxy_headers.refused == 1)
    snap = (await gw.command({"cmd": "snapshot", "histograms": True}))["snapshot"]
    assert snap["proxy_protocol"] == {"headers": 1, "refused": 1}
    family = next(f for f in SnapshotCollector(lambda: snap).collect()
                  if f.name == "gatewayd_proxy_protocol_headers")
    assert {s.labels["result"]: s.value for s in family.samples if s.name.endswith("_total")} == {
        "ok": 1, "refused": 1}
