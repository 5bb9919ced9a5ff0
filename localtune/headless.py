"""The headless progress view: follow a run's event log in the terminal until it ends.

Reads `events.jsonl` only (like the TUI dashboard), so it can follow a run started by
another process. On a terminal it keeps one live panel; elsewhere (a log file, CI) it
prints one line per step. Ctrl-C asks whether to detach (the run goes on) or stop it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from localtune.events import EventReader
from localtune.runs import RunDir

END_KINDS = ("finished", "failed", "stopped")
POLL_S = 0.5
START_GRACE_S = 30.0
"""How long a worker may take to start before its absence means it died."""


def _fmt_s(s: float | None) -> str:
    if s is None or s != s:
        return "-"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _State:
    def __init__(self) -> None:
        self.step = 0
        self.max_steps: int | None = None
        self.loss: float | None = None
        self.eval_loss: float | None = None
        self.lr: float | None = None
        self.tokens_per_s: float | None = None
        self.elapsed_s: float | None = None
        self.memory: str = "-"
        self.sample: str | None = None
        self.notes: list[str] = []
        self.end: dict[str, Any] | None = None
        self.started_at_step = 0
        self.step_times: list[tuple[float, int]] = []

    def eta_s(self) -> float | None:
        if not self.max_steps or len(self.step_times) < 2:
            return None
        (t0, s0), (t1, s1) = self.step_times[0], self.step_times[-1]
        if s1 <= s0:
            return None
        return (t1 - t0) / (s1 - s0) * (self.max_steps - s1)

    def apply(self, e: dict[str, Any]) -> str | None:
        """Fold one event in; return a line worth printing on its own, if any."""
        k = e.get("kind")
        if k == "started":
            self.max_steps = e.get("max_steps")
            src = f"resumed from {e['resumed_from']}" if e.get("resumed_from") else "from the start"
            how = f" in {e['precision']}" if e.get("precision") else ""
            how += ", padding-free" if e.get("padding_free") else ""
            return f"started on {e.get('device')}{how} ({src}), {self.max_steps} steps"
        if k == "step":
            self.step, self.max_steps = e["step"], e.get("max_steps", self.max_steps)
            self.loss, self.lr = e.get("loss"), e.get("learning_rate")
            self.tokens_per_s, self.elapsed_s = e.get("tokens_per_s"), e.get("elapsed_s")
            self.step_times = (self.step_times + [(e["t"], e["step"])])[-20:]
        elif k == "eval":
            self.eval_loss = e.get("eval_loss")
            return f"step {e['step']}: eval loss {self.eval_loss:.4f}"
        elif k == "hardware":
            used, total = e.get("memory_used_bytes"), e.get("memory_total_bytes")
            if used and total:
                self.memory = f"{used / 2**30:.1f}/{total / 2**30:.1f} GB"
        elif k == "sample":
            self.sample = e.get("text", "").strip().replace("\n", " ")
            return f"step {e['step']}: sample: {self.sample[:100]}"
        elif k == "checkpoint":
            return f"step {e['step']}: checkpoint saved"
        elif k == "thermal_pause":
            return (f"step {e['step']}: paused: the GPU is at {e.get('temperature_c')} C, over the "
                    f"{e.get('max_gpu_temp_c')} C limit; waiting for it to cool")
        elif k == "thermal_resume":
            return f"step {e['step']}: going on after {e.get('paused_s')} s (GPU at {e.get('temperature_c')} C)"
        elif k in ("warning", "oom_backoff"):
            msg = e.get("message") or f"out of memory: micro-batch now {e.get('per_device_train_batch_size')}"
            self.notes.append(msg)
            return f"warning: {msg}"
        elif k in END_KINDS:
            self.end = e
        return None

    def line(self, sep: str = "  ") -> str:
        total = self.max_steps or "?"
        loss = f"{self.loss:.4f}" if isinstance(self.loss, (int, float)) else "-"
        lr = f"{self.lr:.2e}" if isinstance(self.lr, (int, float)) else "-"
        tps = f"{self.tokens_per_s:,.0f}" if isinstance(self.tokens_per_s, (int, float)) else "-"
        return (f"step {self.step}/{total}  loss {loss}  lr {lr}  {tps} tok/s{sep}"
                f"elapsed {_fmt_s(self.elapsed_s)}  eta {_fmt_s(self.eta_s())}  mem {self.memory}")


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
    return f"the worker ended without a word{how or ' (killed?)'}"


def follow(run: RunDir, *, out=None, worker: subprocess.Popen | None = None, worker_alive=None, offset: int = 0,
           bell: bool = False) -> dict[str, Any] | None:
    """Show the run's progress until it ends; return the end event (None when detached).
    With `bell` (`--notify`) the terminal bell rings when the run finishes, stops or fails.

    `worker`: the worker process this process started; its end is seen at once. Otherwise
    `worker_alive()` tells whether the worker still runs (default: the run's lock), allowing
    it START_GRACE_S to start. A worker that is gone without an end event ended by a crash or
    a kill, or died before it started. `offset` skips the events already in the log (a
    resumed run's earlier attempts, which end with `stopped`)."""
    from rich.console import Console
    from rich.live import Live

    console = Console(file=out or sys.stdout, highlight=False)
    reader = EventReader(run.events_path, offset=offset)
    st = _State()
    alive = ((lambda: worker.poll() is None) if worker is not None
             else worker_alive or (lambda: run.live_worker_pid() is not None))
    live = Live(console=console, auto_refresh=False, transient=True) if console.is_terminal else None
    last_printed_step = -1
    # a worker found through the lock takes a moment to take it; one we started is known at once
    grace_until = time.time() + (0.0 if worker is not None else START_GRACE_S)
    try:
        if live:
            live.start()
        while True:
            for e in reader.read_new():
                msg = st.apply(e)
                if msg:
                    console.print(msg, soft_wrap=True)
                if e.get("kind") == "step" and not live and st.step != last_printed_step:
                    console.print(st.line(), soft_wrap=True)
                    last_printed_step = st.step
            if live:
                live.update(st.line(sep="\n"), refresh=True)  # two lines fit an 80-column terminal
            if st.end:
                break
            if not alive() and time.time() > grace_until:
                for e in reader.read_new():
                    st.apply(e)
                if not st.end:
                    st.end = {"kind": "failed", "error": _gone_error(run, worker), "log": str(run.log_path)}
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
    e = st.end
    if bell:
        console.file.write("\a")
        console.file.flush()
    if e["kind"] == "finished":
        console.print(st.line(), soft_wrap=True)
        console.print(f"[green]finished[/]: {e['step']} steps, mean loss {e.get('train_loss') or 0:.4f}; "
                      f"adapter in {e['adapter']}", soft_wrap=True)
    elif e["kind"] == "stopped":
        console.print(f"stopped at step {e['step']} ({e.get('checkpoint')}); "
                      f"`localtune resume {run.id}` goes on from there", soft_wrap=True)
    else:
        console.print(f"[red]failed[/]: {e.get('error')}\n  log: {e.get('log', run.log_path)}", soft_wrap=True)
    return e
