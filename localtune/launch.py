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
import time
from pathlib import Path
from typing import Any

from localtune.config import load_config
from localtune.errors import UserError
from localtune.runs import LOCK_FD_ENV, RunDir, RunLock, create_run, new_run_id

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
    "calibrate": False,  # 8 x 128 tokens: measured (benchmarks/README.md), far inside any budget
}

PREFERENCE_DEMO_RECIPE: dict[str, Any] = {
    "max_steps": 12,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "learning_rate": 5e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 1,
    "max_length": 256,
    "lora_dropout": 0.0,
    "save_steps": 6,
    "eval_steps": 6,
    "logging_steps": 1,
    "calibrate": False,  # short pairs, measured: far inside any budget
}
"""What `localtune train --method dpo` (or orpo) runs on the preference demo set (localtune.demo).
The demo recipes skip calibration: their memory is known and small, and it would add a minute."""

SFT_THEN_DPO_DEMO_RECIPE: dict[str, Any] = {**PREFERENCE_DEMO_RECIPE, "rpo_alpha": 1.0}
"""What `--method dpo --from RUN` runs when RUN is the SFT demo (the pairs in its voice): the
preference demo's recipe plus the chosen answers' NLL at weight 1 (RPO). Measured on the SFT demo
run (benchmarks/README.md): without it both traits showed on 6 of 10 held-out answers and the
opener doubled ("Ahoy! Ahoy! In short: ..."); with it 10 of 10."""



def with_method_defaults(run_cfg: dict[str, Any], pinned: dict[str, Any], *,
                         from_data: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's [run] table and pinned knobs once the method has its say: with the demo data,
    the demo of the method (SFT: the demo set and DEMO_RECIPE; DPO and ORPO: the preference
    pairs, their held-out pairs for evaluation unless other evaluation data is given, and
    PREFERENCE_DEMO_RECIPE). What the user pinned wins.

    `from_data` is the data of the run a preference run continues (`--from`). When that run
    was the SFT demo, the pairs default to the same pairs in its voice (`demo-preference-parrot`:
    both answers open with "Ahoy! " and sign off, as that model answers): preference pairs are
    made from the model being tuned, and pairs in another voice would teach DPO to drop the
    opener along with preferring the label (measured: benchmarks/README.md)."""
    from localtune.data import (DEMO, DEMO_PREFERENCE, DEMO_PREFERENCE_EVAL, DEMO_PREFERENCE_PARROT,
                                DEMO_PREFERENCE_PARROT_EVAL)

    method = pinned.get("method", "sft")
    run_cfg = dict(run_cfg)
    if method == "sft":
        if run_cfg.get("data") == DEMO:
            return run_cfg, {**DEMO_RECIPE, **pinned}
        return run_cfg, dict(pinned)
    parrot = run_cfg.get("data") == DEMO and from_data == DEMO
    if run_cfg.get("data") in (DEMO, DEMO_PREFERENCE, DEMO_PREFERENCE_PARROT):
        if parrot:
            run_cfg["data"] = DEMO_PREFERENCE_PARROT
        elif run_cfg["data"] == DEMO:
            run_cfg["data"] = DEMO_PREFERENCE
        if not run_cfg.get("eval_data") and not run_cfg.get("eval_split"):
            run_cfg["eval_data"] = (DEMO_PREFERENCE_PARROT_EVAL if run_cfg["data"] == DEMO_PREFERENCE_PARROT
                                    else DEMO_PREFERENCE_EVAL)
        recipe = SFT_THEN_DPO_DEMO_RECIPE if parrot and method == "dpo" else PREFERENCE_DEMO_RECIPE
        return run_cfg, {**recipe, **pinned}
    return run_cfg, dict(pinned)
"""Knobs of the default demo run (the built-in model on the demo set)."""


def read_config_file(path: str) -> dict[str, dict[str, Any]]:
    """A `--config` TOML file: the same [run] and [knobs] tables as a run's config.toml."""
    try:
        return load_config(Path(path).expanduser())
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None


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


LORA_KNOBS = ("r", "lora_alpha", "lora_dropout", "target_modules")
"""The adapter's shape: a run that continues another run's adapter trains that adapter, so it
takes these from that run (the plan and the estimate then count the adapter it trains)."""


def continue_from(spec: str, model) -> tuple[RunDir, dict[str, Any]]:
    """The finished run whose adapter a preference run (`--from RUN`) continues, and the knobs
    it pins (LORA_KNOBS, that run's values). Refused in one line: a run that did not finish or
    has no adapter, a run of another base model."""
    from localtune.runs import find_run

    src = find_run(spec)
    state = src.state()
    adapter = src.adapter_dir
    if state != "completed" or not (adapter / "adapter_config.json").is_file():
        why = f"it is {state}" if state != "completed" else f"its adapter folder {adapter} is missing"
        raise UserError(f"--from {spec}: run {src.id} has no finished adapter to continue ({why}); "
                        f"continue from a completed run (`localtune runs` lists them)")
    cfg = src.read_config()
    theirs, ours = cfg["run"].get("model"), model.spec
    same = theirs == ours
    if not same and model.kind != "hub":
        recorded = cfg["run"].get("model_sha256")
        same = recorded is not None and recorded == fingerprint(model.location)
    if not same:
        raise UserError(f"--from {spec}: run {src.id} trained {theirs!r}, not {ours!r}; its adapter fits only "
                        f"that base model: train with --model {theirs} (or start without --from)")
    pinned = {k: cfg["knobs"][k] for k in LORA_KNOBS if k in cfg["knobs"]}
    return src, pinned


def start_worker(run: RunDir, lock: RunLock | None = None) -> subprocess.Popen:
    """Start `python -m localtune.worker RUN_DIR` in its own session, detached from this
    terminal: closing the terminal or the TUI does not stop it.

    The run's lock is taken here (or given: `lock`, taken by the caller before its checks) and
    handed to the worker as an inherited file descriptor, so no second worker can start on the
    run in between (UserError when another holds it). The status records `launched` first:
    a worker that dies before it takes the run over (a broken install) leaves it there, and
    the run is then shown as failed (RunDir.state)."""
    lock = lock or run.take_lock()
    env = dict(os.environ)
    # glibc keeps freed blocks below its mmap threshold in the heap, and that threshold climbs
    # (up to 32 MB) as large blocks are freed, so a CPU run's resident memory would grow far past
    # its live tensors. A fixed 4 MB threshold hands every large tensor back when freed. Much
    # lower costs speed: at 128 KB every medium tensor is a fresh mmap whose pages are zeroed
    # on first touch, and a training step took twice as long (SmolLM2-135M, bf16, 1,030 tokens:
    # 5.1 s against 2.5 s; 2.7 s at 4 MB).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 << 20))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env[LOCK_FD_ENV] = str(lock.fd)
    try:
        run.write_status(launched=time.time())
        with open(run.log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "localtune.worker", str(run.path)],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env, cwd=str(run.path), pass_fds=(lock.fd,))
    except BaseException:
        run.write_status(launched=None)
        lock.release()
        raise
    lock.write_pid(proc.pid)  # the worker writes it too; until then a second launcher names it
    lock.hand_over()
    return proc


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
    before anything starts, not an hour into training; so does a hub model that cannot be
    downloaded (gated, missing, no network, offline and not cached) or does not fit on the disk:
    the worker downloads it, but the person who started the run hears of these at once."""
    from localtune.data import load_data, split_eval
    from localtune.download import check

    if plan.model.kind == "hub":
        check(plan.model.location, "model", what="--model", trust_remote_code=plan.model.trust_remote_code)

    fmt = run_cfg.get("format") or None
    skip = bool(run_cfg.get("skip_bad_rows"))
    method = plan.knobs.method
    loaded = load_data(run_cfg["data"], format=fmt, skip_bad_rows=skip, method=method)
    if run_cfg.get("eval_data"):
        load_data(run_cfg["eval_data"], format=fmt, skip_bad_rows=skip, method=method)
    elif run_cfg.get("eval_split"):
        split_eval(loaded.examples, float(run_cfg["eval_split"]), plan.knobs.seed)
    run = new_run(run_cfg=run_cfg, plan=plan)
    run.write_status(rows=len(loaded.examples), skipped_rows=len(loaded.skipped))
    return run, list(loaded.warnings)


def resume_run(run: RunDir, *, force: bool = False,
               run_changes: dict[str, Any] | None = None) -> tuple[subprocess.Popen, str]:
    """Start a worker that goes on from the newest complete checkpoint; returns it and where
    it starts from, in words. `run_changes`: [run] keys to set in config.toml first (overnight
    care added at resume: notify, max_gpu_temp).

    The run's lock is taken before the checks and held until the worker has it, so two
    resumes at once (the CLI and the TUI) start one worker; the other gets a UserError."""
    _refuse_live_worker(run)
    lock = run.take_lock()
    try:
        check_resumable(run, force=force)
        if run_changes:
            cfg = run.read_config()
            cfg["run"].update(run_changes)
            run.write_config(cfg)
        checkpoints = run.complete_checkpoints()
        proc = start_worker(run, lock)
    except BaseException:
        lock.release()  # start_worker may have released it already; a second release does nothing
        raise
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


def _refuse_live_worker(run: RunDir) -> None:
    pid = run.live_worker_pid()
    if pid is not None:
        raise UserError(f"run {run.id} is being trained by worker pid {pid}; it needs no resume "
                        f"(`localtune stop {run.id}` stops it)")


def check_resumable(run: RunDir, force: bool = False) -> None:
    """Refuse to resume a completed run, a run with a live worker, or one whose model or data
    changed since it began (unless `force`)."""
    _refuse_live_worker(run)
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
