"""The scenarios, in the order a full run takes them. Each takes a Context and
returns its result tables."""

from __future__ import annotations

from collections.abc import Callable

from ..context import Context
from ..report import Table
from . import (
               admission,
               cancel,
               deadlines,
               eject,
               fairness,
               idle,
               instructions,
               overload,
               paths,
               pipeflood,
               profile,
               reload,
               throughput,
               tls,
               tunnels,
               uploads,
)

Scenario = Callable[[Context], list[Table]]

SCENARIOS: dict[str, Scenario] = {
    "throughput": throughput.run,
    "admission": admission.run,
    "overload": overload.run,
    "cancel": cancel.run,
    "reload": reload.run,
    "idle": idle.run,
    "profile": profile.run,
    "instructions": instructions.run,
    "paths": paths.run,
    "eject": eject.run,
    "pipeflood": pipeflood.run,
    "uploads": uploads.run,
    "fairness": fairness.run,
    "deadlines": deadlines.run,
    "tls": tls.run,
    "tunnels": tunnels.run,
}
DEFAULT = ("throughput", "admission", "overload", "cancel", "reload", "idle")
# scenario -> the tools (bench.deps.EXTRA) it needs beyond those every run needs
NEEDS: dict[str, tuple[str, ...]] = {"instructions": instructions.TOOLS, "tls": tls.TOOLS}
