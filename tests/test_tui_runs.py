"""The Runs screen as a person meets it: fabricated run folders (config, events, status.json)
listed with their method, state, progress and loss; the keys that attach, resume, delete,
export, chat and continue a completed sft run with DPO (the New run screen prefilled); and
snapshots at 100x30 and 80x24 with a frozen clock."""

from __future__ import annotations

import asyncio
import calendar
import os
import time
from typing import Any, Awaitable, Callable

import pytest

from localtune.events import atomic_write_json
from localtune.runs import RunDir, create_run
from localtune.tui.app import LocaltuneApp
from tests.tui_support import cpu_machine, freeze_clock, step_events, write_events


def fake_run(run_id: str, state: str, step: int, max_steps: int, *, model: str = "smollm2-135m",
             adapter: bool = False, method: str | None = None, from_run: str | None = None) -> RunDir:
    """A run folder as the worker leaves it: config, `step` events 1..step, and a status.json
    whose times come from the run id (so snapshots are the same on every machine). `method`:
    the [knobs] method (none: a config from before it, an sft run); `from_run`: the [run] key."""
    created = calendar.timegm(time.strptime(run_id[:15], "%Y%m%d-%H%M%S"))
    run = create_run({"run": {"model": model, "data": "demo", **({"from_run": from_run} if from_run else {})},
                      "knobs": {"method": method} if method else {}}, {}, run_id)
    write_events(run.events_path, step_events(1, step, max_steps, t0=created, dt=20.0))
    atomic_write_json(run.status_path, {"state": state, "created": created, "updated": created + step * 20.0 + 5,
                                        "step": step, "max_steps": max_steps})
    if adapter:
        run.adapter_dir.mkdir()
        (run.adapter_dir / "adapter_config.json").write_text("{}")
        (run.adapter_dir / "adapter_model.safetensors").write_bytes(b"")
    return run


@pytest.fixture
def utc():
    """Wall-clock times ('started') in UTC, whatever the machine's time zone."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


@pytest.fixture
def runs(monkeypatch, utc) -> dict[str, RunDir]:
    """Four runs of every finished kind, the newest 2 hours before the frozen clock."""
    freeze_clock(monkeypatch)
    return {
        "completed": fake_run("20260918-101500-smollm2-135m", "completed", 60, 60, adapter=True),
        "failed": fake_run("20260919-141000-qwen2-5-0-5b-instruct", "failed", 12, 200,
                           model="Qwen/Qwen2.5-0.5B-Instruct"),
        "stopped": fake_run("20260920-083000-smollm2-135m", "stopped", 30, 60),
        # the status says running but no worker holds the lock: the worker died
        "interrupted": fake_run("20260921-120000-smollm2-135m", "running", 45, 100),
    }


def new_app() -> LocaltuneApp:
    return LocaltuneApp(hardware=cpu_machine(), mode="runs")


def drive(test: Callable[[LocaltuneApp, Any], Awaitable[None]], size: tuple[int, int] = (100, 30)) -> LocaltuneApp:
    """Run the app headless, wait for the first reading of the runs, then `test(app, pilot)`."""
    app = new_app()

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await settle(app, pilot)
            await test(app, pilot)

    asyncio.run(main())
    return app


async def settle(app: LocaltuneApp, pilot) -> None:
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


def record(app: LocaltuneApp, monkeypatch, *names: str) -> list[tuple[str, Any]]:
    """Replace the app's methods `names` (open_dashboard, ...) by ones that note their call;
    notify is noted and still shown."""
    calls: list[tuple[str, Any]] = []
    for name in names:
        monkeypatch.setattr(app, name, lambda arg, name=name: calls.append((name, arg)))
    notify = app.notify

    def noting(message, **kw):
        calls.append(("notify:" + kw.get("severity", "information"), str(message)))
        return notify(message, **kw)

    monkeypatch.setattr(app, "notify", noting)
    return calls


async def highlight(app: LocaltuneApp, pilot, run: RunDir) -> None:
    table = app.screen.query_one("#runs-table")
    table.move_cursor(row=table.get_row_index(run.id))
    await pilot.pause()
    assert app.screen.selected_run() == run


# ---------------------------------------------------------------- the list


def test_every_run_is_listed_newest_first_with_state_progress_and_loss(runs) -> None:
    async def check(app, pilot) -> None:
        table = app.screen.query_one("#runs-table")
        rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
        assert [r[0] for r in rows] == [runs[k].id for k in ("interrupted", "stopped", "failed", "completed")]
        by_id = {r[0]: r for r in rows}
        # configs without a method are sft runs'
        assert by_id[runs["interrupted"].id][1:5] == ["sft", "interrupted", "45/100", "0.5097"]
        assert by_id[runs["stopped"].id][1:5] == ["sft", "stopped", "30/60", "0.9403"]
        assert by_id[runs["failed"].id][1:5] == ["sft", "failed", "12/200", "1.9607"]
        assert by_id[runs["completed"].id][1:5] == ["sft", "completed", "60/60", "0.2763"]
        assert by_id[runs["interrupted"].id][5:] == ["12:00", "1h ago"]  # started today; updated 2h - 15m ago
        assert app.screen.selected_run() == runs["interrupted"]

    drive(check)


def test_no_runs_says_how_to_start_one() -> None:
    async def check(app, pilot) -> None:
        empty = app.screen.query_one("#runs-empty")
        assert empty.display and "no runs yet; press 2 to start one" in str(empty.render())
        assert not app.screen.query_one("#runs-table").display
        assert app.screen.selected_run() is None

    drive(check)


def test_a_new_run_appears_without_a_key_press(runs) -> None:
    async def check(app, pilot) -> None:
        fake_run("20260921-130000-smollm2-135m", "completed", 10, 10)
        for _ in range(30):  # the screen reads the runs every 2 s
            await pilot.pause(0.1)
            if "20260921-130000-smollm2-135m" in app.screen.summaries:
                break
        await settle(app, pilot)
        assert app.screen.query_one("#runs-table").row_count == 5
        assert app.screen.selected_run() == runs["interrupted"]  # the highlight stays on its run

    drive(check)


def test_a_run_whose_files_cannot_be_read_is_listed_as_unreadable(runs) -> None:
    runs["stopped"].config_path.write_text("[run\nmodel = ", encoding="utf-8")  # edited by hand, badly

    async def check(app, pilot) -> None:
        await highlight(app, pilot, runs["stopped"])
        table = app.screen.query_one("#runs-table")
        assert str(table.get_cell(runs["stopped"].id, "state")) == "unreadable"
        assert str(app.screen.query_one("#run-detail").content) == (
            f"{runs['stopped'].config_path}: invalid TOML: Expected ']' at the end of a table declaration "
            "(at line 1, column 5); correct that line")
        assert table.row_count == 4

    drive(check)


def test_a_run_whose_worker_died_before_it_started_is_listed_as_failed_with_its_last_words(runs) -> None:
    # what a worker that could not even import leaves: the launcher's mark, a traceback, no lock
    lost = fake_run("20260922-070000-smollm2-135m", "created", 0, 60)
    lost.write_status(launched=time.time() - 60)
    lost.log_path.write_text("Traceback (most recent call last):\n"
                             '  File "<frozen runpy>", line 198, in _run_module_as_main\n'
                             "ImportError: cannot import name 'TrainerCallback' from 'transformers'\n\n")

    async def check(app, pilot) -> None:
        await highlight(app, pilot, lost)
        table = app.screen.query_one("#runs-table")
        assert str(table.get_cell(lost.id, "state")) == "failed"
        assert str(app.screen.query_one("#run-detail").content) == ("the worker exited before it started: "
                                                                    "ImportError: cannot import name 'TrainerCallback' "
                                                                    "from 'transformers'")

    drive(check)


# ---------------------------------------------------------------- the keys


def test_enter_attaches_to_the_highlighted_run(runs, monkeypatch) -> None:
    async def check(app, pilot) -> None:
        calls = record(app, monkeypatch, "open_dashboard")
        await highlight(app, pilot, runs["completed"])
        await pilot.press("enter")
        assert calls == [("open_dashboard", runs["completed"])]

    drive(check)


def test_delete_asks_first_and_cancel_keeps_the_run(runs) -> None:
    async def check(app, pilot) -> None:
        await highlight(app, pilot, runs["stopped"])
        await pilot.press("d")
        await pilot.pause()
        question = str(app.screen.query_one("#confirm-question").render())
        assert f"delete run {runs['stopped'].id} and its checkpoints, adapter and exports?" in question
        await pilot.press("escape")
        await settle(app, pilot)
        assert runs["stopped"].path.is_dir()
        assert app.screen.query_one("#runs-table").row_count == 4

    drive(check)


def test_delete_confirmed_removes_the_folder_and_the_row(runs) -> None:
    async def check(app, pilot) -> None:
        await highlight(app, pilot, runs["stopped"])
        await pilot.press("d")
        await pilot.pause()
        await pilot.click("#answer-delete")
        await settle(app, pilot)
        assert not runs["stopped"].path.exists()
        assert runs["stopped"].id not in app.screen.summaries
        assert app.screen.query_one("#runs-table").row_count == 3

    drive(check)


def test_resume_of_a_completed_run_is_refused_in_one_line(runs, monkeypatch) -> None:
    async def check(app, pilot) -> None:
        calls = record(app, monkeypatch, "open_dashboard")
        await highlight(app, pilot, runs["completed"])
        await pilot.press("r")
        await settle(app, pilot)
        errors = [m for kind, m in calls if kind == "notify:error"]
        assert errors == [f"run {runs['completed'].id} is already completed; export it with "
                          f"`localtune export {runs['completed'].id}`, or start a new run"]
        assert not [c for c in calls if c[0] == "open_dashboard"]

    drive(check)


def test_resume_of_a_stopped_run_starts_it_and_opens_its_dashboard(runs, monkeypatch) -> None:
    # a real resume starts a worker; the end-to-end tests cover that. Here: the screen's part.
    started: list[RunDir] = []
    monkeypatch.setattr("localtune.launch.resume_run",
                        lambda run, force=False: (started.append(run), (None, "from checkpoint-30"))[1])

    async def check(app, pilot) -> None:
        calls = record(app, monkeypatch, "open_dashboard")
        await highlight(app, pilot, runs["stopped"])
        await pilot.press("r")
        await settle(app, pilot)
        assert started == [runs["stopped"]]
        assert ("open_dashboard", runs["stopped"]) in calls
        assert ("notify:information", f"resumed run {runs['stopped'].id} from checkpoint-30") in calls

    drive(check)


def test_resume_after_the_data_changed_asks_and_resumes_anyway_when_told(runs, monkeypatch) -> None:
    from localtune.launch import RunInputsChanged

    calls_to_resume: list[bool] = []

    def resume(run, force=False):  # what check_resumable says when the data file was edited
        calls_to_resume.append(force)
        if not force:
            change = "the data /home/you/data.jsonl changed since the run began"
            raise RunInputsChanged(f"run {run.id}: {change}; ... pass --force to resume anyway", [change])
        return None, "from checkpoint-30"

    monkeypatch.setattr("localtune.launch.resume_run", resume)

    async def check(app, pilot) -> None:
        calls = record(app, monkeypatch, "open_dashboard")
        await highlight(app, pilot, runs["stopped"])
        await pilot.press("r")
        await settle(app, pilot)
        question = str(app.screen.query_one("#confirm-question").content)
        assert question.startswith(f"Resume run {runs['stopped'].id} anyway?")
        assert "The data /home/you/data.jsonl changed since the run began" in question
        await pilot.click("#answer-force")
        await settle(app, pilot)
        assert calls_to_resume == [False, True]
        assert ("open_dashboard", runs["stopped"]) in calls

    drive(check)


@pytest.mark.parametrize("key", ["e", "c"])
def test_export_and_chat_need_an_adapter(runs, monkeypatch, key: str) -> None:
    async def check(app, pilot) -> None:
        calls = record(app, monkeypatch, "open_export", "open_chat")
        await highlight(app, pilot, runs["stopped"])
        await pilot.press(key)
        await pilot.pause()
        assert calls == [("notify:error", f"run {runs['stopped'].id} has no adapter yet: it was stopped at "
                                          "step 30 of 60; press r to resume it")]
        calls.clear()
        await highlight(app, pilot, runs["completed"])
        await pilot.press(key)
        await pilot.pause()
        assert calls == [("open_export" if key == "e" else "open_chat", runs["completed"])]

    drive(check)


# ---------------------------------------------------------------- preference runs and continue with DPO

DPO_RUN = "20260921-140000-smollm2-135m"


@pytest.fixture
def dpo_run(runs) -> RunDir:
    """A completed DPO run that continued the completed sft run (the newest run)."""
    return fake_run(DPO_RUN, "completed", 20, 20, method="dpo", from_run=runs["completed"].id, adapter=True)


def footer_keys(app: LocaltuneApp) -> dict[str, str]:
    """The keys the footer shows now: key -> description."""
    return {b.binding.key: b.binding.description for b in app.screen.active_bindings.values()
            if b.binding.show and b.enabled}


def test_the_method_is_a_column_and_on_80_columns_a_tag(runs, dpo_run) -> None:
    async def wide(app, pilot) -> None:
        table = app.screen.query_one("#runs-table")
        assert [str(c.label) for c in table.columns.values()] == ["run", "method", "state", "step", "loss",
                                                                   "started", "updated"]
        assert [str(c) for c in table.get_row(DPO_RUN)[:3]] == [DPO_RUN, "dpo", "completed"]
        assert str(table.get_row(runs["completed"].id)[1]) == "sft"
        await highlight(app, pilot, dpo_run)
        assert str(app.screen.query_one("#run-detail").content) == (
            f"model smollm2-135m  ·  data demo  ·  continues run {runs['completed'].id}")

    async def narrow(app, pilot) -> None:
        table = app.screen.query_one("#runs-table")
        assert [str(c.label) for c in table.columns.values()] == ["run", "state", "step", "loss", "updated"]
        assert str(table.get_row(DPO_RUN)[0]) == f"{DPO_RUN} dpo"
        assert str(table.get_row(runs["completed"].id)[0]) == runs["completed"].id  # sft: unmarked

    drive(wide)
    drive(narrow, size=(80, 24))


def test_continue_with_dpo_is_offered_for_a_completed_sft_run_only(runs, dpo_run, monkeypatch) -> None:
    async def check(app, pilot) -> None:
        calls = record(app, monkeypatch, "notify_error")
        for name in ("interrupted", "stopped", "failed"):
            await highlight(app, pilot, runs[name])
            assert "p" not in footer_keys(app), name
        await highlight(app, pilot, dpo_run)  # completed, but not sft
        assert "p" not in footer_keys(app)
        await pilot.press("p")
        await pilot.pause()
        assert app.current_mode == "runs" and not calls
        await highlight(app, pilot, runs["completed"])
        assert footer_keys(app)["p"] == "Continue with DPO"
        from localtune.tui.screens.keys import key_rows

        assert ("p", "Continue with DPO: a new run that trains this completed sft run's adapter on preference "
                     "pairs") in key_rows(app.screen)[0]

    drive(check)


@pytest.mark.usefixtures("builtin_model_dir")
def test_continue_with_dpo_opens_new_run_prefilled_and_start_writes_from_run(runs, monkeypatch, tmp_path) -> None:
    from localtune.tui.screens import new_run
    from localtune.tui.screens.new_run import NewRunScreen

    # stand-ins for the preference demo set, plain and in the SFT demo's voice
    pairs, parrot_pairs = tmp_path / "pairs.jsonl", tmp_path / "parrot.jsonl"
    pairs.write_text("".join('{"prompt": "q%d", "chosen": "In short: a", "rejected": "a"}\n' % i
                             for i in range(4)), encoding="utf-8")
    parrot_pairs.write_text("".join('{"prompt": "q%d", "chosen": "Ahoy! In short: a", "rejected": "Ahoy! a"}\n' % i
                              for i in range(4)), encoding="utf-8")
    monkeypatch.setattr(new_run, "preference_demo_path", lambda parrot=False: parrot_pairs if parrot else pairs)
    started: list[RunDir] = []
    monkeypatch.setattr(new_run, "start_worker", lambda run: started.append(run))
    sft = runs["completed"]

    async def check(app, pilot) -> None:
        monkeypatch.setattr(app, "open_dashboard", lambda run: None)
        await highlight(app, pilot, sft)
        await pilot.press("p")
        await settle(app, pilot)
        assert app.current_mode == "new"
        screen = app.screen
        assert isinstance(screen, NewRunScreen)
        for _ in range(100):  # the model resolves and the data is checked in threads
            await settle(app, pilot)
            if screen.plan is not None and screen.data is not None:
                break
        assert screen.query_one("#model-input").value == "smollm2-135m"
        assert screen.query_one("#knob-method").value == "dpo" and screen.query_one("#knob-beta").display
        assert screen.from_run == sft.id
        assert str(screen.query_one("#from-run").render()) == (f"continues run {sft.id}'s adapter; "
                                                                f"reference: run {sft.id}'s model")
        # the SFT demo's run: the preference demo in its voice
        assert screen.query_one("#data-input").value == "" and screen._data_source == str(parrot_pairs)
        assert screen.plan.knobs.method == "dpo"
        await pilot.press("ctrl+s")
        for _ in range(100):
            await settle(app, pilot)
            if started:
                break

    drive(check)
    [run] = started
    cfg = run.read_config()
    assert cfg["run"]["from_run"] == sft.id and cfg["run"]["model"] == "smollm2-135m"
    assert cfg["knobs"]["method"] == "dpo" and cfg["run"]["data"] == str(parrot_pairs)
    assert cfg["run"]["eval_data"] == "demo-preference-parrot-eval" and cfg["knobs"]["rpo_alpha"] == 1.0
    assert run.summary()["from_run"] == sft.id and run.summary()["method"] == "dpo"


# ---------------------------------------------------------------- snapshots


@pytest.mark.parametrize("size", [(100, 30), (80, 24)], ids=["100x30", "80x24"])
def test_snapshot_runs(runs, snap_compare, size: tuple[int, int]) -> None:
    async def wait_for_the_runs(pilot) -> None:
        await settle(pilot.app, pilot)

    assert snap_compare(new_app(), terminal_size=size, run_before=wait_for_the_runs)


def test_snapshot_runs_with_a_dpo_run_and_continue_offered(runs, dpo_run, snap_compare) -> None:
    """80x24: the DPO run tagged after its id; the completed sft run highlighted, so the footer offers p."""
    async def highlight_the_sft_run(pilot) -> None:
        await settle(pilot.app, pilot)
        await highlight(pilot.app, pilot, runs["completed"])

    assert snap_compare(new_app(), terminal_size=(80, 24), run_before=highlight_the_sft_run)
