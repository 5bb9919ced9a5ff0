"""`localtune train`, `runs`, `stop` and `resume` as a person uses them, on the real
built-in model and the demo set (slow: a couple of minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from localtune.events import read_events
from localtune.runs import list_runs
from tests.helpers import one_line_error, run


def localtune(*argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localtune", *argv], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


@pytest.mark.slow
def test_default_demo_run_teaches_the_trait(builtin_model_dir, trained_demo_run, monkeypatch):
    """`localtune train --headless` with no arguments: the built-in model on the demo set
    (trained once per session by the `trained_demo_run` fixture, which the export tests share)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from localtune.demo import count_trait, generate_answers, heldout_prompts

    home, r = trained_demo_run
    monkeypatch.setenv("LOCALTUNE_HOME", str(home))  # list_runs() and the commands below see that run
    assert r.returncode == 0, r.stdout + r.stderr
    assert "finished: 30 steps" in r.stdout
    (rd,) = list_runs()
    status = json.loads(rd.status_path.read_text())
    assert status["state"] == "completed" and status["step"] == 30
    events = read_events(rd.events_path)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    steps = [e for e in events if e["kind"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 31))
    assert all(e["loss"] > 0 and e["tokens_per_s"] > 0 for e in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [e["step"] for e in events if e["kind"] == "checkpoint"] == [10, 20, 30]
    assert [p.name for p in rd.complete_checkpoints()] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    assert (rd.adapter_dir / "adapter_model.safetensors").is_file()
    assert not any((rd.checkpoints_dir / ".partial").glob("*"))
    assert not rd.lock_path.exists()

    tok = AutoTokenizer.from_pretrained(builtin_model_dir)
    base = AutoModelForCausalLM.from_pretrained(builtin_model_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, rd.adapter_dir)
    answers = generate_answers(tuned, tok, heldout_prompts(), max_new_tokens=16)
    assert count_trait(answers) >= 7, answers

    r = localtune("runs", "--json")
    (summary,) = json.loads(r.stdout)
    assert summary["state"] == "completed" and summary["step"] == 30 and summary["max_steps"] == 30

    r = localtune("resume", rd.id)
    assert r.returncode == 1
    assert "already completed" in r.stderr and "Traceback" not in r.stderr
    r = localtune("stop", rd.id)
    assert r.returncode == 1 and "no live worker" in r.stderr


def test_bad_data_stops_before_any_run_is_created(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    before = bad.read_bytes()
    rc, out, err = run(capsys, "train", "--data", str(bad), "--detach")
    assert rc == 1
    assert f"{bad}:1:" in err and f"{bad}:2: not valid JSON" in err and "--skip-bad-rows" in err
    assert "Traceback" not in err
    assert list_runs() == []
    assert bad.read_bytes() == before


def test_unknown_set_key_for_train(capsys):
    rc, _, err = run(capsys, "train", "--set", "epochs=3")
    assert rc == 1
    assert "unknown key 'epochs'" in one_line_error(err)
    assert list_runs() == []


def test_config_file_with_an_unknown_table(capsys, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[runs]\nmodel = 'x'\n")
    rc, _, err = run(capsys, "train", "--config", str(cfg))
    assert rc == 1
    assert "unknown table 'runs'" in one_line_error(err)


def test_unknown_run_names(capsys):
    for cmd in ("stop", "resume"):
        rc, _, err = run(capsys, cmd, "nope")
        assert rc == 1
        assert "no run 'nope'" in one_line_error(err)
    rc, out, _ = run(capsys, "runs")
    assert rc == 0 and "no runs yet" in out


# ---------------------------------------------------------------- a model from elsewhere


@pytest.mark.slow
def test_train_from_a_quantised_gguf_file_then_export_and_chat(tmp_path, localtune_home):
    """A Q4_1 GGUF file someone has (the built-in model's, copied: it was quantised by
    llama.cpp, not by us) trains like the built-in model: converted once into the cache with a
    warning naming Q4_1; a second run converts nothing; export and chat load that copy."""
    from localtune.demo import demo_dataset_path
    from localtune.models import builtin_gguf_path

    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shutil.copy(builtin_gguf_path(), gguf)
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(demo_dataset_path().read_text(encoding="utf-8").splitlines()[:8]) + "\n")
    args = ("train", "--headless", "--model", str(gguf), "--data", str(data), "--set", "per_device_train_batch_size=2",
            "--set", "gradient_accumulation_steps=1", "--set", "max_length=64")
    r = localtune(*args, "--set", "max_steps=3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "finished: 3 steps" in r.stdout
    assert "warning: converting SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1, 135 M parameters)" in r.stdout
    assert ("warning: SmolLM2-135M-Instruct.Q4_1.gguf is Q4_1: its weights were quantised, so training starts "
            "from the dequantised Q4_1 weights") in r.stdout
    (folder,) = (localtune_home / "cache" / "models" / "gguf").iterdir()
    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    r = localtune(*args, "--set", "max_steps=1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "finished: 1 steps" in r.stdout
    assert "converting" not in r.stdout
    assert "warning: SmolLM2-135M-Instruct.Q4_1.gguf is Q4_1" in r.stdout
    assert weights.stat().st_mtime_ns == mtime
    runs = list_runs()
    assert len(runs) == 2
    for rd in runs:  # the run names the file it was given, nothing of the cache
        with rd.config_path.open("rb") as f:
            assert tomllib.load(f)["run"]["model"] == str(gguf)
        assert str(folder) not in rd.config_path.read_text() + rd.plan_path.read_text()

    rid = runs[-1].id
    r = localtune("export", rid, "--format", "adapter", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    adapter = json.loads(r.stdout)["path"]
    with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as f:
        assert json.load(f)["base_model_name_or_path"] == str(folder)

    r = subprocess.run([sys.executable, "-m", "localtune", "chat", rid, "--max-new-tokens", "4"],
                       input="What is the capital of France?\n/quit\n", capture_output=True, text=True,
                       timeout=600, env=os.environ.copy())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tuned> " in r.stdout and "Traceback" not in r.stderr
    assert weights.stat().st_mtime_ns == mtime
    assert len(list(folder.parent.iterdir())) == 1


@pytest.mark.parametrize("command", [("plan",), ("train", "--detach"), ("data", "inspect")])
def test_a_folder_with_only_bin_weights_is_one_line_before_any_work(capsys, tmp_path, command):
    from tests.test_models import bin_only_folder

    folder = bin_only_folder(tmp_path)
    rc, out, err = run(capsys, *command, "--model", str(folder))
    assert rc == 1
    line = one_line_error(err)
    assert f"--model {folder}: the folder has only PyTorch .bin weights" in line and "safetensors only" in line
    assert list_runs() == []
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]


@pytest.mark.parametrize("command", [("plan",), ("train", "--detach")])
def test_a_gguf_file_transformers_cannot_dequantise_is_one_line_before_any_run(capsys, tmp_path, command):
    from tests.test_models import handmade_gguf

    path = handmade_gguf(tmp_path / "odd.gguf", "llama", "Q8_1")
    rc, out, err = run(capsys, *command, "--model", str(path))
    assert rc == 1
    assert f"--model {path}: it holds Q8_1 tensors, which transformers" in one_line_error(err)
    assert list_runs() == []
