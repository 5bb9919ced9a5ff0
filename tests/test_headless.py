"""The headless progress view, fed a hand-written event log (no training needed)."""

from __future__ import annotations

import io
import threading
import time

from localtune import headless
from localtune.events import append_event
from localtune.runs import create_run


def make_run():
    return create_run({"run": {"model": "smollm2-135m", "data": "demo"}, "knobs": {}}, {}, "r1")


def test_follow_prints_progress_and_returns_the_end(monkeypatch):
    run = make_run()
    append_event(run.events_path, "started", pid=1, resumed_from=None, max_steps=2, device="cpu")
    for step, loss in ((1, 2.5), (2, 1.25)):
        append_event(run.events_path, "step", step=step, max_steps=2, epoch=step / 2, loss=loss,
                     learning_rate=1e-3, grad_norm=1.0, tokens_per_s=1234.0, elapsed_s=3.0 * step)
    append_event(run.events_path, "finished", step=2, adapter=str(run.adapter_dir), train_loss=1.875, elapsed_s=6.0)
    out = io.StringIO()
    end = headless.follow(run, out=out, worker_alive=lambda: True)
    text = out.getvalue()
    assert end["kind"] == "finished"
    assert "started on cpu (from the start), 2 steps" in text
    assert "step 1/2  loss 2.5000  lr 1.00e-03  1,234 tok/s" in text
    assert "step 2/2  loss 1.2500" in text and "elapsed 0:06" in text
    assert "finished: 2 steps, mean loss 1.8750" in text


def test_follow_from_an_offset_ignores_the_attempts_before(monkeypatch):
    """A resumed run's log already ends with `stopped`: following the new attempt must not stop there."""
    monkeypatch.setattr(headless, "POLL_S", 0.05)
    run = make_run()
    append_event(run.events_path, "started", pid=1, resumed_from=None, max_steps=4, device="cpu")
    append_event(run.events_path, "stopped", step=2, checkpoint="checkpoint-2")
    offset = run.events_path.stat().st_size

    def worker():
        time.sleep(0.3)
        append_event(run.events_path, "started", pid=2, resumed_from="checkpoint-2", max_steps=4, device="cpu")
        append_event(run.events_path, "finished", step=4, adapter="a", train_loss=1.0, elapsed_s=9.0)

    threading.Thread(target=worker).start()
    out = io.StringIO()
    end = headless.follow(run, out=out, worker_alive=lambda: True, offset=offset)
    assert end["kind"] == "finished" and end["step"] == 4
    assert "resumed from checkpoint-2" in out.getvalue()


def test_a_worker_that_vanishes_is_reported_as_failed(monkeypatch):
    monkeypatch.setattr(headless, "POLL_S", 0.01)
    run = make_run()
    append_event(run.events_path, "started", pid=1, resumed_from=None, max_steps=4, device="cpu")
    monkeypatch.setattr(headless, "START_GRACE_S", 0.0)
    out = io.StringIO()
    end = headless.follow(run, out=out, worker_alive=lambda: False)
    assert end["kind"] == "failed"
    assert "ended without a word" in out.getvalue() and str(run.log_path) in out.getvalue()
