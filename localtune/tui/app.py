"""The Textual app: three top-level modes (Machine, New run, Runs) and the per-run screens
(Dashboard, Export, Chat) pushed on top of them."""

from __future__ import annotations

from typing import Any, Callable

from textual import work
from textual.app import App
from textual.binding import Binding

from localtune.hardware import Hardware, probe
from localtune.runs import RunDir, list_runs


def _screen(path: str):
    """A new instance of the screen class at 'module:Class'."""
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)()


class LocaltuneApp(App[int]):
    CSS_PATH = "styles.tcss"
    TITLE = "localtune"
    # Textual reads a string here as the name of an installed screen, not an import path,
    # so each mode gets a callable that imports its screen when the mode is first shown.
    MODES = {
        "machine": lambda: _screen("localtune.tui.screens.machine:MachineScreen"),
        "new": lambda: _screen("localtune.tui.screens.new_run:NewRunScreen"),
        "runs": lambda: _screen("localtune.tui.screens.runs:RunsScreen"),
    }
    DEFAULT_MODE = "machine"
    BINDINGS = [
        Binding("1", "switch_mode('machine')", "Machine"),
        Binding("2", "switch_mode('new')", "New run"),
        Binding("3", "switch_mode('runs')", "Runs"),
        Binding("question_mark", "toggle_keys", "Keys", key_display="?"),
        # F1 works in a text field too, where ? is typed
        Binding("f1", "toggle_keys", "Keys", show=False, priority=True),
        Binding("q", "quit_app", "Quit", tooltip="training runs go on unless you stop them"),
        Binding("ctrl+q", "quit_app", "Quit", show=False, priority=True),
    ]
    ENABLE_COMMAND_PALETTE = False

    def __init__(self, *, hardware: Hardware | None = None, open_run: str | None = None,
                 mode: str | None = None) -> None:
        """`hardware`: what the probe found (tests pass a fixed one); `open_run`: a run to show
        on its dashboard at once; `mode`: the first mode instead of the Machine screen."""
        super().__init__()
        self.hardware = hardware or probe()
        self._open_run = open_run
        self._first_mode = mode

    def get_default_screen(self):  # pragma: no cover - MODES decide; kept for Textual's API
        return super().get_default_screen()

    def on_mount(self) -> None:
        if self._first_mode:
            self.switch_mode(self._first_mode)
        if self._open_run:
            from localtune.runs import find_run

            self.open_dashboard(find_run(self._open_run))

    # ------------------------------------------------------------ per-run screens

    def open_dashboard(self, run: RunDir) -> None:
        from localtune.tui.screens.dashboard import DashboardScreen

        self.push_screen(DashboardScreen(run))

    def open_export(self, run: RunDir) -> None:
        from localtune.tui.screens.export import ExportScreen

        self.push_screen(ExportScreen(run))

    def open_chat(self, run: RunDir) -> None:
        from localtune.tui.screens.chat import ChatScreen

        self.push_screen(ChatScreen(run))

    # ------------------------------------------------------------ resuming (Runs and Dashboard)

    def resume(self, run: RunDir, *, then: Callable[[], None] | None = None) -> None:
        """Resume `run` in a thread (checking the model and data reads the data file); when
        they changed since the run began, ask before a forced resume. `then()` runs once the
        worker has started; a refusal is one line."""
        self._resume(run, then, False)

    @work(thread=True, exclusive=True, group="resume")
    def _resume(self, run: RunDir, then: Callable[[], None] | None, force: bool) -> None:
        from localtune.errors import UserError
        from localtune.launch import RunInputsChanged, resume_run

        try:
            _, where = resume_run(run, force=force)
        except RunInputsChanged as e:
            self.call_from_thread(self._ask_resume_anyway, run, e.changes, then)
        except UserError as e:
            self.call_from_thread(self.notify_error, e)
        else:
            self.call_from_thread(self._resumed, run, where, then)

    def _resumed(self, run: RunDir, where: str, then: Callable[[], None] | None) -> None:
        self.notify(f"resumed run {run.id} {where}")
        if then is not None:
            then()

    def _ask_resume_anyway(self, run: RunDir, changes: list[str], then: Callable[[], None] | None) -> None:
        from localtune.tui.screens.confirm import resume_anyway

        def answered(answer: str | None) -> None:
            if answer == "force":
                self._resume(run, then, True)

        self.push_screen(resume_anyway(run.id, changes), answered)

    # ------------------------------------------------------------ keys, quitting

    def action_toggle_keys(self) -> None:
        from localtune.tui.screens.keys import KeysScreen

        if isinstance(self.screen, KeysScreen):
            self.screen.dismiss(None)
        else:
            self.push_screen(KeysScreen(self.screen))

    def training_runs(self) -> list[RunDir]:
        """Runs whose worker is alive now."""
        return [r for r in list_runs() if r.live_worker_pid() is not None]

    def action_quit_app(self) -> None:
        """Quit; a training worker goes on unless the person asks to stop it."""
        live = self.training_runs()
        if not live:
            self.exit(0)
            return
        from localtune.tui.screens.confirm import ConfirmScreen

        names = ", ".join(r.id for r in live[:3]) + (" ..." if len(live) > 3 else "")
        what = "is" if len(live) == 1 else "are"
        question = (f"{len(live)} run{'s' if len(live) > 1 else ''} {what} training: {names}.\n"
                    "Training goes on in the background if you quit; reattach with `localtune`.")

        def answered(answer: str | None) -> None:
            if answer == "leave":
                self.exit(0)
            elif answer == "stop":
                from localtune.errors import UserError
                from localtune.launch import request_stop

                for r in live:
                    try:
                        request_stop(r)
                    except UserError:
                        pass  # it ended on its own meanwhile
                self.exit(0)

        self.push_screen(ConfirmScreen(question, [("leave", "Quit, keep training"), ("stop", "Stop and quit"),
                                                  ("cancel", "Cancel")], danger="stop"), answered)

    def notify_error(self, message: Any) -> None:
        """A person's mistake or a refused action: one line, shown as an error toast."""
        self.notify(str(message), severity="error", timeout=8)
