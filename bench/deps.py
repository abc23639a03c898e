"""The Debian tools the harness drives: found, or installed with apt-get; and the
Python packages some scenarios serve with (``uvicorn[standard]`` for the apps
scenario): found in the harness's own interpreter, or installed into it with pip.
They are the bench's dependencies only, never gatewayd's or its tests'."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable

# command -> Debian package, for every run
TOOLS = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "taskset": "util-linux"}
# command -> Debian package, only for the scenarios that ask for them (scenarios.NEEDS)
EXTRA = {"hey": "hey", "valgrind": "valgrind", "callgrind_control": "valgrind"}
PACKAGES = {**TOOLS, **EXTRA}
# importable module -> the pip requirement that brings it (into sys.executable's environment),
# only for the scenarios that ask for them. uvicorn[standard] is uvicorn as deployed (uvloop,
# httptools); watchfiles, one of its extras, tells a plain uvicorn from it.
PYTHON = {"uvicorn": "uvicorn[standard]", "starlette": "starlette>=0.37", "watchfiles": "uvicorn[standard]"}
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def tool(name: str) -> str:
    """The absolute path of ``name`` (sbin folders included); raise if missing."""
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":" + _SBIN)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (Debian package {PACKAGES.get(name, name)})")
    return path


def missing(names: Iterable[str] = TOOLS) -> list[str]:
    out = []
    for name in names:
        try:
            tool(name)
        except FileNotFoundError:
            out.append(name)
    return out


def missing_modules(names: Iterable[str]) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def ensure_python(names: Iterable[str], install: bool = True) -> None:
    """pip-install the requirements (PYTHON) of the missing modules ``names`` into the
    harness's own environment; raise if any stays missing."""
    need = missing_modules(names)
    if not need:
        return
    if not install:
        raise SystemExit(f"missing Python modules: {', '.join(need)} (pip install "
                         f"{' '.join(sorted({PYTHON[n] for n in need}))})")
    requirements = sorted({PYTHON[n] for n in need})
    print(f"installing {' '.join(requirements)} with pip", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *requirements], timeout=600, check=False)
    importlib.invalidate_caches()
    still = missing_modules(need)
    if still:
        raise SystemExit(f"could not install: {', '.join(still)}")


def ensure(install: bool = True, extra: Iterable[str] = ()) -> None:
    """Install missing tools (TOOLS and ``extra``) from Debian (needs root or sudo), and the
    Python packages ``extra`` names (PYTHON) with pip; raise if any stays missing."""
    extra = list(extra)
    ensure_python([n for n in extra if n in PYTHON], install)
    names = [*TOOLS, *(n for n in extra if n not in PYTHON)]
    need = missing(names)
    if not need:
        return
    if not install:
        raise SystemExit(f"missing: {', '.join(need)} (run without --no-install, or apt-get install them)")
    packages = sorted({PACKAGES[n] for n in need})
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"installing {' '.join(packages)} with apt-get", file=sys.stderr)
    cmd = [*prefix, "apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, timeout=600).returncode != 0:
        subprocess.run([*prefix, "apt-get", "update"], env=env, timeout=600, check=False)
        subprocess.run(cmd, env=env, timeout=600, check=False)
    still = missing(names)
    if still:
        raise SystemExit(f"could not install: {', '.join(still)}")
