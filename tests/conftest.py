"""Fixtures shared by the tests.

- Every test gets its own `LOCALTUNE_HOME` (a tmp folder) and runs with the Hugging Face hub
  offline, so no test reads the user's runs or touches the network.
- `builtin_model_dir`: the built-in SmolLM2-135M-Instruct converted to safetensors. The
  conversion (~20 s) runs once per session into a session-wide folder; a test that asks for
  this fixture finds the model under its own `LOCALTUNE_HOME` too (a symlink at
  `<LOCALTUNE_HOME>/cache/models/SmolLM2-135M-Instruct`), so `ensure_builtin_model()` returns
  at once there. Tests that do not ask for it see an empty cache.
- `tiny_llama_dir`: a tiny random Llama model folder (config.json + model.safetensors), for
  tests that need real modules but not real weights.
- `tiny_chat_model_dir` (session): a tiny random Llama with the built-in model's real tokenizer
  and chat template, for tests that train or generate end to end in seconds.
- `tiny_trained_run` (session): a completed worker run on that tiny model (~10 s), for the
  export and chat tests.
- `trained_demo_run` (session): `localtune train --headless` with no arguments, run once (~3 min
  on idle CPU) for the slow end-to-end tests of training, export and chat.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BUILTIN_FOLDER = "SmolLM2-135M-Instruct"


@pytest.fixture
def machine_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hardware.probe()` sees what a machine with no GPU sees, whatever this one has: NVML
    installed but no NVIDIA driver loaded, and no Apple GPU. Tests that check the CPU report
    or the CPU plan use it, so that they pass on the GPU machines localtune is for too."""
    import pynvml

    from localtune import hardware
    from tests.fakes import install_gpus

    install_gpus(monkeypatch, [], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    monkeypatch.setattr(hardware, "_probe_apple", lambda ram_total: None)


@pytest.fixture(scope="session")
def builtin_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The converted built-in model folder (session-wide; converted once)."""
    from localtune.models import ensure_builtin_model

    home = tmp_path_factory.mktemp("localtune-session-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCALTUNE_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        path = ensure_builtin_model()
    assert path == home / "cache" / "models" / BUILTIN_FOLDER
    return path


@pytest.fixture(autouse=True)
def localtune_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    """A fresh LOCALTUNE_HOME per test, the hub offline, and the built-in model linked in
    when the test asks for `builtin_model_dir`."""
    import huggingface_hub.constants

    home = tmp_path / "localtune-home"
    home.mkdir()
    monkeypatch.setenv("LOCALTUNE_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if "builtin_model_dir" in request.fixturenames:
        built: Path = request.getfixturevalue("builtin_model_dir")
        link = home / "cache" / "models" / BUILTIN_FOLDER
        link.parent.mkdir(parents=True)
        os.symlink(built, link, target_is_directory=True)
    return home


@pytest.fixture
def tiny_llama_dir(tmp_path: Path) -> Path:
    """A random Llama model small enough to load in milliseconds: hidden 64, 2 layers,
    4 heads (head_dim 16), 2 kv heads, intermediate 128, vocabulary 256, untied."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    folder = tmp_path / "tiny-llama"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_model_dir(builtin_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128, tied
    embeddings) with the built-in model's real tokenizer and chat template (vocabulary 49152):
    data tokenizes as for the real model, and a worker trains it at a fraction of a second per
    step. Session-wide: do not write into it."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-chat") / "tiny-chat-llama"
    folder.mkdir()
    for f in builtin_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")) or f.name in ("vocab.json", "merges.txt"):
            shutil.copy(f, folder / f.name)
    tok = AutoTokenizer.from_pretrained(folder)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tok), max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


TINY_RUN_KNOBS = dict(
    max_steps=6, save_steps=3, save_total_limit=2, logging_steps=1, eval_steps=3,
    per_device_train_batch_size=2, gradient_accumulation_steps=2, max_length=64,
    r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=1e-2, warmup_steps=1, lr_scheduler_type="constant",
    gradient_checkpointing=False, optim="adamw_torch", seed=1234, calibrate=False,
)
"""A short run at a high learning rate: the adapter moves the tiny model's logits by more than
their own size, so a merge that drops it cannot pass for one that keeps it."""


@pytest.fixture(scope="session")
def tiny_trained_run(tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A completed run: the worker trains `tiny_chat_model_dir` on the first 40 rows of the demo
    set for 6 steps (~10 s). A real run folder (config, plan, data.json with the chat template,
    events, checkpoints, adapter/) for the export and chat tests. Session-wide: do not write
    into it; export with --out."""
    import subprocess
    import sys

    from localtune.demo import demo_dataset_path
    from localtune.models import resolve_model
    from localtune.plan import make_plan
    from localtune.runs import create_run
    from tests.test_worker import REPO_ROOT, _cpu_hardware

    home = tmp_path_factory.mktemp("tiny-run-home")
    data = home / "train.jsonl"
    data.write_text("\n".join(demo_dataset_path().read_text(encoding="utf-8").splitlines()[:40]) + "\n",
                    encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCALTUNE_HOME", str(home))
        plan = make_plan(_cpu_hardware(), resolve_model(str(tiny_chat_model_dir)), profile="cpu", pinned=TINY_RUN_KNOBS)
        run = create_run({"run": {"model": str(tiny_chat_model_dir), "data": str(data), "eval_split": 0.1},
                          "knobs": plan.knobs.to_dict()}, plan.to_dict(), "tiny-run")
    env = {**os.environ, "LOCALTUNE_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    with open(run.log_path, "ab") as log:
        rc = subprocess.run([sys.executable, "-m", "localtune.worker", str(run.path)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, timeout=300).returncode
    assert rc == 0 and (run.adapter_dir / "adapter_model.safetensors").is_file(), run.log_path.read_text()[-3000:]
    return run


@pytest.fixture(scope="session")
def trained_demo_run(builtin_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """`localtune train --headless` with no arguments (the built-in model on the demo set),
    run once per session (~3 min on 2 CPU cores with native bf16, 10-15 min without) in its own LOCALTUNE_HOME, for the slow
    end-to-end tests of training and export. Returns (home, the finished process); the run is
    the only one under home/runs. Do not write into its run folder: export with --out."""
    import subprocess
    import sys

    home = tmp_path_factory.mktemp("demo-run-home")
    link = home / "cache" / "models" / BUILTIN_FOLDER
    link.parent.mkdir(parents=True)
    os.symlink(builtin_model_dir, link, target_is_directory=True)
    env = {**os.environ, "LOCALTUNE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "localtune", "train", "--headless"], capture_output=True,
                            text=True, timeout=3000, env=env)
    return home, result
