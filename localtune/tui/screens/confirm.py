"""A modal question with a few answers; dismisses with the chosen answer's id (None: cancel)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, answers: list[tuple[str, str]], *, danger: str | None = None) -> None:
        """`answers`: (id, label) pairs, the first one focused; `danger`: the id shown in red."""
        super().__init__()
        self.question, self.answers, self.danger = question, answers, danger

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(self.question, id="confirm-question")
            with Horizontal(id="confirm-buttons"):
                for key, label in self.answers:
                    yield Button(label, id=f"answer-{key}", variant="error" if key == self.danger else "default")

    def on_mount(self) -> None:
        self.query(Button).first().focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id.removeprefix("answer-"))

    def action_cancel(self) -> None:
        self.dismiss(None)


def resume_anyway(run_id: str, changes: list[str]) -> ConfirmScreen:
    """The question when a run's model or data changed since it began (answer 'force' resumes)."""
    why = "; ".join(changes)
    return ConfirmScreen(f"Resume run {run_id} anyway?\n\n{why[:1].upper() + why[1:]}. Going on would train the "
                         "rest of the run on something other than its first part.",
                         [("cancel", "Cancel"), ("force", "Resume anyway")], danger="force")
