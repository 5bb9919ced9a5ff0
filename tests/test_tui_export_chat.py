"""The Export and Chat screens on a real finished run (`tiny_trained_run`: a tiny Llama with the
built-in model's tokenizer, trained for 6 steps), driven as a person would: choose, type,
press, wait for the thread, read the screen. Every export goes under tmp_path, never into the
session-wide run's folder. Snapshots fix the destination field, so no tmp path shows."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from localtune.errors import UserError
from localtune.runs import RunDir
from localtune.tui.app import LocaltuneApp
from tests.tui_support import cpu_machine

FIXED_DEST = "/home/you/models/tiny-run"


def drive(screen: str, run: RunDir, test: Callable[[LocaltuneApp, Any], Awaitable[None]],
          size: tuple[int, int] = (100, 30)) -> None:
    """Open `run`'s export or chat screen on a headless app, then `test(app, pilot)`."""
    app = LocaltuneApp(hardware=cpu_machine(), mode="runs")

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await open_screen(pilot, screen, run)
            await test(app, pilot)

    asyncio.run(main())


async def open_screen(pilot, screen: str, run: RunDir) -> None:
    getattr(pilot.app, f"open_{screen}")(run)
    await settle(pilot)


async def settle(pilot) -> None:
    """Wait for the screen's threads (loading, exporting, answering) and their messages."""
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def text_of(app: LocaltuneApp, selector: str) -> str:
    return str(app.screen.query_one(selector).content)


# ---------------------------------------------------------------- export


async def export_to(pilot, dest: Path | str, *choices: str) -> None:
    """Click `choices` (a format's radio button, #ollama, #force), set #dest, press Export, wait."""
    for selector in choices:
        await pilot.click(selector)
    pilot.app.screen.query_one("#dest").value = str(dest)
    while pilot.app.screen.query_one("#export").has_class("-active"):  # a button ignores a second click for 0.2 s
        await pilot.pause(0.05)
    await pilot.click("#export")
    await settle(pilot)


def test_gguf_q8_0_with_ollama_writes_the_file_and_a_modelfile_and_shows_the_check(
        tiny_trained_run: RunDir, tmp_path: Path) -> None:
    out = tmp_path / "out"

    async def check(app, pilot) -> None:
        assert app.screen.query_one("#ollama").disabled  # a Modelfile is for GGUF only
        await pilot.click("#fmt-gguf-q8_0")
        assert not app.screen.query_one("#ollama").disabled
        assert app.screen.query_one("#dest").value == str(tiny_trained_run.exports_dir / "gguf-q8_0")
        await export_to(pilot, out, "#ollama")
        assert (out / "tiny-run-q8_0.gguf").is_file() and (out / "Modelfile").is_file()
        shown = text_of(app, "#export-result-text")
        assert "exported as gguf (q8_0) in" in shown and str(out) in shown
        assert "tiny-run-q8_0.gguf" in shown and "Modelfile" in shown
        result = app.screen.result
        assert f"merge_max_rel_logit_diff  {result.checks['merge_max_rel_logit_diff']}" in shown
        assert f"ollama create localtune-tiny-run -f {out}/Modelfile" in shown
        assert text_of(app, "#export-error") == ""

    drive("export", tiny_trained_run, check)


def test_an_existing_destination_is_refused_in_one_line_and_the_form_stays_usable(
        tiny_trained_run: RunDir, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    out = tmp_path / "adapter"

    async def check(app, pilot) -> None:
        await export_to(pilot, taken)
        assert text_of(app, "#export-error") == (f"{taken} already exists; tick 'replace it if it exists', "
                                                 "or choose another destination")
        assert list(taken.iterdir()) == [] and app.screen.result is None
        (tmp_path / "a-file").write_text("")
        await export_to(pilot, tmp_path / "a-file", "#force")
        assert text_of(app, "#export-error") == (f"{tmp_path / 'a-file'} is a file; "
                                                 "choose a folder to write the export into")
        assert not app.screen.query_one("#export").disabled
        await export_to(pilot, out)  # the adapter, the default format
        assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
        assert text_of(app, "#export-error") == ""
        assert "exported as adapter in" in text_of(app, "#export-result-text")

    drive("export", tiny_trained_run, check)


def test_a_refusal_from_export_shows_its_line(tiny_trained_run: RunDir, tmp_path: Path, monkeypatch) -> None:
    def refuse(run, fmt, **kw):
        raise UserError("no space left on the disk of /x while writing the export; nothing was left behind")

    monkeypatch.setattr("localtune.tui.screens.export.export_run", refuse)

    async def check(app, pilot) -> None:
        await export_to(pilot, tmp_path / "out")
        assert text_of(app, "#export-error").startswith("no space left on the disk of /x")
        assert not app.screen.exporting and not app.screen.query_one("#export").disabled

    drive("export", tiny_trained_run, check)


def test_the_destination_follows_the_format_until_the_person_types_one(tiny_trained_run: RunDir) -> None:
    async def check(app, pilot) -> None:
        dest = app.screen.query_one("#dest")
        assert dest.value == str(tiny_trained_run.exports_dir / "adapter")
        await pilot.click("#fmt-merged")
        assert dest.value == str(tiny_trained_run.exports_dir / "merged")
        dest.value = "/somewhere/mine"
        await pilot.click("#fmt-gguf-f16")
        assert dest.value == "/somewhere/mine"
        await pilot.press("escape")
        assert type(app.screen).__name__ == "RunsScreen"

    drive("export", tiny_trained_run, check)


# ---------------------------------------------------------------- chat


async def say(pilot, text: str) -> None:
    await pilot.press(*text, "enter")
    await settle(pilot)


def answers(app: LocaltuneApp, side: str) -> list[str]:
    return [m.text for m in app.screen.query(f".chat-{side}")]


def test_a_message_gets_a_streamed_answer_from_the_tuned_model(tiny_trained_run: RunDir) -> None:
    async def check(app, pilot) -> None:
        box = app.screen.query_one("#chat-input")
        assert app.screen.session is not None and not box.disabled and box.has_focus
        await say(pilot, "What is the capital of France?")
        assert answers(app, "you") == ["What is the capital of France?"]
        tuned = answers(app, "tuned")
        assert len(tuned) == 1 and tuned[0].strip()
        assert answers(app, "base") == []
        assert not box.disabled and box.value == ""
        assert [m["role"] for m in app.screen.histories["tuned"]] == ["user", "assistant"]
        await pilot.press("ctrl+t")  # compare: both sides start over, so both see the same turns
        await pilot.pause()
        assert app.screen.query_one("#compare").value and app.screen.histories["tuned"] == []
        assert "a new conversation" in str(app.screen.query_one(".chat-divider").content)
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert answers(app, "you") == [] and not app.screen.query(".chat-divider")

    drive("chat", tiny_trained_run, check)


def test_keys_answer_while_the_model_writes_and_ctrl_l_abandons_the_answer(tiny_trained_run: RunDir) -> None:
    gate = threading.Event()

    async def check(app, pilot) -> None:
        session = app.screen.session
        real_reply = session.reply

        def slow_reply(messages, *, tuned, on_text):  # the tiny model writes 256 tokens in a blink
            on_text("first words")
            gate.wait(30)
            return real_reply(messages, tuned=tuned, on_text=on_text)

        session.reply = slow_reply
        box = app.screen.query_one("#chat-input")
        await pilot.press(*"Hi", "enter")
        await pilot.pause()
        assert app.screen.generating and box.disabled and answers(app, "tuned") == ["first words"]
        await pilot.press("ctrl+l")
        await pilot.pause()
        assert not app.screen.generating and not box.disabled and answers(app, "tuned") == []
        gate.set()
        await settle(pilot)  # the abandoned thread stops at its next token and writes nowhere
        assert answers(app, "tuned") == [] and app.screen.histories["tuned"] == []

    try:
        drive("chat", tiny_trained_run, check)
    finally:
        gate.set()


def test_compare_answers_each_message_with_the_base_and_the_tuned_model(tiny_trained_run: RunDir) -> None:
    async def check(app, pilot) -> None:
        await pilot.click("#compare")
        assert app.screen.query_one("#compare").value
        await say(pilot, "Hello")
        pair = app.screen.query_one(".chat-pair")
        base, tuned = pair.query(".chat-msg")
        assert "chat-base" in base.classes and "chat-tuned" in tuned.classes
        assert base.text.strip() and tuned.text.strip()
        assert len(app.screen.histories["base"]) == len(app.screen.histories["tuned"]) == 2
        assert not app.screen.query_one("#chat-input").disabled
        await pilot.press("escape")
        assert type(app.screen).__name__ == "RunsScreen"

    drive("chat", tiny_trained_run, check)


# ---------------------------------------------------------------- snapshots


@pytest.mark.parametrize("size", [(100, 30), (80, 24)], ids=["100x30", "80x24"])
def test_snapshot_export_before_exporting(tiny_trained_run: RunDir, snap_compare, size) -> None:
    async def open_it(pilot) -> None:
        await open_screen(pilot, "export", tiny_trained_run)
        pilot.app.screen.query_one("#dest").value = FIXED_DEST  # the run's folder is a tmp path
        await pilot.pause()

    assert snap_compare(LocaltuneApp(hardware=cpu_machine(), mode="runs"), terminal_size=size, run_before=open_it)


@pytest.mark.parametrize("size", [(100, 30), (80, 24)], ids=["100x30", "80x24"])
def test_snapshot_chat_after_loading(tiny_trained_run: RunDir, snap_compare, size) -> None:
    async def open_it(pilot) -> None:
        await open_screen(pilot, "chat", tiny_trained_run)

    assert snap_compare(LocaltuneApp(hardware=cpu_machine(), mode="runs"), terminal_size=size, run_before=open_it)
