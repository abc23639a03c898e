"""The Debian tools the harness drives: found, or installed with apt-get."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

# command -> Debian package
TOOLS = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "taskset": "util-linux"}
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def tool(name: str) -> str:
    """The absolute path of ``name`` (sbin folders included); raise if missing."""
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":" + _SBIN)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (Debian package {TOOLS.get(name, name)})")
    return path


def missing() -> list[str]:
    out = []
    for name in TOOLS:
        try:
            tool(name)
        except FileNotFoundError:
            out.append(name)
    return out


def ensure(install: bool = True) -> None:
    """Install missing tools from Debian (needs root or sudo); raise if any stays missing."""
    need = missing()
    if not need:
        return
    if not install:
        raise SystemExit(f"missing: {', '.join(need)} (run without --no-install, or apt-get install them)")
    packages = sorted({TOOLS[n] for n in need})
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"installing {' '.join(packages)} with apt-get", file=sys.stderr)
    cmd = [*prefix, "apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(cmd, env=env, timeout=600).returncode != 0:
        subprocess.run([*prefix, "apt-get", "update"], env=env, timeout=600, check=False)
        subprocess.run(cmd, env=env, timeout=600, check=False)
    still = missing()
    if still:
        raise SystemExit(f"could not install: {', '.join(still)}")
