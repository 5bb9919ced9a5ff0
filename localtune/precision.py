"""What a run computes in, decided in one place for the worker, chat and the memory estimate.

    facts = DeviceFacts.from_hardware(hw, device)    # from the probe (the planner), or
    facts = DeviceFacts.live("cuda", 1)               # from torch, in the process that trains
    p = precision_for(knobs, facts)
    p.weights_dtype   -> "bfloat16"     what the base loads in (the non-quantised parts, with 4-bit)
    p.bnb_compute     -> "bfloat16"     what 4-bit weights are dequantised to for the matmuls
    p.trainer_bf16 / p.trainer_fp16     transformers' TrainingArguments switches
    p.attn_implementation -> "flash_attention_2" or None (transformers' default, sdpa)

The rules, each from the library that has to run it:

- bf16 only where the device computes it. torch's `torch.cuda.is_bf16_supported()` says yes
  on a T4 or an RTX 20xx too (`including_emulation=True` is its default: bf16 tensors can be
  made there, and matmuls run through slow emulation, or fail in some kernels), so the test is
  compute capability 8.0 or newer (Ampere: RTX 30xx, A100, and later), as
  `is_bf16_supported(including_emulation=False)` does. Apple: bf16 on MPS needs macOS 14
  (torch.backends.mps.is_macos_or_newer(14, 0)). CPU: bf16 is an autocast over float32 weights
  where the CPU computes it natively (AVX512-BF16 or AMX), since emulated bf16 is slower than
  float32.
- CUDA without bf16 (or with the `bf16` knob off) trains in float16 with the gradient scaler
  (TrainingArguments fp16); peft keeps the LoRA weights in float32, so the scaler never
  unscales 16-bit gradients. Apple without bf16: float32 (MPS has no gradient scaler path in
  the Trainer worth trusting), which the estimate counts at 4 bytes.
- QLoRA's compute dtype follows the card: whatever `bnb_4bit_compute_dtype` says, 4-bit weights
  are dequantised to the dtype the rest of the model computes in (bf16 where the card has it,
  fp16 on a T4), so the matmul's two sides agree. Only `float32` is kept as asked: it is the
  slow, exact choice and runs everywhere. On the CPU bitsandbytes computes in float32.
- flash-attention 2 only on CUDA with compute capability 8.0 or newer (its kernels need Ampere),
  a 16-bit compute dtype (it has no float32 kernel), and the `flash_attn` package installed.
  Padding-free batches on CUDA depend on it (see worker._padding_free).

This module imports torch only inside `DeviceFacts.live`: the planner and the TUI stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FLASH_ATTENTION_MIN_CAPABILITY = (8, 0)
"""flash-attn 2's kernels need Ampere or newer (its README: 'Ampere, Ada, or Hopper GPUs')."""
BF16_MIN_CAPABILITY = (8, 0)
"""bf16 tensor cores: Ampere or newer. Older cards only emulate bf16."""
MACOS_BF16 = (14, 0)
"""MPS computes bfloat16 from macOS 14 (Sonoma)."""

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _version_tuple(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(p) for p in str(text).split(".")[:2])
    except ValueError:
        return None


@dataclass(frozen=True)
class DeviceFacts:
    """What the precision rules need to know about the training device. Built from the probe
    (`from_hardware`), from torch in the training process (`live`), or by hand in tests."""

    backend: str
    """'cuda', 'mps' or 'cpu'."""
    compute_capability: tuple[int, int] | None = None
    """CUDA only: (major, minor); None where unknown (a planned, hypothetical card)."""
    macos_version: tuple[int, ...] | None = None
    """Apple only: (major, minor) of macOS; None where unknown."""
    cpu_bf16: bool = False
    """CPU only: the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16)."""
    flash_attn_installed: bool = False
    """The `flash_attn` package is importable (flash-attention 2)."""

    @property
    def bf16_native(self) -> bool:
        """Whether this device computes bfloat16 itself. Unknown facts (a planned machine)
        count as the common case of today's hardware: yes on CUDA and Apple."""
        if self.backend == "cuda":
            return self.compute_capability is None or tuple(self.compute_capability) >= BF16_MIN_CAPABILITY
        if self.backend == "mps":
            return self.macos_version is None or tuple(self.macos_version) >= MACOS_BF16
        return self.cpu_bf16

    @classmethod
    def from_hardware(cls, hw: Any, device: Any = None) -> DeviceFacts:
        """The facts the probe recorded for `device` (default: the primary device of `hw`, a
        localtune.hardware.Hardware). Used by the planner, before anything is loaded."""
        import importlib.util

        from localtune.hardware import cpu_has_native_bf16

        d = device if device is not None else hw.primary
        cc = _version_tuple(getattr(d, "compute_capability", None)) if hw.backend == "cuda" else None
        return cls(backend=hw.backend,
                   compute_capability=cc if cc is None or len(cc) == 2 else None,  # type: ignore[arg-type]
                   macos_version=_version_tuple(getattr(hw, "macos_version", None)) if hw.backend == "mps" else None,
                   cpu_bf16=cpu_has_native_bf16() if hw.backend == "cpu" else False,
                   flash_attn_installed=hw.backend == "cuda" and importlib.util.find_spec("flash_attn") is not None)

    @classmethod
    def live(cls, backend: str, cuda_index: int | None = None) -> DeviceFacts:
        """The facts read from torch in the process that trains or chats: the CUDA device's
        own capability (not device 0's), the running macOS."""
        import importlib.util

        import torch

        from localtune.hardware import cpu_has_native_bf16

        if backend == "cuda":
            index = torch.cuda.current_device() if cuda_index is None else cuda_index
            major, minor = torch.cuda.get_device_capability(index)
            return cls(backend="cuda", compute_capability=(int(major), int(minor)),
                       flash_attn_installed=importlib.util.find_spec("flash_attn") is not None)
        if backend == "mps":
            return cls(backend="mps", macos_version=(14, 0) if torch.backends.mps.is_macos_or_newer(14, 0) else (13, 0))
        return cls(backend="cpu", cpu_bf16=cpu_has_native_bf16())


@dataclass(frozen=True)
class Precision:
    """The dtypes of one run on one device (see the module docstring for the rules)."""

    weights_dtype: str
    """What the base model's (non-quantised) weights load in: 'float32', 'bfloat16', 'float16'."""
    compute_dtype: str
    """What activations are in: the weights' dtype, or bfloat16 under the CPU's autocast,
    or float32 where 4-bit weights are dequantised to float32."""
    autocast_bf16: bool
    """CPU only: bf16 autocast over float32 weights."""
    bnb_compute: str
    """What 4-bit weights are dequantised to for the matmuls (BitsAndBytesConfig)."""
    quant_type: str | None
    """'nf4' or 'fp4' where the base loads in 4 bits (QLoRA), else None."""
    trainer_bf16: bool
    """TrainingArguments(bf16=...)."""
    trainer_fp16: bool
    """TrainingArguments(fp16=...): float16 with the gradient scaler."""
    attn_implementation: str | None
    """'flash_attention_2' where it runs; None for transformers' default (sdpa)."""

    @property
    def weights_bytes(self) -> int:
        """Bytes per parameter of the non-quantised weights."""
        return DTYPE_BYTES[self.weights_dtype]

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of the activations, as the memory estimate counts them. The CPU's
        autocast is counted at float32's 4 bytes: the estimate's activation fit was measured
        in float32 there, and autocast keeps many saved tensors in float32 (norms, residuals)."""
        if self.autocast_bf16:
            return 4
        return DTYPE_BYTES[self.compute_dtype]

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.weights_dtype)

    def bnb_compute_torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.bnb_compute)

    def describe(self) -> str:
        """In words, for the `started` event and the dashboard: 'bfloat16', 'float16',
        'bfloat16 autocast', 'nf4 weights, float16 compute'."""
        what = "bfloat16 autocast" if self.autocast_bf16 else self.compute_dtype
        return f"{self.quant_type} weights, {what} compute" if self.quant_type else what


def precision_for(knobs: Any, facts: DeviceFacts) -> Precision:
    """The dtypes for training `knobs` (a localtune.knobs.Knobs) on the device `facts` describe."""
    backend = facts.backend
    bf16 = bool(knobs.bf16) and facts.bf16_native
    if backend == "cuda":
        weights = "bfloat16" if bf16 else "float16"
    elif backend == "mps":
        weights = "bfloat16" if bf16 else "float32"
    else:
        weights = "float32"
    autocast = backend == "cpu" and bf16
    if not knobs.load_in_4bit:
        bnb = weights if backend != "cpu" else "float32"
    elif backend == "cpu" or knobs.bnb_4bit_compute_dtype == "float32":
        bnb = "float32"
    else:
        bnb = weights  # the card's 16-bit dtype, whatever the knob said (see the module docstring)
    compute = "bfloat16" if autocast else (bnb if knobs.load_in_4bit else weights)
    attn = None
    if (backend == "cuda" and facts.flash_attn_installed and compute in ("bfloat16", "float16")
            and facts.compute_capability is not None
            and tuple(facts.compute_capability) >= FLASH_ATTENTION_MIN_CAPABILITY):
        attn = "flash_attention_2"
    return Precision(
        weights_dtype=weights, compute_dtype=compute, autocast_bf16=autocast, bnb_compute=bnb,
        quant_type=knobs.bnb_4bit_quant_type if knobs.load_in_4bit else None,
        trainer_bf16=(backend != "cpu" and weights == "bfloat16") or autocast,
        trainer_fp16=backend == "cuda" and weights == "float16",
        attn_implementation=attn,
    )
