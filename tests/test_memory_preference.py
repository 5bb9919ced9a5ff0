"""The memory estimate for DPO and ORPO against what trl 1.16 allocates, and the plans it makes.

What each part is checked against, on the CPU in float32 with tiny Llamas built from a config:

- the fused LM head DPO scores with (`trl.kernels.ChunkedLogProbFunction`): the peak of the
  tensors it creates, forward and backward, with torch's profiler (`profile_memory=True`,
  allocations and frees in order), at sizes under and over its token and vocabulary tiles;
- a DPO step (trl's collator, `DPOTrainer.compute_loss` and the backward): its peak against
  activations + logits + reference + LoRA gradients, the reference forward's own peak, and the
  frozen "ref" adapter trl makes when it continues from an adapter;
- an ORPO step (`trl.experimental.orpo.ORPOTrainer`): its peak, full logits included;
- peft's `prepare_model_for_kbit_training` under ORPO with 4-bit weights: the bytes it adds.

The profiler sees every allocation of torch's CPU allocator between start and stop; the peak
is of what the step allocates on top of the loaded model (weights, adapter), which is what
the estimate's per-step parts count.
"""

from __future__ import annotations

import json

import pytest

from localtune.knobs import Knobs
from localtune.memory import (FUSED_TOKEN_TILE, FUSED_VOCAB_TILE, ORPO_LOGITS_BYTES, PART_LABELS, estimate,
                              fused_head_bytes)
from localtune.models import ModelShape, shape_from_config
from localtune.precision import DeviceFacts

ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LLAMA_31_8B = ModelShape(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, intermediate_size=14336, vocab_size=128256,
                         tie_word_embeddings=False)
LLAMA_2_7B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "intermediate_size": 11008, "vocab_size": 32000, "tie_word_embeddings": False,
}
AMPERE_FLASH = DeviceFacts(backend="cuda", compute_capability=(8, 0), flash_attn_installed=True)


# ---------------------------------------------------------------- measuring


def peak_bytes(fn) -> int:
    """The highest total of live CPU tensor bytes that `fn()` allocated at any moment, from
    the profiler's allocation and free events in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    assert events, "the profiler recorded no allocations"
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def tiny_llama(*, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256):
    """A random float32 Llama built in memory, and its ModelShape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                         bos_token_id=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model, shape_from_config(json.loads(config.to_json_string()), "config")


def word_tokenizer(vocab: int):
    """A tokenizer whose tokens are the words t0 .. t{vocab-1} (t0 pads, t1 ends), for trl's
    trainers to be built; the batches below are made of token ids directly."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t2")


def pair_rows(n: int, length: int, vocab: int) -> list[dict]:
    """`n` preference rows of token ids: a prompt of length/4, a chosen completion that fills
    `length`, a rejected one 7 tokens shorter (so the batch is padded, as real pairs are)."""
    import torch

    g = torch.Generator().manual_seed(n * length)
    prompt = length // 4

    def ids(k: int) -> list[int]:
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    return [{"prompt_ids": ids(prompt), "chosen_ids": ids(length - prompt), "rejected_ids": ids(length - prompt - 7)}
            for _ in range(n)]


def knobs_for(method: str, micro_batch: int, length: int, checkpointing: bool, r: int = 8) -> Knobs:
    return Knobs(method=method, r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=ALL_SEVEN,
                 per_device_train_batch_size=micro_batch, max_length=length, gradient_checkpointing=checkpointing,
                 optim="adamw_torch")


# ---------------------------------------------------------------- arithmetic


def test_sft_estimates_have_no_reference_part_and_one_sequence_a_row():
    k = Knobs(per_device_train_batch_size=4, max_length=1024)
    sft = estimate(LLAMA_31_8B, k, "cuda")
    assert sft.method == "sft" and sft.reference_bytes == 0
    assert sft.sequences_per_micro_batch == 4 and sft.tokens_per_micro_batch == 4 * 1024
    assert "reference" not in dict(sft.parts()) and sft.total_bytes == sum(v for _, v in sft.parts())
    dpo = estimate(LLAMA_31_8B, k.replace(method="dpo"), "cuda")
    assert [name for name, _ in dpo.parts()] == list(PART_LABELS)
    assert dpo.total_bytes == sum(v for _, v in dpo.parts())


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_preference_row_is_two_sequences(method):
    """With flash-attention 2 (no padding mask) and no LoRA dropout, a preference method's
    activations are exactly SFT's for twice the sequences; trl turns dropout off, so the
    dropout the knobs ask for is not counted either."""
    k = Knobs(per_device_train_batch_size=2, max_length=2048, lora_dropout=0.0, gradient_checkpointing=True)
    sft = estimate(LLAMA_31_8B, k, AMPERE_FLASH)
    pref = estimate(LLAMA_31_8B, k.replace(method=method, lora_dropout=0.1), AMPERE_FLASH)
    assert pref.sequences_per_micro_batch == 4 and pref.tokens_per_micro_batch == 2 * sft.tokens_per_micro_batch
    assert pref.activations_bytes == 2 * sft.activations_bytes
    assert pref.weights_bytes == sft.weights_bytes and pref.adapter_bytes == sft.adapter_bytes
    # with SDPA the padded pairs cost a mask per stored block on top
    sdpa = estimate(LLAMA_31_8B, k.replace(method=method), "cuda")
    assert sdpa.activations_bytes > pref.activations_bytes


def test_orpo_forms_the_full_logits_of_both_sequences():
    k = Knobs(method="orpo", per_device_train_batch_size=2, max_length=4096)
    orpo = estimate(LLAMA_31_8B, k, "cuda")
    assert orpo.logits_bytes == 2 * 2 * 4096 * LLAMA_31_8B.vocab_size * ORPO_LOGITS_BYTES
    assert orpo.reference_bytes == 0 and "reference" not in dict(orpo.parts())
    # far more than DPO's fused head at the same micro-batch: ~29 GB against well under 1 GB
    dpo = estimate(LLAMA_31_8B, k.replace(method="dpo"), "cuda")
    assert orpo.logits_bytes > 20 * dpo.logits_bytes


def test_a_frozen_reference_adapter_is_counted_only_where_dpo_continues_one():
    k = Knobs(method="dpo", per_device_train_batch_size=1, max_length=2048)
    fresh = estimate(LLAMA_31_8B, k, "cuda")
    cont = estimate(LLAMA_31_8B, k, "cuda", reference_adapter=True)
    assert fresh.details["reference_adapter_bytes"] == 0
    assert cont.details["reference_adapter_bytes"] == fresh.lora_params * 4  # peft's float32 copy
    assert cont.reference_bytes >= fresh.reference_bytes + fresh.lora_params * 4
    for method in ("sft", "orpo"):
        assert (estimate(LLAMA_31_8B, k.replace(method=method), "cuda", reference_adapter=True).total_bytes
                == estimate(LLAMA_31_8B, k.replace(method=method), "cuda").total_bytes)


def test_the_reference_forward_counts_only_above_the_policy_peak():
    """Without checkpointing, long sequences on a large model: the reference forward's block
    working set (the MLP's (4h + 3i) a per token) exceeds the fused head's backward, and the
    difference is the reference part. With checkpointing the block the backward recomputes is
    larger still, so the reference adds nothing."""
    k = Knobs(method="dpo", per_device_train_batch_size=4, max_length=4096, gradient_checkpointing=False)
    e = estimate(LLAMA_31_8B, k, "cuda")
    d = e.details
    h, i = LLAMA_31_8B.hidden_size, LLAMA_31_8B.intermediate_size
    assert d["reference_forward_peak_bytes"] == e.tokens_per_micro_batch * ((4 * h + 3 * i) * 2 + h)
    assert e.reference_bytes == d["reference_forward_peak_bytes"] - d["fused_head_backward_bytes"] > 1024**3
    assert estimate(LLAMA_31_8B, k.replace(gradient_checkpointing=True), "cuda").reference_bytes == 0


def test_the_fused_head_tiles_are_trl_s():
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    assert (FUSED_TOKEN_TILE, FUSED_VOCAB_TILE) == (TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE)


@pytest.mark.parametrize("backend, bf16, extra_params", [
    ("cuda", True, "norms"),                  # trl casts embeddings and lm_head back to bf16
    ("cuda", False, "norms+embeddings"),      # float16: they stay float32
    ("cpu", True, "none"),                    # float32 weights already
])
def test_orpo_over_4bit_counts_what_prepare_model_for_kbit_training_upcasts(backend, bf16, extra_params):
    k = Knobs(load_in_4bit=True, bf16=bf16)
    shape = LLAMA_31_8B
    sft = estimate(shape, k, backend)
    orpo = estimate(shape, k.replace(method="orpo"), backend)
    dpo = estimate(shape, k.replace(method="dpo"), backend)
    h, L, V = shape.hidden_size, shape.num_hidden_layers, shape.vocab_size
    norms = (2 * L + 1) * h
    expected = {"norms": norms * 2, "norms+embeddings": (norms + 2 * V * h) * 2, "none": 0}[extra_params]
    assert orpo.weights_bytes - sft.weights_bytes == orpo.details["kbit_upcast_bytes"] == expected
    assert dpo.weights_bytes == sft.weights_bytes


# ---------------------------------------------------------------- trl's fused LM head, measured


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("positions, vocab", [(1000, 256), (5000, 256), (300, 40000)],
                         ids=["small", "over-the-token-tile", "over-the-vocab-tile"])
def test_fused_head_transients_match_trl_kernel(positions, vocab, dtype):
    """DPO's log-probs, as trl computes them (the outputs DPOTrainer asks for), forward under
    no_grad (the reference) and forward + backward (the policy), torch's fold (CPU, Apple)."""
    import torch
    from trl.kernels import ChunkedLogProbFunction

    h, c = 64, {"float32": 4, "bfloat16": 2}[dtype]
    torch_dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(positions)
    hidden = torch.randn(positions, h, generator=g).to(torch_dtype).requires_grad_()
    weight = torch.randn(vocab, h, generator=g).to(torch_dtype)
    labels = torch.randint(0, vocab, (positions,), generator=g)

    def log_probs():
        return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, FUSED_VOCAB_TILE, None, 1.0,
                                            ("log_probs", "entropy", "mean_logits", "is_top1"))[0]

    def forward_no_grad():
        with torch.no_grad():
            log_probs()

    def forward_backward():
        log_probs().sum().backward()

    shape = ModelShape(model_type="llama", hidden_size=h, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=16, intermediate_size=128, vocab_size=vocab,
                       tie_word_embeddings=False)
    predicted_fwd, predicted_bwd = fused_head_bytes(positions, shape, "cpu", c, c)
    assert predicted_fwd == pytest.approx(peak_bytes(forward_no_grad), rel=0.02)
    assert predicted_bwd == pytest.approx(peak_bytes(forward_backward), rel=0.02)
    # the projection buffer is min(n, 4096) x 32768 whatever the vocabulary: most of it here
    assert predicted_fwd > min(positions, 4096) * 32768 * c


# ---------------------------------------------------------------- a DPO step, measured


def _dpo_step(tmp_path, *, intermediate=128, micro_batch=2, length=256, checkpointing=False, continue_adapter=False,
              model_dir=None, policy_alone=True):
    """(estimate, measured peaks) of one DPO step on a tiny Llama (or the model in `model_dir`,
    in float32): the whole step, the policy's forward and backward alone, and the reference
    forward alone."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.utils import use_adapter

    if model_dir is None:
        vocab = 256
        model, shape = tiny_llama(intermediate=intermediate, vocab=vocab)
        tokenizer = word_tokenizer(vocab)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        shape = shape_from_config(json.loads((model_dir / "config.json").read_text()), "config.json")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        vocab = shape.vocab_size
    knobs = knobs_for("dpo", micro_batch, length, checkpointing)
    lora = LoraConfig(r=knobs.r, lora_alpha=knobs.lora_alpha, lora_dropout=knobs.lora_dropout,
                      target_modules=ALL_SEVEN, task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=micro_batch, max_length=length,
                     gradient_checkpointing=checkpointing, bf16=False, use_cpu=True, report_to="none",
                     disable_tqdm=True)
    rows = Dataset.from_list([{"prompt": "t5 t6", "chosen": " t7", "rejected": " t8"}] * 2)
    if continue_adapter:  # a trained adapter (non-zero B) that DPO continues: trl copies it as "ref"
        model = get_peft_model(model, lora)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02, generator=torch.Generator().manual_seed(1))
        trainer = DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    else:
        trainer = DPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer, peft_config=lora)
    policy = trainer.model
    policy.train()
    if checkpointing:  # as Trainer.train() would, before the first step
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = trainer.data_collator(pair_rows(micro_batch, length, vocab))
    est = estimate(shape, knobs, "cpu", reference_adapter=continue_adapter)
    assert tuple(batch["input_ids"].shape) == (est.sequences_per_micro_batch, length)  # 2 x micro-batch

    def step():
        trainer.compute_loss(policy, batch).backward()
        policy.zero_grad(set_to_none=True)

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model_kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                        fused_lm_head=True, use_cache=False)

    def policy_only():
        policy(**model_kwargs).log_probs.sum().backward()
        policy.zero_grad(set_to_none=True)

    def reference_only():
        with torch.no_grad(), use_adapter(policy, "ref" if continue_adapter else None):
            policy(**model_kwargs)

    step()  # the first step builds what lives on (lazy buffers): measure the second
    measured = {"step": peak_bytes(step), "reference": peak_bytes(reference_only)}
    if policy_alone:
        measured["policy"] = peak_bytes(policy_only)
    ref_params = [p for name, p in policy.named_parameters() if ".ref." in name]
    measured["ref_adapter"] = sum(p.numel() * p.element_size() for p in ref_params)
    measured["ref_adapter_trainable"] = any(p.requires_grad for p in ref_params)
    return est, measured


@pytest.mark.parametrize("intermediate, micro_batch, checkpointing",
                         [(128, 2, False), (128, 2, True), (16384, 1, False), (16384, 1, True)],
                         ids=["tiny", "tiny-checkpointing", "wide-mlp", "wide-mlp-checkpointing"])
def test_dpo_step_matches_the_estimate(tmp_path, intermediate, micro_batch, checkpointing):
    """The tiny Llama's step is bound by the fused head (its n x 32768 buffer); the wide MLP
    (i = 256 h) makes the reference forward's block larger than the fused head's backward,
    which is when the reference part is more than zero (without checkpointing)."""
    est, measured = _dpo_step(tmp_path, intermediate=intermediate, micro_batch=micro_batch,
                              checkpointing=checkpointing)
    lora_grads = est.lora_params * 4
    step = est.activations_bytes + est.logits_bytes + est.reference_bytes + lora_grads
    assert step == pytest.approx(measured["step"], rel=0.05), (step, measured)
    assert est.activations_bytes + est.logits_bytes + lora_grads == pytest.approx(measured["policy"], rel=0.05)
    assert est.details["reference_forward_peak_bytes"] == pytest.approx(measured["reference"], rel=0.03)
    if intermediate > 1024 and not checkpointing:
        assert est.reference_bytes > 0.05 * step
        assert est.reference_bytes == pytest.approx(measured["step"] - measured["policy"], rel=0.15)
    else:
        assert est.reference_bytes == 0
        assert measured["step"] == pytest.approx(measured["policy"], rel=0.01)


@pytest.mark.slow
def test_dpo_step_of_the_builtin_model_matches_the_estimate(tmp_path, builtin_model_dir):
    """SmolLM2-135M in float32 (30 blocks, 9 query and 3 key/value heads, tied embeddings, a
    49152 vocabulary: two vocabulary tiles), one pair of 128 tokens, with checkpointing as the
    CPU profile trains."""
    est, measured = _dpo_step(tmp_path, micro_batch=1, length=128, checkpointing=True, model_dir=builtin_model_dir,
                              policy_alone=False)
    assert est.tokens_per_micro_batch == 256 and est.reference_bytes == 0
    step = est.activations_bytes + est.logits_bytes + est.lora_params * 4
    assert step == pytest.approx(measured["step"], rel=0.10), (step, measured)  # measured: +7%
    assert est.details["reference_forward_peak_bytes"] == pytest.approx(measured["reference"], rel=0.05)


def test_dpo_continuing_an_adapter_keeps_a_frozen_float32_copy_as_reference(tmp_path):
    est, measured = _dpo_step(tmp_path, intermediate=16384, micro_batch=1, continue_adapter=True)
    assert measured["ref_adapter"] == est.details["reference_adapter_bytes"] == est.lora_params * 4
    assert not measured["ref_adapter_trainable"]  # no gradient, no optimizer state
    # the "ref" adapter's branch runs in the reference forward too
    assert est.details["reference_forward_peak_bytes"] == pytest.approx(measured["reference"], rel=0.03)
    step = est.activations_bytes + est.logits_bytes + est.reference_bytes - est.details["reference_adapter_bytes"]
    assert step + est.lora_params * 4 == pytest.approx(measured["step"], rel=0.05)


# ---------------------------------------------------------------- an ORPO step, measured


@pytest.mark.parametrize("vocab, checkpointing", [(4000, False), (4000, True)], ids=["plain", "checkpointing"])
def test_orpo_step_matches_the_estimate(tmp_path, vocab, checkpointing):
    from datasets import Dataset
    from peft import LoraConfig
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    micro_batch, length = 2, 256
    model, shape = tiny_llama(vocab=vocab)
    knobs = knobs_for("orpo", micro_batch, length, checkpointing)
    args = ORPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=micro_batch, max_length=length,
                      gradient_checkpointing=checkpointing, bf16=False, use_cpu=True, report_to="none",
                      disable_tqdm=True)
    lora = LoraConfig(r=knobs.r, lora_alpha=knobs.lora_alpha, lora_dropout=knobs.lora_dropout,
                      target_modules=ALL_SEVEN, task_type="CAUSAL_LM")
    trainer = ORPOTrainer(model=model, args=args, processing_class=word_tokenizer(vocab), peft_config=lora,
                          train_dataset=Dataset.from_list([{"prompt": "t5 t6", "chosen": " t7", "rejected": " t8"}] * 2))
    policy = trainer.model
    policy.train()
    if checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = []
    for r in pair_rows(micro_batch, length, vocab):  # ORPO's collator takes each side tokenized in full
        row = {"prompt_input_ids": r["prompt_ids"], "prompt_attention_mask": [1] * len(r["prompt_ids"])}
        for side in ("chosen", "rejected"):
            ids = r["prompt_ids"] + r[f"{side}_ids"]
            row.update({f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                        f"{side}_labels": [-100] * len(r["prompt_ids"]) + r[f"{side}_ids"]})
        rows.append(row)
    batch = trainer.data_collator(rows)

    def step():
        trainer.compute_loss(policy, batch).backward()
        policy.zero_grad(set_to_none=True)

    step()
    measured = peak_bytes(step)
    est = estimate(shape, knobs, "cpu")
    assert est.logits_bytes == 2 * micro_batch * length * vocab * ORPO_LOGITS_BYTES
    predicted = est.activations_bytes + est.logits_bytes + est.lora_params * 4
    assert predicted == pytest.approx(measured, rel=0.12), (predicted, measured)
    assert predicted >= measured * 0.98  # on the safe side


@pytest.mark.parametrize("dtype, bf16", [("bfloat16", True), ("float16", False)])
def test_orpo_4bit_upcast_matches_peft(tiny_llama_dir, dtype, bf16):
    """What `prepare_model_for_kbit_training` (and, training in bf16, trl's cast back of the
    embeddings and lm_head) adds to a 4-bit model, against the estimate on a CUDA card of the
    same dtype."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl.experimental.utils import peft_module_casting_to_bf16

    def parameter_bytes(model) -> int:
        storages = {}
        for t in [*model.parameters(), *model.buffers()]:
            storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return sum(storages.values())

    torch_dtype = getattr(torch, dtype)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch_dtype, quantization_config=quant)
    before = parameter_bytes(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if bf16:
        peft_module_casting_to_bf16(model)
    added = parameter_bytes(model) - before

    shape = shape_from_config(json.loads((tiny_llama_dir / "config.json").read_text()), "config.json")
    k = Knobs(load_in_4bit=True, bf16=bf16)
    facts = DeviceFacts(backend="cuda", compute_capability=(8, 0))
    predicted = (estimate(shape, k.replace(method="orpo"), facts).weights_bytes
                 - estimate(shape, k, facts).weights_bytes)
    assert predicted == added > 0


# ---------------------------------------------------------------- the plan


def _model(tmp_path, cfg):
    from localtune.models import resolve_model

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return resolve_model(str(d))


def test_dpo_plans_a_smaller_micro_batch_than_sft_where_the_estimate_says_so(tmp_path):
    """Llama-2-7B (a 32k vocabulary, so the activations, not SFT's logits, decide) on a 15.5 GB
    card with the 24 GB profile: SFT keeps 2 rows per micro-batch, DPO's 2 pairs (4 sequences)
    do not fit and step down to 1 pair, with twice the accumulation."""
    from localtune.plan import hypothetical_hardware, make_plan
    from localtune.profiles import get_profile

    model = _model(tmp_path, LLAMA_2_7B)
    hw = hypothetical_hardware("cuda", 15.5)
    prof = get_profile("cuda-24gb")
    sft = make_plan(hw, model, profile=prof)
    dpo = make_plan(hw, model, profile=prof, pinned={"method": "dpo"})
    assert sft.fits and dpo.fits
    assert sft.knobs.per_device_train_batch_size == prof.knobs.per_device_train_batch_size == 2
    assert dpo.knobs.per_device_train_batch_size == 1
    assert dpo.knobs.gradient_accumulation_steps == 2 * prof.knobs.gradient_accumulation_steps
    assert dpo.knobs.effective_batch_size == sft.knobs.effective_batch_size
    # the estimate said so: DPO at SFT's micro-batch is over the budget, SFT is not
    over = estimate(model.shape, sft.knobs.replace(method="dpo"), "cuda")
    assert over.total_bytes > dpo.budget_bytes >= sft.estimate.total_bytes
    step = [a for a in dpo.adjustments if a.knob == "per_device_train_batch_size"]
    assert step and "preference pairs" in step[0].reason
    assert sft.notes == [] and len(dpo.notes) == 1 and "a DPO row is two sequences" in dpo.notes[0]
    assert dpo.estimate.total_bytes == estimate(model.shape, dpo.knobs, "cuda").total_bytes


def test_plan_cli_with_method_dpo_shows_the_reference_part_and_why(tmp_path, capsys):
    from tests.helpers import run

    _model(tmp_path, LLAMA_2_7B)
    args = ("plan", "--backend", "cuda", "--budget", "24", "--model", str(tmp_path / "m"))
    rc, out, err = run(capsys, *args, "--set", "method=dpo")
    assert rc == 0, err
    assert "reference forward (no grad)" in out
    assert ("a DPO row is two sequences (chosen and rejected, each up to 4096 tokens; 2 rows = 4 sequences per "
            "micro-batch) plus a reference forward without gradients") in " ".join(out.split())
    rc, out, err = run(capsys, *args, "--set", "method=dpo", "--json")
    plan = json.loads(out)
    assert plan["estimate"]["method"] == "dpo" and plan["estimate"]["sequences_per_micro_batch"] == 4
    assert plan["notes"] and "reference_bytes" in plan["estimate"]
    rc, out, err = run(capsys, *args)  # sft: as before, no reference line, no note
    assert rc == 0 and "reference forward" not in out and "DPO row" not in out
    rc, out, err = run(capsys, *args, "--set", "method=orpo")
    assert rc == 0 and "reference forward" not in out and "an ORPO row is two sequences" in " ".join(out.split())
