"""The headless progress view: follow a run's event log in the terminal until it ends.

Reads `events.jsonl` only, folded by the dashboard's own `RunProgress` (localtune.progress),
so it can follow a run started by another process and says what the dashboard says. On a
terminal it keeps one live panel (while the worker downloads a hub model's weights, a rich
progress bar with bytes, speed and ETA); elsewhere (a log file, CI) it prints one line per step
(and a download's progress line every DOWNLOAD_LINE_EVERY_S).
Notable events (start, eval, sample, checkpoint, warnings, the end) print one line each, in
the fold's words. Ctrl-C asks whether to detach (the run goes on) or stop it.

A log can hold several attempts (a run stopped or crashed, then resumed); `attach` shows
them all and follows the latest one to its end. An end in the log is final once no other
worker has taken the run since: a resume that is still loading its model has the run's lock
before it writes `started`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from rich.text import Text

from localtune.events import END_KINDS, EventReader
from localtune.progress import RunProgress, download_line, duration, num
from localtune.runs import RunDir

POLL_S = 0.5
START_GRACE_S = 30.0
"""How long a new run's worker may take to start before its absence means it died."""
DOWNLOAD_LINE_EVERY_S = 10.0
"""Off a terminal, a download's progress line is printed at most this often (by the events'
times), and once at the end: a log file gets a line per 10 s, not per second."""


def live_view(p: RunProgress) -> Any:
    """What the live panel on a terminal shows: a download's bar while the worker fetches a hub
    model's weights, the training progress after."""
    if p.download is not None:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        done, total = p.download.get("bytes_done"), p.download.get("bytes_total")
        ok = isinstance(done, int) and isinstance(total, int) and total > 0
        view = Table.grid()
        view.add_row(ProgressBar(total=total if ok else None, completed=done if ok else 0, width=60))
        view.add_row(Text(download_line(p.download)))
        return view
    return Text(progress_line(p, sep="\n"))  # two lines fit an 80-column terminal


def progress_line(p: RunProgress, sep: str = "  ") -> str:
    """'step 12/40  loss 1.2345  lr 1.00e-03  1,234 tok/s  elapsed 0:36  eta 1:24  mem 1.5/24.0 GB';
    a preference run (dpo, orpo) has its reward margin and preference accuracy beside the loss:
    'step 12/40  loss 0.6100  margin 0.420  acc 0.75  lr ...'."""
    mem = (f"{p.memory_used_bytes / 2**30:.1f}/{p.memory_total_bytes / 2**30:.1f} GB"
           if p.memory_used_bytes and p.memory_total_bytes else "-")
    rewards = f"  margin {num(p.reward_margin, '.3f')}  acc {num(p.reward_accuracy, '.2f')}" if p.preference else ""
    return (f"step {p.step}/{p.max_steps or '?'}  loss {num(p.loss)}{rewards}  lr {num(p.learning_rate, '.2e')}  "
            f"{num(p.tokens_per_s, ',.0f')} tok/s{sep}elapsed {duration(p.elapsed_s)}  "
            f"eta {duration(p.eta_s())}  mem {mem}")


def outcome(run: RunDir, p: RunProgress, end: dict[str, Any]) -> Text:
    """The last line: how the run ended and what a person can do next."""
    if end.get("kind") == "finished":
        return Text.assemble(("finished", "green"), f": {p.step} steps, mean loss {num(end.get('train_loss'))}; "
                                                    f"adapter in {end.get('adapter') or run.adapter_dir}")
    if end.get("kind") == "stopped":
        where = f" ({end['checkpoint']})" if end.get("checkpoint") else ""
        return Text(f"stopped at step {p.step}{where}; `localtune resume {run.id}` goes on from there")
    if end.get("kind") == "interrupted":
        return Text.assemble(("interrupted", "red"), f": {end.get('error', '?')}\n  log: {end.get('log') or run.log_path}")
    return Text.assemble(("failed", "red"), f": {end.get('error', '?')}\n  log: {end.get('log') or run.log_path}")


def _ask_detach_or_stop() -> str:
    if not sys.stdin or not sys.stdin.isatty():
        return "d"
    try:
        answer = input("\nDetach (the run goes on in the background) or stop it? [d/s] ").strip().lower()
    except (EOFError, KeyboardInterrupt):
        return "d"
    return "s" if answer.startswith("s") else "d"


def _gone_error(run: RunDir, worker: subprocess.Popen | None) -> str:
    """Why a worker that is gone without an end event ended, in one line."""
    code = worker.returncode if worker is not None else None
    how = "" if code is None else (f" (killed by {signal.Signals(-code).name})" if code < 0 else f" (code {code})")
    if run.lost_worker():
        return f"the worker exited{how} before it started: {run.log_last_line()}"
    return (f"the worker ended without a word{how or ' (killed?)'}; `localtune resume {run.id}` "
            "goes on from its last checkpoint")


def follow(run: RunDir, *, out=None, worker: subprocess.Popen | None = None,
           worker_alive: Callable[[], bool] | None = None, offset: int = 0,
           bell: bool = False) -> dict[str, Any] | None:
    """Show the run's progress until it ends; return the end event (None when detached).
    With `bell` (`--notify`) the terminal bell rings when the run finishes, stops or fails.

    `worker`: the worker process the caller started (train, resume): its end is seen at once,
    and a worker that died before it took the run (an import error) is said to have, with the
    last line of worker.log. `worker_alive()` is the same question asked another way. Without
    either (attach) the view follows whichever worker holds the run's lock, and a new run's
    worker gets START_GRACE_S to take it. A worker that is gone without an end event ended by
    a crash or a kill. `offset` skips the events already in the log (a resumed run's earlier
    attempts)."""
    from rich.console import Console
    from rich.live import Live

    console = Console(file=out or sys.stdout, highlight=False)
    reader = EventReader(run.events_path, offset=offset)
    p = RunProgress()
    grace_until = time.time() + START_GRACE_S
    if worker is not None:
        worker_alive = lambda: worker.poll() is None  # noqa: E731

    if worker_alive is None:
        def gone() -> bool:
            if run.live_worker_pid() is not None:
                return False
            return not (run.read_status().get("state") == "created" and time.time() < grace_until)

        def over() -> bool:  # no other worker than the ended attempt's has taken the run
            pid = run.live_worker_pid()
            return pid is None or pid == p.pid
    else:
        def gone() -> bool:
            return not worker_alive()

        def over() -> bool:  # the caller's worker is the only attempt after `offset`
            return True

    live = Live(console=console, auto_refresh=False, transient=True) if console.is_terminal else None
    held: str | None = None  # an end's line, printed once a new attempt follows it (the last gets `outcome`)

    download_line_t = 0.0  # off a terminal: when the last download line was printed (the event's time)

    def show(events: list[dict[str, Any]]) -> None:
        nonlocal held, download_line_t
        for e in events:
            line = p.apply(e)
            if e.get("kind") == "download" and not live and line is None:
                t = e.get("t") if isinstance(e.get("t"), (int, float)) else time.time()
                if t - download_line_t >= DOWNLOAD_LINE_EVERY_S:
                    line, download_line_t = download_line(e), t
            if held is not None:
                console.print(Text(held), soft_wrap=True)
                held = None
            if e.get("kind") in END_KINDS:
                held = line
            elif line:
                console.print(Text(line), soft_wrap=True)
            if e.get("kind") == "step" and not live:
                console.print(Text(progress_line(p)), soft_wrap=True)

    try:
        if live:
            live.start()
        while True:
            worker_gone = p.end is None and gone()  # asked before reading: what it wrote last is read below
            show(reader.read_new())
            if live:
                live.update(live_view(p), refresh=True)
            if p.end is not None:
                if over():
                    break
            elif worker_gone:
                break
            try:
                time.sleep(POLL_S)
            except KeyboardInterrupt:
                if live:
                    live.stop()
                if _ask_detach_or_stop() == "s":
                    pid = run.live_worker_pid()
                    if pid:
                        os.kill(pid, signal.SIGTERM)
                        console.print("stopping: the worker finishes this step and writes a checkpoint ...")
                    if live:
                        live.start()
                    continue
                console.print(f"detached: the run goes on. `localtune runs` lists it; "
                              f"`localtune stop {run.id}` stops it.")
                return None
    finally:
        if live and live.is_started:
            live.stop()
    end = p.end or {"kind": "failed", "log": str(run.log_path), "error": _gone_error(run, worker)}
    if bell:
        console.file.write("\a")
        console.file.flush()
    if end["kind"] == "finished":
        console.print(Text(progress_line(p)), soft_wrap=True)
    console.print(outcome(run, p, end), soft_wrap=True)
    return end
