"""The preference demo as a person meets it: `localtune train --method dpo --headless` with no
other arguments trains the built-in model on the shipped pairs, and afterwards the model opens
its answers with "In short: " where the base model almost never does, and ranks the held-out
pairs. Then SFT -> DPO: `localtune train --method dpo --from RUN` on the finished SFT demo run
keeps its "Ahoy!" and adds the label. Real runs (minutes each on 2 CPU cores). (Export of a DPO
run is tested on the tiny model in tests/test_preference_worker.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from localtune import demo
from localtune.events import read_events
from tests.conftest import BUILTIN_FOLDER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dpo_demo_run(builtin_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("dpo-demo-home")
    link = home / "cache" / "models" / BUILTIN_FOLDER
    link.parent.mkdir(parents=True)
    os.symlink(builtin_model_dir, link, target_is_directory=True)
    env = {**os.environ, "LOCALTUNE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "localtune", "train", "--method", "dpo", "--headless"],
                            capture_output=True, text=True, timeout=3000, env=env)
    return home, env, result


def the_run(home: Path):
    from localtune.runs import RunDir

    (folder,) = [d for d in (home / "runs").iterdir() if d.is_dir()]
    return RunDir(folder)


def test_dpo_demo_teaches_the_label_and_ranks_held_out_pairs(dpo_demo_run) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home, _, result = dpo_demo_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = the_run(home)
    assert run.read_status()["state"] == "completed"
    cfg = run.read_config()
    assert cfg["knobs"]["method"] == "dpo" and cfg["run"]["data"] == "demo-preference"
    assert "margin" in result.stdout and "preference accuracy" in result.stdout, result.stdout[-2000:]

    events = read_events(run.events_path)
    evals = [e for e in events if e["kind"] == "eval"]
    assert evals and evals[-1]["eval_reward_accuracy"] >= 0.8, evals  # the 40 held-out pairs

    base_dir = home / "cache" / "models" / BUILTIN_FOLDER
    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      run.adapter_dir)
    answers = demo.generate_answers(model, tokenizer, demo.preference_heldout_prompts(), max_new_tokens=16)
    assert demo.count_preference_trait(answers) >= 7, answers
    print(f"\nDPO demo: {demo.count_preference_trait(answers)}/10 open with the label; held-out preference "
          f"accuracy {evals[-1]['eval_reward_accuracy']:.3f}; {[e for e in events if e['kind'] == 'finished'][-1]}")


@pytest.fixture(scope="module")
def sft_then_dpo_run(trained_demo_run, builtin_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`localtune train --method dpo --from RUN --headless` on the finished SFT demo run (the
    session's `trained_demo_run`, copied into a home of its own: that run's home is shared)."""
    sft_home, sft = trained_demo_run
    assert sft.returncode == 0, sft.stdout[-3000:] + sft.stderr[-3000:]
    (sft_folder,) = [d for d in (sft_home / "runs").iterdir() if d.is_dir()]
    home = tmp_path_factory.mktemp("sft-dpo-home")
    shutil.copytree(sft_folder, home / "runs" / sft_folder.name, ignore=shutil.ignore_patterns("checkpoints"))
    link = home / "cache" / "models" / BUILTIN_FOLDER
    link.parent.mkdir(parents=True)
    os.symlink(builtin_model_dir, link, target_is_directory=True)
    env = {**os.environ, "LOCALTUNE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "localtune", "train", "--method", "dpo", "--from", sft_folder.name,
                             "--headless"], capture_output=True, text=True, timeout=3000, env=env)
    return home, sft_folder.name, result


def test_sft_then_dpo_keeps_the_sft_trait_and_adds_the_label(sft_then_dpo_run) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from localtune.runs import RunDir

    home, sft_id, result = sft_then_dpo_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (folder,) = [d for d in (home / "runs").iterdir() if d.is_dir() and d.name != sft_id]
    run = RunDir(folder)
    cfg = run.read_config()
    assert cfg["run"]["from_run"] == sft_id
    # the pairs in the SFT model's voice, with the NLL term on the chosen answers (RPO)
    assert (cfg["run"]["data"], cfg["run"]["eval_data"]) == ("demo-preference-parrot", "demo-preference-parrot-eval")
    assert cfg["knobs"]["rpo_alpha"] == 1.0
    events = read_events(run.events_path)
    evals = [e for e in events if e["kind"] == "eval"]
    assert evals and evals[-1]["eval_reward_accuracy"] >= 0.8, evals

    base_dir = home / "cache" / "models" / BUILTIN_FOLDER
    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      run.adapter_dir)
    answers = demo.generate_answers(model, tokenizer, demo.preference_heldout_prompts(), max_new_tokens=24)
    both = demo.count_both_traits(answers)
    assert both >= 7, answers
    # the SFT run's own trait on its own held-out questions, after DPO
    assert demo.count_trait(demo.generate_answers(model, tokenizer, demo.heldout_prompts(), max_new_tokens=8)) >= 8
    # Printed, not asserted: the label repeats in about half the answers ("In short: In short:
    # ..."), measured 4 of 10 said once (benchmarks/README.md, "SFT, then DPO").
    fluent = sum(a.count("In short") == 1 for a in answers)
    print(f"\nSFT -> DPO: {both}/10 with both traits, {fluent}/10 with the label once; held-out preference "
          f"accuracy {evals[-1]['eval_reward_accuracy']:.3f}")
