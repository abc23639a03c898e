"""Line numbers for key paths in a TOML text, and key paths written as TOML.

``tomllib`` gives values but no positions; errors must name a line. The
``Locator`` walks the structure of a text that ``tomllib`` has accepted (table
headers, dotted keys, multi-line arrays, inline tables, strings of every kind)
and notes the line where each key path first appears. It is not a validating
parser: on a text it cannot follow it keeps what it found so far.
"""

from __future__ import annotations

import re
import tomllib

Path = tuple[str | int, ...]

_BARE = re.compile(r"[A-Za-z0-9_\-]+", re.ASCII)
_SCALAR = re.compile(r"[^,\]}#\n]+")  # numbers, booleans, dates: up to a delimiter
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def toml_string(text: str) -> str:
    """``text`` as a one-line TOML basic string; invisible characters escaped."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif not ch.isprintable():
            code = ord(ch)
            out.append(f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_key(key: str) -> str:
    """A key as it would be written in a file: bare when it can be, else quoted."""
    return key if _BARE.fullmatch(key) else toml_string(key)


def format_path(path: Path) -> str:
    """``("routes", 2, "max_queue")`` -> ``routes[2].max_queue``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + toml_key(part)
    return out


class Locator:
    """Maps key paths such as ``("routes", 2, "max_queue")`` to 1-based lines."""

    def __init__(self, text: str) -> None:
        self._lines: dict[Path, int] = {}
        try:
            _Scan(text, self._lines).document()
        except (IndexError, ValueError, RecursionError):
            pass  # not TOML after all: the lines found so far are the best effort

    def line(self, path: Path) -> int:
        """The line of ``path``, or of its nearest ancestor the scan saw; 1 at worst."""
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return 1


class _Scan:
    """A recursive descent over (valid) TOML that records where key paths start."""

    def __init__(self, text: str, lines: dict[Path, int]) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.lines = lines
        self.arrays: dict[Path, int] = {}  # [[array]] of tables -> index of its last element

    def at(self, token: str) -> bool:
        return self.s.startswith(token, self.i)

    def advance(self, n: int) -> None:
        self.line += self.s.count("\n", self.i, self.i + n)
        self.i += n

    def expect(self, token: str) -> None:
        if not self.at(token):
            raise ValueError(f"expected {token!r} at offset {self.i}")
        self.advance(len(token))

    def skip(self, newlines: bool) -> None:
        """Past blanks and comments, and line breaks too when ``newlines``."""
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c in " \t\r":
                self.i += 1
            elif c == "#":
                end = s.find("\n", self.i)
                self.i = len(s) if end < 0 else end
            elif c == "\n" and newlines:
                self.advance(1)
            else:
                return

    def mark(self, path: Path, line: int) -> None:
        self.lines.setdefault(path, line)

    def mark_prefixes(self, path: Path, line: int) -> None:
        for n in range(1, len(path) + 1):  # [a.b.c] and a.b.c = 1 also place a and a.b
            self.mark(path[:n], line)

    def document(self) -> None:
        table: Path = ()
        while True:
            self.skip(newlines=True)
            if self.i >= len(self.s):
                return
            line = self.line
            if self.at("[["):
                self.advance(2)
                names = self.key()
                self.expect("]]")
                base = (*self.resolve(names[:-1]), names[-1])
                index = self.arrays.get(base, -1) + 1
                self.arrays[base] = index
                table = (*base, index)
                self.mark_prefixes(table, line)
            elif self.at("["):
                self.advance(1)
                table = self.resolve(self.key())
                self.expect("]")
                self.mark_prefixes(table, line)
            else:
                names = self.key()
                self.expect("=")
                self.mark_prefixes((*table, *names), line)
                self.value((*table, *names))
            self.skip(newlines=False)
            if self.i < len(self.s) and self.s[self.i] != "\n":
                raise ValueError(f"expected the end of a line at offset {self.i}")

    def resolve(self, names: tuple[str, ...]) -> Path:
        """``[routes.extra]`` after ``[[routes]]`` means the last routes element's table."""
        out: list[str | int] = []
        for name in names:
            out.append(name)
            index = self.arrays.get(tuple(out))
            if index is not None:
                out.append(index)
        return tuple(out)

    def key(self) -> tuple[str, ...]:
        parts = []
        while True:
            self.skip(newlines=False)
            parts.append(self.simple_key())
            self.skip(newlines=False)
            if not self.at("."):
                return tuple(parts)
            self.advance(1)

    def simple_key(self) -> str:
        if self.at('"') or self.at("'"):
            start = self.i
            self.string()
            value = tomllib.loads("k = " + self.s[start : self.i])["k"]
            return str(value)
        m = _BARE.match(self.s, self.i)
        if not m:
            raise ValueError(f"expected a key at offset {self.i}")
        self.advance(m.end() - self.i)
        return m.group()

    def value(self, path: Path) -> None:
        self.skip(newlines=False)
        if self.at('"') or self.at("'"):
            self.string()
        elif self.at("["):
            self.array(path)
        elif self.at("{"):
            self.inline_table(path)
        else:
            m = _SCALAR.match(self.s, self.i)
            if not m:
                raise ValueError(f"expected a value at offset {self.i}")
            self.advance(m.end() - self.i)

    def array(self, path: Path) -> None:
        self.expect("[")
        index = 0
        while True:
            self.skip(newlines=True)
            if self.at("]"):
                self.advance(1)
                return
            self.mark((*path, index), self.line)
            self.value((*path, index))
            index += 1
            self.skip(newlines=True)
            if self.at(","):
                self.advance(1)
            elif not self.at("]"):
                raise ValueError(f"expected ',' or ']' at offset {self.i}")

    def inline_table(self, path: Path) -> None:
        self.expect("{")
        while True:
            self.skip(newlines=True)  # TOML 1.1 allows line breaks here; 1.0 never has them
            if self.at("}"):
                self.advance(1)
                return
            line = self.line
            names = self.key()
            self.expect("=")
            self.mark_prefixes((*path, *names), line)
            self.value((*path, *names))
            self.skip(newlines=True)
            if self.at(","):
                self.advance(1)
            elif not self.at("}"):
                raise ValueError(f"expected ',' or '}}' at offset {self.i}")

    def string(self) -> None:
        s = self.s
        for delim in ('"""', "'''"):
            if self.at(delim):
                end = self.i + 3
                while True:
                    end = s.index(delim, end)
                    if delim == '"""' and _escaped(s, end):
                        end += 1
                        continue
                    break
                end += 3
                extra = 0  # the content may end with one or two quote characters
                while extra < 2 and end < len(s) and s[end] == delim[0]:
                    end += 1
                    extra += 1
                self.advance(end - self.i)
                return
        quote = s[self.i]
        end = self.i + 1
        while s[end] != quote:
            if s[end] == "\n":
                raise ValueError(f"unterminated string at offset {self.i}")
            end += 2 if quote == '"' and s[end] == "\\" else 1
        self.advance(end + 1 - self.i)


def _escaped(s: str, at: int) -> bool:
    """Whether the character at ``at`` follows an odd number of backslashes."""
    n = 0
    while at - n - 1 >= 0 and s[at - n - 1] == "\\":
        n += 1
    return n % 2 == 1
