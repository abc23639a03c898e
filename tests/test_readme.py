"""The README as a new user follows it: its commands work as written, the tour is
readable in the terminals it names, and it points to the man pages."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .builders import free_port
from .conftest import raw_request, refused, status_of, wait_for, wait_for_sync

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = sorted((ROOT / "man").glob("*.[158]"))


def tour() -> str:
    return README[README.index("## A five-minute tour") : README.index("## Documentation")]


def test_no_page_and_not_the_readme_points_to_spec_md():
    """SPEC.md is not shipped: the man pages are the user's contract."""
    for name, text in [("README.md", README)] + [(p.name, p.read_text()) for p in PAGES]:
        assert "SPEC" not in text, name


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_the_readmes_man_commands_work_as_written():
    """1. every `man ...` the README shows 2. run from the clone, the venv's bin NOT on
    PATH (as after the README's own commands), MANPATH unset 3. man finds the page."""
    env = {k: v for k, v in os.environ.items() if k not in ("MANPATH", "MANOPT", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    shown = re.findall(r"`(man [^`]+)`", README)
    assert any("gatewayd.8" in c or c == "man gatewayd" for c in shown), shown
    for command in shown:
        argv = command.split()
        run = subprocess.run([argv[0], "-w", *argv[1:]], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=30)
        assert run.returncode == 0, (command, run.stderr)
    # the by-name form, once the venv is activated as the README says
    activate = Path(sys.prefix) / "bin" / "activate"
    if activate.exists() and ". .venv/bin/activate && man gatewayd" in README:
        run = subprocess.run(["bash", "-c", f". {activate} && man -w gatewayd && man -w 5 gatewayd.toml"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
        assert run.returncode == 0, run.stderr


def test_the_tour_says_which_terminal():
    """gatewayd stays in the foreground of its own terminal (a `&` job and `kill %1` work
    only in the shell that started it); the dashboard and wrk are given a terminal; the
    tour says how to stop gatewayd."""
    text = tour()
    assert not re.search(r"gatewayd --config config\.toml\s*&", text)
    assert "kill %1" not in text and "kill -HUP %1" not in text
    for where in ("Terminal 1", "Terminal 2", "Terminal 3"):
        assert where in text
    dashboard = text[: text.index("gatewayd-dashboard --config")]
    assert dashboard.rfind("Terminal 3") > dashboard.rfind("Terminal 2")
    assert "Ctrl-C" in text and "exits 0" in text


async def test_the_example_keeps_the_access_log_out_of_the_terminal(tmp_path):
    """1. the example config.toml, as it is but on free ports, in a folder of its own
    2. gatewayd on it, a request 3. nothing on standard output (the tour's terminal);
    the request's line is in access.log beside the file, as the README says."""
    port, metrics = free_port(), free_port()
    text = (ROOT / "config.toml").read_text()
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace("127.0.0.1:9100", f"127.0.0.1:{metrics}")
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gatewayd", "--config", str(cfg)],
                                stdout=out, stderr=err, cwd=str(tmp_path / ".."))
    try:
        wait_for_sync(lambda: not refused(port), timeout=20)
        response = await raw_request(port, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(response) == 200
        log = tmp_path / "access.log"
        await wait_for(lambda: log.exists() and b"GET /hello" in log.read_bytes(), timeout=5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    assert (tmp_path / "out").read_bytes() == b""
    assert "access.log" in tour() or "access.log" in README


def test_the_fastapi_section_runs_as_written(tmp_path):
    """The README's FastAPI config, as written, beside a main.py holding a FastAPI app:
    gatewayd starts (the app found beside the file), serves it, and stops on SIGTERM."""
    section = README[README.index("## Run your FastAPI app under gatewayd"):README.index("## Documentation")]
    config = re.search(r"```toml\n(.*?)```", section, re.S)
    assert config is not None
    port = free_port()
    (tmp_path / "gatewayd.toml").write_text(
        config.group(1).replace('"0.0.0.0:8000"', f'"127.0.0.1:{port}"')
        + '\n[control]\nsocket = "gw.sock"\n[log]\naccess_log = "off"\n')
    (tmp_path / "main.py").write_text(
        "from fastapi import FastAPI\napp = FastAPI()\n\n"
        "@app.get('/hello/{name}')\nasync def hello(name: str):\n    return {'hello': name}\n")
    gatewayd = Path(sys.executable).parent / "gatewayd"
    # started from elsewhere: the app is found beside the file all the same
    err = tmp_path / "stderr"
    with err.open("wb") as sink:
        proc = subprocess.Popen([str(gatewayd), "--config", str(tmp_path / "gatewayd.toml")], cwd="/",
                                stdout=subprocess.DEVNULL, stderr=sink)
    try:
        wait_for_sync(lambda: (tmp_path / "gw.sock").exists() or proc.poll() is not None, timeout=20)
        assert proc.poll() is None, err.read_text()
        answer = asyncio.run(raw_request(port, b"GET /hello/ada HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        assert status_of(answer) == 200 and answer.endswith(b'{"hello":"ada"}')
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
