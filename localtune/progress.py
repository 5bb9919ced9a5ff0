"""What a viewer knows about a run, folded from its event log: one fold for both views.

`RunProgress.apply(event)` takes the events of `events.jsonl` (localtune.events) one at a
time, in the order of the log, and keeps what the TUI dashboard and the headless view show:
the loss curves, the latest numbers, the machine's readings, the last checkpoint, the latest
sample, a short log of notable lines and the end event of the current attempt. For a
preference run (dpo, orpo) it also keeps the method, the run it continues (`from_run`), the
reward margin and preference accuracy by step (trl's `rewards/margins` and
`rewards/accuracies`) and the latest evaluation's preference accuracy. `apply` also
returns the event's line for a running account of the run (what the headless view prints).
No Textual here: the folding is plain Python, tested on its own, and a burst of thousands of
events costs one pass over them, not one redraw each.

A log can hold several attempts (a run stopped or crashed, then resumed): `started` begins a
new attempt, so it clears the end of the one before, and steps done again replace the old.
Like every viewer the fold ignores kinds and fields it does not know, and it never trusts a
field to be there or to have the right type (a torn or older log must not crash a view).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

ETA_WINDOW_STEPS = 20
"""Step events the ETA is measured over: recent enough to follow a change of speed."""
LOG_LINES = 300
"""Log lines kept; the oldest go first."""
SAMPLE_LINE_CHARS = 100
"""How much of a sample the running account shows (the dashboard has a panel for all of it)."""
PREFERENCE_METHODS = ("dpo", "orpo")
"""The methods that train on preference pairs and report rewards (localtune.knobs.METHODS)."""


def duration(s: float | None) -> str:
    """'4:05' or '1:02:03'; '-' when unknown."""
    if s is None or s != s:
        return "-"
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def num(v: float | None, fmt: str = ".4f") -> str:
    """`v` in `fmt`; '-' when it is not a number."""
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def human_bytes(n: float | None) -> str:
    """'1.2 GB', '340 MB', '12 kB' (powers of 1000, as the hub shows sizes); '?' when unknown."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def download_line(e: dict[str, Any]) -> str:
    """'downloading org/name  1.2/2.5 GB  48%  35.1 MB/s  eta 0:37  model-00001-of-00002.safetensors'
    from a `download` event."""
    done, total = e.get("bytes_done"), e.get("bytes_total")
    share = (f"  {100 * done / total:3.0f}%" if isinstance(done, (int, float)) and isinstance(total, (int, float))
             and total > 0 else "")
    speed = e.get("bytes_per_s")
    return (f"downloading {e.get('repo', '?')}  {human_bytes(done)}/{human_bytes(total)}{share}  "
            f"{human_bytes(speed) + '/s' if isinstance(speed, (int, float)) else '-'}  "
            f"eta {duration(_num(e, 'eta_s'))}  {e.get('file') or ''}").rstrip()


def _num(e: dict[str, Any], key: str) -> float | None:
    v = e.get(key)
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _int(e: dict[str, Any], key: str) -> int | None:
    v = _num(e, key)
    return int(v) if v is not None else None


class RunProgress:
    """A viewer's knowledge of one run; `apply` each event in the order of the log."""

    def __init__(self) -> None:
        self.train_loss: list[tuple[int, float]] = []
        """(step, loss) of every step event; a step done again after a resume replaces the old."""
        self.eval_loss: list[tuple[int, float]] = []
        self.curves_version = 0
        """Goes up whenever a loss curve changes, so the chart redraws only then."""
        self.method: str | None = None
        """"sft", "dpo" or "orpo" as the latest `started` says; None for a log that does not say (an older one)."""
        self.from_run: str | None = None
        """The run whose adapter this run continues (a DPO run after an SFT one), as `started` says."""
        self.reward_margins: list[tuple[int, float]] = []
        """(step, reward margin: chosen minus rejected reward) of every step event of a preference run."""
        self.reward_accuracies: list[tuple[int, float]] = []
        """(step, share of pairs whose chosen answer out-rewards the rejected one) of every step event."""
        self.eval_reward_accuracies: list[tuple[int, float]] = []
        """(step, preference accuracy on the evaluation pairs) of every eval event that has one."""
        self.rewards_version = 0
        """Goes up whenever a reward curve changes, so the rewards chart redraws only then."""
        self.rewards_chosen: float | None = None
        self.rewards_rejected: float | None = None
        self.reward_margin: float | None = None
        self.reward_accuracy: float | None = None
        self.log_odds_ratio: float | None = None
        """ORPO: the mean log odds ratio of chosen over rejected."""
        self.nll_loss: float | None = None
        """ORPO: the supervised (negative log-likelihood) part of its loss."""
        self.eval_reward_accuracy: float | None = None
        """The latest evaluation's preference accuracy."""
        self.eval_reward_margin: float | None = None
        self.step = 0
        self.max_steps: int | None = None
        self.epoch: float | None = None
        self.loss: float | None = None
        self.learning_rate: float | None = None
        self.grad_norm: float | None = None
        self.tokens_per_s: float | None = None
        self.elapsed_s: float | None = None
        self.pid: int | None = None
        """The worker of the latest attempt (its `started` event's pid)."""
        self.device: str | None = None
        self.precision: str | None = None
        self.memory_used_bytes: int | None = None
        self.memory_total_bytes: int | None = None
        self.utilization_pct: float | None = None
        self.temperature_c: float | None = None
        self.power_w: float | None = None
        self.cpu_pct: float | None = None
        self.ram_used_bytes: int | None = None
        self.devices: list[dict[str, Any]] = []
        """A run of several ranks: each rank's device as the last hardware event read it."""
        self.checkpoint_step: int | None = None
        self.checkpoint_name: str | None = None
        self.checkpoint_t: float | None = None
        self.sample: dict[str, Any] | None = None
        """The latest sample: {"step", "prompt", "text"}."""
        self.thermal_pause: dict[str, Any] | None = None
        """The thermal_pause event while the run waits for the GPU to cool, else None."""
        self.download: dict[str, Any] | None = None
        """The latest `download` event while the worker fetches a hub model's weights; None
        before any and once training has started."""
        self.stopping = False
        self.log: deque[tuple[str, str]] = deque(maxlen=LOG_LINES)
        """(level, line): level is "info", "warning" or "error"."""
        self.log_total = 0
        """Lines ever logged (the log keeps only the last LOG_LINES), so a viewer can tell what is new."""
        self.end: dict[str, Any] | None = None
        """The latest attempt's finished, stopped or failed event, once there is one (events.END_KINDS)."""
        self.events_seen = 0
        self._step_times: deque[tuple[float, int]] = deque(maxlen=ETA_WINDOW_STEPS)

    # ------------------------------------------------------------ derived

    @property
    def preference(self) -> bool:
        """Whether this is a preference run (dpo, orpo): its method says so, or its steps report rewards."""
        return self.method in PREFERENCE_METHODS or bool(self.reward_margins or self.reward_accuracies)

    def eta_s(self) -> float | None:
        """Seconds to the last step at the pace of the recent steps; None when unknown or over."""
        if self.end or not self.max_steps or len(self._step_times) < 2:
            return None
        (t0, s0), (t1, s1) = self._step_times[0], self._step_times[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        return (t1 - t0) / (s1 - s0) * max(0, self.max_steps - s1)

    # ------------------------------------------------------------ folding

    def apply(self, e: dict[str, Any]) -> str | None:
        """Fold one event in; return its line for a running account of the run, or None for
        the events that only move numbers (steps, hardware readings) and the kinds it does not know."""
        self.events_seen += 1
        fold = getattr(self, f"_on_{e.get('kind')}", None) if isinstance(e.get("kind"), str) else None
        return fold(e) if fold is not None else None

    def _note(self, line: str, level: str = "info") -> str:
        self.log.append((level, line))
        self.log_total += 1
        return line

    @staticmethod
    def _replace_from(points: list[tuple[int, float]], step: int) -> None:
        """Drop the points at `step` and after: that stretch is being trained again (a resume)."""
        while points and points[-1][0] >= step:
            points.pop()

    def _on_started(self, e: dict[str, Any]) -> str:
        self.pid = _int(e, "pid")
        method, from_run = e.get("method"), e.get("from_run")
        self.method = method if isinstance(method, str) and method else self.method
        self.from_run = from_run if isinstance(from_run, str) and from_run else self.from_run
        self.max_steps = _int(e, "max_steps") or self.max_steps
        self.device, self.precision = e.get("device"), e.get("precision")
        self.end, self.stopping, self.thermal_pause = None, False, None  # a resume starts a new attempt
        self.download = None  # training begins once the weights are all here
        self._step_times.clear()  # the time between attempts is no training pace
        src = f"resumed from {e['resumed_from']}" if e.get("resumed_from") else "from the start"
        how = f" in {self.precision}" if self.precision else ""
        world = _int(e, "world_size")
        if world and world > 1:  # several ranks: rank 0's device, and how many train with it
            mode = {"ddp": "data parallel", "fsdp": "sharded"}.get(str(e.get("parallel_mode")), "")
            how = f" x {world} ranks" + (f" ({mode})" if mode else "") + how
        how += ", padding-free" if e.get("padding_free") else ""
        # an sft run says what it always said; a preference run names its method and what it continues
        what = f"{self.method} " if self.method in PREFERENCE_METHODS else ""
        then = f"; continues run {self.from_run}'s adapter" if self.from_run else ""
        return self._note(f"started {what}on {self.device or '?'}{how} ({src}), {self.max_steps or '?'} steps{then}")

    def _on_download(self, e: dict[str, Any]) -> str | None:
        """The numbers go to `download` (the views draw a bar); the running account gets a line
        when a download begins and when it ends, not one a second."""
        before, self.download = self.download, e
        done, total = _int(e, "bytes_done"), _int(e, "bytes_total")
        if total is not None and done is not None and done >= total:
            return self._note(f"downloaded {e.get('repo', '?')}: {human_bytes(total)}")
        if before is None or before.get("repo") != e.get("repo"):
            return self._note(f"downloading {e.get('repo', '?')}: {human_bytes(total)} to fetch")
        return None

    def _on_step(self, e: dict[str, Any]) -> None:
        step = _int(e, "step")
        if step is None:
            return
        self.step = step
        self.max_steps = _int(e, "max_steps") or self.max_steps
        self.epoch = _num(e, "epoch")
        self.loss = _num(e, "loss")
        self.learning_rate = _num(e, "learning_rate")
        self.grad_norm = _num(e, "grad_norm")
        self.tokens_per_s = _num(e, "tokens_per_s")
        self.elapsed_s = _num(e, "elapsed_s")
        if self.loss is not None:
            self._replace_from(self.train_loss, step)
            self.train_loss.append((step, self.loss))
            self.curves_version += 1
        self._fold_rewards(e, step)
        t = _num(e, "t")
        if t is not None:
            if self._step_times and self._step_times[-1][1] >= step:
                self._step_times.clear()  # steps done again: the pace starts over
            self._step_times.append((t, step))

    def _fold_rewards(self, e: dict[str, Any], step: int) -> None:
        """A preference run's step: trl's rewards/* (and ORPO's log_odds_ratio, nll_loss) as
        the worker names them. An sft step has none of them and changes nothing here."""
        self.rewards_chosen = _num(e, "rewards_chosen")
        self.rewards_rejected = _num(e, "rewards_rejected")
        self.reward_margin = _num(e, "reward_margin")
        self.reward_accuracy = _num(e, "reward_accuracy")
        self.log_odds_ratio = _num(e, "log_odds_ratio")
        self.nll_loss = _num(e, "nll_loss")
        changed = False
        for points, value in ((self.reward_margins, self.reward_margin),
                              (self.reward_accuracies, self.reward_accuracy)):
            if value is not None or (points and points[-1][0] >= step):
                self._replace_from(points, step)
                if value is not None:
                    points.append((step, value))
                changed = True
        if changed:
            self.rewards_version += 1

    # eval and sample lines go to the running account but not to the log: the dashboard shows
    # them in the loss chart and the sample panel

    def _on_eval(self, e: dict[str, Any]) -> str | None:
        step, loss = _int(e, "step"), _num(e, "eval_loss")
        if step is None:
            return None
        accuracy, margin = _num(e, "eval_reward_accuracy"), _num(e, "eval_reward_margin")
        if accuracy is not None:
            self.eval_reward_accuracy, self.eval_reward_margin = accuracy, margin
            self._replace_from(self.eval_reward_accuracies, step)
            self.eval_reward_accuracies.append((step, accuracy))
            self.rewards_version += 1
        if loss is None:
            return None
        self._replace_from(self.eval_loss, step)
        self.eval_loss.append((step, loss))
        self.curves_version += 1
        line = f"step {step}: eval loss {loss:.4f}"
        if accuracy is not None:
            line += f", preference accuracy {accuracy:.2f}" + (f" (margin {margin:.3f})" if margin is not None else "")
        return line

    def _on_sample(self, e: dict[str, Any]) -> str:
        step = _int(e, "step")
        self.sample = {"step": step, "prompt": str(e.get("prompt") or ""), "text": str(e.get("text") or "")}
        text = " ".join(self.sample["text"].split())
        return f"step {'?' if step is None else step}: sample: {text[:SAMPLE_LINE_CHARS]}"

    def _on_hardware(self, e: dict[str, Any]) -> None:
        devices = e.get("devices")
        self.devices = [d for d in devices if isinstance(d, dict)] if isinstance(devices, list) else []
        self.memory_used_bytes = _int(e, "memory_used_bytes")
        self.memory_total_bytes = _int(e, "memory_total_bytes")
        self.utilization_pct = _num(e, "utilization_pct")
        self.temperature_c = _num(e, "temperature_c")
        self.power_w = _num(e, "power_w")
        self.cpu_pct = _num(e, "cpu_pct")
        self.ram_used_bytes = _int(e, "ram_used_bytes")

    def _on_checkpoint(self, e: dict[str, Any]) -> str:
        self.checkpoint_step = _int(e, "step")
        path = e.get("path")
        self.checkpoint_name = (Path(path).name if isinstance(path, str) and path
                                else f"checkpoint-{self.checkpoint_step}")
        self.checkpoint_t = _num(e, "t")
        return self._note(f"step {self.checkpoint_step}: {self.checkpoint_name} saved")

    def _on_warning(self, e: dict[str, Any]) -> str:
        return self._note(f"warning: {e.get('message', '')}", "warning")

    def _on_calibrated(self, e: dict[str, Any]) -> str:
        level = "warning" if e.get("action") == "replanned" else "info"
        return self._note(f"calibration: {e.get('note', '')}", level)

    def _on_oom_backoff(self, e: dict[str, Any]) -> str:
        self._step_times.clear()
        back_to = e.get("resume_from") or "the start"
        micro, accumulation = e.get("per_device_train_batch_size", "?"), e.get("gradient_accumulation_steps", "?")
        return self._note(f"step {e.get('step', '?')}: out of memory; micro-batch now {micro} x {accumulation}, "
                          f"max length {e.get('max_length', '?')}; back to {back_to}", "warning")

    def _on_thermal_pause(self, e: dict[str, Any]) -> str:
        self.thermal_pause = e
        return self._note(f"step {e.get('step', '?')}: paused: the GPU is at {e.get('temperature_c', '?')} C, "
                          f"over the {e.get('max_gpu_temp_c', '?')} C limit; waiting for it to cool", "warning")

    def _on_thermal_resume(self, e: dict[str, Any]) -> str:
        self.thermal_pause = None
        self._step_times.clear()  # the pause is no training pace
        return self._note(f"step {e.get('step', '?')}: going on after {e.get('paused_s', '?')} s "
                          f"(GPU at {e.get('temperature_c', '?')} C)")

    def _on_stopping(self, e: dict[str, Any]) -> str:
        self.stopping = True
        return self._note(f"stopping ({e.get('reason', 'asked')}): finishing the step and writing a checkpoint")

    def _on_finished(self, e: dict[str, Any]) -> str:
        self.end = e
        self.step = _int(e, "step") or self.step
        self.elapsed_s = _num(e, "elapsed_s") or self.elapsed_s
        loss = _num(e, "train_loss")
        return self._note(f"finished: {self.step} steps" + (f", mean loss {loss:.4f}" if loss is not None else "")
                          + f"; adapter in {e.get('adapter', '?')}")

    def _on_stopped(self, e: dict[str, Any]) -> str:
        self.end = e
        self.step = _int(e, "step") or self.step
        return self._note(f"stopped at step {self.step}" + (f" ({e['checkpoint']})" if e.get("checkpoint") else ""))

    def _on_interrupted(self, e: dict[str, Any]) -> str:
        self.end = e
        return self._note(f"interrupted: {e.get('error', '?')}", "error")

    def _on_failed(self, e: dict[str, Any]) -> str:
        self.end = e
        return self._note(f"failed: {e.get('error', '?')} (log: {e.get('log', '?')})", "error")
