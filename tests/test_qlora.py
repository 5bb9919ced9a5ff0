"""QLoRA, the recipe localtune exists for, end to end on the real built-in model.

bitsandbytes' NF4 (with double quantisation) runs on this CPU, so the whole path a person
with a GPU takes is run here for real, through the `localtune` command as they would type it:
train with `--set load_in_4bit=true`, kill the worker with SIGKILL after a checkpoint, resume,
and check the resumed steps against an uninterrupted run; then export merged (the base
reloaded in 16 bits, never the 4-bit weights), GGUF, and chat, including chat in 4 bits where
the base in 16 bits would not fit the run's budget.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localtune.events import read_events
from localtune.runs import RunDir

QLORA = ["--set", "load_in_4bit=true", "--set", "bnb_4bit_use_double_quant=true", "--set", "max_steps=6",
         "--set", "save_steps=2", "--set", "eval_steps=3"]
"""The demo recipe (built-in model, demo set) in 4 bits, 6 steps, a checkpoint every 2, a sample
generation every 3 (the model in eval mode between training steps, as every demo run does)."""
LOSS_TOL = 1e-4
TIMEOUT_S = 1800  # ~1 min on a quiet 2-core machine; the margin is for a busy one


@pytest.fixture
def cli_env(builtin_model_dir, localtune_home):
    return {**os.environ, "LOCALTUNE_HOME": str(localtune_home), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def localtune(env, *args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localtune", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def only_run(home: Path, exclude: set[str]) -> RunDir:
    (run,) = [RunDir(p) for p in (home / "runs").iterdir() if p.name not in exclude]
    return run


def step_losses(run: RunDir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run.events_path) if e["kind"] == "step"}


@pytest.mark.slow
def test_qlora_trains_survives_sigkill_resumes_exactly_exports_and_chats(cli_env, localtune_home, tmp_path):
    # ---- the uninterrupted reference
    ref_proc = localtune(cli_env, "train", "--headless", *QLORA)
    assert ref_proc.returncode == 0, ref_proc.stdout[-3000:] + ref_proc.stderr[-3000:]
    ref = only_run(localtune_home, set())
    started = [e for e in read_events(ref.events_path) if e["kind"] == "started"]
    assert started[0]["precision"].startswith("nf4 weights, ")
    assert "nf4 weights" in ref_proc.stdout
    knobs = ref.read_config()["knobs"]
    assert knobs["load_in_4bit"] is True and knobs["bnb_4bit_use_double_quant"] is True
    want = step_losses(ref)
    assert sorted(want) == [1, 2, 3, 4, 5, 6]

    # ---- the same run, killed with SIGKILL right after its first checkpoint
    proc = localtune(cli_env, "train", "--detach", *QLORA, timeout=120)
    assert proc.returncode == 0, proc.stderr
    run = only_run(localtune_home, {ref.id})
    deadline = time.monotonic() + TIMEOUT_S
    while not run.complete_checkpoints():
        assert time.monotonic() < deadline, run.log_path.read_text()[-3000:]
        assert run.read_status().get("state") not in ("failed", "completed"), run.log_path.read_text()[-3000:]
        time.sleep(0.05)
    pid = run.live_worker_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    while run.live_worker_pid() is not None:
        time.sleep(0.05)
    killed_at = run.complete_checkpoints()[-1].name
    assert run.state() == "interrupted"
    assert run.read_status().get("step", 0) < 6

    resumed = localtune(cli_env, "resume", run.id, "--headless")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert run.state() == "completed"
    starts = [e for e in read_events(run.events_path) if e["kind"] == "started"]
    assert [s["resumed_from"] for s in starts] == [None, killed_at]
    got = step_losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):  # the resumed steps, and those before the kill, as uninterrupted
        assert got[step] == pytest.approx(want[step], abs=LOSS_TOL), (step, got[step], want[step])

    # ---- merged: the base reloaded in 16 bits from its own files, not the 4-bit weights it trained on
    merged_dir = tmp_path / "merged"
    out = localtune(cli_env, "export", run.id, "--format", "merged", "--out", str(merged_dir), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((merged_dir / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert "quantization_config" not in config
    from safetensors import safe_open

    with safe_open(str(merged_dir / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert q.shape == (576, 576) and str(q.dtype) == "torch.bfloat16"  # a full 16-bit matrix, not packed NF4
    assert not [n for n in names if "absmax" in n or "quant" in n], names[:10]

    # ---- GGUF
    gguf_dir = tmp_path / "gguf"
    out = localtune(cli_env, "export", run.id, "--format", "gguf", "--quant", "q8_0", "--out", str(gguf_dir), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert [Path(f).name for f in result["files"]] == [f"{run.id}-q8_0.gguf"]
    assert Path(result["files"][0]).stat().st_size > 100e6

    # ---- chat, in 16 bits where they fit the run's budget (this machine's RAM) ...
    from localtune.chat import ChatSession
    from localtune.demo import heldout_prompts

    prompt = [{"role": "user", "content": heldout_prompts()[0]}]
    session = ChatSession.load(run)
    assert not _has_4bit_layers(session.model)
    answer16 = session.reply(prompt, max_new_tokens=12)
    assert answer16.strip()
    del session

    # ... and in 4 bits, as the run trained, where 16 bits would not fit: a budget below the base's 16-bit size
    plan = json.loads(run.plan_path.read_text())
    plan["budget_bytes"] = 100 * 2**20  # 100 MB: chat on the CPU loads float32, 0.5 GB for the base
    run.plan_path.write_text(json.dumps(plan))
    stages = []
    session = ChatSession.load(run, progress=lambda stage, done, total: stages.append(stage))
    assert _has_4bit_layers(session.model)
    assert any("loads in 4 bits" in s for s in stages), stages
    assert session.reply(prompt, max_new_tokens=12).strip()


def _has_4bit_layers(model) -> bool:
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_a_sample_or_eval_in_the_middle_of_qlora_training_keeps_the_gradients(tiny_llama_dir):
    """bitsandbytes on a CPU with AVX512-BF16 repacks 4-bit weights for inference the first time
    a layer runs in eval mode without gradients (what a sample or an evaluation does), after
    which the gradients through the frozen base are lost. The worker turns that off: after an
    eval forward, training computes the same gradients as a model that never left training mode.
    (On a CPU without AVX512-BF16 bitsandbytes never repacks, and both sides agree anyway.)"""
    import torch
    from peft import LoraConfig, get_peft_model

    from localtune import worker
    from localtune.knobs import Knobs
    from localtune.precision import DeviceFacts, precision_for

    knobs = Knobs(load_in_4bit=True, bnb_4bit_compute_dtype="float32", bf16=False)
    precision = precision_for(knobs, DeviceFacts("cpu"))
    x = torch.randint(0, 250, (1, 32), generator=torch.Generator().manual_seed(1))

    def grads(eval_first: bool):
        torch.manual_seed(0)
        model = worker._load_model(str(tiny_llama_dir), knobs, precision, "cpu", False)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                 init_lora_weights=False))
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=x)
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = grads(False), grads(True)
    for name, g in plain.items():
        assert (after_eval[name] - g).abs().max().item() <= 1e-6 * max(1.0, g.abs().max().item()), name
