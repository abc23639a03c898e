"""The routes table: one line a route, drawn with Textual's line API.

Each row's line is built once from its cells and kept until a cell of that row
changes; an update repaints only the rows that changed and are on screen. The
cursor stays on its route (not its position) and the scroll offset is left
alone, so neither moves when figures change or the order does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

Cell = tuple[str, str]  # text, style


@dataclass(frozen=True)
class Column:
    key: str  # also the RouteView field it sorts by
    label: str
    width: int
    left: bool = False  # aligned left (text) rather than right (figures)


class RouteTable(ScrollView, can_focus=True):
    """A fixed header line, then one line a route, with a row cursor."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {"routes--header", "routes--cursor", "routes--odd"}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor(-1)", "Up", show=False),
        Binding("down", "cursor(1)", "Down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "cursor(-1000000)", "Top", show=False),
        Binding("end", "cursor(1000000)", "Bottom", show=False),
    ]

    @dataclass
    class Selected(Message):
        """The cursor is on another route (or on none); ``by_user``: the operator moved it
        (a key or a click), rather than its route going away."""

        route: str | None
        by_user: bool = False

    @dataclass
    class HeaderClicked(Message):
        column: str

    def __init__(self, columns: Sequence[Column], cells_of: Callable[[Any], tuple[Cell, ...]],
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.columns = tuple(columns)
        self.cells_of = cells_of  # a row's figures -> its cells; called for rows on screen only
        self.order: list[str] = []  # route names, top to bottom
        self.rows: dict[str, Any] = {}
        self.cursor = 0
        self.sort_marks: dict[str, str] = {}
        self._cells: dict[str, tuple[Cell, ...]] = {}  # of the rows drawn so far
        self._lines: dict[tuple[str, bool, bool], Strip] = {}  # (route, cursor, odd) -> line
        self._styles: dict[str, Style] = {}
        self._base = (Style(), Style(), Style(), Style())
        self._x = [sum(c.width + 2 for c in self.columns[:i]) for i in range(len(self.columns) + 1)]

    # -- data ------------------------------------------------------------------------
    @property
    def selected(self) -> str | None:
        return self.order[self.cursor] if self.order else None

    def show(self, rows: dict[str, Any], order: list[str]) -> None:
        """New figures (comparable values, one a route) and order; repaint only the
        cells that changed on screen."""
        selected = self.selected
        changed = {name for name, row in rows.items() if self.rows.get(name) != row}
        gone = [n for n in self.rows if n not in rows]
        self.rows = dict(rows)
        if changed or gone:
            self._lines = {k: v for k, v in self._lines.items() if k[0] in rows and k[0] not in changed}
        if order != self.order:
            for name in (*changed, *gone):
                self._cells.pop(name, None)
            self.order = list(order)
            self.virtual_size = Size(self.size.width, len(self.order) + 1)
            self.cursor = self.order.index(selected) if selected in rows else min(
                self.cursor, max(len(self.order) - 1, 0))
            if self.size.height:
                self._cursor_into_view()
            self.refresh()
            if selected != self.selected:
                self.post_message(self.Selected(self.selected))
            return
        top = round(self.scroll_offset.y)
        for i in range(top, min(top + self.size.height - 1, len(self.order))):
            name = self.order[i]
            if name not in changed:
                continue
            old = self._cells.get(name)
            new = self._cells[name] = self.cells_of(rows[name])
            y = i - top + 1
            if old is None:
                self.refresh(Region(0, y, self.size.width, 1))
                continue
            for j, (a, b) in enumerate(zip(old, new, strict=True)):
                if a != b:
                    self.refresh(Region(self._x[j], y, self._x[j + 1] - self._x[j], 1))
        on_screen = set(self.order[top: top + self.size.height - 1])
        for name in changed - on_screen:
            self._cells.pop(name, None)

    def set_columns(self, columns: Sequence[Column], cells_of: Callable[[Any], tuple[Cell, ...]]) -> None:
        """Another layout of the same rows (a narrower or wider terminal)."""
        if tuple(columns) == self.columns:
            return
        self.columns, self.cells_of = tuple(columns), cells_of
        self._x = [sum(c.width + 2 for c in self.columns[:i]) for i in range(len(self.columns) + 1)]
        self._cells.clear()
        self._lines.clear()
        self.refresh()

    def set_sort_marks(self, marks: dict[str, str]) -> None:
        """Arrows beside column labels (column key -> mark)."""
        self.sort_marks = marks
        self.refresh(Region(0, 0, self.size.width, 1))

    # -- drawing ---------------------------------------------------------------------
    def _style(self, spec: str) -> Style:
        style = self._styles.get(spec)
        if style is None:
            style = self._styles[spec] = Style.parse(spec) if spec else Style()
        return style

    def _segments(self, cells: Sequence[Cell], base: Style) -> list[Segment]:
        out = []
        for (text, spec), col in zip(cells, self.columns, strict=True):
            text = text[: col.width]
            padded = text.ljust(col.width) if col.left else text.rjust(col.width)
            out.append(Segment(f" {padded} ", base + self._style(spec) if spec else base))
        return out

    def render_lines(self, crop: Region) -> list[Strip]:
        # the styles, once a repaint rather than once a line
        base = self.rich_style
        self._base = (base, base + self.get_component_rich_style("routes--header"),
                      self.get_component_rich_style("routes--odd"),
                      self.get_component_rich_style("routes--cursor"))
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base, header, odd, cursor = self._base
        if y == 0:
            style = header
            labels = [(c.label + self.sort_marks.get(c.key, ""), "") for c in self.columns]
            return Strip(self._segments(labels, style)).adjust_cell_length(width, style)
        i = round(self.scroll_offset.y) + y - 1
        if i >= len(self.order):
            return Strip.blank(width, base)
        name = self.order[i]
        key = (name, i == self.cursor and self.has_focus_within, i % 2 == 1)
        line = self._lines.get(key)
        if line is None or line.cell_length != width:
            style = base
            if key[2]:
                style += odd
            if key[1]:
                style += cursor
            cells = self._cells.get(name)
            if cells is None:
                cells = self._cells[name] = self.cells_of(self.rows[name])
            line = Strip(self._segments(cells, style)).adjust_cell_length(width, style)
            self._lines[key] = line
        return line

    def on_resize(self, event: events.Resize) -> None:
        self.virtual_size = Size(event.size.width, len(self.order) + 1)
        self._lines.clear()
        # a cursor moved before the first layout (or a smaller terminal) must come into view
        self.call_after_refresh(self._cursor_into_view)

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    # -- cursor ----------------------------------------------------------------------
    def move_to(self, index: int, user: bool = True) -> None:
        if not self.order:
            return
        index = max(0, min(index, len(self.order) - 1))
        old, self.cursor = self.cursor, index
        self._cursor_into_view()
        self.refresh()
        if old != index or user:
            self.post_message(self.Selected(self.selected, by_user=user))

    def _cursor_into_view(self) -> None:
        """Scroll only as far as needed to show the cursor's row."""
        visible = max(self.size.height - 1, 1)
        top = round(self.scroll_offset.y)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + visible:
            self.scroll_to(y=self.cursor - visible + 1, animate=False, immediate=True)

    def action_cursor(self, delta: int) -> None:
        self.move_to(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self.move_to(self.cursor + direction * max(self.size.height - 2, 1))

    def on_click(self, event: events.Click) -> None:
        if event.y == 0:
            x = 0
            for c in self.columns:
                x += c.width + 2
                if event.x < x:
                    self.post_message(self.HeaderClicked(c.key))
                    return
            return
        self.move_to(round(self.scroll_offset.y) + event.y - 1)
