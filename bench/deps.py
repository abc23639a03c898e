"""The Debian tools the harness drives: found, or installed with apt-get."""

from __future__ import annotations

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


def ensure(install: bool = True, extra: Iterable[str] = ()) -> None:
    """Install missing tools (TOOLS and ``extra``) from Debian (needs root or sudo); raise if
    any stays missing."""
    names = [*TOOLS, *extra]
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
