"""What recording costs per request: the metrics calls the request path makes,
the counting task factory and the GC callback, timed in isolation.

    python -m bench.metrics_cost

Compare the figure with the gateway's CPU time per request (``python -m bench``):
the issue's budget is under 3 % of it.
"""

from __future__ import annotations

import asyncio
import gc
import time

from gatewayd.proxy.admission import Gate
from gatewayd.stats.metrics import RouteStats
from gatewayd.stats.process import GcMonitor, TaskCounter

N = 200_000


def record_path(n: int) -> float:
    """Seconds per request for the recording the request path does."""
    stats = RouteStats()
    gate = Gate(1000, 1000)
    t0 = time.perf_counter()
    for i in range(n):
        stats.requests += 1
        gate.try_enter()
        stats.queue_wait.observe(0.0)
        gate.release()
        stats.responded(200, 0.0005 + (i & 7) * 0.0001)
    return (time.perf_counter() - t0) / n


async def _noop() -> None:
    pass


def task_factory(n: int) -> float:
    """Extra seconds per task that the counting task factory adds."""
    async def spawn(count: int) -> float:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        for _ in range(count):
            await loop.create_task(_noop())
        return time.perf_counter() - t0

    async def run() -> float:
        plain = await spawn(n)
        TaskCounter().install(asyncio.get_running_loop())
        counted = await spawn(n)
        return (counted - plain) / n

    return asyncio.run(run())


def gc_callback(n: int) -> float:
    """Seconds per young collection that the pause-timing callback adds."""
    gc.collect()

    def collect(count: int) -> float:
        t0 = time.perf_counter()
        for _ in range(count):
            gc.collect(0)
        return time.perf_counter() - t0

    plain = collect(n)
    mon = GcMonitor()
    mon.install()
    try:
        timed = collect(n)
    finally:
        mon.uninstall()
    return (timed - plain) / n


def main() -> None:
    per_request = record_path(N)
    per_task = task_factory(N // 4)
    per_gc = gc_callback(N // 10)
    # aiohttp makes one task per request; a young collection happens about every
    # 700 net allocations, i.e. about once per request on the proxy path.
    total = per_request + per_task + per_gc
    print(f"metrics recording per request : {per_request * 1e6:6.2f} us")
    print(f"task counting per task        : {per_task * 1e6:6.2f} us")
    print(f"GC pause timing per collection: {per_gc * 1e6:6.2f} us")
    print(f"upper bound per request       : {total * 1e6:6.2f} us")


if __name__ == "__main__":
    main()
