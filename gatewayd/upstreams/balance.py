"""Choosing a server for each request: round robin, least in flight, or the
power of two random choices; weights respected by all three.

A pick is one pass (two or three for the in-flight algorithms) over the
upstream's servers, with no allocation. Servers out of rotation are skipped; a
server whose ejection just ended is returned at once as the trial request that
may restore it. ``tried`` holds the servers an exchange already failed on, so a
retry goes elsewhere. When no server is in rotation, ``last_resort`` takes back
one that only passive health holds out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from .servers import INF, ServerState

BALANCE = ("round_robin", "least_in_flight", "random_two")

_NONE: tuple[ServerState, ...] = ()


class Balancer:
    """Picks among ``servers``; ``now`` is the loop's clock, read only when a
    server is out of rotation."""

    def __init__(self, algorithm: str, servers: Sequence[ServerState], fail_timeout: float,
                 now: Callable[[], float]) -> None:
        self.servers = tuple(servers)
        self.fail_timeout = fail_timeout
        self._now = now
        self._random = random.random
        self.pick: Callable[[tuple[ServerState, ...]], ServerState | None] = {
            "round_robin": self._round_robin,
            "least_in_flight": self._least_in_flight,
            "random_two": self._random_two,
        }[algorithm]
        if len(self.servers) == 1:
            self.pick = self._single

    def last_resort(self) -> ServerState | None:
        """``pick`` found no server: of those out by passive ejection alone (not by
        the active check or by hand), the one whose ejection ends first is back in
        rotation now, or None when there is none. Passive health never leaves the
        upstream without a server; it can come to that only when the others were
        taken out after this one was ejected."""
        best = None
        for s in self.servers:
            if s.blocked_until != INF and (best is None or s.blocked_until < best.blocked_until):
                best = s
        if best is not None:
            best.readmit()
        return best

    def _trial(self, s: ServerState) -> ServerState:
        s.begin_trial(self._now(), self.fail_timeout)
        return s

    def _usable(self, s: ServerState, tried: tuple[ServerState, ...]) -> bool | None:
        """True: in rotation; None: its ejection is over (a trial); False: skip it."""
        if tried and s in tried:
            return False
        if s.blocked_until:
            return None if s.blocked_until <= self._now() else False
        return True

    def _single(self, tried: tuple[ServerState, ...] = _NONE) -> ServerState | None:
        s = self.servers[0]
        if not s.blocked_until and not tried:
            return s
        usable = self._usable(s, tried)
        if usable is None:
            return self._trial(s)
        return s if usable else None

    def _round_robin(self, tried: tuple[ServerState, ...] = _NONE) -> ServerState | None:
        # nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a
        best = None
        total = 0
        for s in self.servers:
            if s.blocked_until or tried:
                usable = self._usable(s, tried)
                if usable is None:
                    return self._trial(s)
                if not usable:
                    continue
            s.cw += s.weight
            total += s.weight
            if best is None or s.cw > best.cw:
                best = s
        if best is not None:
            best.cw -= total
        return best

    def _least_in_flight(self, tried: tuple[ServerState, ...] = _NONE) -> ServerState | None:
        # fewest in flight per unit of weight; ties (an idle pool) by weighted round robin
        low = None
        for s in self.servers:
            if s.blocked_until or tried:
                usable = self._usable(s, tried)
                if usable is None:
                    return self._trial(s)
                if not usable:
                    continue
            if low is None or s.in_flight * low.weight < low.in_flight * s.weight:
                low = s
        if low is None:
            return None
        best = None
        total = 0
        for s in self.servers:
            if s.in_flight * low.weight != low.in_flight * s.weight:
                continue
            if (s.blocked_until or tried) and not self._usable(s, tried):
                continue
            s.cw += s.weight
            total += s.weight
            if best is None or s.cw > best.cw:
                best = s
        assert best is not None
        best.cw -= total
        return best

    def _random_two(self, tried: tuple[ServerState, ...] = _NONE) -> ServerState | None:
        # two servers drawn by weight; the one with fewer in flight per weight wins,
        # the first on a tie (so an idle pool is spread by weight alone)
        total = 0
        for s in self.servers:
            if s.blocked_until or tried:
                usable = self._usable(s, tried)
                if usable is None:
                    return self._trial(s)
                if not usable:
                    continue
            total += s.weight
        if not total:
            return None
        a = self._draw(self._random() * total, None, tried)
        if total == a.weight:
            return a
        b = self._draw(self._random() * (total - a.weight), a, tried)
        return b if b.in_flight * a.weight < a.in_flight * b.weight else a

    def _draw(self, point: float, skip: ServerState | None, tried: tuple[ServerState, ...]) -> ServerState:
        last = None
        for s in self.servers:
            if s is skip or ((s.blocked_until or tried) and not self._usable(s, tried)):
                continue
            last = s
            point -= s.weight
            if point < 0:
                return s
        assert last is not None
        return last  # rounding at the very end of the range
