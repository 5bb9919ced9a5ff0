"""`?` (or F1, which works in a text field too) shows the keys of the screen underneath on
every screen, with this screen's keys apart from the ones that work everywhere."""

from __future__ import annotations

import asyncio

import pytest

from localtune.runs import RunDir
from localtune.tui.app import LocaltuneApp
from tests.test_tui_dashboard import fabricate_run
from tests.tui_support import cpu_machine


def open_keys(open_screen, key: str, size=(80, 24)) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str]:
    """Open a screen, press `key`, return the keys screen's rows and the screen it describes;
    then check that pressing escape closes it."""
    from localtune.tui.screens.keys import KeysScreen, key_rows

    app = LocaltuneApp(hardware=cpu_machine())
    out = {}

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await open_screen(app, pilot)
            await pilot.pause()
            underneath = type(app.screen).__name__
            await pilot.press(key)
            await pilot.pause()
            assert isinstance(app.screen, KeysScreen), f"{key} on {underneath} opened {type(app.screen).__name__}"
            out["rows"] = key_rows(app.screen.target)
            out["under"] = underneath
            await pilot.press("escape")
            await pilot.pause()
            assert type(app.screen).__name__ == underneath

    asyncio.run(main())
    return out["rows"][0], out["rows"][1], out["under"]


def mode(name: str):
    async def go(app, pilot) -> None:
        app.switch_mode(name)
        await pilot.pause()
    return go


@pytest.mark.parametrize(("name", "expected"), [
    ("machine", set()),
    ("new", {"Start"}),
    ("runs", {"Resume", "Delete", "Export", "Chat"}),
])
def test_question_mark_lists_the_keys_of_each_top_screen(name, expected, builtin_model_dir) -> None:
    here, everywhere, _ = open_keys(mode(name), "question_mark")
    assert expected <= {w.split(":")[0] for _, w in here}
    assert {"Machine", "New run", "Runs", "Keys"} <= {w.split(":")[0] for _, w in everywhere}
    assert ("q", "Quit: training runs go on unless you stop them") in everywhere


def test_the_dashboard_lists_stop_detach_resume_export() -> None:
    run = fabricate_run()

    async def go(app, pilot) -> None:
        app.open_dashboard(run)
        await pilot.pause()

    here, _, under = open_keys(go, "question_mark")
    assert under == "DashboardScreen"
    assert {"Stop", "Detach", "Resume", "Export", "Back"} <= {w.split(":")[0] for _, w in here}


def test_f1_works_where_a_text_field_takes_the_question_mark(tiny_trained_run: RunDir) -> None:
    async def go(app, pilot) -> None:
        app.open_chat(tiny_trained_run)
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()

    here, _, under = open_keys(go, "f1")
    assert under == "ChatScreen"
    assert {"Compare", "Clear", "Back"} <= {w.split(":")[0] for _, w in here}


def test_export_screen_lists_its_keys(tiny_trained_run: RunDir) -> None:
    async def go(app, pilot) -> None:
        app.open_export(tiny_trained_run)
        await pilot.pause()

    here, _, under = open_keys(go, "question_mark")
    assert under == "ExportScreen"
    assert "Back" in {w for _, w in here}


# ---------------------------------------------------------------- how the CLI reaches the TUI


def test_no_command_without_a_terminal_prints_the_help_and_says_why(capsys) -> None:
    from tests.helpers import run

    rc, out, _ = run(capsys)
    assert rc == 0
    assert "usage: localtune" in out
    assert "`localtune` with no command opens the terminal UI; it needs a terminal." in out


def test_attach_names_a_missing_run_in_one_line(capsys) -> None:
    from tests.helpers import one_line_error, run

    rc, _, err = run(capsys, "attach", "nope")
    assert rc == 1
    assert "no run 'nope'" in one_line_error(err)


def test_attach_without_a_terminal_prints_a_finished_run_as_text(capsys) -> None:
    from tests.helpers import run
    from tests.tui_support import step_events, write_events

    done = fabricate_run(events=[], state="completed")
    write_events(done.events_path, step_events(1, 3, 3, t0=1000.0) + [
        {"t": 1010.0, "kind": "finished", "step": 3, "adapter": str(done.adapter_dir), "train_loss": 2.5,
         "elapsed_s": 9.0, "tokens": 3000, "peak_memory_bytes": 1 << 30}])
    rc, out, _ = run(capsys, "attach", done.id)
    assert rc == 0
    assert "finished: 3 steps" in out and "step 3/3" in out


def test_a_crash_inside_the_tui_is_reported_as_our_bug_with_the_log_path(capsys, monkeypatch, localtune_home) -> None:
    """Textual shows the traceback itself; the CLI must not print it twice, but saves a copy
    and says where, with exit code 2 (a bug of ours, not the user's input)."""
    import sys

    from localtune.tui import app as app_module

    def crash(self, *a, **kw):  # the app ends on an exception, as Textual's run() leaves it
        try:
            raise RuntimeError("a screen fell over")
        except RuntimeError as e:
            self._exception = e

    monkeypatch.setattr(app_module.LocaltuneApp, "run", crash)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    from tests.helpers import run

    rc, _, err = run(capsys)
    assert rc == 2
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("localtune: internal error (a bug in localtune, not in your input); "
                           "the traceback is saved in ")
    saved = line.rsplit(" ", 1)[-1]
    assert saved.startswith(str(localtune_home / "logs"))
    text = open(saved, encoding="utf-8").read()
    assert "RuntimeError: a screen fell over" in text and "Traceback" in text
