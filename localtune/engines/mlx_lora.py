"""The MLX engine's model: a Hugging Face folder loaded with mlx-lm, its base optionally
quantised to 4 bits, frozen, with LoRA layers from mlx-lm, and the adapter moved to and from
PEFT's format.

    model = load_base(folder, knobs, dtype)         # mlx-lm's model class for config.json's model_type
    targets = add_lora(model, knobs)                # the knobs' r, lora_alpha, lora_dropout, target_modules
    seeded_blocks(model, checkpoint=knobs.gradient_checkpointing)
    save_peft_adapter(model, out, knobs, base=...)  # adapter_config.json + adapter_model.safetensors
    load_peft_adapter(model, folder)                # back into the LoRA layers (resume)

mlx-lm 0.32's LoRALinear computes `linear(x) + scale * (dropout(x) @ lora_a) @ lora_b` with
`lora_a` of shape (in, r) and `lora_b` of shape (r, out); peft's Linear computes
`base(x) + lora_B(lora_A(dropout(x))) * lora_alpha / r` with `lora_A.weight` of shape (r, in) and
`lora_B.weight` of shape (out, r). So peft's A is mlx-lm's `lora_a` transposed, its B is
`lora_b` transposed, and mlx-lm's `scale` is `lora_alpha / r` (localtune never uses rsLoRA).
The conversion is a transpose: exact, in both directions.

Names: mlx-lm names a model's modules as the Hugging Face checkpoint does (its `sanitize`
maps the few that differ), so the LoRA layer at `model.layers.0.self_attn.q_proj` is peft's
`base_model.model.model.layers.0.self_attn.q_proj`. `add_lora` checks that every adapted
layer's weight is in the folder's safetensors under that name, so an architecture whose names
differ fails at the start, not at export.

Tokens a chat template added (a base model without a template gets ChatML's two): as the torch
engine does with peft's `trainable_token_indices`, only their rows train: the embedding (and an
untied output layer) is wrapped so that those rows come from a small trainable matrix
(`add_token_rows`), started at the mean of the base's rows. They are saved under peft's names
(`<module>.token_adapter.trainable_tokens_delta`, the rows' values, not a difference) with the
indices in adapter_config.json, so peft and the export grow the base and put them in.

This module knows nothing about data, schedules or the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from localtune.errors import UserError

QUANT_BITS = 4
QUANT_GROUP_SIZE = 64
"""MLX's 4-bit base (`load_in_4bit`): 4 bits with a float scale and bias per group of 64 weights."""
PEFT_PREFIX = "base_model.model."
"""What peft puts before a module's name in the base model (PeftModel -> LoraModel -> the model)."""


def model_folder(model_path: str) -> Path:
    """The local folder of the model's files: `model_path` itself, or for a hub id its copy in
    the Hugging Face cache (fetched when online)."""
    p = Path(model_path)
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_path, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))


def load_base(folder: Path, knobs, dtype) -> Any:
    """The base model with mlx-lm's model class, its floating weights in `dtype`, quantised to
    4 bits (group size 64) when `load_in_4bit`, and frozen. Takes seconds to minutes (it reads
    every weight). No model code from the folder is ever run (mlx-lm's own classes only)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.utils import load_model

    try:
        model, _ = load_model(folder, lazy=False, trust_remote_code=False)
    except ValueError as e:  # mlx-lm: "Model type X not supported."
        raise UserError(f"{folder}: the MLX engine cannot load this model ({str(e).splitlines()[0]}); "
                        "train it with --set engine=torch") from None
    model.set_dtype(dtype)
    if knobs.load_in_4bit:
        # layers whose input is not a whole number of groups stay as they are (a tiny test model's)
        nn.quantize(model, group_size=QUANT_GROUP_SIZE, bits=QUANT_BITS,
                    class_predicate=lambda _, m: hasattr(m, "to_quantized")
                    and m.weight.shape[-1] % QUANT_GROUP_SIZE == 0)
    model.freeze()
    mx.eval(model.parameters())
    return model


def _linear_types() -> tuple[type, ...]:
    import mlx.nn as nn

    return (nn.Linear, nn.QuantizedLinear)


def lora_keys(model, target_modules: list[str]) -> list[str]:
    """The module paths inside one transformer block (`self_attn.q_proj`, ...) that get a LoRA
    layer: the linear layers whose last name is in `target_modules` (peft's suffix match), or
    every linear layer of the blocks for ["all-linear"]."""
    every = "all-linear" in target_modules
    found = []
    for key, m in model.layers[0].named_modules():
        if isinstance(m, _linear_types()) and (every or key.rsplit(".", 1)[-1] in target_modules):
            found.append(key)
    if not found:
        names = sorted({k.rsplit(".", 1)[-1] for k, m in model.layers[0].named_modules()
                        if isinstance(m, _linear_types())})
        raise UserError(f"target_modules {target_modules} names no linear layer of this model; "
                        f"its layers have {', '.join(names)}")
    return sorted(found)


def add_lora(model, knobs, *, hf_weight_names: set[str] | None = None) -> list[str]:
    """Put mlx-lm's LoRA layers on the knobs' target modules of every block (rank `r`, scale
    `lora_alpha / r` as peft's, dropout `lora_dropout`); only they train. Returns the adapted
    modules' paths. `hf_weight_names`: the folder's weight names, to check that each adapted
    layer has peft's name for it (see the module docstring)."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    keys = lora_keys(model, knobs.target_modules)
    linear_to_lora_layers(model, len(model.layers), {"rank": knobs.r, "scale": knobs.lora_alpha / knobs.r,
                                                     "dropout": knobs.lora_dropout, "keys": keys})
    adapted = sorted({k.rsplit(".", 1)[0] for k, _ in tree_flatten(model.trainable_parameters())})
    if hf_weight_names is not None:
        missing = [p for p in adapted if f"{p}.weight" not in hf_weight_names]
        if missing:
            raise UserError(f"the MLX engine names {missing[0]} differently from the model's checkpoint, so its "
                            f"adapter could not be saved in PEFT's format; train this model with --set engine=torch")
    return adapted


def seeded_blocks(model, *, checkpoint: bool) -> None:
    """Give each transformer block's forward in training its own dropout seed, drawn from MLX's
    generator when the block runs, and with `checkpoint` recompute the block in the backward
    pass instead of storing its activations (gradient checkpointing, with `mx.checkpoint`).

    The seed is what makes checkpointing right with LoRA dropout: mx.checkpoint recomputes a
    block by calling it again, and a block that draws its dropout masks from the global
    generator draws new ones then. mlx-lm 0.32's own `grad_checkpoint` does exactly that
    (measured on a tiny Llama with lora_dropout 0.3: its LoRA gradients off by 0.94 where the
    largest is 1.3); seeded per block, the gradients with and without checkpointing are
    equal to the bit. So the knob changes memory and speed, never the numbers. Costs one
    host sync per block per forward (the seed is read back to Python).

    The block's class is patched once per process (Python looks `__call__` up on the class);
    only the blocks of `model` are marked to take the seeded path, other instances behave as
    before."""
    import mlx.core as mx

    cls = type(model.layers[0])
    if not hasattr(cls, "_localtune_plain_call"):
        plain = cls.__call__

        def call(self, *args, **kwargs):
            mode = getattr(self, "_localtune_mode", None)
            if mode is None or not self.training:
                return plain(self, *args, **kwargs)
            seed = int(mx.random.randint(0, 2**31 - 1, ()).item())

            def block(params, *a, **kw):
                self.update(params)
                mx.random.seed(seed)  # the same masks when mx.checkpoint calls this again
                return plain(self, *a, **kw)

            return (mx.checkpoint(block) if mode == "checkpoint" else block)(self.trainable_parameters(), *args,
                                                                              **kwargs)

        cls._localtune_plain_call = plain
        cls.__call__ = call
    for layer in model.layers:
        layer._localtune_mode = "checkpoint" if checkpoint else "seeded"


TOKEN_ROWS_LEAF = "token_rows"
"""The trainable rows' parameter name inside a wrapped embedding or output layer."""
PEFT_TOKEN_ROWS = "token_adapter.trainable_tokens_delta"
"""peft's name for them (peft.tuners.trainable_tokens: the rows' values, put in with index_copy)."""


def _dense_rows(m, start: int, stop: int):
    """Rows start..stop of an embedding's or linear layer's weight, dequantised when MLX
    quantised it, in float32."""
    import mlx.core as mx

    w = m.weight[start:stop]
    if hasattr(m, "scales"):
        biases = m.get("biases")
        w = mx.dequantize(w, m.scales[start:stop], None if biases is None else biases[start:stop],
                          group_size=m.group_size, bits=m.bits, mode=getattr(m, "mode", "affine"))
    return w.astype(mx.float32)


def _mean_row(m, chunk: int = 8192):
    """The mean of all the rows of `m`'s weight (read a chunk at a time: an 8B model's 128k x
    4096 embedding would be 2 GB in float32 at once)."""
    import mlx.core as mx

    n = m.weight.shape[0]
    total = None
    for i in range(0, n, chunk):
        part = _dense_rows(m, i, min(n, i + chunk)).sum(axis=0)
        total = part if total is None else total + part
        mx.eval(total)
    return total / n


def _token_rows_module():
    """The wrapper class (built on first use: mlx is imported only where the engine runs)."""
    global _TokenRows
    if _TokenRows is not None:
        return _TokenRows
    import types

    import mlx.core as mx
    import mlx.nn as nn

    class TokenRows(nn.Module):
        """An embedding or output layer whose rows for `ids` come from the trainable
        `token_rows` (one row per id) and whose vocabulary is `vocab` (the tokenizer's length,
        as torch's `resize_token_embeddings` makes it): the base's rows past it are dropped, the
        ids past the base's rows are added."""

        def __init__(self, base, ids: list[int], vocab: int, rows) -> None:
            super().__init__()
            self.base = base
            self.token_rows = rows
            self._tokens = types.SimpleNamespace(ids=list(ids), vocab=vocab)  # not a parameter

        @property
        def token_ids(self) -> list[int]:
            return list(self._tokens.ids)

        def lookup(self, ids):
            """Embedding: token ids -> vectors."""
            rows = self.base.weight.shape[0]
            x = self.base(mx.where(ids < rows, ids, 0))
            for j, t in enumerate(self._tokens.ids):
                x = mx.where(mx.expand_dims(ids == t, -1), self.token_rows[j].astype(x.dtype), x)
            return x

        def logits(self, h, base_logits):
            """Output layer: the base's logits over `vocab`, the rows of `ids` from token_rows."""
            vocab, have = self._tokens.vocab, base_logits.shape[-1]
            if have > vocab:
                base_logits = base_logits[..., :vocab]
            elif have < vocab:
                base_logits = mx.concatenate(
                    [base_logits, mx.zeros((*base_logits.shape[:-1], vocab - have), dtype=base_logits.dtype)], axis=-1)
            extra = h @ self.token_rows.astype(h.dtype).T
            cols = mx.arange(vocab)
            for j, t in enumerate(self._tokens.ids):
                base_logits = mx.where(cols == t, extra[..., j:j + 1].astype(base_logits.dtype), base_logits)
            return base_logits

        def as_linear(self, h):  # a tied output layer: mlx-lm calls embed_tokens.as_linear(h)
            return self.logits(h, self.base.as_linear(h))

        def __call__(self, x):
            if getattr(self._tokens, "output", False):
                return self.logits(x, self.base(x))
            return self.lookup(x)

    _TokenRows = TokenRows
    return TokenRows


_TokenRows = None


def add_token_rows(model, tokenizer, added_tokens: list[str], *,
                   hf_weight_names: set[str] | None = None) -> dict[str, list[int]]:
    """Train the rows of the tokens a chat template added, and only them (see the module
    docstring): the embedding, and the output layer unless it is tied to it, wrapped in
    TokenRows, the new rows started at the mean of the base's. Returns peft's
    `trainable_token_indices` ({} when nothing was added)."""
    import mlx.core as mx

    if not added_tokens:
        return {}
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(added_tokens)]
    vocab = len(tokenizer)
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None) if inner is not None else None
    if embed is None:
        raise UserError("the MLX engine cannot find this model's embed_tokens to train the chat template's added "
                        "tokens; train it with --set engine=torch")
    wrap = _token_rows_module()
    targets = {"model.embed_tokens": embed}
    if "lm_head" in model:
        targets["lm_head"] = model.lm_head
    if hf_weight_names is not None:
        missing = [p for p in targets if f"{p}.weight" not in hf_weight_names]
        if missing:
            raise UserError(f"the MLX engine names {missing[0]} differently from the model's checkpoint, so the "
                            "added tokens' rows could not be saved in PEFT's format; train it with --set engine=torch")
    out = {}
    for path, m in targets.items():
        base_rows = m.weight.shape[0]
        mean = _mean_row(m)
        rows = mx.stack([_dense_rows(m, i, i + 1)[0] if i < base_rows else mean for i in ids])
        w = wrap(m, ids, vocab, rows)
        w.base.freeze()
        if path == "lm_head":
            w._tokens.output = True
            model.lm_head = w
        else:
            inner.embed_tokens = w
        out[path.rsplit(".", 1)[-1]] = ids
    mx.eval(model.trainable_parameters())
    return out


def token_indices(model) -> dict[str, list[int]]:
    """peft's `trainable_token_indices` of a model `add_token_rows` wrapped ({} otherwise)."""
    wrap = _TokenRows
    if wrap is None:
        return {}
    return {name.rsplit(".", 1)[-1]: m.token_ids for name, m in model.named_modules() if isinstance(m, wrap)}


def _peft_name(name: str) -> tuple[str, bool]:
    """peft's name for the trainable parameter `name` of the MLX model, and whether it is
    transposed there (the LoRA matrices are; token rows are not)."""
    module, leaf = name.rsplit(".", 1)
    if leaf == TOKEN_ROWS_LEAF:
        return f"{PEFT_PREFIX}{module}.{PEFT_TOKEN_ROWS}", False
    return f"{PEFT_PREFIX}{module}.{ {'lora_a': 'lora_A', 'lora_b': 'lora_B'}[leaf]}.weight", True


def checkpoint_weight_names(folder: Path) -> set[str]:
    """The weight names in the folder's safetensors files (read from their headers only)."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            names.update(st.keys())
    return names


def peft_tensors(model) -> dict[str, Any]:
    """The adapter's tensors under peft's names and in its layout, as float32 numpy arrays."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    out = {}
    for name, w in tree_flatten(model.trainable_parameters()):
        key, transposed = _peft_name(name)
        arr = np.array(w.astype(mx.float32))
        out[key] = np.ascontiguousarray(arr.T if transposed else arr)
    return out


def save_peft_adapter(model, folder: Path, knobs, *, base_model: str, adapted: list[str]) -> None:
    """adapter_config.json (peft's LoraConfig for the knobs) and adapter_model.safetensors
    (peft's names, A/B layout, float32) into `folder`, which peft's `PeftModel.from_pretrained`
    and localtune's export load as an adapter trained with torch."""
    from peft import LoraConfig
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    targets = sorted({p.rsplit(".", 1)[-1] for p in adapted})
    LoraConfig(r=knobs.r, lora_alpha=knobs.lora_alpha, lora_dropout=knobs.lora_dropout, target_modules=targets,
               task_type="CAUSAL_LM", base_model_name_or_path=base_model,
               trainable_token_indices=token_indices(model) or None).save_pretrained(str(folder))
    save_file(peft_tensors(model), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_peft_adapter(model, folder: Path) -> None:
    """The adapter in `folder` (peft's format, as save_peft_adapter writes it) into the model's
    LoRA layers. Every LoRA weight of the model must be there, with its shape."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from safetensors.numpy import load_file

    want = dict(tree_flatten(model.trainable_parameters()))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    weights = []
    for name, w in want.items():
        key, transposed = _peft_name(name)
        if key not in tensors:
            raise ValueError(f"{folder}: the adapter has no {key}")
        arr = mx.array(tensors[key].T if transposed else tensors[key]).astype(w.dtype)
        if arr.shape != w.shape:
            shape = tuple(w.shape[::-1]) if transposed else tuple(w.shape)
            raise ValueError(f"{folder}: {key} has shape {tuple(tensors[key].shape)}, the model wants {shape}")
        weights.append((name, arr))
    model.load_weights(weights, strict=False)
    mx.eval(model.trainable_parameters())
