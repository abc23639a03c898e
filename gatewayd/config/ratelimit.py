"""A route's ``rate_limit = {rate, burst, key}``: the value a configuration holds, and
its kind (a table, every key checked and located as ``routes[0].rate_limit.rate``)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from .kinds import TOKEN, Int, Invalid, Kind, shown

_HEADER = "header:"
MAX_RATE = 1_000_000.0


@dataclass(frozen=True)
class RateLimit:
    """Requests a second per key (``rate``), how many may come at once (``burst``), and
    what a key is: ``"client"`` (the client address) or ``"header:NAME"`` (that header's
    value, the client address when it is absent)."""

    rate: float
    burst: int = 1
    key: str = "client"

    @property
    def header(self) -> str | None:
        """The header a key is read from; None for the client address."""
        return self.key[len(_HEADER):] if self.key.startswith(_HEADER) else None


_KEYS = ("rate", "burst", "key")
_BURST = Int(1, 1_000_000)


def _rate(value: Any) -> float:
    what = f"a number of requests per second > 0 and <= {MAX_RATE:.0f}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"expected {what}, got {shown(value)}")
    try:
        rate = float(value)
    except OverflowError:
        raise Invalid(f"expected {what}, got {shown(value)}") from None
    if not 0 < rate <= MAX_RATE:  # (false for nan too)
        raise Invalid(f"expected {what}, got {shown(value)}")
    return rate


def _key(value: Any) -> str:
    if isinstance(value, str) and (value == "client" or (
            value.startswith(_HEADER) and TOKEN.fullmatch(value[len(_HEADER):]))):
        return value
    raise Invalid(f'expected "client" or "header:NAME" (NAME a header field name), got {shown(value)}')


_PARSE = {"rate": _rate, "burst": _BURST.parse, "key": _key}


@dataclass(frozen=True)
class RateLimitTable(Kind):
    describe = ('a table {rate = 10.0, burst = 20, key = "client"} (rate required; burst '
                'default 1; key "client" or "header:NAME", default "client")')

    def parse(self, value: Any) -> RateLimit:
        if not isinstance(value, dict):
            raise Invalid(f"expected {self.describe}, got {shown(value)}")
        values: dict[str, Any] = {}
        problems = []
        for key, raw in value.items():
            parse = _PARSE.get(key)
            if parse is None:
                close = difflib.get_close_matches(key, _KEYS, n=1)
                hint = f'did you mean "{close[0]}"?' if close else "expected one of " + ", ".join(_KEYS)
                problems.append(Invalid(f"unknown key; {hint}", (key,)))
                continue
            try:
                values[key] = parse(raw)
            except Invalid as exc:
                problems.append(Invalid(str(exc), (key,)))
        if "rate" not in value:
            problems.append(Invalid("missing; expected a number of requests per second", ("rate",)))
        if problems:
            raise Invalid.of_items(problems)
        return RateLimit(**values)

    def dump(self, value: Any) -> Any:
        return {"rate": value.rate, "burst": value.burst, "key": value.key}
