"""Rate limits per route (``rate_limit = {rate, burst, key}``): GCRA over one table of
keys that every worker of the gateway shares.

GCRA (the generic cell rate algorithm) keeps one time per key, its *theoretical
arrival time* ``tat``: when the key will have used up nothing. Each admitted request
moves it on by one emission interval ``1/rate``; a request is refused while
``tat + 1/rate`` lies more than ``burst/rate`` ahead of now, and told to come back
when it no longer would. So ``burst`` requests may come at once, then one every
``1/rate`` seconds; a refused request changes nothing. O(1) per request.

The table is a fixed block of memory: ``SETS`` sets of ``WAYS`` slots, each a key's
64-bit hash and its ``tat`` (16 bytes a slot; 4 MiB for 262,144 keys). A key lives
in the set its hash picks; a new key takes the slot of its set whose ``tat`` is the
oldest: a key whose ``tat`` is past owes nothing and loses nothing by being
forgotten; a live key forgotten (more than ``WAYS`` keys busy at once in one set)
comes back with its whole burst. With ``workers = N`` the master makes the table
before it starts the workers (a memfd each worker maps), so a key's allowance is
the gateway's however its connections spread; with one process it is in that
process's memory. Time is ``time.monotonic()``: CLOCK_MONOTONIC, one clock for
every process of the host.

Without a lock, two workers admitting a request of one key at the same moment
would both read the same ``tat`` and both move it on by one interval: one request
uncounted. Measured with two processes doing nothing but checking one key, that
let 3-12 % more through; through the gateway (two workers, one key's connections
spread over both) about 1 %, and more with more workers. So what may write takes
the lock of its key's set (``fcntl`` record lock on the memfd, one byte a set):
a refusal is decided from a plain read without it (a refusal writes nothing), so a
flood of refused requests takes no lock, and an admission pays two system calls.
With the lock the two processes admit within 0.3 % of the allowance. A table in one
process's own memory needs no lock.

The hash is Python's ``hash`` of a string: SipHash with the process's seed. The
master gives its workers one seed (``PYTHONHASHSEED``, kept in the table's header and
checked when a worker maps it), so every worker finds a key in the same slot; the
seed is random per start, so nobody can choose keys that fall in one set.
"""

from __future__ import annotations

import math
import mmap
import os
import secrets
import struct
from fcntl import LOCK_EX, LOCK_UN, lockf
from time import monotonic
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config.ratelimit import RateLimit
    from ..http.request import Request

RATE_LIMITED = "rate_limited"

WAYS = 8  # slots a set holds: keys whose hashes pick one set that can be busy at once
SETS = 32768  # a power of two
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

    __slots__ = ("_keys", "_mem", "_tats", "fd", "seed")

    def __init__(self, mem: mmap.mmap, seed: int, fd: int | None = None) -> None:
        self._mem = mem
        self.seed = seed
        self.fd = fd  # the memfd shared by a master and its workers; None: this process's own
        view = memoryview(mem)
        self._keys = view[_KEYS:_TATS].cast("q")
        self._tats = view[_TATS:SIZE].cast("d")

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

    def take(self, key: str, interval: float, span: float) -> float:
        """One request of ``key``, allowed one every ``interval`` seconds and ``span``
        seconds ahead (burst x interval): 0.0 if it is admitted (and counted), else
        the seconds until the key may send again (nothing counted)."""
        h = hash(key) or 1  # (0 marks an empty slot)
        first = (h & (SETS - 1)) * WAYS
        fd = self.fd
        if fd is None:  # this process's own table: nobody else writes it
            return self._take(h, first, interval, span)
        # shared: a refusal is decided without the lock (it writes nothing, and a time
        # read while another worker moves it on is the older one, which refuses less)
        at = self._mem.find(h.to_bytes(8, "little", signed=True), _KEYS + first * 8,
                            _KEYS + (first + WAYS) * 8)
        if at >= 0 and not at & 7:
            now = monotonic()
            tat = self._tats[(at - _KEYS) >> 3]
            if now < tat <= now + span and tat + interval - span > now:
                return tat + interval - span - now
        # what may write holds its set's lock: two workers never both admit on one time
        lockf(fd, LOCK_EX, 1, first)
        try:
            return self._take(h, first, interval, span)
        finally:
            lockf(fd, LOCK_UN, 1, first)

    def _take(self, h: int, first: int, interval: float, span: float) -> float:
        at = self._mem.find(h.to_bytes(8, "little", signed=True), _KEYS + first * 8,
                            _KEYS + (first + WAYS) * 8)
        if at >= 0 and not at & 7:
            i = (at - _KEYS) >> 3
        else:
            i = self._place(h, first)
        tats = self._tats
        now = monotonic()
        tat = tats[i]
        if tat < now:
            tat = now
        elif tat > now + span:
            # never so far ahead under one limit: a reload raised the rate or lowered the
            # burst. The key keeps what it used, up to the new burst less this request
            tat = now + span - interval
        tat += interval
        wait = tat - span - now
        if wait > 0.0:
            return wait
        tats[i] = tat
        return 0.0

    def _place(self, h: int, first: int) -> int:
        """The slot of key hash ``h`` in the set starting at ``first``: its own (found
        here when its bytes also appear out of line), else the one whose time is
        oldest, now the key's."""
        keys = self._keys
        tats = self._tats
        oldest = first
        for i in range(first, first + WAYS):
            if keys[i] == h:
                return i
            if tats[i] < tats[oldest]:
                oldest = i
        tats[oldest] = 0.0  # the time first: a worker that finds the key finds its time
        keys[oldest] = h
        return oldest


class Limiter:
    """A route's rate limit over the gateway's table: ``check`` is all the request path
    calls."""

    __slots__ = ("_client", "_header", "_interval", "_span", "_table", "_via_header", "config")

    def __init__(self, route: str, config: RateLimit, table: RateTable) -> None:
        self.config = config
        self._table = table
        self._interval = 1.0 / config.rate
        self._span = config.burst * self._interval
        self._header = config.header
        # keys of one route, never another's; a header's value, never a client address
        self._client = f"{route}\0c"
        self._via_header = f"{route}\0h"

    def check(self, request: Request) -> int:
        """0 if ``request`` is admitted (and counted against its key); else the whole
        seconds (at least 1) until its key may send again: its Retry-After."""
        header = self._header
        key = None if header is None else request.headers.get(header)
        if key is None:
            key = self._client + request.client
        else:
            key = self._via_header + key
        wait = self._table.take(key, self._interval, self._span)
        return math.ceil(wait) if wait else 0
