"""A merged Hugging Face model folder -> one GGUF file for llama.cpp and Ollama, written with
the `gguf` package (llama.cpp's own Python library): no compiler, no llama.cpp checkout.

    check_gguf_support(config, where)                  -> GGUF architecture name (or UserError)
    write_gguf(model_dir, out_path, quant, ...)        -> GGUFPlan       (minutes for a 7B model)
    verify_gguf(path, plan, model_dir)                 -> dict of checks (or GGUFCheckFailed)

This is a focused converter for the architectures localtune can export, modelled on llama.cpp's
`convert_hf_to_gguf.py` (the `LlamaModel`, `Qwen2Model` and `Qwen3Model` classes there):

- llama (SmolLM2 included) and mistral are both written as GGUF architecture `llama`; their
  q_proj / k_proj weights are permuted (llama.cpp's rope pairs neighbouring dimensions,
  Hugging Face's pairs the two halves: `permute` below is `LlamaModel.permute`). qwen2 and
  qwen3 are written as `qwen2` / `qwen3` unpermuted; qwen2 keeps its q/k/v biases, qwen3 its
  per-head q_norm / k_norm.
- Tied embeddings (SmolLM2, small Qwen): no `output.weight` is written; llama.cpp then uses
  `token_embd.weight` for the output too.
- Tensor types: 1-D tensors and norms stay F32 (as the convert script does); 2-D weights take
  the chosen type. q4_0 keeps `token_embd` and `output` at Q8_0 (llama.cpp's own Q4_0 recipe
  keeps the output layer at higher precision too); a weight whose rows do not divide into
  32-value blocks falls back to F16, and the plan says so.
- The tokenizer: a byte-level BPE `tokenizer.json` (Llama 3, SmolLM2, Qwen, Mistral Nemo) is
  written as `tokenizer.ggml.model = "gpt2"` with its tokens, token types, merges and the
  pre-tokenizer name llama.cpp expects (`tokenizer.ggml.pre`). llama.cpp names pre-tokenizers by
  the sha256 of the token ids of one fixed text (`get_vocab_base_pre` in the convert script);
  `KNOWN_PRE_TOKENIZERS` holds the hashes of the families above, copied from there. A
  SentencePiece-style `tokenizer.json` (BPE with byte fallback: Llama 2, Mistral 7B) is written
  as `tokenizer.ggml.model = "llama"` through `gguf.LlamaHfVocab`. bos/eos/pad/unk ids,
  add_bos/add_eos (as the Hugging Face tokenizer actually behaves) and the chat template are
  written too.

Each tensor is converted and written on its own (the header is planned from the safetensors
headers first), so memory stays at about one tensor, not the whole model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable

from localtune.errors import UserError

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): what is happening and how far (total 0: no count)."""

SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
"""Hugging Face model_type -> GGUF architecture written."""
PERMUTED = {"llama", "mistral"}
"""model_types whose q/k weights llama.cpp wants permuted for its rope layout."""
QUANTS = ("f16", "bf16", "q8_0", "q4_0")

CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
"""The text llama.cpp's convert script tokenizes to identify a BPE pre-tokenizer."""
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo-Base-2407
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}
"""sha256 of str(tokenizer.encode(CHKTXT)) -> tokenizer.ggml.pre, from llama.cpp's
convert_hf_to_gguf.py `get_vocab_base_pre` (ggml-org/llama.cpp)."""
FALLBACK_PRE = {"llama": "llama-bpe", "mistral": "tekken", "qwen2": "qwen2", "qwen3": "qwen2"}
"""The pre-tokenizer assumed, with a note, when the hash is not in KNOWN_PRE_TOKENIZERS."""

SUPPORTED_ROPE = ("default", "linear", "yarn", "llama3")


class GGUFCheckFailed(UserError):
    """The written GGUF file did not read back as planned."""


def _gguf():
    import gguf

    return gguf


# ---------------------------------------------------------------- what can be exported


def check_gguf_support(config: dict[str, Any], where: str) -> str:
    """The GGUF architecture for a model's config.json, or a UserError naming what is supported.
    Cheap: reads the config only, so it runs before any work starts."""
    model_type = str(config.get("model_type", "unknown"))
    supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{where}: architecture '{model_type}' cannot be exported to GGUF by localtune "
                        f"(supported: {supported}); export --format merged and convert that folder with "
                        "llama.cpp's convert_hf_to_gguf.py")
    rope = _rope_parameters(config)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE:
        raise UserError(f"{where}: rope scaling '{rope_type}' is not supported by localtune's GGUF writer "
                        f"(supported: {', '.join(SUPPORTED_ROPE)}); export --format merged and convert it with "
                        "llama.cpp's convert_hf_to_gguf.py")
    return SUPPORTED_ARCHITECTURES[model_type]


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs in rope_theta +
    rope_scaling."""
    rope = dict(config.get("rope_parameters") or {})
    if "full_attention" in rope and isinstance(rope["full_attention"], dict):
        rope = dict(rope["full_attention"])
    for k, v in (config.get("rope_scaling") or {}).items():
        rope.setdefault(k, v)
    if "rope_theta" not in rope and config.get("rope_theta") is not None:
        rope["rope_theta"] = config["rope_theta"]
    return rope


# ---------------------------------------------------------------- the tensors


def permute(weights, n_head: int):
    """llama.cpp's LlamaModel.permute: within each head, interleave the two rope halves."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@dataclass
class TensorPlan:
    """One tensor of the GGUF file: where it comes from and how it is stored."""

    name: str
    """The GGUF name ('blk.0.attn_q.weight')."""
    source: str
    """The Hugging Face tensor it is made from ('model.layers.0.self_attn.q_proj.weight')."""
    shape: tuple[int, ...]
    """numpy order (rows, columns), as in the safetensors file."""
    qtype: str
    """GGML type name: F32, F16, BF16, Q8_0, Q4_0."""
    nbytes: int
    permute_heads: int = 0
    """Permute for rope with this many heads (0: not permuted)."""


@dataclass
class GGUFPlan:
    """What write_gguf wrote: the file, its architecture, tensors and tokenizer metadata."""

    path: Path
    arch: str
    quant: str
    tensors: list[TensorPlan]
    metadata: dict[str, Any] = field(default_factory=dict)
    """Key metadata written (architecture, block count, vocabulary size, special token ids,
    pre-tokenizer, chat template), for the check that reads the file back."""
    notes: list[str] = field(default_factory=list)

    @property
    def tensor_count(self) -> int:
        return len(self.tensors)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"{model_dir}: no model.safetensors (or index) to convert")


def _source_tensors(model_dir: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor name in the model's safetensors files -> (file, shape); headers only."""
    from safetensors import safe_open

    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in _safetensors_files(model_dir):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                out[name] = (f, tuple(st.get_slice(name).get_shape()))
    return out


def _block_id(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() else -1


def _tensor_order(name: str) -> tuple[int, int, str]:
    """token_embd first, then the blocks in order, then output_norm and output."""
    bid = _block_id(name)
    if name.startswith("token_embd"):
        return (0, 0, name)
    if bid >= 0:
        return (1, bid, name)
    return (2, 0 if name.startswith("rope_freqs") else 1 if name.startswith("output_norm") else 2, name)


def plan_tensors(model_dir: Path, config: dict[str, Any], quant: str) -> tuple[list[TensorPlan], list[str]]:
    """The GGUF tensors for a model folder (names, shapes, types, sizes), from the safetensors
    headers alone."""
    gguf = _gguf()
    arch_name = check_gguf_support(config, str(model_dir / "config.json"))
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    n_layers = int(config["num_hidden_layers"])
    tmap = gguf.get_tensor_name_map(arch, n_layers)
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    tied = bool(config.get("tie_word_embeddings", False))
    permuted = config.get("model_type") in PERMUTED
    Q = gguf.GGMLQuantizationType
    wanted = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    notes: list[str] = []
    plans: list[TensorPlan] = []
    for source, (_, shape) in _source_tensors(model_dir).items():
        if source.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older checkpoints saved; llama.cpp computes it
        if source == "lm_head.weight" and tied:
            continue  # tied: llama.cpp reuses token_embd for the output
        name = tmap.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"{model_dir}: tensor '{source}' has no GGUF equivalent for architecture "
                            f"'{arch_name}'; this model is not a plain {config.get('model_type')} model")
        if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
            qtype = Q.F32
        else:
            qtype = wanted
            if quant == "q4_0" and name.split(".")[0] in ("token_embd", "output"):
                qtype = Q.Q8_0
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if shape[-1] % block:
                notes.append(f"{name}: rows of {shape[-1]} values do not divide into blocks of {block}; written as F16")
                qtype = Q.F16
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(shape[:-1]) * (shape[-1] // block) * type_size
        heads = 0
        if permuted and source.endswith(("q_proj.weight", "q_proj.bias")):
            heads = n_head
        elif permuted and source.endswith(("k_proj.weight", "k_proj.bias")):
            heads = n_kv
        plans.append(TensorPlan(name=name, source=source, shape=tuple(shape), qtype=qtype.name, nbytes=nbytes,
                                permute_heads=heads))
    rope = _rope_parameters(config)
    if (rope.get("rope_type") or rope.get("type")) == "llama3":
        head_dim = int(config.get("head_dim") or config["hidden_size"] // n_head)
        plans.append(TensorPlan(name="rope_freqs.weight", source="", shape=(head_dim // 2,), qtype="F32",
                                nbytes=head_dim // 2 * 4))
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise UserError(f"{model_dir}: two tensors map to the same GGUF name; this is not a plain "
                        f"{config.get('model_type')} model")
    if not tied and "output.weight" not in names:
        raise UserError(f"{model_dir}: config.json says the embeddings are not tied, but there is no lm_head.weight")
    return sorted(plans, key=lambda p: _tensor_order(p.name)), notes


def _llama3_rope_factors(config: dict[str, Any]):
    """llama.cpp's rope_freqs tensor for rope_type 'llama3' (LlamaModel.generate_extra_tensors)."""
    import numpy as np

    rope = _rope_parameters(config)
    base = float(rope.get("rope_theta", 10000.0))
    dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def tensor_data(plan: TensorPlan, model_dir: Path, config: dict[str, Any], files: dict[str, Path],
                max_rows: int | None = None):
    """The float32 numpy values of one GGUF tensor (permuted where llama.cpp wants it); with
    `max_rows`, only the first rows of an unpermuted tensor."""
    import torch
    from safetensors import safe_open

    if plan.name == "rope_freqs.weight":
        return _llama3_rope_factors(config)
    with safe_open(files[plan.source], framework="pt") as st:
        if max_rows is not None and not plan.permute_heads and len(plan.shape) == 2:
            t = st.get_slice(plan.source)[:max_rows].to(torch.float32)
        else:
            t = st.get_tensor(plan.source).to(torch.float32)
    if plan.permute_heads:
        t = permute(t, plan.permute_heads)
    return t.numpy()


def _encode(values, qtype: str):
    import numpy as np

    gguf = _gguf()
    if qtype == "F32":
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == "F16":
        return np.ascontiguousarray(values, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), gguf.GGMLQuantizationType[qtype])


# ---------------------------------------------------------------- the tokenizer


def _is_llama_hf_vocab(model_dir: Path) -> bool:
    """A SentencePiece-style tokenizer.json (BPE with byte fallback), as Llama 2 and Mistral 7B use."""
    try:
        tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{model_dir}: no tokenizer.json; localtune's GGUF writer needs a fast "
                        "(tokenizers) tokenizer") from None
    m = tj.get("model", {})
    return m.get("type") == "BPE" and bool(m.get("byte_fallback")) and (tj.get("decoder") or {}).get("type") == "Sequence"


def pre_tokenizer_name(tokenizer: Any, model_type: str) -> tuple[str, str | None]:
    """(tokenizer.ggml.pre, a note when the hash was not recognised and a family default was used)."""
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[chkhsh], None
    guess = FALLBACK_PRE.get(model_type, "default")
    return guess, (f"the tokenizer's pre-tokenizer is not one localtune recognises (hash {chkhsh[:12]}...); "
                   f"wrote tokenizer.ggml.pre = '{guess}', the usual one for {model_type}: check the "
                   "tokenization in llama.cpp")


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def _add_tokenizer(writer, model_dir: Path, config: dict[str, Any], vocab_size: int,
                   chat_template: str | None, notes: list[str]) -> dict[str, Any]:
    """Write the tokenizer metadata; return what was written for the read-back check."""
    from transformers import AutoTokenizer

    gguf = _gguf()
    tok = AutoTokenizer.from_pretrained(model_dir)
    meta: dict[str, Any] = {}
    if _is_llama_hf_vocab(model_dir):
        vocab = gguf.LlamaHfVocab(model_dir)
        tokens, scores, types = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(toktype)
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(model_dir, n_vocab=len(tokens))
        meta.update(tokenizer_model="llama", tokenizer_pre="default")
    else:
        pre, note = pre_tokenizer_name(tok, str(config.get("model_type")))
        if note:
            notes.append(note)
        vocab = tok.get_vocab()
        if max(vocab.values()) >= vocab_size:
            raise UserError(f"{model_dir}: the tokenizer has ids up to {max(vocab.values())} but the model's "
                            f"vocabulary is {vocab_size}")
        reverse = {i: t for t, i in vocab.items()}
        added = tok.get_added_vocab()
        decoder = tok.added_tokens_decoder
        tokens, types = [], []
        for i in range(vocab_size):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
                continue
            t = reverse[i]
            if t in added:
                if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalised
                    t = tok.decode(tok.encode(t, add_special_tokens=False))
                if decoder[i].special or _looks_special(t):
                    types.append(gguf.TokenType.CONTROL)
                else:
                    t = t.replace("\u2581", " ")
                    types.append(gguf.TokenType.USER_DEFINED)
            else:
                types.append(gguf.TokenType.NORMAL)
            tokens.append(t)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
        if not special.merges:
            raise UserError(f"{model_dir}: the tokenizer has no BPE merges; localtune's GGUF writer cannot write it")
        meta.update(tokenizer_model="gpt2", tokenizer_pre=pre)
    # what the Hugging Face tokenizer really does, rather than what its config may claim
    probe = tok("a")["input_ids"]
    if tok.bos_token_id is not None:
        special.add_special_token["bos"] = bool(probe) and probe[0] == tok.bos_token_id
    if tok.eos_token_id is not None:
        special.add_special_token["eos"] = bool(probe) and probe[-1] == tok.eos_token_id and len(probe) > 1
    for typ, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id),
                     ("pad", tok.pad_token_id)):
        if tid is not None and tid < vocab_size:
            special.special_token_ids[typ] = int(tid)
    if chat_template is not None:
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)
    meta.update(vocab_size=vocab_size, special_token_ids=dict(special.special_token_ids),
                chat_template=special.chat_template, add_bos=special.add_special_token.get("bos"))
    return meta


# ---------------------------------------------------------------- writing


def _add_hparams(writer, config: dict[str, Any], arch_name: str, file_type: int, quantized: bool) -> None:
    gguf = _gguf()
    n_head = int(config["num_attention_heads"])
    writer.add_type("model")
    writer.add_block_count(int(config["num_hidden_layers"]))
    if config.get("max_position_embeddings"):
        writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    rope = _rope_parameters(config)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "linear" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    if config.get("head_dim") is not None:
        writer.add_key_length(int(config["head_dim"]))
        writer.add_value_length(int(config["head_dim"]))
    if arch_name == "llama":
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(int(config.get("head_dim") or config["hidden_size"] // n_head))
    writer.add_file_type(file_type)
    if quantized:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def write_gguf(model_dir: Path, out_path: Path, quant: str, *, name: str, chat_template: str | None = None,
               progress: Progress | None = None) -> GGUFPlan:
    """Convert the merged model in `model_dir` into `out_path` (minutes for a 7B model; 10-30 s
    for the 135M built-in on 2 busy CPU cores). The caller writes to a temporary name and renames."""
    import numpy as np

    gguf = _gguf()
    report = progress or (lambda stage, done, total: None)
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch_name = check_gguf_support(config, str(model_dir / "config.json"))
    if quant not in QUANTS:
        raise UserError(f"--quant {quant}: not one of {', '.join(QUANTS)}")
    report("planning the GGUF tensors", 0, 0)
    tensors, notes = plan_tensors(model_dir, config, quant)
    files = {k: f for k, (f, _) in _source_tensors(model_dir).items()}

    writer = gguf.GGUFWriter(str(out_path), arch_name)
    try:
        writer.add_name(name)
        _add_hparams(writer, config, arch_name, int(gguf.LlamaFileType[FILE_TYPES[quant]]), quant in ("q8_0", "q4_0"))
        meta = _add_tokenizer(writer, model_dir, config, int(config["vocab_size"]), chat_template, notes)
        meta.update(arch=arch_name, block_count=int(config["num_hidden_layers"]), name=name)
        for t in tensors:  # the header first: every tensor's name, shape, type and size
            raw = gguf.GGMLQuantizationType[t.qtype]
            if t.qtype in ("F32", "F16"):
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32 if t.qtype == "F32" else np.float16),
                                       t.nbytes, raw_dtype=raw)
            else:
                writer.add_tensor_info(t.name, gguf.quants.quant_shape_to_byte_shape(t.shape, raw), np.dtype(np.uint8),
                                       t.nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, t in enumerate(tensors):
            report("writing GGUF tensors", i, len(tensors))
            data = _encode(tensor_data(t, model_dir, config, files), t.qtype)
            if data.nbytes != t.nbytes:  # our bug: the header already promised another size
                raise RuntimeError(f"{t.name}: {data.nbytes} bytes, planned {t.nbytes}")
            writer.write_tensor_data(data)
        report("writing GGUF tensors", len(tensors), len(tensors))
    finally:
        writer.close()
    return GGUFPlan(path=Path(out_path), arch=arch_name, quant=quant, tensors=tensors, metadata=meta, notes=notes)


# ---------------------------------------------------------------- reading it back

SPOT_CHECK_RMS = {"F32": 1e-6, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 1e-2, "Q4_0": 0.2}
"""Largest relative RMS error (rms(read - source) / rms(source)) of a spot-checked tensor per
type. The rounding alone gives ~3e-4 (F16), ~2e-3 (BF16), ~4e-3 (Q8_0) and ~0.1 (Q4_0) on
SmolLM2; a tensor written unpermuted or misplaced gives ~1.4."""


SPOT_CHECK_ROWS = 4096


def verify_gguf(path: Path, plan: GGUFPlan, model_dir: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Read the file back with gguf's reader: tensor count, names, shapes and types as planned,
    the key metadata, and the values of the embeddings and the first block compared with the
    merged model's. Raises GGUFCheckFailed naming the first difference."""
    import numpy as np

    gguf = _gguf()
    reader = gguf.GGUFReader(str(path))

    def fail(what: str) -> None:
        raise GGUFCheckFailed(f"the GGUF file did not read back as written ({what}); nothing was exported")

    def field(key: str) -> Any:
        f = reader.get_field(key)
        return None if f is None else f.contents()

    if len(reader.tensors) != plan.tensor_count:
        fail(f"{len(reader.tensors)} tensors, expected {plan.tensor_count}")
    by_name = {t.name: t for t in reader.tensors}
    for t in plan.tensors:
        got = by_name.get(t.name)
        if got is None:
            fail(f"tensor {t.name} missing")
        shape = tuple(int(x) for x in reversed(list(got.shape)))
        if shape != t.shape:
            fail(f"{t.name} has shape {shape}, expected {t.shape}")
        if got.tensor_type.name != t.qtype:
            fail(f"{t.name} is {got.tensor_type.name}, expected {t.qtype}")
    m = plan.metadata
    expect = {"general.architecture": m["arch"], f"{m['arch']}.block_count": m["block_count"],
              "tokenizer.ggml.model": m["tokenizer_model"], "tokenizer.ggml.pre": m["tokenizer_pre"]}
    if m.get("chat_template") is not None:
        expect["tokenizer.chat_template"] = m["chat_template"]
    for typ, tid in m["special_token_ids"].items():
        key = {"unk": "unknown", "pad": "padding"}.get(typ, typ)
        expect[f"tokenizer.ggml.{key}_token_id"] = tid
    for key, want in expect.items():
        got = field(key)
        if got != want:
            fail(f"{key} is {str(got)[:60]!r}, expected {str(want)[:60]!r}")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != m["vocab_size"]:
        fail(f"{0 if tokens is None else len(tokens.data)} tokens, expected {m['vocab_size']}")

    files = {k: f for k, (f, _) in _source_tensors(model_dir).items()}
    worst: dict[str, float] = {}
    for t in plan.tensors:
        if not (t.name.startswith("token_embd") or _block_id(t.name) == 0):
            continue
        # at most SPOT_CHECK_ROWS rows: a 128k-token embedding would take GBs in float32
        src = tensor_data(t, model_dir, config, files, max_rows=SPOT_CHECK_ROWS)
        data = by_name[t.name].data
        rows = src.shape[0] if src.ndim == 2 else None
        got = gguf.quants.dequantize(data[:rows] if rows else data, gguf.GGMLQuantizationType[t.qtype]).reshape(src.shape)
        rms = float(np.sqrt(np.mean(np.square(src, dtype=np.float64))))
        err = float(np.sqrt(np.mean(np.square(got - src, dtype=np.float64)))) / max(rms, 1e-12)
        if err > SPOT_CHECK_RMS[t.qtype]:
            fail(f"{t.name} ({t.qtype}) differs from the merged weights by a relative RMS of {err:.3g}, "
                 f"more than the {SPOT_CHECK_RMS[t.qtype]:g} its rounding allows")
        worst[t.qtype] = max(worst.get(t.qtype, 0.0), err)
    return {"tensors": plan.tensor_count, "metadata_keys": len(reader.fields),
            "vocab_size": m["vocab_size"], "spot_check_rel_rms": {k: float(f"{v:.3g}") for k, v in worst.items()}}
