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
)
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


def make_run(run_id: str, model_dir: Path, data: Path) -> RunDir:
    """A run as `localtune train` writes it: the plan for this machine with every knob pinned."""
    from localtune.models import resolve_model
    from localtune.plan import make_plan

    plan = make_plan(_cpu_hardware(), resolve_model(str(model_dir)), profile="cpu", pinned=KNOBS)
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


def run_to_end(run: RunDir) -> None:
    proc = start_worker(run)
    rc = wait_worker(proc, run)
    assert rc == 0, f"worker exited {rc}; worker.log:\n{log_tail(run)}"


def signal_after_first_checkpoint(proc: subprocess.Popen, run: RunDir, sig: int) -> str:
    """Send `sig` as soon as a complete checkpoint appears; return that checkpoint's name."""
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    while time.monotonic() < deadline:
        found = run.complete_checkpoints()
        if found:
            proc.send_signal(sig)
            return found[-1].name
        if proc.poll() is not None:
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
    at = signal_after_first_checkpoint(proc, run, signal.SIGKILL)
    assert wait_worker(proc, run) == -signal.SIGKILL
    assert at in ("checkpoint-2", "checkpoint-4")
    assert not events_of(run, "finished"), "the worker finished before it was killed"

    status = run.read_status()
    assert status["state"] == "running"  # the worker had no chance to say otherwise...
    assert run.state() == "interrupted"  # ...but nobody is training it
    newest = run.complete_checkpoints()[-1].name
    assert int(newest.rsplit("-", 1)[1]) < MAX_STEPS

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
