"""The memory estimate against what torch, bitsandbytes and peft actually allocate.

Weights are compared with the bytes of the model as loaded (16-bit and 4-bit NF4 through
bitsandbytes on the CPU), the adapter with peft's own parameter count, and the activations
with the tensors autograd saves for the backward pass (measured with saved-tensor hooks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localtune.errors import UserError
from localtune.knobs import Knobs
from localtune.memory import (GiB, MemoryEstimate, estimate, lora_param_count, resolve_targets,
                              weights_bytes)
from localtune.models import ModelShape, shape_from_config

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LLAMA_31_8B = ModelShape(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
                         tie_word_embeddings=False)


def _shape(folder: Path) -> ModelShape:
    return shape_from_config(json.loads((folder / "config.json").read_text(encoding="utf-8")), "config.json")


@pytest.fixture(params=["tiny", "builtin"])
def model_dir(request) -> Path:
    """The tiny random Llama and the real built-in SmolLM2-135M."""
    if request.param == "tiny":
        return request.getfixturevalue("tiny_llama_dir")
    return request.getfixturevalue("builtin_model_dir")


# ---------------------------------------------------------------- weights


def _loaded_bytes(model) -> tuple[int, int]:
    """(bytes, 4-bit weights) of the loaded model: every distinct storage behind its parameters
    and buffers (tied weights count once), plus the block constants of each bitsandbytes 4-bit
    weight (absmax, code book, offset and, with double quantisation, the second level's)."""
    import bitsandbytes as bnb
    import torch

    storages: dict[int, int] = {}

    def add(t) -> None:
        if torch.is_tensor(t):
            s = t.untyped_storage()
            storages.setdefault(s.data_ptr(), s.nbytes())

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    n4 = 0
    for p in model.parameters():
        if isinstance(p, bnb.nn.Params4bit):
            n4 += 1
            qs = p.quant_state
            add(qs.absmax)
            add(qs.code)
            add(qs.offset)
            if qs.state2 is not None:
                add(qs.state2.absmax)
                add(qs.state2.code)
    return sum(storages.values()), n4


def _load(folder: Path, quant=None):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=quant)


@pytest.mark.slow
def test_16bit_weights_match_the_loaded_model(model_dir):
    shape = _shape(model_dir)
    predicted, base_params, quantised = weights_bytes(shape, load_in_4bit=False, double_quant=True, dtype_bytes=2)
    model = _load(model_dir)
    actual, n4 = _loaded_bytes(model)
    assert n4 == 0 and quantised == 0
    assert base_params == sum(p.numel() for p in model.parameters())
    assert abs(predicted - actual) / actual < 0.001, (predicted, actual)  # the README says: within 0.1%


@pytest.mark.slow
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
def test_4bit_nf4_weights_match_the_loaded_model(model_dir, double_quant):
    import bitsandbytes as bnb
    import torch
    from transformers import BitsAndBytesConfig

    shape = _shape(model_dir)
    predicted, _, quantised = weights_bytes(shape, load_in_4bit=True, double_quant=double_quant, dtype_bytes=2)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = _load(model_dir, quant)
    actual, n4 = _loaded_bytes(model)
    # exactly the decoder linears are quantised: seven per block
    assert n4 == 7 * shape.num_hidden_layers
    assert quantised == sum(p.numel() * 2 for p in model.parameters() if isinstance(p, bnb.nn.Params4bit))
    assert abs(predicted - actual) / actual < 0.001, (predicted, actual)  # the README says: within 0.1%
    # and 4-bit is what the estimate says it is for: far smaller than 16-bit
    sixteen, _, _ = weights_bytes(shape, load_in_4bit=False, double_quant=True, dtype_bytes=2)
    assert predicted < sixteen


# ---------------------------------------------------------------- adapter


def _peft_trainable(folder: Path, knobs: Knobs) -> int:
    """Trainable parameters of a peft LoRA model over `folder`'s architecture (built on the
    meta device: the module tree is what peft counts, the weights do not matter)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets = "all-linear" if knobs.target_modules == ["all-linear"] else knobs.target_modules
    lora = LoraConfig(r=knobs.r, lora_alpha=knobs.lora_alpha, lora_dropout=knobs.lora_dropout, target_modules=targets)
    model = get_peft_model(model, lora)
    trainable, _ = model.get_nb_trainable_parameters()
    return trainable


@pytest.mark.parametrize("r, targets", [
    (16, ALL_SEVEN),
    (8, ["q_proj", "v_proj"]),
    (4, ["o_proj", "down_proj", "gate_proj"]),
    (32, ["all-linear"]),
], ids=["all-seven-r16", "qv-r8", "o-down-gate-r4", "all-linear-r32"])
def test_adapter_part_is_exactly_peft_count(model_dir, r, targets):
    knobs = Knobs(r=r, lora_alpha=2 * r, target_modules=targets, optim="adamw_torch")
    shape = _shape(model_dir)
    expected = _peft_trainable(model_dir, knobs)
    est = estimate(shape, knobs, "cuda")
    assert est.lora_params == expected == lora_param_count(shape, knobs)
    # float32 parameter + float32 gradient + AdamW's two float32 moments
    assert est.adapter_bytes == expected * (4 + 4 + 8)


def test_8bit_optimizer_shrinks_the_adapter_part():
    base = Knobs(optim="adamw_torch", target_modules=["all-linear"])
    full = estimate(LLAMA_31_8B, base, "cuda")
    paged = estimate(LLAMA_31_8B, base.replace(optim="paged_adamw_8bit"), "cuda")
    assert paged.lora_params == full.lora_params
    assert paged.adapter_bytes < full.adapter_bytes * 0.7


def test_unknown_target_module_is_a_user_error():
    with pytest.raises(UserError, match="'wq' is not a linear layer"):
        resolve_targets(LLAMA_31_8B, ["wq"])


def test_fused_target_names_stand_for_their_llama_layers():
    assert resolve_targets(LLAMA_31_8B, ["qkv_proj", "gate_up_proj"]) == ["q_proj", "k_proj", "v_proj",
                                                                          "gate_proj", "up_proj"]


# ---------------------------------------------------------------- a real-size model by its config


QLORA_8B = Knobs(r=16, lora_alpha=32, target_modules=["all-linear"], per_device_train_batch_size=1, max_length=2048,
                 gradient_checkpointing=True, optim="paged_adamw_8bit", load_in_4bit=True,
                 bnb_4bit_use_double_quant=True)


def test_llama_31_8b_qlora_fits_the_known_range():
    est = estimate(LLAMA_31_8B, QLORA_8B, "cuda")
    assert isinstance(est, MemoryEstimate)
    assert 6 * GiB < est.total_bytes < 16 * GiB, est.total_bytes / GiB
    for name, value in est.parts():
        assert value > 0, name
    assert est.lora_params == 41_943_040  # peft's count for r=16 on all linear layers of Llama-3.1-8B
    assert 7.9e9 < est.base_params < 8.1e9
    assert est.tokens_per_micro_batch == 2048
    assert est.total_bytes == sum(v for _, v in est.parts())


def test_4bit_is_smaller_than_16bit():
    q = estimate(LLAMA_31_8B, QLORA_8B, "cuda")
    full = estimate(LLAMA_31_8B, QLORA_8B.replace(load_in_4bit=False), "cuda")
    assert q.total_bytes < full.total_bytes
    assert q.weights_bytes < full.weights_bytes / 2.5
    # the same activations, plus the one 16-bit buffer a 4-bit weight is dequantised into
    buffer = q.details["dequant_buffer_bytes"]
    assert buffer == 4096 * 14336 * 2 and full.details["dequant_buffer_bytes"] == 0
    assert q.activations_bytes == full.activations_bytes + buffer


def test_gradient_checkpointing_lowers_activations():
    on = estimate(LLAMA_31_8B, QLORA_8B, "cuda")
    off = estimate(LLAMA_31_8B, QLORA_8B.replace(gradient_checkpointing=False), "cuda")
    assert on.activations_bytes < off.activations_bytes / 5
    assert on.weights_bytes == off.weights_bytes and on.logits_bytes == off.logits_bytes


def test_halving_max_length_halves_activations_and_logits():
    full = estimate(LLAMA_31_8B, QLORA_8B, "cuda")
    half = estimate(LLAMA_31_8B, QLORA_8B.replace(max_length=1024), "cuda")
    # the 4-bit dequantisation buffer is one weight's worth whatever the length; the rest scales
    per_token = [e.activations_bytes - e.details["dequant_buffer_bytes"] for e in (half, full)]
    assert per_token[0] / per_token[1] == pytest.approx(0.5, rel=0.05)
    assert half.activations_bytes < 0.6 * full.activations_bytes
    assert half.logits_bytes / full.logits_bytes == pytest.approx(0.5, rel=0.05)
    assert half.weights_bytes == full.weights_bytes and half.adapter_bytes == full.adapter_bytes


def test_micro_batch_scales_tokens():
    one = estimate(LLAMA_31_8B, QLORA_8B, "cuda")
    four = estimate(LLAMA_31_8B, QLORA_8B.replace(per_device_train_batch_size=4), "cuda")
    assert four.tokens_per_micro_batch == 4 * one.tokens_per_micro_batch
    # the hidden states trl's fused LM head scores grow with the tokens; its projection buffer
    # (min(n, 4096) x 32768) does not grow past 4096 positions
    assert four.details["fused_head_saved_bytes"] == pytest.approx(4 * one.details["fused_head_saved_bytes"], rel=0.01)
    assert one.logits_bytes < four.logits_bytes < 4 * one.logits_bytes


def test_sft_logits_are_the_fused_heads_not_the_full_logits():
    """trl 1.16's SFTTrainer never forms the (tokens x vocabulary) logits: for Llama-3.1-8B at
    4096 tokens the loss part is its fused LM head's (~0.4 GB in bf16 on CUDA), not the 4.9 GB
    full bf16 logits + float32 log-softmax + float32 gradient it would be."""
    k = QLORA_8B.replace(max_length=4096)
    e = estimate(LLAMA_31_8B, k, "cuda")
    full_logits = 4096 * LLAMA_31_8B.vocab_size * (2 + 4 + 4)
    assert e.logits_bytes < full_logits / 10
    d = e.details
    assert d["fused_head_saved_bytes"] == 4095 * 4096 * 2  # the scored positions' hidden states
    assert e.logits_bytes == d["fused_head_saved_bytes"] + d["fused_head_backward_bytes"]
    assert 0.3 * GiB < e.logits_bytes < 0.5 * GiB


# ---------------------------------------------------------------- activations, measured


def _measured_bytes(model, seq: int, vocab: int) -> int:
    """Bytes the decoder blocks and the final norm save for the backward pass at sequence
    length `seq` (batch 1): every distinct storage autograd saves, the LM head and the loss
    left out (trl scores through its fused head: test_sft_step_matches_the_estimate)."""
    import torch

    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seq))
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        saved.setdefault(s.data_ptr(), s.nbytes())
        return t

    backbone = model.get_base_model().model
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = backbone(input_ids=ids).last_hidden_state
    out.sum().backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


@pytest.fixture(params=["tiny", "wide-attention"])
def activation_model_dir(request, tmp_path) -> Path:
    """The tiny Llama (q = h), and one whose attention is twice as wide as its hidden size
    (head_dim 32: q = 2h, as in Qwen3-0.6B), so the h and q terms are checked apart."""
    tiny = request.getfixturevalue("tiny_llama_dir")
    if request.param == "tiny":
        return tiny
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny)
    config.head_dim = 32
    folder = tmp_path / "wide-attention"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_activation_estimate_matches_saved_tensors(activation_model_dir, dropout):
    """float32 on the CPU, LoRA on all seven projections, no gradient checkpointing: the
    estimate's activations per token within 15% of what the blocks save. The difference
    between 512 and 256 tokens cancels what does not grow with the sequence (weights)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    knobs = Knobs(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=ALL_SEVEN, per_device_train_batch_size=1,
                  max_length=512, gradient_checkpointing=False, optim="adamw_torch")
    shape = _shape(activation_model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(activation_model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=knobs.r, lora_alpha=knobs.lora_alpha, lora_dropout=dropout,
                                             target_modules=knobs.target_modules))
    model.train()  # dropout masks exist only in training mode
    long, short = _measured_bytes(model, 512, shape.vocab_size), _measured_bytes(model, 256, shape.vocab_size)
    measured_per_token = (long - short) / 256

    est = estimate(shape, knobs, "cpu")
    assert est.details["compute_dtype_bytes"] == 4
    predicted_per_token = est.activations_bytes / est.tokens_per_micro_batch
    assert predicted_per_token == pytest.approx(measured_per_token, rel=0.15), (predicted_per_token, measured_per_token)


def measured_sft_step(tmp_path, model, vocab: int, knobs, *, autocast: bool = False) -> int:
    """The profiler's peak of the second of two SFT steps as trl 1.16's SFTTrainer takes them
    (padding-free, as the worker trains on the CPU; its fused LM head; LoRA as `knobs` say), on
    rows of exactly max_length random ids; under the CPU's bf16 autocast with `autocast` (what
    accelerate wraps a step in on the CPU with bf16)."""
    import contextlib

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tests.test_memory_preference import peak_bytes, word_tokenizer

    micro_batch, length = knobs.per_device_train_batch_size, knobs.max_length
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, vocab, (length,), generator=g).tolist(), "assistant_masks": [1] * length}
            for _ in range(micro_batch)]
    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=micro_batch, max_length=None,
                     padding_free=True, gradient_checkpointing=knobs.gradient_checkpointing, bf16=False,
                     use_cpu=True, report_to="none", disable_tqdm=True)
    lora = LoraConfig(r=knobs.r, lora_alpha=knobs.lora_alpha, lora_dropout=knobs.lora_dropout,
                      target_modules=knobs.target_modules, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=word_tokenizer(vocab), peft_config=lora)
    policy = trainer.model
    policy.train()
    if knobs.gradient_checkpointing:  # as Trainer.train() does before the first step
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = trainer.data_collator(rows)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = trainer.compute_loss(policy, batch)
        loss.backward()
        policy.zero_grad(set_to_none=True)

    step()  # the first step builds what lives on: measure the second
    return peak_bytes(step)


@pytest.mark.parametrize("vocab, micro_batch, length, checkpointing", [
    (256, 2, 256, False), (256, 2, 256, True), (40000, 1, 256, False), (40000, 2, 512, True), (256, 4, 2048, True)],
    ids=["small", "small-checkpointing", "over-the-vocab-tile", "two-vocab-tiles-checkpointing", "long"])
def test_sft_step_matches_the_estimate(vocab, micro_batch, length, checkpointing, tmp_path):
    """One SFT step (LoRA with dropout on all seven projections, float32): the highest total of
    live tensors it allocates (torch's profiler) against the estimate's activations + logits +
    the LoRA gradients, within 6% (measured: 0.975 to 1.045 of the measurement)."""
    from tests.test_memory_preference import knobs_for, tiny_llama

    model, shape = tiny_llama(vocab=vocab)
    knobs = knobs_for("sft", micro_batch, length, checkpointing)
    measured = measured_sft_step(tmp_path, model, vocab, knobs)
    est = estimate(shape, knobs, "cpu")
    predicted = est.activations_bytes + est.logits_bytes + est.lora_params * 4
    assert predicted == pytest.approx(measured, rel=0.06), (predicted, measured)


@pytest.mark.parametrize("micro_batch, length", [(2, 256), (4, 256), (1, 1024)], ids=["small", "four-rows", "longer"])
def test_sft_step_under_the_cpus_bf16_autocast_matches_the_estimate(micro_batch, length, tmp_path):
    """The same step under the CPU's bfloat16 autocast over float32 weights, as the worker
    trains where the CPU computes bf16 natively (AVX512-BF16 or AMX: this project's machine):
    the estimate for such a CPU (its autocast coefficients and the bf16 weight copies the
    matmuls keep) within 10% of the profiler's peak. (Autocast runs on any CPU, emulated where
    bf16 is not native, so the measurement does not depend on the machine.) Without
    checkpointing, where what the blocks keep is most of the step; how checkpointing's parts
    combine does not depend on the dtype (the float32 test above)."""
    from localtune.precision import DeviceFacts
    from tests.test_memory_preference import knobs_for, tiny_llama

    vocab = 256
    model, shape = tiny_llama(vocab=vocab, hidden=128, intermediate=384, heads=4, kv_heads=2, layers=4)
    knobs = knobs_for("sft", micro_batch, length, False)
    measured = measured_sft_step(tmp_path, model, vocab, knobs, autocast=True)
    est = estimate(shape, knobs.replace(bf16=True), DeviceFacts(backend="cpu", cpu_bf16=True))
    assert est.details["autocast_weight_copies_bytes"] > 0
    predicted = est.activations_bytes + est.logits_bytes + est.lora_params * 4
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured)


def test_activation_estimate_with_dropout_is_larger():
    k = Knobs(lora_dropout=0.0, gradient_checkpointing=False)
    assert (estimate(LLAMA_31_8B, k.replace(lora_dropout=0.05), "cuda").activations_bytes
            > estimate(LLAMA_31_8B, k, "cuda").activations_bytes)


def test_the_headroom_covers_the_worst_shortfall_measured_on_this_cpu():
    """The planner keeps free what the estimate has been measured to be short by: the rows of
    benchmarks/memory_accuracy_cpu.json (the real worker's peak resident size on this machine,
    the built-in model, 19 configurations) scored against today's estimate, as
    `memory_accuracy_cpu.py --rescore` does."""
    import sys

    from localtune.plan import ESTIMATE_WORST_UNDER, HEADROOM_FRAC

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import memory_accuracy_cpu
    finally:
        sys.path.remove(str(bench))
    rows = memory_accuracy_cpu.rescore(json.loads((bench / "memory_accuracy_cpu.json").read_text(encoding="utf-8")))
    worst = min(r["error"] for r in rows)
    assert worst < 0  # some row is under its measured peak: the headroom has something to cover
    assert ESTIMATE_WORST_UNDER == pytest.approx(-worst, abs=0.0005), "plan.ESTIMATE_WORST_UNDER is out of date"
    assert HEADROOM_FRAC >= -worst
    # where the CPU's terms stand: the 4-bit rows carry the float32 checkpoint the loader read
    four_bit = [r for r in rows if r["four_bit"]]
    assert all(r["parts"]["overhead"] >= 0.75 * GiB + 135e6 * 4 * 0.99 for r in four_bit)
