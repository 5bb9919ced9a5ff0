"""Reading the event log from its end: `last_event` gives what reading it all would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localtune.events import last_event, read_events
from tests.tui_support import step_events, write_events


@pytest.mark.parametrize("block", [16, 64, 1 << 16])
def test_last_event_equals_the_last_of_a_full_read_across_block_boundaries(tmp_path: Path, block: int) -> None:
    log = tmp_path / "events.jsonl"
    write_events(log, step_events(1, 50, 50, t0=0.0) + [{"t": 200.0, "kind": "checkpoint", "step": 50,
                                                           "path": "checkpoints/checkpoint-50"}])
    every = read_events(log)
    assert last_event(log, "step", block=block) == [e for e in every if e["kind"] == "step"][-1]
    assert last_event(log, "checkpoint", block=block)["step"] == 50
    assert last_event(log, "eval", block=block) is None


def test_a_line_being_written_is_skipped(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    write_events(log, step_events(1, 3, 10, t0=0.0))
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(step_events(4, 4, 10, t0=0.0)[0])[:30])  # the worker is mid-write
    assert last_event(log, "step")["step"] == 3


def test_no_file_no_event(tmp_path: Path) -> None:
    assert last_event(tmp_path / "missing.jsonl", "step") is None
    (tmp_path / "empty.jsonl").touch()
    assert last_event(tmp_path / "empty.jsonl", "step") is None
