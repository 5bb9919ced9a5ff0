"""The base model and its adapter as a run trains them, whatever the training method.

The worker's lifecycle loads the base through `load_base_model` once per attempt; every method
(localtune.methods) then wraps it in its LoRA adapter with `lora_config` and, once its trl
trainer is built, calls `settle_trainable_weights`. The helpers below each fix one thing that
the libraries get wrong for this setup; their docstrings say what and how it was measured.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any


def load_base_model(path: str, knobs, precision, device: str, trust_remote_code: bool, *, fsdp: bool = False):
    """The base model as the plan asks: 4-bit weights (QLoRA) when `load_in_4bit`, else in
    `precision.weights_dtype`; on the plan's device; flash-attention 2 where
    localtune.precision found that it runs.

    `fsdp`: a rank of a sharded run (localtune.distributed). The 4-bit weights are then stored
    in the compute dtype (`bnb_4bit_quant_storage`), so that FSDP can flatten and shard them
    with the other parameters (bitsandbytes' docs/source/fsdp_qlora.md), and no device map:
    accelerate's FSDP places the shards (fsdp_cpu_ram_efficient_loading: rank 0 reads the
    weights, the others receive theirs)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    if knobs.load_in_4bit:
        storage = {"bnb_4bit_quant_storage": precision.bnb_compute_torch_dtype()} if fsdp else {}
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=knobs.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=knobs.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=precision.bnb_compute_torch_dtype(), **storage)
    if device != "cpu" and not fsdp:
        kw["device_map"] = {"": device}
    if precision.attn_implementation:
        kw["attn_implementation"] = precision.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, dtype=precision.torch_dtype(), **kw)
    if knobs.load_in_4bit and not getattr(model, "is_loaded_in_4bit", False):
        raise RuntimeError(f"{path} did not load in 4 bits although the plan asks for it (bitsandbytes "
                           f"{importlib.metadata.version('bitsandbytes')})")
    if knobs.load_in_4bit and device == "cpu":
        keep_4bit_weights_trainable(model)
    # no KV cache in training; padding-free batches need this too: transformers finds the row
    # boundaries in position_ids only when there is no cache
    model.config.use_cache = False
    return model


def _trainable_token_indices(model, tokenizer, added_tokens: list[str]) -> dict[str, list[int]] | None:
    """peft's `trainable_token_indices` for the tokens the chat template added (a model that had
    no template gets ChatML's): only their rows of the input embeddings train, and of the
    output layer too unless it is tied to them (peft then ties the two). Training full copies
    of both matrices instead (`modules_to_save`) would add ~1 B trainable parameters to an 8B
    model with a 128k vocabulary; these rows are 2 x hidden each. None when nothing was added."""
    if not added_tokens:
        return None
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(added_tokens)]
    names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    embed, out = model.get_input_embeddings(), model.get_output_embeddings()
    targets = {names[embed]: ids}
    tied = out is None or out.weight is embed.weight
    if not tied:
        targets[names[out]] = ids
    return targets


def keep_4bit_weights_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference in the middle of training.

    bitsandbytes 0.50, on a CPU with AVX512-BF16, repacks a Linear4bit's weight into an
    inference-only layout the first time the layer runs in eval mode without gradients (a sample
    generation, an evaluation), for good; from then on its matmul bypasses autograd, so the
    gradients that should flow through the frozen base weights to the LoRA layers below are
    lost, silently (measured on a tiny Llama: the first layer's LoRA gradient off by 80% after
    one eval forward), and training goes on the slower kernel too. Returns the layers changed."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _trainable_weights_in_float32(model) -> int:
    """Keep the trained weights (LoRA, token rows) in float32 over a 4-bit base, as peft keeps
    them over any other base. trl 1.16's SFTTrainer casts them to bfloat16 for a quantised model
    (after the QLoRA paper); but a resumed run reloads them through peft's `load_adapter`, which
    casts them back to float32, so the resumed steps drifted from the uninterrupted run's (2e-3
    in the loss after 2 steps on the built-in model), and updates smaller than bfloat16 can hold
    are lost. The memory estimate counts 4 bytes for each. Returns the tensors cast."""
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def _expose_bias_of_token_wrappers(model) -> None:
    """trl's fused LM head reads `lm_head.weight` and `lm_head.bias` off the output layer. Where
    peft trains token rows of that layer (`trainable_token_indices`), the layer is a
    TrainableTokensWrapper, whose `weight` is the base weight with the trained rows merged in
    (differentiable, as the fused head needs) but which answers only `weight` of its wrapped
    layer's attributes (peft 0.21), so reading `bias` raised AttributeError. Give each wrapper
    its layer's bias (None for every model localtune knows)."""
    from peft.utils.other import TrainableTokensWrapper

    for m in model.modules():
        if isinstance(m, TrainableTokensWrapper) and "bias" not in m.__dict__:
            object.__setattr__(m, "bias", getattr(m.token_adapter.base_layer, "bias", None))


def lora_config(knobs, model, tokenizer, added_tokens: list[str]):
    """peft's LoraConfig for the run's knobs; the rows of the tokens the chat template added
    train too (`_trainable_token_indices`)."""
    from peft import LoraConfig

    targets = "all-linear" if "all-linear" in knobs.target_modules else list(knobs.target_modules)
    return LoraConfig(r=knobs.r, lora_alpha=knobs.lora_alpha, lora_dropout=knobs.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM",
                      trainable_token_indices=_trainable_token_indices(model, tokenizer, added_tokens))


def settle_trainable_weights(model, *, sharded: bool = False) -> None:
    """After a trl trainer wrapped the model: trl's fused LM head can read the token wrappers'
    bias, and the trained weights are float32 over any base (see the two helpers). `sharded`:
    a rank of an FSDP run, whose shard units flatten every parameter into one tensor of one
    dtype: the trained weights stay in the dtype trl gave them (the 4-bit storage's, bfloat16),
    as in peft's FSDP-QLoRA recipe."""
    _expose_bias_of_token_wrappers(model)
    if not sharded:
        _trainable_weights_in_float32(model)
