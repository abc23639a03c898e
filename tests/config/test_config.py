"""The configuration contract (SPEC §1-2).

- Every ``tests/configs/invalid/NAME.toml`` gives exactly the lines of ``NAME.err``,
  through the loader and through the real command line (exit 78); every
  ``tests/configs/valid/*.toml`` passes (``NAME.toml: ok``, exit 0).
- Errors come in the file's line order, one line each:
  ``file:line: key.path: expected ..., got ...``.
- ``--print-config`` writes every declared key and reads back as the same
  configuration; ``--version`` and a missing file behave as SPEC §1 says.
- Arbitrary documents give a ``Config`` or a ``ConfigError``, never a crash.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewayd import __version__
from gatewayd.config import kinds as k
from gatewayd.config.certificates import CertificateEntry, CertificateList
from gatewayd.config.loader import TLS_KEYS, ConfigError, applies, dump, load, parse
from gatewayd.config.positions import Locator, format_path
from gatewayd.config.ratelimit import RateLimit, RateLimitTable
from gatewayd.config.settings import SECTIONS, Config, RouteConfig, UpstreamConfig, settings_of

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "tests" / "configs"
INVALID = sorted((CONFIGS / "invalid").glob("*.toml"))
VALID = sorted((CONFIGS / "valid").glob("*.toml"))
EXAMPLE = ROOT / "config.toml"
EX_CONFIG = 78

_KEY = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*")'
KEY_PATH = rf"{_KEY}(?:\[\d+\]|\.{_KEY})*"
ERROR_LINE = re.compile(rf"^[^:\n]+:(\d+): (?:toml|{KEY_PATH}): [^\n]+$")

SECTION_CLASSES: dict[str, type] = {**SECTIONS, "upstreams": UpstreamConfig, "routes": RouteConfig}


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def expected_errors(toml: Path) -> list[str]:
    return toml.with_suffix(".err").read_text(encoding="utf-8").splitlines()


# -- the command line ---------------------------------------------------------------------


def gatewayd(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``python -m gatewayd ARGS``, a real process."""
    return subprocess.run(
        [sys.executable, "-m", "gatewayd", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


# Runs ``python -m gatewayd`` (its ``__main__``, argv and exit status, as the
# interpreter does) once per argv in a single process: one start-up for the whole
# corpus instead of one each.
_BATCH = r"""
import contextlib, io, json, os, runpy, sys
results = []
for cwd, argv in json.load(sys.stdin):
    os.chdir(cwd)
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["gatewayd", *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("gatewayd", run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, sys.__stdout__)
"""


@dataclasses.dataclass
class Run:
    code: int
    stdout: str
    stderr: str


def gatewayd_batch(runs: list[tuple[Path, list[str]]]) -> list[Run]:
    """Each ``(cwd, argv)`` through the command line, in one Python process."""
    payload = json.dumps([(str(cwd), argv) for cwd, argv in runs])
    proc = subprocess.run(
        [sys.executable, "-c", _BATCH], input=payload, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return [Run(**r) for r in json.loads(proc.stdout)]


MISSING = CONFIGS / "no-such-file.toml"


@pytest.fixture(scope="module")
def checked() -> dict[Path, Run]:
    """``gatewayd --check --config NAME.toml`` for every file of the corpus, run from its folder,
    and ``--print-config`` of a file that does not exist."""
    files = INVALID + VALID
    runs = [(f.parent, ["--check", "--config", f.name]) for f in files]
    results = gatewayd_batch([*runs, (CONFIGS, ["--print-config", "--config", MISSING.name])])
    return dict(zip([*files, MISSING], results, strict=True))


@pytest.fixture(scope="module")
def printed(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, tuple[Run, Run]]:
    """For every valid file and the example: ``--print-config``, then ``--check`` of what it printed."""
    files = [*VALID, EXAMPLE]
    prints = gatewayd_batch([(f.parent, ["--print-config", "--config", f.name]) for f in files])
    out = tmp_path_factory.mktemp("printed")
    shutil.copytree(CONFIGS / "valid" / "certs", out / "certs")  # the files all_keys.toml names
    copies = []
    for f, run in zip(files, prints, strict=True):
        copy = out / f.name
        copy.write_text(run.stdout, encoding="utf-8")
        copies.append(copy)
    checks = gatewayd_batch([(out, ["--check", "--config", c.name]) for c in copies])
    return {f: (p, c) for f, p, c in zip(files, prints, checks, strict=True)}


# -- the corpus ------------------------------------------------------------------------------


def test_corpus_is_complete() -> None:
    """Each invalid file has its .err and each .err its file; the folders are not empty."""
    assert len(INVALID) >= 50 and len(VALID) >= 4
    tomls = {p.stem for p in (CONFIGS / "invalid").glob("*.toml")}
    errs = {p.stem for p in (CONFIGS / "invalid").glob("*.err")}
    assert tomls == errs
    assert not list((CONFIGS / "valid").glob("*.err"))


@pytest.mark.parametrize("path", INVALID, ids=_ids(INVALID))
def test_invalid_through_loader(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse(path.read_text(encoding="utf-8"), path.name)
    assert info.value.errors == expected_errors(path)


@pytest.mark.parametrize("path", INVALID, ids=_ids(INVALID))
def test_invalid_through_cli(path: Path, checked: dict[Path, Run]) -> None:
    run = checked[path]
    assert (run.code, run.stdout) == (EX_CONFIG, "")
    assert run.stderr == path.with_suffix(".err").read_text(encoding="utf-8")


@pytest.mark.parametrize("path", INVALID, ids=_ids(INVALID))
def test_errors_are_one_line_each_in_line_order(path: Path) -> None:
    """The chosen order is the file's line order, whatever section an error is in."""
    lines = expected_errors(path)
    assert lines
    numbers = []
    for line in lines:
        m = ERROR_LINE.match(line)
        assert m, line
        assert line.startswith(f"{path.name}:")
        numbers.append(int(m.group(1)))
    assert numbers == sorted(numbers)
    assert max(numbers) <= len(path.read_text(encoding="utf-8").splitlines()) or numbers == [1]


@pytest.mark.parametrize("path", VALID, ids=_ids(VALID))
def test_valid_through_loader(path: Path) -> None:
    # the whole path: files the configuration names are found beside it
    config = parse(path.read_text(encoding="utf-8"), str(path))
    assert parse(dump(config), str(path)) == config


@pytest.mark.parametrize("path", VALID, ids=_ids(VALID))
def test_valid_through_cli(path: Path, checked: dict[Path, Run]) -> None:
    run = checked[path]
    assert (run.code, run.stdout, run.stderr) == (0, f"{path.name}: ok\n", "")


def test_all_keys_file_sets_every_declared_key() -> None:
    """valid/all_keys.toml is the file with every key: a key declared later must be added there."""
    data = tomllib.loads((CONFIGS / "valid" / "all_keys.toml").read_text(encoding="utf-8"))
    for name, cls in SECTIONS.items():
        assert {f.name for f in settings_of(cls)} == set(data[name]), name
    upstream_keys = set().union(*(set(u) for u in data["upstreams"].values()))
    assert {f.name for f in settings_of(UpstreamConfig)} == upstream_keys
    route_keys = set().union(*(set(r) for r in data["routes"]))
    assert {f.name for f in settings_of(RouteConfig)} == route_keys


def test_all_keys_file_values() -> None:
    """The spellings SPEC §2 allows are read as meant."""
    c = load(str(CONFIGS / "valid" / "all_keys.toml"))
    assert c.server.listen == (k.ListenEntry("127.0.0.1:8080"), k.ListenEntry("[::1]:8080"))
    assert c.server.addresses == ("127.0.0.1:8080", "[::1]:8080")
    assert (c.tls.min_version, c.tls.session_tickets) == ("1.3", False)
    assert c.tls.certificates == (CertificateEntry("certs/gw.pem", "certs/gw.key",
                                                   ("gateway.internal", "*.gateway.internal")),)
    assert c.server.workers == "auto"
    assert c.server.max_body_size == 512 * 1024
    assert c.server.keepalive_timeout == 60.0 and isinstance(c.server.keepalive_timeout, float)
    assert c.control.mode == 0o600
    assert c.metrics.listen == "[::1]:9100"
    servers = c.upstream("app").servers
    assert servers is not None
    assert [(s.host, s.port, s.weight) for s in servers] == [
        ("127.0.0.1", 9000, 1),
        ("::1", 9001, 3),
        ("localhost", 80, 1),
    ]
    assert c.route("demo").host == "example.com"
    assert c.upstream("thumbnails").executor == "process"
    assert c.route("app").rate_limit == RateLimit(10.0, 20, "header:X-Api-Key")
    assert c.route("demo").rate_limit is None


def test_other_spellings() -> None:
    c = load(str(CONFIGS / "valid" / "other_forms.toml"))
    assert c.server.addresses == ("0.0.0.0:8080",)
    assert c.server.max_body_size == 1048576
    assert c.control.mode == 0o660
    assert c.upstream("a").servers == (k.Server("http://localhost:8000", "localhost", 8000),)


def test_defaults_are_the_declared_ones() -> None:
    c = load(str(CONFIGS / "valid" / "minimal.toml"))
    for name, cls in SECTIONS.items():
        assert getattr(c, name) == cls()
    route = c.routes[0]
    for f in settings_of(RouteConfig):
        if f.default is not dataclasses.MISSING:
            assert getattr(route, f.name) == f.default


def test_spec_example_error_text() -> None:
    """SPEC §1's example line, word for word (but for the file name and line)."""
    assert "negative_max_queue.toml:17: routes[2].max_queue: expected an integer >= 0, got -5" in (
        expected_errors(CONFIGS / "invalid" / "negative_max_queue.toml")
    )


# -- the declarations --------------------------------------------------------------------


def _declared() -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    for section, cls in SECTION_CLASSES.items():
        for f in settings_of(cls):
            yield section, f


@pytest.mark.parametrize(("section", "field"), list(_declared()), ids=[f"{s}.{f.name}" for s, f in _declared()])
def test_declaration(section: str, field: dataclasses.Field[Any]) -> None:
    """Each setting has a kind and a doc line, and its default reads back as itself."""
    kind = field.metadata["kind"]
    assert isinstance(kind, k.Kind)
    assert field.metadata["doc"] and "\n" not in field.metadata["doc"]
    if field.default is dataclasses.MISSING:
        assert section == "routes" and field.name in ("name", "upstream")
    elif field.default is not None:
        assert kind.parse(kind.dump(field.default)) == field.default


# -- --print-config, --version, a missing file ---------------------------------------------


def _assert_every_key_printed(printed: dict[str, Any], config: Config) -> None:
    """Every declared key of every section is in the printed file; only unset optional keys
    (TOML has no null) may be left out."""
    for name, cls in SECTIONS.items():
        for f in settings_of(cls):
            assert f.name in printed[name] or getattr(getattr(config, name), f.name) is None, (name, f.name)
    assert set(printed["upstreams"]) == {u.name for u in config.upstreams}
    for u in config.upstreams:
        for f in settings_of(UpstreamConfig):
            table, value = printed["upstreams"][u.name], getattr(u, f.name)
            if applies(u, f.name):
                assert f.name in table or value is None, (u.name, f.name)
            else:  # an HTTP key in a handler's table, say: only what the file changed
                assert (f.name in table) == (value != f.default), (u.name, f.name)
    assert len(printed["routes"]) == len(config.routes)
    for table, r in zip(printed["routes"], config.routes, strict=True):
        for f in settings_of(RouteConfig):
            assert f.name in table or getattr(r, f.name) is None, (r.name, f.name)


@pytest.mark.parametrize("path", [*VALID, EXAMPLE], ids=[*_ids(VALID), "example"])
def test_print_config(path: Path, printed: dict[Path, tuple[Run, Run]]) -> None:
    """The printed file has every key, passes --check itself and reads back the same."""
    shown, check = printed[path]
    assert (shown.code, shown.stderr) == (0, "")
    config = load(str(path))
    _assert_every_key_printed(tomllib.loads(shown.stdout), config)
    assert (check.code, check.stdout, check.stderr) == (0, f"{path.name}: ok\n", "")
    assert parse(shown.stdout, str(path)) == config


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The runs made as separate processes, exactly as an operator types them."""
    missing = tmp_path_factory.mktemp("missing") / "nope.toml"
    runs = {
        "version": ("--version",),
        "missing": ("--check", "--config", str(missing)),
        "example": ("--check", "--config", "config.toml"),
    }
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {name: pool.submit(gatewayd, *args) for name, args in runs.items()}
        results: dict[str, Any] = {name: f.result() for name, f in futures.items()}
    results["missing_path"] = missing
    return results


def test_version(real_runs: dict[str, Any]) -> None:
    run = real_runs["version"]
    assert (run.returncode, run.stdout, run.stderr) == (0, f"gatewayd {__version__}\n", "")


def test_missing_file_is_one_line_and_78(real_runs: dict[str, Any]) -> None:
    run = real_runs["missing"]
    assert (run.returncode, run.stdout) == (EX_CONFIG, "")
    assert run.stderr == f"{real_runs['missing_path']}: cannot read: No such file or directory\n"


def test_missing_file_with_print_config(checked: dict[Path, Run]) -> None:
    run = checked[MISSING]
    assert (run.code, run.stdout) == (EX_CONFIG, "")
    assert run.stderr == f"{MISSING.name}: cannot read: No such file or directory\n"


def test_example_config_passes_check(real_runs: dict[str, Any]) -> None:
    run = real_runs["example"]
    assert (run.returncode, run.stdout, run.stderr) == (0, "config.toml: ok\n", "")


# -- reading files -----------------------------------------------------------------------


def test_crlf_line_endings(tmp_path: Path) -> None:
    text = (CONFIGS / "invalid" / "several_errors_line_order.toml").read_text(encoding="utf-8")
    path = tmp_path / "several_errors_line_order.toml"
    path.write_bytes(text.replace("\n", "\r\n").encode())
    with pytest.raises(ConfigError) as info:
        load(str(path))
    want = [f"{tmp_path}/{line}" for line in expected_errors(CONFIGS / "invalid" / path.name)]
    assert info.value.errors == want


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[log]\nlevel = "info"\naccess_log = "caf\xe9.log"\n')
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.errors == [f"{path}:3: toml: not UTF-8 (invalid continuation byte at byte 38)"]


def test_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path))
    assert info.value.errors == [f"{tmp_path}: cannot read: Is a directory"]


# -- key paths and lines -----------------------------------------------------------------


def test_format_path() -> None:
    assert format_path(("routes", 2, "max_queue")) == "routes[2].max_queue"
    assert format_path(("upstreams", "app", "servers", 1, "weight")) == "upstreams.app.servers[1].weight"
    assert format_path(("upstreams", "a.b", "x y")) == 'upstreams."a.b"."x y"'
    assert format_path(("odd", 'q"\n')) == 'odd."q\\"\\n"'


def test_locator_lines() -> None:
    text = (
        'a = """\n[b]\nc = 1\n"""\n'  # 1-4: a multi-line string that looks like a table
        "[[r]]\n"  # 5
        "x = [\n  1,\n  [2, 3],\n]\n"  # 6-9
        "[r.sub]\n"  # 10: a table of the last r element
        "y = 1\n"  # 11
        "[[r]]\n"  # 12
        "'quoted key' = { p = { q = 1 } }\n"  # 13
        '[t."dot.ted"]\n'  # 14
    )
    tomllib.loads(text)
    loc = Locator(text)
    assert loc.line(("a",)) == 1
    assert loc.line(("b",)) == 1  # never seen: the document's first line
    assert loc.line(("r", 0)) == 5
    assert loc.line(("r", 0, "x", 1, 0)) == 8
    assert loc.line(("r", 0, "sub", "y")) == 11
    assert loc.line(("r", 1)) == 12
    assert loc.line(("r", 1, "quoted key", "p", "q")) == 13
    assert loc.line(("t", "dot.ted", "missing")) == 14


def test_locator_survives_text_it_cannot_follow() -> None:
    loc = Locator("[a]\nb = 1\nc = [\n")
    assert loc.line(("a", "b")) == 2
    assert loc.line(("a", "c")) == 3


# -- arbitrary documents -----------------------------------------------------------------


def _assert_config_or_errors(text: str) -> None:
    """A Config that --print-config writes back as itself, or well-formed error lines."""
    try:
        config = parse(text, "fuzz.toml")
    except ConfigError as exc:
        assert exc.errors
        numbers = []
        for line in exc.errors:
            m = ERROR_LINE.match(line)
            assert m, line
            assert line.startswith("fuzz.toml:")
            numbers.append(int(m.group(1)))
        assert numbers == sorted(numbers)
        assert max(numbers) <= max(1, text.count("\n") + 1)
    else:
        assert parse(dump(config), "fuzz.toml") == config


_NAMES = sorted({f.name for _, f in _declared()} | set(SECTION_CLASSES) | {"url", "weight"})
_SAMPLES = [
    "auto",
    "10MiB",
    "1 kB",
    "0600",
    "0o600",
    "127.0.0.1:8080",
    "[::1]:8080",
    "localhost",
    "http://127.0.0.1:9000",
    "http://[::1",
    "https://x",
    "gatewayd.handlers:simulated_io",
    "gatewayd.handlers:cpu_hash",
    "/",
    "/api",
    "app",
    "process",
    "inline",
    "json",
    "info",
    "-",
    "",
]
_keys = st.sampled_from(_NAMES) | st.text(max_size=6)
_scalars = (
    st.integers()
    | st.integers(-3, 70000)
    | st.floats()
    | st.booleans()
    | st.sampled_from(_SAMPLES)
    | st.text(max_size=10)
    | st.datetimes()
)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3), max_leaves=4
)
_tables = st.dictionaries(_keys, _values, max_size=4)
_documents = st.dictionaries(
    st.sampled_from(list(SECTION_CLASSES)) | _keys,
    _tables | _values | st.lists(_tables, max_size=2) | st.dictionaries(st.sampled_from(["app", "x"]), _tables),
    max_size=4,
)
_FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@_FUZZ
@given(_documents)
def test_arbitrary_documents(doc: dict[str, Any]) -> None:
    _assert_config_or_errors(tomli_w.dumps(doc))


_VALID_TEXT = (CONFIGS / "valid" / "all_keys.toml").read_text(encoding="utf-8")


@_FUZZ
@given(st.integers(0, len(_VALID_TEXT)), st.integers(0, 40), st.text(max_size=20))
def test_edited_valid_file(at: int, cut: int, insert: str) -> None:
    """A valid file with a slice cut out and arbitrary text put in: syntax errors, stray keys."""
    _assert_config_or_errors(_VALID_TEXT[:at] + insert + _VALID_TEXT[at + cut :])


@_FUZZ
@given(st.text(max_size=200))
def test_arbitrary_text(text: str) -> None:
    _assert_config_or_errors(text)


# -- every value the declarations allow --------------------------------------------------

_LISTEN = st.builds(
    "{}:{}".format, st.sampled_from(["127.0.0.1", "0.0.0.0", "localhost", "[::1]", "[::]"]), st.integers(0, 65535)
)
_URL = st.builds(
    "{}://{}{}{}".format,
    st.sampled_from(["http", "https", "HTTPS"]),
    st.sampled_from(["127.0.0.1", "[::1]", "backend.internal", "Example.COM"]),
    st.sampled_from(["", ":1", ":8080", ":65535"]),
    st.sampled_from(["", "/"]),
)


def _valid_values(kind: k.Kind) -> st.SearchStrategy[Any]:
    """Raw TOML values that ``kind`` must accept (a new kind needs a line here)."""
    match kind:
        case k.Int(lo=lo, hi=hi):
            return st.integers(-(2**40) if lo is None else lo, 2**40 if hi is None else hi)
        case k.Duration(lo=lo, hi=hi, lo_open=lo_open):
            top = 1e6 if hi is None else hi
            return st.floats(lo, top, exclude_min=lo_open) | st.integers(int(lo) + 1, int(top))
        case k.Size(lo=lo):
            units = st.sampled_from(["", "B", "KiB", "MiB", "GiB", "TiB", "kB", "MB", "kib"])
            return st.integers(lo, 2**50) | st.builds("{}{}".format, st.integers(max(lo, 0), 4096), units)
        case k.Bool():
            return st.booleans()
        case k.Choice(choices=choices):
            return st.sampled_from(choices)
        case k.ChoiceList(choices=choices):
            return st.lists(st.sampled_from(choices), unique=True)
        case k.Name():
            return st.from_regex(r"[A-Za-z0-9_.\-]{1,12}", fullmatch=True)
        case k.Text(empty=empty):
            return st.text(min_size=0 if empty else 1, max_size=20).filter(lambda s: "\0" not in s)
        case k.PathPrefix():
            # in normal form (gatewayd.http.paths): dots and escapes only where they are no
            # dot-segment and no escaped unreserved character, and no run of slashes
            # before the query (a run is merged into one)
            plain = st.from_regex(r"/[A-Za-z0-9/_~?=&-]{0,12}", fullmatch=True)
            return plain.filter(lambda p: "//" not in p.partition("?")[0]) | st.sampled_from(
                ["/a.b/", "/.well-known/", "/x..y", "/files%2F", "/%C3%A9t%C3%A9", "/a?%2e"])
        case k.HeaderName():
            return st.from_regex(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,16}", fullmatch=True)
        case k.HostName():
            return st.from_regex(r"[A-Za-z0-9_-]{1,8}(\.[A-Za-z0-9_-]{1,8}){0,2}", fullmatch=True) | st.just("[::1]")
        case k.Listen():
            return _LISTEN
        case k.ListenList():
            # tls = true needs certificates on disk (tests/http/test_tls*.py)
            table = st.fixed_dictionaries({"address": _LISTEN}, optional={
                "tls": st.just(False), "proxy_protocol": st.booleans()})
            entries = st.lists(_LISTEN | table, min_size=1, max_size=3,
                               unique_by=lambda e: e if isinstance(e, str) else e["address"])
            return _LISTEN | table | entries
        case CertificateList():
            return st.just([])  # files on disk: tests/http/test_tls*.py
        case k.Networks():
            nets = st.sampled_from(["10.0.0.0/8", "127.0.0.1", "fd00::/8", "192.168.1.0/24", "::1"])
            return st.lists(nets, max_size=3)
        case k.FileMode():
            modes = st.integers(0, 0o777)
            return modes | modes.map("{:04o}".format) | modes.map("0o{:o}".format)
        case k.Workers():
            return st.integers(1, 64) | st.just("auto")
        case k.Servers():
            table = st.fixed_dictionaries({"url": _URL}, optional={"weight": st.integers(1, 1000)})
            return _URL | st.lists(_URL | table, min_size=1, max_size=3)
        case k.HealthCheckTable():
            seconds = _valid_values(k.Duration())
            return st.fixed_dictionaries({}, optional={
                "path": _valid_values(k.PathPrefix()), "interval": seconds, "timeout": seconds,
                "healthy": st.integers(1, 1000), "unhealthy": st.integers(1, 1000)})
        case RateLimitTable():
            rates = st.floats(0.001, 1_000_000) | st.integers(1, 1_000_000)
            keys = st.just("client") | st.from_regex(r"header:[A-Za-z0-9-]{1,12}", fullmatch=True)
            return st.fixed_dictionaries({"rate": rates}, optional={
                "burst": st.integers(1, 1_000_000), "key": keys})
    raise AssertionError(f"no strategy for {kind!r}")


def _optional_keys(cls: type, leave_out: tuple[str, ...] = ()) -> st.SearchStrategy[dict[str, Any]]:
    keys = {f.name: _valid_values(f.metadata["kind"]) for f in settings_of(cls) if f.name not in leave_out}
    return st.fixed_dictionaries({}, optional=keys)


_NOT_TLS = tuple(f.name for f in settings_of(UpstreamConfig) if f.name not in TLS_KEYS)
_HANDLERS = st.sampled_from(
    [
        {"handler": "gatewayd.handlers:simulated_io"},
        {"handler": "gatewayd.handlers:simulated_io", "executor": "inline"},
        {"handler": "gatewayd.handlers:cpu_hash", "executor": "process"},
        {"handler": "gatewayd.handlers:hello_asgi", "interface": "asgi", "lifespan": "off"},
        {"handler": "gatewayd.handlers:hello_asgi", "interface": "asgi"},
        {"handler": "gatewayd.handlers:hello_wsgi", "interface": "wsgi", "threads": 3},
    ]
)


@st.composite
def _valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {name: draw(_optional_keys(cls)) for name, cls in SECTIONS.items()}
    listen = doc["server"].get("listen", ["127.0.0.1:8080"])
    entries = listen if isinstance(listen, list) else [listen]
    addresses = [e if isinstance(e, str) else e["address"] for e in entries]
    if doc["metrics"].get("listen") in addresses:
        del doc["metrics"]["listen"]
    upstreams = {}
    for name in draw(st.lists(_valid_values(k.Name()), min_size=1, max_size=3, unique=True)):
        table = draw(_optional_keys(UpstreamConfig, ("servers", "handler", "executor", "interface",
                                                     "lifespan", "threads", *TLS_KEYS)))
        if draw(st.booleans()):
            table["servers"] = servers = draw(_valid_values(k.Servers()))
            urls = [servers] if isinstance(servers, str) else [s if isinstance(s, str) else s["url"] for s in servers]
            if any(u.lower().startswith("https:") for u in urls):  # the TLS keys apply to https:// servers
                table.update(draw(_optional_keys(UpstreamConfig, (*_NOT_TLS, "tls_client_key"))))
                if "tls_client_cert" in table:  # a client certificate comes with its key
                    table["tls_client_key"] = draw(_valid_values(k.Text()))
        else:
            table.update(draw(_HANDLERS))
        upstreams[name] = table
    doc["upstreams"] = upstreams
    routes = []
    for i in range(draw(st.integers(1, 3))):
        route = draw(_optional_keys(RouteConfig, ("name", "upstream", "path_prefix")))
        route.update(name=f"r{i}", path_prefix=f"/r{i}", upstream=draw(st.sampled_from(sorted(upstreams))))
        chosen = upstreams[route["upstream"]]
        if chosen.get("executor") == "process" or chosen.get("interface") == "wsgi":
            route.pop("websocket", None)  # (refused: these cannot carry a WebSocket)
        routes.append(route)
    doc["routes"] = routes
    return doc


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_documents())
def test_every_allowed_value_is_accepted_and_printed_back(doc: dict[str, Any]) -> None:
    """Whatever the declarations allow, the loader accepts, and --print-config writes it so
    that it reads back the same."""
    config = parse(tomli_w.dumps(doc), "gen.toml")
    printed = dump(config)
    _assert_every_key_printed(tomllib.loads(printed), config)
    assert parse(printed, "gen.toml") == config


def test_every_upstream_key_has_a_kind() -> None:
    """The keys ``applies`` sorts by upstream kind are declared keys (a renamed key
    would otherwise be printed everywhere again)."""
    from gatewayd.config.loader import HANDLER_ONLY, HTTP_ONLY, PROCESS_ONLY

    declared = {f.name for f in settings_of(UpstreamConfig)}
    assert declared >= HTTP_ONLY | HANDLER_ONLY | PROCESS_ONLY


def test_print_config_leaves_out_what_does_not_apply() -> None:
    """1. the example config (two handler upstreams, one in a process pool) and an HTTP
    upstream 2. dump 3. the handlers' tables have no HTTP key, the inline one no
    processes, the HTTP one no handler key; it reads back the same."""
    text = EXAMPLE.read_text() + (
        '\n[upstreams.web]\nservers = ["http://127.0.0.1:9"]\n'
        '\n[upstreams.api]\nhandler = "gatewayd.handlers:hello_asgi"\ninterface = "asgi"\n'
        '\n[upstreams.old]\nhandler = "gatewayd.handlers:hello_wsgi"\ninterface = "wsgi"\n')
    config = parse(text, str(EXAMPLE))
    printed = tomllib.loads(dump(config))["upstreams"]
    assert set(printed["demo"]) == {"handler", "executor", "interface"}
    assert set(printed["cpu"]) == {"handler", "executor", "interface", "processes"}
    assert set(printed["api"]) == {"handler", "executor", "interface", "lifespan"}
    assert set(printed["old"]) == {"handler", "executor", "interface", "threads"}
    assert {"handler", "executor", "processes", "interface", "lifespan", "threads"}.isdisjoint(printed["web"])
    assert {"servers", "connect_timeout", "balance", "retries"} <= set(printed["web"])
    assert parse(dump(config), str(EXAMPLE)) == config
