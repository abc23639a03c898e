"""A pytest plugin that puts bench/tls_lean.py's opener into every in-process
gatewayd, to run gatewayd's own tests against the prototype:

    .venv/bin/python -m pytest -p bench.pytest_tlslean tests/

(gatewayd processes the tests start are not patched.)
"""

from .gatewayd_tlslean import patch

patch()
