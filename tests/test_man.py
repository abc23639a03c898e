"""The man pages: generated where they can be, checked against the code where
they cannot, lint-clean, and installed where man(1) looks for them."""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gatewayd.config import diff as confdiff
from gatewayd.config.settings import RELOAD_RESTART, SECTIONS, RouteConfig, UpstreamConfig, settings_of
from gatewayd.control.prometheus import SnapshotCollector
from gatewayd.stats.metrics import LATENCY_BUCKETS, PAUSE_BUCKETS

from .builders import app_route, handler_route

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
MINE = ("gatewayd.8", "gatewayd.toml.5", "gatewayctl.1")
# where each page goes in the wheel and in a prefix (pyproject's shared-data)
INSTALLED = {
    "gatewayd.8": "share/man/man8/gatewayd.8",
    "gatewayd.toml.5": "share/man/man5/gatewayd.toml.5",
    "gatewayctl.1": "share/man/man1/gatewayctl.1",
    "gatewayd-dashboard.1": "share/man/man1/gatewayd-dashboard.1",
}


def page(name: str) -> str:
    return (MAN / name).read_text()


def words(text: str) -> set[str]:
    """Identifiers in a page's source, roff escapes undone."""
    for escape in ("\\-", "\\fB", "\\fI", "\\fR", "\\(dq", "\\(aq"):
        text = text.replace(escape, " ")
    return set(re.findall(r"[A-Za-z0-9_]+", text))


def _manpage_keys() -> Any:
    spec = importlib.util.spec_from_file_location("manpage_keys", ROOT / "tools" / "manpage_keys.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- gatewayd.toml(5)
def test_keys_section_is_generated():
    """man/gatewayd.toml.5's key list is what tools/manpage_keys.py makes of
    gatewayd/config/settings.py (run the tool after changing a setting)."""
    tool = _manpage_keys()
    text = page("gatewayd.toml.5")
    assert tool.splice(text, tool.render()) == text, "run: python tools/manpage_keys.py"


def documented_keys() -> dict[str, set[str]]:
    """Table heading -> the keys the page documents under it."""
    out: dict[str, set[str]] = {}
    heading = None
    lines = page("gatewayd.toml.5").splitlines()
    tool = _manpage_keys()
    block = lines[lines.index(tool.BEGIN) : lines.index(tool.END)]
    for prev, line in itertools.pairwise(block):
        if line.startswith(".SS "):
            heading = line[4:].strip('"')
            out[heading] = set()
        elif prev == ".TP" and line.startswith(".B ") and heading:
            out[heading].add(line[3:])
    return out


def test_every_declared_key_is_documented():
    keys = documented_keys()
    tables = {f"[{n}]": cls for n, cls in SECTIONS.items()}
    tables.update({"[upstreams.NAME]": UpstreamConfig, "[[routes]]": RouteConfig})
    assert keys == {t: {f.name for f in settings_of(cls)} for t, cls in tables.items()}


# SPEC §2's example, as the contract states it (checked against shared/SPEC.md when
# that file is beside the repository).
SPEC_KEYS_TOML = """
[server]
listen = ["127.0.0.1:8080"]
workers = 1
max_connections = 10000
keepalive_timeout = 75.0
request_header_timeout = 10.0
request_body_timeout = 20.0
request_body_min_rate = 500
max_body_size = "10MiB"
shutdown_timeout = 30.0
[control]
socket = "gatewayd.sock"
mode = 0o600
[metrics]
listen = "127.0.0.1:9100"
[log]
level = "info"
access_log = "-"
access_format = "combined"
[upstreams.app]
servers = ["http://127.0.0.1:9000"]
connect_timeout = 2.0
read_timeout = 30.0
[upstreams.demo]
handler = "gatewayd.handlers:simulated_io"
[upstreams.thumbnails]
handler = "myapp.images:resize"
executor = "process"
processes = 2
[[routes]]
name = "app"
path_prefix = "/"
strip_prefix = false
host = "example.com"
upstream = "app"
max_concurrency = 100
max_queue = 1000
queue_timeout = 2.0
"""


def spec_keys(data: dict[str, Any]) -> set[tuple[str, str]]:
    out = set()
    for table, body in data.items():
        if table == "upstreams":
            out |= {("[upstreams.NAME]", key) for u in body.values() for key in u}
        elif table == "routes":
            out |= {("[[routes]]", key) for r in body for key in r}
        else:
            out |= {(f"[{table}]", key) for key in body}
    return out


def test_every_spec_key_is_documented():
    """Every key of SPEC §2 is declared and has its entry in gatewayd.toml(5)."""
    keys = spec_keys(tomllib.loads(SPEC_KEYS_TOML))
    spec = ROOT.parent / "shared" / "SPEC.md"
    if spec.exists():
        text = spec.read_text()
        block = text[text.index("```toml", text.index("## 2.")) + 7 :]
        assert spec_keys(tomllib.loads(block[: block.index("```")])) == keys, "SPEC §2 changed"
    documented = documented_keys()
    missing = [f"{t} {k}" for t, k in sorted(keys) if k not in documented.get(t, set())]
    assert not missing


def test_restart_only_keys_agree():
    """The keys the page calls "read at start only" are those a reload refuses."""
    declared = {
        (name, f.name)
        for name, cls in SECTIONS.items()
        for f in settings_of(cls)
        if f.metadata["reload"] == RELOAD_RESTART
    }
    assert declared == set(confdiff.RESTART_ONLY)
    text = page("gatewayd.8") + page("gatewayd.toml.5")
    for section, key in confdiff.RESTART_ONLY:
        assert f"{section}.{key}" in text


# ----------------------------------------------------------------------------- gatewayd(8)
BODY = handler_route(max_concurrency=4)


def keys_of(value: Any, into: set[str]) -> set[str]:
    """Every key of every object in a JSON value (not the keys that are data)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not k.isdigit():  # status codes as keys, in "codes"
                into.add(k)
            keys_of(v, into)
    elif isinstance(value, list):
        for v in value:
            keys_of(v, into)
    return into


async def test_every_snapshot_and_answer_field_is_documented(start_gateway, upstream):
    """1. a gateway with a handler and an HTTP upstream serves a request on each 2. its
    snapshot and the answers to every control command are collected 3. each field name
    appears in gatewayd(8)."""
    gw = await start_gateway(BODY + app_route(upstream.url, path_prefix="/app/"))
    async with aiohttp.ClientSession() as s:
        for path in ("/x", "/app/x"):
            async with s.get(gw.url + path) as r:
                assert r.status == 200
    answers = [
        await gw.command(c)
        for c in (
            {"cmd": "hello"},
            {"cmd": "snapshot", "histograms": True},
            {"cmd": "queue", "route": "demo"},
            {"cmd": "set_limit", "route": "demo", "max_concurrency": 5, "max_queue": 7},
            {"cmd": "server_state", "upstream": "app", "server": upstream.url, "state": "up"},
            {"cmd": "reload", "dry_run": True},
            {"cmd": "reload"},
            {"cmd": "nonsense"},
        )
    ]
    fields = set()
    for a in answers:
        keys_of(a, fields)
    assert {"in_flight", "waiters", "histogram", "generations", "servers"} <= fields
    text = page("gatewayd.8")
    section = text[text.index(".SH CONTROL SOCKET") : text.index(".SH METRICS")]
    missing = sorted(fields - words(section))
    assert not missing, f"gatewayd(8) CONTROL SOCKET does not mention {missing}"


async def test_metric_names_are_documented(start_gateway):
    """The names /metrics exposes are those gatewayd(8) lists, and no others."""
    gw = await start_gateway(BODY)
    snap = (await gw.command({"cmd": "snapshot", "histograms": True}))["snapshot"]
    names = set()
    for family in SnapshotCollector(lambda: snap).collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    text = page("gatewayd.8")
    listed = set(re.findall(r"gatewayd_[a-z_]+", text[text.index(".SH METRICS") : text.index(".SH ACCESS LOG")]))
    assert listed == names


def _bounds(bounds: tuple[float, ...]) -> str:
    return ", ".join(f"{b:f}".rstrip("0").rstrip(".") for b in bounds)


def test_histogram_bounds_are_documented():
    text = " ".join(page("gatewayd.8").split())
    assert _bounds(LATENCY_BUCKETS) in text
    assert _bounds(PAUSE_BUCKETS) in text


def test_every_gateway_reason_is_documented():
    """Each X-Gatewayd-Reason the code can answer is listed with its status."""
    found: set[tuple[int, str]] = {(503, "queue_full"), (503, "queue_timeout")}
    for path in (ROOT / "gatewayd").rglob("*.py"):
        src = path.read_text()
        for pattern in (
            r'UpstreamFailure\((\d{3}), "(\w+)"\)',
            r'reply\((\d{3}), "(\w+)"',
            r'status, reason = (\d{3}), "(\w+)"',
            r'route, (\d{3}), "(\w+)", start',
        ):
            found |= {(int(s), r) for s, r in re.findall(pattern, src)}
    assert len(found) >= 12, found
    text = page("gatewayd.8")
    for status, reason in sorted(found):
        assert f'.BR {reason} " ({status})"' in text, f"{reason} ({status}) is not in gatewayd(8)"


# ----------------------------------------------------------------------------- all pages
@pytest.mark.skipif(shutil.which("mandoc") is None, reason="mandoc is not installed (apt-get install mandoc)")
@pytest.mark.parametrize("name", MINE)
def test_mandoc_lint_clean(name):
    run = subprocess.run(
        ["mandoc", "-T", "lint", "-W", "warning", str(MAN / name)], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_pages_cross_reference_only_existing_pages():
    shipped = {re.sub(r"\.(\d)$", r"(\1)", n) for n in INSTALLED}
    for name in MINE:
        refs = re.findall(r"^\.BR ([a-z][\w.\\-]*) \((\d)\)", page(name), re.M)
        ours = {f"{p.replace(chr(92) + '-', '-')}({s})" for p, s in refs if p.startswith("gateway")}
        assert ours <= shipped, f"{name} refers to {ours - shipped}"


# ----------------------------------------------------------------------------- installed
@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The package's wheel, built once (with the hatchling at hand, else pip's build)."""
    out = tmp_path_factory.mktemp("wheel")
    if importlib.util.find_spec("hatchling") is not None:
        cmd = [sys.executable, "-m", "hatchling", "build", "--target", "wheel", "--directory", str(out)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(ROOT)]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    (path,) = out.glob("gatewayd-*.whl")
    yield path


def test_wheel_carries_the_pages(wheel):
    """The wheel's data folder holds each page at share/man/manN/, byte for byte."""
    with zipfile.ZipFile(wheel) as z:
        data = {n.split(".data/data/", 1)[1]: n for n in z.namelist() if ".data/data/" in n}
        for name, where in INSTALLED.items():
            assert where in data, f"{where} missing from the wheel"
            assert z.read(data[where]) == (MAN / name).read_bytes()


def test_man_finds_the_pages_in_a_fresh_venv(wheel, tmp_path):
    """1. a new venv gets the wheel (no dependencies) 2. its bin folder on PATH, MANPATH
    unset 3. man -w finds gatewayd(8), gatewayd.toml(5) and gatewayctl(1) in it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            "--disable-pip-version-check",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for name, where in INSTALLED.items():
        assert (venv / where).read_bytes() == (MAN / name).read_bytes()
    if shutil.which("man") is None:
        pytest.skip("man is not installed: the pages are in place, man itself not tried")
    env = {k: v for k, v in os.environ.items() if k not in ("MANPATH", "MANOPT")}
    env["PATH"] = f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    for args, where in (
        (["gatewayd"], INSTALLED["gatewayd.8"]),
        (["5", "gatewayd.toml"], INSTALLED["gatewayd.toml.5"]),
        (["gatewayctl"], INSTALLED["gatewayctl.1"]),
    ):
        found = subprocess.run(["man", "-w", *args], env=env, capture_output=True, text=True, timeout=30)
        assert found.returncode == 0, found.stderr
        assert Path(found.stdout.strip()) == venv / where


# ----------------------------------------------------------------------------- issue 19: pages agree
def _paragraph_with(text: str, phrase: str) -> str:
    """The paragraph (between two paragraph macros) of roff ``text`` holding ``phrase``."""
    at = text.index(phrase)
    starts = [text.rfind(m, 0, at) for m in ("\n.TP", "\n.IP", "\n.PP")]
    ends = [e for e in (text.find(m, at) for m in ("\n.TP", "\n.IP", "\n.PP", "\n.SH")) if e >= 0]
    return text[max(starts) : min(ends)]


@pytest.mark.parametrize("name", ["gatewayd.8", "gatewayd.toml.5"])
def test_read_at_start_only_lists_what_a_reload_refuses(name):
    """The keys each page calls "read at start only" are exactly those a reload refuses
    whatever their new value; server.workers, which a reload applies between two counts
    above one (master.resize) and refuses only from one to more or back
    (reload.refused_changes), is said to be applied, on every page."""
    text = page(name)
    text = text[text.index(".SH RELOAD") :]
    listed = set(re.findall(r"\b([a-z]+\.[a-z_]+)\b", _paragraph_with(text, "read at start only")))
    assert listed == {f"{s}.{k}" for s, k in confdiff.RESTART_ONLY}
    workers = " ".join(_paragraph_with(text, "server.workers").split())
    assert "starts or stops workers" in workers or "starts or stops worker processes" in workers
    assert "refused" in workers


def test_server_workers_reload_text_is_the_code():
    (workers,) = [f for f in settings_of(SECTIONS["server"]) if f.name == "workers"]
    text = workers.metadata["reload"]
    assert "starts or stops workers" in text and "refused" in text


def test_routing_describes_the_normal_form_the_code_makes():
    """gatewayd(8) step 2 and gatewayd.toml(5) ROUTING describe the normal form
    (http/paths.py) with examples: each example is what normalize does, and bad_target
    is among gatewayd(8)'s reasons."""
    from gatewayd.http.paths import BadPath, normalize

    eight = page("gatewayd.8")
    routing = page("gatewayd.toml.5")
    routing = routing[routing.index(".SH ROUTING") : routing.index(".SH LIMITS AND WORKERS")]
    assert ".BR bad_target \" (400)\"" in eight
    assert "normal form" in routing and "bad_target" in routing
    same = {"/%61pi/%7Ex": "/api/~x", "/a//b": "/a/b", "//admin/": "/admin/"}
    for sent, normal in same.items():
        assert sent in routing + eight and normal in routing + eight
        assert normalize(sent)[0] == normal
    refused_paths = ("/a/../b", "/a/%2e%2e/b", "/public/..%2fadmin/", "/a%00", "/a%zz")
    for sent in refused_paths:
        assert sent.replace("/a%00", "%00").replace("/a%zz", "%zz") in eight
        with pytest.raises(BadPath):
            normalize(sent)
