"""gatewayd's benchmark harness: gatewayd against nginx, HAProxy and a naive
aiohttp proxy, on one core each. ``python -m bench --help``; docs/BENCHMARKS.md."""
