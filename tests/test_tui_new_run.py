"""The New run screen as a person meets it: the built-in model and the demo data preselected,
the plan drawn as a table and a memory bar, knobs that re-plan as they are typed, a plan that
does not fit, data files good and broken, a model that cannot be found, the file picker, and
Start writing the run folder and opening the dashboard; the method (sft, dpo, orpo) with beta
and the preference demo data, and the screen prefilled to continue an sft run with DPO.
Snapshots at 100x30 and 80x24.

The machine is fixed (tests.tui_support); the built-in model comes from the session fixture
(converted once), so resolving it and loading its tokenizer take milliseconds."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from textual.screen import Screen

from localtune.data import load_data
from localtune.hardware import Device, Hardware
from localtune.runs import RunDir, list_runs
from localtune.tui.app import LocaltuneApp
from localtune.launch import PREFERENCE_DEMO_RECIPE
from localtune.tui.screens import new_run
from localtune.tui.screens.new_run import DataFilePicker, DataFileTree
from tests.test_tui_machine import shown
from tests.tui_support import GiB, cpu_machine, freeze_clock, gpu_machine

pytestmark = pytest.mark.usefixtures("builtin_model_dir")


@pytest.fixture(autouse=True)
def _cpu_without_native_bf16(monkeypatch) -> None:
    """The faked machines' CPU computes no bf16 natively, whatever CPU runs the tests: the
    estimate on the screen (and in the snapshots) would otherwise follow this CPU's autocast."""
    monkeypatch.setattr("localtune.hardware.cpu_has_native_bf16", lambda: False)


def small_gpu() -> Hardware:
    """A 4 GB card (the cuda-8gb profile), nearly all of it free."""
    gpu = Device(name="NVIDIA GeForce GTX 1650", total_bytes=4 * GiB, free_bytes=int(3.8 * GiB), index=0,
                 nvml_index=0, compute_capability="7.5")
    return replace(gpu_machine(), devices=[gpu])


def drive(test: Callable[[LocaltuneApp, Any], Awaitable[None]], hw: Hardware | None = None,
          size: tuple[int, int] = (100, 30)) -> LocaltuneApp:
    app = LocaltuneApp(hardware=hw or cpu_machine(), mode="new")

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await settle_all(pilot)
            await test(app, pilot)

    asyncio.run(main())
    return app


async def settle_all(pilot) -> None:
    """Wait until the screens' threads are done: an answer can start the next question (the
    model's answer starts the example), so wait until a round starts nothing new. (A file
    tree's loader works as long as the tree is shown, so only the screens' own count.)"""
    for _ in range(50):
        await pilot.pause()
        ours = [w for w in pilot.app.workers if isinstance(w.node, Screen) and w.is_running]
        if not ours:
            await pilot.pause()
            return
        await pilot.app.workers.wait_for_complete(ours)
    raise AssertionError("the screen's workers never settled")


async def type_into(pilot, selector: str, text: str) -> None:
    """Click a field, select what it holds and type over it, key by key."""
    await pilot.click(selector)
    await pilot.press("end", "shift+home", *(text or ["backspace"]))
    await settle_all(pilot)


async def paste_into(pilot, selector: str, text: str) -> None:
    """Put `text` in a field at once (as pasting does) and press enter."""
    field = pilot.app.screen.query_one(selector)
    field.focus()
    field.value = text
    await pilot.press("enter")
    await settle_all(pilot)


def record(app: LocaltuneApp, monkeypatch) -> dict[str, list]:
    """Note the app's error toasts, dashboards opened and workers started (none really is)."""
    calls: dict[str, list] = {"errors": [], "dashboards": [], "workers": []}
    notify_error = app.notify_error
    monkeypatch.setattr(app, "notify_error", lambda m: (calls["errors"].append(str(m)), notify_error(m)))
    monkeypatch.setattr(app, "open_dashboard", lambda run: calls["dashboards"].append(run))
    monkeypatch.setattr(new_run, "start_worker", lambda run: calls["workers"].append(run))
    return calls


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_defaults_built_in_model_demo_data_and_a_plan_that_fits() -> None:
    async def test(app, pilot) -> None:
        screen = app.screen
        assert "SmolLM2-135M-Instruct (built-in): llama, 30 layers" in shown(app, "#model-status")
        rows = load_data("demo").total_rows
        summary = shown(app, "#data-summary")
        assert "messages (detected)" in summary and f"Rows {rows}: {rows} valid, 0 bad" in summary
        example = shown(app, "#data-example")
        assert example.startswith("Example demo:1 · the model's chat template · trained part in « »")
        assert "<|im_start|>assistant" in example and "«Ahoy!" in example
        # the demo recipe is pinned under the cpu profile
        assert screen.plan.profile.name == "cpu"
        assert (screen.plan.knobs.per_device_train_batch_size, screen.plan.knobs.max_length) == (8, 128)
        assert screen.query_one("#knob-micro-batch").value == "8"
        assert screen.query_one("#knob-max-steps").value == "30"
        assert screen.query_one("#knob-4bit").value is False
        table = shown(app, "#plan-table")
        assert "max_length" in table and "demo recipe" in table and "profile cpu" in table
        assert "fits: estimate" in shown(app, "#estimate")
        assert "Profile cpu: CPU only" in shown(app, "#plan-profile")
        assert "none: it fits as set" in shown(app, "#plan-adjustments")
        assert shown(app, "#start-note").startswith("ready: ctrl+s starts")

    drive(test)


def table_row(app: LocaltuneApp, knob: str) -> list[str]:
    """The cells of one knob's row in the plan table."""
    for line in shown(app, "#plan-table").splitlines():
        cells = line.split()
        if cells and cells[0] == knob:
            return cells
    raise AssertionError(f"no row for {knob}")


def test_typing_a_rank_replans_at_once_and_a_bad_one_does_not() -> None:
    async def test(app, pilot) -> None:
        screen = app.screen
        assert screen.plan.knobs.r == 16
        await type_into(pilot, "#knob-r", "64")
        assert screen.plan.knobs.r == 64 and screen.plan.pinned["r"] == 64
        assert table_row(app, "r")[:4] == ["r", "64", "set", "by"]
        lora = screen.plan.estimate.lora_params

        await type_into(pilot, "#knob-r", "0")
        assert "rank: a whole number from 1 to 1024; got 0" in shown(app, "#knob-error")
        assert screen.plan.knobs.r == 64 and screen.plan.estimate.lora_params == lora  # not re-planned
        assert "rank: a whole number" in shown(app, "#start-note")

        await type_into(pilot, "#knob-r", "8")
        assert screen.plan.knobs.r == 8 and not screen.query_one("#knob-error").display
        assert screen.plan.estimate.lora_params == lora // 8

        await type_into(pilot, "#knob-r", "")  # emptied: the profile's rank again
        assert screen.plan.knobs.r == 16 and "r" not in screen.plan.pinned
        await pilot.press("escape")  # leaving the field shows the planner's value in it
        await settle_all(pilot)
        assert screen.query_one("#knob-r").value == "16"

        await pilot.click("#knob-gc")
        await settle_all(pilot)
        assert screen.plan.knobs.gradient_checkpointing is True and table_row(app, "gradient_checkpointing")[2] == "set"

    drive(test)


def test_a_plan_over_the_budget_turns_red_and_start_refuses(monkeypatch) -> None:
    async def test(app, pilot) -> None:
        calls = record(app, monkeypatch)
        screen = app.screen
        await type_into(pilot, "#knob-micro-batch", "64")
        await type_into(pilot, "#knob-max-length", "4096")
        plan = screen.plan
        assert not plan.fits and plan.knobs.per_device_train_batch_size == 64 and plan.knobs.max_length == 4096
        bar = screen.query_one("#estimate")
        assert bar.has_class("over") and "over the budget by" in shown(app, "#estimate")
        assert "would fit:" in shown(app, "#plan-advice")
        assert "Planner changes" in shown(app, "#plan-adjustments") and "→" in shown(app, "#plan-adjustments")
        assert "the plan does not fit: over the budget by" in shown(app, "#start-note")
        await pilot.press("ctrl+s")
        await settle_all(pilot)
        assert calls["workers"] == [] and calls["dashboards"] == [] and list_runs() == []
        assert "over the budget by" in calls["errors"][-1] and "would fit: shorter sequences" in calls["errors"][-1]

    drive(test, hw=small_gpu())


async def planned(app, pilot):
    """The New run screen once its first plan is made (the model resolves in a thread)."""
    for _ in range(100):
        await settle_all(pilot)
        if app.screen.plan is not None:
            break
    return app.screen


def mac_32gb() -> Hardware:
    return Hardware(backend="mps", devices=[Device(name="Apple M2 Pro", total_bytes=32 * GiB, free_bytes=21 * GiB,
                                                   recommended_max_bytes=21 * GiB)],
                    ram_total_bytes=32 * GiB, ram_available_bytes=20 * GiB, cpu_cores=10, chip="Apple M2 Pro",
                    macos_version="14.5")


def test_on_a_mac_4bit_is_offered_by_mlx_not_by_bitsandbytes(monkeypatch) -> None:
    """A Mac trains on MLX (the Apple profiles' engine), which quantises to 4 bits itself: the
    switch is offered and turns 4-bit on. With engine torch (bitsandbytes does not run on
    Apple's GPU) it is off and cannot be turned on."""
    async def test(app, pilot) -> None:
        screen = await planned(app, pilot)
        box = screen.query_one("#knob-4bit")
        assert screen.plan.knobs.engine == "mlx" and screen.plan.profile.name == "mps-32gb"
        assert not box.disabled and box.value is False
        await pilot.click("#knob-4bit")
        await settle_all(pilot)
        assert box.value is True and screen.plan.knobs.load_in_4bit

        await pilot.click("#knob-4bit")
        await settle_all(pilot)
        screen.user_pinned["engine"] = "torch"
        screen.replan()
        await settle_all(pilot)
        assert screen.plan.knobs.engine == "torch" and not screen.plan.knobs.load_in_4bit
        assert box.disabled and box.value is False and "does not run on mps" in str(box.tooltip)

    drive(test, hw=mac_32gb())


def test_on_a_mac_the_engine_is_picked_on_the_screen(monkeypatch) -> None:
    """A Mac has two engines: the switch shows the planned one (mlx), picking torch re-plans for
    PyTorch on MPS (no 4-bit, the switch greyed out) and Start would write engine = "torch";
    picking mlx again goes back. Without MLX installed, Start says how to install it."""
    from localtune import engines

    async def test(app, pilot) -> None:
        screen = await planned(app, pilot)
        engine = screen.query_one("#knob-engine")
        assert engine.display and engine.value == "mlx" and screen.plan.knobs.engine == "mlx"
        await pilot.click("#knob-4bit")
        await settle_all(pilot)
        assert screen.plan.knobs.load_in_4bit

        engine.value = "torch"
        await settle_all(pilot)
        assert screen.plan.knobs.engine == "torch" and screen.user_pinned["engine"] == "torch"
        assert not screen.plan.knobs.load_in_4bit and screen.query_one("#knob-4bit").disabled
        assert ("engine", "set by you") in [(r[0], r[2]) for r in knob_rows(screen.plan)]
        assert screen.blockers() == []

        monkeypatch.setattr(engines, "mlx_available", lambda: False)
        engine.value = "mlx"
        await settle_all(pilot)
        assert screen.plan.knobs.engine == "mlx" and not screen.query_one("#knob-4bit").disabled
        assert screen.blockers()[0].startswith("engine=mlx needs mlx and mlx-lm, which are not installed: "
                                               "pip install 'localtune[mlx]'")
        assert "engine=mlx needs mlx and mlx-lm" in shown(app, "#start-note")

    drive(test, hw=mac_32gb())


def test_the_plan_says_the_longest_context_that_fits() -> None:
    from localtune.plan import max_context

    async def test(app, pilot) -> None:
        text = shown(app, "#plan-context").strip()
        fit = max_context(app.screen.plan)
        assert fit.max_length > app.screen.plan.knobs.max_length
        assert text == f"longest context that fits: {fit.max_length} tokens (bound by the memory budget)"

    drive(test)


def test_the_engine_switch_is_shown_on_a_mac_only() -> None:
    async def test(app, pilot) -> None:
        assert not app.screen.query_one("#knob-engine").display
        assert app.screen.plan.knobs.engine == "torch"

    drive(test)


def knob_rows(plan) -> list[tuple[str, str, str]]:
    """The plan table's rows as (knob, value, from)."""
    table = new_run.knob_table(plan)
    cols = [list(c.cells) for c in table.columns]
    return list(zip(*cols))


def test_broken_data_shows_file_and_line_and_start_refuses(tmp_path, monkeypatch) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "2+2?", "completion": "4"}, "{not json",
                                               {"prompt": "3+3?", "completion": "6"}])

    async def test(app, pilot) -> None:
        calls = record(app, monkeypatch)
        await paste_into(pilot, "#data-input", str(data))
        assert "Rows 3: 2 valid, 1 bad" in shown(app, "#data-summary")
        assert shown(app, "#data-problems").startswith("bad.jsonl:2: not valid JSON")
        assert app.screen.query_one("#data-skip-bad").display
        await pilot.press("escape", "s")
        await settle_all(pilot)
        assert calls["workers"] == [] and list_runs() == []
        assert "the data has 1 bad row" in calls["errors"][-1]

    drive(test)


def test_unreadable_data_is_shown_not_fatal(tmp_path) -> None:
    data = write_jsonl(tmp_path / "all-bad.jsonl", ["{", "[1, 2"])

    async def test(app, pilot) -> None:
        await paste_into(pilot, "#data-input", str(data))
        summary = shown(app, "#data-summary")
        assert "2 problems in 2 rows" in summary and "all-bad.jsonl:1" in summary
        assert shown(app, "#start-note").startswith("the data:")
        assert app.screen.plan is not None  # the plan stays

    drive(test)


def test_a_model_that_cannot_be_found_is_shown_in_red() -> None:
    async def test(app, pilot) -> None:
        await paste_into(pilot, "#model-input", "./no/such/model")
        assert "--model ./no/such/model: no such file or folder" in shown(app, "#model-status")
        assert "the model: --model ./no/such/model" in shown(app, "#start-note")

    drive(test)


def test_a_model_folder_with_only_bin_weights_is_shown_in_red(tmp_path) -> None:
    from tests.test_models import bin_only_folder

    folder = bin_only_folder(tmp_path)

    async def test(app, pilot) -> None:
        await paste_into(pilot, "#model-input", str(folder))
        status = shown(app, "#model-status")
        assert f"--model {folder}: the folder has only PyTorch .bin weights" in status
        assert "safetensors only" in status
        assert app.screen.query_one("#model-status").content.style == "red"
        assert f"the model: --model {folder}" in shown(app, "#start-note")

    drive(test)


def test_the_file_picker_lists_data_files_and_folders(tmp_path) -> None:
    folder = tmp_path / "data"
    (folder / "more").mkdir(parents=True)
    good = write_jsonl(folder / "train.jsonl", [{"text": "hello"}])
    (folder / "notes.txt").write_text("not data")
    (folder / ".hidden.jsonl").write_text("")

    async def test(app, pilot) -> None:
        await paste_into(pilot, "#data-input", str(folder))
        await pilot.press("ctrl+o")
        await settle_all(pilot)
        assert isinstance(app.screen, DataFilePicker)
        tree = app.screen.query_one(DataFileTree)
        assert sorted(str(n.label) for n in tree.root.children) == ["more", "train.jsonl"]
        tree.select_node(next(n for n in tree.root.children if str(n.label) == "train.jsonl"))
        await settle_all(pilot)
        assert app.screen.query_one("#data-input").value == str(good)
        assert "text (detected)" in shown(app, "#data-summary")

    drive(test)


def test_start_writes_the_run_with_the_chosen_knobs_and_opens_the_dashboard(tmp_path, monkeypatch,
                                                                          tiny_chat_model_dir) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": f"hi {i}"},
                                                                {"role": "assistant", "content": "Ahoy!"}]}
                                                  for i in range(3)])

    async def test(app, pilot) -> None:
        calls = record(app, monkeypatch)
        await paste_into(pilot, "#model-input", str(tiny_chat_model_dir))
        assert "(local folder): llama, 2 layers, hidden size 64" in shown(app, "#model-status")
        await paste_into(pilot, "#data-input", str(data))
        assert "messages (detected) · Rows 3: 3 valid, 0 bad" in shown(app, "#data-summary")
        assert "«Ahoy!<|im_end|>»" in shown(app, "#data-example")
        assert app.screen.plan.knobs.max_steps == -1  # the demo recipe left with the demo data
        await type_into(pilot, "#knob-r", "8")
        await type_into(pilot, "#knob-max-steps", "5")
        await pilot.click("#start")
        await settle_all(pilot)
        assert calls["errors"] == []
        [run] = calls["dashboards"]
        assert calls["workers"] == [run] and isinstance(run, RunDir) and list_runs() == [run]
        cfg = run.read_config()
        assert cfg["run"]["model"] == str(tiny_chat_model_dir) and cfg["run"]["data"] == str(data)
        assert cfg["knobs"]["r"] == 8 and cfg["knobs"]["max_steps"] == 5
        assert run.read_status()["rows"] == 3

    drive(test)


# ---------------------------------------------------------------- the method


def pairs_file(path: Path, rows: int = 3) -> Path:
    """A small file of preference pairs: the stand-in for the preference demo set in these tests
    (the screen's part is which file it picks)."""
    return write_jsonl(path, [{"prompt": [{"role": "user", "content": f"hi {i}"}],
                               "chosen": [{"role": "assistant", "content": "In short: hello."}],
                               "rejected": [{"role": "assistant", "content": "Hello."}]} for i in range(rows)])


async def choose_method(pilot, method: str) -> None:
    pilot.app.screen.query_one("#knob-method").value = method
    await settle_all(pilot)


def test_choosing_dpo_offers_beta_and_an_empty_data_field_is_the_preference_demo(tmp_path, monkeypatch) -> None:
    pairs = pairs_file(tmp_path / "pairs.jsonl")
    monkeypatch.setattr(new_run, "preference_demo_path", lambda parrot=False: pairs)

    async def test(app, pilot) -> None:
        screen = app.screen
        beta, data = screen.query_one("#knob-beta"), screen.query_one("#data-input")
        assert screen.query_one("#knob-method").value == "sft" and not beta.display
        assert "beta" not in shown(app, "#plan-table") and "loss_type" not in shown(app, "#plan-table")

        await choose_method(pilot, "dpo")
        assert beta.display and beta.value == "0.1"
        assert screen.plan.knobs.method == "dpo" and screen.plan.pinned["method"] == "dpo"
        assert table_row(app, "method")[:3] == ["method", "dpo", "set"] and table_row(app, "loss_type")[1] == "sigmoid"
        # the field held the sft demo: emptied, and empty means the preference demo set
        assert data.value == "" and "preference demo set" in data.placeholder
        assert screen._data_source == str(pairs) and "Rows 3: 3 valid" in shown(app, "#data-summary")
        # the sft demo recipe left with the sft demo; the preference demo's came with its pairs
        assert screen.plan.knobs.max_steps == PREFERENCE_DEMO_RECIPE["max_steps"]

        await type_into(pilot, "#knob-beta", "0.5")
        assert screen.plan.knobs.beta == 0.5 and table_row(app, "beta")[:3] == ["beta", "0.5", "set"]
        await type_into(pilot, "#knob-beta", "0")
        assert "beta: a number from 1e-06 to 1000; got 0" in shown(app, "#knob-error")
        assert screen.plan.knobs.beta == 0.5 and "beta: a number" in shown(app, "#start-note")

        await choose_method(pilot, "orpo")
        assert screen.plan.knobs.method == "orpo" and beta.display and "loss_type" not in shown(app, "#plan-table")

        await choose_method(pilot, "sft")  # back: no beta, the sft demo again
        assert not beta.display and not screen.query_one("#knob-error").display
        assert "method" not in screen.plan.pinned and "beta" not in screen.plan.pinned
        assert data.value == "demo" and screen._data_source == "demo" and screen.plan.knobs.max_steps == 30

    drive(test)


def test_a_preference_method_without_the_preference_demo_set_asks_for_pairs(monkeypatch) -> None:
    monkeypatch.setattr(new_run, "preference_demo_path", lambda parrot=False: None)

    async def test(app, pilot) -> None:
        await choose_method(pilot, "dpo")
        assert shown(app, "#data-summary").startswith("no data: the preference demo set is not in this install")
        assert shown(app, "#start-note").startswith("the data: no data")

    drive(test)


def test_start_a_dpo_run_writes_the_method_and_beta(tmp_path, monkeypatch, tiny_chat_model_dir) -> None:
    pairs = pairs_file(tmp_path / "pairs.jsonl")
    monkeypatch.setattr(new_run, "preference_demo_path", lambda parrot=False: pairs)

    async def test(app, pilot) -> None:
        calls = record(app, monkeypatch)
        await paste_into(pilot, "#model-input", str(tiny_chat_model_dir))
        await choose_method(pilot, "dpo")
        await type_into(pilot, "#knob-beta", "0.25")
        await type_into(pilot, "#knob-max-steps", "5")
        await pilot.click("#start")
        await settle_all(pilot)
        assert calls["errors"] == []
        [run] = calls["workers"]
        cfg = run.read_config()
        assert (cfg["knobs"]["method"], cfg["knobs"]["beta"], cfg["knobs"]["max_steps"]) == ("dpo", 0.25, 5)
        assert cfg["run"]["data"] == str(pairs) and "from_run" not in cfg["run"]

    drive(test)


def continue_screen(app: LocaltuneApp, run_id: str = "20260921-101500-smollm2-135m") -> None:
    """What the Runs screen's p does once it has switched here."""
    app.screen.continue_from(run_id, "smollm2-135m")


def test_continue_from_a_run_and_what_drops_it(tmp_path, monkeypatch) -> None:
    pairs = pairs_file(tmp_path / "pairs.jsonl")
    monkeypatch.setattr(new_run, "preference_demo_path", lambda parrot=False: pairs)
    run_id = "20260921-101500-smollm2-135m"

    async def test(app, pilot) -> None:
        screen = app.screen
        continue_screen(app, run_id)
        await settle_all(pilot)
        assert screen.from_run == run_id and screen.plan.knobs.method == "dpo"
        assert shown(app, "#from-run").strip() == f"continues run {run_id}'s adapter; reference: run {run_id}'s model"
        await choose_method(pilot, "orpo")  # still a preference method: still continues
        assert screen.from_run == run_id
        await choose_method(pilot, "sft")  # an sft run starts afresh
        assert screen.from_run is None and not screen.query_one("#from-run").display

        continue_screen(app, run_id)
        await settle_all(pilot)
        await paste_into(pilot, "#model-input", "./no/such/model")  # another model cannot carry the adapter
        assert screen.from_run is None and not screen.query_one("#from-run").display
        assert any(f"run {run_id}'s adapter is for smollm2-135m" in n.message for n in app._notifications)

    drive(test)


async def quiet(pilot) -> None:
    """Settle, and stop the fields' cursors blinking so that snapshots compare."""
    await settle_all(pilot)
    for field in pilot.app.screen.query("Input"):
        field.cursor_blink = False


async def over_budget(pilot) -> None:
    pilot.app.screen.query_one("#knob-micro-batch").value = "64"
    pilot.app.screen.query_one("#knob-max-length").value = "4096"
    await quiet(pilot)
    pilot.app.screen.query_one("#plan-box").scroll_visible(top=True, animate=False)
    await pilot.pause()


@pytest.mark.parametrize("size", [(100, 30), (80, 24)], ids=["100x30", "80x24"])
def test_snapshot_defaults(snap_compare, monkeypatch, size) -> None:
    freeze_clock(monkeypatch)
    assert snap_compare(LocaltuneApp(hardware=cpu_machine(), mode="new"), terminal_size=size, run_before=quiet)


@pytest.mark.parametrize("size", [(100, 30), (80, 24)], ids=["100x30", "80x24"])
def test_snapshot_over_budget(snap_compare, monkeypatch, size) -> None:
    freeze_clock(monkeypatch)
    assert snap_compare(LocaltuneApp(hardware=small_gpu(), mode="new"), terminal_size=size, run_before=over_budget)


def test_snapshot_continue_with_dpo(snap_compare, monkeypatch, tmp_path) -> None:
    """80x24: prefilled by the Runs screen's "continue with DPO"."""
    freeze_clock(monkeypatch)
    pairs = pairs_file(tmp_path / "pairs.jsonl")
    monkeypatch.setattr(new_run, "preference_demo_path", lambda parrot=False: pairs)

    async def prefilled(pilot) -> None:
        continue_screen(pilot.app)
        await quiet(pilot)

    assert snap_compare(LocaltuneApp(hardware=cpu_machine(), mode="new"), terminal_size=(80, 24), run_before=prefilled)


def test_on_two_matching_gpus_the_plan_says_both_train_and_its_knobs_are_per_rank() -> None:
    """Two RTX 4090s: a run started here trains on both (data parallel); the screen says so and
    that the micro-batch, accumulation and estimate are each rank's."""
    two = gpu_machine()
    second = replace(two.devices[0], index=1, nvml_index=1, uuid="GPU-2")
    two = replace(two, devices=[two.devices[0], second])

    async def test(app, pilot) -> None:
        plan = app.screen.plan
        assert plan.parallel.mode == "ddp" and plan.parallel.devices == [0, 1]
        text = " ".join(shown(app, "#plan-profile").split())
        assert f"Parallel {' '.join(plan.parallel.reason.split())}" in text, text
        assert f"per rank (effective batch {plan.knobs.effective_batch_size * 2})" in text

    drive(test, hw=two, size=(140, 50))
