"""Widgets more than one screen uses."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Checkbox, RadioButton, Static

from localtune.tui.fmt import gb

PART_STYLES = {
    "weights": "on #4c78a8",
    "adapter": "on #f58518",
    "activations": "on #54a24b",
    "logits": "on #b279a2",
    "overhead": "on #9d755d",
    "fragmentation": "on #79706e",
}
"""Background colour of each part of a memory estimate (localtune.memory.PART_LABELS)."""


def stacked_bar(parts: list[tuple[str, int]], budget: int, width: int) -> Text:
    """One line: each part a coloured run of cells, scaled so the larger of the total and the
    budget fills `width`; a '|' marks the budget. Over the budget the cells past it are red."""
    total = sum(n for _, n in parts)
    scale = max(total, budget, 1) / max(1, width)
    text = Text()
    used = 0.0
    cells = 0
    budget_cell = min(width - 1, int(round(budget / scale))) if budget else None
    for key, n in parts:
        used += n
        end = int(round(used / scale))
        for c in range(cells, end):
            over = budget_cell is not None and c >= budget_cell
            text.append("|" if c == budget_cell else " ", "on red" if over else PART_STYLES.get(key, "on grey50"))
        cells = max(cells, end)
    while cells < width:
        text.append("|" if cells == budget_cell else "·", "bold" if cells == budget_cell else "dim")
        cells += 1
    return text


class MemoryBar(Static):
    """Used memory against total (a device or RAM): '████░░░░ 10.2/24.0 GB'."""

    DEFAULT_CSS = "MemoryBar { height: 1; }"

    def __init__(self, used: int | None = None, total: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.used, self.total = used, total

    def set(self, used: int | None, total: int | None) -> None:
        self.used, self.total = used, total
        self.refresh()

    def render(self) -> Text:
        label = f" {gb(self.used)} / {gb(self.total)}" if self.total else " -"
        width = max(4, self.size.width - len(label))
        if not self.total or self.used is None:
            return Text("·" * width + label, "dim")
        share = min(1.0, self.used / self.total)
        full = int(round(share * width))
        style = "red" if share > 0.9 else ("yellow" if share > 0.75 else "green")
        return Text.assemble(("█" * full, style), ("░" * (width - full), "dim"), label)


class EstimateBar(Static):
    """A memory estimate as a stacked bar against the budget, with a legend and a verdict line
    ('fits: 6.1 GB of 21.8 GB' or, in red, 'over the budget by 2.3 GB')."""

    DEFAULT_CSS = "EstimateBar { height: auto; }"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.parts: list[tuple[str, int]] = []
        self.budget = 0

    def show(self, parts: list[tuple[str, int]], budget: int) -> None:
        self.parts, self.budget = list(parts), budget
        self.set_class(sum(n for _, n in parts) > budget, "over")
        self.refresh(layout=True)

    def render(self) -> Text:
        from localtune.memory import PART_LABELS

        if not self.parts:
            return Text("no estimate yet", "dim")
        total = sum(n for _, n in self.parts)
        width = max(10, self.size.width or 60)
        out = stacked_bar(self.parts, self.budget, width)
        out.append("\n")
        column = 0
        for key, n in self.parts:  # the legend, wrapped between items, never inside one
            item = f" {PART_LABELS.get(key, key)} {gb(n, 2)}  "
            if column and column + 2 + len(item) > width:
                out.append("\n")
                column = 0
            out.append("  ", PART_STYLES.get(key, ""))
            out.append(item)
            column += 2 + len(item)
        out.append("\n")
        if total > self.budget:
            out.append(f"over the budget by {gb(total - self.budget, 2)}: estimate {gb(total, 2)}, "
                       f"budget {gb(self.budget, 2)}", "bold red")
        else:
            out.append(f"fits: estimate {gb(total, 2)} of a {gb(self.budget, 2)} budget "
                       f"({gb(self.budget - total, 2)} to spare)", "green")
        return out


class Toggle(Checkbox):
    """A checkbox that shows its state by its mark, not by colour alone: `[X]` on, `[ ]` off
    (Textual's compact checkbox draws an X either way)."""

    @property
    def _button(self):
        self.BUTTON_INNER = "X" if self.value else " "
        return super()._button


class Choice(RadioButton):
    """A radio button that shows its state by its mark, not by colour alone: `(●)` chosen,
    `( )` not."""

    @property
    def _button(self):
        self.BUTTON_INNER = "●" if self.value else " "
        return super()._button
