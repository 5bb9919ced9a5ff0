"""`--model` resolution and the built-in model: what a user sees for each kind of input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from localtune import models
from localtune.errors import UserError
from localtune.models import (ModelShape, builtin_gguf_path, ensure_builtin_model, resolve_model,
                              shape_from_config, shape_from_gguf)

SMOLLM2_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)


def _read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("spec", [None, "default"])
def test_default_model_is_the_builtin_smollm2(spec):
    ref = resolve_model(spec)
    assert ref.kind == "builtin"
    assert ref.display_name == "SmolLM2-135M-Instruct (built-in)"
    assert Path(ref.location) == builtin_gguf_path()
    for key, value in SMOLLM2_SHAPE.items():
        assert getattr(ref.shape, key) == value, key
    assert ref.shape.q_dim == 576 and ref.shape.kv_dim == 192


def test_local_folder_gives_the_shape_from_its_config(tiny_llama_dir):
    ref = resolve_model(str(tiny_llama_dir))
    assert ref.kind == "folder"
    assert Path(ref.location) == tiny_llama_dir.resolve()
    assert ref.shape == ModelShape(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=256,
                                   tie_word_embeddings=False, attention_bias=False)


def test_gguf_file_gives_the_shape_from_its_metadata():
    path = builtin_gguf_path()
    ref = resolve_model(str(path))
    assert ref.kind == "gguf"
    assert ref.shape.model_type == "llama"
    for key, value in SMOLLM2_SHAPE.items():
        assert getattr(ref.shape, key) == value, key


@pytest.mark.slow
def test_gguf_metadata_shape_equals_the_converted_config_shape(builtin_model_dir):
    from_gguf = shape_from_gguf(builtin_gguf_path())
    from_config = shape_from_config(_read_config(builtin_model_dir), "config.json")
    assert from_gguf == from_config


# ---------------------------------------------------------------- the built-in model


@pytest.mark.slow
def test_builtin_model_converts_to_a_plain_model_with_the_gguf_logits(builtin_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_builtin_model()
    assert folder == models.builtin_model_dir()
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith(".convert-") for n in names)
    cfg = _read_config(folder)
    assert "quantization_config" not in cfg
    assert cfg["model_type"] == "llama"

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids.shape[1] >= 4

    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert getattr(converted, "hf_quantizer", None) is None
    assert all(p.dtype == torch.float32 for p in converted.parameters())
    gguf = builtin_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        a = converted(ids).logits
        b = direct(ids).logits
    assert a.shape == b.shape == (1, ids.shape[1], 49152)
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.slow
def test_builtin_model_is_converted_only_once(builtin_model_dir, monkeypatch):
    first = ensure_builtin_model()
    weights = first / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    import transformers

    def no_reload(*a, **k):
        raise AssertionError("ensure_builtin_model() converted the model again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_reload)
    start = time.perf_counter()
    assert ensure_builtin_model() == first
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- what the user did wrong


def test_unknown_hub_id_offline_says_offline_and_suggests_a_local_folder():
    with pytest.raises(UserError) as e:
        resolve_model("localtune-tests/no-such-model-anywhere")
    msg = str(e.value)
    assert "localtune-tests/no-such-model-anywhere" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert "local folder" in msg


def test_folder_without_config_json_is_refused(tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(folder))


def test_folder_with_only_a_gguf_points_at_the_file(tmp_path):
    folder = tmp_path / "ggufs"
    folder.mkdir()
    (folder / "model-Q4.gguf").write_bytes(b"")
    with pytest.raises(UserError, match=r"no config\.json.*model-Q4\.gguf"):
        resolve_model(str(folder))


def _custom_code_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "custom"
    folder.mkdir()
    cfg = {
        "model_type": "localtune_test_arch",
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"},
        "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "intermediate_size": 512, "vocab_size": 1000, "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return folder


def test_custom_code_is_refused_without_trust_remote_code(tmp_path):
    folder = _custom_code_folder(tmp_path)
    with pytest.raises(UserError) as e:
        resolve_model(str(folder))
    msg = str(e.value)
    assert "--trust-remote-code" in msg
    assert "localtune_test_arch" in msg


def test_custom_code_is_accepted_with_trust_remote_code(tmp_path):
    folder = _custom_code_folder(tmp_path)
    ref = resolve_model(str(folder), trust_remote_code=True)
    assert ref.kind == "folder" and ref.trust_remote_code
    assert ref.shape.model_type == "localtune_test_arch"
    assert (ref.shape.hidden_size, ref.shape.num_hidden_layers, ref.shape.head_dim) == (256, 4, 64)


def test_known_architecture_with_auto_map_needs_no_flag(tiny_llama_dir):
    cfg = _read_config(tiny_llama_dir)
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (tiny_llama_dir / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert resolve_model(str(tiny_llama_dir)).shape.hidden_size == 64


@pytest.mark.parametrize("spec", ["./no-such-model", "no-such-dir/model.gguf", "~/no-such-model-folder-xyz"])
def test_missing_path_says_no_such_file(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError, match="no such file or folder"):
        resolve_model(spec)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(UserError, match=r"must be \.gguf.*folder"):
        resolve_model(str(path))


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all" * 10, "truncated"])
def test_a_corrupt_gguf_is_refused(tmp_path, content):
    if content == "truncated":  # a real header, cut off inside the metadata
        content = builtin_gguf_path().read_bytes()[:4096]
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a readable GGUF file"):
        resolve_model(str(path))


def test_a_config_missing_a_needed_key_names_it(tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                    "num_attention_heads": 4}), encoding="utf-8")
    with pytest.raises(UserError, match="num_hidden_layers"):
        resolve_model(str(folder))


def test_invalid_config_json_is_refused(tmp_path):
    folder = tmp_path / "badjson"
    folder.mkdir()
    (folder / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="not valid JSON"):
        resolve_model(str(folder))


def test_hub_id_is_read_from_the_local_cache_while_offline(tmp_path, monkeypatch):
    """A hub model downloaded once is planned offline from its cached config.json."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snap = cache / "models--someorg--tiny-llama" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (cache / "models--someorg--tiny-llama" / "refs").mkdir()
    (cache / "models--someorg--tiny-llama" / "refs" / "main").write_text("0123abcd")
    (snap / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "intermediate_size": 688, "vocab_size": 32000, "tie_word_embeddings": False}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    ref = resolve_model("someorg/tiny-llama")
    assert ref.kind == "hub" and ref.location == "someorg/tiny-llama"
    assert (ref.shape.hidden_size, ref.shape.num_hidden_layers, ref.shape.vocab_size) == (256, 4, 32000)
    assert ref.shape.num_key_value_heads == 2 and not ref.shape.tie_word_embeddings
