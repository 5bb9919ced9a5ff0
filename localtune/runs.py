"""Run directories: the whole truth about a run, on disk.

    $LOCALTUNE_HOME/runs/<run-id>/
        config.toml    the resolved configuration: model, data, every knob, the seed
        plan.json      the probe and the plan at launch (with the estimate's parts)
        status.json    state, pid, step, last checkpoint, error; replaced atomically
        data.json      the data as loaded (format, rows, bad rows left out, warnings) and the
                       chat template used, which chat and export must render with
        events.jsonl   append-only event log (localtune.events)
        worker.log     the worker's own stdout/stderr
        worker.lock    the live worker's pid, and its lock (see RunLock): one worker per run
        checkpoints/   complete checkpoints only (written under .partial/, then renamed)
        adapter/       the final adapter
        exports/       what export wrote

Listing, attaching, resuming and exporting read this folder and nothing else.
States: created -> running -> (stopping ->) stopped | failed | completed. A run whose status
says running but whose worker is gone is shown as `interrupted` and can be resumed. A run
whose worker was launched but died before it took the run over (a broken install: an import
error) is shown as `failed`, with the end of worker.log as its error.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localtune.config import load_config
from localtune.errors import UserError
from localtune.events import atomic_write_json, atomic_write_text, last_event
from localtune.paths import runs_dir

STATES = ("created", "running", "stopping", "stopped", "failed", "completed", "interrupted")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
LOCK_FD_ENV = "LOCALTUNE_LOCK_FD"
"""Set by the launcher for the worker it starts: the number of the inherited file descriptor
that holds the run's lock (see RunLock)."""
LOCK_RETRY_S = 0.5
"""How long taking a lock retries while it is held: a viewer's look (RunDir.lock_held) holds
it for microseconds; a worker holds it for hours."""


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
    _lock: RunLock | None = field(default=None, init=False, repr=False, compare=False)

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
        """config.toml, checked: UserError naming the file and the line or key when it was
        edited into bad TOML or a bad value."""
        return load_config(self.config_path, run_dir=True)

    def write_config(self, config: dict[str, dict[str, Any]]) -> None:
        """Replace config.toml (atomically: a crash leaves the old one or the new one)."""
        atomic_write_text(self.config_path, dump_toml(config))

    # ------------------------------------------------------------ the lock

    def live_worker_pid(self) -> int | None:
        """The pid in worker.lock if that process is alive and is a localtune worker."""
        pid = self._lock_file_pid()
        return pid if pid is not None and _is_worker(pid, self.path) else None

    def _lock_file_pid(self) -> int | None:
        try:
            return int(self.lock_path.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None

    def lock_held(self) -> bool:
        """Whether some process holds the run's lock (a worker, or a launcher starting one).
        Looks by taking a shared lock for an instant, so it is asked only where it matters."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def take_lock(self) -> RunLock:
        """Take the run's lock for this process, or raise UserError saying who holds it."""
        return RunLock.take(self)

    def acquire_lock(self) -> None:
        """Take the run for this process (a worker started by hand); refuse if another holds it."""
        self._lock = self.take_lock()

    def adopt_lock(self, fd: int) -> None:
        """Take over the lock the launcher took and handed to this process as file descriptor `fd`."""
        self._lock = RunLock.adopt(self, fd)
        self._lock.write_pid(os.getpid())

    def release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

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
        worker runs but no worker is alive; `failed` when a launched worker died before it
        took the run over."""
        return self.state_and_error()[0]

    def state_and_error(self, status: dict[str, Any] | None = None) -> tuple[str, str | None]:
        """The state as state() says and, for a failed run, why in one line (None otherwise):
        the worker's own message, or for a worker that died before it took the run over, the
        last line of worker.log. `status`: read_status(), if the caller has it already."""
        status = self.read_status() if status is None else status
        if self.lost_worker(status):
            return "failed", f"the worker exited before it started: {self.log_last_line()}"
        s = status.get("state", "created")
        if s in ("running", "stopping") and self.live_worker_pid() is None:
            return "interrupted", None
        return s, status.get("error") if s in ("failed", "interrupted") else None

    def lost_worker(self, status: dict[str, Any] | None = None) -> bool:
        """Whether a launcher started a worker that died before it took the run over: the
        status has `launched` (written by the launcher before the start, while it held the
        lock; cleared by the worker once it holds the lock, which passes from launcher to
        worker without a gap) and nobody holds the lock now."""
        status = self.read_status() if status is None else status
        return bool(status.get("launched")) and not self.lock_held()

    def log_last_line(self) -> str:
        """The last line of worker.log with text (for a Python crash, the exception)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                tail = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return f"no {self.log_path.name}"
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        return lines[-1] if lines else f"{self.log_path.name} is empty"

    def summary(self) -> dict[str, Any]:
        """What a listing shows of the run. A config.toml that cannot be read (edited by hand
        into bad TOML or a bad value) makes the state `unreadable`, its problem the error.
        `method`: sft, dpo or orpo (None when the config is unreadable); `from_run`: the run
        whose adapter a preference run continues, or None."""
        status = self.read_status()
        last = last_event(self.events_path, "step") or {}
        state, error = self.state_and_error(status)
        try:
            cfg = self.read_config() if self.config_path.is_file() else {}
        except UserError as e:
            cfg, state, error = {}, "unreadable", str(e)
        return {
            "id": self.id, "state": state, "step": status.get("step", last.get("step", 0)),
            "max_steps": status.get("max_steps", last.get("max_steps")),
            "loss": last.get("loss"),
            "model": cfg.get("run", {}).get("model"), "data": cfg.get("run", {}).get("data"),
            # a config.toml from before the method knob is an sft run's
            "method": cfg.get("knobs", {}).get("method", "sft") if cfg else None,
            "from_run": cfg.get("run", {}).get("from_run"),
            "started": status.get("created"), "updated": status.get("updated"),
            "error": error, "path": str(self.path),
        }


class RunLock:
    """The run's lock: an flock on worker.lock, held by one open file description for the
    worker's life, so at most one worker writes a run. It dies with its holder, so a killed
    worker leaves no stale lock (the pid left in the file is only a name, never trusted).

    A launcher takes the lock before it checks whether the run can be resumed and hands the
    open file to the worker it starts (the descriptor is inherited; LOCK_FD_ENV names it): the
    flock belongs to the open file description, which both share, so the run is never unlocked
    between the check and the worker, and a second launcher is refused at once.

    The holder deletes the file when it is done. Whoever opened the old file just before that
    may then lock a file that no longer has the name: after locking, the name must still lead
    to the locked file, or it tries again."""

    def __init__(self, run: RunDir, fd: int) -> None:
        self.run = run
        self.fd: int | None = fd
        """The open lock file; None once released or handed over."""

    @classmethod
    def take(cls, run: RunDir) -> RunLock:
        deadline = time.monotonic() + LOCK_RETRY_S
        while True:
            fd = os.open(run.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                raise UserError(_held_message(run)) from None
            lock = cls(run, fd)
            if lock._names_this_file():
                lock.write_pid(os.getpid())  # until a worker takes it over, the taker is named
                return lock
            os.close(fd)

    @classmethod
    def adopt(cls, run: RunDir, fd: int) -> RunLock:
        lock = cls(run, fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the inherited description holds it already
            ok = lock._names_this_file()
        except OSError as e:
            if e.errno not in (errno.EBADF, errno.EWOULDBLOCK):
                raise
            ok = False
        if not ok:
            raise RuntimeError(f"{LOCK_FD_ENV}={fd} is not the lock of {run.lock_path}")
        os.set_inheritable(fd, False)  # a process the worker starts must not keep the run locked
        return lock

    def _names_this_file(self) -> bool:
        try:
            named, held = os.stat(self.run.lock_path), os.fstat(self.fd)
        except FileNotFoundError:
            return False
        return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)

    def write_pid(self, pid: int) -> None:
        """Name the holder in the file. Written over the old name, then cut to length, so a
        reader sees the old pid or the new one, never an empty file."""
        data = f"{pid}\n".encode()
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))

    def hand_over(self) -> None:
        """Close this process's copy after a worker inherited the lock (the worker holds it now)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        """Unlock: delete the file while still holding it (see the class), then close it.
        Once released (or handed over), nothing more to do."""
        if self.fd is None:
            return
        if self._names_this_file():
            try:
                self.run.lock_path.unlink()
            except FileNotFoundError:
                pass
        os.close(self.fd)
        self.fd = None


def _held_message(run: RunDir) -> str:
    import psutil

    pid = run._lock_file_pid()
    if pid is not None and _is_worker(pid, run.path):
        return (f"run {run.id} is being trained by worker pid {pid}; stop it first (`localtune stop {run.id}`) "
                "or wait for it")
    if pid is not None and pid != os.getpid() and psutil.pid_exists(pid):
        return (f"run {run.id} is being started by pid {pid} (another `localtune resume`, or the TUI); "
                f"`localtune runs` shows it in a moment")
    return f"run {run.id} is locked by another process ({run.lock_path}); try again in a moment"


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
