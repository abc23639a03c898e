"""The scenarios, in the order a full run takes them. Each takes a Context and
returns its result tables."""

from __future__ import annotations

from collections.abc import Callable

from ..context import Context
from ..report import Table
from . import (
               admission,
               apps,
               apps_instructions,
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
    "apps": apps.run,
    "apps-instructions": apps_instructions.run,
}
DEFAULT = ("throughput", "admission", "overload", "cancel", "reload", "idle")
# scenario -> the tools (bench.deps.EXTRA) and Python modules (bench.deps.PYTHON) it needs
# beyond those every run needs
NEEDS: dict[str, tuple[str, ...]] = {"instructions": instructions.TOOLS, "tls": tls.TOOLS, "apps": apps.TOOLS,
                                     "apps-instructions": apps.TOOLS + apps_instructions.TOOLS}
