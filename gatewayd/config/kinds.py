"""Value kinds of configuration settings: how a TOML value is checked and turned
into the Python value a frozen configuration holds, and back into TOML. Each kind
raises ``Invalid`` with the text of what was expected; the loader adds the file,
line and key path."""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..http.addresses import HOST_RE, IPV6_RE, parse_hostport
from ..http.paths import BadPath, normalize
from .positions import Path, toml_key, toml_string


class Invalid(ValueError):
    """A value does not fit its kind; ``str()`` says what was expected.

    ``at`` locates the bad part inside the value (``(1,)``: its second item);
    ``others`` holds further problems in the same value (other items of an array).
    """

    def __init__(self, message: str, at: Path = (), others: tuple[Invalid, ...] = ()) -> None:
        super().__init__(message)
        self.at = at
        self.others = others

    def every(self) -> list[Invalid]:
        return [self, *self.others]

    @classmethod
    def of_items(cls, problems: list[Invalid]) -> Invalid:
        """One exception for the problems of several items of an array."""
        return cls(str(problems[0]), problems[0].at, tuple(problems[1:]))


_SHOWN_MAX = 60


def shown(value: Any) -> str:
    """The value as an operator wrote it (TOML, on one line, shortened), for 'got ...'."""
    text = _toml(value)
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return str(value)


def _expected(what: str, value: Any, at: Path = ()) -> Invalid:
    return Invalid(f"expected {what}, got {shown(value)}", at)


def _check_bounds(
    what: str, value: float, lo: float | None, hi: float | None, lo_open: bool = False, raw: Any = None
) -> None:
    """Raise naming only the bound ``value`` breaks: "expected an integer >= 0, got -5"."""
    got = value if raw is None else raw
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise _expected(f"{what} {'>' if lo_open else '>='} {_num(lo)}", got)
    if hi is not None and value > hi:
        raise _expected(f"{what} <= {_num(hi)}", got)


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
        _check_bounds("an integer", value, self.lo, self.hi)
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
        try:
            v = float(value)
        except OverflowError:  # an integer beyond any float
            raise _expected(self.describe, value) from None
        if not math.isfinite(v):
            raise _expected("a finite number of seconds", value)
        _check_bounds("a number of seconds", v, self.lo, self.hi, self.lo_open, raw=value)
        return v


_SIZE_RE = re.compile(r"\s*([0-9]+)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE | re.ASCII)
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
            m = _SIZE_RE.fullmatch(value)
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
class ChoiceList(Kind):
    """An array of distinct words from ``choices`` (empty allowed: none of them)."""

    choices: tuple[str, ...] = ()

    @property
    def describe(self) -> str:  # type: ignore[override]
        return "an array of distinct words from " + ", ".join(f'"{c}"' for c in self.choices)

    def parse(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise _expected(self.describe, value)
        one = Choice(self.choices)
        out: list[str] = []
        problems = []
        for i, item in enumerate(value):
            try:
                word = one.parse(item)
            except Invalid as exc:
                problems.append(Invalid(str(exc), (i,)))
                continue
            if word in out:
                problems.append(Invalid(f"expected distinct words, got {shown(word)} twice", (i,)))
            out.append(word)
        if problems:
            raise Invalid.of_items(problems)
        return tuple(out)

    def dump(self, value: Any) -> Any:
        return list(value)


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
    """A string; empty only when ``empty`` (a path or a name must say something)."""

    empty: bool = False

    @property
    def describe(self) -> str:  # type: ignore[override]
        return "a string" if self.empty else "a non-empty string"

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or (not value and not self.empty) or "\0" in value:
            raise _expected(self.describe, value)
        return value


TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", re.ASCII)  # RFC 9110 §5.6.2: a header name


@dataclass(frozen=True)
class HeaderName(Kind):
    describe = "a header field name (letters, digits and !#$%&'*+-.^_`|~)"

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or not TOKEN.fullmatch(value):
            raise _expected(self.describe, value)
        return value


def _visible(text: str) -> bool:
    """No blanks or control characters: nothing an operator could not see."""
    return all(c.isprintable() and not c.isspace() for c in text)


@dataclass(frozen=True)
class PathPrefix(Kind):
    describe = 'a path starting with "/", without spaces or "#"'

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or not value.startswith("/") or not _visible(value) or "#" in value:
            raise _expected(self.describe, value)
        # requests are matched in normal form (gatewayd.http.paths): another prefix never matches
        try:
            normal, _ = normalize(value.partition("?")[0])
        except BadPath as exc:
            raise _expected(f"a path without {exc}", value) from None
        if normal != value.partition("?")[0]:
            raise _expected(f"a path in normal form ({shown(normal)}: unreserved characters unescaped)", value)
        return value


@dataclass(frozen=True)
class HostName(Kind):
    """A Host header value to match, without its port (the router drops ports)."""

    describe = 'a host name without a port, such as "example.com" (IPv6 as "[::1]")'

    def parse(self, value: Any) -> str:
        if not isinstance(value, str):
            raise _expected(self.describe, value)
        if not (
            HOST_RE.fullmatch(value) or (value[:1] == "[" and value[-1:] == "]" and IPV6_RE.fullmatch(value[1:-1]))
        ):
            raise _expected(self.describe, value)
        return value.lower()


@dataclass(frozen=True)
class Listen(Kind):
    """One ``host:port`` address."""

    describe = 'an address "host:port" (IPv6 as "[::1]:8080")'

    def parse(self, value: Any) -> str:
        if not isinstance(value, str):
            raise _expected(self.describe, value)
        try:
            parse_hostport(value)
        except ValueError as exc:
            raise _expected(str(exc), value) from None
        return value


@dataclass(frozen=True)
class ListenEntry:
    """One listen address and how its connections are opened."""

    address: str
    tls: bool = False
    proxy_protocol: bool = False


_LISTEN_OPTIONS = ("address", "tls", "proxy_protocol")


@dataclass(frozen=True)
class ListenList(Kind):
    """One or more listen entries: ``"host:port"`` or ``{address, tls, proxy_protocol}``
    (a single string is accepted)."""

    describe = ('an array of one or more addresses "host:port" or tables '
                '{address = "host:port", tls = true, proxy_protocol = true}')

    def parse(self, value: Any) -> tuple[ListenEntry, ...]:
        single = isinstance(value, (str, dict))
        items = [value] if single else value
        if not isinstance(items, list) or not items:
            raise _expected(self.describe, value)
        out: list[ListenEntry] = []
        problems = []
        for i, item in enumerate(items):
            where: Path = () if single else (i,)
            try:
                entry = self._one(item)
            except Invalid as exc:
                problems.append(Invalid(str(exc), (*where, *exc.at)))
                continue
            if any(e.address == entry.address for e in out):
                problems.append(Invalid(f"expected distinct addresses, got {shown(entry.address)} twice", where))
            out.append(entry)
        if problems:
            raise Invalid.of_items(problems)
        return tuple(out)

    def _one(self, item: Any) -> ListenEntry:
        if isinstance(item, str):
            return ListenEntry(Listen().parse(item))
        if not isinstance(item, dict):
            raise _expected('an address "host:port" or a table '
                            '{address = "host:port", tls = true, proxy_protocol = true}', item)
        for key in item:
            if key not in _LISTEN_OPTIONS:
                raise _expected("only the keys " + ", ".join(_LISTEN_OPTIONS), key, (key,))
        if "address" not in item:
            raise _expected('an address = "host:port" in each table', item)
        try:
            address = Listen().parse(item["address"])
        except Invalid as exc:
            raise Invalid(str(exc), ("address",)) from None
        flags = {}
        for key in ("tls", "proxy_protocol"):
            try:
                flags[key] = Bool().parse(item.get(key, False))
            except Invalid as exc:
                raise Invalid(str(exc), (key,)) from None
        return ListenEntry(address, **flags)

    def dump(self, value: Any) -> Any:
        return [e.address if not (e.tls or e.proxy_protocol) else
                {"address": e.address, "tls": e.tls, "proxy_protocol": e.proxy_protocol}
                for e in value]


@dataclass(frozen=True)
class Networks(Kind):
    """IP networks in CIDR notation; a bare address is a network of one."""

    describe = 'an array of networks such as "10.0.0.0/8", "127.0.0.1" or "fd00::/8"'

    def parse(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise _expected(self.describe, value)
        problems = []
        for i, item in enumerate(value):
            try:
                ipaddress.ip_network(item, strict=True)
            except (TypeError, ValueError):
                problems.append(Invalid(
                    f"expected a network such as \"10.0.0.0/8\" (no host bits set), got {shown(item)}", (i,)))
        if problems:
            raise Invalid.of_items(problems)
        return tuple(value)

    def dump(self, value: Any) -> Any:
        return list(value)


@dataclass(frozen=True)
class FileMode(Kind):
    describe = 'a file mode such as 0o600 or "0600"'

    def parse(self, value: Any) -> int:
        if isinstance(value, str) and re.fullmatch(r"(0o)?[0-7]{1,4}", value, re.ASCII):
            n = int(value.removeprefix("0o"), 8)
        elif isinstance(value, int) and not isinstance(value, bool):
            n = value
        else:
            raise _expected(self.describe, value)
        if not 0 <= n <= 0o777:
            got = shown(value) + (f" (0o{value:o})" if isinstance(value, int) and value >= 0 else "")
            raise Invalid(f"expected a file mode from 0o000 to 0o777, got {got}")
        return n

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
    tls: bool = False  # an https:// URL


_URL = 'a URL "http://host:port" or "https://host:port" (no path, query or user)'
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Servers(Kind):
    describe = 'an array of "http://host:port" or "https://host:port" URLs or {url = "...", weight = N} tables'

    def parse(self, value: Any) -> tuple[Server, ...]:
        single = isinstance(value, str)
        items = [value] if single else value
        if not isinstance(items, list) or not items:
            raise _expected(self.describe, value)
        out = []
        problems = []
        for i, item in enumerate(items):
            where: Path = () if single else (i,)
            try:
                out.append(self._one(item))
            except Invalid as exc:
                problems.append(Invalid(str(exc), (*where, *exc.at)))
        if problems:
            raise Invalid.of_items(problems)
        return tuple(out)

    def _one(self, item: Any) -> Server:
        weight = 1
        url = item
        if isinstance(item, dict):
            unknown = [key for key in item if key not in ("url", "weight")]
            if unknown:
                raise _expected('only the keys "url" and "weight"', unknown[0], (unknown[0],))
            if "url" not in item:
                raise _expected("a url in each table", item)
            url = item["url"]
            weight = item.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= 1000:
                raise _expected("a weight >= 1 and <= 1000", weight, ("weight",))
        if not isinstance(url, str):
            raise _expected(self.describe if url is item else _URL, url, () if url is item else ("url",))
        at: Path = () if url is item else ("url",)
        # urlsplit silently drops tabs and line breaks, and allows what a server URL must not have
        if not _visible(url) or "?" in url or "#" in url or "@" in url:
            raise _expected(_URL, url, at)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:  # a bad port or a malformed [IPv6] address
            raise _expected(_URL, url, at) from None
        default_port = _DEFAULT_PORTS.get(parts.scheme)
        if default_port is None or not parts.hostname or parts.path not in ("", "/") or port == 0:
            raise _expected(_URL, url, at)
        return Server(url.rstrip("/"), parts.hostname, port or default_port, weight, parts.scheme == "https")

    def dump(self, value: Any) -> Any:
        return [s.url if s.weight == 1 else {"url": s.url, "weight": s.weight} for s in value]


@dataclass(frozen=True)
class HealthCheck:
    """An upstream's active health check: ``GET path`` every ``interval`` seconds."""

    path: str = "/"
    interval: float = 5.0
    timeout: float = 2.0
    healthy: int = 2  # passing probes in a row that mark a server up
    unhealthy: int = 3  # failing probes in a row that mark it down


_CHECK_KEYS: dict[str, Kind] = {
    "path": PathPrefix(), "interval": Duration(), "timeout": Duration(),
    "healthy": Int(1, 1000), "unhealthy": Int(1, 1000),
}


@dataclass(frozen=True)
class HealthCheckTable(Kind):
    describe = ('a table {path = "/", interval = 5.0, timeout = 2.0, healthy = 2, unhealthy = 3} '
                "(every key optional; these are the defaults)")

    def parse(self, value: Any) -> HealthCheck:
        if not isinstance(value, dict):
            raise _expected(self.describe, value)
        values = {}
        problems = []
        for key, raw in value.items():
            kind = _CHECK_KEYS.get(key)
            if kind is None:
                close = difflib.get_close_matches(key, list(_CHECK_KEYS), n=1)
                hint = f'did you mean "{close[0]}"?' if close else "expected one of " + ", ".join(_CHECK_KEYS)
                problems.append(Invalid(f"unknown key; {hint}", (key,)))
                continue
            try:
                values[key] = kind.parse(raw)
            except Invalid as exc:
                problems.append(Invalid(str(exc), (key,)))
        if problems:
            raise Invalid.of_items(problems)
        return HealthCheck(**values)

    def dump(self, value: Any) -> Any:
        return {name: getattr(value, name) for name in _CHECK_KEYS}


@dataclass(frozen=True)
class ImportPath(Kind):
    describe = 'an import path "module:callable"'

    def parse(self, value: Any) -> str:
        if not isinstance(value, str) or not _IMPORT_RE.fullmatch(value):
            raise _expected(self.describe, value)
        return value


_IDENT = r"[^\W\d]\w*"
_IMPORT_RE = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*")
