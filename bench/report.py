"""Result tables: built by the scenarios, printed as Markdown (terminal and docs alike)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        self.rows.append(list(cells))

    def markdown(self) -> str:
        cells = [[fmt(c) for c in row] for row in self.rows]
        out = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
               "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.columns))) + "|"]
        out += ["| " + " | ".join(row) + " |" for row in cells]
        if self.notes:
            out.append("")
            out += [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "notes": self.notes}


def fmt(value: Any) -> str:
    """Numbers to three significant figures (whole numbers as they are); None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        a = abs(value)
        if a >= 1000:
            return f"{value:,.0f}"
        if a >= 100:
            return f"{value:.0f}"
        if a >= 10:
            return f"{value:.1f}"
        if a >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


def median_rows(rows: Sequence[Sequence[Any]]) -> list[Any]:
    """Cell-wise median of the same row from several rounds: numbers (NaN and None left
    out) become their median, anything else is taken from the first round."""
    out: list[Any] = []
    for cells in zip(*rows, strict=True):
        numbers = [c for c in cells if isinstance(c, int | float) and not isinstance(c, bool) and c == c]
        if not numbers:
            out.append(cells[0])
        elif all(isinstance(c, int) for c in numbers):
            out.append(round(median(numbers)))
        else:
            out.append(median(numbers))
    return out
