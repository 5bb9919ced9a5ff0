"""The preference demo as a person meets it: `localtune train --method dpo --headless` with no
other arguments trains the built-in model on the shipped pairs, and afterwards the model opens
its answers with "In short: " where the base model almost never does, and ranks the held-out
pairs. One real run (minutes on 2 CPU cores). (Export of a DPO run
is tested on the tiny model in tests/test_preference_worker.py.)"""

from __future__ import annotations

import os
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
