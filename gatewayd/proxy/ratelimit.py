"""Rate limits per route (``rate_limit = {rate, burst, key}``): GCRA over one table of
keys that every worker of the gateway shares.

GCRA (the generic cell rate algorithm) keeps one time per key, its *theoretical
arrival time* ``tat``: when the key will have used up nothing. Each admitted request
moves it on by one emission interval ``1/rate``; a request is refused while
``tat + 1/rate`` lies more than ``burst/rate`` ahead of now, and told to come back
when it no longer would. So ``burst`` requests may come at once, then one every
``1/rate`` seconds; a refused request changes nothing. O(1) per request.

The table is a fixed block of memory: ``SETS`` sets of ``WAYS`` slots, each a key's
64-bit hash and its ``tat`` (16 bytes a slot; 4 MiB for 262,144 keys). A key's hash
picks its own slot, and so its set; a new key takes its own slot if the key there
owes nothing, else the slot of its set whose ``tat`` is the oldest: a key whose
``tat`` is past owes nothing and loses nothing by being forgotten; a live key
forgotten (more than ``WAYS`` keys busy at once in one set) comes back with its
whole burst. A check finds most keys in their own slot: one comparison. With ``workers = N`` the master makes the table
before it starts the workers (a memfd each worker maps), so a key's allowance is
the gateway's however its connections spread; with one process it is in that
process's memory. Time is ``time.monotonic()``: CLOCK_MONOTONIC, one clock for
every process of the host.

Without a lock, two workers admitting a request of one key at the same moment
would both read the same ``tat`` and both move it on by one interval: one request
uncounted. Measured with two processes doing nothing but checking one key, that
let 3-22 % more through; through the gateway (two workers, one key's connections
spread over both) about 1 %, and more with more workers. So what may write takes
the lock of its key's set (``fcntl`` record lock on the memfd, one byte a set):
a refusal is decided from a plain read without it (a refusal writes nothing), so a
flood of refused requests takes no lock, and an admission pays two system calls.
With the lock the two processes admit within 0.3 % of the allowance. The lock is held
for a few microseconds; a worker descheduled while it holds it makes another worker
that admits in the same set wait for it. A table in one process's own memory needs
no lock.

The hash is Python's ``hash`` of (the route, the key's text): SipHash with the
process's seed. The master gives its workers one seed (``PYTHONHASHSEED``, kept in
the table's header and checked when a worker maps it), so every worker finds a key
in the same slot; the seed is random per start, so nobody can choose keys that fall
in one set. A limiter remembers the hashes of the last few thousand keys it saw (a
connection's requests share a client address): a check then costs under 4 % of what a
proxied request costs (``bench/run --scenarios instructions`` with
``GATEWAYD_ROUTE_KEYS``).
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
from fcntl import LOCK_EX, LOCK_UN, lockf
from math import ceil
from time import monotonic
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config.ratelimit import RateLimit
    from ..http.request import Request

RATE_LIMITED = "rate_limited"

WAYS = 8  # slots a set holds: keys whose hashes pick one set that can be busy at once
SETS = 32768
SLOTS = SETS * WAYS
_HEADER = 4096  # magic, version, geometry, hash seed; then the keys, then their times
_KEYS = _HEADER
_TATS = _KEYS + SLOTS * 8
SIZE = _TATS + SLOTS * 8
_MAGIC = b"gatewayd-rate-v1"
_LAYOUT = struct.Struct("<16sIIQ")  # magic, sets, ways, hash seed


class TableMismatch(Exception):
    """A worker was handed a table it cannot use (another layout, or another hash seed)."""


class RateTable:
    """The keys of every rate-limited route, and their times (see the module docstring)."""

    __slots__ = ("_mem", "fd", "keys", "seed", "tats")

    def __init__(self, mem: mmap.mmap, seed: int, fd: int | None = None) -> None:
        self._mem = mem
        self.seed = seed
        self.fd = fd  # the memfd shared by a master and its workers; None: this process's own
        view = memoryview(mem)
        self.keys = view[_KEYS:_TATS].cast("q")  # a key's hash by slot; 0: none
        self.tats = view[_TATS:SIZE].cast("d")  # its theoretical arrival time

    @classmethod
    def private(cls) -> RateTable:
        """A table in this process's memory (one process serves every request)."""
        return cls(mmap.mmap(-1, SIZE), 0)

    @classmethod
    def shared(cls) -> RateTable:
        """A table in a memfd, for a master to hand to its workers (``fd``, ``seed``).
        The memory is taken only as keys fill it."""
        fd = os.memfd_create("gatewayd-rate-limits", os.MFD_CLOEXEC)
        os.ftruncate(fd, SIZE)
        mem = mmap.mmap(fd, SIZE)
        seed = 1 + secrets.randbelow(2**32 - 1)  # PYTHONHASHSEED: 1 to 4294967295
        _LAYOUT.pack_into(mem, 0, _MAGIC, SETS, WAYS, seed)
        return cls(mem, seed, fd)

    @classmethod
    def attach(cls, fd: int) -> RateTable:
        """The master's table, in a worker: mapped from ``fd`` (kept open: its locks).
        Refused unless this process hashes strings with the table's seed."""
        mem = mmap.mmap(fd, SIZE)
        magic, sets, ways, seed = _LAYOUT.unpack_from(mem, 0)
        if (magic, sets, ways) != (_MAGIC, SETS, WAYS):
            raise TableMismatch("the rate-limit table has another layout")
        if os.environ.get("PYTHONHASHSEED") != str(seed):
            raise TableMismatch("this worker does not hash with the rate-limit table's seed")
        return cls(mem, seed, fd)

    def seek(self, h: int, first: int) -> int:
        """The slot of key hash ``h`` in the set starting at ``first``; -1 if absent."""
        keys = self.keys
        for i in range(first, first + WAYS):
            if keys[i] == h:
                return i
        return -1

    def place(self, h: int, own: int, now: float) -> int:
        """The slot of key hash ``h``, whose own slot ``own`` holds another key: where it
        is in its set, else a new one: ``own`` if that key owes nothing now, else the one
        of the set that owes the least."""
        first = own - own % WAYS
        i = self.seek(h, first)
        if i >= 0:
            return i
        tats = self.tats
        i = own
        if tats[own] > now:
            for j in range(first, first + WAYS):
                if tats[j] < tats[i]:
                    i = j
        tats[i] = 0.0  # the time first: a worker that finds the key finds its time
        self.keys[i] = h
        return i


class Limiter:
    """A route's rate limit over the gateway's table: ``check`` is all the request path
    calls, and the one place a key's time is read and moved on."""

    __slots__ = ("_by_client", "_by_header", "_client", "_fd", "_header", "_interval", "_keys",
                 "_span", "_table", "_tats", "_via_header", "config")

    def __init__(self, route: str, config: RateLimit, table: RateTable) -> None:
        self.config = config
        self._table = table
        self._keys = table.keys
        self._tats = table.tats
        self._interval = 1.0 / config.rate
        self._span = config.burst * self._interval
        self._header = config.header
        # keys of one route, never another's; a header's value, never a client address
        self._client = hash(f"{route}\0client")
        self._via_header = hash(f"{route}\0header")
        self._fd = table.fd
        # a key's hash and slot by its text, remembered (a connection's requests share one
        # client address): computing them costs more than the rest of a check
        self._by_client: dict[str, tuple[int, int]] = {}
        self._by_header: dict[str, tuple[int, int]] = {}

    def check(self, request: Request) -> int:
        """0 if ``request`` is admitted (and counted against its key); else the whole
        seconds (at least 1) until its key may send again: its Retry-After."""
        header = self._header
        if header is not None and (value := request.headers.get(header)):
            known = self._by_header.get(value)
            if known is None:
                known = _remember(self._by_header, value, self._via_header)
        else:  # (an empty header is no key either: counted under the client address)
            client = request.client
            known = self._by_client.get(client)
            if known is None:
                known = _remember(self._by_client, client, self._client)
        h, own = known
        keys = self._keys
        tats = self._tats
        interval = self._interval
        span = self._span
        fd = self._fd
        if fd is not None:
            # shared: a refusal is decided without the lock (it writes nothing, and a
            # time read while another worker moves it on is the older one, which refuses
            # less); what may write holds its set's lock, so two workers never both
            # admit on one time
            first = own - own % WAYS
            i = own if keys[own] == h else self._table.seek(h, first)
            if i >= 0:
                now = monotonic()
                tat = tats[i] + interval - span
                if tat > now and tat <= now + interval:
                    return ceil(tat - now)
            lockf(fd, LOCK_EX, 1, first)
        try:
            now = monotonic()
            i = own if keys[own] == h else self._table.place(h, own, now)
            tat = tats[i]
            if tat < now:
                tat = now
            elif tat > now + span:
                # never so far ahead under one limit: a reload raised the rate or lowered
                # the burst. The key keeps what it used, up to the new burst less this one
                tat = now + span - interval
            tat += interval
            if tat - span > now:
                return ceil(tat - span - now)
            tats[i] = tat
            return 0
        finally:
            if fd is not None:
                lockf(fd, LOCK_UN, 1, first)


_REMEMBERED = 4096  # keys' hashes a limiter remembers, of each kind; then it starts again


def _remember(memo: dict[str, tuple[int, int]], key: str, salt: int) -> tuple[int, int]:
    """The hash of ``key`` on its route (``salt``) and its own slot, remembered."""
    if len(memo) >= _REMEMBERED:
        memo.clear()
    h = hash((salt, key)) or 1  # (0 marks an empty slot)
    known = memo[key] = (h, h % SLOTS)  # (one operation on a big int: the cheapest)
    return known
