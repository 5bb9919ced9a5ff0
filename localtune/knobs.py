"""The knobs of a run: one schema for profiles, `--set`, `config.toml` and the plan.

Every knob is named as the library that consumes it names it, so a user of transformers, trl
or peft reads them without a glossary: `r`, `lora_alpha`, `lora_dropout`, `target_modules`
(peft `LoraConfig`); `per_device_train_batch_size`, `gradient_accumulation_steps`,
`learning_rate`, `lr_scheduler_type`, `warmup_steps`, `optim`, `gradient_checkpointing`,
`max_steps`, `num_train_epochs`, `bf16`, `save_steps`, `eval_steps`, `logging_steps`, `seed`
(transformers `TrainingArguments`); `save_minutes` (localtune's own: a checkpoint by the clock,
for long steps that `save_steps` alone would leave unguarded for hours); `max_length`, `packing` (trl `SFTConfig`);
`load_in_4bit`, `bnb_4bit_quant_type`, `bnb_4bit_use_double_quant`, `bnb_4bit_compute_dtype`
(transformers `BitsAndBytesConfig`); `method` (localtune's: sft, dpo or orpo), `beta`, `loss_type`
(trl `DPOConfig` / `ORPOConfig`); `engine` (localtune's: torch or mlx, localtune.engines).

`warmup_steps` follows transformers 5: an integer is a step count, a float below 1 a
fraction of the total steps (the old `warmup_ratio` is gone there, so it is gone here).

This module knows nothing about hardware; it only says which values are well formed.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from typing import Any

from localtune.errors import UserError

OPTIMIZERS = (
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
)
"""Optimizers the memory estimate knows (transformers `OptimizerNames` values)."""

SCHEDULERS = ("linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup")
DTYPES = ("bfloat16", "float16", "float32")
QUANT_TYPES = ("nf4", "fp4")
ENGINES = ("torch", "mlx")
"""Training engines: transformers + trl + peft on torch, or mlx + mlx-lm (localtune.engines)."""
METHODS = ("sft", "dpo", "orpo")
"""Training methods: supervised fine-tuning, then the preference methods (localtune.methods)."""
METHOD_ONLY_KNOBS = {"beta": ("dpo", "orpo"), "loss_type": ("dpo",), "rpo_alpha": ("dpo",)}
"""Knobs only some methods use: the plan tables (`localtune plan`, the TUI) leave them out for the others."""
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
"""trl 1.16 DPOConfig's `loss_type` values that need nothing else (its 'sft' term is left out:
that is what `--method sft` is for)."""


def _knob(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
          choices: tuple[str, ...] | None = None) -> Any:
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Knobs:
    """Every setting of a run that a profile, `--set` or `config.toml` may give."""

    # --- the training method (trl's trainers) ---
    method: str = _knob("sft", "Training method: sft (supervised fine-tuning on answers), dpo (preference pairs "
                        "against a frozen reference) or orpo (preference pairs, no reference model).",
                        choices=METHODS)
    beta: float = _knob(0.1, "DPO: how far the policy may move from the reference (trl DPOConfig.beta); ORPO: "
                        "the weight of the odds-ratio term (trl ORPOConfig.beta). Not used by sft.",
                        lo=1e-6, hi=1e3)
    loss_type: str = _knob("sigmoid", "DPO loss (trl DPOConfig.loss_type): sigmoid is the DPO paper's. Not used by "
                           "sft or orpo.", choices=DPO_LOSS_TYPES)
    rpo_alpha: float = _knob(0.0, "DPO: weight of a negative log-likelihood term on the chosen answers (RPO; trl "
                             "1.16 adds it as loss_type 'sft' with this weight in loss_weights). It keeps the "
                             "chosen answers likely, which stops DPO from trading fluency for the margin. "
                             "0: plain DPO. Not used by sft or orpo (ORPO has its own NLL term).", lo=0.0, hi=1e3)
    # --- LoRA (peft LoraConfig) ---
    r: int = _knob(16, "LoRA rank: the width of the low-rank update.", lo=1, hi=1024)
    lora_alpha: float = _knob(32, "LoRA scale numerator; the update is scaled by lora_alpha / r.", lo=1e-6, hi=1e6)
    lora_dropout: float = _knob(0.05, "Dropout on the LoRA branch input.", lo=0.0, hi=0.9)
    target_modules: list[str] = _knob(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Linear layers that get a LoRA adapter (module names, or [\"all-linear\"]).",
    )
    # --- batch and sequence (TrainingArguments, SFTConfig) ---
    per_device_train_batch_size: int = _knob(4, "Micro-batch: sequences per forward pass.", lo=1, hi=4096)
    gradient_accumulation_steps: int = _knob(4, "Micro-batches summed before each optimizer step.", lo=1, hi=65536)
    max_length: int = _knob(2048, "Longest sequence in tokens; longer rows are truncated.", lo=16, hi=1_048_576)
    packing: bool = _knob(False, "Pack several short rows into one sequence (no padding).")
    # --- quantisation (BitsAndBytesConfig) ---
    load_in_4bit: bool = _knob(False, "Load the frozen base weights in 4 bits (QLoRA).")
    bnb_4bit_quant_type: str = _knob("nf4", "4-bit data type.", choices=QUANT_TYPES)
    bnb_4bit_use_double_quant: bool = _knob(True, "Quantise the 4-bit block constants too (saves ~0.37 bit/param).")
    bnb_4bit_compute_dtype: str = _knob("bfloat16", "dtype the 4-bit weights are dequantised to for matmuls.", choices=DTYPES)
    # --- memory and optimisation (TrainingArguments) ---
    bf16: bool = _knob(True, "Compute in bfloat16 where the hardware does it natively: CUDA GPUs with bf16, Apple "
                       "on macOS 14+, CPUs with AVX512-BF16 or AMX (autocast over float32 weights, about 2x "
                       "float32's speed). false: float32 on the CPU and Apple, float16 on CUDA.")
    gradient_checkpointing: bool = _knob(True, "Recompute each layer in the backward pass instead of storing its activations.")
    activation_offloading: bool = _knob(False, "Keep the activations saved for the backward pass in the CPU's RAM "
                                        "instead of the GPU's, moving them over PCIe as the forward and backward "
                                        "passes go (trl's activation_offloading; CUDA only, sft and dpo): "
                                        "longer sequences fit, each step moves them there and back.")
    optim: str = _knob("adamw_torch", "Optimizer (transformers name).", choices=OPTIMIZERS)
    learning_rate: float = _knob(2e-4, "Peak learning rate.", lo=1e-9, hi=1.0)
    lr_scheduler_type: str = _knob("cosine", "Learning-rate schedule.", choices=SCHEDULERS)
    warmup_steps: float = _knob(0.03, "Warmup: an int is steps, a float below 1 a fraction of all steps.", lo=0, hi=1e9)
    # --- length of the run and bookkeeping (TrainingArguments) ---
    num_train_epochs: float = _knob(1.0, "Passes over the training data (ignored when max_steps > 0).", lo=1e-6, hi=1e6)
    max_steps: int = _knob(-1, "Optimizer steps to run; -1 means run num_train_epochs.", lo=-1, hi=1e12)
    save_steps: int = _knob(50, "Write a checkpoint every N optimizer steps.", lo=1, hi=1e12)
    save_minutes: float = _knob(30.0, "Also write a checkpoint when this many minutes passed since the last one "
                                "(0: by steps only).", lo=0, hi=1e9)
    save_total_limit: int = _knob(3, "Keep only the newest N checkpoints.", lo=1, hi=1e6)
    eval_steps: int = _knob(50, "Evaluate every N optimizer steps.", lo=1, hi=1e12)
    logging_steps: int = _knob(1, "Report loss every N optimizer steps.", lo=1, hi=1e12)
    seed: int = _knob(42, "Seed for data order, dropout and LoRA initialisation.", lo=0, hi=2**32 - 1)
    # --- calibration (localtune.calibrate) ---
    calibrate: bool = _knob(True, "Before step 1 of a new run, measure the peak memory of a training step at the planned "
                            "micro-batch and max_length on this device (a separate process, thrown away), and "
                            "step the knobs down when it is over the budget. Costs a second model load.")
    auto_batch: bool = _knob(False, "When calibration measures far under the budget, take the largest micro-batch "
                             "that fits (the accumulation shrinks with it: the effective batch stays).")
    # --- the engine (localtune.engines) ---
    engine: str = _knob("torch", "Training engine: torch (transformers, trl, peft; CUDA, Apple MPS or the CPU) or "
                        "mlx (mlx and mlx-lm: Apple Silicon's GPU, 4-bit on a Mac; on Linux the CPU backend "
                        "of `mlx[cpu]`). mlx trains sft only; install it with `pip install 'localtune[mlx]'`.",
                        choices=ENGINES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Knobs:
        return dataclasses.replace(self, **changes)

    @property
    def effective_batch_size(self) -> int:
        """Sequences per optimizer step; the planner never changes it."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps


def halve_micro_batch(knobs: Knobs) -> Knobs | None:
    """The knobs with the micro-batch about halved and the accumulation grown by the same
    factor, so that the effective batch (micro-batch x accumulation) is exactly what it was:
    the micro-batch goes to its largest divisor at most half of it (8 -> 4, 6 -> 3, 5 -> 1,
    12 -> 6) and the accumulation is multiplied by the quotient (5 x 3 -> 1 x 15). None at a
    micro-batch of 1. The planner and the out-of-memory back-off both step down with this."""
    mb = knobs.per_device_train_batch_size
    if mb <= 1:
        return None
    new_mb = max(d for d in range(1, mb // 2 + 1) if mb % d == 0)
    return knobs.replace(per_device_train_batch_size=new_mb,
                         gradient_accumulation_steps=knobs.gradient_accumulation_steps * (mb // new_mb))


KNOB_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Knobs)}

HARDWARE_KNOBS = (
    "r", "lora_alpha", "lora_dropout", "target_modules",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "packing",
    "load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
    "gradient_checkpointing", "optim", "learning_rate", "lr_scheduler_type", "warmup_steps",
)
"""The knobs every profile must set: the ones that depend on the machine."""


def _type_name(f: dataclasses.Field) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false",
            "str": "a string", "list[str]": "a list of strings"}[str(f.type)]


def check_knob(key: str, value: Any, where: str) -> Any:
    """Return `value` converted to the knob's type, or raise UserError naming `where` and `key`."""
    f = KNOB_FIELDS.get(key)
    if f is None:
        close = [k for k in KNOB_FIELDS if key.lower() in k or k in key.lower()]
        hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
        raise UserError(f"{where}: unknown key '{key}'{hint}. Known keys: {', '.join(KNOB_FIELDS)}")
    t = str(f.type)
    bad = UserError(f"{where}: '{key}' must be {_type_name(f)}, got {value!r}")
    if t == "bool":
        if not isinstance(value, bool):
            raise bad
    elif t == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise bad
    elif t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        value = float(value)
        if key == "warmup_steps" and value >= 1 and value.is_integer():
            value = int(value)  # a whole number of steps, as transformers reads it
    elif t == "str":
        if not isinstance(value, str):
            raise bad
    elif t == "list[str]":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise UserError(f"{where}: '{key}' must be a non-empty list of module names, got {value!r}")
    lo, hi, choices = f.metadata["lo"], f.metadata["hi"], f.metadata["choices"]
    if choices is not None and value not in choices:
        raise UserError(f"{where}: '{key}' must be one of {', '.join(choices)}; got {value!r}")
    if lo is not None and value < lo:
        raise UserError(f"{where}: '{key}' must be at least {lo:g}, got {value!r}")
    if hi is not None and value > hi:
        raise UserError(f"{where}: '{key}' must be at most {hi:g}, got {value!r}")
    return value


def knobs_from_mapping(values: dict[str, Any], where: str, base: Knobs | None = None) -> Knobs:
    """Check every key of `values` and lay them over `base` (the defaults when None)."""
    checked = {k: check_knob(k, v, where) for k, v in values.items()}
    return dataclasses.replace(base or Knobs(), **checked)


def parse_set_options(items: list[str]) -> dict[str, Any]:
    """Parse `--set key=value` options. The value is read as TOML (`16`, `true`, `["q_proj"]`,
    `2e-4`), and as a plain string when it is not TOML (`optim=paged_adamw_8bit`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value, for example --set r=8")
        raw = raw.strip()
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out[key] = check_knob(key, value, f"--set {key}")
    return out
