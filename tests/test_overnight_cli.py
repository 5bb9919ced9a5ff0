"""Overnight care from the command line: `--max-gpu-temp` and `--notify` as a person passes
them (the worker's side is tested in tests/test_worker.py)."""

from __future__ import annotations

import io
import time
import tomllib
from pathlib import Path

import pytest

from localtune import headless
from localtune.events import append_event
from localtune.runs import create_run, find_run
from tests.helpers import one_line_error, run


@pytest.mark.parametrize("value", ["200", "12", "nan"])
def test_an_impossible_temperature_limit_is_one_line(capsys, value):
    rc, out, err = run(capsys, "train", "--max-gpu-temp", value, "--detach")
    assert rc == 1
    line = one_line_error(err)
    assert f"--max-gpu-temp: {float(value)!r} is not a GPU temperature limit; give degrees C from 40 to 105" in line
    from localtune.paths import runs_dir

    assert not runs_dir().exists() or not any(runs_dir().iterdir())  # nothing was started


def test_a_bad_limit_in_a_config_file_names_the_file_and_key(capsys, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[run]\nmax_gpu_temp = "hot"\n')
    rc, out, err = run(capsys, "train", "--config", str(cfg), "--detach")
    assert rc == 1
    assert f"{cfg}: [run] max_gpu_temp: 'hot' is not a GPU temperature limit" in one_line_error(err)


def test_train_keeps_the_options_in_the_run_and_says_the_limit_is_moot_on_a_cpu(capsys, tiny_chat_model_dir, tmp_path):
    from localtune.demo import demo_dataset_path

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(demo_dataset_path().read_text(encoding="utf-8").splitlines()[:8]) + "\n")
    rc, out, err = run(capsys, "train", "--model", str(tiny_chat_model_dir), "--data", str(data),
                       "--max-gpu-temp", "83", "--notify", "--detach",
                       "--set", "max_steps=1", "--set", "per_device_train_batch_size=2", "--set", "max_length=64")
    assert rc == 0, err
    assert "note: --max-gpu-temp watches an NVIDIA GPU; this run trains on cpu, so it has no effect" in out
    r = find_run("last")
    with r.config_path.open("rb") as f:
        cfg = tomllib.load(f)["run"]
    assert cfg["max_gpu_temp"] == 83.0 and cfg["notify"] is True
    deadline = time.monotonic() + 300
    while r.state() in ("created", "running", "stopping"):
        assert time.monotonic() < deadline, r.log_path.read_text()[-2000:]
        time.sleep(0.5)
    assert r.state() == "completed", r.log_path.read_text()[-2000:]


def test_the_bell_rings_at_the_end_only_when_asked():
    r = create_run({"run": {"model": "smollm2-135m", "data": "demo"}, "knobs": {}}, {}, "r1")
    append_event(r.events_path, "started", pid=1, resumed_from=None, max_steps=1, device="cuda:0",
                 precision="bfloat16", padding_free=False)
    append_event(r.events_path, "thermal_pause", step=1, temperature_c=88, max_gpu_temp_c=85)
    append_event(r.events_path, "thermal_resume", step=1, temperature_c=81, paused_s=40.0)
    append_event(r.events_path, "failed", error="boom", log="worker.log")
    quiet, loud = io.StringIO(), io.StringIO()
    headless.follow(r, out=quiet, worker_alive=lambda: True)
    headless.follow(r, out=loud, worker_alive=lambda: True, bell=True)
    assert "\a" not in quiet.getvalue() and loud.getvalue().count("\a") == 1
    text = quiet.getvalue()
    assert "started on cuda:0 in bfloat16 (from the start), 1 steps" in text
    assert "step 1: paused: the GPU is at 88 C, over the 85 C limit; waiting for it to cool" in text
    assert "step 1: going on after 40.0 s (GPU at 81 C)" in text
