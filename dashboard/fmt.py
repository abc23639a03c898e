"""Figures as short strings for the screen. ``None`` (a figure the daemon did not
send) is always the empty string, never an error."""

from __future__ import annotations

import time

BLOCKS = " ▏▎▍▌▋▊▉█"


def count(v: float | None) -> str:
    if v is None:
        return ""
    if abs(v) < 100_000:
        return str(int(v))
    if abs(v) < 100_000_000:
        return f"{v / 1000:.0f}k"
    return f"{v / 1_000_000:.0f}M"


def per_second(v: float | None) -> str:
    if v is None:
        return ""
    if v == 0:
        return "0"
    if v < 10:
        return f"{v:.1f}"
    if v < 100_000:
        return f"{v:.0f}"
    return f"{v / 1000:.0f}k"


def ms(v: float | None) -> str:
    """Milliseconds: ``0.42ms``, ``12.5ms``, ``340ms``, ``2.10s``."""
    if v is None:
        return ""
    if v < 10:
        return f"{v:.2f}ms"
    if v < 100:
        return f"{v:.1f}ms"
    if v < 1000:
        return f"{v:.0f}ms"
    return f"{v / 1000:.2f}s"


def seconds_left(v: float | None) -> str:
    """What is left of a deadline: ``0.35s``, ``4.93s``, ``12.5s``, ``300s``."""
    if v is None:
        return ""
    if v < 10:
        return f"{v:.2f}s"
    if v < 100:
        return f"{v:.1f}s"
    return f"{v:.0f}s"


def age(v: float | None) -> str:
    """The oldest waiter's age: ``-`` when nobody waits."""
    if v is None:
        return ""
    return "-" if v <= 0 else ms(v)


def duration(s: float | None) -> str:
    """Uptime: ``45s``, ``5m03s``, ``1h02m``, ``3d04h``."""
    if s is None or s < 0:
        return ""
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def ratio(a: float | None, b: float | None) -> str:
    """``37/100``; a blank side stays blank (``/100``)."""
    if a is None and b is None:
        return ""
    return f"{count(a)}/{count(b)}"


def bar(value: float | None, limit: float | None, width: int) -> str:
    """A horizontal bar of ``value/limit`` in eighths of a cell, ``width`` cells wide."""
    if value is None or not limit or limit <= 0:
        return " " * width
    eighths = round(min(max(value / limit, 0.0), 1.0) * width * 8)
    if value > 0 and eighths == 0:
        eighths = 1  # one request in flight is never drawn as nothing
    full, part = divmod(eighths, 8)
    return ("█" * full + (BLOCKS[part] if part else "")).ljust(width)


def clock(t: float | None) -> str:
    """Local wall-clock time ``HH:MM:SS`` of a Unix time."""
    if t is None:
        return ""
    return time.strftime("%H:%M:%S", time.localtime(t))


def ago(t: float | None, now: float | None) -> str:
    """``12:03:04, 35s ago`` (``now`` is the snapshot's time, not ours)."""
    if t is None:
        return ""
    if now is None or now < t:
        return clock(t)
    return f"{clock(t)}, {duration(now - t)} ago"


def date(t: float | None) -> str:
    """The UTC date ``YYYY-MM-DD`` of a Unix time (a certificate's expiry is UTC)."""
    if t is None:
        return ""
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def time_left(s: float | None) -> str:
    """Whole days left (``5d``), hours under a day (``7h``), rounded down."""
    if s is None:
        return ""
    if s >= 86400:
        return f"{int(s // 86400)}d"
    return f"{max(int(s // 3600), 0)}h"


def tail(text: str, width: int) -> str:
    """``text`` cut from the left to ``width`` (a path keeps its file name)."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1:]


def one_line(text: str, width: int) -> str:
    """The first line of ``text``, cut to ``width`` with an ellipsis."""
    first = text.splitlines()[0] if text else ""
    more = first != text.rstrip("\n")
    if len(first) > width or more:
        return first[: max(width - 1, 0)] + "…"
    return first
