"""The trends panel: a few minutes of gateway-wide figures, one Sparkline each."""

from __future__ import annotations

from typing import Any

from rich.color import Color as RichColor
from rich.color import blend_rgb
from rich.console import Console, ConsoleOptions, RenderResult
from rich.segment import Segment
from rich.style import Style
from textual.app import ComposeResult
from textual.app import RenderResult as WidgetRender
from textual.containers import Grid, Vertical
from textual.renderables.sparkline import Sparkline as SparklineBars
from textual.widgets import Label, Sparkline

from . import fmt
from .model import History, Totals

SERIES_LABELS = (
    ("rps", "req/s", fmt.per_second),
    ("queued", "queued", fmt.count),
    ("loop_lag_ms", "loop lag", fmt.ms),
    ("gc_ms_per_s", "GC ms/s", lambda v: "" if v is None else f"{v:.1f}"),
)


class ZeroBasedBars(SparklineBars[float]):
    """Textual's sparkline drawn from 0 rather than from the series' minimum, so a
    steady 26 queued requests is a full bar, not an empty line."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = self.width or options.max_width
        height = self.height or 1
        data = list(self.data)
        top = max(data, default=0.0)
        if top <= 0 or min(data) < 0:
            yield from super().__rich_console__(console, options)
            return
        levels = len(self.BARS) * height
        low, high = self.min_color.color, self.max_color.color
        assert low is not None and high is not None
        low_rgb, high_rgb = low.get_truecolor(), high.get_truecolor()
        bars = [self.summary_function(b) / top for b in self._buckets(data, num_buckets=width)]
        for row in reversed(range(height)):
            for share in bars:
                level = round(share * levels) - row * len(self.BARS)
                if level <= 0:
                    yield Segment("▁" if row == 0 else " ", self.min_color if row == 0 else None)
                else:
                    bar = self.BARS[min(level, len(self.BARS)) - 1]
                    yield Segment(bar, Style.from_color(RichColor.from_triplet(blend_rgb(low_rgb, high_rgb, share))))
            if row:
                yield Segment.line()


class Trend(Sparkline):
    """A Sparkline whose bars start at 0."""

    def render(self) -> WidgetRender:
        bars = super().render()
        assert isinstance(bars, SparklineBars)
        return ZeroBasedBars(bars.data, width=bars.width, height=bars.height, summary_function=max,
                             min_color=bars.min_color.color or RichColor.default(),
                             max_color=bars.max_color.color or RichColor.default())


class Trends(Vertical):
    """The time series of the last few minutes, one Sparkline each."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._labels = {key: Label(label, classes="series-label") for key, label, _ in SERIES_LABELS}
        self._sparks = {key: Trend([]) for key, _, _ in SERIES_LABELS}
        self._texts: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        for key, _, _ in SERIES_LABELS:
            with Grid(classes="series"):
                yield self._labels[key]
                yield self._sparks[key]

    def show(self, history: History, now: Totals | None) -> None:
        for key, label, show in SERIES_LABELS:
            value = show(getattr(now, key)) if now is not None else ""
            text = f"{label}\n[b]{value}[/b]"
            if self._texts.get(key) != text:
                self._texts[key] = text
                self._labels[key].update(text, layout=False)
            self._sparks[key].data = history.values(key)
