"""Training engines: what runs the forward and backward passes under the worker's lifecycle.

- `torch`: transformers + trl + peft (+ bitsandbytes for 4-bit) on CUDA, Apple's MPS or the
  CPU; the methods in localtune.methods build its trl trainers.
- `mlx`: mlx + mlx-lm (localtune.engines.mlx_sft), for Apple Silicon: MLX quantises the base to
  4 bits on Apple's GPU, where PyTorch has no 4-bit path. On Linux the same code runs on MLX's
  CPU backend (`pip install 'localtune[mlx]'` installs `mlx[cpu]`), which is how it is tested
  here; it is far slower than torch on the CPU, so it is for tests, not for training.

The `engine` knob picks one (localtune.knobs). Both write the same run directory: the same
events, status, checkpoints (written under a temporary name and renamed), the same exact
resume, and the adapter in PEFT's format, so export and chat never ask which engine trained it.

This module knows only whether an engine can run here; it imports neither torch nor mlx.
"""

from __future__ import annotations

import importlib.util
import sys

from localtune.errors import UserError

MLX_METHODS = ("sft",)
"""The training methods the MLX engine has (the preference methods are torch's alone so far)."""
MLX_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
"""The `optim` values the MLX engine honours: both are AdamW, which it runs as mlx.optimizers.AdamW."""


ENGINE_NAMES = {"torch": "torch (transformers, trl, peft)", "mlx": "mlx (Apple's MLX, mlx-lm)"}


def engine_line(engine: str, versions: dict[str, str]) -> str:
    """Which engine a run will train on, for `localtune probe` and the Machine screen, e.g.
    "mlx (Apple's MLX, mlx-lm) 0.32.4; --set engine=torch trains on PyTorch (MPS) instead"."""
    version = versions.get("mlx" if engine == "mlx" else "torch")
    text = ENGINE_NAMES.get(engine, engine)
    if version == "not installed":
        text += f", not installed: {mlx_install_hint() if engine == 'mlx' else 'pip install torch'}"
    elif version:
        text += f" {version}"
    if engine == "mlx":
        text += "; --set engine=torch trains on PyTorch (MPS) instead"
    return text


def mlx_install_hint() -> str:
    """The command that installs the MLX engine on this machine."""
    return "pip install 'localtune[mlx]'"


def mlx_available() -> bool:
    """Whether mlx and mlx-lm can be imported (looked up, not imported: importing mlx takes a while)."""
    return all(importlib.util.find_spec(name) is not None for name in ("mlx", "mlx_lm"))


def require_engine(knobs) -> None:
    """Refuse, in one line a person can act on, a run whose engine cannot run here: engine=mlx
    without mlx and mlx-lm installed, or with a method the MLX engine does not have."""
    if knobs.engine != "mlx":
        return
    if not mlx_available():
        where = "" if sys.platform == "darwin" else " (on Linux: MLX's CPU backend, for tests)"
        raise UserError(f"engine=mlx needs mlx and mlx-lm, which are not installed: {mlx_install_hint()}{where}, "
                        "or train with --set engine=torch")
    if knobs.method not in MLX_METHODS:
        raise UserError(f"engine=mlx trains {', '.join(MLX_METHODS)} only, not {knobs.method}: "
                        "train it with --set engine=torch")
    if knobs.packing:
        raise UserError("engine=mlx does not pack rows into one sequence yet: set --set packing=false, "
                        "or train with --set engine=torch")
    if knobs.optim not in MLX_OPTIMIZERS:
        raise UserError(f"engine=mlx trains with AdamW (optim={MLX_OPTIMIZERS[0]}), not optim={knobs.optim}: "
                        f"set --set optim={MLX_OPTIMIZERS[0]}, or train with --set engine=torch")
