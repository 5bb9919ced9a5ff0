"""Run directories: the whole truth about a run, on disk.

    $LOCALTUNE_HOME/runs/<run-id>/
        config.toml    the resolved configuration: model, data, every knob, the seed
        plan.json      the probe and the plan at launch (with the estimate's parts)
        status.json    state, pid, step, last checkpoint, error; replaced atomically
        data.json      the data as loaded (format, rows, bad rows left out, warnings) and the
                       chat template used, which chat and export must render with
        events.jsonl   append-only event log (localtune.events)
        worker.log     the worker's own stdout/stderr
        worker.lock    the live worker's pid; stops two workers from writing one run
        checkpoints/   complete checkpoints only (written under .partial/, then renamed)
        adapter/       the final adapter
        exports/       what export wrote

Listing, attaching, resuming and exporting read this folder and nothing else.
States: created -> running -> (stopping ->) stopped | failed | completed. A run whose status
says running but whose worker is gone is shown as `interrupted` and can be resumed.
"""

from __future__ import annotations

import json
import os
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localtune.errors import UserError
from localtune.events import atomic_write_json, atomic_write_text, last_event
from localtune.paths import runs_dir

STATES = ("created", "running", "stopping", "stopped", "failed", "completed")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(tables: dict[str, dict[str, Any]]) -> str:
    """TOML for `{table: {key: scalar or list}}`; None values are left out."""
    out = []
    for table, values in tables.items():
        out.append(f"[{table}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None)
        out.append("")
    return "\n".join(out)


def new_run_id(model_name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(model_name).name or model_name).strip("-").lower()[:32] or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"


@dataclass
class RunDir:
    """One run's folder and the files in it."""

    path: Path

    @property
    def id(self) -> str:
        return self.path.name

    config_path = property(lambda self: self.path / "config.toml")
    plan_path = property(lambda self: self.path / "plan.json")
    status_path = property(lambda self: self.path / "status.json")
    events_path = property(lambda self: self.path / "events.jsonl")
    log_path = property(lambda self: self.path / "worker.log")
    lock_path = property(lambda self: self.path / "worker.lock")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    adapter_dir = property(lambda self: self.path / "adapter")
    exports_dir = property(lambda self: self.path / "exports")

    # ------------------------------------------------------------ status

    def read_status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"state": "created"}
        except json.JSONDecodeError:  # cannot happen with atomic writes, but never crash a listing
            return {"state": "unknown"}

    def write_status(self, **changes: Any) -> dict[str, Any]:
        status = self.read_status()
        status.update(changes, updated=time.time())
        atomic_write_json(self.status_path, status)
        return status

    def read_config(self) -> dict[str, Any]:
        with self.config_path.open("rb") as f:
            return tomllib.load(f)

    def write_config(self, config: dict[str, dict[str, Any]]) -> None:
        """Replace config.toml (atomically: a crash leaves the old one or the new one)."""
        atomic_write_text(self.config_path, dump_toml(config))

    # ------------------------------------------------------------ the lock

    def live_worker_pid(self) -> int | None:
        """The pid in worker.lock if that process is alive and is a localtune worker."""
        try:
            pid = int(self.lock_path.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        return pid if _is_worker(pid, self.path) else None

    def acquire_lock(self) -> None:
        """Take the run for this process; refuse if a live worker holds it."""
        pid = self.live_worker_pid()
        if pid is not None and pid != os.getpid():
            raise UserError(f"run {self.id} is being trained by worker pid {pid}; "
                            f"stop it first (`localtune stop {self.id}`) or wait for it")
        tmp = self.lock_path.with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, self.lock_path)

    def release_lock(self) -> None:
        try:
            if int(self.lock_path.read_text().split()[0]) == os.getpid():
                self.lock_path.unlink()
        except (FileNotFoundError, ValueError, IndexError):
            pass

    # ------------------------------------------------------------ checkpoints

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (only complete ones are ever in this folder)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for p in self.checkpoints_dir.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir() and (p / "trainer_state.json").is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def state(self) -> str:
        """The state as a person should see it: `interrupted` when the status says the
        worker runs but no worker is alive."""
        s = self.read_status().get("state", "created")
        if s in ("running", "stopping") and self.live_worker_pid() is None:
            return "interrupted"
        return s

    def summary(self) -> dict[str, Any]:
        status = self.read_status()
        last = last_event(self.events_path, "step") or {}
        cfg = self.read_config() if self.config_path.is_file() else {}
        return {
            "id": self.id, "state": self.state(), "step": status.get("step", last.get("step", 0)),
            "max_steps": status.get("max_steps", last.get("max_steps")),
            "loss": last.get("loss"),
            "model": cfg.get("run", {}).get("model"), "data": cfg.get("run", {}).get("data"),
            "started": status.get("created"), "updated": status.get("updated"),
            "path": str(self.path),
        }


def _is_worker(pid: int, run_path: Path) -> bool:
    import psutil

    try:
        cmd = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    # pid reuse after a reboot: only a localtune worker of this very run counts
    return any("localtune.worker" in c for c in cmd) and any(str(run_path.name) in c for c in cmd)


def create_run(config: dict[str, dict[str, Any]], plan: dict[str, Any], run_id: str) -> RunDir:
    """Write a new run directory: config.toml, plan.json, status.json (created)."""
    run = RunDir(runs_dir() / run_id)
    run.path.mkdir(parents=True, exist_ok=False)
    run.write_config(config)
    atomic_write_json(run.plan_path, plan)
    run.write_status(state="created", created=time.time(), step=0)
    run.events_path.touch()
    return run


def find_run(name: str) -> RunDir:
    """A run by id, unique id prefix, `last`, or path."""
    p = Path(name).expanduser()
    if (p / "config.toml").is_file():
        return RunDir(p.resolve())
    root = runs_dir()
    runs = sorted(d for d in root.iterdir() if (d / "config.toml").is_file()) if root.is_dir() else []
    if name == "last":
        if not runs:
            raise UserError(f"there are no runs yet in {root}; start one with `localtune train`")
        return RunDir(runs[-1])
    hits = [d for d in runs if d.name == name] or [d for d in runs if d.name.startswith(name)]
    if len(hits) == 1:
        return RunDir(hits[0])
    if not hits:
        raise UserError(f"no run '{name}' in {root}; `localtune runs` lists them")
    raise UserError(f"'{name}' matches {len(hits)} runs ({', '.join(h.name for h in hits[:4])}); give more of the id")


def list_runs() -> list[RunDir]:
    root = runs_dir()
    if not root.is_dir():
        return []
    return [RunDir(d) for d in sorted(root.iterdir()) if (d / "config.toml").is_file()]
