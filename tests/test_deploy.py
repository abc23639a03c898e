"""The deployment files in contrib/ agree with gatewayd: the Kubernetes manifests
(parsed without PyYAML, by a strict reader of the YAML subset they are written
in) and the systemd unit."""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gatewayd.config.loader import parse
from gatewayd.config.settings import ServerConfig
from gatewayd.http.addresses import parse_hostport

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "contrib" / "kubernetes"
UNIT = ROOT / "contrib" / "gatewayd.service"


# ----------------------------------------------------------------------------- YAML subset
class YamlError(ValueError):
    pass


# YAML 1.1 readers take these for booleans; in the manifests they must be quoted
_AMBIGUOUS = {"yes", "no", "on", "off", "y", "n", "Yes", "No", "On", "Off", "True", "False"}
_KEY = re.compile(r'^([A-Za-z0-9_./\-]+|"[^"]*"):(?: (.*))?$')


def _scalar(text: str, where: str) -> Any:
    text = text.strip()
    if text.startswith(("[", "{", '"')):
        try:
            return json.loads(text)  # flow collections and strings are written as JSON
        except json.JSONDecodeError as exc:
            raise YamlError(f"{where}: not JSON-compatible: {text!r} ({exc})") from None
    if " #" in text:
        text = text.split(" #", 1)[0].rstrip()
    if not text or text[0] in "&*!%@`'>|?" or ": " in text or text in _AMBIGUOUS:
        raise YamlError(f"{where}: outside the supported subset (quote it): {text!r}")
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~"):
        return None
    if re.fullmatch(r"-?(0|[1-9][0-9]*)", text):
        return int(text)
    if re.fullmatch(r"-?(0|[1-9][0-9]*)\.[0-9]+", text):
        return float(text)
    if re.fullmatch(r"-?0[0-9]+", text):
        raise YamlError(f"{where}: octal in YAML 1.1, decimal in 1.2: quote it: {text!r}")
    return text


class _Reader:
    """Block mappings and sequences, plain/JSON scalars and ``|`` literal blocks."""

    def __init__(self, lines: list[str], name: str) -> None:
        self.lines = lines
        self.name = name
        self.i = 0

    def _where(self) -> str:
        return f"{self.name}:{self.i + 1}"

    def _peek(self) -> tuple[int, str] | None:
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if "\t" in line[: len(line) - len(line.lstrip())]:
                raise YamlError(f"{self._where()}: tab in indentation")
            text = line.strip()
            if text and not text.startswith("#"):
                return len(line) - len(line.lstrip(" ")), text
            self.i += 1
        return None

    def document(self) -> Any:
        top = self._peek()
        if top is None:
            return None
        value = self._node(top[0])
        if self._peek() is not None:
            raise YamlError(f"{self._where()}: unexpected indentation")
        return value

    def _node(self, indent: int) -> Any:
        _, text = self._peek() or (0, "")
        if text == "-" or text.startswith("- "):
            return self._sequence(indent)
        return self._mapping(indent)

    def _mapping(self, indent: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while (p := self._peek()) is not None and p[0] == indent and not p[1].startswith("- "):
            m = _KEY.match(p[1])
            if m is None:
                raise YamlError(f"{self._where()}: expected 'key: value', got {p[1]!r}")
            key = json.loads(m.group(1)) if m.group(1).startswith('"') else m.group(1)
            if key in out:
                raise YamlError(f"{self._where()}: duplicate key {key!r}")
            self.i += 1
            out[key] = self._value(m.group(2) or "", indent)
        return out

    def _sequence(self, indent: int) -> list[Any]:
        out: list[Any] = []
        while (p := self._peek()) is not None and p[0] == indent and (p[1] == "-" or p[1].startswith("- ")):
            rest = p[1][1:].strip()
            if _KEY.match(rest):
                # "- key: value" opens a mapping whose keys line up with "key"
                self.lines[self.i] = " " * (indent + 2) + rest
                out.append(self._mapping(indent + 2))
            else:
                self.i += 1
                out.append(self._value(rest, indent))
        return out

    def _value(self, rest: str, indent: int) -> Any:
        if rest == "|":
            return self._literal(indent)
        if rest and not rest.startswith("#"):
            return _scalar(rest, self._where())
        p = self._peek()
        if p is None or p[0] <= indent:
            raise YamlError(f'{self._where()}: empty value (write null, "", [] or {{}})')
        return self._node(p[0])

    def _literal(self, indent: int) -> str:
        block: list[str] = []
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.strip() and len(line) - len(line.lstrip(" ")) <= indent:
                break
            block.append(line)
            self.i += 1
        while block and not block[-1].strip():
            block.pop()
        if not block:
            raise YamlError(f"{self._where()}: empty literal block")
        cut = min(len(x) - len(x.lstrip(" ")) for x in block if x.strip())
        return "\n".join(x[cut:] for x in block) + "\n"


def load_all(path: Path) -> list[Any]:
    """The documents of a manifest file written in the subset above."""
    docs: list[list[str]] = [[]]
    for line in path.read_text().splitlines():
        if line.rstrip() == "---":
            docs.append([])
        else:
            docs[-1].append(line)
    parsed = [_Reader(lines, path.name).document() for lines in docs]
    return [d for d in parsed if d is not None]


def test_reader_subset():
    """The reader parses what the manifests use and refuses what it would misread."""
    text = 'a:\n  b: 1\n  c: [1, "x"]\n  d:\n    - e: "1"\n      f: g\n    - -c\n    - |\n      x\n        y\n  h: {}\n'
    doc = _Reader(text.splitlines(), "t").document()
    assert doc == {"a": {"b": 1, "c": [1, "x"], "d": [{"e": "1", "f": "g"}, "-c", "x\n  y\n"], "h": {}}}
    for bad in ("a: yes\n", "a: 0700\n", "a: &x 1\n", "a: b: c\n", "a:\n", "a: 1\na: 2\n"):
        with pytest.raises(YamlError):
            _Reader(bad.splitlines(), "t").document()


# ----------------------------------------------------------------------------- manifests
@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind in contrib/kubernetes/."""
    out: dict[str, dict[str, Any]] = {}
    files = sorted(KUBE.glob("*.yaml"))
    assert files
    for path in files:
        for doc in load_all(path):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            assert doc["kind"] not in out, f"two {doc['kind']} objects"
            out[doc["kind"]] = doc
    assert {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= out.keys()
    return out


def _by_name(items: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [x for x in items if x.get("name") == name]
    assert len(found) == 1, f"expected one {name!r}"
    return found[0]


def _pod(m: dict[str, Any]) -> dict[str, Any]:
    return m["Deployment"]["spec"]["template"]["spec"]


def _config_mount(m: dict[str, Any]) -> tuple[str, str]:
    """(the ConfigMap volume's name, its mount path in the gatewayd container)."""
    pod = _pod(m)
    vol = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == m["ConfigMap"]["metadata"]["name"]]
    assert len(vol) == 1
    mount = _by_name(_by_name(pod["containers"], "gatewayd")["volumeMounts"], vol[0]["name"])
    return vol[0]["name"], mount["mountPath"]


@pytest.fixture(scope="module")
def config(manifests):
    """The ConfigMap's gatewayd configuration, validated by gatewayd's own loader."""
    _, mount = _config_mount(manifests)
    path = f"{mount}/config.toml"
    return parse(manifests["ConfigMap"]["data"]["config.toml"], path)


def test_gatewayd_reads_the_configmap(manifests, config):
    """The container's --config names the ConfigMap's key where the volume is mounted."""
    container = _by_name(_pod(manifests)["containers"], "gatewayd")
    argv = container.get("command", []) + container.get("args", [])
    assert argv[argv.index("--config") + 1] == config.path


def test_ports_and_probes_match_the_config(manifests, config):
    """Container ports are the configured listen ports (on all addresses, where the
    kubelet and the Service reach them); probes hit /healthz and /readyz on the
    metrics listener."""
    container = _by_name(_pod(manifests)["containers"], "gatewayd")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    host, port = parse_hostport(config.server.addresses[0])
    assert host in ("0.0.0.0", "::") and ports["http"] == port
    assert config.metrics.listen is not None
    host, port = parse_hostport(config.metrics.listen)
    assert host in ("0.0.0.0", "::") and ports["metrics"] == port
    # on every address, /metrics must not answer any pod of the cluster (issue 17 §9)
    assert config.metrics.allow, "the metrics listener is on 0.0.0.0 without [metrics] allow"
    assert not any(ipaddress.ip_network(n).prefixlen == 0 for n in config.metrics.allow)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    service = manifests["Service"]["spec"]
    assert _by_name(service["ports"], "http")["targetPort"] == "http"


def test_termination_grace_covers_the_drain(manifests, config):
    """Kubernetes waits longer than the preStop pause plus shutdown_timeout (and the
    default's) before it kills, with a margin."""
    pod = _pod(manifests)
    container = _by_name(pod["containers"], "gatewayd")
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    default = ServerConfig().shutdown_timeout
    drain = max(config.server.shutdown_timeout, default)
    assert pod["terminationGracePeriodSeconds"] >= pause + drain + 5


def test_control_socket_and_reloader(manifests, config):
    """The socket's folder is a 0700 folder made inside the emptyDir (emptyDir itself is
    world-writable, which gatewayd refuses); the reloader reaches it as the same uid
    and reloads through gatewayctl when the mounted file changes."""
    pod = _pod(manifests)
    socket_dir = str(config.socket_path.parent)
    container = _by_name(pod["containers"], "gatewayd")
    run = [
        v["mountPath"]
        for v in container["volumeMounts"]
        if socket_dir.startswith(v["mountPath"] + "/") and "emptyDir" in _by_name(pod["volumes"], v["name"])
    ]
    assert len(run) == 1, "the control socket must live in an emptyDir subfolder"
    init = " ".join(_by_name(pod["initContainers"], "control-dir")["command"])
    assert f"-m 0700 {socket_dir}" in init

    reloader = _by_name(pod["containers"], "config-reloader")
    script = reloader["command"][-1]
    assert 'gatewayctl --config "$conf" reload' in script
    assert f"conf={config.path}" in script
    assert "trap 'exit 0' TERM" in script  # or the pod waits out its whole grace period
    mounts = {v["name"]: v["mountPath"] for v in reloader["volumeMounts"]}
    assert mounts == {v["name"]: v["mountPath"] for v in container["volumeMounts"] if v["name"] in mounts}
    assert _config_mount(manifests)[0] in mounts
    # the control socket answers only its own uid (and root)
    assert pod["securityContext"]["runAsUser"] > 0
    for c in pod["containers"] + pod["initContainers"]:
        assert "runAsUser" not in c.get("securityContext", {})


def test_selectors_match_the_pods(manifests):
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    for selector in (
        manifests["Deployment"]["spec"]["selector"]["matchLabels"],
        manifests["Service"]["spec"]["selector"],
        manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()


def test_route_limits_are_divided_by_replicas(manifests, config):
    """Each route's limit in the ConfigMap is stated as a share: "TOTAL / N replicas",
    with N the Deployment's replicas."""
    replicas = manifests["Deployment"]["spec"]["replicas"]
    text = manifests["ConfigMap"]["data"]["config.toml"]
    shares = re.findall(r"(\d+) / (\d+) replicas\n\s*max_concurrency = (\d+)", text)
    assert len(shares) == len(config.routes)
    for (total, n, share), route in zip(shares, config.routes, strict=True):
        assert int(n) == replicas
        assert int(share) == route.max_concurrency == int(total) // replicas


# ----------------------------------------------------------------------------- systemd
def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit():
    """Type=notify, a reload through the control socket, a stop that outlasts the
    drain, no restart loop on a bad file, enough file descriptors."""
    service = _unit()["Service"]
    defaults = ServerConfig()
    assert service["Type"] == ["notify"]
    assert service.get("NotifyAccess", ["main"]) == ["main"]
    (reload,) = service["ExecReload"]
    assert re.search(r"/gatewayctl --config \S+ reload$", reload) or reload == "/bin/kill -HUP $MAINPID"
    (start,) = service["ExecStart"]
    assert start.endswith("/gatewayd --config /etc/gatewayd/config.toml")
    assert service["KillMode"] == ["mixed"]
    assert int(service["TimeoutStopSec"][0]) >= defaults.shutdown_timeout + 5
    assert "78" in service["RestartPreventExitStatus"][0].split()
    assert int(service["LimitNOFILE"][0]) >= defaults.max_connections + 64
    assert "gatewayd" in service["RuntimeDirectory"][0].split()


def test_man_page_unit_is_an_excerpt():
    """The unit shown in gatewayd(8) EXAMPLES says nothing contrib/gatewayd.service does not."""
    page = (ROOT / "man" / "gatewayd.8").read_text()
    block = page[page.index("[Unit]") : page.index(".EE", page.index("[Unit]"))]
    lines = {ln.strip() for ln in UNIT.read_text().splitlines()}
    for line in block.splitlines():
        text = line.replace("\\-", "-").strip()
        if text:
            assert text in lines, f"gatewayd(8) shows {text!r}, which contrib/gatewayd.service lacks"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    """systemd itself reads the unit without a complaint (binaries replaced by /bin/true)."""
    text = re.sub(r"/opt/gatewayd/bin/gatewayd|/opt/gatewayd/bin/gatewayctl", "/bin/true", UNIT.read_text())
    unit = tmp_path / "gatewayd.service"
    unit.write_text(text)
    run = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr


def test_deployment_doc_lists_the_files():
    """docs/DEPLOYMENT.md names every manifest, and every contrib/ file it names exists."""
    doc = (ROOT / "docs" / "DEPLOYMENT.md").read_text()
    for path in KUBE.glob("*.yaml"):
        assert f"`{path.name}`" in doc
    for named in re.findall(r"contrib/[\w./-]+\w", doc):
        assert (ROOT / named).exists(), named
