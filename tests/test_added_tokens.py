"""A base model without a chat template: the run adds ChatML's two tokens and trains only their
rows of the embeddings (and of an untied lm_head), never full copies of both matrices.

For an 8B model with a 128k vocabulary, full copies (`modules_to_save`) would be ~1 B extra
trainable parameters the estimate never saw; the rows are 2 x 4096 x 2. The estimate's count is
checked against peft's own, and a real worker trains such a model end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localtune.knobs import Knobs
from localtune.memory import estimate, lora_param_count
from localtune.models import resolve_model
from tests.test_data import tiny_tokenizer_without_chatml

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model_without_template(folder: Path, *, tied: bool) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) whose word-level tokenizer has no chat template
    and none of ChatML's tokens: what a base model from the hub looks like to localtune."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer_without_chatml()
    tok.save_pretrained(folder)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=len(tok), max_position_embeddings=256,
                         tie_word_embeddings=tied, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def peft_trainable(folder: Path, knobs: Knobs) -> tuple[int, list[str]]:
    """peft's trainable parameters for the worker's LoRA config over `folder`, as the worker
    builds it: the tokenizer grown by the template's tokens, the embeddings resized, the token
    rows from `worker._trainable_token_indices`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from localtune.data import chat_template_for
    from localtune.worker import _trainable_token_indices

    tok = AutoTokenizer.from_pretrained(folder)
    template = chat_template_for(tok)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tok))
    lora = LoraConfig(r=knobs.r, lora_alpha=knobs.lora_alpha, target_modules=knobs.target_modules,
                      trainable_token_indices=_trainable_token_indices(model, tok, template.added_tokens))
    peft_model = get_peft_model(model, lora)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    return peft_model.get_nb_trainable_parameters()[0], names


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_estimate_counts_exactly_the_token_rows_peft_trains(tmp_path, tied):
    folder = base_model_without_template(tmp_path / "base", tied=tied)
    ref = resolve_model(str(folder))
    assert ref.shape.added_tokens == 2
    knobs = Knobs(r=8, lora_alpha=16, target_modules=ALL_SEVEN)
    est = estimate(ref.shape, knobs, "cpu")
    rows = 2 * 64 * (1 if tied else 2)
    assert est.trainable_token_params == rows
    trainable, names = peft_trainable(folder, knobs)
    assert trainable == est.lora_params + est.trainable_token_params == lora_param_count(ref.shape, knobs) + rows
    # only the rows: no full copy of either matrix is trainable
    assert all("trainable_tokens_delta" in n for n in names), names
    assert len(names) == (1 if tied else 2)
    # their parameters, gradients and AdamW moments at 4 bytes each, in the adapter part
    assert est.adapter_bytes == (est.lora_params + rows) * 16


def test_a_model_with_a_chat_template_adds_no_tokens(tiny_chat_model_dir):
    assert resolve_model(str(tiny_chat_model_dir)).shape.added_tokens == 0


def test_a_worker_trains_the_added_token_rows_and_the_run_exports_and_chats(tmp_path, capsys):
    from safetensors import safe_open

    from localtune.chat import ChatSession
    from localtune.plan import make_plan
    from localtune.runs import create_run
    from tests.helpers import run as cli
    from tests.test_worker import REPO_ROOT, _cpu_hardware

    folder = base_model_without_template(tmp_path / "base", tied=False)
    data = tmp_path / "train.jsonl"
    pairs = [("Hi", "Hello there."), ("Bye", "Goodbye."), ("Hello", "Hi there."), ("Goodbye", "Bye.")]
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in pairs * 4))
    knobs = dict(max_steps=4, save_steps=2, logging_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                 max_length=32, r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-2, warmup_steps=0,
                 gradient_checkpointing=False, optim="adamw_torch", bf16=False, calibrate=False)
    plan = make_plan(_cpu_hardware(), resolve_model(str(folder)), profile="cpu", pinned=knobs)
    assert plan.estimate.trainable_token_params == 2 * 64 * 2
    run = create_run({"run": {"model": str(folder), "data": str(data)}, "knobs": plan.knobs.to_dict()},
                     plan.to_dict(), "added-tokens")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    with open(run.log_path, "ab") as log:
        rc = subprocess.run([sys.executable, "-m", "localtune.worker", str(run.path)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, timeout=300).returncode
    assert rc == 0, run.log_path.read_text()[-3000:]
    template = json.loads((run.path / "data.json").read_text())["chat_template"]
    assert template["source"] == "chatml" and template["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    with safe_open(str(run.adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    rows = {k: s for k, s in shapes.items() if "trainable_tokens" in k}
    assert sorted(s for s in rows.values()) == [(2, 64), (2, 64)], rows
    assert not [k for k in shapes if "modules_to_save" in k], shapes

    rc, out, err = cli(capsys, "export", str(run.path), "--format", "merged", "--out", str(tmp_path / "merged"))
    assert rc == 0, err
    session = ChatSession.load(run)
    assert isinstance(session.reply([{"role": "user", "content": "Hi"}], max_new_tokens=4), str)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_added_rows_learn_through_trls_fused_lm_head(tmp_path, tied):
    """SFTTrainer scores tokens through trl's fused LM head, which reads the output layer's
    `weight` and `bias` itself. The trained rows must reach it: predicting `<|im_end|>` gives the
    rows of that token a gradient, in lm_head (untied) or in the shared embeddings (tied)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    from localtune.data import chat_template_for
    from localtune.worker import _expose_bias_of_token_wrappers, _trainable_token_indices

    folder = base_model_without_template(tmp_path / "base", tied=tied)
    tok = AutoTokenizer.from_pretrained(folder)
    template = chat_template_for(tok)
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tok))
    add_fused_lm_head(model)  # as SFTTrainer does, before peft wraps the model
    indices = _trainable_token_indices(model, tok, template.added_tokens)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=indices))
    _expose_bias_of_token_wrappers(peft_model)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = torch.tensor([[tok.convert_tokens_to_ids("Hi"), end, tok.convert_tokens_to_ids("Bye"), end]])
    out = peft_model(input_ids=ids, labels=ids, fused_lm_head=True)
    (-out.log_probs.sum()).backward()
    out_layer = "lm_head" if not tied else "embed_tokens"
    (delta,) = [p for n, p in peft_model.named_parameters() if out_layer in n and "trainable_tokens_delta" in n]
    row = indices["embed_tokens"].index(end)
    assert delta.grad is not None and delta.grad[row].abs().sum().item() > 0


_MEASURE = r"""
import gc, json, sys
import psutil, torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer.utils import add_fused_lm_head
from localtune.worker import _expose_bias_of_token_wrappers
tokens, tied, V, h = sys.argv[1] == "1", sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
cfg = LlamaConfig(hidden_size=h, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=256, vocab_size=V, tie_word_embeddings=tied)
model = LlamaForCausalLM(cfg)
add_fused_lm_head(model)
rows = {"embed_tokens": [V - 2, V - 1]} if tied else {"embed_tokens": [V - 2, V - 1], "lm_head": [V - 2, V - 1]}
model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=rows if tokens else None))
_expose_bias_of_token_wrappers(model)
x = torch.randint(0, V, (1, 64))
gc.collect()
def hwm():  # the peak resident size since the last reset, in bytes
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak: building the model must not count
before = psutil.Process().memory_info().rss
(-model(input_ids=x, labels=x, fused_lm_head=True).log_probs.sum()).backward()
print(json.dumps(hwm() - before))
"""


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_estimate_counts_the_merged_output_layer_of_trained_rows(tmp_path, tied):
    """Training token rows costs more than the rows: peft merges them into a full copy of the
    output layer, and the fused LM head forms its full gradient. The peak a forward and backward
    adds with the rows trained, against without, is the estimate's extra within 25% (measured in
    a fresh process whose allocator returns freed blocks: MALLOC_MMAP_THRESHOLD_; the peak is
    reset through /proc/self/clear_refs after the model is built, so Linux only)."""
    from localtune.models import ModelShape

    V, h = 64000, 512
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parent.parent),
                                                     os.environ.get("PYTHONPATH")) if p)}

    def peak(tokens: bool) -> int:
        r = subprocess.run([sys.executable, "-c", _MEASURE, "1" if tokens else "0", "1" if tied else "0", str(V), str(h)],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.strip().splitlines()[-1])

    measured = peak(True) - peak(False)
    shape = ModelShape(model_type="llama", hidden_size=h, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=h // 4, intermediate_size=256, vocab_size=V,
                       tie_word_embeddings=tied, added_tokens=2)
    est = estimate(shape, Knobs(r=4, target_modules=["q_proj"]), "cpu")
    extra = est.details["token_rows_transient_bytes"]
    assert extra == 2 * V * h * 4
    assert abs(measured - extra) <= 0.25 * extra, (measured, extra)
