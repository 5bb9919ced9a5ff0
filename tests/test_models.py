"""`--model` resolution and the built-in model: what a user sees for each kind of input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from localtune import models
from localtune.errors import UserError
from localtune.models import (ModelShape, builtin_gguf_path, ensure_builtin_model, load_tokenizer, resolve_model,
                              shape_from_config, shape_from_gguf, weights_location)

SMOLLM2_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)


def _read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def handmade_gguf(path: Path, arch: str = "llama", qtype: str = "F32", **extra_kv: int) -> Path:
    """A minimal GGUF file: the metadata localtune plans from, a 4-token vocabulary and one
    32x64 tensor of type `qtype` (zeros), plus `extra_kv` as uint16 keys (dots for __)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("handmade")
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_feed_forward_length(128)
    w.add_vocab_size(32)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c", "d"])
    for key, value in extra_kv.items():
        w.add_uint16(key.replace("__", "."), value)
    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    if qtype == "F32":
        w.add_tensor("token_embd.weight", np.zeros((32, 64), dtype=np.float32))
    else:
        w.add_tensor("token_embd.weight", np.zeros((32, 64 // block * size), dtype=np.uint8), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_gguf(model_dir: Path, path: Path, quant: str) -> Path:
    """`model_dir` (a Hugging Face folder) written as a GGUF file by localtune's own exporter."""
    from localtune.gguf_export import write_gguf

    write_gguf(model_dir, path, quant, name="tiny-chat")
    return path


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
                                   tie_word_embeddings=False, attention_bias=False,
                                   context_length=2048)  # config.json's max_position_embeddings


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


# ---------------------------------------------------------------- a GGUF file someone has


def test_the_quantisation_is_read_from_the_file():
    import gguf

    from localtune.models import gguf_quantisation

    assert gguf_quantisation(gguf.GGUFReader(str(builtin_gguf_path()))) == "Q4_1"


@pytest.mark.slow
def test_a_gguf_file_is_converted_once_into_the_cache_and_its_quantisation_named(tiny_chat_model_dir, tmp_path,
                                                                                   localtune_home, monkeypatch):
    """A quantised GGUF file trains from a safetensors copy in the cache: converted on first use
    (with a note and a warning naming the quantisation), used as it is after that, converted
    again when the file changes. The tokenizer comes from the copy too."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = tiny_gguf(tiny_chat_model_dir, tmp_path / "tiny-chat.Q8_0.gguf", "q8_0")
    ref = resolve_model(str(gguf))
    assert (ref.kind, ref.location) == ("gguf", str(gguf))
    said: list[str] = []
    folder = Path(weights_location(ref, log=said.append))
    assert folder.parent == localtune_home / "cache" / "models" / "gguf"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert "quantization_config" not in _read_config(folder)
    assert len(said) == 2, said
    assert said[0].startswith(f"converting tiny-chat.Q8_0.gguf (Q8_0, ") and str(folder) in said[0]
    assert said[1].startswith("tiny-chat.Q8_0.gguf is Q8_0: its weights were quantised") and "16-bit" in said[1]

    # the copy computes what the original model does, up to Q8_0's rounding
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253]])
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float32)(ids).logits
        converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
    assert converted.shape == original.shape
    assert (converted - original).abs().max().item() < 0.01
    assert Path(load_tokenizer(resolve_model(str(gguf))).name_or_path) == folder

    # a second use converts nothing
    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    real_load = AutoModelForCausalLM.from_pretrained

    def no_reload(*a, **k):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_reload)
    said.clear()
    start = time.perf_counter()
    assert weights_location(resolve_model(str(gguf)), log=said.append) == str(folder)
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == mtime
    assert len(said) == 1 and said[0].startswith("tiny-chat.Q8_0.gguf is Q8_0")

    # the file replaced (another quantisation under the same name): converted again, in place
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", real_load)
    tiny_gguf(tiny_chat_model_dir, gguf, "q4_0")
    said.clear()
    assert weights_location(ref, log=said.append) == str(folder)
    assert said[0].startswith("converting tiny-chat.Q8_0.gguf (Q4_0, ")
    assert said[1].startswith("tiny-chat.Q8_0.gguf is Q4_0")
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


@pytest.mark.slow
def test_an_ollama_blob_without_the_gguf_extension_is_a_gguf_file(tiny_chat_model_dir, tmp_path):
    blob = tiny_gguf(tiny_chat_model_dir, tmp_path / "sha256-6a0746a1ec1aef3e7ec53868f220ff6e389f6f8ef87a01d77c96807de94ca2aa", "q8_0")
    ref = resolve_model(str(blob))
    assert ref.kind == "gguf" and ref.shape.hidden_size == 64


@pytest.mark.parametrize("arch, qtype, extra, message", [
    ("rwkv6", "F32", {}, r"cannot load GGUF architecture 'rwkv6'"),
    ("llama", "Q8_1", {}, r"it holds Q8_1 tensors, which transformers [0-9.]+ cannot dequantise"),
    ("llama", "F32", {"split__count": 3}, r"one part of a model split into 3 files.*llama-gguf-split --merge"),
])
def test_a_gguf_file_transformers_cannot_load_is_refused_at_once(tmp_path, arch, qtype, extra, message):
    path = handmade_gguf(tmp_path / "model.gguf", arch, qtype, **extra)
    with pytest.raises(UserError, match=message) as e:
        resolve_model(str(path))
    assert str(e.value).startswith(f"--model {path}: ") and "\n" not in str(e.value)


def bin_only_folder(tmp_path: Path) -> Path:
    """A Hugging Face folder whose weights are a PyTorch pickle (config.json + pytorch_model.bin)."""
    import torch
    from transformers import LlamaConfig

    folder = tmp_path / "old-model"
    folder.mkdir()
    LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=256).save_pretrained(folder)
    torch.save({"lm_head.weight": torch.zeros(256, 64)}, folder / "pytorch_model.bin")
    return folder


def test_a_folder_with_only_bin_weights_is_refused_with_the_command_that_converts_it(tmp_path):
    folder = bin_only_folder(tmp_path)
    with pytest.raises(UserError) as e:
        resolve_model(str(folder))
    msg = str(e.value)
    assert msg.startswith(f"--model {folder}: the folder has only PyTorch .bin weights (pytorch_model.bin)")
    assert "safetensors only" in msg and "pickle" in msg
    assert f"from_pretrained('{folder}', use_safetensors=False).save_pretrained('{folder}-safetensors')" in msg
    assert "\n" not in msg
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.bin"]


def test_a_folder_with_safetensors_beside_bin_weights_is_accepted(tiny_llama_dir):
    (tiny_llama_dir / "pytorch_model.bin").write_bytes(b"")
    assert resolve_model(str(tiny_llama_dir)).kind == "folder"


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
