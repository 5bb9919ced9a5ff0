"""Calibration (localtune.calibrate) as a person meets it: a new run measures one training step
on this machine before step 1 and trains exactly as it would have without it; a measurement
over the budget steps the knobs down before training (the effective batch kept); far under
it, a larger micro-batch is named, and taken with auto_batch; `localtune plan --calibrate`
measures without training; `--set calibrate=false` skips it.

The worker runs are test_worker's (the tiny Llama with the real tokenizer, 12 steps); only
the calibration knobs differ. What a CUDA or Apple device reads (max_memory_reserved and
NVML, the Metal driver's memory) has not run here: only the CPU's peak resident size has.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from localtune.calibrate import FAR_UNDER, Decision, Measurement, decide
from localtune.events import EVENT_FIELDS, read_events
from localtune.knobs import Knobs
from localtune.memory import estimate
from localtune.runs import RunDir
from tests.helpers import run as run_cli
from tests.test_memory import LLAMA_31_8B
from tests.test_worker import (KNOBS, MAX_STEPS, _no_orphan_workers, events_of, log_tail, make_run,  # noqa: F401
                               reference_run, run_to_end, step_losses, train_file)

GB = 1024 ** 3


def fake(peak_gb: float, knobs: Knobs) -> Measurement:
    return Measurement(peak_bytes=int(peak_gb * GB), how="test", before_load_bytes=0, weights_bytes=0,
                       optimizer_bytes=0, seconds=1.0, micro_batch=knobs.per_device_train_batch_size,
                       max_length=knobs.max_length, tokens=knobs.per_device_train_batch_size * knobs.max_length)


K8B = Knobs(r=16, lora_alpha=32, per_device_train_batch_size=4, gradient_accumulation_steps=4, max_length=2048,
            load_in_4bit=True, gradient_checkpointing=True)


def test_over_the_budget_steps_down_keeping_the_effective_batch():
    est = estimate(LLAMA_31_8B, K8B, "cuda").total_bytes
    budget = est  # the estimate said it fits exactly; the device measures 30% more
    d = decide(fake(1.3 * est / GB, K8B), K8B, LLAMA_31_8B, "cuda", budget, est, auto_batch=False)
    assert isinstance(d, Decision) and d.action == "replanned"
    assert d.knobs.per_device_train_batch_size < 4 and d.knobs.effective_batch_size == K8B.effective_batch_size
    assert d.knobs.max_length == 2048  # the micro-batch goes first
    assert d.predicted_bytes <= budget
    assert "over the" in d.note and "micro-batch" in d.note


def test_far_under_the_budget_names_a_larger_micro_batch_and_auto_batch_takes_it():
    est = estimate(LLAMA_31_8B, K8B, "cuda").total_bytes
    budget = 3 * est
    m = fake(est / GB, K8B)  # as estimated, a third of the budget
    assert m.peak_bytes < FAR_UNDER * budget
    named = decide(m, K8B, LLAMA_31_8B, "cuda", budget, est, auto_batch=False)
    assert named.action == "larger micro-batch fits" and named.knobs == K8B
    assert "--set auto_batch=true takes it" in named.note
    taken = decide(m, K8B, LLAMA_31_8B, "cuda", budget, est, auto_batch=True)
    assert taken.action == "larger micro-batch taken"
    assert taken.knobs.per_device_train_batch_size > 4
    assert taken.knobs.effective_batch_size == 16 and taken.predicted_bytes <= budget
    assert f"a micro-batch of {taken.knobs.per_device_train_batch_size} " in named.note


def test_close_to_the_estimate_and_the_budget_keeps_the_plan():
    est = estimate(LLAMA_31_8B, K8B, "cuda").total_bytes
    d = decide(fake(0.9 * est / GB, K8B), K8B, LLAMA_31_8B, "cuda", int(1.1 * est), est, auto_batch=True)
    assert d.action == "kept" and d.knobs == K8B


def test_a_calibrated_run_trains_exactly_as_it_would_have_without(reference_run: RunDir, tiny_chat_model_dir: Path,
                                                                  train_file: Path) -> None:
    """Calibration is another process's step: the run's losses equal the uncalibrated
    reference's to the bit, its `calibrated` event comes before `started`, and plan.json holds
    the measurement with the weights counted exactly."""
    run = make_run("calibrated", tiny_chat_model_dir, train_file, calibrate=True)
    run_to_end(run)
    assert run.read_status()["state"] == "completed", log_tail(run)
    kinds = [e["kind"] for e in read_events(run.events_path)]
    assert kinds[0] == "calibrated" and kinds[1] == "started" and kinds.count("calibrated") == 1
    (e,) = events_of(run, "calibrated")
    assert set(e) - {"t", "kind"} == set(EVENT_FIELDS["calibrated"])
    assert e["micro_batch"] == KNOBS["per_device_train_batch_size"] and e["max_length"] == KNOBS["max_length"]
    assert e["measured_bytes"] > 0 and e["how"].startswith("the process's peak resident size")
    assert step_losses(run) == step_losses(reference_run)  # the very same training
    plan = json.loads(run.plan_path.read_text())
    cal = plan["calibration"]
    assert cal["measured"]["peak_bytes"] == e["measured_bytes"] and cal["action"] == e["action"]
    # the tiny model's float32 parameters (and rotary buffers), counted tensor by tensor
    assert cal["by_part"]["weights"]["measured"] == pytest.approx(cal["by_part"]["weights"]["estimate"], rel=0.01)
    assert cal["by_part"]["runtime"]["measured"] > 100 * 1024 ** 2  # Python + torch + transformers
    assert run.read_status()["notes"][0].startswith("calibration: measured ")
    # what the dashboard's log and the headless view show for it
    from localtune.progress import RunProgress

    p = RunProgress()
    assert p.apply(e) == f"calibration: {e['note']}" and p.log[-1][0] == "info"


def test_a_measurement_over_the_budget_replans_before_step_1(tiny_chat_model_dir: Path, train_file: Path) -> None:
    """A budget the measurement exceeds (plan.json's budget cut below it, as a smaller free
    memory would be): the worker halves the micro-batch and doubles the accumulation before
    training, writes them into config.toml, and trains the run to the end with them."""
    run = make_run("over-budget", tiny_chat_model_dir, train_file, calibrate=True)
    plan = json.loads(run.plan_path.read_text())
    plan["budget_bytes"] = int(plan["estimate"]["total_bytes"] * 0.5)
    run.plan_path.write_text(json.dumps(plan))
    run_to_end(run)
    assert run.read_status()["state"] == "completed", log_tail(run)
    (e,) = events_of(run, "calibrated")
    assert e["action"] == "replanned" and e["measured_bytes"] > e["budget_bytes"]
    assert e["knobs"] == {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}
    with run.config_path.open("rb") as f:
        knobs = tomllib.load(f)["knobs"]
    assert (knobs["per_device_train_batch_size"], knobs["gradient_accumulation_steps"]) == (1, 4)
    assert [s["step"] for s in events_of(run, "step")] == list(range(1, MAX_STEPS + 1))
    from localtune.progress import RunProgress

    p = RunProgress()
    p.apply(e)
    assert p.log[-1] == ("warning", f"calibration: {e['note']}") and "over the" in e["note"]


def test_a_step_that_runs_out_of_memory_while_calibrating_backs_off_and_measures_again(
        tiny_chat_model_dir: Path, train_file: Path) -> None:
    """The measured step itself does not fit (out of memory injected above a micro-batch of 1,
    as on a card too small for the plan): no failed run; the knobs back off as training's
    back-off would (2 x 2 -> 1 x 4), the smaller step is measured, and the run trains with it."""
    from localtune.calibrate import FAULT_OOM_ENV
    from tests.test_worker import start_worker, wait_worker

    run = make_run("calibration-oom", tiny_chat_model_dir, train_file, calibrate=True)
    proc = start_worker(run, **{FAULT_OOM_ENV: "1"})
    assert wait_worker(proc, run) == 0, log_tail(run)
    assert run.read_status()["state"] == "completed", log_tail(run)
    (e,) = events_of(run, "calibrated")
    assert e["action"] == "replanned" and e["micro_batch"] == 1
    assert e["knobs"] == {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}
    assert e["note"].startswith("out of memory at micro-batch x tokens 2 x 64, then measured ")
    with run.config_path.open("rb") as f:
        knobs = tomllib.load(f)["knobs"]
    assert (knobs["per_device_train_batch_size"], knobs["gradient_accumulation_steps"]) == (1, 4)
    assert not events_of(run, "failed") and not events_of(run, "oom_backoff")


def test_calibrate_false_skips_it(tiny_chat_model_dir: Path, tmp_path: Path) -> None:
    """(MLX runs calibrate too: tests/test_mlx_engine.py.)"""
    from localtune.worker import calibrate_run

    run = make_run("not-calibrated", tiny_chat_model_dir, tmp_path / "x.jsonl")
    knobs = Knobs(**run.read_config()["knobs"])
    assert not knobs.calibrate and calibrate_run(run, knobs, None) == knobs
    assert "calibration" not in json.loads(run.plan_path.read_text()) and not events_of(run, "calibrated")


def test_a_dpo_run_calibrates_on_pairs_at_max_length(tiny_chat_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A preference run measures pairs whose two sequences both reach max_length: twice the
    tokens of an sft micro-batch, and more memory than the same knobs' sft measurement."""
    from localtune.calibrate import run_measurement

    monkeypatch.setenv("LOCALTUNE_HOME", str(tmp_path / "home"))
    sft = make_run("cal-sft", tiny_chat_model_dir, tmp_path / "x.jsonl", max_length=256)
    dpo = make_run("cal-dpo", tiny_chat_model_dir, tmp_path / "x.jsonl", max_length=256, method="dpo")
    a, b = run_measurement(sft.path), run_measurement(dpo.path)
    assert (a.tokens, b.tokens) == (2 * 256, 2 * 2 * 256)
    assert b.peak_bytes > a.peak_bytes > a.weights_bytes > 0 and b.optimizer_bytes == a.optimizer_bytes > 0


def test_plan_calibrate_measures_without_training(capsys, tiny_chat_model_dir: Path, tmp_path: Path,
                                                 monkeypatch) -> None:
    monkeypatch.setenv("LOCALTUNE_HOME", str(tmp_path / "home"))
    args = ["plan", "-m", str(tiny_chat_model_dir), "--set", "max_length=128", "--set", "per_device_train_batch_size=2"]
    rc, out, err = run_cli(capsys, *args, "--calibrate")
    assert rc == 0, err
    line = [x for x in out.splitlines() if x.startswith("Calibration")]
    assert len(line) == 1 and "2 x 128 tokens on this device" in line[0] and "measured " in line[0]
    assert any(x.strip().startswith("weights") and "measured" in x for x in out.splitlines())
    assert not (tmp_path / "home" / "runs").exists() or not list((tmp_path / "home" / "runs").iterdir())
    rc, out, err = run_cli(capsys, *args, "--calibrate", "--json")
    cal = json.loads(out)["calibration"]
    assert cal["measured"]["tokens"] == 256 and cal["measured"]["peak_bytes"] > cal["measured"]["weights_bytes"] > 0
    assert set(cal["by_part"]) == {"runtime", "weights", "training"}
    rc, out, err = run_cli(capsys, *args, "--calibrate", "--budget", "24", "--backend", "cuda")
    assert rc == 1 and "--calibrate measures this machine" in err


# ---------------------------------------------------------------- the readings this machine lacks, faked


def test_on_cuda_the_peak_is_torchs_reserved_peak_plus_what_nvml_says_the_process_holds_outside_it(monkeypatch):
    """CUDA (faked: torch's allocator counters and NVML's process list): the highest memory
    torch's caching allocator reserved, plus this process's memory on the card beyond what
    torch holds now (the CUDA context, cuBLAS workspaces). torch's device 0 under
    CUDA_VISIBLE_DEVICES=1 is NVML's card 1."""
    import os

    import torch

    from localtune.calibrate import _Meter
    from tests.fakes import MiB, FakeGPU, install_gpus

    def card(i: int, used: int | None) -> FakeGPU:
        return FakeGPU(f"NVIDIA GeForce RTX 3090 #{i}", 24576 * MiB, 0, f"GPU-{i}", f"00000000:0{i + 1}:00.0",
                       processes=[(os.getpid(), used), (os.getpid() + 1, 9000 * MiB)])

    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 4000 * MiB)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 7000 * MiB)
    install_gpus(monkeypatch, [card(0, 4700 * MiB), card(1, 5200 * MiB)])
    peak, how = _Meter("cuda", "cuda:0").peak()
    assert peak == (7000 + 700) * MiB and "max_memory_reserved" in how and "NVML" in how
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert _Meter("cuda", "cuda:0").peak()[0] == (7000 + 1200) * MiB
    # a driver that hides per-process figures: torch's own figure alone
    install_gpus(monkeypatch, [card(0, None), card(1, None)])
    assert _Meter("cuda", "cuda:0").peak()[0] == 7000 * MiB


def test_on_apple_the_peak_is_the_metal_drivers_largest_sample(monkeypatch):
    """Apple (faked: torch.mps's driver counter): Metal's allocator keeps what it took, so the
    largest sample (after loading, after each step, and at the end) is the peak."""
    import torch

    from localtune.calibrate import _Meter

    samples = iter([1 * GB, 5 * GB, 3 * GB])
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: next(samples))
    meter = _Meter("mps", "mps")
    assert meter.now() == 1 * GB and meter.now() == 5 * GB
    peak, how = meter.peak()
    assert peak == 5 * GB and "driver_allocated_memory" in how
