"""gatewayd-dashboard in a real terminal: tmux at 140x40 (and 80x24), the screen read back with
capture-pane, keys sent with send-keys, against gatewayd as a real process."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from dashboard.widgets import NARROW

from ..conftest import ROOT, wait_for

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

CONFIG = """
    [upstreams.demo]
    handler = "gatewayd.handlers:simulated_io"

    [[routes]]
    name = "demo"
    path_prefix = "/"
    upstream = "demo"
    max_concurrency = 100
    max_queue = 200

    [[routes]]
    name = "slowpoke"
    path_prefix = "/slow"
    upstream = "demo"
    max_concurrency = 2
    max_queue = 10
"""


class Terminal:
    """A tmux server of our own (its own socket), one window (140x40 unless told)."""

    def __init__(self, tmp: Path) -> None:
        self.socket = tmp / "tmux.sock"
        self.exit_file = tmp / "dashboard.exit"
        self.size = (140, 40)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], check=True, capture_output=True,
                              text=True, timeout=10).stdout

    def start(self, *command: str) -> None:
        # COLUMNS and LINES (pytest may set them) would override the terminal's own size
        line = "env -u COLUMNS -u LINES " + " ".join(command) + f"; echo $? > {self.exit_file}"
        width, height = self.size
        self.tmux("new-session", "-d", "-s", "dash", "-x", str(width), "-y", str(height), "-c", str(ROOT), line)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "dash")

    def keys(self, text: str) -> None:
        self.tmux("send-keys", "-t", "dash", "-l", text)

    def running(self) -> bool:
        return subprocess.run(["tmux", "-S", str(self.socket), "has-session", "-t", "dash"],
                              capture_output=True, timeout=10).returncode == 0

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    term = Terminal(tmp_path)
    yield term
    term.kill()


@contextlib.asynccontextmanager
async def traffic(url: str, clients: int = 4) -> AsyncIterator[None]:
    async def client(session: aiohttp.ClientSession) -> None:
        while True:
            try:
                async with session.get(url) as r:
                    await r.read()
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)  # the gateway is restarting

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(clients)]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def route_line(screen: str, name: str) -> str:
    return next((line for line in screen.splitlines() if re.match(rf"^│ {name} ", line)), "")


async def screen_shows(term: Terminal, predicate: Callable[[str], object], timeout: float = 10.0) -> str:
    """Wait until ``predicate(screen text)`` holds; the screen that satisfied it."""

    last = [""]

    def check() -> str | None:
        last[0] = term.screen()
        return last[0] if predicate(last[0]) else None

    try:
        return str(await wait_for(check, timeout=timeout, interval=0.1))
    except AssertionError:
        raise AssertionError(f"not on screen within {timeout}s; the screen:\n{last[0]}") from None


async def test_in_tmux_live_numbers_keys_and_a_daemon_restart(gateway_process, terminal: Terminal) -> None:
    """1. gatewayd runs, with traffic 2. the dashboard (--config) shows both routes and
    live figures 3. the figures change between captures 4. `+` raises demo's
    max_concurrency in the daemon, `r` reloads it (generation 2) 5. gatewayd stops: a
    visible DISCONNECTED 6. gatewayd starts again: data within seconds 7. `q` quits, status 0."""
    gp = await asyncio.to_thread(gateway_process, CONFIG, shutdown_timeout=0.5)
    listen = tomllib.loads(gp.config_path.read_text())["server"]["listen"][0]
    terminal.start(sys.executable, "-m", "dashboard", "--config", str(gp.config_path))
    async with traffic(f"http://{listen}/?ms=5"):
        first = await screen_shows(terminal, lambda s: "● connected" in s and "slowpoke" in s
                                   and re.search(r"\d+\.\d+ms", route_line(s, "demo")))
        assert "In flight/limit" in first and "Events" in first and "Queue X-ray: demo" in first
        await screen_shows(terminal, lambda s: route_line(s, "demo") != route_line(first, "demo"))

        terminal.keys("+")
        await wait_for(lambda: gp.command({"cmd": "snapshot"})["snapshot"]["routes"][0]["max_concurrency"] == 101,
                       timeout=5)
        await screen_shows(terminal, lambda s: "/101" in route_line(s, "demo"))
        terminal.keys("r")
        await wait_for(lambda: gp.command({"cmd": "snapshot"})["snapshot"]["generation"] == 2, timeout=5)
        await screen_shows(terminal, lambda s: "generation 2" in s and "reload ok" in s)

        await asyncio.to_thread(gp.stop)
        down = await screen_shows(terminal, lambda s: "DISCONNECTED" in s)
        assert "STALE: data from" in down  # the last figures stay, marked as old
        await asyncio.to_thread(gp.start)
        back = await screen_shows(terminal, lambda s: "● connected" in s and "generation 1" in s
                                  and "connection restored" in s, timeout=10)
        assert "demo" in route_line(back, "demo")

    terminal.keys("q")
    await wait_for(lambda: terminal.exit_file.exists() and not terminal.running(), timeout=10, interval=0.1)
    assert terminal.exit_file.read_text().strip() == "0"


def narrow_cells(line: str) -> dict[str, str]:
    """A routes-table line of the narrow layout, cut into its columns (after the border)."""
    out, x = {}, 1
    for c in NARROW:
        out[c.key] = line[x: x + c.width + 2].strip()
        x += c.width + 2
    return out


NARROW_HEADER = ("Route", "In/limit", "Queued", "serv/s", "shed/s", "p50", "p99", "Cancel", "UpErr")


async def test_in_tmux_at_80x24_every_important_column_is_on_screen(gateway_process, terminal: Terminal) -> None:
    """1. gatewayd with traffic, slowpoke overloaded (2 slots, 10 queued, the rest shed)
    2. the dashboard in an 80x24 terminal 3. one header line holds in-flight/limit,
    queued, served/s, shed/s, p50, p99, cancels and upstream errors, all within 80
    columns 4. slowpoke's line shows its 503s per second and its queue 5. the X-ray
    follows slowpoke, the most pressed route, though the cursor is on demo 6. the
    events pane is on screen 7. `u` shows the upstreams pane in place of the trends."""
    gp = await asyncio.to_thread(gateway_process, CONFIG, shutdown_timeout=0.5)
    listen = tomllib.loads(gp.config_path.read_text())["server"]["listen"][0]
    terminal.size = (80, 24)
    terminal.start(sys.executable, "-m", "dashboard", "--config", str(gp.config_path))
    async with traffic(f"http://{listen}/?ms=5"), traffic(f"http://{listen}/slow?ms=400", clients=20):
        def overloaded(s: str) -> bool:
            cells = narrow_cells(route_line(s, "slowpoke"))
            return ("● connected" in s and cells["shed_rps"] not in ("", "0") and cells["served_rps"] not in ("", "0")
                    and cells["in_flight"] == "2/2" and cells["queued"] == "10/10")  # busy, queue full

        screen = await screen_shows(terminal, overloaded)
        header = next((line for line in screen.splitlines() if "Route" in line and "UpErr" in line), "")
        assert [header.find(label) >= 0 for label in NARROW_HEADER] == [True] * len(NARROW_HEADER), screen
        assert len(header) <= 80 and header.rstrip().endswith("│")
        cells = narrow_cells(route_line(screen, "slowpoke"))
        assert float(cells["shed_rps"]) > float(cells["served_rps"]) > 0, screen
        assert "Queue X-ray: slowpoke" in screen and "most pressed" in screen and "Events" in screen
        terminal.keys("u")
        await screen_shows(terminal, lambda s: "Upstreams" in s and "Trends" not in s)
