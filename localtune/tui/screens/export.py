"""The Export screen of one run: pick a format (adapter, merged, GGUF f16 or q8_0), an Ollama
Modelfile for GGUF, and a destination; export; then see what the export's own check measured.

`export_run` (seconds for the built-in model, minutes for a 7B merge) runs in a thread and
reports its stages as `ExportProgress` messages; only the handlers touch widgets. A UserError
(the destination exists, ...) is shown as one red line and the form stays usable.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Input, ProgressBar, RadioSet, Static

from localtune.errors import UserError
from localtune.export import ExportResult, default_destination, export_run, human_size
from localtune.runs import RunDir
from localtune.tui.widgets import Choice, Toggle

CHOICES = {
    # radio id: (label, format, quant, what it is)
    "adapter": ("adapter", "adapter", None,
                "the LoRA adapter alone (megabytes): PEFT loads it onto the base model"),
    "merged": ("merged", "merged", None,
               "base + adapter as one 16-bit Hugging Face model, as large as the base"),
    "gguf-f16": ("GGUF f16", "gguf", "f16",
                 "one 16-bit file for llama.cpp and Ollama, as large as the merged model"),
    "gguf-q8_0": ("GGUF q8_0", "gguf", "q8_0",
                  "one 8-bit file for llama.cpp and Ollama, about half the size of f16"),
}


def destination_problem(dest: str, force: bool) -> str | None:
    """What is wrong with `dest`, in this screen's words (export_run would refuse it too, in
    the CLI's: '--force', '--out')."""
    if not dest:
        return "choose a destination folder to write the export into"
    path = Path(dest).expanduser()
    if path.exists() and not path.is_dir():
        return f"{dest} is a file; choose a folder to write the export into"
    if path.exists() and not force:
        return f"{dest} already exists; tick 'replace it if it exists', or choose another destination"
    return None


class ExportProgress(Message):
    """export_run's progress(stage, done, total); total 0: no count."""

    def __init__(self, stage: str, done: int, total: int) -> None:
        super().__init__()
        self.stage, self.done, self.total = stage, done, total

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, ExportProgress)


class ExportEnded(Message):
    """The export finished (`result`) or was refused (`error`, one line)."""

    def __init__(self, result: ExportResult | None = None, error: str | None = None) -> None:
        super().__init__()
        self.result, self.error = result, error


def _rows(pairs: list[tuple[str, str]]) -> Text:
    """Indented two-column lines, the first column padded to its widest entry."""
    width = max((len(a) for a, _ in pairs), default=0)
    return Text("\n".join(f"  {a.ljust(width)}  {b}" for a, b in pairs))


def result_view(result: ExportResult) -> Text:
    """What was written and what the check measured, in `localtune export`'s words."""
    kind = f"gguf ({result.quant})" if result.quant else result.format
    out = Text.assemble(("✓ ", "bold green"), (f"exported as {kind} in {result.seconds:.1f} s: ", "bold"),
                        str(result.path), "\n")
    out.append_text(_rows([(str(f.relative_to(result.path)), human_size(f.stat().st_size)) for f in result.files]))
    out.append("\nchecked\n", "bold green")
    out.append_text(_rows([(k, json.dumps(v) if isinstance(v, str) else str(v)) for k, v in result.checks.items()]))
    for n in result.notes:
        out.append(f"\nnote: {n}", "yellow")
    if result.ollama_command:
        out.append("\nto use it with Ollama:\n", "bold")
        out.append(f"  {result.ollama_command}")
    return out


class ExportScreen(Screen):
    """Export `run`; the form's widgets: #formats (#fmt-adapter, #fmt-merged, #fmt-gguf-f16,
    #fmt-gguf-q8_0), #ollama, #force, #dest, #export; then #export-error or #export-result."""

    BINDINGS = [Binding("escape", "back", "Back")]

    def __init__(self, run: RunDir) -> None:
        super().__init__()
        self.run = run
        self.exporting = False
        self.result: ExportResult | None = None
        """The last export's result (files, checks), once one finished."""
        self._default_dest = str(default_destination(run, "adapter", None))

    def compose(self) -> ComposeResult:
        yield Static(Text.assemble(("Export ", "bold"), ("run ", ""), (self.run.id, "bold")), id="export-title")
        with Vertical(id="export-form", classes="section") as form:
            form.border_title = "format"
            with RadioSet(id="formats", compact=True):
                for key, (label, *_) in CHOICES.items():
                    yield Choice(label, id=f"fmt-{key}", value=key == "adapter", compact=True)
            yield Static(CHOICES["adapter"][3], id="fmt-help", classes="dim")
            with Horizontal(id="export-options"):
                yield Toggle("Ollama Modelfile", id="ollama", compact=True, disabled=True,
                               tooltip="GGUF only: a Modelfile beside the file, for `ollama create`")
                yield Toggle("replace it if it exists", id="force", compact=True)
            with Horizontal(id="dest-row"):
                yield Static("to ", classes="dim")
                yield Input(self._default_dest, id="dest", compact=True, placeholder="a folder to write")
        with Horizontal(id="export-row"):
            yield Button("Export", id="export", variant="primary", compact=True)
            yield Static("", id="export-stage", classes="dim")
        yield ProgressBar(id="export-progress", show_eta=False)
        yield Static("", id="export-error", classes="error")
        with VerticalScroll(id="export-result"):
            yield Static("", id="export-result-text")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#export-progress").display = False
        self.query_one("#formats").focus()

    def choice(self) -> tuple[str, str | None]:
        """The chosen (format, quant)."""
        pressed = self.query_one("#formats", RadioSet).pressed_button
        key = pressed.id.removeprefix("fmt-") if pressed and pressed.id else "adapter"
        return CHOICES[key][1], CHOICES[key][2]

    def on_radio_set_changed(self, event: RadioSet.Changed) -> None:
        key = event.pressed.id.removeprefix("fmt-")
        fmt, quant = self.choice()
        self.query_one("#fmt-help", Static).update(CHOICES[key][3])
        self.query_one("#ollama", Checkbox).disabled = fmt != "gguf"
        dest = self.query_one("#dest", Input)
        if dest.value == self._default_dest:  # the person has not typed a destination of their own
            self._default_dest = dest.value = str(default_destination(self.run, fmt, quant))
        else:
            self._default_dest = str(default_destination(self.run, fmt, quant))

    # ------------------------------------------------------------ exporting

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "export":
            self.start_export()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "dest":
            self.start_export()

    def start_export(self) -> None:
        if self.exporting:
            return
        fmt, quant = self.choice()
        ollama = fmt == "gguf" and self.query_one("#ollama", Checkbox).value
        force = self.query_one("#force", Checkbox).value
        dest = self.query_one("#dest", Input).value.strip()
        error = self.query_one("#export-error", Static)
        problem = destination_problem(dest, force)
        error.update(problem or "")
        if problem:
            return
        self.query_one("#export-result-text", Static).update("")
        self._set_busy(True)
        self.export(fmt, quant, dest, force, ollama)

    def _set_busy(self, busy: bool) -> None:
        self.exporting = busy
        self.query_one("#export-form").disabled = busy
        self.query_one("#export", Button).disabled = busy
        bar = self.query_one("#export-progress", ProgressBar)
        bar.display = busy
        bar.update(total=None, progress=0)
        self.query_one("#export-stage", Static).update("starting ..." if busy else "")

    @work(thread=True, exclusive=True, group="export")
    def export(self, fmt: str, quant: str | None, dest: str, force: bool, ollama: bool) -> None:
        """Seconds to minutes: a merge loads the base model twice; GGUF adds the conversion."""
        def progress(stage: str, done: int, total: int) -> None:
            self.post_message(ExportProgress(stage, done, total))

        try:
            result = export_run(self.run, fmt, quant=quant, out=dest, force=force, ollama=ollama, progress=progress)
        except UserError as e:
            self.post_message(ExportEnded(error=str(e)))
        else:
            self.post_message(ExportEnded(result=result))

    def on_export_progress(self, message: ExportProgress) -> None:
        if not self.exporting:
            return
        counted = f" {message.done}/{message.total}" if message.total else ""
        self.query_one("#export-stage", Static).update(f"{message.stage}{counted} ...")
        self.query_one("#export-progress", ProgressBar).update(total=message.total or None, progress=message.done)

    def on_export_ended(self, message: ExportEnded) -> None:
        self._set_busy(False)
        self.query_one("#export", Button).focus()
        if message.error:
            self.query_one("#export-error", Static).update(message.error)
            return
        self.result = message.result
        self.query_one("#export-result-text", Static).update(result_view(message.result))
        self.query_one("#export-result").scroll_home(animate=False)

    def action_back(self) -> None:
        if self.exporting:
            self.app.notify_error("the export is still running; it cannot stop halfway: wait for it to finish")
            return
        self.dismiss()
