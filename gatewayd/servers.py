"""One server of an HTTP upstream: its pool, its counters and its health.

Three things can take a server out of rotation, and the state keeps them apart:
- passive health: ``max_fails`` consecutive failed requests eject it for
  ``fail_timeout`` seconds; then exactly one request is let through (the trial)
  and its outcome restores or ejects it again;
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
from typing import TYPE_CHECKING, Any

from .kinds import Server

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("gatewayd")

INF = math.inf


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
        "fails",
        "failures",
        "host",
        "in_flight",
        "last_check",
        "last_error",
        "last_error_time",
        "port",
        "requests",
        "session",
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
        self.weight = server.weight
        self.session: aiohttp.ClientSession | None = None
        self.in_flight = 0
        self.requests = 0  # attempts sent to this server (a retried request counts once per server)
        self.failures = 0  # attempts that failed (connect, reset, timeout, 5xx if configured)
        self.ejections = 0
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
        if self.ejected_until:
            self.ejected_until = 0.0
            self.trial = False
            self._update()
            log.warning("upstream %s: server %s restored", self.upstream, self.url)

    def failed(self, reason: str, now: float, max_fails: int, fail_timeout: float) -> None:
        """Count one failed attempt; eject at ``max_fails`` in a row (0: never)."""
        self.failures += 1
        self.fails += 1
        self.last_error = reason
        self.last_error_time = time.time()
        if self.trial or (max_fails and self.fails >= max_fails and not self.ejected_until):
            again = self.trial
            self.trial = False
            self.ejected_until = now + fail_timeout
            self.ejections += 1
            self._update()
            log.warning("upstream %s: server %s ejected for %g s after %s (%s)", self.upstream,
                        self.url, fail_timeout,
                        "its trial request failed" if again else f"{self.fails} failures in a row",
                        reason)

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
            self.admin_down = self.check_down = self.trial = False
            self.ejected_until = 0.0
            self.fails = self.check_fall = 0
        else:
            self.admin_down = True
        self._update()
        log.warning("upstream %s: server %s set %s by hand", self.upstream, self.url,
                    "up" if up else "down")

    # -- visibility ------------------------------------------------------------------
    def state(self, now: float) -> str:
        """up, down (by hand), unhealthy (active check), ejected (passive) or trial."""
        if self.admin_down:
            return "down"
        if self.check_down:
            return "unhealthy"
        if self.trial:
            return "trial"
        if self.ejected_until > now:
            return "ejected"
        return "up"

    def export(self, now: float) -> dict[str, Any]:
        state = self.state(now)
        ejected = None
        if state in ("ejected", "trial"):
            ejected = round(time.time() + max(0.0, self.ejected_until - now), 3)
        return {
            "url": self.url,
            "weight": self.weight,
            "state": state,
            "healthy": state == "up",
            "ejected_until": ejected,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "failures": self.failures,
            "consecutive_failures": self.fails,
            "ejections": self.ejections,
            "last_error": self.last_error,
            "last_error_time": self.last_error_time,
            "last_check": self.last_check,
        }
