"""``gatewayd``: the command line (SPEC §1). Exit 0, 78 (bad configuration) or 1."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..config.loader import DEFAULT_CONFIG, ConfigError, dump, load
from ..config.settings import worker_count
from ..exits import EXIT_CONFIG, EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gatewayd",
        description="Reverse-proxy gateway with per-route admission control.",
    )
    p.add_argument("--config", "-c", metavar="PATH",
                   default=os.environ.get("GATEWAYD_CONFIG", DEFAULT_CONFIG),
                   help=f"configuration file (default: $GATEWAYD_CONFIG or {DEFAULT_CONFIG})")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="validate the configuration, print 'PATH: ok' or every error, and exit")
    mode.add_argument("--print-config", action="store_true",
                      help="print the effective configuration as TOML, defaults filled in, and exit")
    mode.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"{args.config}: ok")
        return EXIT_OK
    if args.print_config:
        sys.stdout.write(dump(config))
        return EXIT_OK
    if worker_count(config) > 1:
        from .master import run
    else:
        from .single import run
    return run(config)
