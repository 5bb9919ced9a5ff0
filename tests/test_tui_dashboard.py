"""The dashboard: folding events (`RunProgress`), then the screen as a person meets it.

- `RunProgress` unit tests: every event kind, a resume that trains steps again, bad fields.
- A fabricated run folder (config, status.json, events written with `write_events`) shown on the
  dashboard: step, losses, sample, checkpoint age, the out-of-memory back-off line; events
  appended while it runs show up within a second; 5,000 events at once do not block the keys.
- A "worker" that only sleeps holds the run's lock (its command line names `localtune.worker`
  and the run, which is all `RunDir.live_worker_pid` checks), so a fabricated run is `running`.
- Reattach (slow): a real worker process trains a tiny model; the dashboard follows it and
  stops it with `s`.
- Snapshots at 100x30 and 80x24, and of a failed run, with a frozen clock.
- Preference runs (dpo, orpo): the fold keeps the method, the run continued, the reward margin
  and accuracy by step and the latest eval accuracy; the dashboard adds a rewards chart and
  their numbers, and the method in the title (snapshots at 100x30 and 80x24); an sft run's
  dashboard has none of it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from localtune.events import atomic_write_json
from localtune.runs import RunDir, create_run
from localtune.tui.app import LocaltuneApp
from localtune.tui.screens.dashboard import DashboardScreen, step_ticks, thin
from localtune.progress import RunProgress
from tests.helpers import live_worker
from tests.tui_support import (FIXED_NOW, GiB, cpu_machine, freeze_clock, preference_step_events, step_events,
                                write_events)

T0 = FIXED_NOW - 600.0
"""The fabricated runs started 10 minutes before the frozen clock."""


# ---------------------------------------------------------------- fabricated events


def started(t: float = T0, max_steps: int = 40, resumed_from: str | None = None) -> dict[str, Any]:
    return {"t": t, "kind": "started", "pid": 4242, "resumed_from": resumed_from, "max_steps": max_steps,
            "device": "cpu", "precision": "float32", "padding_free": True}


def hardware(t: float) -> dict[str, Any]:
    return {"t": t, "kind": "hardware", "memory_used_bytes": int(1.5 * GiB), "memory_total_bytes": 24 * GiB,
            "utilization_pct": None, "temperature_c": None, "power_w": None, "cpu_pct": 97.0,
            "ram_used_bytes": int(6.25 * GiB)}


SAMPLE_TEXT = "Ahoy! The capital of Italy be Rome, matey."


def mid_run_events() -> list[dict[str, Any]]:
    """A CPU run of 40 steps, 25 done: an out-of-memory back-off at step 12 sent it back to
    checkpoint-10, evals at 10 and 20, a checkpoint at 20 (T0 + 60 s), a sample at 20."""
    return [
        started(),
        {"t": T0 + 1, "kind": "warning", "message": "3 rows are longer than max_length 128 and were cut"},
        *step_events(1, 10, 40, t0=T0),
        {"t": T0 + 30.5, "kind": "eval", "step": 10, "eval_loss": 2.41},
        {"t": T0 + 31, "kind": "checkpoint", "step": 10, "path": "/runs/x/checkpoints/checkpoint-10"},
        *step_events(11, 11, 40, t0=T0),
        {"t": T0 + 36, "kind": "oom_backoff", "step": 12, "per_device_train_batch_size": 4,
         "gradient_accumulation_steps": 2, "max_length": 128, "resume_from": "checkpoint-10"},
        started(T0 + 37, resumed_from="checkpoint-10"),
        *step_events(11, 20, 40, t0=T0 + 10),
        {"t": T0 + 70.5, "kind": "eval", "step": 20, "eval_loss": 1.93},
        {"t": T0 + 70.6, "kind": "sample", "step": 20, "prompt": "What is the capital of Italy?", "text": SAMPLE_TEXT},
        {"t": T0 + 71, "kind": "checkpoint", "step": 20, "path": "/runs/x/checkpoints/checkpoint-20"},
        *step_events(21, 25, 40, t0=T0 + 10),
        hardware(T0 + 85.5),
    ]


# ---------------------------------------------------------------- RunProgress


def fold(events: list[dict[str, Any]]) -> RunProgress:
    p = RunProgress()
    for e in events:
        p.apply(e)
    return p


def log_lines(p: RunProgress) -> list[str]:
    return [line for _, line in p.log]


def test_progress_folds_a_run_with_a_back_off_and_a_resume():
    p = fold(mid_run_events())
    assert (p.step, p.max_steps, p.epoch) == (25, 40, 25 / 40)
    assert p.loss == round(3.2 * 0.96**25, 4) and p.tokens_per_s == 231.0
    assert p.learning_rate == pytest.approx(1e-3 * (1 - 25 / 40)) and p.grad_norm == 1.25
    # steps 11 again after the back-off: one point per step, the newest loss kept
    assert [s for s, _ in p.train_loss] == list(range(1, 26))
    assert p.train_loss[10] == (11, round(3.2 * 0.96**11, 4))
    assert p.eval_loss == [(10, 2.41), (20, 1.93)]
    assert (p.checkpoint_step, p.checkpoint_name, p.checkpoint_t) == (20, "checkpoint-20", T0 + 71)
    assert p.sample == {"step": 20, "prompt": "What is the capital of Italy?", "text": SAMPLE_TEXT}
    assert (p.memory_used_bytes, p.memory_total_bytes, p.cpu_pct) == (int(1.5 * GiB), 24 * GiB, 97.0)
    assert (p.utilization_pct, p.temperature_c, p.power_w) == (None, None, None)
    assert (p.device, p.precision, p.end) == ("cpu", "float32", None)
    # the pace of the steps since the resume (3 s each): 15 steps to go
    assert p.eta_s() == pytest.approx(45.0)
    assert log_lines(p) == [
        "started on cpu in float32, padding-free (from the start), 40 steps",
        "warning: 3 rows are longer than max_length 128 and were cut",
        "step 10: checkpoint-10 saved",
        "step 12: out of memory; micro-batch now 4 x 2, max length 128; back to checkpoint-10",
        "started on cpu in float32, padding-free (resumed from checkpoint-10), 40 steps",
        "step 20: checkpoint-20 saved",
    ]
    assert [level for level, _ in p.log] == ["info", "warning", "info", "warning", "info", "info"]


def test_progress_thermal_pause_stop_and_end():
    p = fold([started(max_steps=100), *step_events(1, 5, 100, t0=T0),
              {"t": T0 + 16, "kind": "hardware", "memory_used_bytes": 20 * GiB, "memory_total_bytes": 24 * GiB,
               "utilization_pct": 99.0, "temperature_c": 86.0, "power_w": 431.5, "cpu_pct": 12.0,
               "ram_used_bytes": 9 * GiB},
              {"t": T0 + 17, "kind": "thermal_pause", "step": 5, "temperature_c": 86.0, "max_gpu_temp_c": 83.0}])
    assert p.thermal_pause is not None and (p.utilization_pct, p.temperature_c, p.power_w) == (99.0, 86.0, 431.5)
    p.apply({"t": T0 + 77, "kind": "thermal_resume", "step": 5, "temperature_c": 74.0, "paused_s": 60.0})
    assert p.thermal_pause is None
    assert p.eta_s() is None  # the pause is no pace: the next steps measure it again
    for e in step_events(6, 8, 100, t0=T0 + 60):
        p.apply(e)
    assert p.eta_s() == pytest.approx(3.0 * 92)
    p.apply({"t": T0 + 90, "kind": "stopping", "reason": "SIGTERM"})
    assert p.stopping
    p.apply({"t": T0 + 95, "kind": "stopped", "step": 8, "checkpoint": "checkpoint-8"})
    assert p.end["kind"] == "stopped" and p.eta_s() is None
    assert log_lines(p)[1:] == [
        "step 5: paused: the GPU is at 86.0 C, over the 83.0 C limit; waiting for it to cool",
        "step 5: going on after 60.0 s (GPU at 74.0 C)",
        "stopping (SIGTERM): finishing the step and writing a checkpoint",
        "stopped at step 8 (checkpoint-8)",
    ]


def test_progress_failed_and_finished():
    p = fold([started(), *step_events(1, 3, 40, t0=T0),
              {"t": T0 + 10, "kind": "failed", "error": "RuntimeError: boom", "log": "/runs/x/worker.log"}])
    assert p.end["error"] == "RuntimeError: boom"
    assert p.log[-1] == ("error", "failed: RuntimeError: boom (log: /runs/x/worker.log)")
    p = fold([started(max_steps=3), *step_events(1, 3, 3, t0=T0),
              {"t": T0 + 10, "kind": "finished", "step": 3, "adapter": "/runs/x/adapter", "train_loss": 2.5,
               "elapsed_s": 9.5, "tokens": 1000, "peak_memory_bytes": GiB}])
    assert (p.end["kind"], p.elapsed_s, p.eta_s()) == ("finished", 9.5, None)
    assert log_lines(p)[-1] == "finished: 3 steps, mean loss 2.5000; adapter in /runs/x/adapter"


def test_progress_ignores_unknown_kinds_fields_and_bad_values():
    p = fold([{"t": T0, "kind": "from_the_future", "step": 99},
              {"t": T0, "no_kind": True},
              {"t": T0, "kind": 7},
              {"t": T0, "kind": "step", "loss": 1.0},  # no step: nothing to place it at
              {"t": T0, "kind": "step", "step": 2, "max_steps": 10, "loss": "nan?", "new_field": [1]},
              {"t": T0, "kind": "eval", "step": 2, "eval_loss": None},
              {"t": T0, "kind": "hardware", "memory_used_bytes": "lots"}])
    assert (p.step, p.max_steps, p.loss, p.train_loss, p.eval_loss) == (2, 10, None, [], [])
    assert p.memory_used_bytes is None and p.events_seen == 7 and not p.log


def test_progress_keeps_the_last_log_lines():
    p = fold([{"t": T0, "kind": "warning", "message": f"w{i}"} for i in range(1000)])
    assert p.log_total == 1000 and len(p.log) < 1000 and p.log[-1] == ("warning", "warning: w999")


def test_chart_ticks_are_whole_steps():
    assert step_ticks(1, 7) == [1, 3, 5, 7]
    assert step_ticks(1, 25) == [1, 7, 13, 19, 25]
    assert step_ticks(1, 5000) == [1, 1251, 2501, 3751, 5000]
    assert step_ticks(3, 3) == [3]


def test_thin_keeps_the_last_point():
    points = [(s, 1.0 / s) for s in range(1, 5001)]
    thinned = thin(points, 1000)
    assert len(thinned) <= 1001 and thinned[0] == points[0] and thinned[-1] == points[-1]
    assert thin(points[:10], 1000) == points[:10]


# ---------------------------------------------------------------- the screen: helpers


def fabricate_run(run_id: str = "20260921-115000-smollm2-135m", events: list[dict[str, Any]] | None = None,
                  state: str = "running", model: str = "smollm2-135m", **status: Any) -> RunDir:
    """A run folder as a worker leaves it mid-run (no worker: `live_worker` adds one)."""
    run = create_run({"run": {"model": model, "data": "demo"}, "knobs": {}}, {}, run_id)
    write_events(run.events_path, mid_run_events() if events is None else events)
    atomic_write_json(run.status_path, {"state": state, "created": T0, "updated": T0 + 86, "step": 25,
                                        "max_steps": 40, **status})
    return run


def drive(run: RunDir, test: Callable[[LocaltuneApp, Any], Awaitable[None]], size=(100, 30)) -> LocaltuneApp:
    """Open the app on the run's dashboard (headless), then `test(app, pilot)`."""
    app = LocaltuneApp(hardware=cpu_machine(), open_run=run.id)

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await test(app, pilot)

    asyncio.run(main())
    return app


async def until(pilot, check: Callable[[], Any], timeout_s: float = 5.0, what: str = "") -> float:
    """Wait (letting the app run) until `check()` is true; return the seconds it took."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what or check}")
        await pilot.pause(0.05)
    return time.monotonic() - t0


def dashboard(app: LocaltuneApp) -> DashboardScreen:
    assert isinstance(app.screen, DashboardScreen), app.screen
    return app.screen


def shown(app: LocaltuneApp, widget_id: str) -> str:
    """The text a Static of the dashboard shows now."""
    return str(dashboard(app).query_one(f"#{widget_id}").render())


def shown_log(app: LocaltuneApp) -> str:
    """The log as shown, its wrapped lines joined with spaces."""
    return " ".join(" ".join(strip.text for strip in dashboard(app).query_one("#dash-log").lines).split())


def notices(app: LocaltuneApp) -> list[str]:
    return [n.message for n in app._notifications]


async def folded(app: LocaltuneApp, pilot, events: int, state: str | None = None) -> None:
    """Wait until the dashboard has folded `events` events (and seen `state`) and redrawn."""
    await until(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.progress.events_seen == events
                and (state is None or app.screen.run_state == state) and not app.screen._dirty,
                what=f"{events} events folded, state {state}")
    await pilot.pause()


# ---------------------------------------------------------------- the screen


def test_dashboard_shows_a_run_and_follows_new_events(monkeypatch):
    freeze_clock(monkeypatch)
    run = fabricate_run()

    async def test(app, pilot):
        await folded(app, pilot, len(mid_run_events()), "running")
        assert "step 25/40" in shown(app, "dash-step") and "epoch 0.62" in shown(app, "dash-step")
        assert shown(app, "dash-loss") == f"loss {3.2 * 0.96**25:.4f}   eval 1.9300"
        assert shown(app, "dash-time") == "elapsed 1:15   ETA 0:45"
        assert shown(app, "dash-checkpoint") == "checkpoint-20, 8m ago"
        assert SAMPLE_TEXT in shown(app, "dash-sample")
        assert shown(app, "dash-gpu") == "GPU -" and shown(app, "dash-cpu") == "CPU 97%   RAM 6.2 GB"
        assert "run 20260921-115000-smollm2-135m  ·  smollm2-135m  ·  running" == shown(app, "dash-title")
        assert "step 12: out of memory; micro-batch now 4 x 2, max length 128; back to checkpoint-10" in shown_log(app)
        assert not dashboard(app).query_one("#dash-end").display

        # the worker writes on: the reader thread brings it in within a second
        write_events(run.events_path, [*step_events(26, 30, 40, t0=T0 + 10),
                                       {"t": T0 + 101, "kind": "sample", "step": 30, "prompt": "What is 2+2?",
                                        "text": "Ahoy! Four, matey."}])
        took = await until(pilot, lambda: "step 30/40" in shown(app, "dash-step")
                           and "Four, matey" in shown(app, "dash-sample"), timeout_s=1.5)
        assert took < 1.0

    with live_worker(run):
        drive(run, test)


def test_a_burst_of_events_is_folded_without_blocking_the_keys(monkeypatch):
    freeze_clock(monkeypatch)
    run = fabricate_run(events=[started(max_steps=5000)], max_steps=5000)

    async def test(app, pilot):
        screen = dashboard(app)
        await folded(app, pilot, 1)
        redraws = screen.redraws
        write_events(run.events_path, step_events(1, 5000, 5000, t0=T0, dt=0.5))
        t0 = time.monotonic()
        await pilot.press("e")  # no adapter: refused with a message at once
        await until(pilot, lambda: any("no adapter yet" in n for n in notices(app)), timeout_s=1.0)
        assert time.monotonic() - t0 < 1.0
        await folded(app, pilot, 5001)
        assert "step 5000/5000" in shown(app, "dash-step")
        assert len(screen.progress.train_loss) == 5000
        assert screen.redraws - redraws < 15  # a few redraws, not one per event

    drive(run, test)


def test_detach_leaves_the_worker_running(monkeypatch):
    run = fabricate_run()

    async def test(app, pilot):
        await folded(app, pilot, len(mid_run_events()), "running")
        screen = dashboard(app)
        await pilot.press("d")
        await until(pilot, lambda: not isinstance(app.screen, DashboardScreen), timeout_s=1.0)
        assert run.live_worker_pid() == worker.pid
        assert any("still training in the background" in n for n in notices(app))
        await until(pilot, lambda: screen.reader.is_finished, timeout_s=2.0, what="the reader thread stops")

    with live_worker(run) as worker:
        drive(run, test)
        assert worker.poll() is None


def test_export_and_stop_are_refused_when_they_cannot_work(monkeypatch):
    run = fabricate_run(state="stopped")
    exported: list[RunDir] = []
    monkeypatch.setattr(LocaltuneApp, "open_export", lambda app, r: exported.append(r))

    async def test(app, pilot):
        await folded(app, pilot, len(mid_run_events()), "stopped")
        await pilot.press("e")
        await pilot.press("s")
        await pilot.pause()
        assert any("no adapter yet (stopped)" in n and "resume it first" in n for n in notices(app))
        assert any("has no live worker (stopped): nothing to stop" in n for n in notices(app))
        assert not exported and isinstance(app.screen, DashboardScreen)
        run.adapter_dir.mkdir()  # once there is an adapter, `e` opens the export screen
        await pilot.press("e")
        assert [r.id for r in exported] == [run.id]

    drive(run, test)


def test_resume_key_resumes_a_stopped_run_and_refuses_a_live_one(monkeypatch):
    run = fabricate_run(state="stopped")
    resumed: list[str] = []

    def fake_resume(r, force=False):  # the real resume is the end-to-end flow test's
        resumed.append(r.id)
        return None, "from checkpoint-20"

    monkeypatch.setattr("localtune.launch.resume_run", fake_resume)

    async def test(app, pilot):
        await folded(app, pilot, len(mid_run_events()), "stopped")
        await pilot.press("r")
        await until(pilot, lambda: resumed, timeout_s=2.0, what="resume_run to be called")
        await until(pilot, lambda: any("resumed run" in n and "from checkpoint-20" in n for n in notices(app)),
                    timeout_s=2.0, what="the resumed notice")

    drive(run, test)
    assert resumed == [run.id]

    live = fabricate_run("20260921-120000-smollm2-135m")

    async def refused(app, pilot):
        await folded(app, pilot, len(mid_run_events()), "running")
        await pilot.press("r")
        await pilot.pause()
        assert any("is running: nothing to resume" in n for n in notices(app))

    with live_worker(live):
        drive(live, refused)
    assert resumed == [run.id]


def test_resume_after_the_model_changed_asks_first(monkeypatch):
    from localtune.launch import RunInputsChanged

    run = fabricate_run(state="stopped")
    forced: list[bool] = []

    def resume(r, force=False):
        forced.append(force)
        if not force:
            change = "the model /home/you/base changed since the run began"
            raise RunInputsChanged(f"run {r.id}: {change}; ... pass --force to resume anyway", [change])
        return None, "from checkpoint-20"

    monkeypatch.setattr("localtune.launch.resume_run", resume)

    async def test(app, pilot):
        await folded(app, pilot, len(mid_run_events()), "stopped")
        await pilot.press("r")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmScreen", timeout_s=2.0,
                    what="the resume-anyway question")
        assert "The model /home/you/base changed" in str(app.screen.query_one("#confirm-question").content)
        await pilot.click("#answer-force")
        await until(pilot, lambda: forced == [False, True], timeout_s=2.0, what="the forced resume")

    drive(run, test)


def test_gpu_readings_a_thermal_pause_and_a_stop_called_off(monkeypatch):
    events = [started(max_steps=100), *step_events(1, 5, 100, t0=T0),
              {"t": T0 + 16, "kind": "hardware", "memory_used_bytes": 20 * GiB, "memory_total_bytes": 24 * GiB,
               "utilization_pct": 99.0, "temperature_c": 86.0, "power_w": 431.5, "cpu_pct": 12.0,
               "ram_used_bytes": 9 * GiB},
              {"t": T0 + 17, "kind": "thermal_pause", "step": 5, "temperature_c": 86.0, "max_gpu_temp_c": 83.0}]
    run = fabricate_run(events=events)

    async def test(app, pilot):
        await folded(app, pilot, len(events), "running")
        assert shown(app, "dash-gpu") == "GPU 99%  86 C  432 W"
        assert shown(app, "dash-title").endswith("·  paused: GPU 86.0 C")
        assert "20.0 GB / 24.0 GB" in str(dashboard(app).query_one("#dash-memory").render())
        await pilot.press("s")
        await until(pilot, lambda: app.screen.query("#answer-stop"), timeout_s=2.0, what="the stop question")
        await pilot.press("escape")  # called off: nothing is signalled
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen), timeout_s=1.0)
        await pilot.pause(0.2)
        assert worker.poll() is None and run.live_worker_pid() == worker.pid

    with live_worker(run) as worker:
        drive(run, test)


def test_escape_goes_back(monkeypatch):
    run = fabricate_run(state="completed")

    async def test(app, pilot):
        await folded(app, pilot, len(mid_run_events()))
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, DashboardScreen), timeout_s=1.0)

    drive(run, test)


# ---------------------------------------------------------------- reattach to a real worker


@pytest.mark.slow
def test_reattach_to_a_training_worker_and_stop_it(tiny_chat_model_dir: Path, localtune_home: Path):
    """A worker started by another process (as if by yesterday's TUI) trains; the dashboard
    follows it, and `s` + confirm stops it with a checkpoint."""
    from localtune.demo import demo_dataset_path
    from localtune.models import resolve_model
    from localtune.plan import make_plan
    from tests.conftest import TINY_RUN_KNOBS
    from tests.test_worker import REPO_ROOT

    data = localtune_home / "train.jsonl"
    data.write_text("\n".join(demo_dataset_path().read_text(encoding="utf-8").splitlines()[:40]) + "\n",
                    encoding="utf-8")
    plan = make_plan(cpu_machine(), resolve_model(str(tiny_chat_model_dir)), profile="cpu",
                     pinned={**TINY_RUN_KNOBS, "max_steps": 400, "save_steps": 10, "eval_steps": 10})
    run = create_run({"run": {"model": str(tiny_chat_model_dir), "data": str(data), "eval_split": 0.1},
                      "knobs": plan.knobs.to_dict()}, plan.to_dict(), "tiny-live")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    with open(run.log_path, "ab") as log:
        worker = subprocess.Popen([sys.executable, "-m", "localtune.worker", str(run.path)], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, start_new_session=True)

    async def test(app, pilot):
        await until(pilot, lambda: dashboard(app).progress.step >= 3 and dashboard(app).progress.loss is not None
                    and dashboard(app).run_state == "running", timeout_s=90, what="3 steps trained")
        await until(pilot, lambda: "loss " in shown(app, "dash-loss") and "step " in shown(app, "dash-step"))
        await pilot.press("s")
        await until(pilot, lambda: app.screen.query("#answer-stop"), timeout_s=2.0, what="the stop question")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, DashboardScreen) and dashboard(app).progress.end
                    and dashboard(app).run_state == "stopped", timeout_s=60, what="the worker stopped")
        await pilot.pause(0.3)
        assert "stopped" in shown(app, "dash-title") and "stopped at step" in shown(app, "dash-end")
        assert any("stopping" in n for n in notices(app))

    try:
        drive(run, test)
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    status = run.read_status()
    assert status["state"] == "stopped", run.log_path.read_text()[-2000:]
    assert run.complete_checkpoints() and run.complete_checkpoints()[-1].name == f"checkpoint-{status['step']}"
    assert 3 <= status["step"] < 400


def test_a_worker_that_died_before_it_started_shows_a_failed_banner_with_its_last_words(monkeypatch):
    freeze_clock(monkeypatch)
    # a stopped run resumed by a launcher whose worker could not even import: the launcher's
    # mark in the status, a traceback in worker.log, nobody holding the lock
    events = [started(), *step_events(1, 7, 40, t0=T0), {"t": T0 + 30, "kind": "stopped", "step": 7,
                                                         "checkpoint": "checkpoint-7"}]
    run = fabricate_run(events=events, state="stopped", launched=T0 + 60)
    run.log_path.write_text("Traceback (most recent call last):\n  ...\nModuleNotFoundError: No module named 'trl'\n")

    async def test(app, pilot):
        await folded(app, pilot, len(events), "failed")
        assert shown(app, "dash-end") == ("failed: the worker exited before it started: ModuleNotFoundError: No module "
                                          f"named 'trl'\nlog: {run.log_path}")
        assert shown(app, "dash-title").endswith("·  failed")

    drive(run, test)


# ---------------------------------------------------------------- snapshots


def snapshot_app(monkeypatch, run: RunDir) -> LocaltuneApp:
    freeze_clock(monkeypatch)
    return LocaltuneApp(hardware=cpu_machine(), open_run=run.id)


def wait_for(events: int, state: str):
    async def run_before(pilot) -> None:
        await folded(pilot.app, pilot, events, state)

    return run_before


@pytest.mark.parametrize("size", [(100, 30), (80, 24)], ids=["100x30", "80x24"])
def test_snapshot_mid_run(snap_compare, monkeypatch, size):
    run = fabricate_run()
    with live_worker(run):
        assert snap_compare(snapshot_app(monkeypatch, run), terminal_size=size,
                            run_before=wait_for(len(mid_run_events()), "running"))


def test_snapshot_failed_run(snap_compare, monkeypatch):
    events = [started(), *step_events(1, 7, 40, t0=T0), hardware(T0 + 22),
              {"t": T0 + 25, "kind": "failed", "error": "RuntimeError: CUDA error: an illegal memory access was "
               "encountered", "log": "/home/me/.local/share/localtune/runs/x/worker.log"}]
    run = fabricate_run("20260921-115000-qwen2-5-0-5b", events, state="failed", model="Qwen/Qwen2.5-0.5B-Instruct",
                        error="RuntimeError: CUDA error: an illegal memory access was encountered")
    assert snap_compare(snapshot_app(monkeypatch, run), terminal_size=(100, 30),
                        run_before=wait_for(len(events), "failed"))


# ---------------------------------------------------------------- preference runs (dpo, orpo)

SFT_RUN = "20260921-101500-smollm2-135m"
"""The completed sft run the fabricated DPO run continues."""


def preference_started(t: float = T0, max_steps: int = 24, method: str = "dpo", from_run: str | None = SFT_RUN,
                       resumed_from: str | None = None) -> dict[str, Any]:
    return {**started(t, max_steps, resumed_from), "method": method, "from_run": from_run}


def dpo_events() -> list[dict[str, Any]]:
    """A DPO run of 24 steps continuing SFT_RUN, 16 done: evals (with the preference accuracy)
    at 8 and 16, a checkpoint at 16, a sample at 16."""
    return [
        preference_started(),
        *preference_step_events(1, 8, 24, t0=T0),
        {"t": T0 + 24.5, "kind": "eval", "step": 8, "eval_loss": 0.6412, "eval_reward_accuracy": 0.625,
         "eval_reward_margin": 0.118},
        *preference_step_events(9, 16, 24, t0=T0),
        {"t": T0 + 48.5, "kind": "eval", "step": 16, "eval_loss": 0.5873, "eval_reward_accuracy": 0.8125,
         "eval_reward_margin": 0.311},
        {"t": T0 + 48.6, "kind": "sample", "step": 16, "prompt": "What is the capital of Italy?", "text": SAMPLE_TEXT},
        {"t": T0 + 49, "kind": "checkpoint", "step": 16, "path": "/runs/x/checkpoints/checkpoint-16"},
        hardware(T0 + 49.5),
    ]


def test_progress_folds_a_dpo_run_its_rewards_and_its_eval_accuracy():
    p = fold(dpo_events())
    assert (p.method, p.from_run, p.preference) == ("dpo", SFT_RUN, True)
    assert [s for s, _ in p.reward_margins] == list(range(1, 17)) == [s for s, _ in p.reward_accuracies]
    assert p.reward_margins[-1] == (16, 0.56) and p.reward_accuracies[-1] == (16, 1.0)
    assert (p.rewards_chosen, p.rewards_rejected, p.reward_margin, p.reward_accuracy) == (0.32, -0.24, 0.56, 1.0)
    assert (p.log_odds_ratio, p.nll_loss) == (None, None)  # DPO reports neither
    assert p.eval_reward_accuracies == [(8, 0.625), (16, 0.8125)]
    assert (p.eval_reward_accuracy, p.eval_reward_margin) == (0.8125, 0.311)
    assert p.eval_loss == [(8, 0.6412), (16, 0.5873)]  # the eval loss is still the loss chart's
    assert log_lines(p)[0] == ("started dpo on cpu in float32, padding-free (from the start), 24 steps; "
                               f"continues run {SFT_RUN}'s adapter")

    # a resume at checkpoint-8 trains steps 9.. again: their rewards are replaced, not doubled
    version = p.rewards_version
    p.apply(preference_started(T0 + 60, resumed_from="checkpoint-8"))
    for e in preference_step_events(9, 10, 24, t0=T0 + 40):
        e["reward_margin"] = -1.0
        p.apply(e)
    assert p.rewards_version > version
    assert [s for s, _ in p.reward_margins] == list(range(1, 11)) and p.reward_margins[-1] == (10, -1.0)
    assert len(p.reward_accuracies) == 10
    assert log_lines(p)[-1].startswith("started dpo on cpu in float32, padding-free (resumed from checkpoint-8)")


def test_progress_folds_orpo_and_the_eval_line_names_the_preference_accuracy():
    p = RunProgress()
    p.apply(preference_started(method="orpo", from_run=None))
    for e in preference_step_events(1, 4, 24, t0=T0, orpo=True):
        p.apply(e)
    line = p.apply({"t": T0 + 13, "kind": "eval", "step": 4, "eval_loss": 1.25, "eval_reward_accuracy": 0.75,
                    "eval_reward_margin": 0.2})
    assert (p.method, p.from_run, p.preference) == ("orpo", None, True)
    assert (p.log_odds_ratio, p.nll_loss) == (-0.6, 1.78)
    assert line == "step 4: eval loss 1.2500, preference accuracy 0.75 (margin 0.200)"
    assert log_lines(p) == ["started orpo on cpu in float32, padding-free (from the start), 24 steps"]


def test_progress_of_an_sft_run_is_as_before_whether_its_log_names_the_method_or_not():
    for first in (started(), {**started(), "method": "sft", "from_run": None}):
        p = fold([first, *step_events(1, 5, 40, t0=T0), {"t": T0 + 16, "kind": "eval", "step": 5, "eval_loss": 2.0}])
        assert not p.preference and p.reward_margins == [] and p.eval_reward_accuracy is None
        assert p.rewards_version == 0 and p.from_run is None
        assert log_lines(p) == ["started on cpu in float32, padding-free (from the start), 40 steps"]
        assert p.apply({"t": T0 + 31, "kind": "eval", "step": 10, "eval_loss": 1.5}) == "step 10: eval loss 1.5000"


def fabricate_dpo_run(run_id: str = "20260921-115000-smollm2-135m", events: list[dict[str, Any]] | None = None,
                      state: str = "running", method: str = "dpo") -> RunDir:
    run = create_run({"run": {"model": "smollm2-135m", "data": "/data/pairs.jsonl", "from_run": SFT_RUN},
                      "knobs": {"method": method, "beta": 0.1}}, {}, run_id)
    write_events(run.events_path, dpo_events() if events is None else events)
    atomic_write_json(run.status_path, {"state": state, "created": T0, "updated": T0 + 50, "step": 16,
                                        "max_steps": 24})
    return run


def test_dashboard_of_a_dpo_run_shows_rewards_beside_the_loss(monkeypatch):
    freeze_clock(monkeypatch)
    run = fabricate_dpo_run()

    async def test(app, pilot):
        await folded(app, pilot, len(dpo_events()), "running")
        screen = dashboard(app)
        assert shown(app, "dash-title") == f"run {run.id}  ·  dpo  ·  smollm2-135m  ·  running"
        assert screen.query_one("#dash-rewards").border_subtitle == f"from run {SFT_RUN}"
        assert screen.query_one("#dash-rewards").display and screen.query_one("#dash-chart").display
        assert screen.query_one("#dash-rewards").border_title == "reward margin · preference accuracy"
        assert shown(app, "dash-pref") == "margin 0.560   acc 1.00"
        assert shown(app, "dash-pref-eval") == "eval acc 0.81   margin 0.311"
        assert shown(app, "dash-loss") == f"loss {0.6931 * 0.95**16:.4f}   eval 0.5873"
        assert ("started dpo on cpu in float32, padding-free (from the start), 24 steps; "
                f"continues run {SFT_RUN}'s adapter") in shown_log(app)
        # the chart is drawn with both series and the eval accuracy in its legend
        assert screen._rewards_version == screen.progress.rewards_version > 0
        chart = str(screen.query_one("#dash-rewards").render())
        assert "margin" in chart and "acc" in chart and "eval acc" in chart

        write_events(run.events_path, preference_step_events(17, 18, 24, t0=T0))
        await until(pilot, lambda: "step 18/24" in shown(app, "dash-step"), timeout_s=1.5)
        assert shown(app, "dash-pref") == "margin 0.630   acc 1.00"

    with live_worker(run):
        drive(run, test)


def test_before_its_first_event_a_dpo_run_is_known_by_its_config(monkeypatch):
    """A DPO run whose worker is still loading: no `started` yet, the method comes from config.toml."""
    run = fabricate_dpo_run(events=[], state="created")

    async def test(app, pilot):
        await folded(app, pilot, 0, "created")
        screen = dashboard(app)
        assert screen.query_one("#dash-rewards").display
        assert shown(app, "dash-title").startswith(f"run {run.id}  ·  dpo  ·  smollm2-135m")
        assert shown(app, "dash-pref") == "margin -   acc -"

    drive(run, test)


def test_an_sft_dashboard_has_no_rewards(monkeypatch):
    events = [{**started(), "method": "sft", "from_run": None}, *step_events(1, 5, 40, t0=T0)]
    run = fabricate_run(events=events, state="stopped")

    async def test(app, pilot):
        await folded(app, pilot, len(events), "stopped")
        screen = dashboard(app)
        assert not screen.query_one("#dash-rewards").display
        assert not screen.query_one("#dash-pref").display and not screen.query_one("#dash-pref-eval").display
        assert shown(app, "dash-title") == "run 20260921-115000-smollm2-135m  ·  smollm2-135m  ·  stopped"

    drive(run, test)


@pytest.mark.parametrize("size", [(100, 30), (80, 24)], ids=["100x30", "80x24"])
def test_snapshot_dpo_run(snap_compare, monkeypatch, size):
    run = fabricate_dpo_run()
    with live_worker(run):
        assert snap_compare(snapshot_app(monkeypatch, run), terminal_size=size,
                            run_before=wait_for(len(dpo_events()), "running"))


def test_a_run_of_two_ranks_shows_each_ranks_gpu_and_an_interrupted_end(monkeypatch):
    """Several ranks (localtune.distributed): the start says how many train, the hardware panel
    has a line for each rank's GPU, and a rank that died without a word ends the run
    `interrupted`, naming the rank and where resume starts."""
    freeze_clock(monkeypatch)

    def gpu(rank: int, used_gb: float, temp: float) -> dict[str, Any]:
        return {"rank": rank, "name": "NVIDIA GeForce RTX 3090", "index": rank, "memory_used_bytes": int(used_gb * GiB),
                "memory_total_bytes": 24 * GiB, "utilization_pct": 97.0, "temperature_c": temp, "power_w": 280.0}

    first = {**started(), "device": "cuda:0", "precision": "bfloat16", "world_size": 2, "parallel_mode": "ddp",
             "devices": [0, 1]}
    reading = {**hardware(T0 + 3), "devices": [gpu(0, 12.5, 71.0), gpu(1, 12.25, 78.0)]}
    why = ("rank 1 ended without a word (killed, or out of the machine's memory); every rank was stopped; "
           "`localtune resume x` starts them all from checkpoint-2")
    run = fabricate_run(events=[first, *step_events(1, 3, 40, t0=T0), reading,
                                {"t": T0 + 9, "kind": "interrupted", "error": why, "log": "/tmp/worker.log"}],
                        state="interrupted", error=why)

    async def test(app, pilot):
        await folded(app, pilot, 6)
        lines = shown(app, "dash-gpu").splitlines()
        assert lines == ["rank 0 GPU 0  12.5/24.0 GB  97%  71 C  280 W", "rank 1 GPU 1  12.2/24.0 GB  97%  78 C  280 W"]
        assert "started on cuda:0 x 2 ranks (data parallel) in bfloat16" in shown_log(app)
        banner = str(dashboard(app).query_one("#dash-end").render())
        assert banner.startswith("interrupted: rank 1 ended without a word")
        assert "r resumes every rank from the last checkpoint" in banner

    drive(run, test)
