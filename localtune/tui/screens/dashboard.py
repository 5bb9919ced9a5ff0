"""The dashboard of one run: loss curves, progress, the machine, the latest sample and a log.
A preference run (dpo, orpo) also has its reward margin and preference accuracy over the steps
in a second chart under the loss, their latest values in the progress panel, and its method
(and the run it continues) in the title; an sft run's dashboard has none of these.

It reads the run's folder only (events.jsonl, status.json, the lock), so it shows a run that
this TUI started just as well as one a worker has been training since last night.

Reading is off the UI thread: a thread worker tails `events.jsonl` every POLL_S and reads the
run's state every STATE_POLL_S, and posts what it found as `EventsRead` messages (threads never
touch widgets). The handler only folds the events into a `RunProgress` and marks the screen
dirty; a timer redraws at most REDRAWS_PER_S times a second. So opening a long finished run
(tens of thousands of events at once) costs one fold and one redraw, not one redraw per
event: toolong's `can_replace` idea, folding high-rate updates into the newest.

While the worker downloads a hub model's weights (before training starts) the progress panel's
first line says so (bytes, speed, ETA, the file) over a bar of the bytes.

Keys: s stop (asks first; the worker finishes the step, writes a checkpoint and exits),
d detach (leave; training goes on), r resume (a stopped, failed or interrupted run), e export
(once there is an adapter), escape back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, RichLog, Static
from textual.worker import get_current_worker
from textual_plotext import PlotextPlot

from localtune.errors import UserError
from localtune.events import END_KINDS, EventReader
from localtune.progress import PREFERENCE_METHODS, RunProgress, download_line
from localtune.runs import RunDir
from localtune.tui import fmt
from localtune.tui.messages import EventsRead
from localtune.tui.widgets import MemoryBar

POLL_S = 0.25
"""How often the reader looks for new events."""
STATE_POLL_S = 1.0
"""How often it reads the run's state (status.json and the worker's lock: a psutil call)."""
REDRAWS_PER_S = 4
EVENTS_PER_MESSAGE = 2000
"""A long log is posted in slices of this many events, so the UI answers keys between slices."""
CHART_POINTS = 1000
"""Most points drawn per curve; a longer curve is thinned evenly (the last point always kept)."""

STATE_STYLES = {"running": "bold green", "stopping": "bold yellow", "stopped": "bold yellow",
                "completed": "bold green", "failed": "bold red", "interrupted": "bold red",
                "created": "dim", "unknown": "dim"}
LOG_STYLES = {"info": "", "warning": "yellow", "error": "bold red"}
STOP_QUESTION = ("Stop run {id}?\n\nThe worker finishes the current step, writes a checkpoint and stops; "
                 "r resumes it later (here or on the Runs screen).")


def thin(points: list[tuple[int, float]], most: int = CHART_POINTS) -> list[tuple[int, float]]:
    """Every k-th point so that at most `most` are left, keeping the last one."""
    if len(points) <= most:
        return points
    k = -(-len(points) // most)
    out = points[::k]
    return out if out[-1] == points[-1] else out + [points[-1]]


def step_ticks(first: int, last: int, most: int = 5) -> list[int]:
    """At most `most` whole steps from `first` to `last`, evenly spaced (plotext would label 2.5)."""
    k = max(1, -(-(last - first) // (most - 1)))
    ticks = list(range(first, last + 1, k))
    if last - ticks[-1] >= k / 2:
        ticks.append(last)
    return ticks


def text_bar(done: int, total: int | None, width: int) -> Text:
    """'━━━━━━━╺━━━━━  42%' in `width` cells; dim when the total is unknown."""
    if not total:
        return Text("─" * max(1, width - 5) + "   - ", "dim")
    share = min(1.0, max(0.0, done / total))
    cells = max(1, width - 5)
    full = int(share * cells)
    return Text.assemble(("━" * full, "green"), ("─" * (cells - full), "dim"), f" {share * 100:3.0f}%")


def short_model(model: str | None) -> str:
    """A local model folder by its name; a hub id or a built-in name as given."""
    if not model:
        return "?"
    p = Path(model).expanduser()
    return p.name if p.is_absolute() or p.exists() else model



def _rank_line(d: dict) -> Text:
    """One rank's device on the dashboard: 'rank 1  GPU 1  12.3/24.0 GB  97%  71 C  280 W'."""
    where = f"GPU {d['index']}" if d.get("index") is not None else "process"
    used, total = d.get("memory_used_bytes"), d.get("memory_total_bytes")
    parts = [f"{used / 2**30:.1f}/{total / 2**30:.1f} GB" if used and total else None,
             f"{d['utilization_pct']:.0f}%" if d.get("utilization_pct") is not None else None,
             f"{d['temperature_c']:.0f} C" if d.get("temperature_c") is not None else None,
             f"{d['power_w']:.0f} W" if d.get("power_w") is not None else None]
    return Text.assemble((f"rank {d.get('rank', '?')} ", "dim"), (f"{where}  ", "dim"),
                         "  ".join(x for x in parts if x) or "-")

class DashboardScreen(Screen):
    """One run, live: what the worker reports through its event log."""

    BINDINGS = [
        Binding("s", "stop_run", "Stop", tooltip="checkpoint, then stop (asks first)"),
        Binding("d", "detach", "Detach", tooltip="leave the dashboard; training goes on"),
        Binding("r", "resume", "Resume", tooltip="go on from the newest checkpoint"),
        Binding("e", "export", "Export", tooltip="once training finished"),
        Binding("escape", "back", "Back"),
    ]

    def __init__(self, run: RunDir) -> None:
        super().__init__()
        self.run = run
        self.progress = RunProgress()
        self.run_state = "…"
        """The run's state as the reader last saw it (RunDir.state())."""
        self.status: dict[str, Any] = {}
        self.redraws = 0
        """Redraws done so far (tests check that a burst of events is not one redraw per event)."""
        self._dirty = True
        self._chart_version = -1
        self._log_shown = 0
        self._rewards_version = -1
        self.config_method: str | None = None
        """The method in config.toml's [knobs], until the worker's `started` says it."""
        self.config_from_run: str | None = None
        try:
            cfg = run.read_config()
            self.model = short_model(cfg.get("run", {}).get("model"))
            self.config_method = cfg.get("knobs", {}).get("method")
            self.config_from_run = cfg.get("run", {}).get("from_run")
        except (OSError, ValueError, UserError):  # a half-written or hand-broken run folder still gets a dashboard
            self.model = "?"

    @property
    def method(self) -> str | None:
        """The run's method: what the worker said it trains with, else what its config says."""
        return self.progress.method or self.config_method

    @property
    def from_run(self) -> str | None:
        return self.progress.from_run or self.config_from_run

    @property
    def preference(self) -> bool:
        """A dpo or orpo run: it gets the rewards chart and numbers."""
        return self.method in PREFERENCE_METHODS or self.progress.preference

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Static(id="dash-title")
        yield Static(id="dash-end")
        with VerticalScroll(id="dash-body"):
            with Horizontal(id="dash-top"):
                with Vertical(id="dash-charts"):
                    yield PlotextPlot(id="dash-chart")
                    yield PlotextPlot(id="dash-rewards")
                with Vertical(id="dash-stats"):
                    yield Static(id="dash-step")
                    yield Static(id="dash-bar")
                    yield Static(id="dash-loss")
                    yield Static(id="dash-pref", classes="dash-pref")
                    yield Static(id="dash-pref-eval", classes="dash-pref")
                    yield Static(id="dash-lr")
                    yield Static(id="dash-speed")
                    yield Static(id="dash-time")
                    yield Static(id="dash-checkpoint")
                    with Horizontal(id="dash-memory-row"):
                        yield Static("mem ", classes="dash-label")
                        yield MemoryBar(id="dash-memory")
                    yield Static(id="dash-gpu")
                    yield Static(id="dash-cpu")
            with Horizontal(id="dash-bottom"):
                with VerticalScroll(id="dash-sample-box"):
                    yield Static(id="dash-sample")
                yield RichLog(id="dash-log", wrap=True, markup=False, highlight=False, auto_scroll=True,
                              max_lines=500, min_width=20)
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#dash-chart").border_title = "loss"
        self.query_one("#dash-rewards").border_title = "reward margin · preference accuracy"
        self.query_one("#dash-stats").border_title = "progress"
        self.query_one("#dash-sample-box").border_title = "latest sample"
        self.query_one("#dash-log").border_title = "log"
        self.query_one("#dash-end").display = False
        self._redraw()
        self.set_interval(1 / REDRAWS_PER_S, self._redraw_if_dirty)
        self.reader = self._read_events()

    # ------------------------------------------------------------ reading (a thread)

    @work(thread=True, exclusive=True, group="dashboard-reader")
    def _read_events(self) -> None:
        """Tail the event log and watch the run's state until the screen goes away."""
        worker = get_current_worker()
        reader = EventReader(self.run.events_path)
        next_state_at = 0.0
        state, status = self.run_state, self.status
        while not worker.is_cancelled:
            events = reader.read_new()
            # an end event: read the state now, so the title does not say "running" for a second
            fresh_state = time.monotonic() >= next_state_at or any(e.get("kind") in END_KINDS for e in events)
            if fresh_state:
                status = self.run.read_status()
                state, error = self.run.state_and_error(status)
                status = {**status, "error": error}  # a worker lost before it started has its error here only
                next_state_at = time.monotonic() + STATE_POLL_S
            for i in range(0, len(events), EVENTS_PER_MESSAGE):
                self.post_message(EventsRead(events[i:i + EVENTS_PER_MESSAGE], state, status))
            if fresh_state and not events:
                self.post_message(EventsRead([], state, status))  # the state alone, and ages tick on
            time.sleep(POLL_S)

    def on_events_read(self, message: EventsRead) -> None:
        for e in message.events:
            self.progress.apply(e)
        self.run_state, self.status = message.state, message.status
        self._dirty = True

    # ------------------------------------------------------------ drawing

    def _redraw_if_dirty(self) -> None:
        if self._dirty:
            self._redraw()

    def _redraw(self) -> None:
        self._dirty = False
        self.redraws += 1
        p = self.progress
        self._draw_title()
        self._draw_end()
        self._draw_chart()
        self._draw_rewards()
        total = p.max_steps or self.status.get("max_steps")
        epoch = f"   epoch {p.epoch:.2f}" if p.epoch is not None else ""
        bar_width = max(10, self.query_one("#dash-stats").content_size.width)
        if p.download is not None:  # the worker is fetching a hub model's weights; training has not begun
            d = p.download
            self._set("#dash-step", Text(download_line(d)))
            done, total_bytes = d.get("bytes_done"), d.get("bytes_total")
            ok = isinstance(done, int) and isinstance(total_bytes, int)
            self._set("#dash-bar", text_bar(done if ok else 0, total_bytes if ok else None, bar_width))
        else:
            self._set("#dash-step", Text.assemble(("step ", "dim"), (f"{p.step}/{total or '?'}", "bold"), epoch))
            self._set("#dash-bar", text_bar(p.step, total, bar_width))
        self._set("#dash-loss", Text.assemble(("loss ", "dim"), (fmt.num(p.loss), "bold"), ("   eval ", "dim"),
                                              fmt.num(p.eval_loss[-1][1] if p.eval_loss else None)))
        if self.preference:
            self._set("#dash-pref", Text.assemble(("margin ", "dim"), (fmt.num(p.reward_margin, ".3f"), "bold"),
                                                  ("   acc ", "dim"), (fmt.num(p.reward_accuracy, ".2f"), "bold")))
            self._set("#dash-pref-eval", Text.assemble(("eval acc ", "dim"), fmt.num(p.eval_reward_accuracy, ".2f"),
                                                       ("   margin ", "dim"), fmt.num(p.eval_reward_margin, ".3f")))
        self._set("#dash-lr", Text.assemble(("lr ", "dim"), fmt.num(p.learning_rate, ".2e"), ("   grad ", "dim"),
                                            fmt.num(p.grad_norm, ".3f")))
        self._set("#dash-speed", Text.assemble(fmt.num(p.tokens_per_s, ",.0f"), (" tokens/s", "dim")))
        self._set("#dash-time", Text.assemble(("elapsed ", "dim"), fmt.duration(p.elapsed_s), ("   ETA ", "dim"),
                                              fmt.duration(p.eta_s() if self.run_state == "running" else None)))
        checkpoint = (Text.assemble(p.checkpoint_name or "", (f", {fmt.age(p.checkpoint_t)}", "dim"))
                      if p.checkpoint_name else Text("no checkpoint yet", "dim"))
        self._set("#dash-checkpoint", checkpoint)
        self.query_one("#dash-memory", MemoryBar).set(p.memory_used_bytes, p.memory_total_bytes)
        gpu = [f"{p.utilization_pct:.0f}%" if p.utilization_pct is not None else None,
               f"{p.temperature_c:.0f} C" if p.temperature_c is not None else None,
               f"{p.power_w:.0f} W" if p.power_w is not None else None]
        if len(p.devices) > 1:  # several ranks: one line each (their GPU, or on the CPU their process)
            self._set("#dash-gpu", Text("\n").join(_rank_line(d) for d in p.devices))
        else:
            self._set("#dash-gpu", Text.assemble(("GPU ", "dim"), "  ".join(g for g in gpu if g) or "-"))
        cpu = f"{p.cpu_pct:.0f}%" if p.cpu_pct is not None else "-"
        self._set("#dash-cpu", Text.assemble(("CPU ", "dim"), cpu, ("   RAM ", "dim"), fmt.gb(p.ram_used_bytes)))
        self._draw_sample()
        self._draw_log()

    def _set(self, selector: str, content: Text) -> None:
        self.query_one(selector, Static).update(content)

    def _draw_title(self) -> None:
        state = self.run_state
        p = self.progress
        shown, style = state, STATE_STYLES.get(state, "bold")
        if state in ("running", "stopping") and p.thermal_pause:
            shown, style = f"paused: GPU {p.thermal_pause.get('temperature_c', '?')} C", "bold yellow"
        # a preference run says its method after the run id (the run it continues is under its
        # rewards chart: a second run id does not fit 80 columns); an sft run's title is as it always was
        method = (f"{self.method}", ("  ·  ", "dim")) if self.preference and self.method else ()
        self._set("#dash-title", Text.assemble(("run ", "dim"), (self.run.id, "bold"), ("  ·  ", "dim"), *method,
                                               self.model, ("  ·  ", "dim"), (shown, style)))

    def _draw_end(self) -> None:
        """A banner once the run has ended (or its worker is gone without a word)."""
        end, state = self.progress.end, self.run_state
        line: Text | None = None
        if end and end.get("kind") == "failed":
            line = Text.assemble(("failed: ", "bold red"), str(end.get("error", "?")),
                                 ("\nlog: ", "dim"), str(end.get("log") or self.run.log_path))
        elif state == "failed":  # no failed event: a worker killed early, or one that died before it started
            line = Text.assemble(("failed: ", "bold red"), str(self.status.get("error") or "?"),
                                 ("\nlog: ", "dim"), str(self.run.log_path))
        elif end and end.get("kind") == "finished":
            line = Text.assemble(("finished", "bold green"), f": {end.get('step', '?')} steps; adapter in ",
                                 str(end.get("adapter", self.run.adapter_dir)), ("  (e: export)", "dim"))
        elif end and end.get("kind") == "stopped":
            line = Text.assemble(("stopped", "bold yellow"), f" at step {end.get('step', '?')}",
                                 f" ({end['checkpoint']})" if end.get("checkpoint") else "",
                                 ("; r resumes from there", "dim"))
        elif end and end.get("kind") == "interrupted":  # a rank of several ended without a word
            line = Text.assemble(("interrupted", "bold red"), f": {end.get('error', '?')}",
                                 ("\nr resumes every rank from the last checkpoint", "dim"))
        elif state == "interrupted":
            line = Text.assemble(("interrupted", "bold red"), ": the worker is gone without a word",
                                 ("; r resumes from the last checkpoint", "dim"))
        banner = self.query_one("#dash-end", Static)
        banner.display = line is not None
        if line is not None:
            banner.update(line)

    def _draw_chart(self) -> None:
        p = self.progress
        if p.curves_version == self._chart_version:
            return
        self._chart_version = p.curves_version
        chart = self.query_one("#dash-chart", PlotextPlot)
        plt = chart.plt
        plt.clear_data()
        plt.title("" if p.train_loss else "waiting for the first step")
        if p.train_loss:
            xs, ys = zip(*thin(p.train_loss))
            plt.plot(xs, ys, label="train", marker="braille", color="cyan")
        if p.eval_loss:
            xs, ys = zip(*thin(p.eval_loss))
            plt.plot(xs, ys, label="eval", marker="hd", color="orange")
        plt.xlabel("step")
        steps = [s for s, _ in p.train_loss[:1] + p.train_loss[-1:] + p.eval_loss[:1] + p.eval_loss[-1:]]
        if steps:
            plt.xticks(step_ticks(min(steps), max(steps)))
        chart.refresh()

    def _draw_rewards(self) -> None:
        """The reward margin (left axis) and the preference accuracy (right axis, 0 to 1) over
        the steps; shown for preference runs only."""
        preference = self.preference
        chart = self.query_one("#dash-rewards", PlotextPlot)
        for selector in ("#dash-rewards", "#dash-pref", "#dash-pref-eval"):
            widget = self.query_one(selector)
            if widget.display != preference:
                widget.display = preference
        self.query_one("#dash-top").set_class(preference, "preference")
        continues = f"from run {self.from_run}" if self.from_run else ""
        if chart.border_subtitle != continues:
            chart.border_subtitle = continues
        p = self.progress
        if not preference or p.rewards_version == self._rewards_version:
            return
        self._rewards_version = p.rewards_version
        plt = chart.plt
        plt.clear_data()
        plt.title("" if p.reward_margins or p.reward_accuracies else "waiting for the first step")
        if p.reward_margins:
            xs, ys = zip(*thin(p.reward_margins))
            plt.plot(xs, ys, label="margin", marker="braille", color="magenta")
        if p.reward_accuracies:
            xs, ys = zip(*thin(p.reward_accuracies))
            plt.plot(xs, ys, label="acc", marker="braille", color="green", yside="right")
        if p.eval_reward_accuracies:
            xs, ys = zip(*thin(p.eval_reward_accuracies))
            plt.plot(xs, ys, label="eval acc", marker="hd", color="orange", yside="right")
        if p.reward_accuracies or p.eval_reward_accuracies:
            plt.ylim(0, 1, yside="right")
            plt.yticks([0, 0.5, 1], yside="right")
        steps = [s for s, _ in p.reward_margins[:1] + p.reward_margins[-1:] + p.reward_accuracies[:1]
                 + p.reward_accuracies[-1:] + p.eval_reward_accuracies[:1] + p.eval_reward_accuracies[-1:]]
        if steps:
            plt.xticks(step_ticks(min(steps), max(steps)))
        chart.refresh()

    def _draw_sample(self) -> None:
        s = self.progress.sample
        if not s:
            self._set("#dash-sample", Text("no sample yet", "dim"))
            return
        self._set("#dash-sample", Text.assemble((f"step {s['step']}  ", "dim"), (s["prompt"], "italic"), "\n",
                                                s["text"].strip()))

    def _draw_log(self) -> None:
        """Write the log lines added since the last redraw (the log widget keeps the older ones)."""
        p = self.progress
        fresh = min(p.log_total - self._log_shown, len(p.log))
        if fresh <= 0:
            return
        log = self.query_one("#dash-log", RichLog)
        for level, line in list(p.log)[-fresh:]:
            log.write(Text(line, LOG_STYLES.get(level, "")))
        self._log_shown = p.log_total

    # ------------------------------------------------------------ keys

    def action_stop_run(self) -> None:
        """Ask, then SIGTERM the worker: it finishes the step, writes a checkpoint and exits."""
        from localtune.tui.screens.confirm import ConfirmScreen

        if self.run.live_worker_pid() is None:
            self.app.notify_error(f"run {self.run.id} has no live worker ({self.run.state()}): nothing to stop")
            return
        if self.progress.stopping and not self.progress.end:
            self.notify("already stopping: the worker is finishing its step and writing a checkpoint")
            return

        def answered(answer: str | None) -> None:
            if answer != "stop":
                return
            from localtune.errors import UserError
            from localtune.launch import request_stop

            try:
                request_stop(self.run)
            except UserError as e:  # it ended on its own meanwhile
                self.app.notify_error(e)
                return
            self.notify("stopping: the worker finishes this step and writes a checkpoint")

        self.app.push_screen(ConfirmScreen(STOP_QUESTION.format(id=self.run.id),
                                           [("stop", "Stop"), ("cancel", "Keep training")], danger="stop"),
                             answered)

    def action_resume(self) -> None:
        """Start a worker that goes on from the newest checkpoint; this dashboard follows it."""
        if self.run_state in ("running", "stopping"):
            self.app.notify_error(f"run {self.run.id} is {self.run_state}: nothing to resume")
            return
        self.app.resume(self.run)

    def action_detach(self) -> None:
        """Leave the dashboard; the worker is its own process and goes on."""
        live = self.run_state in ("running", "stopping")
        self.app.pop_screen()
        if live:
            self.app.notify(f"run {self.run.id} is still training in the background; "
                            "the Runs screen (3) reattaches")

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_export(self) -> None:
        if self.run_state == "completed" or self.run.adapter_dir.is_dir():
            self.app.open_export(self.run)
            return
        self.app.notify_error(f"run {self.run.id} has no adapter yet ({self.run_state}): export works once "
                              "training finishes" + ("; resume it first" if self.run_state in
                                                     ("stopped", "interrupted", "failed") else ""))
