"""Several processes training one run: N GPUs (or, on the CPU, N processes standing in for them)
on one machine or several, through accelerate's launcher over torch.distributed.

When the plan's `parallel` (plan.json; localtune.parallel) has a world size above 1, the worker
that `localtune train` / `resume` starts (`python -m localtune.worker RUN_DIR`) does not train
itself: it is the run's *supervisor*. It holds the run's lock, downloads the model once,
calibrates (data parallel only: one rank's step on one card is what calibration measures),
writes `accelerate.yaml` into the run directory (`accelerate_config`) and starts

    python -m accelerate.commands.launch --config_file RUN/accelerate.yaml \\
        -m localtune.worker --rank RUN_DIR

whose ranks each run the worker's ordinary lifecycle (`localtune.worker.train`) with these
differences, all here:

- Rank 0 alone writes events, the status, the checkpoints' renames and the adapter; every rank
  writes its own part of a checkpoint (its RNG state) under `checkpoints/.partial/`, and the
  rename waits for all of them (`commit_checkpoint_ranked`, two barriers).
- A stop (`localtune stop` signals the supervisor, which signals the ranks it started) is
  agreed between the ranks at each step's end (`AgreeOnStop`: an all-reduce of the flag), so
  every rank ends at the same step and writes the same checkpoint. The clock's checkpoints
  (`SaveByClock`) and the thermal guard's readings are agreed the same way: the guard pauses all
  ranks together while the hottest card is over the limit.
- Each rank writes `ranks/rank-R.json`: its pid when it starts, its outcome when it ends
  (`completed`, `stopped`, `oom` with the step, `user_error`, `comm` when a peer went away,
  `error`). The supervisor reads them when the launcher exits: an out-of-memory error on any
  rank backs off the knobs for all of them (localtune.worker.back_off: micro-batch halved,
  accumulation doubled) and relaunches every rank from the newest complete checkpoint; a bad
  input fails the run with its message; a rank that ended without a word (SIGKILL, the kernel's
  out-of-memory killer, a lost machine) makes the run `interrupted`, and `localtune resume`
  starts every rank from the newest complete checkpoint.
- The supervisor chooses the checkpoint the attempt resumes from (moving unreadable ones
  aside) and writes it into `ranks/attempt.json`; every rank reads it there.

Several machines (`nodes` > 1): each machine runs `python -m localtune.worker RUN_DIR
--node-rank K` (what `localtune train --nodes N --print-launch` prints); machine 0's supervisor
is the run's (lock, status, back-off); the others launch their ranks, and launch again after a
back-off, until the run's state is final. The run folder must be on storage every machine
sees at the same path (checkpoints and the rank files are shared).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localtune.errors import UserError
from localtune.events import append_event, atomic_write_json
from localtune.runs import RunDir

RANK_CHILD_ENV = "LOCALTUNE_RANK_CHILD"
"""Set by the supervisor for the processes accelerate starts: they are ranks of a run."""
DEFAULT_PORT = 29500
"""The rendezvous port on machine 0 when several machines train (one machine: any free port)."""
FAULT_OOM_RANK_ENV = "LOCALTUNE_FAULT_OOM_RANK"
"""Test-only: with LOCALTUNE_FAULT_OOM_AT_STEP, the rank the out-of-memory error is injected on
(default: every rank)."""
FINAL_STATES = ("completed", "stopped", "failed", "interrupted")
COMM_ERROR_MARKS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe",
                    "processgroup", "socket timeout", "timed out", "peer")
"""Words in the error of a rank whose peer went away (the collective it waited in failed):
not that rank's own fault."""
FSDP_CONFIG: dict[str, Any] = {
    "fsdp_version": 1,
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_backward_prefetch": "BACKWARD_PRE",
    "fsdp_cpu_ram_efficient_loading": True,
    "fsdp_forward_prefetch": False,
    "fsdp_offload_params": False,
    "fsdp_sharding_strategy": "FULL_SHARD",
    "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_sync_module_states": True,
    "fsdp_use_orig_params": False,
}
"""accelerate's FSDP settings for QLoRA: those of peft's docs (docs/source/accelerate/fsdp.md,
"Use PEFT QLoRA and FSDP for finetuning large models on multiple GPUs") and the
alignment-handbook's fsdp_qlora config: every transformer block its own shard unit, the 4-bit
weights (stored in the compute dtype, so FSDP can flatten them) loaded on rank 0 and sent to
the others, original parameters off (QLoRA's frozen uint8-in-bf16 storage)."""


@dataclass(frozen=True)
class Rank:
    """This process's place among the run's ranks (torchrun's environment)."""

    rank: int
    local_rank: int
    world_size: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def this_rank(env: dict[str, str] | None = None) -> Rank | None:
    """The rank this process is, when the supervisor started it through accelerate; else None."""
    env = os.environ if env is None else env
    if not env.get(RANK_CHILD_ENV) or "RANK" not in env:
        return None
    return Rank(int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])), int(env.get("WORLD_SIZE", "1")))


def parallel_of(plan: dict[str, Any]) -> dict[str, Any]:
    """plan.json's "parallel" as a dict (localtune.parallel.Parallel.to_dict: with world_size),
    one process for a plan written before it existed."""
    from localtune.parallel import Parallel

    return Parallel.from_dict(plan.get("parallel")).to_dict()


# ------------------------------------------------------------------ agreeing between ranks


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _collective_device():
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_max(values: list[float]) -> list[float]:
    """The largest of each value over all ranks (an all-reduce); the values as they are in one
    process. Every rank must call it at the same point."""
    if not _initialized():
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float(x) for x in t.tolist()]


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def agree_any(flag: bool) -> bool:
    """True on every rank when it is true on any."""
    return agree_max([1.0 if flag else 0.0])[0] > 0


def make_agreeing_reader(read_temp, stop):
    """The thermal guard's reader for several ranks: each reads its own card, and every rank
    gets the hottest card's temperature, and the stop flag agreed (a stop seen by any rank
    during a pause ends the pause on all), so all take the same path through the guard."""

    def read() -> float | None:
        own = read_temp()
        temp, stopped = agree_max([float("-inf") if own is None else float(own), 1.0 if stop.requested else 0.0])
        if stopped > 0:
            stop.requested = True
            stop.reason = stop.reason or "SIGTERM"
        return None if temp == float("-inf") else temp

    return read


# ------------------------------------------------------------------ files the ranks and supervisor share


def ranks_dir(run: RunDir) -> Path:
    return run.path / "ranks"


def write_rank_file(run: RunDir, rank: Rank, **fields: Any) -> None:
    path = ranks_dir(run) / f"rank-{rank.rank}.json"
    path.parent.mkdir(exist_ok=True)
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        before = {}
    atomic_write_json(path, {**before, "rank": rank.rank, "local_rank": rank.local_rank,
                             "host": socket.gethostname(), **fields})


def read_rank_files(run: RunDir) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for p in sorted(ranks_dir(run).glob("rank-*.json")):
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
            out[int(d["rank"])] = d
        except (ValueError, KeyError, TypeError):
            continue
    return out


def attempt_path(run: RunDir) -> Path:
    return ranks_dir(run) / "attempt.json"


def read_attempt(run: RunDir) -> dict[str, Any]:
    try:
        return json.loads(attempt_path(run).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}


def resume_checkpoint(run: RunDir) -> Path | None:
    """The checkpoint this attempt resumes from, as the supervisor chose it (ranks/attempt.json)."""
    name = read_attempt(run).get("resume_from")
    return run.checkpoints_dir / name if name else None


def is_comm_error(e: BaseException) -> bool:
    """Whether `e` is a collective failing because a peer went away (not this rank's fault)."""
    try:
        import torch.distributed as dist

        if isinstance(e, getattr(dist, "DistError", ())):
            return True
    except ImportError:
        pass
    text = f"{type(e).__name__}: {e}".lower()
    return isinstance(e, (RuntimeError, ConnectionError, TimeoutError)) and any(m in text for m in COMM_ERROR_MARKS)


# ------------------------------------------------------------------ accelerate's configuration


def gpu_ids(devices: list[int], env: dict[str, str] | None = None) -> str:
    """accelerate's `gpu_ids` (it becomes CUDA_VISIBLE_DEVICES for the ranks) for the plan's
    CUDA ordinals. The probe numbered the GPUs as this process sees them: under a
    CUDA_VISIBLE_DEVICES of its own, ordinal i is that list's i-th entry."""
    env = os.environ if env is None else env
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible:
        return ",".join(visible[i] for i in devices)
    return ",".join(str(i) for i in devices)


def accelerate_config(par: dict[str, Any], backend: str, *, main_address: str = "127.0.0.1",
                      port: int = 0, env: dict[str, str] | None = None) -> dict[str, Any]:
    """What `accelerate launch --config_file` reads for the plan's `parallel`.

    Data parallel is accelerate's MULTI_GPU (its launcher runs torch's elastic agent, torchrun,
    with N processes per machine); on the CPU the same, with `use_cpu` (the ranks then join
    over gloo: the same code path as GPUs, the device aside; accelerate's own MULTI_CPU type
    needs mpirun and would start a single process). Sharded QLoRA is FSDP with FSDP_CONFIG."""
    world = int(par["processes"]) * int(par["nodes"])
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP" if par["mode"] == "fsdp" else "MULTI_GPU",
        "num_processes": world,
        "num_machines": int(par["nodes"]),
        "machine_rank": 0,
        "main_process_ip": main_address,
        "main_process_port": int(port),
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": "no",  # the Trainer's own bf16/fp16 flags decide (localtune.precision)
        "use_cpu": backend == "cpu",
        "gpu_ids": gpu_ids(list(par.get("devices") or []), env) if backend == "cuda" and par.get("devices") else "all",
        "downcast_bf16": "no",
        "debug": False,
    }
    if par["mode"] == "fsdp":
        cfg["fsdp_config"] = dict(FSDP_CONFIG)
        if backend == "cpu":  # torch's FSDP cannot sync module states on the CPU: each process loads the model
            cfg["fsdp_config"].update(fsdp_cpu_ram_efficient_loading=False, fsdp_sync_module_states=False)
    return cfg


def dump_yaml(cfg: dict[str, Any]) -> str:
    """The configuration as the YAML file `accelerate launch --config_file` reads (PyYAML, which
    accelerate itself loads it with), keys in the order given."""
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)


def config_path(run: RunDir) -> Path:
    return run.path / "accelerate.yaml"


def write_accelerate_config(run: RunDir, cfg: dict[str, Any]) -> Path:
    from localtune.events import atomic_write_text

    path = config_path(run)
    atomic_write_text(path, dump_yaml(cfg))
    return path


def launch_command(run: RunDir, machine_rank: int = 0) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path(run)),
            "--machine_rank", str(machine_rank), "-m", "localtune.worker", "--rank", str(run.path)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ the supervisor


def _die_with_parent() -> None:
    """In the launcher's process, before exec: SIGTERM when the supervisor dies (Linux), so that
    ranks never train on with nobody holding the run's lock."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _start_launcher(run: RunDir, machine_rank: int, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(launch_command(run, machine_rank), env=env, stdin=subprocess.DEVNULL,
                            cwd=str(run.path), preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def _signal_ranks(run: RunDir, sig: int) -> None:
    """Send `sig` to this machine's ranks (their pids in the rank files)."""
    import psutil

    host = socket.gethostname()
    for d in read_rank_files(run).values():
        pid = d.get("pid")
        if d.get("host") == host and isinstance(pid, int) and d.get("outcome") is None:
            try:
                if "localtune.worker" in " ".join(psutil.Process(pid).cmdline()):
                    os.kill(pid, sig)
            except (psutil.Error, ProcessLookupError, PermissionError):
                pass


def _wait(proc: subprocess.Popen, run: RunDir, stop) -> int:
    """Wait for the launcher; a stop asked of the supervisor goes on to the ranks (SIGTERM: each
    finishes its step, they agree, rank 0 writes the checkpoint)."""
    forwarded = False
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        if stop.requested and not forwarded:
            _signal_ranks(run, signal.SIGTERM)
            forwarded = True


def launch_env(run: RunDir) -> dict[str, str]:
    env = dict(os.environ)
    env[RANK_CHILD_ENV] = "1"
    env.pop("LOCALTUNE_LOCK_FD", None)
    return env


def supervise(run: RunDir, stop, knobs, par: dict[str, Any], node_rank: int = 0) -> None:
    """Run the plan's ranks to the end (see the module docstring). Returns when the run is
    completed or stopped (rank 0 wrote it) or interrupted (written here); raises UserError
    for a bad input a rank met, RuntimeError for a rank's own failure (our bug)."""
    from localtune import worker

    # the model's download, once, before any rank; nothing here touches a GPU (a CUDA context in
    # this process would take memory from GPU 0 for the whole run)
    fetched = worker._setup_or_stop(run, knobs, stop, lambda r, k, s: worker.fetch_weights(r, r.read_config()["run"], s))
    if fetched is None:
        return
    if node_rank > 0:
        return _follow_main_machine(run, stop, node_rank)
    from localtune.hardware import Hardware

    plan = json.loads(run.plan_path.read_text(encoding="utf-8"))
    hardware = Hardware.from_dict(plan["hardware"])
    if par["mode"] == "ddp":
        knobs = worker.calibrate_run(run, knobs, hardware)  # one rank's step on one device: what each rank holds
    elif knobs.calibrate and "calibration" not in plan:
        plan["calibration"] = {"skipped": "sharded (FSDP) runs: calibration measures one whole model on one device"}
        atomic_write_json(run.plan_path, plan)
    cfg = run.read_config()["run"]
    main_address, port = _address(cfg, par)
    write_accelerate_config(run, accelerate_config(par, plan["hardware"]["backend"], main_address=main_address,
                                                   port=port))
    env = launch_env(run)
    attempt = 0
    while True:
        attempt += 1
        shutil.rmtree(run.checkpoints_dir / ".partial", ignore_errors=True)
        shutil.rmtree(ranks_dir(run), ignore_errors=True)
        resume = worker.newest_usable_checkpoint(run)
        ranks_dir(run).mkdir(exist_ok=True)
        atomic_write_json(attempt_path(run), {"attempt": attempt, "resume_from": resume.name if resume else None,
                                              "world_size": par["world_size"]})
        print(f"localtune worker: starting {par['world_size']} ranks ({par['mode']}, attempt {attempt}) "
              f"{'from ' + resume.name if resume else 'from the start'}", file=sys.stderr, flush=True)
        proc = _start_launcher(run, 0, env)
        rc = _wait(proc, run, stop)
        outcomes = read_rank_files(run)
        state = run.read_status().get("state")
        if rc == 0 and state in ("completed", "stopped"):
            return
        verdict, detail = judge(outcomes, par["world_size"], rc, stop.requested)
        if verdict == "oom":
            from localtune.knobs import knobs_from_mapping

            knobs = knobs_from_mapping(run.read_config()["knobs"], str(run.config_path))
            print(f"localtune worker: out of memory on rank {detail['ranks']}: every rank backs off",
                  file=sys.stderr, flush=True)
            knobs = worker.back_off(run, knobs, detail["step"])  # UserError when nothing is left to shrink
            env.pop(worker.FAULT_OOM_AT_STEP_ENV, None)  # test-only injection: once per run
            continue
        if verdict == "user_error":
            raise UserError(detail["error"])
        if verdict == "error":
            raise RuntimeError(f"{detail['error']} (its traceback is in {run.log_path})")
        last = run.complete_checkpoints()
        msg = (f"{detail['error']}; every rank was stopped; `localtune resume {run.id}` starts them all from "
               f"{last[-1].name if last else 'the start'}")
        print(f"localtune worker: interrupted: {msg}", file=sys.stderr, flush=True)
        run.write_status(state="interrupted", error=msg, pid=None)
        append_event(run.events_path, "interrupted", error=msg, log=str(run.log_path))
        return


def judge(outcomes: dict[int, dict[str, Any]], world_size: int, rc: int, stopping: bool) -> tuple[str, dict[str, Any]]:
    """What the supervisor does after the ranks' launcher exited without the run completed or
    stopped, from the ranks' outcome files: ("oom", {step, ranks}) when any rank ran out of
    memory (not while stopping); ("user_error", {error}) for a bad input a rank met;
    ("error", {error}) for a rank's own failure; else ("interrupted", {error}): a rank ended
    without a word (killed), or only peers' communication failures are known."""
    ooms = [d for d in outcomes.values() if d.get("outcome") == "oom"]
    if ooms and not stopping:
        return "oom", {"step": min(int(d.get("step") or 1) for d in ooms),
                       "ranks": ", ".join(str(d["rank"]) for d in sorted(ooms, key=lambda d: d["rank"]))}
    for kind in ("user_error", "error"):
        for r, d in sorted(outcomes.items()):
            if d.get("outcome") == kind:
                error = str(d.get("error") or "failed")
                return kind, {"error": error if kind == "user_error" else f"rank {r}: {error}"}
    silent = [r for r in range(world_size) if not outcomes.get(r, {}).get("outcome")]
    if silent:
        why = f"rank {', '.join(map(str, silent))} ended without a word (killed, or out of the machine's memory)"
    else:
        why = f"the ranks lost each other (exit code {rc})"
    return "interrupted", {"error": why}


def _address(cfg: dict[str, Any], par: dict[str, Any]) -> tuple[str, int]:
    """The rendezvous: [run] main_address ("HOST:PORT") for several machines; one machine: the
    loopback address and a port free now."""
    if int(par["nodes"]) > 1:
        return parse_address(str(cfg.get("main_address") or f"127.0.0.1:{DEFAULT_PORT}"), "main_address")
    return "127.0.0.1", free_port()


def _follow_main_machine(run: RunDir, stop, node_rank: int) -> None:
    """A machine other than 0: launch this machine's ranks, again after each back-off, until the
    run's state (written by machine 0) is final."""
    env = launch_env(run)
    while True:
        proc = _start_launcher(run, node_rank, env)
        _wait(proc, run, stop)
        for _ in range(60):  # machine 0's supervisor writes the outcome a moment after its ranks end
            state = run.read_status().get("state")
            if state in FINAL_STATES or stop.requested:
                return
            time.sleep(1.0)
        env.pop("LOCALTUNE_FAULT_OOM_AT_STEP", None)




def default_address() -> str:
    """This machine's address on its network (the interface a route out would use; nothing is
    sent), or the loopback address when it has none."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def parse_address(text: str, where: str) -> tuple[str, int]:
    """HOST[:PORT] (port DEFAULT_PORT when left out); UserError naming `where` otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = text.strip(), str(DEFAULT_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"{where} {text!r}: give HOST or HOST:PORT with a port from 1 to 65535, e.g. 10.0.0.5:29500")
    return host, int(port)
