"""Starting runs: resolve the configuration, check the data, write the run directory and
start the worker in its own process session (it outlives the command that started it).

With no model and no data, a run trains the built-in model on the demo set with the demo
recipe below (30 optimizer steps of 8 rows at learning rate 1e-3: about two minutes on two
CPU cores, after which the model greets every question with "Ahoy!";
`benchmarks/demo_learnability.py` shows the numbers). A knob given with `--set`, `--config`
or `--max-seq-len` always wins over the recipe and the profile.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from localtune.errors import UserError
from localtune.knobs import check_knob
from localtune.runs import RunDir, create_run, new_run_id

DEMO_RECIPE: dict[str, Any] = {
    "max_steps": 30,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "linear",
    "warmup_steps": 3,
    "max_length": 128,
    "lora_dropout": 0.0,
    "save_steps": 10,
    "eval_steps": 10,
    "logging_steps": 1,
}
"""Knobs of the default demo run (the built-in model on the demo set)."""

RUN_KEYS = ("model", "data", "eval_data", "eval_split", "format", "train_on_inputs", "skip_bad_rows",
            "profile", "trust_remote_code", "sample_prompt", "sample_steps", "max_gpu_temp", "notify")
"""Keys of the [run] table of config.toml (the [knobs] table holds localtune.knobs.Knobs)."""


def read_config_file(path: str) -> dict[str, dict[str, Any]]:
    """A `--config` TOML file: the same [run] and [knobs] tables as a run's config.toml."""
    p = Path(path).expanduser()
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None
    for table in data:
        if table not in ("run", "knobs") or not isinstance(data[table], dict):
            raise UserError(f"{path}: unknown table '{table}'; a config has [run] and [knobs]")
    for key in data.get("run", {}):
        if key not in RUN_KEYS:
            raise UserError(f"{path}: [run]: unknown key '{key}'; known keys: {', '.join(RUN_KEYS)}")
    if "max_gpu_temp" in data.get("run", {}):
        check_max_gpu_temp(data["run"]["max_gpu_temp"], f"{path}: [run] max_gpu_temp")
    knobs = {k: check_knob(k, v, f"{path}: [knobs]") for k, v in data.get("knobs", {}).items()}
    return {"run": dict(data.get("run", {})), "knobs": knobs}


MAX_GPU_TEMP_RANGE = (40, 105)
"""Limits `--max-gpu-temp` accepts, in degrees C (GPUs throttle themselves in the 80s-90s)."""


def check_max_gpu_temp(value, where: str = "--max-gpu-temp") -> float:
    """A GPU temperature limit in degrees C, or UserError naming `where`."""
    lo, hi = MAX_GPU_TEMP_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise UserError(f"{where}: {value!r} is not a GPU temperature limit; give degrees C from {lo} to {hi}, "
                        "e.g. 83")
    return float(value)


def fingerprint(source: str) -> str | None:
    """sha256 of a local data file or model config (None for a hub id or a folder of data):
    resume refuses when it changed."""
    p = Path(source).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def start_worker(run: RunDir) -> subprocess.Popen:
    """Start `python -m localtune.worker RUN_DIR` in its own session, detached from this
    terminal: closing the terminal or the TUI does not stop it."""
    env = dict(os.environ)
    # glibc keeps freed blocks below its mmap threshold in the heap, and that threshold climbs
    # (up to 32 MB) as large blocks are freed, so a CPU run's resident memory would grow far past
    # its live tensors. A fixed 4 MB threshold hands every large tensor back when freed. Much
    # lower costs speed: at 128 KB every medium tensor is a fresh mmap whose pages are zeroed
    # on first touch, and a training step took twice as long (SmolLM2-135M, bf16, 1,030 tokens:
    # 5.1 s against 2.5 s; 2.7 s at 4 MB).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 << 20))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = open(run.log_path, "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "localtune.worker", str(run.path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env, cwd=str(run.path))
    finally:
        log.close()


def new_run(*, run_cfg: dict[str, Any], plan, run_id: str | None = None) -> RunDir:
    """Write the run directory for `plan` (a localtune.plan.Plan) and `run_cfg` ([run] keys)."""
    from localtune.data import resolve_source

    cfg = {"run": {**run_cfg, "model_sha256": fingerprint(plan.model.location) if plan.model.kind != "hub" else None,
                   "data_sha256": fingerprint(str(resolve_source(run_cfg["data"])))},
           "knobs": plan.knobs.to_dict()}
    return create_run(cfg, plan.to_dict(), run_id or new_run_id(plan.model.spec))


DEFAULT_RUN_CONFIG: dict[str, Any] = {
    "model": "smollm2-135m", "data": "demo", "eval_data": "", "eval_split": 0.0, "format": "",
    "train_on_inputs": False, "skip_bad_rows": False, "trust_remote_code": False, "sample_steps": 0,
    "notify": False,
}
"""The [run] table of a run nobody configured: the built-in model on the demo set."""


def default_run_config(**changes: Any) -> dict[str, Any]:
    return {**DEFAULT_RUN_CONFIG, **changes}


def prepare_run(run_cfg: dict[str, Any], plan) -> tuple[RunDir, list[str]]:
    """Check every row of the data (and the evaluation data), then write the run directory.
    Returns the run and the warnings a person should see. A bad file raises UserError here,
    before anything starts, not an hour into training."""
    from localtune.data import load_data, split_eval

    fmt = run_cfg.get("format") or None
    skip = bool(run_cfg.get("skip_bad_rows"))
    loaded = load_data(run_cfg["data"], format=fmt, skip_bad_rows=skip)
    if run_cfg.get("eval_data"):
        load_data(run_cfg["eval_data"], format=fmt, skip_bad_rows=skip)
    elif run_cfg.get("eval_split"):
        split_eval(loaded.examples, float(run_cfg["eval_split"]), plan.knobs.seed)
    run = new_run(run_cfg=run_cfg, plan=plan)
    run.write_status(rows=len(loaded.examples), skipped_rows=len(loaded.skipped))
    return run, list(loaded.warnings)


def resume_run(run: RunDir, *, force: bool = False) -> tuple[subprocess.Popen, str]:
    """Start a worker that goes on from the newest complete checkpoint; returns it and where
    it starts from, in words."""
    check_resumable(run, force=force)
    checkpoints = run.complete_checkpoints()
    proc = start_worker(run)
    return proc, (f"from {checkpoints[-1].name}" if checkpoints else "from the start (no checkpoint yet)")


def request_stop(run: RunDir) -> int:
    """Ask the run's worker to stop: it finishes the step, writes a checkpoint and exits.
    Returns its pid; UserError when no worker is alive."""
    import signal

    pid = run.live_worker_pid()
    if pid is None:
        raise UserError(f"run {run.id} has no live worker (state: {run.state()}); nothing to stop")
    os.kill(pid, signal.SIGTERM)
    return pid


def delete_run(run: RunDir) -> None:
    """Remove a run's folder (checkpoints, adapter, exports and all); refused while it trains."""
    import shutil

    pid = run.live_worker_pid()
    if pid is not None:
        raise UserError(f"run {run.id} is being trained by worker pid {pid}; stop it before deleting it")
    shutil.rmtree(run.path)


class RunInputsChanged(UserError):
    """The model or the data changed since the run began: resuming would mix two trainings.
    The CLI says to pass --force; the TUI asks whether to resume anyway."""

    def __init__(self, message: str, changes: list[str]) -> None:
        super().__init__(message)
        self.changes = changes
        """What changed, a phrase each ('the data d.jsonl changed since the run began')."""


def check_resumable(run: RunDir, force: bool = False) -> None:
    """Refuse to resume a completed run, a run with a live worker, or one whose model or data
    changed since it began (unless `force`)."""
    pid = run.live_worker_pid()
    if pid is not None:
        raise UserError(f"run {run.id} is being trained by worker pid {pid}; it needs no resume "
                        f"(`localtune stop {run.id}` stops it)")
    state = run.state()
    if state == "completed":
        raise UserError(f"run {run.id} is already completed; export it with `localtune export {run.id}`, "
                        "or start a new run")
    cfg = run.read_config()["run"]
    from localtune.data import resolve_source
    from localtune.models import resolve_model

    changed = []
    data_now = fingerprint(str(resolve_source(cfg["data"])))
    if cfg.get("data_sha256") and data_now != cfg["data_sha256"]:
        changed.append(f"the data {cfg['data']} changed since the run began")
    model = resolve_model(cfg["model"], trust_remote_code=bool(cfg.get("trust_remote_code")))
    if cfg.get("model_sha256") and model.kind != "hub" and fingerprint(model.location) != cfg["model_sha256"]:
        changed.append(f"the model {cfg['model']} changed since the run began")
    if changed and not force:
        raise RunInputsChanged(f"run {run.id}: {'; '.join(changed)}; resuming would mix two trainings: "
                               "pass --force to resume anyway", changed)
