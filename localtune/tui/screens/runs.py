"""The Runs screen (mode 3): every run under LOCALTUNE_HOME, newest first, with its method
(sft, dpo, orpo), state, progress, loss and age, and the keys that act on the highlighted run:
attach to its dashboard, resume, delete, export, chat, and on a completed sft run, continue
with DPO (the New run screen, prefilled to train that run's adapter on preference pairs).

The list is read from the run folders every `REFRESH_S` seconds in a thread (a summary reads
the run's whole event log) and posted back as a message; only the handler touches the table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from localtune.errors import UserError
from localtune.launch import delete_run
from localtune.runs import RunDir, list_runs
from localtune.tui import fmt
from localtune.tui.screens.confirm import ConfirmScreen

REFRESH_S = 2.0
NARROW_WIDTH = 100
"""Below this many columns the `started` column is left out: the run id begins with the same
date and time, and without it the table fits 80 columns. The `method` column is left out too:
a dpo or orpo run has its method after its id instead (an unmarked run is sft)."""
METHOD_STYLES = {"sft": "", "dpo": "magenta", "orpo": "magenta"}

STATE_STYLES = {
    "running": "bold green", "stopping": "yellow", "stopped": "yellow", "interrupted": "yellow",
    "failed": "bold red", "completed": "cyan", "created": "dim", "unreadable": "bold red",
}


class RunsRead(Message):
    """The runs' summaries, newest first, as the reader thread found them."""

    def __init__(self, summaries: list[dict[str, Any]]) -> None:
        super().__init__()
        self.summaries = summaries


def has_adapter(run: RunDir) -> bool:
    return (run.adapter_dir / "adapter_model.safetensors").is_file()


def no_adapter_reason(s: dict[str, Any]) -> str:
    """Why a run cannot be exported or chatted with yet, and what to do, in one line."""
    at = f"step {s['step']}" + (f" of {s['max_steps']}" if s.get("max_steps") else "")
    how = {
        "running": f"it is training ({at}); wait for it to complete",
        "stopping": f"it is stopping ({at}); press r to resume it once it has stopped",
        "stopped": f"it was stopped at {at}; press r to resume it",
        "interrupted": f"it was interrupted at {at}; press r to resume it",
        "failed": f"it failed at {at}; press enter to see why, then r to resume it",
        "created": "it has not started training; press r to start it",
    }.get(s["state"], f"its state is {s['state']} but its adapter folder is incomplete")
    return f"run {s['id']} has no adapter yet: {how}"


def read_summaries() -> list[dict[str, Any]]:
    """Every run's summary, newest first (run ids begin with the start time). A run deleted
    while being read is left out; one whose files cannot be read is listed as `unreadable`."""
    out = []
    for run in reversed(list_runs()):
        try:
            out.append(run.summary())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:  # a file it cannot open (a bad config.toml is the summary's own error)
            out.append({"id": run.id, "state": "unreadable", "step": 0, "max_steps": None, "loss": None,
                        "model": None, "data": None, "method": None, "from_run": None,
                        "started": None, "updated": None, "path": str(run.path),
                        "error": f"cannot read {run.path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"})
    return out


def _progress(s: dict[str, Any]) -> str:
    return f"{s['step']}/{s['max_steps'] or '?'}"


def continues_with_dpo(s: dict[str, Any] | None) -> bool:
    """Whether "continue with DPO" is offered for the run: a completed sft run (it has the
    adapter a DPO run goes on training)."""
    return bool(s) and s["state"] == "completed" and s.get("method") == "sft"


class RunsTable(DataTable):
    """The runs table; its enter (select the row) attaches, and the Footer says so."""

    BINDINGS = [Binding("enter", "select_cursor", "Attach", tooltip="open the run's dashboard")]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return None if action == "select_cursor" and self.row_count == 0 else True  # None: shown greyed


class RunsScreen(Screen):
    """A table of every run; `selected_run()` is the highlighted one."""

    BINDINGS = [
        Binding("r", "resume", "Resume", tooltip="go on from the newest checkpoint"),
        Binding("d", "delete", "Delete", tooltip="remove the run and its files (asks first)"),
        Binding("e", "export", "Export", tooltip="adapter, merged model or GGUF"),
        Binding("c", "chat", "Chat", tooltip="talk to the tuned model"),
        Binding("p", "continue_dpo", "Continue with DPO",
                tooltip="a new run that trains this completed sft run's adapter on preference pairs"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.summaries: dict[str, dict[str, Any]] = {}
        """The latest summary of each run, by run id, in table order (newest first)."""
        self._columns: tuple[str, ...] = ()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The keys that act on a run are greyed out while there is none."""
        if action in ("resume", "delete", "export", "chat") and not self.summaries:
            return None
        if action == "continue_dpo":  # offered for a completed sft run only: hidden otherwise
            return continues_with_dpo(self._selected_summary())
        return True

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("Runs", classes="title", id="runs-title")
        yield RunsTable(id="runs-table", cursor_type="row", zebra_stripes=True)
        yield Static("reading the runs ...", id="runs-empty", classes="dim")
        yield Static("", id="run-detail", classes="dim")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#runs-table").display = False
        self._timer = self.set_interval(REFRESH_S, self.read_runs)
        self.read_runs()

    def on_screen_resume(self) -> None:
        self._timer.resume()
        self.read_runs()  # coming back from a dashboard or another mode: show what changed meanwhile

    def on_screen_suspend(self) -> None:
        self._timer.pause()

    # ------------------------------------------------------------ reading

    @work(thread=True, exclusive=True, group="runs-read")
    def read_runs(self) -> None:
        self.post_message(RunsRead(read_summaries()))

    def on_runs_read(self, message: RunsRead) -> None:
        self.show(message.summaries)

    def _wanted_columns(self) -> tuple[str, ...]:
        narrow = self.size.width < NARROW_WIDTH
        return (("run",) + (() if narrow else ("method",)) + ("state", "step", "loss")
                + (() if narrow else ("started",)) + ("updated",))

    def _cells(self, s: dict[str, Any]) -> list[Any]:
        method = s.get("method")
        run: str | Text = s["id"]
        if "method" not in self._columns and method and method != "sft":
            run = Text.assemble(s["id"], " ", (method, METHOD_STYLES.get(method, "")))
        cells = {"run": run, "method": Text(method or "-", METHOD_STYLES.get(method or "", "")),
                 "state": Text(s["state"], STATE_STYLES.get(s["state"], "")),
                 "step": Text(_progress(s), justify="right"), "loss": Text(fmt.num(s["loss"]), justify="right"),
                 "started": fmt.when(s["started"]), "updated": fmt.age(s["updated"])}
        return [cells[c] for c in self._columns]

    def show(self, summaries: list[dict[str, Any]]) -> None:
        """Put `summaries` in the table, keeping the highlighted run highlighted."""
        table = self.query_one("#runs-table", DataTable)
        empty = self.query_one("#runs-empty", Static)
        selected = self.selected_run()
        old_ids = list(self.summaries)
        self.summaries = {s["id"]: s for s in summaries}
        table.display = bool(summaries)
        empty.display = not summaries
        empty.update("no runs yet; press 2 to start one")
        columns = self._wanted_columns()
        if columns != self._columns or list(self.summaries) != old_ids:
            self._columns = columns
            table.clear(columns=True)
            for column in columns:
                table.add_column(column, key=column)
            for s in summaries:
                table.add_row(*self._cells(s), key=s["id"])
            if selected is not None and selected.id in self.summaries:
                table.move_cursor(row=table.get_row_index(selected.id), animate=False)
        else:
            for s in summaries:
                for column, value in zip(self._columns, self._cells(s)):
                    table.update_cell(s["id"], column, value)
        if summaries and self.focused is None:
            table.focus()
        self._show_detail()
        self.refresh_bindings()

    def on_resize(self) -> None:
        if self.summaries and self._wanted_columns() != self._columns:
            self.show(list(self.summaries.values()))

    def on_data_table_row_highlighted(self) -> None:
        self._show_detail()
        self.refresh_bindings()  # "continue with DPO" comes and goes with the highlighted run

    def _show_detail(self) -> None:
        """The highlighted run's model and data (and the run a preference run continues), which
        the table has no room for."""
        s = self._selected_summary()
        detail = ""
        if s:
            detail = s.get("error") or f"model {s['model'] or '-'}  ·  data {s['data'] or '-'}"
            if not s.get("error") and s.get("from_run"):
                detail += f"  ·  continues run {s['from_run']}"
        self.query_one("#run-detail", Static).update(Text(detail, no_wrap=True, overflow="ellipsis"))

    # ------------------------------------------------------------ the highlighted run

    def selected_run(self) -> RunDir | None:
        """The highlighted run, or None when there are no runs."""
        table = self.query_one("#runs-table", DataTable)
        if not self.summaries or table.row_count == 0:
            return None
        row_key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        s = self.summaries.get(str(row_key.value))
        return RunDir(Path(s["path"])) if s else None

    def _selected_summary(self) -> dict[str, Any] | None:
        if not self.summaries:  # none read yet (the footer asks check_action before the first reading)
            return None
        run = self.selected_run()
        return self.summaries.get(run.id) if run else None

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_attach()

    def action_attach(self) -> None:
        """The dashboard shows a running run live and a finished one's history."""
        run = self.selected_run()
        if run is not None:
            self.app.open_dashboard(run)

    def action_resume(self) -> None:
        run = self.selected_run()
        if run is not None:
            self.notify(f"resuming run {run.id} ...", timeout=3)

            def started() -> None:
                self.read_runs()
                self.app.open_dashboard(run)

            self.app.resume(run, then=started)

    def action_delete(self) -> None:
        run = self.selected_run()
        if run is None:
            return
        if run.live_worker_pid() is not None:
            self.app.notify_error(f"run {run.id} is training; stop it from its dashboard (enter) before deleting it")
            return

        def answered(answer: str | None) -> None:
            if answer != "delete":
                return
            try:
                delete_run(run)
            except UserError as e:
                self.app.notify_error(e)
                return
            self.notify(f"deleted run {run.id}")
            self.read_runs()

        self.app.push_screen(ConfirmScreen(f"delete run {run.id} and its checkpoints, adapter and exports?",
                                           [("cancel", "Cancel"), ("delete", "Delete")], danger="delete"),
                             answered)

    def _run_with_adapter(self) -> RunDir | None:
        run = self.selected_run()
        if run is None:
            return None
        if self.summaries[run.id]["state"] == "unreadable":  # export and chat read its config.toml
            self.app.notify_error(self.summaries[run.id]["error"])
            return None
        if not has_adapter(run):
            self.app.notify_error(no_adapter_reason(self.summaries[run.id]))
            return None
        return run

    def action_export(self) -> None:
        run = self._run_with_adapter()
        if run is not None:
            self.app.open_export(run)

    def action_chat(self) -> None:
        run = self._run_with_adapter()
        if run is not None:
            self.app.open_chat(run)

    async def action_continue_dpo(self) -> None:
        """Open the New run screen prefilled to continue the highlighted completed sft run with
        DPO: its model, method dpo, and from_run = its id; Start there launches it."""
        s = self._selected_summary()
        if not continues_with_dpo(s):
            if s:
                self.app.notify_error(f"run {s['id']} is {s.get('method') or '?'} and {s['state']}: only a completed "
                                      "sft run can be continued with DPO")
            return
        from localtune.tui.screens.new_run import NewRunScreen

        await self.app.switch_mode("new")
        screen = self.app.screen_stack[0]
        if isinstance(screen, NewRunScreen):
            screen.continue_from(s["id"], s["model"])
