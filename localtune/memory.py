"""Peak training memory for LoRA / QLoRA on a decoder-only model, from its shape alone.

`estimate(shape, knobs, backend)` returns a `MemoryEstimate` in bytes, split into the parts a
person can act on. No weights are loaded: the numbers come from `models.ModelShape` (hidden
size, layers, heads, kv heads, intermediate size, vocabulary, tied embeddings).

The parts and where each formula comes from:

weights
    Every parameter of the base model. Linear layers of the decoder blocks hold
    `in * out` weights (+ `out` biases for q/k/v where the model has them); embeddings `V * h`;
    lm_head another `V * h` unless tied; RMSNorms `h` each (two per block + one final).
    16-bit: 2 bytes each; float32 (the CPU, and Apple before macOS 14 or with `bf16=false`):
    4 bytes. The dtypes come from localtune.precision, which the worker and chat use too.
    4-bit (bitsandbytes `Params4bit`, NF4 or FP4): only the decoder linear weights are
    quantised; embeddings, lm_head and norms stay in the 16-bit compute dtype
    (transformers keeps lm_head out of `llm_int8_skip_modules`' reach by default).
    A quantised weight costs 0.5 byte + its block constants: one float32 absmax per 64
    weights (4/64 = 0.0625 B) or, with double quantisation, one uint8 per 64 weights plus one
    float32 per 256 such bytes (1/64 + 4/16384 = 0.0159 B), a 256-entry float32 code book and
    an offset per tensor; every tensor also keeps its 16-value float32 NF4 code book.
    (bitsandbytes `functional.quantize_4bit`, blocksize 64; QLoRA paper §2.) Counted per tensor,
    this matches the bytes of a model loaded by bitsandbytes 0.50 within 0.1%.
adapter (LoRA parameters + gradients + optimizer state)
    A LoRA pair on a linear layer of shape (in, out) adds `r * (in + out)` parameters; the
    tokens a chat template adds to a model that had none train their own rows only:
    `hidden` parameters each in the embeddings, and again in an untied lm_head. peft
    keeps adapter weights in float32 even over a 16-bit base (`autocast_adapter_dtype`), so each
    parameter costs 4 bytes, its gradient 4 bytes, and AdamW's two moments 8 bytes (32-bit),
    2 bytes + 8/256 for the block constants (bitsandbytes 8-bit blockwise, block 256), the same
    for the paged variants (paging moves state to host memory under pressure, it does not
    shrink it).
activations
    Saved tensors per token per decoder block, measured with autograd saved-tensor hooks on
    Llama-style blocks (transformers 5, peft 0.21, SDPA attention, LoRA on all seven
    projections; `benchmarks/activation_fit.py` prints the fit). In bytes per token per block:
    float32 compute:  16 h + 8 q + 8 kv + 16 i      (+32 h + 8 q + 4 i with LoRA dropout > 0)
    bfloat16 compute: 28 h + 8 q + 4 kv + 10 i      (+20 h + 4 q + 4 i with LoRA dropout > 0)
    CPU bf16 autocast over float32 weights (a CPU with AVX512-BF16 or AMX, 16-bit weights):
                      18 h + 6 q + 4 kv + 8 i       (+20 h + 4 q + 4 i with LoRA dropout > 0)
    where q = heads * head_dim and kv = kv_heads * head_dim; plus 4 bytes * r per adapted
    module (the LoRA A outputs; 2 under autocast). The bf16 figures are higher per element
    than 2/4 of the float32 ones because RMSNorm and peft upcast copies to float32. Under
    autocast each matmul also keeps the bf16 copy of its frozen weight (autocast caches only
    weights that require grad): every stored block's linear weights at 2 bytes. (4-bit on the
    CPU is counted at the float32 figures: bitsandbytes dequantises to float32 there.)
    SDPA (flash / memory-efficient) kernels keep no seq x seq attention matrix.
    With gradient checkpointing only each block's input is kept (`a * h` per token per
    block) and one block's full activations live again while it is recomputed in the
    backward pass. Plus the final norm's float32 input (4 h per token). With 4-bit weights,
    bitsandbytes dequantises one weight at a time to the compute dtype for the matmul: one
    buffer the size of the largest linear layer in 16 bits (bitsandbytes `matmul_4bit`).
    With `activation_offloading` (trl's `OffloadActivations`, CUDA) what the blocks keep for
    the backward pass (their inputs with checkpointing, everything without) lives in the CPU's
    pinned RAM instead (`details["offloaded_activation_bytes"]`); on the GPU one block's
    working set remains, as when it is recomputed. Read from trl's source, not measured: no
    CUDA device has run it here.
logits
    The loss. trl 1.16's SFTTrainer (as its DPOTrainer) never forms the tokens x vocabulary
    logits: it scores through trl's fused LM head (`add_fused_lm_head`, described under the
    preference methods below), so this part is that head's: the hidden states of the scored
    positions, a projection buffer of `min(n, 4096) x 32768` in the compute dtype whatever
    the vocabulary, the tile temporaries where torch folds the tiles (the CPU, Apple) and the
    float32 gradient of the hidden states. For Llama-3.1-8B at 4096 tokens on CUDA that is
    0.4 GB, where the full bf16 logits with the float32 log-softmax and its gradient that
    transformers' own loss keeps would be 4.9 GB. Measured on the CPU against one SFTTrainer
    step (torch's profiler, tests/test_memory.py): the activations + this part + the LoRA
    gradients within 5% of the peak, for vocabularies of 256 and 40000. Where a run trains the
    rows of added tokens, peft's TrainableTokens forms a full merged copy of the output layer
    (base rows + trained rows) and trl's fused LM head a full gradient for it: `2 * V * h` more
    bytes of the weights' dtype while the loss is computed (measured on the CPU: 2.0 x V x h x
    4 bytes, tied or untied; the merged input embeddings and their gradient come and go
    outside that peak).
preference methods (`method` dpo or orpo)
    A row is a pair: trl's collators put the chosen and the rejected sequence (prompt +
    completion, each up to `max_length`) of every row into one batch, so a micro-batch of `m`
    rows is `2 m` sequences and every per-token part above doubles. Both trainers leave
    `disable_dropout` on (trl's default), which sets every dropout, LoRA's included, to p=0:
    nothing is saved for it, so the activations are those without LoRA dropout. Their batches
    are padded to the longest sequence (trl 1.16's DPO turns padding-free off), so with SDPA
    attention every block saves its own copy of the padding mask made additive (`a * S` bytes
    per token, S = max_length) and, for grouped-query attention, the keys and values repeated to
    all query heads (`2 (q - kv) a`; transformers repeats them when a mask is given), plus one
    boolean mask for the whole model (`S` bytes per token); measured with saved-tensor hooks.
    flash-attention 2 takes the padding without a mask.
    DPO (`trl.DPOTrainer`) scores both sequences through trl's fused LM head
    (`add_fused_lm_head`, `trl/kernels/chunked_logprob.py`): no full logits, but a projection
    buffer of `min(n, 4096) x 32768` in the compute dtype whatever the vocabulary (n: the
    positions scored, `2 m (S - 1)` at most: CUDA scores only the completions), the hidden
    states it saves (`n h a`) and, in the backward, a float32 gradient for them (`4 n h`). On
    CUDA a Triton kernel folds each tile in place; on the CPU and Apple torch folds a tile of
    `min(n, 4096) x min(V, 32768)` through float32 temporaries: 3 of them and a boolean mask
    forward, 7 and a mask backward, for a float32 or a 16-bit tile alike (measured with torch's
    profiler). This is the "logits" part.
    The reference is the same model with the adapter off (or, continuing from an SFT adapter,
    a frozen copy of it named "ref": `reference_adapter=True`, its float32 parameters counted
    here), run under no_grad after the policy's forward: it stores nothing, but one decoder
    block's working set is live at a time (measured on the CPU: the MLP's `(4 h + 3 i) a + h`
    per token, or the attention's, bounded by `(4 h + 6 q + kv) a + a S`, whichever is larger)
    and then its own fused head's forward. The "reference" part is what that adds above the
    policy's own peak (the fused head's backward, and with checkpointing the block the backward
    recomputes): nothing with checkpointing, and without it only where the blocks are wide
    next to the fused head's buffer (long sequences on a large model).
    ORPO (`trl.experimental.orpo.ORPOTrainer`) has no reference but computes the full logits
    of both sequences, a cross-entropy over the chosen half and a log-softmax over all: 14 bytes
    per element of `2 m S x V` at its peak (measured on the CPU in float32; with bf16 accelerate
    returns the model's logits in float32, so the same tensors follow, and on CUDA trl's Triton
    log-softmax saves no more than torch's: read from the source, not measured). With 4-bit
    weights it calls peft's `prepare_model_for_kbit_training`, which casts every non-quantised
    parameter to float32; trl then casts the embeddings and lm_head back to bfloat16 when
    training in bf16, so the norms and biases stay float32 (and with float16 the embeddings and
    lm_head too).
overhead
    What the framework costs beyond the tensors: the CUDA context and cuBLAS workspaces
    (~0.5 GiB, not counted by `torch.cuda.max_memory_allocated`), ~0.25 GiB for Metal,
    0.75 GiB of process memory for Python + torch + transformers on the CPU (measured:
    OVERHEAD_BYTES). On the CPU a 4-bit model also keeps the full-precision checkpoint that
    bitsandbytes quantised from (cpu_4bit_load_bytes), counted here.
fragmentation
    The caching allocator rarely packs the tensors that come and go each step perfectly: 10%
    of the adapter, activation and logits parts on CUDA, 5% on Apple and the CPU. The weights
    are allocated once, at load, and do not fragment. This is the gap between
    `torch.cuda.max_memory_reserved` and `max_memory_allocated`.

FSDP (`shards` > 1: the estimate for one of that many ranks of a sharded run, FULL_SHARD)
    Each rank keeps 1/shards of every base parameter (with 4-bit weights, the packed data
    stored in the compute dtype, bitsandbytes' `bnb_4bit_quant_storage`, so that FSDP can
    flatten and shard it; their block constants stay whole on every rank: QuantState is a
    module attribute, not a parameter) and 1/shards of the adapter, its gradients and its
    optimizer state. What sharding does not divide: the activations, the logits, the runtime
    overhead (each rank is a process with its own CUDA context). What it adds, counted in the
    weights part (`details["fsdp_gathered_bytes"]`): the parameters FSDP gathers whole to
    compute with, one decoder block's twice (the block being computed and the next one,
    prefetched) and the root unit's (embeddings, lm_head, final norm), which stays gathered
    from the forward through the backward. The gathers come and go each step, so they count
    towards fragmentation. Read from torch's FSDP, peft's and bitsandbytes' documentation, not
    measured: no multi-GPU machine has run it here.

On the CPU the estimate is of live tensors. glibc's allocator keeps freed blocks below its
(adaptive, up to 32 MB) mmap threshold in the heap, so a training process's resident size can
run 1.5-2x above its live tensors; with a fixed `MALLOC_MMAP_THRESHOLD_` in the environment
large tensors go back to the system when freed (measured on SmolLM2-135M, 4 x 512 tokens,
checkpointing: 2.65 GB at 128 KB against 5.55 GB without it; the estimate says 3.0 GB). The
training worker runs with 4 MB: 128 KB halves CPU training speed (see launch.start_worker and
benchmarks/README.md).

`tokens` is micro-batch x max_length: the worst case, a batch of rows padded (or packed) to
the full length. This module knows nothing about hardware or profiles; `plan.py` decides
what to do with the number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from localtune.errors import UserError
from localtune.knobs import Knobs
from localtune.models import ModelShape
from localtune.precision import DTYPE_BYTES, DeviceFacts, precision_for

GiB = 1024**3

NF4_BLOCK = 64
"""Weights per 4-bit block (bitsandbytes default for quantize_4bit)."""
DQ_BLOCK = 256
"""Block constants per second-level block under double quantisation."""
NF4_CODE_BYTES = 16 * 4
"""Each 4-bit weight's own code book: its 16 float32 values (bitsandbytes QuantState.code)."""

OVERHEAD_BYTES = {"cuda": int(0.5 * GiB), "mps": int(0.25 * GiB), "cpu": int(0.75 * GiB)}
"""What the process holds besides the tensors. CUDA: the context and cuBLAS workspaces (not yet
measured here). The CPU: the interpreter with torch, transformers, peft and trl imported
(calibration's `runtime`, 0.55-0.76 GB on this project's machine) plus what glibc's heap keeps
of the step's small tensors (the rows of benchmarks/memory_accuracy_cpu.py whose micro-batches
hold 1024 tokens or fewer: 0.7-1.1 GB above their tensors; the longer ones 0.6-0.7 GB)."""
FRAGMENTATION_FRAC = {"cuda": 0.10, "mps": 0.05, "cpu": 0.05}

# bytes per token per block: (h, q, kv, i) coefficients, and the extra with LoRA dropout
# "autocast": float32 weights under the CPU's bfloat16 autocast (benchmarks/activation_fit.py
# --dtype autocast: the matmuls' outputs and the casts they save are bf16, the residual stream
# and the norms float32)
_ACT_COEF = {4: (16, 8, 8, 16), 2: (28, 8, 4, 10), "autocast": (18, 6, 4, 8)}
_ACT_DROPOUT_COEF = {4: (32, 8, 0, 4), 2: (20, 4, 0, 4), "autocast": (20, 4, 0, 4)}
_LORA_A_OUT_BYTES = {4: 4, 2: 4, "autocast": 2}
"""Bytes per rank per adapted module of the LoRA-A output kept for the backward: peft computes
the branch in its float32 LoRA weights' dtype, except under autocast (bf16)."""

LINEAR_ALIASES = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
"""Fused layer names (Phi-3 style) and the Llama layers they stand for."""

PART_LABELS = {
    "weights": "base weights",
    "adapter": "LoRA params + grads + optimizer",
    "activations": "activations",
    "logits": "logits + loss",
    "reference": "reference forward (no grad)",
    "overhead": "runtime overhead",
    "fragmentation": "fragmentation headroom",
}
METHOD_PARTS = {"reference": ("dpo",)}
"""Parts that only some methods have; `MemoryEstimate.parts()` lists them for those alone."""

SEQUENCES_PER_ROW = {"sft": 1, "dpo": 2, "orpo": 2}
"""Sequences one row of the data puts in a micro-batch: a preference pair is two."""

FUSED_TOKEN_TILE = 4096
"""Tokens per tile of trl's fused LM head (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE)."""
FUSED_VOCAB_TILE = 32768
"""Vocabulary columns per tile, and the width of its projection buffer whatever the vocabulary
(trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)."""
FUSED_TILE_FORWARD_BYTES = 3 * 4 + 1
"""Bytes per tile element of the torch fold's temporaries in the forward (CPU, Apple): three
float32 tiles and a boolean mask, whether the tile is float32 or 16-bit (measured)."""
FUSED_TILE_BACKWARD_BYTES = 7 * 4 + 1
"""The same in the backward: seven float32 tiles and a boolean mask."""
FUSED_SMALL_BYTES_PER_TOKEN = 12 * 4
"""The fused head's per-position float32 vectors (running max, sums, log-probs, entropy...)."""
ORPO_LOGITS_BYTES = 14
"""Bytes per element of ORPO's full logits (2 m S x V) at the loss's peak (measured)."""


@dataclass
class MemoryEstimate:
    """Peak training memory, in bytes, split into parts (see the module docstring)."""

    weights_bytes: int
    adapter_bytes: int
    activations_bytes: int
    logits_bytes: int
    overhead_bytes: int
    fragmentation_bytes: int
    lora_params: int
    """Trainable LoRA parameters (equals peft's count for the same target modules)."""
    trainable_token_params: int
    """Trainable rows of the embeddings (and lm_head) for the tokens the chat template adds."""
    base_params: int
    """Parameters of the base model."""
    tokens_per_micro_batch: int
    details: dict[str, Any] = field(default_factory=dict)
    """The inputs that decided the numbers (dtype bytes, quantised params, ...)."""
    reference_bytes: int = 0
    """DPO: what the reference forward adds above the policy's peak, and the frozen "ref"
    adapter when continuing from one. 0 for the other methods."""
    method: str = "sft"
    sequences_per_micro_batch: int = 0
    """Sequences in one forward pass: the micro-batch, twice over for a preference method."""

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.adapter_bytes + self.activations_bytes
                + self.logits_bytes + self.reference_bytes + self.overhead_bytes + self.fragmentation_bytes)

    @property
    def allocated_bytes(self) -> int:
        """The tensor parts only: what `torch.cuda.max_memory_allocated` measures."""
        return (self.weights_bytes + self.adapter_bytes + self.activations_bytes + self.logits_bytes
                + self.reference_bytes)

    def parts(self) -> list[tuple[str, int]]:
        """(part, bytes) in PART_LABELS' order, the parts of other methods left out."""
        return [(k, getattr(self, f"{k}_bytes")) for k in PART_LABELS
                if self.method in METHOD_PARTS.get(k, (self.method,))]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        return d


def _facts(device: str | DeviceFacts) -> DeviceFacts:
    return device if isinstance(device, DeviceFacts) else DeviceFacts(backend=device)


def compute_dtype_bytes(knobs: Knobs, device: str | DeviceFacts) -> int:
    """Bytes per element of what the model computes in (localtune.precision decides it, for
    the worker and chat too): float32 on the CPU (its bf16 autocast is counted as float32) and
    on Apple without bf16 (macOS before 14, or `bf16=false`), 2 bytes on CUDA and on Apple with
    bf16, 4 where 4-bit weights are dequantised to float32."""
    return precision_for(knobs, _facts(device)).compute_bytes


def resolve_targets(shape: ModelShape, target_modules: list[str]) -> list[str]:
    """The decoder-block linear layers that `target_modules` adapts, by Llama names."""
    layers = shape.linear_layers()
    if any(t == "all-linear" for t in target_modules):
        return list(layers)
    out: list[str] = []
    for t in target_modules:
        for name in LINEAR_ALIASES.get(t, (t,)):
            if name not in layers:
                raise UserError(f"target_modules: '{t}' is not a linear layer of a {shape.model_type} "
                                f"block; use some of {', '.join(layers)} or \"all-linear\"")
            if name not in out:
                out.append(name)
    return out


def lora_param_count(shape: ModelShape, knobs: Knobs) -> int:
    layers = shape.linear_layers()
    per_block = sum(knobs.r * (layers[n][0] + layers[n][1]) for n in resolve_targets(shape, knobs.target_modules))
    return per_block * shape.num_hidden_layers


MLX_GROUP_SIZE = 64
"""The MLX engine's 4-bit groups: each holds 64 weights (4 bits each) and a scale and a bias in
the model's dtype (localtune.engines.mlx_lora)."""


def weights_bytes(shape: ModelShape, *, load_in_4bit: bool, double_quant: bool, dtype_bytes: int,
                  mlx: bool = False) -> tuple[int, int, int]:
    """(bytes, base params, quantised params) of the base model's weights. `mlx`: 4-bit weights
    are MLX's (every linear layer and the embeddings, in groups of MLX_GROUP_SIZE with a scale
    and a bias each: 0.5625 bytes per parameter over a 16-bit model), not bitsandbytes' NF4."""
    h, L, V = shape.hidden_size, shape.num_hidden_layers, shape.vocab_size
    linears = shape.linear_layers()
    linear_weights_per_block = sum(i * o for i, o in linears.values())
    bias_per_block = (shape.q_dim + 2 * shape.kv_dim) if shape.attention_bias else 0
    embed = V * h * (1 if shape.tie_word_embeddings else 2)
    norms = (2 * L + 1) * h
    linear_params = linear_weights_per_block * L
    base_params = linear_params + bias_per_block * L + embed + norms
    plain = (bias_per_block * L + embed + norms) * dtype_bytes
    if not load_in_4bit:
        return plain + linear_params * dtype_bytes, base_params, 0
    if mlx:  # nn.quantize takes the embeddings (and an untied output layer) too; the norms stay
        quantised = linear_params + embed
        per_group = MLX_GROUP_SIZE // 2 + 2 * dtype_bytes
        return ((bias_per_block * L + norms) * dtype_bytes + -(-quantised // MLX_GROUP_SIZE) * per_group,
                base_params, quantised)
    constants = 0
    for i, o in linears.values():  # per tensor: each quantised weight has its own block constants
        blocks = -(-i * o // NF4_BLOCK)
        if double_quant:  # uint8 absmax per block; float32 per 256 of those; the nested code book; an offset
            per_tensor = blocks + -(-blocks // DQ_BLOCK) * 4 + 256 * 4 + 4
        else:  # float32 absmax per block
            per_tensor = blocks * 4
        constants += (per_tensor + NF4_CODE_BYTES) * L
    return plain + linear_params // 2 + constants, base_params, linear_params


def trainable_token_params(shape: ModelShape) -> int:
    """Parameters of the token rows a run trains for the tokens its chat template adds: one
    row of the embeddings per token, and one of lm_head unless it is tied to the embeddings
    (peft's `trainable_token_indices`; the rest of both matrices stays frozen)."""
    return shape.added_tokens * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)


def optimizer_bytes_per_param(optim: str) -> float:
    if "8bit" in optim:
        return 2 + 2 * 4 / 256
    return 8.0


def activation_bytes_per_token_per_block(shape: ModelShape, knobs: Knobs, a: int | str) -> float:
    """What autograd keeps per token per decoder block for LoRA training, `a` the compute
    dtype's bytes (4, 2) or "autocast" (float32 weights under the CPU's bf16 autocast)."""
    ch, cq, ckv, ci = _ACT_COEF[a]
    h, q, kv, i = shape.hidden_size, shape.q_dim, shape.kv_dim, shape.intermediate_size
    per = ch * h + cq * q + ckv * kv + ci * i
    if knobs.lora_dropout > 0:
        dh, dq, dkv, di = _ACT_DROPOUT_COEF[a]
        per += dh * h + dq * q + dkv * kv + di * i
    per += _LORA_A_OUT_BYTES[a] * knobs.r * len(resolve_targets(shape, knobs.target_modules))
    return per


def fused_head_bytes(n: int, shape: ModelShape, backend: str, c: int, weights_bytes: int) -> tuple[int, int]:
    """(forward, backward) transient bytes of trl's fused LM head scoring `n` positions with
    `c`-byte compute on `backend`, beyond the hidden states it is given: its projection buffer,
    the tile temporaries where torch folds the tiles (not CUDA's Triton kernel), a 16-bit copy of
    a float32 output-layer chunk under autocast, and in the backward the float32 gradient of the
    hidden states (cast back to the compute dtype at the end)."""
    h, V = shape.hidden_size, shape.vocab_size
    rows = min(n, FUSED_TOKEN_TILE)
    buffer = rows * FUSED_VOCAB_TILE * c
    weight_chunk = min(V, FUSED_VOCAB_TILE) * h * c if weights_bytes != c else 0
    tile = rows * min(V, FUSED_VOCAB_TILE)
    fold_fwd = tile * FUSED_TILE_FORWARD_BYTES if backend != "cuda" else 0
    fold_bwd = tile * FUSED_TILE_BACKWARD_BYTES if backend != "cuda" else 0
    small = n * FUSED_SMALL_BYTES_PER_TOKEN
    forward = buffer + weight_chunk + fold_fwd + small
    backward = buffer + weight_chunk + fold_bwd + n * h * 4 + (n * h * c if c != 4 else 0)
    return forward, backward


def cpu_4bit_load_bytes(full_precision_bytes: int, training_bytes: int) -> int:
    """What loading a model in 4 bits on the CPU adds to the peak resident size, counted in the
    overhead part. bitsandbytes quantises each weight after transformers has read the
    checkpoint in full precision: the checkpoint's pages stay mapped through training (the
    4-bit rows of benchmarks/memory_accuracy_cpu.py are 0.4-0.7 GB above the 16-bit rows' share
    of what is not the tensors, for 0.54 GB of float32 weights), and while loading, the full-
    precision copy is there too (a run of few tokens peaks there: 1.86 GB for 128 tokens of the
    built-in model, 0.43 GB of tensors in training). So: the full-precision bytes once, or twice
    less the training's own tensors when loading is the higher peak. (On a GPU the
    checkpoint is in the host's memory, not the card's.)"""
    return max(full_precision_bytes, 2 * full_precision_bytes - training_bytes)


def reference_block_bytes_per_token(shape: ModelShape, a: int, max_length: int, adapter: bool) -> int:
    """Peak bytes per token of one decoder block run under no_grad (the reference forward):
    the larger of the MLP's working set (the embeddings, the block's input, the residual, the
    normed input, and three of gate / activation / up / product at once) and the attention's
    (q, k, v, their rotated copies, k and v repeated to the query heads under a padding mask,
    the additive mask). With the "ref" adapter each projection also forms the LoRA branch's
    output before adding it. Measured on the CPU in float32 and bfloat16 (module docstring)."""
    h, i, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    mlp = (4 * h + 3 * i + (i if adapter else 0)) * a + h
    attention = (4 * h + 6 * q + kv + (q if adapter else 0)) * a + a * max_length
    return max(mlp, attention)


def fsdp_weight_parts(shape: ModelShape, knobs: Knobs, dtype_bytes: int, total_weights_bytes: int) -> tuple[int, int, int]:
    """(replicated, block, root) bytes of the base weights under FSDP: `replicated` what every
    rank keeps whole (a 4-bit weight's block constants: bitsandbytes' QuantState is an attribute
    of the module, not a parameter FSDP shards); `block` one decoder block's parameters as FSDP
    gathers them (the packed 4-bit data stored in the compute dtype, `bnb_4bit_quant_storage`, or
    the 16-bit weights, plus its biases and norms); `root` the root unit's (the embeddings, an
    untied lm_head and the final norm), which FSDP keeps gathered from the forward through the
    backward."""
    h, L, V = shape.hidden_size, shape.num_hidden_layers, shape.vocab_size
    per_block_linear = sum(i * o for i, o in shape.linear_layers().values())
    bias_per_block = (shape.q_dim + 2 * shape.kv_dim) if shape.attention_bias else 0
    small_per_block = (bias_per_block + 2 * h) * dtype_bytes
    root = (V * h * (1 if shape.tie_word_embeddings else 2) + h) * dtype_bytes
    if not knobs.load_in_4bit:
        return 0, per_block_linear * dtype_bytes + small_per_block, root
    plain = (bias_per_block * L + (2 * L + 1) * h + V * h * (1 if shape.tie_word_embeddings else 2)) * dtype_bytes
    replicated = total_weights_bytes - plain - per_block_linear * L // 2
    return replicated, per_block_linear // 2 + small_per_block, root


def estimate(shape: ModelShape, knobs: Knobs, device: str | DeviceFacts, *,
             reference_adapter: bool = False, shards: int = 1) -> MemoryEstimate:
    """Estimate peak memory for training `shape` with `knobs` on `device`: a backend name
    ('cuda', 'mps', 'cpu': today's common hardware of that kind) or the DeviceFacts of a
    probed device (its bf16 support decides 2 or 4 bytes on Apple). Pure arithmetic.

    `knobs.method` decides what a micro-batch holds and how the loss is formed (module
    docstring). `reference_adapter`: DPO continues from a trained adapter, so trl keeps a frozen
    copy of it as the reference (the planner assumes a fresh adapter: False).

    `shards`: the estimate for one of that many FSDP ranks (FULL_SHARD), 1 for a model that is
    whole on its device (one device, or each rank of data parallel). See "FSDP" in the module
    docstring for what sharding divides and what it adds."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, got {shards}")
    if shards > 1 and knobs.engine == "mlx":
        raise ValueError("FSDP shards torch models; the MLX engine trains on one device")
    facts = _facts(device)
    backend = facts.backend
    precision = precision_for(knobs, facts)
    a = precision.compute_bytes
    method = knobs.method
    preference = method in ("dpo", "orpo")
    w_bytes, base_params, quantised = weights_bytes(
        shape, load_in_4bit=knobs.load_in_4bit, double_quant=knobs.bnb_4bit_use_double_quant,
        dtype_bytes=precision.weights_bytes, mlx=knobs.engine == "mlx")
    L, h, V, S = shape.num_hidden_layers, shape.hidden_size, shape.vocab_size, knobs.max_length
    kbit_upcast = 0
    if method == "orpo" and knobs.load_in_4bit and precision.weights_bytes < 4:
        # peft's prepare_model_for_kbit_training: every non-quantised parameter to float32; trl
        # casts the embeddings and lm_head back to bf16 when training in bf16, not in fp16
        upcast = (2 * L + 1) * h + ((shape.q_dim + 2 * shape.kv_dim) * L if shape.attention_bias else 0)
        if not precision.trainer_bf16:
            upcast += V * h * (1 if shape.tie_word_embeddings else 2)
        kbit_upcast = upcast * (4 - precision.weights_bytes)
        w_bytes += kbit_upcast
    lora = lora_param_count(shape, knobs)
    tokens_trained = trainable_token_params(shape)
    # peft keeps LoRA weights and the trainable token rows in float32 over any base dtype
    adapter = int((lora + tokens_trained) * (4 + 4 + optimizer_bytes_per_param(knobs.optim)))
    fsdp: dict[str, Any] = {}
    gathered = 0
    if shards > 1:
        # FSDP FULL_SHARD: each rank keeps 1/shards of every parameter, of the adapter's
        # gradients and of its optimizer state; what is computed on is gathered whole for a while
        replicated, block, root = fsdp_weight_parts(shape, knobs, precision.weights_bytes, w_bytes - kbit_upcast)
        single_weights, single_adapter = w_bytes, adapter
        sharded = -(-(w_bytes - replicated) // shards) + replicated
        gathered = 2 * block + root  # the block computed, the next one prefetched, the root unit
        w_bytes = sharded + gathered
        adapter = -(-adapter // shards)
        fsdp = {"fsdp_shards": shards, "fsdp_sharded_weights_bytes": sharded, "fsdp_replicated_bytes": replicated,
                "fsdp_block_bytes": block, "fsdp_root_bytes": root, "fsdp_gathered_bytes": gathered,
                "fsdp_unsharded_weights_bytes": single_weights, "fsdp_unsharded_adapter_bytes": single_adapter}
    sequences = knobs.per_device_train_batch_size * SEQUENCES_PER_ROW[method]
    tokens = sequences * S
    # trl's preference trainers set every dropout to p=0 (disable_dropout, on by default)
    act_knobs = knobs.replace(lora_dropout=0.0) if preference else knobs
    # torch's CPU autocast only: MLX computes in float32 on the CPU, bitsandbytes dequantises to float32
    autocast = precision.autocast_bf16 and not knobs.load_in_4bit and knobs.engine != "mlx"
    full_block = activation_bytes_per_token_per_block(shape, act_knobs, "autocast" if autocast else a)
    stored_blocks = 1 if knobs.gradient_checkpointing else L
    mask_per_block = mask_once = 0
    if preference and precision.attn_implementation != "flash_attention_2":
        # padded batches: each stored block keeps the additive mask and, for grouped-query
        # attention, k and v repeated to every query head; one boolean mask for the model
        mask_per_block = a * S + 2 * (shape.q_dim - shape.kv_dim) * a
        mask_once = S
    padding_mask = stored_blocks * mask_per_block + mask_once
    if knobs.gradient_checkpointing:
        kept_per_token = L * a * h  # each block's input
        per_token = kept_per_token + full_block + 4 * h
    else:
        kept_per_token = L * full_block
        per_token = kept_per_token + 4 * h
    offloaded = 0
    if knobs.activation_offloading:
        # trl's OffloadActivations: every saved tensor over 1 KB goes to the CPU's pinned RAM as
        # the forward makes it (at most 5 in flight); the backward brings one block's back at a
        # time. What stays on the GPU is one block's working set, as with checkpointing.
        offloaded = int(tokens * (kept_per_token + stored_blocks * mask_per_block))
        per_token = full_block + 4 * h
        padding_mask = mask_per_block + mask_once
    activations = int(tokens * (per_token + padding_mask))
    # bitsandbytes dequantises a whole weight for each matmul; MLX's quantised matmul does not
    dequant_buffer = (max(i * o for i, o in shape.linear_layers().values()) * 2
                      if knobs.load_in_4bit and knobs.engine != "mlx" else 0)
    activations += dequant_buffer
    # the CPU's bf16 autocast casts each frozen float32 weight for its matmul, and the matmul
    # keeps the bf16 copy for the backward (autocast caches only weights that require grad):
    # every stored block's linear weights at 2 bytes
    autocast_copies = (sum(i * o for i, o in shape.linear_layers().values()) * 2 * stored_blocks
                       if autocast else 0)
    activations += autocast_copies
    # trained token rows: peft merges them into a full copy of the output layer, and its full
    # gradient is formed, while the loss is computed (measured: 2.0 x V x h x 4 bytes on the CPU)
    token_rows_transient = 2 * V * h * precision.weights_bytes if shape.added_tokens else 0
    reference = 0
    details: dict[str, Any] = {}
    if method == "dpo":
        c = DTYPE_BYTES[precision.compute_dtype]  # the fused head computes in autocast's dtype
        n = sequences * (S - 1)
        fused_fwd, fused_bwd = fused_head_bytes(n, shape, backend, c, precision.weights_bytes)
        saved_hidden = n * h * c  # the hidden states the fused head saves for its backward
        logits = saved_hidden + fused_bwd + token_rows_transient
        # the reference forward, after the policy's (its activations and saved_hidden live):
        # one block at a time, then its final hidden states, their scored copy and its fused head
        ref_blocks = tokens * reference_block_bytes_per_token(shape, a, S, reference_adapter)
        ref_head = tokens * h * c + n * h * c + fused_fwd
        ref_peak = max(ref_blocks, ref_head)
        ref_adapter = (lora + tokens_trained) * 4 if reference_adapter else 0
        # the policy's peak is its fused head's backward; with checkpointing the block the
        # backward recomputes (counted in the activations) is not live during the reference either
        recomputed = tokens * (full_block + mask_per_block) if knobs.gradient_checkpointing else 0
        reference = max(0, ref_peak - fused_bwd - recomputed) + ref_adapter
        details.update(reference_forward_peak_bytes=ref_peak, reference_adapter_bytes=ref_adapter,
                       fused_head_forward_bytes=fused_fwd, fused_head_backward_bytes=fused_bwd,
                       fused_head_saved_bytes=saved_hidden)
    elif method == "orpo":
        logits = tokens * V * ORPO_LOGITS_BYTES + token_rows_transient
    else:
        # trl 1.16's SFTTrainer scores through the same fused LM head as DPO (add_fused_lm_head):
        # no full logits; every position is scored on the CPU and Apple, the labelled ones on CUDA
        c = DTYPE_BYTES[precision.compute_dtype]
        n = sequences * (S - 1)
        fused_fwd, fused_bwd = fused_head_bytes(n, shape, backend, c, precision.weights_bytes)
        saved_hidden = n * h * c
        logits = saved_hidden + fused_bwd + token_rows_transient
        details.update(fused_head_forward_bytes=fused_fwd, fused_head_backward_bytes=fused_bwd,
                       fused_head_saved_bytes=saved_hidden)
    transient = adapter + activations + logits + reference + gathered  # FSDP's gathers come and go each step
    fragmentation = int(transient * FRAGMENTATION_FRAC[backend])
    cpu_4bit_load = 0
    if backend == "cpu" and knobs.load_in_4bit and knobs.engine != "mlx":
        cpu_4bit_load = cpu_4bit_load_bytes(base_params * precision.weights_bytes, transient + fragmentation)
    return MemoryEstimate(
        weights_bytes=w_bytes,
        adapter_bytes=adapter,
        activations_bytes=activations,
        logits_bytes=logits,
        reference_bytes=reference,
        overhead_bytes=OVERHEAD_BYTES[backend] + cpu_4bit_load,
        fragmentation_bytes=fragmentation,
        lora_params=lora,
        trainable_token_params=tokens_trained,
        base_params=base_params,
        tokens_per_micro_batch=tokens,
        method=method,
        sequences_per_micro_batch=sequences,
        details={"compute_dtype_bytes": a, "weights_dtype": precision.weights_dtype, "quantised_params": quantised,
                 "token_rows_transient_bytes": token_rows_transient,
                 "activation_bytes_per_token_per_block": full_block,
                 "dequant_buffer_bytes": dequant_buffer, "autocast_weight_copies_bytes": autocast_copies,
                 "offloaded_activation_bytes": offloaded,
                 "padding_mask_bytes_per_token": padding_mask,
                 "kbit_upcast_bytes": kbit_upcast, "cpu_4bit_load_bytes": cpu_4bit_load, **fsdp, **details},
    )
