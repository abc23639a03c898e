"""gatewayd with the admission gate's fast path replaced by no-ops: for the
admission-cost A/B only (bench/scenarios/admission.py); never a way to run it.

``Gate.try_enter`` always admits and ``Gate.release`` does nothing; the calls
themselves remain, so the difference to a normal gatewayd is the gate's logic.
The micro-benchmark in the same scenario measures the calls too.

    python -m bench.gatewayd_nogate --config FILE
"""

from __future__ import annotations

import sys

from gatewayd.process.cli import main
from gatewayd.proxy import admission


def _admit(self: admission.Gate) -> bool:
    return True


def _release(self: admission.Gate) -> None:
    return None


if __name__ == "__main__":
    admission.Gate.try_enter = _admit  # type: ignore[method-assign]
    admission.Gate.release = _release  # type: ignore[method-assign]
    sys.exit(main())
