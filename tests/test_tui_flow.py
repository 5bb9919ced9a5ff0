"""The whole TUI flow on a real worker, as a person goes through it: the Machine screen, a
new run (a tiny model, a data file, a few knobs typed in), Start, the dashboard counting
steps, stop, the Runs screen, resume, the run completing on the dashboard, an export that
writes files, and a chat that answers. Then quitting while a run trains asks first and
leaves the worker alone.

The model is `tiny_chat_model_dir` (a tiny Llama with the built-in model's real tokenizer),
so the worker trains for real at a fraction of a second per step."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Callable

import pytest

from localtune.demo import demo_dataset_path
from localtune.runs import RunDir, list_runs
from localtune.tui.app import LocaltuneApp
from tests.test_tui_machine import shown
from tests.test_tui_new_run import paste_into, settle_all
from tests.tui_support import cpu_machine

MAX_STEPS = 12
"""About a second a step (the profile's 8 micro-batches of 2 rows); stop comes at step 2."""


async def until(pilot, what: str, cond: Callable[[], bool], timeout: float = 120.0) -> None:
    """Let the app run until `cond()` holds; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout:.0f} s still waiting for: {what}")
        await pilot.pause(0.1)


def screen_name(app: LocaltuneApp) -> str:
    return type(app.screen).__name__


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "my data.jsonl"
    path.write_text("\n".join(demo_dataset_path().read_text(encoding="utf-8").splitlines()[:48]) + "\n",
                    encoding="utf-8")
    return path


@pytest.fixture
def quiet_worker(monkeypatch) -> None:
    """One thread for the worker's torch, so the app's own thread stays responsive on 2 cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def kill_workers() -> None:
    for run in list_runs():
        pid = run.live_worker_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_machine_new_run_train_stop_resume_export_chat(tiny_chat_model_dir: Path, data_file: Path,
                                                        tmp_path: Path, quiet_worker) -> None:
    app = LocaltuneApp(hardware=cpu_machine())
    export_to = tmp_path / "exported adapter"

    async def main() -> None:
        async with app.run_test(size=(100, 30)) as pilot:
            # the Machine screen: what the probe found and the profile it matched
            assert screen_name(app) == "MachineScreen"
            assert "cpu" in shown(app, "#profile-name")

            # a new run: the tiny model, the data file, a short run
            await pilot.press("2")
            await settle_all(pilot)
            assert screen_name(app) == "NewRunScreen"
            await paste_into(pilot, "#model-input", str(tiny_chat_model_dir))
            await paste_into(pilot, "#data-input", str(data_file))
            assert "48 valid" in shown(app, "#data-summary")
            for selector, value in (("#knob-max-steps", MAX_STEPS), ("#knob-max-length", 64),
                                    ("#knob-micro-batch", 2)):
                await paste_into(pilot, selector, str(value))
            plan = app.screen.plan
            assert (plan.knobs.max_steps, plan.knobs.max_length, plan.knobs.per_device_train_batch_size) == \
                (MAX_STEPS, 64, 2)
            assert plan.fits and not app.screen.blockers()
            await pilot.press("escape", "ctrl+s")

            # Start: the worker trains in its own process and the dashboard counts its steps
            await until(pilot, "the dashboard", lambda: screen_name(app) == "DashboardScreen")
            dash = app.screen
            run: RunDir = dash.run
            assert run.read_config()["knobs"]["max_steps"] == MAX_STEPS
            await until(pilot, "step 2 on the dashboard", lambda: dash.progress.step >= 2)
            assert dash.progress.loss is not None and f"/{MAX_STEPS}" in shown(app, "#dash-step")

            # stop: it writes a checkpoint and the dashboard says so
            await pilot.press("s")
            await until(pilot, "the stop question", lambda: screen_name(app) == "ConfirmScreen")
            await pilot.press("enter")
            await until(pilot, "the stopped state", lambda: dash.run_state == "stopped", timeout=60)
            stopped_at = dash.progress.step
            assert 2 <= stopped_at < MAX_STEPS
            assert run.complete_checkpoints()[-1].name == f"checkpoint-{stopped_at}"
            await until(pilot, "the stopped banner", lambda: "stopped" in shown(app, "#dash-end"), timeout=5)

            # the Runs screen lists it as stopped; r resumes it and its dashboard follows
            await pilot.press("escape", "3")
            await until(pilot, "the run in the Runs table",
                        lambda: screen_name(app) == "RunsScreen" and run.id in app.screen.summaries)
            assert app.screen.summaries[run.id]["state"] == "stopped"
            assert app.screen.selected_run().id == run.id
            await pilot.press("r")
            await until(pilot, "the resumed run's dashboard", lambda: screen_name(app) == "DashboardScreen")
            dash = app.screen
            await until(pilot, "the run to complete", lambda: dash.run_state == "completed", timeout=240)
            assert dash.progress.step == MAX_STEPS
            await until(pilot, "the finished banner", lambda: "finished" in shown(app, "#dash-end"), timeout=5)
            log = [line for _, line in dash.progress.log]
            assert any(f"resumed from checkpoint-{stopped_at}" in line for line in log), log

            # export the adapter to a folder of our choosing: files written, the check shown
            await pilot.press("e")
            await until(pilot, "the Export screen", lambda: screen_name(app) == "ExportScreen")
            app.screen.query_one("#dest").value = str(export_to)
            await pilot.click("#export")
            await until(pilot, "the export", lambda: app.screen.result is not None, timeout=120)
            assert (export_to / "adapter_model.safetensors").is_file()
            assert "exported as adapter" in str(app.screen.query_one("#export-result-text").content)

            # chat with the tuned model
            await pilot.press("escape", "escape")
            await until(pilot, "the Runs screen", lambda: screen_name(app) == "RunsScreen")
            await pilot.press("c")
            await until(pilot, "the chat model", lambda: screen_name(app) == "ChatScreen"
                        and app.screen.session is not None, timeout=120)
            await pilot.click("#chat-input")
            await pilot.press(*"Hello there", "enter")
            await until(pilot, "an answer", lambda: len(app.screen.histories["tuned"]) == 2
                        and not app.screen.generating, timeout=120)
            answer = app.screen.histories["tuned"][-1]
            assert answer["role"] == "assistant" and answer["content"].strip()

    try:
        asyncio.run(main())
    finally:
        kill_workers()
    assert RunDir(list_runs()[0].path).state() == "completed"


@pytest.mark.slow
def test_quitting_while_a_run_trains_asks_and_keeps_the_worker(tiny_chat_model_dir: Path, data_file: Path,
                                                                 quiet_worker) -> None:
    from localtune.launch import default_run_config, prepare_run, start_worker
    from localtune.models import resolve_model
    from localtune.plan import make_plan

    plan = make_plan(cpu_machine(), resolve_model(str(tiny_chat_model_dir)),
                     pinned={"max_steps": 2000, "max_length": 64, "per_device_train_batch_size": 2})
    run, _ = prepare_run(default_run_config(model=str(tiny_chat_model_dir), data=str(data_file)), plan)
    start_worker(run)
    app = LocaltuneApp(hardware=cpu_machine(), mode="runs")

    async def main() -> None:
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, "the worker to start training", lambda: run.state() == "running", timeout=60)
            await pilot.press("q")
            await until(pilot, "the quit question", lambda: screen_name(app) == "ConfirmScreen")
            assert "1 run is training" in str(app.screen.query_one("#confirm-question").content)
            await pilot.press("escape")  # cancel: still here
            assert screen_name(app) == "RunsScreen" and app.is_running
            await pilot.press("q")
            await until(pilot, "the quit question", lambda: screen_name(app) == "ConfirmScreen")
            await pilot.press("enter")  # the first answer: quit, keep training
            await until(pilot, "the app to exit", lambda: not app.is_running, timeout=10)

    try:
        asyncio.run(main())
        assert app.return_code == 0
        time.sleep(0.5)
        assert run.live_worker_pid() is not None, "quitting the TUI stopped the worker"
        assert run.state() == "running"
    finally:
        kill_workers()
