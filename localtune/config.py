"""A run's configuration file: the [run] and [knobs] tables of a run's `config.toml` and of a
`--config` file, read and checked in one place.

Everything that reads a configuration (listing, resume, the worker, export, chat, the TUI)
goes through `load_config`, so a file edited by hand into bad TOML or a bad value is one line
that names the file, the line or the table and key, and what to give instead; never a
traceback. [knobs] keys are checked by localtune.knobs; the [run] keys are below.

This module knows nothing about run folders or workers (localtune.runs and localtune.launch
both use it, and it imports neither).
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any, Callable

from localtune.errors import UserError
from localtune.knobs import check_knob

RUN_KEYS = ("model", "data", "eval_data", "eval_split", "format", "train_on_inputs", "skip_bad_rows",
            "profile", "trust_remote_code", "sample_prompt", "sample_steps", "max_gpu_temp", "notify", "from_run")
"""Keys of the [run] table a person may set (the [knobs] table holds localtune.knobs.Knobs).
`from_run`: the id of the completed run whose adapter a dpo or orpo run goes on training."""

RUN_DIR_KEYS = ("model_sha256", "data_sha256", "from_adapter", "main_address")
"""[run] keys that only a run's own config.toml has: what launch recorded to detect a changed
model or data at resume; `main_address`, the rendezvous (HOST:PORT) of a run on several machines."""

REQUIRED_RUN_KEYS = ("model", "data")
"""[run] keys every run's config.toml has (a `--config` file may leave them to the defaults)."""

MAX_GPU_TEMP_RANGE = (40, 105)
"""Limits `--max-gpu-temp` accepts, in degrees C (GPUs throttle themselves in the 80s-90s)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_max_gpu_temp(value: Any, where: str = "--max-gpu-temp") -> float:
    """A GPU temperature limit in degrees C, or UserError naming `where`."""
    lo, hi = MAX_GPU_TEMP_RANGE
    if not _is_number(value) or not lo <= value <= hi:
        raise UserError(f"{where}: {value!r} is not a GPU temperature limit; give degrees C from {lo} to {hi}, "
                        "e.g. 83")
    return float(value)


def check_eval_split(value: Any, where: str = "--eval-split") -> float:
    """The fraction of the rows held out for evaluation: from 0 (none) up to, not including, 1."""
    if not _is_number(value) or not 0 <= value < 1:
        raise UserError(f"{where}: {value!r} is not a fraction of the rows; give a number from 0 (none) "
                        "up to but not including 1, e.g. 0.05")
    return float(value)


def _check_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: must be a string (in quotes), got {value!r}")
    return value


def _check_bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{where}: must be true or false, got {value!r}")
    return value


def _check_sample_steps(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"{where}: must be a whole number of steps, 0 or more (0: every eval_steps), got {value!r}")
    return value


RUN_CHECKS: dict[str, Callable[[Any, str], Any]] = {
    "model": _check_str, "data": _check_str, "eval_data": _check_str, "format": _check_str,
    "profile": _check_str, "sample_prompt": _check_str, "from_run": _check_str, "from_adapter": _check_str,
    "train_on_inputs": _check_bool, "skip_bad_rows": _check_bool, "trust_remote_code": _check_bool,
    "notify": _check_bool,
    "eval_split": check_eval_split, "sample_steps": _check_sample_steps, "max_gpu_temp": check_max_gpu_temp,
    "model_sha256": _check_str, "data_sha256": _check_str, "main_address": _check_str,
}
"""How each [run] value is checked (and converted); `where` names the file, table and key."""


def check_config(data: dict[str, Any], where: str, *, run_dir: bool = False) -> dict[str, dict[str, Any]]:
    """The [run] and [knobs] tables of `data`, each value checked and converted; UserError
    naming `where` (the file), the table and the key otherwise. `run_dir`: `data` is a run's
    own config.toml (it has the model and data, and the keys launch records)."""
    for table in data:
        if table not in ("run", "knobs") or not isinstance(data[table], dict):
            raise UserError(f"{where}: unknown table '{table}'; a config has [run] and [knobs]")
    allowed = RUN_KEYS + RUN_DIR_KEYS if run_dir else RUN_KEYS
    run: dict[str, Any] = {}
    for key, value in data.get("run", {}).items():
        if key not in allowed:
            raise UserError(f"{where}: [run]: unknown key '{key}'; known keys: {', '.join(RUN_KEYS)}")
        run[key] = RUN_CHECKS[key](value, f"{where}: [run] {key}")
    if run_dir:
        missing = [k for k in REQUIRED_RUN_KEYS if k not in run]
        if missing:
            raise UserError(f"{where}: [run] has no {' or '.join(missing)}; "
                            f"put back the line {missing[0]} = \"...\" (the run cannot go on without it)")
    knobs = {k: check_knob(k, v, f"{where}: [knobs]") for k, v in data.get("knobs", {}).items()}
    return {"run": run, "knobs": knobs}


def load_config(path: Path, *, run_dir: bool = False) -> dict[str, dict[str, Any]]:
    """Read and check a configuration file (see check_config). FileNotFoundError when there is
    none: the caller knows what a missing file means."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:  # its message ends with "(at line N, column M)"
        raise UserError(f"{path}: invalid TOML: {e}; correct that line") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    return check_config(data, str(path), run_dir=run_dir)
