"""The New run screen (key 2): pick a model and a dataset, see the plan that fits this
machine, change the knobs that matter most, and start training.

Slow work runs in threads that post messages back (threads never touch widgets): resolving
the model (a hub id fetches its config.json), checking every row of the data, rendering one
example with the model's chat template (loading the tokenizer takes about a second; the
first time, the built-in model is converted, ~20 s), and writing the run folder (prepare_run
reads every row again). Each message carries what it was asked for, so a late answer to an
earlier question is dropped. Planning is arithmetic (milliseconds), so every knob change
re-plans at once on the UI thread.

Knobs the person edits are pinned: the planner never changes them; emptying a field unpins
its knob again. With the demo data the demo recipe (`launch.DEMO_RECIPE`) is pinned under
the person's own choices, as `localtune train` does.

The method (sft, dpo, orpo) is a knob like the others; dpo and orpo also offer `beta`. With a
preference method an empty data field means the preference demo set (`preference_demo_path`).
The Runs screen's "continue with DPO" opens this screen through `continue_from`: the model of
a completed sft run, method dpo, and `from_run` = that run, which Start writes into [run].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Checkbox, DirectoryTree, Footer, Header, Input, Label, Select, Static

from localtune.data import (CONVERSATION, DEMO, FILE_SUFFIXES, LoadedData, PreferenceExample, chat_template_for,
                            fetch_hub_dataset, load_data, pair_texts, render, tokenize_pairs)
from localtune.engines import require_engine
from localtune.errors import UserError
from localtune.knobs import KNOB_FIELDS, METHOD_ONLY_KNOBS, METHODS
from localtune.data import DEMO_PREFERENCE_EVAL, DEMO_PREFERENCE_PARROT_EVAL
from localtune.launch import (DEMO_RECIPE, LORA_KNOBS, PREFERENCE_DEMO_RECIPE, SFT_THEN_DPO_DEMO_RECIPE, default_run_config, prepare_run,
                              start_worker)
from localtune.models import BUILTIN_NAME, ModelRef, builtin_model_dir, load_tokenizer, resolve_model
from localtune.plan import Plan, make_plan, max_context
from localtune.profiles import BITSANDBYTES_BACKENDS
from localtune.progress import PREFERENCE_METHODS, download_line
from localtune.runs import RunDir
from localtune.tui.fmt import gb
from localtune.tui.widgets import EstimateBar, Toggle

NUMBER_KNOBS = {
    "knob-r": ("r", "rank"),
    "knob-micro-batch": ("per_device_train_batch_size", "micro-batch"),
    "knob-max-length": ("max_length", "max length"),
    "knob-max-steps": ("max_steps", "max steps"),
}
"""Integer knobs the screen edits: widget id -> (knob, label)."""
SWITCH_KNOBS = {
    "knob-4bit": ("load_in_4bit", "4-bit base weights"),
    "knob-gc": ("gradient_checkpointing", "gradient checkpointing"),
}
"""On/off knobs the screen edits: widget id -> (knob, label)."""
ENGINE_CHOICES = {"mlx": "mlx", "torch": "torch (MPS)"}
"""The engines a Mac offers (the `engine` knob); elsewhere torch is the only one worth training on."""
DATA_PLACEHOLDERS = {"sft": "demo, or a path to your data",
                     "preference": "empty: the preference demo set; or a path to pairs"}
EXAMPLE_LINES = 6
EXAMPLE_CHARS = 480
PROBLEMS_SHOWN = 5
KIND_NAMES = {"folder": "local folder", "gguf": "GGUF file", "hub": "Hugging Face hub"}


# ---------------------------------------------------------------- messages from the threads


class ModelResolved(Message):
    def __init__(self, spec: str, model: ModelRef | None, error: str | None) -> None:
        super().__init__()
        self.spec, self.model, self.error = spec, model, error


class DataLoaded(Message):
    def __init__(self, source: str, loaded: LoadedData | None, error: str | None) -> None:
        super().__init__()
        self.source, self.loaded, self.error = source, loaded, error


class DataDownload(Message):
    """A hub dataset's files coming in (localtune.download's report, as a `download` event's
    fields) while `source` is being checked."""

    def __init__(self, source: str, event: dict[str, Any]) -> None:
        super().__init__()
        self.source, self.event = source, event


class ExampleRendered(Message):
    def __init__(self, key: tuple[str, str], example: Text | None, error: str | None) -> None:
        super().__init__()
        self.key, self.example, self.error = key, example, error


class RunPrepared(Message):
    def __init__(self, run: RunDir | None, warnings: list[str], error: str | None) -> None:
        super().__init__()
        self.run, self.warnings, self.error = run, warnings, error


# ---------------------------------------------------------------- plain helpers


def find_run_config(run_id: str) -> dict[str, Any]:
    """config.toml of run `run_id` (the one a DPO run continues)."""
    from localtune.runs import find_run

    return find_run(run_id).read_config()


def preference_demo_path(parrot: bool = False) -> Path | None:
    """The preference demo set shipped with localtune (`localtune.demo.preference_dataset_path`;
    `parrot`: the same pairs in the SFT demo's voice, for a run that continues the SFT demo),
    or None in an install that does not have it yet. The one place this screen names them."""
    from localtune import demo

    path = Path(demo.parrot_preference_dataset_path() if parrot else demo.preference_dataset_path())
    return path if path.is_file() else None


def is_preference_demo(source: str) -> bool:
    """Whether `source` is one of the preference demo sets."""
    return any(p is not None and source == str(p) for p in (preference_demo_path(), preference_demo_path(True)))


def parse_beta(raw: str) -> tuple[float | None, str | None]:
    """(value, None) for a well-formed `beta`, else (None, a one-line message)."""
    meta = KNOB_FIELDS["beta"].metadata
    wanted = f"beta: a number from {meta['lo']:g} to {meta['hi']:g}"
    try:
        value = float(raw)
    except ValueError:
        return None, f"{wanted}; got {raw!r}"
    if not meta["lo"] <= value <= meta["hi"]:
        return None, f"{wanted}; got {value:g}"
    return value, None


def parse_knob(knob: str, label: str, raw: str) -> tuple[int | None, str | None]:
    """(value, None) for a well-formed integer knob, else (None, a one-line message)."""
    meta = KNOB_FIELDS[knob].metadata
    lo, hi = int(meta["lo"]), int(meta["hi"])
    if knob == "max_steps":
        wanted = f"{label}: a whole number of optimizer steps, or -1 to run one epoch"
    else:
        wanted = f"{label}: a whole number from {lo} to {hi}"
    try:
        value = int(raw)
    except ValueError:
        return None, f"{wanted}; got {raw!r}"
    if not lo <= value <= hi or (knob == "max_steps" and value == 0):
        return None, f"{wanted}; got {value}"
    return value, None


def marked_example(text: str, spans: list[tuple[int, int]]) -> Text:
    """The rendered example with the trained parts in green between « and » (as `data
    inspect` shows it), cut to a few lines."""
    out = Text()
    pos = 0
    for a, b in spans:
        out.append(text[pos:a], "dim")
        out.append("«" + text[a:b] + "»", "bold green")
        pos = b
    out.append(text[pos:], "dim")
    plain = out.plain
    cut = EXAMPLE_CHARS
    end_of_line = -1
    for _ in range(EXAMPLE_LINES):
        end_of_line = plain.find("\n", end_of_line + 1)
        if end_of_line < 0:
            break
    else:
        cut = min(cut, end_of_line)
    if cut < len(plain.rstrip()):
        out.right_crop(len(plain) - cut)
        out.append(" …", "dim")
    return out


def short_where(where: str, loaded_source: str, shown: str) -> str:
    """'bad.jsonl:3' instead of the full path of the file (which is in the field above)."""
    return shown + where[len(loaded_source):] if where.startswith(loaded_source) else where


def knob_table(plan: Plan, recipe: Iterable[str] = ()) -> Table:
    """Every knob, its value and where the value came from; `recipe`: the pinned knobs that
    the demo recipe set, not the person."""
    table = Table(box=None, expand=True, padding=(0, 1), show_edge=False, header_style="bold")
    table.add_column("knob", no_wrap=True)
    table.add_column("value", no_wrap=True, overflow="ellipsis", ratio=1)
    table.add_column("from", no_wrap=True, overflow="ellipsis", ratio=1)
    values = plan.knobs.to_dict()
    sources = plan.knob_sources()
    for knob in recipe:
        if sources.get(knob) == "set by you":
            sources[knob] = "demo recipe"
    for knob, methods in METHOD_ONLY_KNOBS.items():
        if plan.knobs.method not in methods:
            sources.pop(knob, None)  # beta and loss_type mean nothing to an sft run
    for knob, source in sources.items():
        style = "bold" if source == "set by you" else "yellow" if source.startswith("planner") else ""
        table.add_row(knob, knob_text(values[knob]), source, style=style)
    return table


def knob_text(value: Any) -> str:
    """A knob's value as config.toml would spell it: true, 0.0002, q_proj, k_proj."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


def _first_lines(message: str, n: int = 8) -> str:
    lines = message.splitlines()
    return "\n".join(lines[:n] + ([f"... ({len(lines) - n} more lines)"] if len(lines) > n else []))


# ---------------------------------------------------------------- the file picker


class DataFileTree(DirectoryTree):
    """Folders and data files only; hidden entries left out."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".")
                and (p.is_dir() or p.suffix.lower() in FILE_SUFFIXES)]


class DataFilePicker(ModalScreen[str | None]):
    """Browse for a data file; dismisses with its path (None: cancelled)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("backspace", "up", "Parent folder")]

    def __init__(self, start: Path) -> None:
        super().__init__()
        self.start = start

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-box"):
            yield Static(f"Pick a data file ({' '.join(FILE_SUFFIXES)}): enter picks, backspace goes up a "
                         "folder, escape cancels", id="picker-help")
            yield DataFileTree(self.start, id="picker-tree")

    def on_mount(self) -> None:
        self.query_one(DataFileTree).focus()

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(str(event.path))

    def action_up(self) -> None:
        tree = self.query_one(DataFileTree)
        tree.path = Path(tree.path).resolve().parent

    def action_cancel(self) -> None:
        self.dismiss(None)


# ---------------------------------------------------------------- the screen


class NewRunScreen(Screen):
    """Model, data, plan, start."""

    SUB_TITLE = "New run"
    AUTO_FOCUS = "#new-run"  # the scroll, not a field: the mode keys (1 2 3) and s keep working
    BINDINGS = [
        Binding("ctrl+s", "start", "Start", priority=True),
        Binding("s", "start", "Start", show=False),
        Binding("ctrl+o", "browse", "Data file"),
        Binding("escape", "leave_field", "Leave field", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.model: ModelRef | None = None
        self.model_error: str | None = None
        self._model_pending = True
        self.data: LoadedData | None = None
        self.data_error: str | None = None
        self.plan: Plan | None = None
        """The current plan (None until the model is resolved, or when no profile matches)."""
        self.plan_error: str | None = None
        self.user_pinned: dict[str, Any] = {}
        """Knobs the person set on this screen."""
        self.knob_errors: dict[str, str] = {}
        self.starting = False
        self._model_spec = BUILTIN_NAME
        self._data_source = DEMO
        self._example_key: tuple[str, str] | None = None
        self._tokenizers: dict[str, Any] = {}
        """(tokenizer, chat template) by model location, filled by the example thread."""
        self.method = "sft"
        self.from_run: str | None = None
        self._from_data: str | None = None
        """The data of the run `from_run` (the SFT demo's `demo`: the preference demo in its voice)."""
        self._loaded_for = "sft"
        self._from_lora: dict[str, Any] = {}
        """The completed run whose adapter this run continues ("continue with DPO" on the Runs screen)."""
        self._from_model: str | None = None
        """That run's model: another model cannot carry its adapter."""

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="new-run"):
            with Vertical(classes="section", id="model-box") as box:
                box.border_title = "Model"
                box.border_subtitle = "built-in · a folder · a .gguf file · a Hugging Face id; enter applies"
                yield Input(BUILTIN_NAME, id="model-input", compact=True,
                            placeholder="smollm2-135m, ./my-model, model.gguf or owner/name")
                yield Static("", id="model-status", classes="hide-empty")
                yield Static("", id="from-run", classes="hide-empty")
            with Vertical(classes="section", id="data-box") as box:
                box.border_title = "Data"
                box.border_subtitle = f"demo · {' '.join(FILE_SUFFIXES)} · a folder · a hub id; enter applies"
                with Horizontal(id="data-row"):
                    yield Input(DEMO, id="data-input", compact=True, placeholder="demo, or a path to your data")
                    yield Button("Browse…", id="data-browse", compact=True)
                yield Static("", id="data-summary", classes="hide-empty")
                yield Static("", id="data-problems", classes="error hide-empty")
                yield Toggle("leave the bad rows out (--skip-bad-rows)", id="data-skip-bad", compact=True,
                               classes="hide-empty")
                yield Static("", id="data-example", classes="hide-empty")
            with Vertical(classes="section", id="plan-box") as box:
                box.border_title = "Plan"
                with Horizontal(id="method-row"):
                    yield Label("method", classes="knob-label")
                    yield Select([(m, m) for m in METHODS], value="sft", allow_blank=False, compact=True,
                                 id="knob-method", tooltip="sft: answers to learn; dpo, orpo: preference pairs")
                    yield Label("beta", classes="knob-label beta")
                    yield Input(id="knob-beta", type="number", compact=True, classes="knob-input beta")
                    yield Label("engine", classes="knob-label engine")
                    yield Select([(label, e) for e, label in ENGINE_CHOICES.items()], value="mlx", allow_blank=False,
                                 compact=True, id="knob-engine", classes="engine",
                                 tooltip="mlx: Apple's MLX, 4-bit on the GPU; torch: PyTorch on MPS, 16-bit only")
                with Horizontal(id="knob-row"):
                    for wid, (_, label) in NUMBER_KNOBS.items():
                        yield Label(label, classes="knob-label")
                        yield Input(id=wid, type="integer", compact=True, classes="knob-input")
                with Horizontal(id="switch-row"):
                    for wid, (_, label) in SWITCH_KNOBS.items():
                        toggle = Toggle(label, id=wid, compact=True)
                        yield toggle
                yield Static("", id="knob-error", classes="error hide-empty")
                yield EstimateBar(id="estimate")
                yield Static("", id="plan-advice", classes="hide-empty")
                yield Static("", id="plan-context", classes="hide-empty")
                yield Static("", id="plan-profile", classes="hide-empty")
                yield Static("", id="plan-adjustments", classes="hide-empty")
                yield Static("", id="plan-table", classes="hide-empty")
        with Horizontal(id="start-bar"):
            yield Button("Start training", id="start", variant="success", compact=True)
            yield Static("", id="start-note")
        yield Footer(compact=True)

    def show(self, selector: str, content: str | Text | Table) -> None:
        """Update a Static and hide it while it is empty (an empty line would waste a row)."""
        widget = self.query_one(selector, Static)
        widget.update(content)
        widget.display = bool(content.row_count if isinstance(content, Table) else content)

    def on_mount(self) -> None:
        for widget in self.query(".beta"):
            widget.display = False
        for widget in self.query(".engine"):  # only a Mac has two engines to choose from
            widget.display = self.app.hardware.backend == "mps"
        self._resolve(self._model_spec)
        self._load(self._data_source)
        self._refresh_all()

    # ------------------------------------------------------------ model

    def _resolve(self, spec: str) -> None:
        self._model_spec = spec
        self.model_error, self._model_pending = None, True
        self.show("#model-status", Text(f"resolving {spec}…", "dim"))
        self._resolve_thread(spec)

    @work(thread=True, group="model", exit_on_error=False)
    def _resolve_thread(self, spec: str) -> None:
        try:
            self.post_message(ModelResolved(spec, resolve_model(spec), None))
        except UserError as e:
            self.post_message(ModelResolved(spec, None, str(e)))
        except Exception as e:  # a broken config or GGUF file must not take the screen down
            self.post_message(ModelResolved(spec, None, f"--model {spec}: cannot read it ({type(e).__name__}: {e})"))

    def on_model_resolved(self, message: ModelResolved) -> None:
        if message.spec != self._model_spec:
            return  # the person asked for another model meanwhile
        self._model_pending = False
        if message.model is None:
            self.model_error = message.error
            self.show("#model-status", Text(message.error or "", "red"))
        else:
            self.model = message.model
            s = self.model.shape
            kind = "" if self.model.kind == "builtin" else f" ({KIND_NAMES[self.model.kind]})"
            self.show("#model-status", Text.assemble((self.model.display_name, "bold"), kind,
                                                     f": {s.model_type}, {s.num_hidden_layers} layers, "
                                                     f"hidden size {s.hidden_size}"))
            self.replan()
            self._render_example()
        self._update_start()

    # ------------------------------------------------------------ data

    def _load(self, source: str) -> None:
        """Check `source` in a thread ('' : no data, said at once)."""
        self._data_source = source
        self.data = None
        if self.method in PREFERENCE_METHODS:
            none = ("no data: the preference demo set is not in this install; give a file of preference pairs "
                    "(prompt, chosen, rejected)")
        else:
            none = "no data: give a data file or folder, a hub dataset id, or demo"
        self.data_error = None if source else none
        summary = Text(f"checking every row of {source}…", "dim") if source else Text(self.data_error, "red")
        self.show("#data-summary", summary)
        self.show("#data-problems", "")
        self.show("#data-example", "")
        self.query_one("#data-skip-bad").display = False
        self._loaded_for = self.method
        if source:
            self._load_thread(source, self.method)
        self.replan()  # the demo recipe comes or goes with the demo data

    @work(thread=True, group="data", exit_on_error=False)
    def _load_thread(self, source: str, method: str = "sft") -> None:
        try:
            # a hub dataset's files first, its progress on the screen as they come in
            fetch_hub_dataset(source, lambda p: self.post_message(DataDownload(source, p.to_event())))
            self.post_message(DataLoaded(source, load_data(source, skip_bad_rows=True, method=method), None))
        except UserError as e:
            self.post_message(DataLoaded(source, None, str(e)))
        except Exception as e:  # whatever a broken file does to a reader, the screen stays up
            self.post_message(DataLoaded(source, None, f"{source}: cannot read it ({type(e).__name__}: {e})"))

    def on_data_download(self, message: DataDownload) -> None:
        if message.source == self._data_source and self.data is None and self.data_error is None:
            self.show("#data-summary", Text(download_line(message.event), "dim"))

    def on_data_loaded(self, message: DataLoaded) -> None:
        if message.source != self._data_source:
            return
        self.data, self.data_error = message.loaded, message.error
        if message.loaded is None:
            self.show("#data-summary", Text(_first_lines(message.error or ""), "red"))
        else:
            d = message.loaded
            shown = DEMO if message.source == DEMO else Path(d.source).name
            bad = len(d.skipped)
            text = Text.assemble(("Format ", "bold"), f"{d.format} (detected) · ", ("Rows ", "bold"),
                                 f"{d.total_rows}: {len(d.examples)} valid, ",
                                 (f"{bad} bad", "bold red" if bad else ""))
            for w in d.warnings:
                if "left out" not in w:  # the bad rows are listed below
                    text.append(f"\nwarning: {w}", "yellow")
            self.show("#data-summary", text)
            if bad:
                lines = [f"{short_where(p.where, d.source, shown)}: {p.message}" for p in d.skipped[:PROBLEMS_SHOWN]]
                if bad > PROBLEMS_SHOWN:
                    lines.append(f"... and {bad - PROBLEMS_SHOWN} more")
                self.show("#data-problems", "\n".join(lines))
                self.query_one("#data-skip-bad").display = True
            self._render_example()
        self._update_start()

    @on(Checkbox.Changed, "#data-skip-bad")
    def _skip_bad_changed(self) -> None:
        self._update_start()

    def action_browse(self) -> None:
        typed = Path(self.query_one("#data-input", Input).value.strip() or ".").expanduser()
        start = typed if typed.is_dir() else typed.parent if typed.parent.is_dir() else Path.cwd()

        def picked(path: str | None) -> None:
            if path:
                self.query_one("#data-input", Input).value = path
                self._apply_data()

        self.app.push_screen(DataFilePicker(start.resolve()), picked)

    @on(Button.Pressed, "#data-browse")
    def _browse_pressed(self) -> None:
        self.action_browse()

    def _apply_data(self) -> None:
        raw = self.query_one("#data-input", Input).value.strip()
        path = Path(raw).expanduser()
        # the worker runs in the run folder, so a relative path must be made absolute here
        source = str(path.resolve()) if raw and raw != DEMO and path.exists() else raw
        if not raw and self.method in PREFERENCE_METHODS:  # left empty: the preference demo set
            demo = preference_demo_path(parrot=self._from_data == DEMO)  # in the SFT demo's voice after it
            source = str(demo) if demo is not None else ""
        if source != self._data_source:
            self._load(source)

    # ------------------------------------------------------------ example

    def _render_example(self) -> None:
        if self.model is None or self.data is None:
            return
        key = (self.model.location, self._data_source)
        if key == self._example_key:
            return
        self._example_key = key
        converting = self.model.kind == "builtin" and not (builtin_model_dir() / "model.safetensors").is_file()
        note = " (the first time, the built-in model is converted: ~20 s)" if converting else ""
        self.show("#data-example", Text(f"loading the tokenizer{note}…", "dim"))
        self._example_thread(key, self.model, self.data)

    @work(thread=True, group="example", exit_on_error=False)
    def _example_thread(self, key: tuple[str, str], model: ModelRef, data: LoadedData) -> None:
        try:
            if model.location not in self._tokenizers:
                tokenizer = load_tokenizer(model)
                self._tokenizers[model.location] = (tokenizer, chat_template_for(tokenizer))
            tokenizer, template = self._tokenizers[model.location]
            example = data.examples[0]
            if isinstance(example, PreferenceExample):
                self.post_message(ExampleRendered(key, self._pair_example(example, data, key, tokenizer), None))
                return
            text, spans, _ = render(example, tokenizer, template)
            shown = DEMO if key[1] == DEMO else Path(data.source).name
            if example.shape != CONVERSATION:
                how = "plain text + the end-of-text token"
            elif template.source == "model":
                how = "the model's chat template"
            else:
                how = "ChatML (the model has none)"
            head = Text.assemble((f"Example {short_where(example.where, data.source, shown)}", "bold"),
                                 f" · {how} · trained part in « »\n")
            self.post_message(ExampleRendered(key, head + marked_example(text, spans), None))
        except UserError as e:
            self.post_message(ExampleRendered(key, None, str(e)))
        except Exception as e:  # a tokenizer that fails must not take the screen down
            self.post_message(ExampleRendered(key, None, f"cannot render an example: {type(e).__name__}: {e}"))

    def _pair_example(self, example: PreferenceExample, data: LoadedData, key: tuple[str, str], tokenizer) -> Text:
        """A pair as the trainer sees it: the prompt, then each answer between « »."""
        texts = pair_texts(tokenize_pairs([example], tokenizer, self.method if self.method in PREFERENCE_METHODS
                                          else "dpo")[0], tokenizer)
        shown = Path(data.source).name
        head = Text.assemble((f"Example {short_where(example.where, data.source, shown)}", "bold"),
                             " · a preference pair · trained answers in « »\n")
        return head + Text.assemble(texts["prompt"], ("\nchosen:   ", "bold green"), f"«{texts['chosen']}»",
                                    ("\nrejected: ", "bold red"), f"«{texts['rejected']}»")

    def on_example_rendered(self, message: ExampleRendered) -> None:
        if message.key != self._example_key:
            return
        shown = message.example if message.example is not None else Text(message.error or "", "red")
        self.show("#data-example", shown)

    # ------------------------------------------------------------ the fields

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._apply_field(event.input)

    def on_input_blurred(self, event: Input.Blurred) -> None:
        self._apply_field(event.input)
        if event.input.id in NUMBER_KNOBS and event.input.id not in self._errored_inputs():
            self._show_knob_values()  # an emptied field shows the planner's value again

    def _apply_field(self, field: Input) -> None:
        if field.id == "model-input":
            spec = field.value.strip() or BUILTIN_NAME
            if spec != self._model_spec:
                if self.from_run and spec != self._from_model:
                    self.notify(f"run {self.from_run}'s adapter is for {self._from_model}: this run starts afresh "
                                f"on {spec}")
                    self._set_from_run(None)
                self._resolve(spec)
        elif field.id == "data-input":
            self._apply_data()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "knob-beta":
            self._beta_changed(event.value.strip())
            return
        if event.input.id not in NUMBER_KNOBS:
            return
        knob, label = NUMBER_KNOBS[event.input.id]
        raw = event.value.strip()
        self.knob_errors.pop(knob, None)
        if not raw:
            self.user_pinned.pop(knob, None)  # the planner chooses again
        else:
            value, error = parse_knob(knob, label, raw)
            if error:
                self.knob_errors[knob] = error
                self._show_knob_errors()
                self._update_start()
                return
            self.user_pinned[knob] = value
        self._show_knob_errors()
        self.replan()

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        if event.checkbox.id in SWITCH_KNOBS:
            self.user_pinned[SWITCH_KNOBS[event.checkbox.id][0]] = event.value
            self.replan()

    def _beta_changed(self, raw: str) -> None:
        self.knob_errors.pop("beta", None)
        if not raw:
            self.user_pinned.pop("beta", None)
        else:
            value, error = parse_beta(raw)
            if error:
                self.knob_errors["beta"] = error
                self._show_knob_errors()
                self._update_start()
                return
            self.user_pinned["beta"] = value
        self._show_knob_errors()
        self.replan()

    # ------------------------------------------------------------ the method

    @on(Select.Changed, "#knob-engine")
    def _engine_selected(self, event: Select.Changed) -> None:
        """Pin the engine the person picked (the planner then plans for it: MLX 4-bit, or
        PyTorch on MPS in 16 bits)."""
        if self.plan is not None and isinstance(event.value, str) and event.value != self.plan.knobs.engine:
            self.user_pinned["engine"] = event.value
            if event.value == "torch":
                self.user_pinned.pop("load_in_4bit", None)  # a 4-bit pin from MLX would not run on MPS
            self.replan()

    @on(Select.Changed, "#knob-method")
    def _method_selected(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and event.value != self.method:
            self.set_method(event.value)

    def set_method(self, method: str) -> None:
        """Train with `method`: pin it (sft is the default and needs no pin), offer beta for
        dpo and orpo, and swap the demo data for the method's: the field's 'demo' (the sft demo)
        is emptied for a preference method, whose empty field is the preference demo set, and
        put back for sft. An sft run continues nothing."""
        self.method = method
        select = self.query_one("#knob-method", Select)
        if select.value != method:
            with select.prevent(Select.Changed):
                select.value = method
        preference = method in PREFERENCE_METHODS
        for widget in self.query(".beta"):
            widget.display = preference
        if preference:
            self.user_pinned["method"] = method
        else:
            for knob in ("method", "beta"):
                self.user_pinned.pop(knob, None)
            self.knob_errors.pop("beta", None)
            with self.query_one("#knob-beta", Input).prevent(Input.Changed):
                self.query_one("#knob-beta", Input).value = ""
            self._show_knob_errors()
            self._set_from_run(None)
        field = self.query_one("#data-input", Input)
        field.placeholder = DATA_PLACEHOLDERS["preference" if preference else "sft"]
        raw = field.value.strip()
        if preference and raw == DEMO or not preference and not raw:
            field.value = "" if preference else DEMO
        before = self._data_source
        self._apply_data()
        if self._data_source == before and before and self._loaded_for != method:
            self._example_key = None
            self._load(before)  # the same file, checked again for this method
        self.replan()

    def continue_from(self, run_id: str, model: str) -> None:
        """Prefill a DPO run that goes on training run `run_id`'s adapter on its model `model`."""
        field = self.query_one("#model-input", Input)
        field.value = model
        if model != self._model_spec:
            self._resolve(model)
        self.set_method("dpo")
        self._from_model = model
        self._set_from_run(run_id)
        self.replan()  # with the adapter's shape pinned

    def _set_from_run(self, run_id: str | None) -> None:
        self.from_run = run_id
        self._from_lora = {}
        before, self._from_data = self._from_data, None
        if run_id:
            try:
                cfg = find_run_config(run_id)
                self._from_lora = {k: cfg["knobs"][k] for k in LORA_KNOBS if k in cfg.get("knobs", {})}
                self._from_data = cfg.get("run", {}).get("data")
            except Exception:  # noqa: BLE001 - an unreadable run: Start's check says why
                self._from_lora = {}
        if self._from_data != before and self.method in PREFERENCE_METHODS:
            self._apply_data()  # the preference demo's voice follows the run it continues
        self.show("#from-run", Text.assemble((f"continues run {run_id}'s adapter", "bold"),
                                             f"; reference: run {run_id}'s model") if run_id else "")

    def _errored_inputs(self) -> set[str]:
        return {wid for wid, (knob, _) in NUMBER_KNOBS.items() if knob in self.knob_errors}

    def _show_knob_errors(self) -> None:
        self.show("#knob-error", "\n".join(self.knob_errors.values()))

    def action_leave_field(self) -> None:
        self.query_one("#new-run").focus()

    # ------------------------------------------------------------ the plan

    def _recipe(self) -> dict[str, Any]:
        """The demo recipe of the data in use: SFT's with the demo set, the preference demo's
        with the preference pairs; nothing otherwise."""
        if self._data_source == DEMO:
            return DEMO_RECIPE
        if self.method in PREFERENCE_METHODS and is_preference_demo(self._data_source):
            parrot = self._data_source == str(preference_demo_path(parrot=True))
            return SFT_THEN_DPO_DEMO_RECIPE if parrot and self.method == "dpo" else PREFERENCE_DEMO_RECIPE
        return {}

    def pinned(self) -> dict[str, Any]:
        """What the planner may not change: the demo recipe (with the demo data), then the
        person's own choices; a run that continues another run's adapter has that adapter's
        shape (launch.LORA_KNOBS)."""
        return {**self._recipe(), **self.user_pinned, **self._from_lora}

    def replan(self) -> None:
        """Plan again with the current model and pinned knobs, and redraw the plan."""
        if self.model is None:
            return
        try:
            pinned = self.pinned()
            continues = bool(self.from_run) and pinned.get("method") == "dpo"
            self.plan, self.plan_error = make_plan(self.app.hardware, self.model, pinned=pinned,
                                                   reference_adapter=continues), None
        except UserError as e:
            self.plan, self.plan_error = None, str(e)
        self._refresh_all()

    def _refresh_all(self) -> None:
        self._show_knob_values()
        self._show_plan()
        self._update_start()

    def _show_knob_values(self) -> None:
        """Put the plan's values in the knob fields, except the one being typed in and those
        holding a mistake the person still has to see."""
        if self.plan is None:
            return
        values = self.plan.knobs.to_dict()
        skip = self._errored_inputs()
        for wid, (knob, _) in NUMBER_KNOBS.items():
            field = self.query_one(f"#{wid}", Input)
            if wid in skip or field.has_focus or field.value == str(values[knob]):
                continue
            with field.prevent(Input.Changed):
                field.value = str(values[knob])
        beta = self.query_one("#knob-beta", Input)
        if "beta" not in self.knob_errors and not beta.has_focus and beta.value != f"{values['beta']:g}":
            with beta.prevent(Input.Changed):
                beta.value = f"{values['beta']:g}"
        for wid, (knob, _) in SWITCH_KNOBS.items():
            box = self.query_one(f"#{wid}", Checkbox)
            if box.value != values[knob]:
                with box.prevent(Checkbox.Changed):
                    box.value = values[knob]
        engine = self.query_one("#knob-engine", Select)
        if values["engine"] in ENGINE_CHOICES and engine.value != values["engine"]:
            with engine.prevent(Select.Changed):
                engine.value = values["engine"]
        self._offer_4bit(values["engine"])

    def _offer_4bit(self, engine: str) -> None:
        """The 4-bit switch where 4-bit runs: bitsandbytes' backends, or the MLX engine (which
        quantises with MLX, on a Mac too); never offered where neither runs."""
        box = self.query_one("#knob-4bit", Checkbox)
        backend = self.app.hardware.backend
        runs = backend in BITSANDBYTES_BACKENDS or engine == "mlx"
        box.disabled = not runs
        box.tooltip = None if runs else f"bitsandbytes 4-bit does not run on {backend}"

    def _show_plan(self) -> None:
        estimate = self.query_one("#estimate", EstimateBar)
        plan = self.plan
        if plan is None:
            estimate.show([], 0)
            self.show("#plan-advice", Text(self.plan_error or "", "red"))
            for selector in ("#plan-profile", "#plan-adjustments", "#plan-table", "#plan-context"):
                self.show(selector, "")
            return
        estimate.show(plan.estimate.parts(), plan.budget_bytes)
        self.show("#plan-advice", Text("\n".join(f"would fit: {a}" for a in plan.advice), "yellow"))
        self.show("#plan-context", Text(max_context(plan).line(short=True), "dim"))
        profile = Text.assemble(("Profile ", "bold"), (plan.profile.name, "bold"), f": {plan.profile.description}")
        if plan.parallel.world_size > 1:  # several GPUs: the knobs and the estimate are each rank's
            profile.append_text(Text.assemble(("\nParallel ", "bold"), plan.parallel.reason,
                                              f"; the knobs and the estimate are per rank (effective batch "
                                              f"{plan.effective_batch_size})"))
        self.show("#plan-profile", profile)
        if plan.adjustments:
            lines = Text("Planner changes", "bold")
            for a in plan.adjustments:
                lines.append(f"\n• {a.knob} {a.old} → {a.new}: {a.reason}", "yellow")
        else:
            lines = Text.assemble(("Planner changes ", "bold"), "none: it fits as set")
        self.show("#plan-adjustments", lines)
        recipe = set(self._recipe()) - set(self.user_pinned)
        self.show("#plan-table", knob_table(plan, recipe))

    # ------------------------------------------------------------ start

    def blockers(self) -> list[str]:
        """Why Start would refuse now, most pressing first (empty: ready)."""
        out: list[str] = []
        if self.starting:
            out.append("starting…")
        out += list(self.knob_errors.values())
        if self.model_error:
            out.append(f"the model: {self.model_error.splitlines()[0]}")
        elif self._model_pending:
            out.append("resolving the model…")
        if self.data_error:
            out.append(f"the data: {self.data_error.splitlines()[0]}")
        elif self.data is None:
            out.append("checking the data…")
        elif self.data.skipped and not self.query_one("#data-skip-bad", Checkbox).value:
            n = len(self.data.skipped)
            out.append(f"the data has {n} bad row{'s' * (n != 1)} (listed above): fix them, "
                       "or tick 'leave the bad rows out'")
        if self.plan_error:
            out.append(self.plan_error)
        elif self.plan is not None and self.plan.knobs.engine != "torch":
            try:
                require_engine(self.plan.knobs)  # MLX installed, and a method it has
            except UserError as e:
                out.append(str(e))
        elif self.plan is not None and not self.plan.fits:
            over = self.plan.estimate.total_bytes - self.plan.budget_bytes
            out.append(f"the plan does not fit: over the budget by {gb(over, 2)}; see the advice under Plan")
        return out

    def _update_start(self) -> None:
        blockers = self.blockers()
        note = self.query_one("#start-note", Static)
        if blockers:
            busy = blockers[0].endswith("…")
            note.update(Text(blockers[0], "dim" if busy else "red"))
        elif self.plan is not None:
            e = self.plan.estimate
            note.update(Text(f"ready: ctrl+s starts; estimate {gb(e.total_bytes)} of a {gb(self.plan.budget_bytes)} "
                             "budget", "green"))
        self.query_one("#start", Button).disabled = self.starting

    def action_start(self) -> None:
        blockers = self.blockers()
        if blockers:
            advice = f"; would fit: {self.plan.advice[0]}" if self.plan and self.plan.advice else ""
            self.app.notify_error(f"cannot start yet: {blockers[0]}{advice}")
            self._update_start()
            return
        assert self.plan is not None and self.model is not None
        model = self.model.location if self.model.kind in ("folder", "gguf") else self.model.spec
        run_cfg = default_run_config(model=model, data=self._data_source,
                                     skip_bad_rows=self.query_one("#data-skip-bad", Checkbox).value)
        if self.from_run:
            from localtune.runs import find_run

            run_cfg["from_run"], run_cfg["from_adapter"] = self.from_run, str(find_run(self.from_run).adapter_dir)
        if self.method in PREFERENCE_METHODS and is_preference_demo(self._data_source):
            parrot = self._data_source == str(preference_demo_path(parrot=True))
            # the preference demo's held-out pairs, in the voice of its training pairs
            run_cfg["eval_data"] = DEMO_PREFERENCE_PARROT_EVAL if parrot else DEMO_PREFERENCE_EVAL
        self.starting = True
        self._update_start()
        self._start_thread(run_cfg, self.plan)

    @on(Button.Pressed, "#start")
    def _start_pressed(self) -> None:
        self.action_start()

    @work(thread=True, group="start", exit_on_error=False)
    def _start_thread(self, run_cfg: dict[str, Any], plan: Plan) -> None:
        try:
            run, warnings = prepare_run(run_cfg, plan)
            start_worker(run)
        except UserError as e:
            self.post_message(RunPrepared(None, [], f"could not start: {_first_lines(str(e), 3)}"))
            return
        except Exception as e:  # a full disk, or a bug of ours: said, and Start works again
            self.post_message(RunPrepared(None, [], f"could not start: {type(e).__name__}: {e}"))
            return
        self.post_message(RunPrepared(run, warnings, None))

    def on_run_prepared(self, message: RunPrepared) -> None:
        self.starting = False
        self._update_start()
        if message.run is None:
            self.app.notify_error(message.error)
            return
        for w in message.warnings:
            self.app.notify(w, severity="warning", timeout=10)
        self.app.notify(f"run {message.run.id} started")
        self.app.open_dashboard(message.run)
