"""Value kinds of configuration settings: how a TOML value is checked and turned
into the Python value a frozen configuration holds, and back into TOML.

Each kind raises ``Invalid`` with the text of what was expected; the loader adds
the file, line and key path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


class Invalid(ValueError):
    """A value does not fit its kind; ``str()`` says what was expected."""


def shown(value: Any) -> str:
    """The value as an operator wrote it, for 'got ...' in an error."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value).replace("'", '"') if '"' not in value else repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def _expected(what: str, value: Any) -> Invalid:
    return Invalid(f"expected {what}, got {shown(value)}")


class Kind:
    """A setting's type: ``parse`` checks a TOML value, ``dump`` writes it back."""

    describe = "a value"

    def parse(self, value: Any) -> Any:
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        return value


def _bounds_text(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {_num(lo)}")
    if hi is not None:
        parts.append(f"<= {_num(hi)}")
    return " and ".join(parts)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Int(Kind):
    lo: int | None = None
    hi: int | None = None

    @property
    def describe(self) -> str:  # type: ignore[override]
        b = _bounds_text(self.lo, self.hi)
        return f"an integer {b}".rstrip()

    def parse(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expected(self.describe, value)
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise _expected(self.describe, value)
        return value


@dataclass(frozen=True)
class Duration(Kind):
    """Seconds, int or float."""

    lo: float = 0.0
    hi: float | None = None
    lo_open: bool = True  # most durations must be > 0

    @property
    def describe(self) -> str:  # type: ignore[override]
        return f"a number of seconds {_bounds_text(self.lo, self.hi, self.lo_open)}"

    def parse(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _expected(self.describe, value)
        v = float(value)
        if math.isnan(v) or math.isinf(v):
            raise _expected(self.describe, value)
        if (self.lo_open and v <= self.lo) or (not self.lo_open and v < self.lo):
            raise _expected(self.describe, value)
        if self.hi is not None and v > self.hi:
            raise _expected(self.describe, value)
        return v


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}


@dataclass(frozen=True)
class Size(Kind):
    """Bytes: an integer, or a string such as ``"10MiB"``."""

    lo: int = 0

    describe = 'a size in bytes (an integer or a string such as "10MiB")'

    def parse(self, value: Any) -> int:
        if isinstance(value, bool):
            raise _expected(self.describe, value)
        if isinstance(value, int):
            n = value
        elif isinstance(value, str):
            m = _SIZE_RE.match(value)
            if not m:
                raise _expected(self.describe, value)
            n = int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "B").upper()]
        else:
            raise _expected(self.describe, value)
        if n < self.lo:
            raise _expected(f"a size >= {self.lo} bytes", value)
        return n

    def dump(self, value: Any) -> Any:
        for unit in ("GiB", "MiB", "KiB"):
            factor = _SIZE_UNITS[unit.upper()]
            if value and value % factor == 0:
                return f"{value // factor}{unit}"
        return value


@dataclass(frozen=True)
class Bool(Kind):
    describe = "true or false"

    def parse(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise _expected(self.describe, value)
        return value


@dataclass(frozen=True)
class Choice(Kind):
    choices: tuple[str, ...] = ()

    @property
    def describe(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(f'"{c}"' for c in self.choices)

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or value not in self.choices:
            raise _expected(self.describe, value)
        return value


@dataclass(frozen=True)
class Name(Kind):
    """A non-empty identifier-like string (route names appear in metrics)."""

    describe = "a non-empty name of letters, digits, '_', '-' or '.'"

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", value):
            raise _expected(self.describe, value)
        return value


@dataclass(frozen=True)
class Text(Kind):
    describe = "a string"

    def parse(self, value: Any) -> str:
        if not isinstance(value, str):
            raise _expected(self.describe, value)
        return value


@dataclass(frozen=True)
class PathPrefix(Kind):
    describe = 'a path starting with "/"'

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or not value.startswith("/"):
            raise _expected(self.describe, value)
        return value


@dataclass(frozen=True)
class HostName(Kind):
    describe = "a host name"

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9.\-_\[\]:]+", value):
            raise _expected(self.describe, value)
        return value.lower()


def parse_hostport(text: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port``; raise ValueError when malformed."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(text)
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(text)
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(text)
    return host, int(port)


@dataclass(frozen=True)
class Listen(Kind):
    """One ``host:port`` address."""

    describe = 'an address "host:port" (IPv6 as "[::1]:8080")'

    def parse(self, value: Any) -> str:
        if not isinstance(value, str):
            raise _expected(self.describe, value)
        try:
            parse_hostport(value)
        except ValueError:
            raise _expected(self.describe, value) from None
        return value


@dataclass(frozen=True)
class ListenList(Kind):
    """One or more ``host:port`` addresses (a single string is accepted)."""

    describe = 'an array of addresses "host:port"'

    def parse(self, value: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise _expected(self.describe, value)
        one = Listen()
        out = []
        for item in items:
            try:
                out.append(one.parse(item))
            except Invalid:
                raise _expected(self.describe, item) from None
        if len(set(out)) != len(out):
            raise Invalid(f"expected distinct addresses, got {shown(value)}")
        return tuple(out)

    def dump(self, value: Any) -> Any:
        return list(value)


@dataclass(frozen=True)
class FileMode(Kind):
    describe = 'a file mode such as 0o600 or "0600"'

    def parse(self, value: Any) -> int:
        if isinstance(value, bool):
            raise _expected(self.describe, value)
        if isinstance(value, str):
            try:
                value_i = int(value, 8)
            except ValueError:
                raise _expected(self.describe, value) from None
        elif isinstance(value, int):
            value_i = value
        else:
            raise _expected(self.describe, value)
        if not 0 <= value_i <= 0o777:
            raise _expected(self.describe, value)
        return value_i

    def dump(self, value: Any) -> Any:
        return f"{value:04o}"


@dataclass(frozen=True)
class Workers(Kind):
    describe = 'an integer >= 1 and <= 64, or "auto"'

    def parse(self, value: Any) -> int | str:
        if value == "auto":
            return "auto"
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
            raise _expected(self.describe, value)
        return value


@dataclass(frozen=True)
class Server:
    """One upstream server: its URL split once, and its weight."""

    url: str
    host: str
    port: int
    weight: int = 1


@dataclass(frozen=True)
class Servers(Kind):
    describe = 'an array of "http://host:port" URLs or {url = "...", weight = N} tables'

    def parse(self, value: Any) -> tuple[Server, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise _expected(self.describe, value)
        out = []
        for item in items:
            weight = 1
            url = item
            if isinstance(item, dict):
                extra = set(item) - {"url", "weight"}
                if extra or "url" not in item:
                    raise _expected(self.describe, item)
                url = item["url"]
                weight = item.get("weight", 1)
                if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 1000:
                    raise _expected("a weight >= 1 and <= 1000", weight)
            if not isinstance(url, str):
                raise _expected(self.describe, item)
            parts = urlsplit(url)
            try:
                port = parts.port
            except ValueError:
                raise _expected('a URL "http://host:port"', url) from None
            if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
                raise _expected('a URL "http://host:port" (no path)', url)
            if parts.query or parts.fragment or parts.username:
                raise _expected('a URL "http://host:port" (no path)', url)
            out.append(Server(url.rstrip("/"), parts.hostname, port or 80, weight))
        return tuple(out)

    def dump(self, value: Any) -> Any:
        return [s.url if s.weight == 1 else {"url": s.url, "weight": s.weight} for s in value]


@dataclass(frozen=True)
class ImportPath(Kind):
    describe = 'an import path "module:callable"'

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(
            r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value
        ):
            raise _expected(self.describe, value)
        return value
