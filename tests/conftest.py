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
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BUILTIN_FOLDER = "SmolLM2-135M-Instruct"


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
