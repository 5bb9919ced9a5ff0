"""`?`: the keys of the screen underneath, in two groups (this screen, everywhere)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Static


def key_rows(screen: Screen) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(this screen's keys, the app's keys) as (key, what it does): the keys the footer shows
    (a widget's own navigation keys, such as arrows in a table, are left out)."""
    app = screen.app
    here: list[tuple[str, str]] = []
    everywhere: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, active in screen.active_bindings.items():
        b = active.binding
        if not b.show or not b.description or b.description in seen:
            continue
        seen.add(b.description)
        shown = b.key_display or app.get_key_display(b)
        what = f"{b.description}: {b.tooltip}" if b.tooltip else b.description
        (everywhere if active.node is app else here).append((shown, what))
    return here, everywhere


class KeysScreen(ModalScreen[None]):
    """The keys that work on `screen`; any of escape, ? or q closes it."""

    BINDINGS = [Binding("escape,question_mark,q,f1", "close", "Close")]

    def __init__(self, screen: Screen) -> None:
        super().__init__()
        self.target = screen

    def compose(self) -> ComposeResult:
        here, everywhere = key_rows(self.target)
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", justify="right")
        table.add_column()
        title = getattr(self.target, "KEYS_TITLE", None) or type(self.target).__name__.removesuffix("Screen")
        for heading, rows in ((f"On this screen ({title})", here), ("Everywhere", everywhere)):
            if rows:
                table.add_row("", Text(heading, "bold underline"))
                for key, what in rows:
                    table.add_row(key, what)
                table.add_row("", "")
        table.add_row("", Text("escape or ? closes this", "dim"))
        with VerticalScroll(id="keys-box"):
            yield Static(table)

    def action_close(self) -> None:
        self.dismiss(None)
