"""The headless progress view, fed a hand-written event log (no training needed), and
`localtune attach` without a terminal on a real worker that was stopped and resumed (slow)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from localtune import headless
from localtune.events import append_event, read_events
from localtune.runs import create_run
from tests.helpers import live_worker
from tests.helpers import run as run_cli


def make_run():
    return create_run({"run": {"model": "smollm2-135m", "data": "demo"}, "knobs": {}}, {}, "r1")


def test_follow_prints_progress_and_returns_the_end(monkeypatch):
    run = make_run()
    append_event(run.events_path, "started", pid=1, resumed_from=None, max_steps=2, device="cpu")
    for step, loss in ((1, 2.5), (2, 1.25)):
        append_event(run.events_path, "step", step=step, max_steps=2, epoch=step / 2, loss=loss,
                     learning_rate=1e-3, grad_norm=1.0, tokens_per_s=1234.0, elapsed_s=3.0 * step)
    append_event(run.events_path, "eval", step=2, eval_loss=1.5)
    append_event(run.events_path, "sample", step=2, prompt="Hi?", text="Ahoy!\nA [bold] answer, " + "x" * 200)
    append_event(run.events_path, "checkpoint", step=2, path=str(run.checkpoints_dir / "checkpoint-2"))
    append_event(run.events_path, "finished", step=2, adapter=str(run.adapter_dir), train_loss=1.875, elapsed_s=6.0)
    out = io.StringIO()
    end = headless.follow(run, out=out, worker_alive=lambda: True)
    text = out.getvalue()
    assert end["kind"] == "finished"
    assert "started on cpu (from the start), 2 steps" in text
    lines = text.splitlines()
    assert "step 2: eval loss 1.5000" in lines and "step 2: checkpoint-2 saved" in lines
    assert f"step 2: sample: {('Ahoy! A [bold] answer, ' + 'x' * 200)[:100]}" in lines  # one line, as written
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


# ---------------------------------------------------------------- preference runs (dpo, orpo)

SFT_RUN = "20260921-101500-smollm2-135m"


def preference_run(method: str = "dpo", from_run: str | None = SFT_RUN):
    """A finished preference run of 2 steps: rewards in its steps, the preference accuracy in its eval."""
    run = create_run({"run": {"model": "smollm2-135m", "data": "/data/pairs.jsonl",
                              **({"from_run": from_run} if from_run else {})},
                      "knobs": {"method": method}}, {}, "r1")
    append_event(run.events_path, "started", pid=1, resumed_from=None, max_steps=2, device="cpu", method=method,
                 from_run=from_run)
    for step, loss, margin, acc in ((1, 0.6931, 0.0352, 0.5), (2, 0.6104, 0.4211, 0.75)):
        extra = {"log_odds_ratio": -0.7, "nll_loss": 1.8} if method == "orpo" else {}
        append_event(run.events_path, "step", step=step, max_steps=2, epoch=step / 2, loss=loss, learning_rate=1e-3,
                     grad_norm=1.0, tokens_per_s=1234.0, elapsed_s=3.0 * step, rewards_chosen=margin / 2,
                     rewards_rejected=-margin / 2, reward_margin=margin, reward_accuracy=acc, **extra)
    append_event(run.events_path, "eval", step=2, eval_loss=0.65, eval_reward_accuracy=0.8, eval_reward_margin=0.12)
    append_event(run.events_path, "finished", step=2, adapter=str(run.adapter_dir), train_loss=0.65, elapsed_s=6.0)
    return run


def test_follow_a_dpo_run_prints_its_method_margin_and_accuracy():
    run = preference_run()
    out = io.StringIO()
    end = headless.follow(run, out=out, worker_alive=lambda: True)
    lines = out.getvalue().splitlines()
    assert end["kind"] == "finished"
    # the first line, the header: the method and the run it continues
    assert lines[0] == f"started dpo on cpu (from the start), 2 steps; continues run {SFT_RUN}'s adapter"
    assert lines[1].startswith("step 1/2  loss 0.6931  margin 0.035  acc 0.50  lr 1.00e-03  1,234 tok/s  elapsed 0:03")
    assert lines[2].startswith("step 2/2  loss 0.6104  margin 0.421  acc 0.75  lr 1.00e-03")
    assert lines[3] == "step 2: eval loss 0.6500, preference accuracy 0.80 (margin 0.120)"
    assert lines[-1] == f"finished: 2 steps, mean loss 0.6500; adapter in {run.adapter_dir}"


def test_attach_to_an_orpo_run_without_a_terminal(capsys):
    run = preference_run("orpo", from_run=None)
    run.write_status(state="completed", step=2, pid=None)
    rc, out, err = run_cli(capsys, "attach", run.id, "--headless")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "started orpo on cpu (from the start), 2 steps"
    assert "step 2/2  loss 0.6104  margin 0.421  acc 0.75  lr 1.00e-03" in out
    assert "step 2: eval loss 0.6500, preference accuracy 0.80 (margin 0.120)" in lines


def test_the_live_panel_of_a_dpo_run_fits_80_columns():
    from localtune.progress import RunProgress

    p = RunProgress()
    for e in read_events(preference_run().events_path):
        p.apply(e)
    first, second = headless.progress_line(p, sep="\n").splitlines()
    assert first == "step 2/2  loss 0.6104  margin 0.421  acc 0.75  lr 1.00e-03  1,234 tok/s"
    assert len(first) <= 80 and second.startswith("elapsed 0:06")


# ---------------------------------------------------------------- attach: a log of several attempts


def stopped_attempt(run, pid: int = 1) -> None:
    """A first attempt of 4 steps, stopped at step 2 with checkpoint-2 (the worker `pid` has exited)."""
    append_event(run.events_path, "started", pid=pid, resumed_from=None, max_steps=4, device="cpu")
    for step in (1, 2):
        append_event(run.events_path, "step", step=step, max_steps=4, loss=4.0 / step, learning_rate=1e-3,
                     tokens_per_s=100.0, elapsed_s=2.0 * step)
    append_event(run.events_path, "checkpoint", step=2, path=str(run.checkpoints_dir / "checkpoint-2"))
    append_event(run.events_path, "stopping", reason="SIGTERM")
    append_event(run.events_path, "stopped", step=2, checkpoint="checkpoint-2")


@pytest.mark.parametrize("started_yet", [True, False], ids=["resume-training", "resume-loading-its-model"])
def test_attach_follows_a_resumed_attempt_past_the_stop_before_it(capsys, monkeypatch, started_yet):
    """`attach` reads the log from its start: the first attempt's `stopped` is history when a
    resumed worker holds the run, whether it has written its `started` yet or not."""
    monkeypatch.setattr(headless, "POLL_S", 0.05)
    run = make_run()
    stopped_attempt(run)
    with live_worker(run) as worker:
        if started_yet:
            append_event(run.events_path, "started", pid=worker.pid, resumed_from="checkpoint-2", max_steps=4,
                         device="cpu")

        def resumed_worker():
            time.sleep(0.5)
            if not started_yet:
                append_event(run.events_path, "started", pid=worker.pid, resumed_from="checkpoint-2",
                             max_steps=4, device="cpu")
            for step in (3, 4):
                append_event(run.events_path, "step", step=step, max_steps=4, loss=4.0 / step, learning_rate=1e-3,
                             tokens_per_s=100.0, elapsed_s=2.0 * step)
            append_event(run.events_path, "finished", step=4, adapter=str(run.adapter_dir), train_loss=0.5,
                         elapsed_s=8.0)

        thread = threading.Thread(target=resumed_worker)
        thread.start()
        rc, out, err = run_cli(capsys, "attach", run.id, "--headless")
        thread.join()
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[-1] == f"finished: 4 steps, mean loss 0.5000; adapter in {run.adapter_dir}", out
    history = ["started on cpu (from the start), 4 steps", "step 2: checkpoint-2 saved",
               "stopping (SIGTERM): finishing the step and writing a checkpoint", "stopped at step 2 (checkpoint-2)",
               "started on cpu (resumed from checkpoint-2), 4 steps", "step 4/4  loss 1.0000"]
    at = [next((i for i, line in enumerate(lines) if line.startswith(want)), None) for want in history]
    assert None not in at and at == sorted(at), out
    assert "goes on from there" not in out  # the stop is not how the run ended


def test_attach_to_a_run_stopped_twice_shows_both_and_ends_at_once(capsys, monkeypatch):
    run = make_run()
    stopped_attempt(run)
    append_event(run.events_path, "started", pid=2, resumed_from="checkpoint-2", max_steps=4, device="cpu")
    append_event(run.events_path, "step", step=3, max_steps=4, loss=0.5, learning_rate=1e-3, elapsed_s=6.0)
    append_event(run.events_path, "stopped", step=3, checkpoint="checkpoint-3")
    run.write_status(state="stopped", step=3, pid=None)
    t0 = time.monotonic()
    rc, out, err = run_cli(capsys, "attach", run.id)  # stdout is not a terminal: the text view
    assert time.monotonic() - t0 < 5.0
    assert rc == 0, err
    lines = out.splitlines()
    assert "stopped at step 2 (checkpoint-2)" in lines
    assert lines[-1] == f"stopped at step 3 (checkpoint-3); `localtune resume {run.id}` goes on from there"


def test_attach_to_an_interrupted_run_says_so_at_once(capsys):
    """The status says running but no worker holds the run (it was killed): no waiting for a
    worker that will never come."""
    run = make_run()
    append_event(run.events_path, "started", pid=1, resumed_from=None, max_steps=4, device="cpu")
    append_event(run.events_path, "step", step=1, max_steps=4, loss=2.0, learning_rate=1e-3, elapsed_s=2.0)
    run.write_status(state="running", step=1, pid=1)
    assert run.state() == "interrupted"
    t0 = time.monotonic()
    rc, out, err = run_cli(capsys, "attach", run.id, "--headless")
    assert time.monotonic() - t0 < 5.0
    assert rc == 1
    assert out.splitlines()[-2:] == [
        f"failed: the worker ended without a word (killed?); `localtune resume {run.id}` goes on from its last "
        "checkpoint",
        f"  log: {run.log_path}"]


# ---------------------------------------------------------------- attach: a real worker, stopped and resumed

RESUMED_MAX_STEPS = 40
"""Steps of the real run below (one row each): the resumed attempt trains for several seconds
after attach starts even on an idle machine (and the test checks that it did)."""


def wait_for(run, proc: subprocess.Popen, kind: str, count: int = 1, timeout_s: float = 180.0) -> None:
    """Wait until the log holds `count` events of `kind`, while the worker `proc` lives."""
    from tests.test_worker import log_tail

    deadline = time.monotonic() + timeout_s
    while [e["kind"] for e in read_events(run.events_path)].count(kind) < count:
        assert proc.poll() is None, f"the worker ended (rc {proc.returncode}) before {count} {kind}:\n{log_tail(run)}"
        assert time.monotonic() < deadline, f"no {count} {kind} within {timeout_s} s:\n{log_tail(run)}"
        time.sleep(0.05)


@pytest.mark.slow
def test_attach_follows_a_stopped_then_resumed_real_run_to_the_end(tiny_chat_model_dir, tmp_path):
    """The worker trains, is stopped (SIGTERM: `stopped` and a checkpoint), is resumed by a new
    worker on the same folder; while that one trains, `localtune attach RUN --headless` and
    `localtune attach RUN` with its output not a terminal follow it to `finished`."""
    from localtune.demo import demo_dataset_path
    from tests.test_worker import REPO_ROOT, log_tail, start_worker, wait_worker
    from tests.test_worker import make_run as make_worker_run

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(demo_dataset_path().read_text(encoding="utf-8").splitlines()[:40]) + "\n")
    run = make_worker_run("stopped-then-resumed", tiny_chat_model_dir, data, max_steps=RESUMED_MAX_STEPS,
                          per_device_train_batch_size=1, gradient_accumulation_steps=1, save_steps=10, eval_steps=10)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    procs: list[subprocess.Popen] = []
    try:
        procs.append(first := start_worker(run))
        wait_for(run, first, "step")
        first.send_signal(signal.SIGTERM)
        assert wait_worker(first, run) == 0 and run.state() == "stopped", log_tail(run)
        (stop,) = [e for e in read_events(run.events_path) if e["kind"] == "stopped"]
        assert stop["checkpoint"] == f"checkpoint-{stop['step']}" and stop["step"] < 10

        procs.append(resumed := start_worker(run))
        wait_for(run, resumed, "started", count=2)
        attaches = {flags: subprocess.Popen([sys.executable, "-m", "localtune", "attach", run.id, *flags],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, env=env)
                    for flags in (("--headless",), ())}
        procs += attaches.values()
        first_lines = {flags: a.stdout.readline() for flags, a in attaches.items()}
        # both were following the log while the resumed worker still trained
        assert resumed.poll() is None, "the resumed attempt ended before attach began: make RESUMED_MAX_STEPS longer"
        assert all(line.startswith("started on cpu") for line in first_lines.values()), first_lines
        results = {flags: (a.wait(timeout=300), first_lines[flags] + a.stdout.read(), a.stderr.read())
                   for flags, a in attaches.items()}
        assert wait_worker(resumed, run) == 0, log_tail(run)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    (finished,) = [e for e in read_events(run.events_path) if e["kind"] == "finished"]
    assert finished["step"] == RESUMED_MAX_STEPS
    for flags, (rc, out, err) in results.items():
        assert rc == 0, (flags, out, err)
        lines = out.splitlines()
        assert lines[-1].startswith(f"finished: {RESUMED_MAX_STEPS} steps, mean loss "), (flags, out)
        assert lines[-2].startswith(f"step {RESUMED_MAX_STEPS}/{RESUMED_MAX_STEPS}  loss "), (flags, out)
        assert f"stopped at step {stop['step']} ({stop['checkpoint']})" in lines, (flags, out)
        assert any(f"(resumed from {stop['checkpoint']})" in line for line in lines), (flags, out)
        assert "step 30: checkpoint-30 saved" in lines, (flags, out)
