"""The dashboard's TLS line (gatewayd-dashboard(1) Header): handshakes and the soonest
certificate expiry of a real TLS gateway, marked when it is under 14 days away, in
the header as drawn (App.run_test), and the pure functions behind it."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path

import pytest
import trustme
from rich.segment import Segment
from textual.geometry import Region

from dashboard.app import DashboardApp
from dashboard.model import Sample, soonest_certificate
from dashboard.widgets import Summary, summary_text

from ..builders import app_route
from ..certs import client_context, issue, tls_section
from ..conftest import wait_for

SIZE = (140, 40)
DAY = 86400.0


def drawn(app: DashboardApp) -> list[list[Segment]]:
    """The header's lines as drawn: segments with their text and style."""
    summary = app.query_one(Summary)
    region = Region(0, 0, summary.size.width, summary.size.height)
    return [list(strip) for strip in summary.render_lines(region)]


def expiry_segment(lines: list[list[Segment]]) -> Segment | None:
    """The drawn segment holding the soonest expiry (after its label)."""
    for line in lines:
        text = "".join(s.text for s in line)
        if "soonest expiry" in text:
            after = False
            for s in line:
                if after and s.text.strip():
                    return s
                after = after or "soonest expiry" in s.text
    return None


@pytest.mark.parametrize(("days", "marked"), [(5, True), (60, False)])
async def test_the_soonest_expiry_is_marked_under_14_days(start_gateway, upstream, tls_ca: trustme.CA,
                                                         tmp_path: Path, days: int, marked: bool) -> None:
    """1. a TLS gateway with a certificate expiring in ``days`` days serves one request
    2. the dashboard's header grows a third line: TLS handshakes 1, the expiry date,
    days left and the certificate's file 3. drawn in yellow under 14 days, not at 60."""
    not_after = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=days)
    pem = issue(tls_ca, tmp_path / "certs", "site", "a.example", not_after=not_after)
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(pem))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=client_context(tls_ca),
                                                   server_hostname="a.example")
    writer.write(b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
    writer.close()
    app = DashboardApp(gw.socket_path, interval=0.1)
    async with app.run_test(size=SIZE) as pilot:
        summary = app.query_one(Summary)
        await wait_for(lambda: "handshakes 1" in summary.text.plain, timeout=10)
        await pilot.pause()
        assert summary.size.height == 3
        lines = drawn(app)
        third = "".join(s.text for s in lines[2]).strip()
        assert third.startswith("TLS handshakes 1  errors 0  soonest expiry "), third
        segment = expiry_segment(lines)
        assert segment is not None and segment.style is not None
        assert segment.text.startswith(f"{not_after:%Y-%m-%d} ({days - 1}d left) ")
        assert segment.text.rstrip().endswith("/certs/site.pem")
        assert segment.style.bold
        # the theme draws "yellow" as its own warning colour: compare with the plain
        # figures of the same line (the handshakes' count)
        plain = next(s for s in lines[2] if s.text == "1")
        assert plain.style is not None
        assert (segment.style.color != plain.style.color) is marked, (segment.style, plain.style)
        if marked:
            warm = segment.style.color.get_truecolor() if segment.style.color else None
            assert warm is not None and warm.red > 150 and warm.green > 100 and warm.blue < 100, warm  # yellow, not red


def snapshot(*not_afters: float, now: float = 1_790_000_000.0, **tls: int) -> Sample:
    certs = [{"cert": f"certs/c{i}.pem", "hosts": ["a.example"], "not_after": t} for i, t in enumerate(not_afters)]
    return Sample({"time": now, "pid": 1, "tls": {"handshakes": 0, "handshake_errors": 0, "certificates": certs,
                                                   **tls}}, received=0.0)


def test_soonest_certificate_is_the_first_to_expire_seen_at_the_snapshots_time() -> None:
    now = 1_790_000_000.0
    c = soonest_certificate(snapshot(now + 60 * DAY, now + 13.5 * DAY, now + 20 * DAY))
    assert c is not None and (c.cert, c.left_s, c.soon, c.expired) == ("certs/c1.pem", 13.5 * DAY, True, False)
    c = soonest_certificate(snapshot(now + 14 * DAY))
    assert c is not None and not c.soon and not c.expired
    c = soonest_certificate(snapshot(now - 1.0, now + DAY))
    assert c is not None and c.expired and not c.soon
    assert soonest_certificate(snapshot()) is None
    assert soonest_certificate(Sample({"time": now, "tls": {"certificates": "x"}}, 0.0)) is None
    assert soonest_certificate(Sample({"time": now}, 0.0)) is None  # an older gatewayd


def test_the_tls_line_styles_and_its_absence() -> None:
    now = 1_790_000_000.0

    def tls_line(sample: Sample) -> tuple[str, str] | None:
        text = summary_text(sample)
        lines = text.plain.split("\n")
        if len(lines) < 3:
            return None
        if "soonest expiry" not in lines[2]:
            return lines[2], ""
        start = text.plain.index("soonest expiry") + len("soonest expiry ")
        styles = {str(s.style) for s in text.spans if s.start <= start < s.end}
        return lines[2], " ".join(sorted(styles))

    line, style = tls_line(snapshot(now + 5 * DAY + 60, handshakes=12, handshake_errors=3)) or ("", "")
    assert line == "TLS handshakes 12  errors 3  soonest expiry 2026-09-26 (5d left) certs/c0.pem"
    assert style == "bold yellow"
    line, style = tls_line(snapshot(now + 3600 * 7.5)) or ("", "")
    assert "(7h left)" in line and style == "bold yellow"
    line, style = tls_line(snapshot(now + 60 * DAY)) or ("", "")
    assert "(60d left)" in line and style == "bold"
    line, style = tls_line(snapshot(now - DAY)) or ("", "")
    assert line.endswith("soonest expiry 2026-09-20 EXPIRED certs/c0.pem") and style == "bold red"
    assert tls_line(snapshot()) is None  # no TLS: two lines, as before
    line, _ = tls_line(snapshot(handshakes=4)) or ("", "")  # TLS turned off by a reload: its counts stay
    assert line == "TLS handshakes 4  errors 0"
    long = Sample({"time": now, "tls": {"certificates": [
        {"cert": "/etc/gatewayd/tls/production/wildcard.example.com.pem", "not_after": now + DAY}]}}, 0.0)
    assert "(1d left) …" in summary_text(long).plain and summary_text(long).plain.endswith("/wildcard.example.com.pem")
