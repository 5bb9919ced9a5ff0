"""The `localtune` command as a person meets it: exit codes, the lines on screen, JSON.

Bad input must give exactly one line on stderr, naming what and where, exit code 1 and no
traceback; our own bugs give a traceback and the path of a saved copy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from localtune import cli
from tests.helpers import one_line_error, run
from localtune.hardware import GiB
from tests.test_plan import LLAMA_8B


@pytest.fixture
def llama8b(tmp_path):
    d = tmp_path / "llama8b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_8B))
    return d


def test_probe_prints_the_machine_and_profile(capsys, machine_without_gpu):
    rc, out, err = run(capsys, "probe")
    assert rc == 0
    assert "Backend: cpu" in out
    assert "System RAM:" in out and "torch " in out
    assert "Profile: cpu" in out


def test_probe_json(capsys, machine_without_gpu):
    rc, out, _ = run(capsys, "probe", "--json")
    data = json.loads(out)
    assert rc == 0
    assert data["backend"] == "cpu" and data["profile"] == "cpu"
    assert data["devices"][0]["total_bytes"] > 0
    assert set(data["versions"]) >= {"torch", "transformers", "peft", "trl", "bitsandbytes"}


def test_plan_default_model_fits_on_this_cpu(capsys):
    rc, out, err = run(capsys, "plan")
    assert rc == 0, err
    assert "SmolLM2-135M-Instruct (built-in)" in out
    assert "Profile  cpu" in out
    for part in ("base weights", "LoRA params + grads + optimizer", "activations", "logits + loss",
                 "runtime overhead", "fragmentation headroom", "budget"):
        assert part in out
    assert "Fits:" in out


def test_plan_for_a_card_you_do_not_have(capsys, llama8b):
    rc, out, _ = run(capsys, "plan", "--model", str(llama8b), "--budget", "24", "--backend", "cuda", "--json")
    plan = json.loads(out)
    assert rc == 0
    assert plan["profile"]["name"] == "cuda-24gb"
    assert plan["knobs"]["load_in_4bit"] is True
    assert plan["fits"] is True
    assert plan["estimate"]["total_bytes"] <= plan["budget_bytes"]
    parts = ("weights_bytes", "adapter_bytes", "activations_bytes", "logits_bytes", "overhead_bytes",
             "fragmentation_bytes")
    assert sum(plan["estimate"][p] for p in parts) == plan["estimate"]["total_bytes"]
    assert 6 * GiB < plan["estimate"]["total_bytes"] < 24 * GiB


def test_plan_prints_each_adjustment_and_why(capsys, llama8b):
    rc, out, _ = run(capsys, "plan", "--model", str(llama8b), "--budget", "7", "--backend", "cuda")
    assert rc == 0
    assert "Adjustments" in out
    assert "max_length: 1024 → 512" in out
    assert "rows longer than 512 tokens will be truncated" in out


def test_set_and_max_seq_len_are_pinned(capsys, llama8b):
    rc, out, _ = run(capsys, "plan", "-m", str(llama8b), "--budget", "24", "--backend", "cuda",
                     "--max-seq-len", "1024", "--set", "r=8", "--set", 'target_modules=["q_proj","v_proj"]',
                     "--set", "optim=paged_adamw_8bit", "--json")
    plan = json.loads(out)
    assert plan["knobs"]["max_length"] == 1024 and plan["knobs"]["r"] == 8
    assert plan["knobs"]["target_modules"] == ["q_proj", "v_proj"]
    assert plan["knobs"]["optim"] == "paged_adamw_8bit"
    assert plan["pinned"] == {"r": 8, "target_modules": ["q_proj", "v_proj"], "optim": "paged_adamw_8bit",
                              "max_length": 1024}
    assert plan["knob_sources"]["r"] == "set by you"


def test_nothing_fits_exits_1_and_says_what_would(capsys, tmp_path):
    d = tmp_path / "big"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**LLAMA_8B, "hidden_size": 8192, "num_hidden_layers": 80,
                                               "num_attention_heads": 64, "intermediate_size": 28672}))
    rc, out, _ = run(capsys, "plan", "-m", str(d), "--budget", "8", "--backend", "cuda")
    assert rc == 1
    assert "Does not fit" in out
    assert "a smaller model" in out


def test_profiles_lists_every_shipped_profile(capsys):
    rc, out, _ = run(capsys, "profiles")
    assert rc == 0
    for name in ("cpu", "cuda-8gb", "cuda-24gb", "cuda-80gb", "mps-16gb", "mps-128gb"):
        assert name in out


# ------------------------------------------------------------------ bad input


def test_unknown_model_id_while_offline(capsys):
    rc, _, err = run(capsys, "plan", "--model", "nobody/no-such-model")
    assert rc == 1
    line = one_line_error(err)
    assert "nobody/no-such-model" in line and "HF_HUB_OFFLINE" in line and "local folder" in line


def test_folder_without_config_json(capsys, tmp_path):
    rc, _, err = run(capsys, "plan", "--model", str(tmp_path))
    assert rc == 1
    assert "has no config.json" in one_line_error(err)


def test_architecture_that_needs_remote_code(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {**LLAMA_8B, "model_type": "mystery_lm", "auto_map": {"AutoModelForCausalLM": "modeling_mystery.M"}}))
    rc, _, err = run(capsys, "plan", "--model", str(tmp_path))
    assert rc == 1
    line = one_line_error(err)
    assert "mystery_lm" in line and "--trust-remote-code" in line
    rc, out, err = run(capsys, "plan", "--model", str(tmp_path), "--trust-remote-code", "--json")
    assert rc in (0, 1) and err == ""
    assert json.loads(out)["model"]["trust_remote_code"] is True


def test_invalid_profile_file(capsys, tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text('name = "mine"\ndescription = "x"\n[match]\nbackend = "cpu"\nmin_memory_gb = 0\n'
                   '[knobs]\nr = "sixteen"\n')
    rc, _, err = run(capsys, "plan", "--profile", str(bad))
    assert rc == 1
    line = one_line_error(err)
    assert str(bad) in line and "'r'" in line


@pytest.mark.parametrize("setting,expect", [
    ("r=0", "'r' must be at least 1, got 0"),
    ("per_device_train_batch_size=-4", "must be at least 1, got -4"),
    ("learning_rate=-1e-4", "'learning_rate' must be at least"),
    ("max_length=0", "'max_length' must be at least 16"),
    ("rank=8", "unknown key 'rank'"),
    ("load_in_4bit=maybe", "must be true or false"),
    ("optim=adam", "'optim' must be one of"),
    ("r", "expected key=value"),
])
def test_bad_set_values(capsys, setting, expect):
    rc, _, err = run(capsys, "plan", "--set", setting)
    assert rc == 1
    assert expect in one_line_error(err)


def test_negative_max_seq_len(capsys):
    rc, _, err = run(capsys, "plan", "--max-seq-len", "-5")
    assert rc == 1
    assert "--max-seq-len" in one_line_error(err)


def test_unknown_option_is_one_line_and_exit_1(capsys):
    rc, _, err = run(capsys, "plan", "--frobnicate")
    assert rc == 1
    assert "--frobnicate" in one_line_error(err)


def test_budget_without_backend(capsys):
    rc, _, err = run(capsys, "plan", "--budget", "24")
    assert rc == 1
    assert "--budget and --backend go together" in one_line_error(err)


def test_our_bug_shows_a_traceback_and_the_log_path(capsys, monkeypatch):
    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_probe", broken)
    monkeypatch.setattr(cli, "make_parser", _parser_with(broken))
    rc, _, err = run(capsys, "probe")
    assert rc == 2
    assert "Traceback" in err and "RuntimeError: boom" in err
    log = err.strip().splitlines()[-1].split("saved in ")[1]
    assert "RuntimeError: boom" in open(log, encoding="utf-8").read()
    assert log.startswith(os.environ["LOCALTUNE_HOME"])


def _parser_with(func):
    original = cli.make_parser

    def make():
        p = original()
        p.set_defaults(func=func)
        return p

    return make


def test_console_script_runs(tmp_path):
    """The installed `localtune` entry point, in a real process."""
    r = subprocess.run([sys.executable, "-m", "localtune", "plan", "--set", "r=0"], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip() == "localtune: error: --set r: 'r' must be at least 1, got 0"
    r = subprocess.run([sys.executable, "-m", "localtune", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "probe" in r.stdout and "plan" in r.stdout


def test_plan_max_context_prints_the_longest_context_and_what_bounds_it(capsys, llama8b):
    rc, out, _ = run(capsys, "plan", "--model", str(llama8b), "--budget", "24", "--backend", "cuda", "--max-context")
    assert rc == 0
    line = [x for x in out.splitlines() if x.startswith("Longest context")]
    assert len(line) == 1 and " tokens (the 21.60 GB budget: the estimate is " in line[0]
    rc, out, _ = run(capsys, "plan", "--model", str(llama8b), "--budget", "24", "--backend", "cuda", "--max-context",
                     "--json")
    fit = json.loads(out)["max_context"]
    assert fit["limit"] == "budget" and fit["max_length"] > json.loads(out)["knobs"]["max_length"]
    assert fit["estimate_bytes"] <= json.loads(out)["budget_bytes"]
    rc, out, _ = run(capsys, "plan", "--model", str(llama8b), "--budget", "24", "--backend", "cuda", "--json")
    assert "max_context" not in json.loads(out)  # only when asked
