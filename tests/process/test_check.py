"""``gatewayd --check`` (issue 19): what start-up would fail on in this host, beyond
the file, found before the start or the reload: a server name with no address, a
listen address that is not this host's. As every configuration error: exit 78,
``file:line: key: ...``, every error at once, nothing on stdout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..builders import app_route, gateway_config, handler_route, lines
from ..conftest import ROOT

EX_CONFIG = 78


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gatewayd", "--check", "--config", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def line_of(path: Path, start: str) -> int:
    return next(i for i, x in enumerate(path.read_text().splitlines(), 1) if x.startswith(start))


def test_check_fails_on_what_start_up_would(tmp_path, upstream):
    """Two names that cannot resolve (RFC 6761: .invalid never does), a TEST-NET
    listen address and a metrics one (RFC 5737: on no host): each said, in file
    order, with its line and key; a name that resolves and an address of this host
    are not."""
    body = (app_route(upstream.url)
            + '[upstreams.far]\nservers = ["http://nonexistent.invalid:8080", "http://localhost:1",'
              ' "http://other.invalid"]\n'
            + "[metrics]\n" + lines({"listen": "192.0.2.1:9100"}) + "\n")
    path = gateway_config(tmp_path, body)
    text = path.read_text()
    path.write_text(text.replace('listen = ["127.0.0.1:', 'listen = ["192.0.2.1:8080", "127.0.0.1:'))
    run = check(path)
    listen, metrics, far = (line_of(path, "listen"), line_of(path, 'listen = "192.0.2.1'),
                            line_of(path, "servers = [\"http://nonexistent"))
    assert (run.returncode, run.stdout) == (EX_CONFIG, ""), run
    said = run.stderr.splitlines()
    assert said[0] == (f"{path}:{listen}: server.listen[0]: expected an address of this host: "
                       "cannot bind 192.0.2.1:8080 (Cannot assign requested address)")
    assert said[1].startswith(f'{path}:{far}: upstreams.far.servers[0]: cannot resolve "nonexistent.invalid" (')
    assert said[2].startswith(f'{path}:{far}: upstreams.far.servers[2]: cannot resolve "other.invalid" (')
    assert said[3] == (f"{path}:{metrics}: metrics.listen: expected an address of this host: "
                       "cannot bind 192.0.2.1:9100 (Cannot assign requested address)")
    assert len(said) == 4


def test_check_beside_the_running_gatewayd_is_ok(gateway_process):
    """--check is run beside the live daemon before a reload: its own listen address,
    in use, is not an error."""
    gp = gateway_process(handler_route())
    run = check(gp.config_path)
    assert (run.returncode, run.stdout, run.stderr) == (0, f"{gp.config_path}: ok\n", "")
