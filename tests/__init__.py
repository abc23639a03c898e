"""gatewayd's tests, in folders that mirror the package: ``tests/http/`` tests
``gatewayd/http/``, ``tests/proxy/`` tests ``gatewayd/proxy/``, and so on (``config``,
``upstreams``, ``runtime``, ``control``, ``process``, ``dashboard``). A test lives
where the concept it exercises lives, whatever issue brought it.

At the top: what tests the product as a whole (``test_smoke.py``, ``test_fuzz.py``,
``test_architecture.py``: the package's layers) or what ships beside the code
(``test_man.py``: the man pages; ``test_deploy.py``: ``contrib/``).

Shared by all: ``conftest.py`` (fixtures, live upstreams and gateways, raw
clients), ``builders.py`` (config text), ``faults.py`` (raw upstreams that
misbehave on purpose); data in ``corpus/`` (requests) and ``configs/``.

Every folder is a package (``tests.http``, ...), so none shadows a module of the
same name (the stdlib's ``http``, the ``dashboard`` package).
"""
