"""One server of an HTTP upstream: its pool, its counters and its health.

Three things can take a server out of rotation, and the state keeps them apart:
- passive health: ``max_fails`` consecutive failed requests eject it for
  ``fail_timeout`` seconds; then exactly one request is let through (the trial)
  and its outcome restores or ejects it again. Only failures of the kinds in
  ``fail_on`` count (by default connect failures: a request cannot cause them,
  so no client can eject a server with what it sends). And passive health never
  takes out the last server in rotation: an upstream judged by its own traffic
  alone would otherwise answer ``no_healthy_server`` to everyone for what one
  client did, with nothing to bring it back but the clock (nginx never marks a
  lone server down; Envoy's panic threshold is the same idea). Such a server is
  ``kept``;
- the active check (``health_check``): ``unhealthy`` failed probes in a row mark
  it down until ``healthy`` passing probes in a row mark it up;
- the operator (``server_state`` control command): down until set up by hand.

``blocked_until`` folds the three into one number the balancer reads on every
pick: 0.0 for a server in rotation, ``inf`` while the check or the operator
holds it down, otherwise the loop time its ejection ends.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from ..config.kinds import Server

if TYPE_CHECKING:
    import aiohttp

    from .state import ServerExport

log = logging.getLogger("gatewayd")

INF = math.inf

# fail_on's words and the failure reasons (http.client's) each one counts
FAILURE_KINDS: dict[str, tuple[str, ...]] = {
    "connect": ("upstream_connect", "upstream_connect_timeout", "upstream_dns", "upstream_tls"),
    "reset": ("upstream_reset",),
    "timeout": ("upstream_timeout",),
    "invalid": ("upstream_invalid",),
}


def counted_reasons(kinds: tuple[str, ...]) -> frozenset[str]:
    """The failure reasons that ``fail_on = kinds`` holds against a server."""
    return frozenset(r for kind in kinds for r in FAILURE_KINDS[kind])


class ServerState:
    """A server of one upstream object (one worker process, one configuration)."""

    __slots__ = (
        "admin_down",
        "blocked_until",
        "check_down",
        "check_fall",
        "check_rise",
        "cw",
        "ejected_until",
        "ejections",
        "ejections_refused",
        "fails",
        "failures",
        "host",
        "in_flight",
        "kept",
        "last_check",
        "last_error",
        "last_error_time",
        "peers",
        "port",
        "requests",
        "session",
        "tls",
        "trial",
        "upstream",
        "url",
        "weight",
    )

    def __init__(self, upstream: str, server: Server) -> None:
        self.upstream = upstream
        self.url = server.url
        self.host = server.host
        self.port = server.port
        self.tls = server.tls
        self.weight = server.weight
        self.session: aiohttp.ClientSession | None = None
        self.in_flight = 0
        self.requests = 0  # attempts sent to this server (a retried request counts once per server)
        self.failures = 0  # attempts that failed (connect, reset, timeout, 5xx if configured)
        self.ejections = 0
        self.ejections_refused = 0  # times it was kept in rotation, the last server there
        self.kept = False  # its failures would eject it, but no other server is in rotation
        self.peers: tuple[ServerState, ...] = ()  # the upstream's servers, this one included
        self.fails = 0  # consecutive failures, for max_fails
        self.ejected_until = 0.0  # loop time; 0.0: not ejected
        self.trial = False  # the one request let through after an ejection is in flight
        self.check_down = False
        self.check_rise = 0
        self.check_fall = 0
        self.last_check: str | None = None  # "ok" or the reason of the last failed probe
        self.admin_down = False
        self.blocked_until = 0.0
        self.cw = 0  # smooth weighted round robin's current weight
        self.last_error: str | None = None
        self.last_error_time: float | None = None

    def _update(self) -> None:
        self.blocked_until = INF if (self.admin_down or self.check_down) else self.ejected_until

    # -- passive health --------------------------------------------------------------
    def begin_trial(self, now: float, fail_timeout: float) -> None:
        """The ejection is over: this pick is the one request that may restore it.
        Until it ends, the server stays out for everyone else."""
        self.trial = True
        self.ejected_until = now + fail_timeout
        self._update()

    def succeeded(self) -> None:
        """A response head arrived (and was not a counted 5xx)."""
        self.fails = 0
        self.kept = False
        if self.ejected_until:
            self.ejected_until = 0.0
            self.trial = False
            self._update()
            log.warning("upstream %s: server %s restored", self.upstream, self.url)

    def failed(self, reason: str, now: float, max_fails: int, fail_timeout: float,
               counts: bool = True) -> None:
        """Count one failed attempt; eject at ``max_fails`` in a row (0: never) when
        it ``counts`` (its kind is in ``fail_on``) and another server is in rotation.

        A failure that does not count is recorded (``failures``, ``last_error``) but
        otherwise taken as the answer it is: the server accepted the connection and
        the request, which is what the counted kinds doubt. So it ends a run of
        failures and a trial as a response does; held as neither, a trial taken by
        a client's bad request would keep a recovered server out for another
        ``fail_timeout``, again and again."""
        self.failures += 1
        self.last_error = reason
        self.last_error_time = time.time()
        if not counts:
            if self.fails or self.ejected_until:
                self.succeeded()
            return
        self.fails += 1
        if self.trial or (max_fails and self.fails >= max_fails and not self.ejected_until):
            again = self.trial
            self.trial = False
            if not self._others_in_rotation(now):
                self._keep(reason)
                return
            self.kept = False
            self.ejected_until = now + fail_timeout
            self.ejections += 1
            self._update()
            log.warning("upstream %s: server %s ejected for %g s after %s (%s)", self.upstream,
                        self.url, fail_timeout,
                        "its trial request failed" if again else f"{self.fails} failures in a row",
                        reason)

    def _others_in_rotation(self, now: float) -> bool:
        """Whether another server takes requests (one whose ejection is over does:
        the next pick tries it)."""
        return any(p is not self and p.blocked_until <= now for p in self.peers)

    def _keep(self, reason: str) -> None:
        """The last server in rotation stays in: its failures are answered as
        they come, not turned into ``no_healthy_server`` for every request."""
        if self.ejected_until:  # a failed trial
            self.ejected_until = 0.0
            self._update()
        if self.kept:
            return  # said once per run of failures
        self.kept = True
        self.ejections_refused += 1
        log.warning("upstream %s: server %s kept in rotation after %d failures in a row (%s): "
                    "no other server is in rotation", self.upstream, self.url, self.fails, reason)

    def readmit(self) -> None:
        """No server is in rotation, and this one is out only by passive health (the
        active check or the operator took the others out after it was ejected):
        back in rotation at once, as the last server would have been kept."""
        self.trial = False
        self.ejected_until = 0.0
        self._update()
        if not self.kept:
            self.kept = True
            self.ejections_refused += 1
        log.warning("upstream %s: server %s back in rotation before its ejection ended: "
                    "no other server is in rotation", self.upstream, self.url)

    def trial_abandoned(self) -> None:
        """The trial request ended without a verdict (its client left): the next
        trial comes after the ejection time set when it began."""
        self.trial = False

    # -- active health ---------------------------------------------------------------
    def check_passed(self, healthy: int) -> None:
        self.last_check = "ok"
        self.check_fall = 0
        self.check_rise += 1
        if self.check_down and self.check_rise >= healthy:
            self.check_down = False
            self.fails = 0
            self.kept = False
            self._update()
            log.warning("upstream %s: server %s up (health check passed %d times)", self.upstream,
                        self.url, self.check_rise)

    def check_failed(self, reason: str, unhealthy: int) -> None:
        self.last_check = reason
        self.last_error = f"health_check: {reason}"
        self.last_error_time = time.time()
        self.check_rise = 0
        self.check_fall += 1
        if not self.check_down and self.check_fall >= unhealthy:
            self.check_down = True
            self._update()
            log.warning("upstream %s: server %s down (health check failed %d times: %s)",
                        self.upstream, self.url, self.check_fall, reason)

    # -- by hand ---------------------------------------------------------------------
    def set_admin(self, up: bool) -> None:
        """``up``: back in rotation at once, every verdict forgotten; else out until set up."""
        if up:
            self.admin_down = self.check_down = self.trial = self.kept = False
            self.ejected_until = 0.0
            self.fails = self.check_fall = 0
        else:
            self.admin_down = True
        self._update()
        log.warning("upstream %s: server %s set %s by hand", self.upstream, self.url,
                    "up" if up else "down")

    # -- visibility ------------------------------------------------------------------
    def state(self, now: float) -> str:
        """up, down (by hand), unhealthy (active check), ejected (passive), trial, or
        kept (in rotation although its failures would eject it: the last server)."""
        if self.admin_down:
            return "down"
        if self.check_down:
            return "unhealthy"
        if self.trial:
            return "trial"
        if self.ejected_until > now:
            return "ejected"
        return "kept" if self.kept else "up"

    def export(self, now: float) -> ServerExport:
        state = self.state(now)
        ejected = None
        if state in ("ejected", "trial"):
            ejected = round(time.time() + max(0.0, self.ejected_until - now), 3)
        return {
            "url": self.url,
            "weight": self.weight,
            "state": state,
            "healthy": state in ("up", "kept"),
            "ejected_until": ejected,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "failures": self.failures,
            "consecutive_failures": self.fails,
            "ejections": self.ejections,
            "ejections_refused": self.ejections_refused,
            "last_error": self.last_error,
            "last_error_time": self.last_error_time,
            "last_check": self.last_check,
        }
