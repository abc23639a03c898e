"""gatewayctl in a shell (issue 19): into a pipe its reader closes early, with its
options after the command, with the routes named when one is not, and with each
upstream's servers and their state in ``status`` — against a real gateway.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import subprocess
import sys

import pytest

from ..builders import app_route, free_port, gateway_config, handler_route, route_toml, upstream_toml
from ..certs import client_context, issue, tls_section
from ..conftest import ROOT, raw_request, status_of, wait_for_sync

CTL = (sys.executable, "-m", "gatewayd.control.cli")
EXIT_PIPE = 141  # 128 + SIGPIPE, what a shell shows for `ls` cut short by `head`


def clean_env() -> dict[str, str]:
    """This environment without the variables that name a gateway: only the options do."""
    return {k: v for k, v in os.environ.items() if k not in ("GATEWAYD_SOCKET", "GATEWAYD_CONFIG")}


async def ctl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *CTL, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT), env=clean_env())
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# ----------------------------------------------------------------------------- a pipe closed early
async def ctl_into(reader: tuple[str, ...], *args: str) -> tuple[int, str, bytes]:
    """``gatewayctl ARGS | READER`` over a real pipe: gatewayctl's exit status and
    standard error, and what the reader printed."""
    r, w = os.pipe()
    try:
        head = await asyncio.create_subprocess_exec(*reader, stdin=r, stdout=subprocess.PIPE)
        proc = await asyncio.create_subprocess_exec(
            *CTL, *args, stdout=w, stderr=subprocess.PIPE, cwd=str(ROOT), env=clean_env())
    finally:
        os.close(r)
        os.close(w)
    (printed, _), (_, err) = await asyncio.gather(head.communicate(), proc.communicate())
    assert proc.returncode is not None
    return proc.returncode, err.decode(), printed


async def test_status_into_a_reader_already_gone(start_gateway):
    """The reader has exited before gatewayctl writes a byte: every write fails
    (EPIPE). gatewayctl says nothing and exits 141, as a filter killed by SIGPIPE."""
    gw = await start_gateway(handler_route("demo"))
    for args in (("status",), ("snapshot",), ("--json", "status")):
        r, w = os.pipe()
        reader = await asyncio.create_subprocess_exec("true", stdin=r)
        assert await reader.wait() == 0
        os.close(r)  # no reader left anywhere
        try:
            proc = await asyncio.create_subprocess_exec(
                *CTL, "--config", str(gw.config_path), *args, stdout=w, stderr=subprocess.PIPE,
                cwd=str(ROOT), env=clean_env())
        finally:
            os.close(w)
        _, err = await proc.communicate()
        assert (proc.returncode, err.decode()) == (EXIT_PIPE, ""), args


async def test_status_into_head_repeatedly(start_gateway):
    """``gatewayctl status | head -1`` with a status of several pipe writes, twenty
    times at once: head prints the first line and closes; gatewayctl exits 0 (all
    written before head left) or 141, and never prints a traceback."""
    body = upstream_toml("demo", handler="gatewayd.handlers:simulated_io")
    body += "".join(route_toml(f"route{i:03d}", "demo", path_prefix=f"/r{i}/") for i in range(300))
    gw = await start_gateway(body)
    runs = await asyncio.gather(*(ctl_into(("head", "-1"), "--config", str(gw.config_path), "status")
                                  for _ in range(20)))
    for code, err, printed in runs:
        assert err == "" and code in (0, EXIT_PIPE), (code, err)
        assert printed.startswith(b"gatewayd ") and printed.count(b"\n") == 1


# ----------------------------------------------------------------------------- options after the command
@pytest.fixture
async def gw(start_gateway, upstream):
    return await start_gateway(app_route(upstream.url, max_concurrency=2, max_queue=10)
                               + handler_route("demo", path_prefix="/demo/"))


async def test_options_after_the_command(gw):
    """Every common option works before and after the command (and its arguments)."""
    c, s = str(gw.config_path), str(gw.socket_path)
    for args in (("status", "--config", c), ("status", "-c", c), ("--config", c, "status"),
                 ("status", "--socket", s), ("-s", s, "status"), ("status", "-s", s)):
        code, out, err = await ctl(*args)
        assert (code, err) == (0, ""), args
        assert out.startswith("gatewayd ") and "\napp " in out, args
    for args in (("--json", "-c", c, "status"), ("status", "--json", "-c", c), ("status", "-c", c, "--json"),
                 ("-c", c, "snapshot", "--json")):
        code, out, _ = await ctl(*args)
        assert code == 0 and json.loads(out)["snapshot"]["routes"][0]["name"] == "app", args
    code, out, _ = await ctl("queue", "app", "--socket", s)
    assert code == 0 and out == "0 waiting on route app\n"
    code, out, _ = await ctl("queue", "--socket", s, "app")
    assert code == 0 and out == "0 waiting on route app\n"
    code, out, _ = await ctl("set-limit", "app", "5", "--socket", s)
    assert code == 0 and "max_concurrency 5, max_queue 10" in out
    code, out, _ = await ctl("set-limit", "-c", c, "app", "--queue", "7", "--json")
    assert code == 0 and json.loads(out) == {"ok": True, "route": "app", "max_concurrency": 5, "max_queue": 7}
    code, out, _ = await ctl("reload", "--dry-run", "--config", c)
    assert code == 0 and out.startswith("reload ok: would change")
    code, out, _ = await ctl("reload", "--config", c, "--dry-run")
    assert code == 0 and out.startswith("reload ok: would change")


async def test_socket_and_config_still_exclude_each_other(gw):
    c, s = str(gw.config_path), str(gw.socket_path)
    for args in (("--socket", s, "--config", c, "status"), ("--socket", s, "status", "--config", c),
                 ("status", "-c", c, "-s", s)):
        code, out, err = await ctl(*args)
        assert code == 2 and out == "" and "not allowed with" in err, args


async def test_help_of_a_command_lists_the_common_options():
    code, out, _ = await ctl("status", "--help")
    assert code == 0 and "--socket" in out and "--config" in out and "--json" in out


# ----------------------------------------------------------------------------- no route 'x'
async def test_no_route_lists_the_routes(gw):
    """An unknown route is answered with the routes there are, as config errors do."""
    expected = "no route 'x' (routes: app, demo)"
    for request in ({"cmd": "set_limit", "route": "x", "max_concurrency": 3},
                    {"cmd": "queue", "route": "x"}):
        assert await gw.command(request) == {"ok": False, "error": expected}
    for args in (("set-limit", "x", "3"), ("queue", "x")):
        code, out, err = await ctl("--socket", str(gw.socket_path), *args)
        assert (code, out, err) == (1, "", f"gatewayctl: {expected}\n"), args
    code, out, _ = await ctl("--socket", str(gw.socket_path), "--json", "queue", "x")
    assert code == 1 and json.loads(out) == {"ok": False, "error": expected}


# ----------------------------------------------------------------------------- upstream health in status
def upstream_section(out: str) -> list[str]:
    """The lines of ``status`` after the route table's blank line."""
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "")
    return lines[start + 1:]


def unwrapped(section: list[str]) -> list[str]:
    """One line per upstream: indented lines joined to the one before."""
    out: list[str] = []
    for line in section:
        if line.startswith(" "):
            out[-1] += " " + line.strip()
        else:
            out.append(line)
    return out


async def test_status_shows_each_upstreams_servers_and_their_state(start_gateway, upstream):
    """One dead server of two ejected by passive health, one server set down by hand,
    one upstream in rotation and one in-process handler: ``status`` names every
    server with its state, at most 80 columns wide; the handler has no servers."""
    dead_port = free_port()
    live = upstream.url.removeprefix("http://")
    body = (upstream_toml("app", servers=[f"http://127.0.0.1:{dead_port}", upstream.url],
                          max_fails=2, fail_timeout=30, connect_timeout=1.0)
            + upstream_toml("spare", servers=[upstream.url, f"http://127.0.0.1:{free_port()}"])
            + upstream_toml("demo", handler="gatewayd.handlers:simulated_io")
            + route_toml("app", "app") + route_toml("spare", "spare", path_prefix="/spare/")
            + route_toml("demo", "demo", path_prefix="/demo/"))
    gw = await start_gateway(body)
    for _ in range(8):
        resp = await raw_request(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(resp) == 200

    async def app_states() -> list[str]:
        snap = (await gw.command({"cmd": "snapshot"}))["snapshot"]
        return [s["state"] for s in snap["upstreams"][0]["servers"]]

    assert await app_states() == ["ejected", "up"]
    answer = await gw.command({"cmd": "server_state", "upstream": "spare", "server": live, "state": "down"})
    assert answer["ok"]

    code, out, err = await ctl("--config", str(gw.config_path), "status")
    assert (code, err) == (0, "")
    section = upstream_section(out)
    assert all(len(line) <= 80 for line in section), section
    app, spare = unwrapped(section)
    ejected = re.fullmatch(rf"upstream app: 127\.0\.0\.1:{dead_port} ejected \((\d+) s left, upstream_connect\), "
                           rf"{re.escape(live)} up", app)
    assert ejected is not None, app
    assert 25 <= int(ejected.group(1)) <= 30
    assert re.fullmatch(rf"upstream spare: {re.escape(live)} down \(by hand\), 127\.0\.0\.1:\d+ up", spare), spare
    assert "demo" not in "\n".join(section)


async def test_many_servers_wrap_at_80_columns(start_gateway):
    """An upstream of twelve servers: its servers wrap onto indented lines of at most
    80 columns, each server whole on one line, each once, in the configured order."""
    ports = [free_port() for _ in range(12)]
    servers = [f"http://127.0.0.1:{p}" for p in ports]
    gw = await start_gateway(upstream_toml("a_long_upstream_name", servers=servers)
                             + route_toml("app", "a_long_upstream_name"))
    code, out, _ = await ctl("--config", str(gw.config_path), "status")
    assert code == 0
    section = upstream_section(out)
    assert len(section) > 1 and all(len(line) <= 80 for line in section), section
    assert section[0].startswith("upstream a_long_upstream_name: 127.0.0.1:")
    indent = len("upstream a_long_upstream_name: ")
    assert all(line.startswith(" " * indent) and line[indent] != " " for line in section[1:]), section
    (line,) = unwrapped(section)
    items = [i.strip() for i in line.split(":", 1)[1].split(",")]
    assert items == [f"127.0.0.1:{p} up" for p in ports]


async def test_status_without_servers_has_no_upstream_section(start_gateway):
    gw = await start_gateway(handler_route("demo"))
    code, out, _ = await ctl("--config", str(gw.config_path), "status")
    assert code == 0 and not [line for line in out.splitlines() if line.startswith("upstream ")]


def test_with_workers(gateway_process):
    """Two workers behind a master: the master answers an unknown route with the
    routes, and ``status`` shows a server set down by hand (in every worker) and one
    in rotation, from the servers merged over the workers."""
    down, up = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    gp = gateway_process(upstream_toml("app", servers=[down, up]) + route_toml("app", "app")
                         + handler_route("demo", path_prefix="/demo/"), workers=2)

    def workers_up() -> bool:
        workers = gp.command({"cmd": "snapshot"})["snapshot"]["workers"]
        return len([w for w in workers if w["pid"]]) == 2

    wait_for_sync(workers_up, timeout=20)  # the socket answers before both workers are up
    answer = gp.command({"cmd": "server_state", "upstream": "app", "server": down, "state": "down"})
    assert answer["ok"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CTL, *args, "--config", str(gp.config_path)], capture_output=True, text=True,
                              cwd=str(ROOT), env=clean_env(), timeout=30)

    done = run("queue", "x")
    assert (done.returncode, done.stderr) == (1, "gatewayctl: no route 'x' (routes: app, demo)\n")
    done = run("status")
    assert done.returncode == 0
    assert upstream_section(done.stdout) == [
        f"upstream app: {down.removeprefix('http://')} down (by hand), {up.removeprefix('http://')} up"]


# ----------------------------------------------------------------------------- TLS in status
def tls_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("tls ")]


async def test_status_shows_tls_handshakes_and_the_soonest_expiry(start_gateway, upstream, tls_ca, tmp_path):
    """Two certificates, one expiring in 60 days, one in 5: after a TLS request and a
    clear-text one on the TLS port, ``status`` has one tls line, at most 80 columns,
    with the handshakes, the error and the 5-day certificate's date (its path cut from
    the left); an expired certificate added by a reload says EXPIRED."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    later = issue(tls_ca, tmp_path / "certs", "later", "a.example", not_after=now + datetime.timedelta(days=60))
    soon = issue(tls_ca, tmp_path / "certs", "soon", "b.example", not_after=now + datetime.timedelta(days=5))
    gw = await start_gateway(app_route(upstream.url), tls=tls_section(later, soon))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, ssl=client_context(tls_ca),
                                                   server_hostname="a.example")
    writer.write(b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
    assert status_of(await asyncio.wait_for(reader.read(), 5)) == 200
    writer.close()
    assert status_of(await raw_request(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")) == 0
    await asyncio.to_thread(wait_for_sync, lambda: gw.runtime.handshakes.errors == 1)
    code, out, _ = await ctl("--config", str(gw.config_path), "status")
    assert code == 0
    (line,) = tls_lines(out)
    assert len(line) <= 80, line
    date = (now + datetime.timedelta(days=5)).strftime("%Y-%m-%d")
    assert re.fullmatch(rf"tls handshakes 1  errors 1  expires {date} \(4 days left\) …[^ ]*/certs/soon\.pem",
                        line), line
    lines = out.splitlines()
    assert lines.index(line) == 2  # under the process figures, above the routes

    expired = issue(tls_ca, tmp_path / "certs", "old", "c.example",
                    not_after=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
    gateway_config(tmp_path, app_route(upstream.url), port=gw.port, tls=tls_section(later, soon, expired))
    assert (await gw.command({"cmd": "reload"}))["ok"]
    code, out, _ = await ctl("--config", str(gw.config_path), "status")
    (line,) = tls_lines(out)
    assert re.fullmatch(r"tls handshakes 1  errors 1  expires 2020-01-01 \(EXPIRED \d+ days ago\) …[^ ]*/old\.pem",
                        line), line


async def test_status_without_tls_has_no_tls_line(start_gateway, upstream):
    gw = await start_gateway(app_route(upstream.url))
    code, out, _ = await ctl("--config", str(gw.config_path), "status")
    assert code == 0 and tls_lines(out) == []
