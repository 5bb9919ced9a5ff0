"""The training worker as a person meets it: `python -m localtune.worker RUN_DIR` in its own
process session, on a run directory, read back through status.json, events.jsonl, the
checkpoints and the adapter only.

Every worker here trains `tiny_chat_model_dir` (a tiny Llama with the real SmolLM2 tokenizer)
on the first 40 rows of the demo set (36 after the evaluation split) for 12 optimizer steps of 4
rows, a little over one epoch, on the CPU and single-threaded (so two runs compute bit for bit
the same, and a busy machine does not slow them down much). One uninterrupted run is the
reference; the resume tests interrupt a second run with the same configuration (SIGKILL,
SIGTERM, death while a checkpoint is being written), resume it by starting the worker again on
the same folder, and compare its losses and final adapter with the reference.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import localtune
from localtune.errors import UserError
from localtune.events import EVENT_FIELDS, read_events
from localtune.runs import RunDir, create_run

MAX_STEPS = 12  # 36 training rows, 4 per step: the run crosses into a second epoch after step 9
SAVE_STEPS = 2
KNOBS = dict(
    max_steps=MAX_STEPS, save_steps=SAVE_STEPS, save_total_limit=3, logging_steps=1, eval_steps=4,
    per_device_train_batch_size=2, gradient_accumulation_steps=2, max_length=64,
    r=8, lora_alpha=16, lora_dropout=0.05,  # dropout: resume must restore the RNG exactly
    learning_rate=1e-3, warmup_steps=1, lr_scheduler_type="cosine", gradient_checkpointing=False,
    optim="adamw_torch", seed=1234,
    calibrate=False,  # measured once, by test_calibrate.py; the others would pay a second model load each
    bf16=False,  # float32: the back-off test's tolerance is a float32 one (the default, bf16 where the CPU has it, is
)                # what the end-to-end demo run trains with)
LOSS_TOL = 1e-4
ADAPTER_TOL = 1e-5
WORKER_TIMEOUT_S = 180
FAULT_ENV = "LOCALTUNE_FAULT_KILL_IN_CHECKPOINT"
REPO_ROOT = Path(localtune.__file__).resolve().parent.parent


# ---------------------------------------------------------------- helpers


def _cpu_hardware():
    """This machine as the CPU backend, even where a GPU is present (the tests train on the CPU)."""
    from localtune.hardware import Device, probe

    hw = probe()
    if hw.backend != "cpu":
        ram = Device(name=hw.cpu_name or "CPU", total_bytes=hw.ram_total_bytes, free_bytes=hw.ram_available_bytes)
        hw = replace(hw, backend="cpu", devices=[ram], driver_version=None, cuda_driver_version=None, chip=None)
    return hw


def make_run(run_id: str, model_dir: Path, data: Path, **knobs: Any) -> RunDir:
    """A run as `localtune train` writes it: the plan for this machine with every knob pinned
    (KNOBS, and `knobs` over them)."""
    from localtune.models import resolve_model
    from localtune.plan import make_plan

    plan = make_plan(_cpu_hardware(), resolve_model(str(model_dir)), profile="cpu", pinned={**KNOBS, **knobs})
    assert plan.fits and plan.backend == "cpu"
    config = {"run": {"model": str(model_dir), "data": str(data), "eval_split": 0.1, "sample_steps": 4},
              "knobs": plan.knobs.to_dict()}
    return create_run(config, plan.to_dict(), run_id)


def start_worker(run: RunDir, **env: str) -> subprocess.Popen:
    """Start the worker as launch does: its own session, stdout and stderr into worker.log."""
    full_env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    full_env.update(
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",  # the same arithmetic in every run; no oversubscription
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    full_env.update(env)
    with open(run.log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "localtune.worker", str(run.path)], stdout=log,
                                stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    _started.append(proc)
    return proc


_started: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_orphan_workers():
    """A failing test must not leave a worker running."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def log_tail(run: RunDir, n: int = 3000) -> str:
    try:
        return run.log_path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return "(no worker.log)"


def wait_worker(proc: subprocess.Popen, run: RunDir, timeout: float = WORKER_TIMEOUT_S) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"worker did not end within {timeout} s; worker.log:\n{log_tail(run)}")


def kill_after_first_checkpoint(proc: subprocess.Popen, run: RunDir) -> str:
    """SIGKILL the worker right after its first checkpoint and check what a person then sees:
    no `finished`, the run `interrupted`. Returns the newest complete checkpoint's name."""
    at = signal_after_first_checkpoint(proc, run, signal.SIGKILL)
    assert wait_worker(proc, run) == -signal.SIGKILL
    assert not events_of(run, "finished"), "the worker finished before it was killed"
    assert run.state() == "interrupted"
    newest = run.complete_checkpoints()[-1].name
    assert int(newest.rsplit("-", 1)[1]) >= int(at.rsplit("-", 1)[1])
    return newest


def run_to_end(run: RunDir) -> None:
    proc = start_worker(run)
    rc = wait_worker(proc, run)
    assert rc == 0, f"worker exited {rc}; worker.log:\n{log_tail(run)}"


def signal_after_first_checkpoint(proc: subprocess.Popen, run: RunDir, sig: int, pid=None) -> str:
    """Send `sig` as soon as a complete checkpoint appears; return that checkpoint's name. `pid`:
    a callable naming another process to signal instead of the worker (a rank of several)."""
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while time.monotonic() < deadline:
        found = run.complete_checkpoints()
        if found:
            if pid is None:
                proc.send_signal(sig)
            else:
                os.kill(pid(), sig)
            return found[-1].name
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"worker ended (rc {proc.returncode}) before its first checkpoint; worker.log:\n"
                        f"{log_tail(run)}")
        time.sleep(0.01)
    pytest.fail(f"no checkpoint within {WORKER_TIMEOUT_S} s; worker.log:\n{log_tail(run)}")


def events_of(run: RunDir, kind: str) -> list[dict[str, Any]]:
    return [e for e in read_events(run.events_path) if e["kind"] == kind]


def step_losses(run: RunDir) -> dict[int, float]:
    """The loss per step; where a resume repeated a step, its last (resumed) value."""
    return {e["step"]: e["loss"] for e in events_of(run, "step")}


def load_adapter(run: RunDir) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(run.adapter_dir / "adapter_model.safetensors")


def partial_leftovers(run: RunDir) -> list[str]:
    partial = run.checkpoints_dir / ".partial"
    return sorted(p.name for p in partial.iterdir()) if partial.is_dir() else []


def assert_matches_reference(run: RunDir, ref: RunDir, resumed_from: str) -> None:
    """The resumed run ends as the uninterrupted one: completed, the same loss at every step
    from the checkpoint on, the same adapter."""
    assert run.read_status()["state"] == "completed", log_tail(run)
    assert run.state() == "completed"
    for e in read_events(run.events_path):
        assert set(e) - {"t", "kind"} == set(EVENT_FIELDS[e["kind"]]), e
    starts = events_of(run, "started")
    assert [s["resumed_from"] for s in starts] == [None, resumed_from]
    assert events_of(run, "finished")[-1]["step"] == MAX_STEPS

    got, want = step_losses(run), step_losses(ref)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    first_resumed = int(resumed_from.rsplit("-", 1)[1]) + 1
    for step in range(first_resumed, MAX_STEPS + 1):
        assert got[step] == pytest.approx(want[step], abs=LOSS_TOL), (
            f"step {step}: resumed loss {got[step]!r} != uninterrupted {want[step]!r}")
    # and the steps before the interruption were the same too (same seed, same data order)
    for step in range(1, first_resumed):
        assert got[step] == pytest.approx(want[step], abs=LOSS_TOL)

    a, b = load_adapter(run), load_adapter(ref)
    assert sorted(a) == sorted(b)
    for name in a:
        diff = (a[name] - b[name]).abs().max().item()
        assert diff <= ADAPTER_TOL, f"{name}: resumed adapter differs from the uninterrupted one by {diff:g}"

    assert partial_leftovers(run) == []
    assert not run.lock_path.exists()
    # elapsed_s goes on from where the checkpoint left it (the steps a crash threw away do not count)
    attempts: list[list[dict[str, Any]]] = []
    for e in read_events(run.events_path):
        if e["kind"] == "started":
            attempts.append([])
        elif e["kind"] == "step":
            attempts[-1].append(e)
    first, resumed = attempts
    at_checkpoint = next(e["elapsed_s"] for e in first if e["step"] == first_resumed - 1)
    elapsed = [at_checkpoint] + [e["elapsed_s"] for e in resumed]
    assert elapsed == sorted(elapsed), f"elapsed_s must count the time before the resume too: {elapsed}"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 40 rows of the demo set."""
    from localtune.demo import demo_dataset_path

    rows = demo_dataset_path().read_text(encoding="utf-8").splitlines()[:40]
    path = tmp_path_factory.mktemp("worker-data") / "train.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference_run(tiny_chat_model_dir: Path, train_file: Path, tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """One uninterrupted run, trained once for the whole module."""
    home = tmp_path_factory.mktemp("worker-reference-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCALTUNE_HOME", str(home))
        run = make_run("reference", tiny_chat_model_dir, train_file)
        run_to_end(run)
    return run


@pytest.fixture
def new_run(tiny_chat_model_dir: Path, train_file: Path):
    """Another run with the reference's configuration, in this test's LOCALTUNE_HOME."""
    return lambda run_id="interrupted": make_run(run_id, tiny_chat_model_dir, train_file)


# ---------------------------------------------------------------- tests


def test_a_full_run_completes_with_events_checkpoints_and_an_adapter(reference_run: RunDir) -> None:
    run = reference_run
    status = run.read_status()
    assert status["state"] == "completed", log_tail(run)
    assert run.state() == "completed"
    assert status["step"] == MAX_STEPS and status["pid"] is None
    assert status["adapter"] == str(run.adapter_dir)

    # the data as loaded and the chat template, recorded for chat and export
    data = json.loads((run.path / "data.json").read_text())
    assert data["format"] == "messages" and data["train_rows"] + data["eval_rows"] == data["valid_rows"]
    assert data["chat_template"]["end_of_turn"] == "<|im_end|>" and data["chat_template"]["source"] == "model"

    events = read_events(run.events_path)
    # every event is a documented kind with exactly its documented fields
    for e in events:
        assert e["kind"] in EVENT_FIELDS, e
        assert set(e) - {"t", "kind"} == set(EVENT_FIELDS[e["kind"]]), e
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert not {"failed", "stopping", "stopped", "warning"} & set(kinds)

    started = events[0]
    assert started["resumed_from"] is None and started["max_steps"] == MAX_STEPS
    assert started["device"] == "cpu" and isinstance(started["pid"], int)

    steps = events_of(run, "step")
    assert [e["step"] for e in steps] == list(range(1, MAX_STEPS + 1))
    for e in steps:
        assert math.isfinite(e["loss"]) and e["loss"] > 0, e
        assert e["max_steps"] == MAX_STEPS
        assert e["learning_rate"] is not None and e["learning_rate"] >= 0
        assert e["tokens_per_s"] > 0
    assert len({round(e["loss"], 6) for e in steps}) > 1  # different batches give different losses
    assert steps[0]["epoch"] < 1 < steps[-1]["epoch"]  # the resumed runs cross an epoch boundary
    assert [e["elapsed_s"] for e in steps] == sorted(e["elapsed_s"] for e in steps)
    assert events_of(run, "hardware")

    checkpoints = events_of(run, "checkpoint")
    assert [e["step"] for e in checkpoints] == list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    assert [e["path"] for e in checkpoints] == [str(run.checkpoints_dir / f"checkpoint-{e['step']}")
                                                for e in checkpoints]
    # save_total_limit = 3: only the newest three stay, each complete
    kept = run.complete_checkpoints()
    assert [p.name for p in kept] == [f"checkpoint-{s}" for s in (MAX_STEPS - 4, MAX_STEPS - 2, MAX_STEPS)]
    for p in kept:
        for f in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
            assert (p / f).is_file(), f"{p.name} lacks {f}"
    assert status["last_checkpoint"] == f"checkpoint-{MAX_STEPS}"

    assert [e["step"] for e in events_of(run, "eval")] == [4, 8, 12]
    assert all(math.isfinite(e["eval_loss"]) for e in events_of(run, "eval"))
    samples = events_of(run, "sample")
    assert [e["step"] for e in samples] == [4, 8, 12]
    assert all(isinstance(e["text"], str) and e["prompt"] for e in samples)

    finished = events[-1]
    assert finished["step"] == MAX_STEPS and finished["adapter"] == str(run.adapter_dir)
    assert math.isfinite(finished["train_loss"])

    tensors = load_adapter(run)
    assert (run.adapter_dir / "adapter_config.json").is_file()
    assert tensors and all(t.isfinite().all() for t in tensors.values())
    assert any("lora_B" in k and t.abs().max() > 0 for k, t in tensors.items())  # it trained
    assert json.loads((run.adapter_dir / "adapter_config.json").read_text())["r"] == KNOBS["r"]

    assert partial_leftovers(run) == []
    assert not (run.path / ".adapter.partial").exists()
    assert not run.lock_path.exists()
    assert run.log_path.is_file()


@pytest.mark.slow
def test_resume_after_sigkill_matches_the_uninterrupted_run(reference_run: RunDir, new_run) -> None:
    run = new_run()
    proc = start_worker(run)
    newest = kill_after_first_checkpoint(proc, run)
    assert newest in ("checkpoint-2", "checkpoint-4")
    status = run.read_status()
    assert status["state"] == "running"  # the worker had no chance to say otherwise; nobody is training it

    run_to_end(run)  # resume: the same command on the same folder
    assert_matches_reference(run, reference_run, resumed_from=newest)


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_resume_matches(reference_run: RunDir, new_run) -> None:
    run = new_run()
    proc = start_worker(run)
    signal_after_first_checkpoint(proc, run, signal.SIGTERM)
    assert wait_worker(proc, run) == 0, log_tail(run)

    status = run.read_status()
    assert status["state"] == "stopped" and run.state() == "stopped"
    assert status["pid"] is None
    stopping, stopped = events_of(run, "stopping"), events_of(run, "stopped")
    assert [e["reason"] for e in stopping] == ["SIGTERM"]
    assert len(stopped) == 1
    step = stopped[0]["step"]
    assert 0 < step < MAX_STEPS
    # the step under way was finished, logged and checkpointed
    assert events_of(run, "step")[-1]["step"] == step
    assert stopped[0]["checkpoint"] == f"checkpoint-{step}"
    assert run.complete_checkpoints()[-1].name == f"checkpoint-{step}"
    assert status["last_checkpoint"] == f"checkpoint-{step}" and status["step"] == step
    assert not events_of(run, "finished") and not run.adapter_dir.exists()
    assert not run.lock_path.exists()

    run_to_end(run)
    assert_matches_reference(run, reference_run, resumed_from=f"checkpoint-{step}")


@pytest.mark.slow
def test_death_while_writing_a_checkpoint_resumes_from_the_one_before(reference_run: RunDir, new_run) -> None:
    run = new_run()
    proc = start_worker(run, **{FAULT_ENV: "4"})
    assert wait_worker(proc, run) == 137, log_tail(run)

    # checkpoint-4 was written under .partial but never renamed: resume must not see it
    assert (run.checkpoints_dir / ".partial" / "checkpoint-4" / "trainer_state.json").is_file()
    assert [p.name for p in run.complete_checkpoints()] == ["checkpoint-2"]
    assert [e["step"] for e in events_of(run, "checkpoint")] == [2]
    assert run.read_status()["state"] == "running"
    assert run.state() == "interrupted"
    assert run.lock_path.exists()  # a stale lock: it must not block the resume

    run_to_end(run)
    assert_matches_reference(run, reference_run, resumed_from="checkpoint-2")


def test_the_lock_refuses_a_second_worker_while_one_is_alive(new_run) -> None:
    run = new_run()
    # long enough that the first worker is still training when the second has started (the
    # reference's few steps can end first on a loaded machine, and take the lock with them)
    cfg = run.read_config()
    cfg["knobs"]["max_steps"] = 100_000
    run.write_config(cfg)
    proc = start_worker(run)
    deadline = time.monotonic() + 60
    while run.live_worker_pid() != proc.pid:
        assert proc.poll() is None, f"worker ended early; worker.log:\n{log_tail(run)}"
        assert time.monotonic() < deadline, "the worker never took the lock"
        time.sleep(0.02)

    # from this process ...
    with pytest.raises(UserError, match=rf"worker pid {proc.pid}\b"):
        RunDir(run.path).acquire_lock()
    # ... and from a second worker on the same run
    second = subprocess.run([sys.executable, "-m", "localtune.worker", str(run.path)], capture_output=True, text=True,
                            env=os.environ | {"PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert second.returncode == 1
    assert f"worker pid {proc.pid}" in second.stderr
    assert run.lock_path.read_text().split()[0] == str(proc.pid)  # the refused worker left the lock alone

    proc.kill()
    proc.wait()
    # the lock file still names the dead worker: stale, it blocks nobody
    assert run.lock_path.read_text().split()[0] == str(proc.pid)
    assert run.live_worker_pid() is None
    run.acquire_lock()
    assert run.lock_path.read_text().split()[0] == str(os.getpid())
    run.release_lock()
    assert not run.lock_path.exists()

    # a live process that is not this run's worker (a reused pid) does not block either
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    _started.append(other)
    run.lock_path.write_text(f"{other.pid}\n")
    assert run.live_worker_pid() is None
    run.acquire_lock()
    run.release_lock()


def workers_of(run: RunDir) -> list[int]:
    """The pids of every `python -m localtune.worker` process on this run, alive now."""
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if "localtune.worker" in cmd and str(run.path) in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            pids.append(p.pid)
    return pids


def kill_workers_of(run: RunDir) -> None:
    for pid in workers_of(run):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


RACE_HOOK = """
import os, sys, time
from pathlib import Path

import localtune.launch as launch

barrier, check = Path(sys.argv[1]), launch.check_resumable


def check_then_wait(run, force=False):
    # the race, made certain: each resume is past its check before either starts a worker
    # (the other one's arrival, or its end, lets it go on)
    check(run, force=force)
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)


launch.check_resumable = check_then_wait
from localtune.cli import main

sys.exit(main(sys.argv[2:]))
"""
"""`localtune ARGS` (after a barrier folder), with a wait after the resume's check."""


def test_two_resumes_at_once_start_one_worker_and_the_other_gets_one_line(new_run, tmp_path: Path) -> None:
    from tests.helpers import one_line_error

    run = new_run()
    proc = start_worker(run)
    signal_after_first_checkpoint(proc, run, signal.SIGTERM)
    assert wait_worker(proc, run) == 0 and run.state() == "stopped", log_tail(run)
    stopped_at = run.complete_checkpoints()[-1].name

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV} | dict(
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    resumes = [subprocess.Popen([sys.executable, "-c", RACE_HOOK, str(barrier), "resume", run.id, "--detach"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    try:
        ended: dict[int, tuple[int, str, str]] = {}
        deadline = time.monotonic() + 120
        while len(ended) < 2:
            assert time.monotonic() < deadline, "the resumes did not end within 120 s"
            for p in resumes:
                if p.pid not in ended and p.poll() is not None:
                    ended[p.pid] = (p.returncode, *p.communicate())
                    (barrier / f"ended-{p.pid}").touch()
            time.sleep(0.02)
        workers = workers_of(run)  # right after both resumes returned: every worker they started

        assert sorted(rc for rc, _, _ in ended.values()) == [0, 1], ended
        (winner, (_, out, _)), = [(pid, r) for pid, r in ended.items() if r[0] == 0]
        _, _, err = next(r for r in ended.values() if r[0] == 1)
        assert one_line_error(err) == (f"localtune: error: run {run.id} is being started by pid {winner} (another "
                                       "`localtune resume`, or the TUI); `localtune runs` shows it in a moment")
        assert out.startswith(f"run {run.id} resumed from {stopped_at}, worker pid "), out
        worker = int(out.split("worker pid ")[1].split()[0])
        assert workers == [worker]

        # that one worker takes the run over and trains it; stopping it ends the attempt
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while len(events_of(run, "started")) < 2:
            assert time.monotonic() < deadline and workers_of(run), f"the worker never started; {log_tail(run)}"
            time.sleep(0.05)
        assert run.live_worker_pid() == worker and run.state() == "running"
        assert not run.read_status().get("launched")  # the worker took the run over
        os.kill(worker, signal.SIGTERM)
        while workers_of(run):
            assert time.monotonic() < deadline, f"the worker did not stop; {log_tail(run)}"
            time.sleep(0.05)
        assert [e["resumed_from"] for e in events_of(run, "started")] == [None, stopped_at]
        assert run.state() == "stopped" and not run.lock_path.exists()
    finally:
        for p in resumes:
            if p.poll() is None:
                p.kill()
                p.wait()
        kill_workers_of(run)


def test_a_worker_that_dies_before_it_starts_fails_the_run_at_once_with_its_last_words(
        new_run, tmp_path: Path, monkeypatch, capsys) -> None:
    from tests.helpers import run as localtune

    run = new_run()
    # a broken install: the worker's first `import transformers` raises
    broken = tmp_path / "broken-site" / "transformers"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("transformers is half-installed (test)")\n')
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join((str(broken.parent), str(REPO_ROOT))))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    try:
        t0 = time.monotonic()
        rc, out, err = localtune(capsys, "resume", run.id, "--headless")
        took_s = time.monotonic() - t0
    finally:
        kill_workers_of(run)
    last_words = "ImportError: transformers is half-installed (test)"
    assert rc == 1, (out, err)
    assert out.splitlines()[1:] == [f"failed: the worker exited (code 1) before it started: {last_words}",
                                    f"  log: {run.log_path}"], out
    assert took_s < 15  # not the 30 s a worker found only through its lock is given to start
    assert "Traceback" not in out + err

    # the worker never wrote a word to the status; the run shows as failed all the same
    assert run.read_status()["state"] == "created"
    assert run.state() == "failed"
    monkeypatch.setenv("COLUMNS", "200")  # room for the model's long path in the table
    rc, out, _ = localtune(capsys, "runs")
    assert rc == 0
    assert re.search(rf"^{run.id}\s+sft\s+failed\s", out, re.M), out
    assert out.splitlines()[-1] == f"{run.id}: failed: the worker exited before it started: {last_words}"
    rc, out, _ = localtune(capsys, "runs", "--json")
    (listed,) = json.loads(out)
    assert (listed["state"], listed["error"]) == ("failed", f"the worker exited before it started: {last_words}")

    # once the install is fixed, resume tries again, and that worker takes the run over
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    try:
        rc, out, err = localtune(capsys, "resume", run.id, "--detach")
        assert rc == 0, err
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while run.read_status().get("launched"):
            assert time.monotonic() < deadline and workers_of(run), f"the worker did not start; {log_tail(run)}"
            time.sleep(0.05)
        assert run.state() != "failed" and run.live_worker_pid() in workers_of(run)
    finally:
        kill_workers_of(run)


def test_a_worker_on_a_config_edited_into_bad_toml_fails_in_one_line(new_run) -> None:
    run = new_run()
    lines = run.config_path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("r = "))
    lines[at] = "r = "  # the value deleted by hand
    run.config_path.write_text("\n".join(lines) + "\n")
    proc = start_worker(run)
    assert wait_worker(proc, run) == 1, log_tail(run)
    want = f"{run.config_path}: invalid TOML: Invalid value (at line {at + 1}, column 5); correct that line"
    assert run.read_status()["error"] == want
    assert events_of(run, "failed")[-1]["error"] == want
    assert run.state() == "failed" and not run.lock_path.exists()


OOM_AT_STEP = 4  # after checkpoint-2: the back-off goes back to it and trains step 3 again
OOM_LOSS_TOL = 1e-3
"""Loss per step after the back-off vs the reference. Micro-batch 1 x 4 sums the same rows per
optimizer step as 2 x 2 (the loss is normalised by the step's token count either way); what
differs is the LoRA dropout: it draws its masks for tensors of other shapes ([1, L1] and [1, L2]
instead of [2, max(L1, L2)]), so other elements are dropped. Measured on this run (CPU,
single-threaded, so the same on every try): at most 6.9e-4 (step 8), 1e-4..4e-4 at the others;
with lora_dropout = 0 at most 2e-6 (only the padding and the summation order differ). The loss
itself is ~10.8 here and moves by 2e-3 to 4e-2 (median 1.7e-2) from step to step, so rows in
another order would fail this."""


@pytest.mark.slow
def test_out_of_memory_backs_off_to_a_smaller_micro_batch_with_the_same_effective_batch(
        reference_run: RunDir, new_run) -> None:
    import tomllib

    run = new_run()
    proc = start_worker(run, LOCALTUNE_FAULT_OOM_AT_STEP=str(OOM_AT_STEP))
    assert wait_worker(proc, run) == 0, log_tail(run)

    assert run.read_status()["state"] == "completed", log_tail(run)
    for e in read_events(run.events_path):
        assert set(e) - {"t", "kind"} == set(EVENT_FIELDS[e["kind"]]), e
    assert not events_of(run, "failed")
    backoffs = [{k: v for k, v in e.items() if k not in ("t", "kind")} for e in events_of(run, "oom_backoff")]
    assert backoffs == [{"step": OOM_AT_STEP, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4,
                         "max_length": KNOBS["max_length"], "resume_from": "checkpoint-2"}]
    # the same process trained on: a second start, from the checkpoint before the error
    starts = events_of(run, "started")
    assert [s["resumed_from"] for s in starts] == [None, "checkpoint-2"]
    assert len({s["pid"] for s in starts}) == 1
    notes = run.read_status()["notes"]
    assert len(notes) == 1 and "out of memory at step 4" in notes[0] and "2 x 2 -> 1 x 4" in notes[0]

    # config.toml keeps the new knobs (a later resume uses them); the effective batch is unchanged
    with run.config_path.open("rb") as f:
        knobs = tomllib.load(f)["knobs"]
    assert (knobs["per_device_train_batch_size"], knobs["gradient_accumulation_steps"]) == (1, 4)
    assert knobs["per_device_train_batch_size"] * knobs["gradient_accumulation_steps"] == (
        KNOBS["per_device_train_batch_size"] * KNOBS["gradient_accumulation_steps"])
    assert {k: v for k, v in knobs.items() if k not in ("per_device_train_batch_size",
                                                        "gradient_accumulation_steps")} == {
        k: v for k, v in RunDir(reference_run.path).read_config()["knobs"].items()
        if k not in ("per_device_train_batch_size", "gradient_accumulation_steps")}

    # the same rows in the same order: the loss per optimizer step matches the uninterrupted run
    got, want = step_losses(run), step_losses(reference_run)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    assert events_of(run, "finished")[-1]["step"] == MAX_STEPS
    diffs = {step: abs(got[step] - want[step]) for step in got}
    for step in (1, 2):  # before the error: the very same run
        assert diffs[step] <= LOSS_TOL, (step, got[step], want[step])
    for step in range(3, MAX_STEPS + 1):
        assert diffs[step] <= OOM_LOSS_TOL, (
            f"step {step}: {got[step]!r} after the back-off != {want[step]!r}; all differences: {diffs}")
    assert partial_leftovers(run) == []
    assert not run.lock_path.exists()


# ---------------------------------------------------------------- damaged checkpoints, a full disk


def signal_at_checkpoint(proc: subprocess.Popen, run: RunDir, sig: int, name: str) -> None:
    """Send `sig` as soon as checkpoint `name` is complete."""
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while not (run.checkpoints_dir / name).is_dir():
        if proc.poll() is not None:
            pytest.fail(f"worker ended (rc {proc.returncode}) before {name}; worker.log:\n{log_tail(run)}")
        assert time.monotonic() < deadline, f"no {name} within {WORKER_TIMEOUT_S} s"
        time.sleep(0.01)
    proc.send_signal(sig)


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_set_aside_and_resume_goes_on_from_the_one_before(
        reference_run: RunDir, new_run) -> None:
    from localtune.worker import checkpoint_problem

    run = new_run()
    proc = start_worker(run)
    signal_at_checkpoint(proc, run, signal.SIGKILL, "checkpoint-4")
    assert wait_worker(proc, run) == -signal.SIGKILL
    names = [p.name for p in run.complete_checkpoints()]
    assert names[:2] == ["checkpoint-2", "checkpoint-4"], names
    for extra in names[2:]:  # the kill may land a step or two later: keep checkpoint-4 the newest
        import shutil

        shutil.rmtree(run.checkpoints_dir / extra)
    # what a machine crash can leave: the optimizer state cut short
    optimizer = run.checkpoints_dir / "checkpoint-4" / "optimizer.pt"
    data = optimizer.read_bytes()
    optimizer.write_bytes(data[: len(data) // 2])
    assert checkpoint_problem(run.checkpoints_dir / "checkpoint-4") == "optimizer.pt is truncated or corrupt"
    assert checkpoint_problem(run.checkpoints_dir / "checkpoint-2") is None

    run_to_end(run)
    warnings = [e["message"] for e in events_of(run, "warning")]
    assert warnings == ["checkpoint-4 cannot be read (optimizer.pt is truncated or corrupt); moved it to "
                        "checkpoints/checkpoint-4.corrupt and resuming from checkpoint-2"]
    kept = run.checkpoints_dir / "checkpoint-4.corrupt" / "optimizer.pt"
    assert kept.read_bytes() == data[: len(data) // 2]  # set aside as it was, not deleted
    events = [e for e in read_events(run.events_path) if e["kind"] != "warning"]
    run.events_path.write_text("".join(json.dumps(e) + "\n" for e in events))  # the reference has none
    assert_matches_reference(run, reference_run, resumed_from="checkpoint-2")


@pytest.mark.parametrize("damage, problem", [
    (lambda ck: (ck / "trainer_state.json").write_text("{"), "trainer_state.json is not valid JSON"),
    (lambda ck: (ck / "rng_state.pth").unlink(), "rng_state.pth is missing"),
    (lambda ck: (ck / "adapter_model.safetensors").write_bytes(
        (ck / "adapter_model.safetensors").read_bytes()[:-10]), "adapter_model.safetensors is unreadable"),
])
def test_checkpoint_problem_names_the_damaged_file(reference_run: RunDir, tmp_path: Path, damage, problem) -> None:
    import shutil

    from localtune.worker import checkpoint_problem

    ck = tmp_path / "checkpoint-12"
    shutil.copytree(reference_run.checkpoints_dir / "checkpoint-12", ck)
    assert checkpoint_problem(ck) is None
    damage(ck)
    assert checkpoint_problem(ck).startswith(problem)


def fake_notifier(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A `notify-send` on PATH that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "notifications.txt"
    tool = bin_dir / "notify-send"
    tool.write_text(f'#!/bin/sh\nprintf "%s|" "$@" >> "{record}"\necho >> "{record}"\n')
    tool.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, record


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_fails_cleanly_and_resume_goes_on(
        reference_run: RunDir, new_run, tmp_path: Path) -> None:
    from localtune.worker import checkpoint_problem

    run = new_run()
    cfg = run.read_config()
    cfg["run"]["notify"] = True
    run.write_config(cfg)
    path_env, record = fake_notifier(tmp_path)
    proc = start_worker(run, LOCALTUNE_FAULT_ENOSPC_IN_CHECKPOINT="4", **path_env)
    assert wait_worker(proc, run) == 1, log_tail(run)

    status = run.read_status()
    assert status["state"] == "failed" and run.state() == "failed"
    assert status["error"] == (
        f"the disk is full: writing checkpoint-4 failed ({run.checkpoints_dir / '.partial' / 'checkpoint-4' / 'optimizer.pt'}); "
        f"the checkpoints before it are intact (newest: checkpoint-2); free some space, then `localtune resume {run.id}`")
    assert events_of(run, "failed")[-1]["error"] == status["error"]
    # the one before is whole; nothing half-written is left to look complete
    assert [p.name for p in run.complete_checkpoints()] == ["checkpoint-2"]
    assert checkpoint_problem(run.checkpoints_dir / "checkpoint-2") is None
    assert partial_leftovers(run) == [] and not run.adapter_dir.exists()
    assert not run.lock_path.exists()
    # --notify: the failure reached the desktop
    lines = record.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"--app-name=localtune|localtune: run {run.id} failed|the disk is full")

    proc = start_worker(run, **path_env)  # space freed: resume from checkpoint-2
    assert wait_worker(proc, run) == 0, log_tail(run)
    events = [e for e in read_events(run.events_path) if e["kind"] != "failed"]
    run.events_path.write_text("".join(json.dumps(e) + "\n" for e in events))
    assert_matches_reference(run, reference_run, resumed_from="checkpoint-2")
    lines = record.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"--app-name=localtune|localtune: run {run.id} finished|12 steps, loss ")


def test_checkpoints_by_the_clock_come_between_the_step_ones(new_run) -> None:
    run = new_run()
    cfg = run.read_config()
    cfg["knobs"].update(max_steps=3, save_steps=100, save_minutes=1e-6, eval_steps=100, save_total_limit=5)
    cfg["run"]["sample_steps"] = 100
    run.write_config(cfg)
    run_to_end(run)
    assert [e["step"] for e in events_of(run, "checkpoint")] == [1, 2, 3]
    assert [p.name for p in run.complete_checkpoints()] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert run.read_status()["state"] == "completed"
    assert events_of(run, "finished")[-1]["peak_memory_bytes"] > 100 * 2**20  # this process's peak RSS


# ---------------------------------------------------------------- the clock and the thermometer


class _Control:
    should_save = False


class _State:
    def __init__(self, step: int) -> None:
        self.global_step = step


def test_save_by_clock_asks_for_a_checkpoint_once_the_minutes_have_passed() -> None:
    from localtune.worker import SaveByClock

    now = [1000.0]
    cb = SaveByClock(5, clock=lambda: now[0])
    cb.on_train_begin(None, None, None)
    control = _Control()
    now[0] += 299
    cb.on_step_end(None, _State(1), control)
    assert control.should_save is False
    now[0] += 1
    cb.on_step_end(None, _State(2), control)
    assert control.should_save is True
    cb.on_save(None, None, control)  # the checkpoint resets the clock
    control.should_save = False
    now[0] += 299
    cb.on_step_end(None, _State(3), control)
    assert control.should_save is False
    off = SaveByClock(0, clock=lambda: now[0])
    now[0] += 1e6
    off.on_step_end(None, _State(4), control)
    assert control.should_save is False


def test_thermal_guard_pauses_while_hot_and_goes_on_below_the_limit_minus_hysteresis(tmp_path: Path) -> None:
    from localtune.worker import THERMAL_HYSTERESIS_C, ThermalGuard, _StopRequest

    assert THERMAL_HYSTERESIS_C == 3
    events = tmp_path / "events.jsonl"
    temps = iter([84, 85, 88, 87, 84, 83, 82, 90])
    sleeps: list[float] = []
    guard = ThermalGuard(85, lambda: next(temps), events, _StopRequest(), sleep=sleeps.append, poll_s=7)
    assert guard.wait(step=1) == 0.0  # 84: cool enough
    assert guard.wait(step=2) == 0.0  # 85: at the limit, not over it
    guard.on_step_end(None, _State(3), _Control())  # 88: over; waits through 87, 84, 83 until 82
    assert sleeps == [7, 7, 7, 7]
    got = [{k: v for k, v in e.items() if k != "t"} for e in read_events(events)]
    assert got[0] == {"kind": "thermal_pause", "step": 3, "temperature_c": 88, "max_gpu_temp_c": 85}
    assert got[1]["kind"] == "thermal_resume" and got[1]["step"] == 3 and got[1]["temperature_c"] == 82
    assert len(got) == 2


def test_thermal_guard_gives_way_to_a_stop_and_to_a_missing_reading(tmp_path: Path) -> None:
    from localtune.worker import ThermalGuard, _StopRequest

    events = tmp_path / "events.jsonl"
    stop = _StopRequest()
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        stop(signal.SIGTERM, None)  # `localtune stop` while paused

    guard = ThermalGuard(80, lambda: 95, events, stop, sleep=sleep, poll_s=1)
    guard.wait(step=5)
    assert sleeps == [1]  # one nap, then the stop is seen
    assert [e["kind"] for e in read_events(events)] == ["thermal_pause", "thermal_resume"]

    unknown = ThermalGuard(80, lambda: None, tmp_path / "e2.jsonl", _StopRequest(), sleep=sleeps.append)
    assert unknown.wait(step=1) == 0.0 and not (tmp_path / "e2.jsonl").exists()


def test_padding_free_batches_give_the_loss_of_padded_ones(tiny_chat_model_dir: Path) -> None:
    """The worker's CPU batches lay rows end to end (trl's padding_free collator, position_ids
    restarting per row); transformers' sdpa attention must then keep the rows apart. The loss
    and the gradients equal those of the same rows padded, within float32 rounding."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32)
    # as the worker loads it: with a cache, transformers does not look for row boundaries in position_ids
    model.config.use_cache = False
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": [-100] * 3 + list(range(8, 5 + n))} for n in (7, 19, 12)]
    out = {}
    for free in (False, True):
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=free)(rows)
        if free:
            assert batch["input_ids"].shape == (1, 7 + 19 + 12) and "attention_mask" not in batch
            assert batch["position_ids"][0, :9].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1]
        else:
            assert batch["input_ids"].shape == (3, 19)
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        out[free] = (loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    (padded, g_padded), (joined, g_joined) = out[False], out[True]
    assert joined == pytest.approx(padded, abs=1e-5)
    assert (g_joined - g_padded).abs().max().item() <= 1e-5 * max(1.0, g_padded.abs().max().item())


def test_the_thermal_guard_reads_the_training_gpu_through_nvml(monkeypatch, tmp_path: Path) -> None:
    """The worker's wiring: with a limit on CUDA the guard reads the plan's GPU (a faked NVML
    here: an RTX 4090 at 45 C); without a limit, or off CUDA, there is no guard."""
    from localtune.hardware import probe
    from localtune.worker import ThermalGuard, _StopRequest, thermal_guard_for
    from tests.fakes import RTX_4090, install_gpus

    install_gpus(monkeypatch, [RTX_4090])
    hw = probe()
    assert hw.backend == "cuda"
    guard = thermal_guard_for(83, "cuda", hw, tmp_path / "events.jsonl", _StopRequest())
    assert isinstance(guard, ThermalGuard) and guard.limit_c == 83.0
    assert guard.read_temp() == 45
    assert guard.wait(step=1) == 0.0  # 45 C is under 83: no pause
    import localtune.hardware

    def broken(hw):
        raise RuntimeError("NVML went away")

    monkeypatch.setattr(localtune.hardware, "sample_devices", broken)
    blind = thermal_guard_for(83, "cuda", hw, tmp_path / "e.jsonl", _StopRequest())
    assert blind.read_temp() is None  # a failed reading never stops training...
    assert blind.wait(step=1) == 0.0 and not (tmp_path / "e.jsonl").exists()  # ...nor pauses it
    assert thermal_guard_for(None, "cuda", hw, tmp_path / "e.jsonl", _StopRequest()) is None
    assert thermal_guard_for(83, "cpu", hw, tmp_path / "e.jsonl", _StopRequest()) is None
