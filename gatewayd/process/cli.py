"""``gatewayd``: the command line (SPEC §1). Exit 0, 78 (bad configuration) or 1."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from .. import __version__
from ..config.loader import DEFAULT_CONFIG, ConfigError, dump, load, read_text
from ..config.positions import Locator, Path, format_path
from ..config.settings import Config, worker_count
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
                      help="validate the configuration and what start-up needs of this host "
                           "(server names resolve, listen addresses are this host's); "
                           "print 'PATH: ok' or every error, and exit")
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
    unusable = file_errors(config)
    if unusable:  # files the configuration names are part of it: the same status
        for line in unusable:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        errors = host_errors(config)
        for line in errors:
            print(line, file=sys.stderr)
        if errors:
            return EXIT_CONFIG
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


def file_errors(config: Config) -> list[str]:
    """The files the configuration names that cannot be used (upstreams' TLS
    certificates and keys), as ``file:line: key: ...`` lines in file order."""
    from ..upstreams.tls import tls_problems

    return [exc.located(config.path) for exc in tls_problems(config.upstreams)]


def host_errors(config: Config) -> list[str]:
    """What start-up would fail on in this host, beyond the file itself: a listen
    address that cannot be bound here (in use is fine: the running gatewayd's), an
    upstream server name with no address. ``file:line: key: ...`` lines, in file order."""
    from ..http.listener import cannot_bind
    from ..upstreams.names import unresolvable_in

    try:
        text = read_text(config.path)
    except ConfigError:
        text = ""  # gone since it was loaded: line 1 for each
    locate = Locator(text).line
    found: list[tuple[int, str]] = []
    listeners: list[tuple[Path, str]] = [(("server", "listen", i), a) for i, a in enumerate(config.server.addresses)]
    if config.metrics.listen:
        listeners.append((("metrics", "listen"), config.metrics.listen))
    for key, address in listeners:
        why = cannot_bind(address)
        if why is not None:
            line = locate(key)
            found.append((line, f"{config.path}:{line}: {format_path(key)}: "
                                f"expected an address of this host: {why}"))
    for exc in asyncio.run(unresolvable_in(config)):
        line = locate(exc.key)
        found.append((line, f"{config.path}:{line}: {exc}"))
    return [text for _, text in sorted(found, key=lambda f: f[0])]
