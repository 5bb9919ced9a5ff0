"""The training worker: `python -m localtune.worker RUN_DIR`.

It runs in its own process session (started by `localtune train` / `resume`), so it outlives
the command or TUI that started it; it owns the accelerator. It reads `config.toml` and
`plan.json` from the run directory, trains with the trl trainer of the run's method (the
`method` knob: localtune.methods builds SFTTrainer, DPOTrainer or ORPOTrainer; this module is
the lifecycle around it and knows nothing of the method) and reports everything through
`events.jsonl` and `status.json` (see localtune.events, localtune.runs and the callbacks in
localtune.callbacks). With `engine = "mlx"` in the knobs, `train` hands over to
localtune.engines.mlx_sft, which drives MLX with this module's pieces: `_setup`,
`newest_usable_checkpoint`, `commit_checkpoint`, `publish_adapter` (the torch trainers use the
same two through `CommitCheckpoints` and `_save_adapter`).

- Checkpoints are written under `checkpoints/.partial/` and renamed into `checkpoints/` only
  when complete, so a crash or a full disk never leaves a half checkpoint that resume would
  pick. Only the newest `save_total_limit` are kept.
- SIGTERM (`localtune stop`) ends the current optimizer step, writes a checkpoint and sets
  the state to `stopped`.
- Resume continues from the newest complete checkpoint: the Trainer restores the adapter,
  optimizer, scheduler and RNG state and skips the batches already seen, so the data order and
  the loss curve match an uninterrupted run.
- Out of memory (`torch.OutOfMemoryError`, or MPS's "MPS backend out of memory") raised by
  training backs off in the same process: the trainer and model are dropped and the memory
  freed, the micro-batch is halved and the accumulation doubled (the effective batch, and so the
  data order and the loss per optimizer step, stay the same), training goes back to the newest
  complete checkpoint (or the start) and goes on. At a micro-batch of 1 it halves max_length
  instead (not below 64); past that the run fails, saying what to change. Each back-off is an
  `oom_backoff` event and a line in the status's `notes`, and the new knobs are written into
  config.toml's [knobs], so a later resume keeps them.

- Checkpoints are also written by the clock: every `save_minutes` minutes since the last one,
  whatever `save_steps` says, so a run of slow steps is never hours away from a checkpoint.
- A newest checkpoint that cannot be read (a file missing, truncated or corrupt, as a crash of
  the machine or a bad disk can leave it) is moved aside to `checkpoint-N.corrupt` (kept, not
  deleted) with a `warning` event, and training resumes from the one before.
- A full disk while writing a checkpoint (ENOSPC) removes the half-written copy, leaves the
  checkpoints before it as they were, and fails the run with a status that says so: free
  space, then `localtune resume`.
- `max_gpu_temp` ([run] in config.toml, `--max-gpu-temp`): between optimizer steps, while the
  NVIDIA GPU is hotter than the limit, the worker waits (a `thermal_pause` event), polling every
  THERMAL_POLL_S, until it has cooled THERMAL_HYSTERESIS_C below it (`thermal_resume`).
- `notify` ([run], `--notify`): a desktop notification when the run finishes or fails
  (localtune.notify).

- Several ranks (the plan's `parallel`: N GPUs, or N processes on the CPU, on one machine or
  several): this process supervises them (localtune.distributed.supervise) and each rank runs
  this same lifecycle under accelerate's launcher (`python -m localtune.worker --rank RUN_DIR`):
  rank 0 writes the events, the status, the checkpoints' renames and the adapter; the ranks
  agree on a stop, on the clock's checkpoints and on the hottest card at each step's end; out of
  memory on any rank ends the ranks and the supervisor backs all off; a rank that dies makes
  the run `interrupted`. On machine K > 0 of several: `python -m localtune.worker RUN_DIR
  --node-rank K`.

Anything that escapes is written to the status (`failed`, with the reason) and the traceback
to worker.log.

Test-only switch: with `LOCALTUNE_FAULT_KILL_IN_CHECKPOINT=N` in the environment the worker
kills itself (`os._exit(137)`, like SIGKILL) while writing the checkpoint of step N: after the
checkpoint's files are written under `checkpoints/.partial/`, before the rename. The tests use
it to check that resume ignores a half-written checkpoint. Never set it otherwise.

Test-only switch: with `LOCALTUNE_FAULT_ENOSPC_IN_CHECKPOINT=N` in the environment, writing the
checkpoint of step N fails as a full disk does (`OSError(ENOSPC)`), after part of it is written
under `checkpoints/.partial/`. Never set it otherwise.

Test-only switch: with `LOCALTUNE_FAULT_OOM_AT_STEP=N` in the environment the worker raises
`torch.cuda.OutOfMemoryError("CUDA out of memory (injected by LOCALTUNE_FAULT_OOM_AT_STEP)")`
at the start of optimizer step N, once per process (it does not fire again after the back-off),
on any backend; on the MLX engine, MLX's allocator error instead (`RuntimeError("[malloc] Unable
to allocate ...")`). The tests use it to check the out-of-memory back-off. Never set it otherwise.

Benchmark-only switch: with `LOCALTUNE_CUDA_MEMORY_CAP_GB=N` in the environment a worker that
trains on CUDA lets torch's allocator use at most N GiB of its GPU
(`torch.cuda.set_per_process_memory_fraction`), as if the card had N GiB, and at exit writes one
line to worker.log: `localtune worker: cuda memory peak: max_memory_allocated=A
max_memory_reserved=R` (bytes). `benchmarks/gpu_check.py` uses it to measure a 24 GB card's run
on a larger GPU. Never set it otherwise.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import signal
import sys
import traceback
from functools import lru_cache
from pathlib import Path
from typing import Any

from localtune.callbacks import (  # noqa: F401 - re-exported: the worker's callbacks, by their old names too
    FAULT_OOM_AT_STEP_ENV, THERMAL_HYSTERESIS_C, THERMAL_POLL_S, AgreeOnStop, AnnounceRank, Attempt, InjectOom,
    RunEvents, RunInfo, SaveByClock, StopRequest, ThermalGuard, hardware_event, sample_answer, thermal_guard_for)
from localtune.distributed import FAULT_OOM_RANK_ENV, agree_any, resume_checkpoint
from localtune.errors import UserError
from localtune.events import append_event, read_events
from localtune.loading import (  # noqa: F401 - re-exported
    _expose_bias_of_token_wrappers, _trainable_token_indices, _trainable_weights_in_float32,
    keep_4bit_weights_trainable, load_base_model, settle_trainable_weights)
from localtune.methods.sft import _padding_free  # noqa: F401 - re-exported
from localtune.notify import desktop_notify
from localtune.runs import LOCK_FD_ENV, RunDir

_StopRequest = StopRequest  # the old names
_load_model = load_base_model
_hardware_event = hardware_event
_sample = sample_answer

FAULT_KILL_IN_CHECKPOINT_ENV = "LOCALTUNE_FAULT_KILL_IN_CHECKPOINT"
"""Test-only: the step whose checkpoint writing the worker dies in (see the module docstring)."""
FAULT_ENOSPC_IN_CHECKPOINT_ENV = "LOCALTUNE_FAULT_ENOSPC_IN_CHECKPOINT"
"""Test-only: the step whose checkpoint meets a full disk (see the module docstring)."""
CUDA_MEMORY_CAP_ENV = "LOCALTUNE_CUDA_MEMORY_CAP_GB"
"""Benchmark-only: GiB of the GPU the worker may use, and its peaks in worker.log (see the module docstring)."""
FSDP_CHECKPOINT_DIRS = ("pytorch_model_fsdp_0", "optimizer_0")
"""What a sharded (FSDP, SHARDED_STATE_DICT) run's checkpoint holds instead of the adapter's
safetensors and optimizer.pt: each a torch distributed checkpoint (a `.metadata` file and
every rank's shards), written by accelerate's save_fsdp_model (adapter only) and
save_fsdp_optimizer through the Trainer."""
MIN_BACKOFF_MAX_LENGTH = 64
"""The out-of-memory back-off halves max_length down to this, and no further."""


def _device_of(backend: str, plan: dict[str, Any]) -> str:
    """The plan's training device: 'cuda:N' for the plan's first GPU (N is its CUDA ordinal in
    this process, as the probe numbered it), else the backend. A rank of several (localtune.
    distributed) trains on 'cuda:LOCAL_RANK': accelerate's launcher made the plan's GPUs the
    only ones it sees (CUDA_VISIBLE_DEVICES), in the plan's order."""
    from localtune.distributed import this_rank

    rank = this_rank()
    if backend == "cuda" and rank is not None:
        return f"cuda:{rank.local_rank}"
    if backend == "cuda":
        chosen = (plan.get("parallel") or {}).get("devices") or []  # --gpus: the plan's GPUs, not the probe's first
        index = chosen[0] if chosen else plan["hardware"]["devices"][0].get("index") or 0
        return f"cuda:{index}"
    return backend


def _use_device(device: str) -> None:
    """Make the plan's GPU this process's current CUDA device, so that everything that asks
    for 'the' device (bitsandbytes' kernels, `torch.cuda.is_bf16_supported`, the Trainer's
    `cuda` placement, memory readings without an argument) means it, not device 0."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))


def _cap_cuda_memory(device: str) -> None:
    """Benchmark-only (LOCALTUNE_CUDA_MEMORY_CAP_GB): cap torch's allocator on the training GPU
    at that many GiB and report the peaks at exit (see the module docstring)."""
    cap_gb = os.environ.get(CUDA_MEMORY_CAP_ENV)
    if not cap_gb or not device.startswith("cuda"):
        return
    import atexit

    import torch

    dev = torch.device(device)
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap_gb) * 2**30 / total), dev)
    atexit.register(lambda: print(f"localtune worker: cuda memory peak: max_memory_allocated="
                                  f"{torch.cuda.max_memory_allocated(dev)} max_memory_reserved="
                                  f"{torch.cuda.max_memory_reserved(dev)}", file=sys.stderr, flush=True))


def torch_index(device: str) -> int | None:
    """N of 'cuda:N'; None for other devices."""
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else None


OOM_MESSAGES = (
    "CUDA out of memory",            # the caching allocator (torch.OutOfMemoryError's text)
    "CUDA error: out of memory",     # a raw cudaMalloc or kernel launch (torch.AcceleratorError)
    "CUBLAS_STATUS_ALLOC_FAILED",    # cuBLAS could not allocate its workspace or handle
    "CUDNN_STATUS_ALLOC_FAILED",     # cuDNN's workspace (cuDNN 8)
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "MPS backend out of memory",     # Apple's allocator
)
"""Error texts that mean the accelerator ran out of memory although they are not
torch.OutOfMemoryError: the libraries under torch report their own allocation failures as
RuntimeError (torch.AcceleratorError since torch 2.8) with their status name in the text."""


def _is_oom(e: BaseException) -> bool:
    """An out-of-memory error of the accelerator: torch's own, or one reported by cuBLAS,
    cuDNN, the CUDA runtime or Apple's MPS allocator (OOM_MESSAGES)."""
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MESSAGES)


def _backoff_knobs(knobs):
    """The knobs to retry with after running out of memory: a smaller micro-batch with the
    accumulation grown to keep the effective batch exactly (knobs.halve_micro_batch, the rule
    the planner steps down with); at a micro-batch of 1, max_length halved (not below
    MIN_BACKOFF_MAX_LENGTH). Raises UserError when neither can go lower."""
    from localtune.knobs import halve_micro_batch

    smaller = halve_micro_batch(knobs)
    if smaller is not None:
        return smaller
    if knobs.max_length > MIN_BACKOFF_MAX_LENGTH:
        return knobs.replace(max_length=max(MIN_BACKOFF_MAX_LENGTH, knobs.max_length // 2))
    fixes = ["a smaller model"]
    if not knobs.load_in_4bit:
        fixes.append("4-bit loading (--set load_in_4bit=true)")
    fixes.append(f"a shorter max_length (--set max_length=N, now {knobs.max_length})")
    raise UserError(f"out of memory even with a micro-batch of 1 and max_length {knobs.max_length}: "
                    f"train with {', or '.join(fixes)}")


def back_off(run: RunDir, knobs, oom_step: int):
    """After running out of memory at optimizer step `oom_step`, whatever the engine: the knobs to
    go on with (`_backoff_knobs`; UserError when nothing is left to shrink), written into
    config.toml so a later resume keeps them, an `oom_backoff` event and a line in the status's
    notes naming the checkpoint training goes back to (the newest complete one)."""
    new = _backoff_knobs(knobs)
    _write_knobs(run, new)
    newest = run.complete_checkpoints()
    back_to = newest[-1].name if newest else None
    append_event(run.events_path, "oom_backoff", step=oom_step,
                 per_device_train_batch_size=new.per_device_train_batch_size,
                 gradient_accumulation_steps=new.gradient_accumulation_steps,
                 max_length=new.max_length, resume_from=back_to)
    note = (f"out of memory at step {oom_step}: micro-batch {knobs.per_device_train_batch_size} x "
            f"{knobs.gradient_accumulation_steps} -> {new.per_device_train_batch_size} x "
            f"{new.gradient_accumulation_steps}, max_length {knobs.max_length} -> {new.max_length}; "
            f"going back to {back_to or 'the start'}")
    print(f"localtune worker: {note}", file=sys.stderr, flush=True)
    run.write_status(notes=[*run.read_status().get("notes", []), note])
    return new


class DiskFull(UserError):
    """The disk filled up while the worker wrote a checkpoint or the adapter."""


def checkpoint_problem(ck: Path) -> str | None:
    """What makes checkpoint folder `ck` unusable for resume (a file missing, truncated or
    corrupt), or None when every file reads back. The torch files are zip archives, checked
    member by member against their CRCs; the adapter's tensors are read in full."""
    import zipfile

    try:
        state = json.loads((ck / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (ValueError, UnicodeDecodeError):
        return "trainer_state.json is not valid JSON"
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json has no global_step"
    fsdp = [d for d in FSDP_CHECKPOINT_DIRS if (ck / d).is_dir()]
    if fsdp:  # a sharded run's: accelerate's distributed checkpoint folders instead of the adapter and optimizer.pt
        missing = [d for d in FSDP_CHECKPOINT_DIRS if not (ck / d / ".metadata").is_file()]
        if missing:
            return f"{missing[0]}/.metadata is missing"
    else:
        problem = _safetensors_problem(ck / "adapter_model.safetensors")
        if problem is not None:
            return problem
    if state.get("engine") == "mlx":  # localtune.engines.mlx_sft: the optimizer state as safetensors
        return _safetensors_problem(ck / "optimizer.safetensors")
    rng = ["rng_state.pth"]
    if not (ck / "rng_state.pth").is_file():  # several ranks: one per rank (the Trainer's rng_state_R.pth)
        rng = sorted(p.name for p in ck.glob("rng_state_*.pth")) or rng
    for name in ("scheduler.pt", *rng) if fsdp else ("optimizer.pt", "scheduler.pt", *rng):
        p = ck / name
        if not p.is_file():
            return f"{name} is missing"
        try:
            with zipfile.ZipFile(p) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError):
            return f"{name} is truncated or corrupt"
        if bad is not None:
            return f"{name} is corrupt (member {bad})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """What makes a safetensors file unusable (missing, truncated, corrupt), or None."""
    from safetensors import safe_open

    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        return f"{path.name} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def newest_usable_checkpoint(run: RunDir) -> Path | None:
    """The newest complete checkpoint that reads back. Each newer one that does not is moved
    aside to `checkpoint-N.corrupt` (kept for a person to look at, never picked again) with a
    `warning` event."""
    for ck in reversed(run.complete_checkpoints()):
        problem = checkpoint_problem(ck)
        if problem is None:
            return ck
        aside = ck.with_name(f"{ck.name}.corrupt")
        n = 1
        while aside.exists():
            n += 1
            aside = ck.with_name(f"{ck.name}.corrupt{n}")
        os.replace(ck, aside)
        before = [c.name for c in run.complete_checkpoints()]
        msg = (f"{ck.name} cannot be read ({problem}); moved it to checkpoints/{aside.name} and "
               f"resuming from {before[-1] if before else 'the start'}")
        print(f"localtune worker: {msg}", file=sys.stderr, flush=True)
        append_event(run.events_path, "warning", message=msg)
    return None


def _peak_memory_bytes(device: str) -> int:
    """torch.cuda.max_memory_allocated of the training GPU on CUDA; this process's peak RSS
    elsewhere."""
    import resource

    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _write_knobs(run: RunDir, knobs) -> None:
    """Replace config.toml's [knobs] with `knobs`, so a later resume uses them."""
    cfg = run.read_config()
    cfg["knobs"] = knobs.to_dict()
    run.write_config(cfg)


def _free_memory(backend: str) -> None:
    import torch

    gc.collect()
    if backend == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the current device: the plan's (_use_device)
    elif backend == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def commit_checkpoint(run: RunDir, step: int, keep: int, write) -> Path:
    """Write the checkpoint of optimizer step `step` and put it in place, whatever the engine:
    `write()` writes its files under `checkpoints/.partial/checkpoint-N`; only once it returned
    is the folder renamed into `checkpoints/` (so resume never sees half of one), the oldest
    beyond the newest `keep` removed, the status and a `checkpoint` event written. A full disk
    (ENOSPC) removes the half-written copy, leaves the checkpoints before it as they were and
    raises DiskFull saying so. Returns the checkpoint's folder."""
    _write_partial(run, step, write)
    return _publish_checkpoint(run, step, keep)


def commit_checkpoint_ranked(run: RunDir, step: int, keep: int, write, main: bool) -> Path | None:
    """`commit_checkpoint` for one rank of several: every rank writes its part (its RNG state;
    rank 0 also the adapter, optimizer and trainer state) under `checkpoints/.partial/`, all
    wait for each other, rank 0 renames it into place, and all wait again before training
    on. Returns the folder on rank 0, None on the others."""
    from localtune.distributed import barrier

    _write_partial(run, step, write)
    barrier()
    dst = _publish_checkpoint(run, step, keep) if main else None
    barrier()
    return dst


def _write_partial(run: RunDir, step: int, write) -> None:
    """`write()` a checkpoint's files under `checkpoints/.partial/`; a full disk removes them and
    raises DiskFull (see commit_checkpoint)."""
    partial, final_dir = run.checkpoints_dir / ".partial", run.checkpoints_dir
    name = f"checkpoint-{step}"
    try:
        write()
        if os.environ.get(FAULT_ENOSPC_IN_CHECKPOINT_ENV) == str(step):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial / name / "optimizer.pt"))
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        shutil.rmtree(partial, ignore_errors=True)  # no half checkpoint; and the space back
        last = run.complete_checkpoints()
        raise DiskFull(
            f"the disk is full: writing {name} failed ({e.filename or final_dir}); "
            f"{'the checkpoints before it are intact (newest: ' + last[-1].name + ')' if last else 'no checkpoint was lost'}; "
            f"free some space, then `localtune resume {run.id}`") from e


def _publish_checkpoint(run: RunDir, step: int, keep: int) -> Path:
    """Rename the written checkpoint of `step` into `checkpoints/`, rotate, tell (see commit_checkpoint)."""
    partial, final_dir = run.checkpoints_dir / ".partial", run.checkpoints_dir
    name = f"checkpoint-{step}"
    if os.environ.get(FAULT_KILL_IN_CHECKPOINT_ENV) == str(step):
        os._exit(137)  # test-only: die with the checkpoint written but not yet renamed
    src, dst = partial / name, final_dir / name
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)  # complete: only now can resume see it
    for old in run.complete_checkpoints()[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    run.write_status(last_checkpoint=name, step=step)
    append_event(run.events_path, "checkpoint", step=step, path=str(dst))
    return dst


class CommitCheckpoints:
    """Mixed into every method's trl trainer by the lifecycle (`committing`): the Trainer's
    checkpoint goes through `commit_checkpoint` (written under `checkpoints/.partial/`, renamed
    into place when complete, rotated). `localtune_run` and `localtune_keep` are set after the
    trainer is built."""

    localtune_run: RunDir
    localtune_keep: int

    def _save_checkpoint(self, model, trial):
        from localtune.distributed import this_rank

        write = lambda: super(CommitCheckpoints, self)._save_checkpoint(model, trial)  # noqa: E731
        rank = this_rank()
        if rank is None:
            commit_checkpoint(self.localtune_run, self.state.global_step, self.localtune_keep, write)
        else:
            commit_checkpoint_ranked(self.localtune_run, self.state.global_step, self.localtune_keep, write, rank.main)


@lru_cache(maxsize=None)
def committing(trainer_cls: type) -> type:
    """`trainer_cls` with CommitCheckpoints mixed in."""
    return type(f"Localtune{trainer_cls.__name__}", (CommitCheckpoints, trainer_cls), {})


def _elapsed_before(run: RunDir, resume: Path | None) -> float:
    """Training seconds up to the step `resume` holds (0 from the start): a resumed run's
    `elapsed_s` goes on from there."""
    if resume is None:
        return 0.0
    resume_step = int(resume.name.rsplit("-", 1)[1])
    done = [e for e in read_events(run.events_path) if e.get("kind") == "step" and e.get("step", 0) <= resume_step]
    return float(done[-1].get("elapsed_s") or 0.0) if done else 0.0


def _from_adapter(rcfg: dict[str, Any]) -> tuple[str | None, Path | None]:
    """The run a preference run continues (`from_run` in [run]) and its adapter folder
    (`from_adapter`); checked again here, since the folder could have gone since the launch."""
    from_run = rcfg.get("from_run") or None
    if not from_run:
        return None, None
    adapter = Path(str(rcfg.get("from_adapter") or ""))
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"run {from_run}, which this run continues, has no adapter any more ({adapter}); "
                        f"start a new run without --from, or from another finished run")
    return str(from_run), adapter


def _setup(run: RunDir, knobs, stop: StopRequest | None = None):
    """Everything the attempts share: the device and its precision, the model's files (a hub
    model's downloaded first, with `download` events), the tokenizer and its chat template, the
    run a preference run continues. A stop asked for while downloading ends the download
    (localtune.download.Stopped; the partial file stays for the next start)."""
    from localtune.data import chat_template_for
    from localtune.hardware import Hardware
    from localtune.methods import Setup
    from localtune.models import load_tokenizer
    from localtune.precision import DeviceFacts, precision_for

    rcfg = run.read_config()["run"]
    plan = json.loads(run.plan_path.read_text())
    backend = plan["hardware"]["backend"]
    hardware = Hardware.from_dict(plan["hardware"])  # what the launch probe found
    device = _device_of(backend, plan)
    _use_device(device)
    _cap_cuda_memory(device)  # benchmark-only; nothing unless LOCALTUNE_CUDA_MEMORY_CAP_GB is set
    # the live device's own facts (its compute capability, the running macOS), not the probe's
    precision = precision_for(knobs, DeviceFacts.live(backend, torch_index(device)))
    trust = bool(rcfg.get("trust_remote_code", False))
    model_ref, model_path = fetch_weights(run, rcfg, stop)
    tokenizer = load_tokenizer(model_ref)
    template = chat_template_for(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    from_run, from_adapter = _from_adapter(rcfg)
    setup = Setup(run=run, rcfg=rcfg, backend=backend, device=device, precision=precision, tokenizer=tokenizer,
                  template=template, seed=knobs.seed, partial=run.checkpoints_dir / ".partial",
                  from_adapter=from_adapter, from_run=from_run)
    return setup, hardware, model_path, trust


def fetch_weights(run: RunDir, rcfg: dict[str, Any], stop: StopRequest | None):
    """The run's model and the folder of its weights. A hub model's weights are downloaded here,
    not by the command that started the run: the download survives the TUI being closed, and
    its progress reaches every viewer as `download` events; a stop asked for meanwhile ends it
    (localtune.download.Stopped)."""
    from localtune.models import resolve_model, weights_location

    model_ref = resolve_model(rcfg["model"], trust_remote_code=bool(rcfg.get("trust_remote_code", False)))

    def progress(p) -> None:
        append_event(run.events_path, "download", **p.to_event())
        if stop is not None and stop.requested:  # `localtune stop` while downloading: the partial file stays
            from localtune.download import Stopped

            raise Stopped()

    return model_ref, weights_location(model_ref, log=lambda m: append_event(run.events_path, "warning", message=m),
                                       progress=progress)


def calibrate_run(run: RunDir, knobs, hardware):
    """Before step 1 of a fresh run (no checkpoint, not calibrated before), with `calibrate`
    on: measure a step in a separate process (localtune.calibrate), record the figures in
    a `calibrated` event and plan.json's "calibration", and return the knobs to train with
    (stepped down when the measurement is over the budget; a larger micro-batch with
    `auto_batch`), written into config.toml when they changed. A run calibration cannot
    measure yet (another engine or method) says so in plan.json only."""
    from localtune import calibrate as cal
    from localtune.events import atomic_write_json
    from localtune.models import shape_from_dict
    from localtune.precision import DeviceFacts

    if not knobs.calibrate or newest_usable_checkpoint(run) is not None:
        return knobs
    plan = json.loads(run.plan_path.read_text(encoding="utf-8"))
    if "calibration" in plan:  # an earlier start calibrated (and wrote its knobs)
        return knobs
    why = cal.supported(knobs)
    if why:
        plan["calibration"] = {"skipped": why}
        atomic_write_json(run.plan_path, plan)
        return knobs
    print(f"localtune worker: calibrating: {cal.CALIBRATION_STEPS} step of micro-batch "
          f"{knobs.per_device_train_batch_size} x {knobs.max_length} tokens in a separate process",
          file=sys.stderr, flush=True)
    m, measured, failed = cal.run_measurement(run.path), knobs, []
    while m.out_of_memory:  # the step itself did not fit: back off as training would, and measure again
        failed.append(f"{measured.per_device_train_batch_size} x {measured.max_length}")
        measured = _backoff_knobs(measured)  # UserError when nothing is left to shrink
        _write_knobs(run, measured)  # the measuring process reads config.toml
        m = cal.run_measurement(run.path)
    shape, facts = shape_from_dict(plan["model"]["shape"]), DeviceFacts.from_hardware(hardware)
    reference = bool(plan.get("reference_adapter"))
    estimate = plan["estimate"]
    if failed:
        from localtune.memory import estimate as estimate_of

        estimate = estimate_of(shape, measured, facts, reference_adapter=reference).to_dict()
    budget, estimate_bytes = int(plan["budget_bytes"]), int(estimate["total_bytes"])
    decision = cal.decide(m, measured, shape, facts, budget, estimate_bytes, auto_batch=knobs.auto_batch,
                          reference_adapter=reference)
    if failed:
        decision.action = "replanned"
        decision.note = (f"out of memory at micro-batch x tokens {', '.join(failed)}, then {decision.note}")
    changed = {k: v for k, v in decision.knobs.to_dict().items() if knobs.to_dict()[k] != v}
    if changed or failed:
        _write_knobs(run, decision.knobs)
    plan["calibration"] = cal.record(m, decision, estimate, budget, changed)
    atomic_write_json(run.plan_path, plan)
    append_event(run.events_path, "calibrated", estimate_bytes=estimate_bytes, measured_bytes=m.peak_bytes,
                 budget_bytes=budget, how=m.how, micro_batch=m.micro_batch, max_length=m.max_length,
                 seconds=m.seconds, action=decision.action, knobs=changed, note=decision.note)
    print(f"localtune worker: calibration: {decision.note}", file=sys.stderr, flush=True)
    run.write_status(notes=[*run.read_status().get("notes", []), f"calibration: {decision.note}"])
    return decision.knobs


def _setup_or_stop(run: RunDir, knobs, stop: StopRequest, setup=None):
    """`_setup` (or `setup(run, knobs, stop)`), or None after a stop asked for during the model's
    download (the run is then `stopped` at step 0, and `localtune resume` goes on downloading
    where it stopped)."""
    from localtune.download import Stopped

    try:
        return (setup or _setup)(run, knobs, stop)
    except Stopped:
        run.write_status(state="stopped", step=0, pid=None)
        append_event(run.events_path, "stopped", step=0, checkpoint=None)
        return None


class RankOutOfMemory(Exception):
    """A rank of several ran out of memory at optimizer step `step`: it cannot back off alone
    (the others wait for it in a collective), so it ends and the supervisor backs all of them off."""

    def __init__(self, step: int, message: str) -> None:
        super().__init__(message)
        self.step = step


def train(run: RunDir, stop: StopRequest, node_rank: int = 0) -> None:
    """Train the run to the end (or to a stop). Takes minutes to hours.

    The lifecycle: set up once; then one attempt per pass of the loop (load the base, let the
    run's method build its trainer, train from the newest usable checkpoint); running out of
    memory frees everything, backs the knobs off and goes round again; at the end the adapter is
    written to a temporary name and renamed. A plan of several ranks (GPUs, or CPU processes)
    is supervised by localtune.distributed, whose ranks run this same lifecycle: rank 0 writes,
    and out of memory ends the rank (RankOutOfMemory) for the supervisor to back all off."""
    from localtune.distributed import parallel_of, supervise, this_rank
    from localtune.knobs import knobs_from_mapping
    from localtune.methods import get_method

    knobs = knobs_from_mapping(run.read_config()["knobs"], str(run.config_path))
    if knobs.engine == "mlx":  # the same lifecycle pieces, driving MLX instead of a trl trainer
        from localtune.engines.mlx_sft import train_mlx

        return train_mlx(run, stop, knobs)
    par = parallel_of(json.loads(run.plan_path.read_text(encoding="utf-8")))
    rank = this_rank()
    if par["world_size"] > 1 and rank is None:
        return supervise(run, stop, knobs, par, node_rank)
    main = rank is None or rank.main
    method = get_method(knobs.method)
    setup = _setup_or_stop(run, knobs, stop)
    if setup is None:
        return
    setup, hardware, model_path, trust = setup
    if rank is None:
        knobs = calibrate_run(run, knobs, hardware)  # several ranks: the supervisor calibrated
    rcfg, backend, device, tokenizer = setup.rcfg, setup.backend, setup.device, setup.tokenizer
    data = method.prepare(setup, knobs)
    info = RunInfo(run=run, device=device, backend=backend, hardware=hardware, precision=setup.precision.describe(),
                   padding_free=method.padding_free(setup, knobs) or knobs.packing, method=method.name,
                   from_run=setup.from_run, step_metrics=method.step_metrics, eval_metrics=method.eval_metrics,
                   writes=main, parallel=par)
    sample_prompt = rcfg.get("sample_prompt") or "What is the capital of Italy?"
    sample_steps = int(rcfg.get("sample_steps") or knobs.eval_steps)
    if rank is not None and par["mode"] == "fsdp":
        sample_steps = 0  # a sample generates on rank 0 alone; FSDP's sharded weights need every rank

    fault_oom = os.environ.get(FAULT_OOM_AT_STEP_ENV)
    fault_rank = os.environ.get(FAULT_OOM_RANK_ENV)
    agree = (lambda flag: flag) if rank is None else agree_any
    extra_callbacks: list = [SaveByClock(knobs.save_minutes, agree=agree)]
    if fault_oom and (rank is None or not fault_rank or int(fault_rank) == rank.rank):
        extra_callbacks.append(InjectOom(int(fault_oom)))  # one instance: fires once per process
    guard = thermal_guard_for(rcfg.get("max_gpu_temp"), backend, hardware, run.events_path, stop, rank=rank,
                              devices=list(par.get("devices") or []))
    if guard is not None:  # first in the list: a stop asked for during a pause is seen at the end of that step
        extra_callbacks.insert(0, guard)
    if rank is not None:  # before everything else: every rank sees the same stop at the same step
        extra_callbacks.insert(0, AgreeOnStop(stop))
        extra_callbacks.append(AnnounceRank(run, rank))

    def paused_s() -> float:
        return sum(getattr(c, "paused_total_s", 0.0) for c in extra_callbacks)

    while True:  # one attempt per pass; running out of memory backs off and goes round again
        if rank is None:  # several ranks: the supervisor cleared it and chose the checkpoint
            shutil.rmtree(setup.partial, ignore_errors=True)  # whatever a crash left there is incomplete
        model = load_base_model(model_path, knobs, setup.precision, device, trust,
                                fsdp=rank is not None and par["mode"] == "fsdp")
        if setup.template.added_tokens:
            model.resize_token_embeddings(len(tokenizer))
        resume = newest_usable_checkpoint(run) if rank is None else resume_checkpoint(run)
        attempt = Attempt(resumed_from=resume.name if resume else None, elapsed_before=_elapsed_before(run, resume))
        events = RunEvents(info, attempt, stop, tokenizer=tokenizer, sample_prompt=sample_prompt,
                           sample_steps=sample_steps, paused_s=paused_s)
        cls, kwargs = method.trainer(setup, data, model, knobs, [*extra_callbacks, events])
        trainer = committing(cls)(**kwargs)
        trainer.localtune_run, trainer.localtune_keep = run, knobs.save_total_limit
        settle_trainable_weights(trainer.model, sharded=rank is not None and par["mode"] == "fsdp")
        attempt.begin()
        try:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            break
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; the rest goes on up
            if not _is_oom(e):
                raise
            oom_step = trainer.state.global_step + 1  # the optimizer step under way
            if rank is not None:
                raise RankOutOfMemory(oom_step, str(e).splitlines()[0] if str(e) else "out of memory") from e
        # out of the except block, so the traceback (which holds the training frames) is gone too
        trainer.accelerator.free_memory()
        trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
        if hasattr(trainer, "ref_model"):
            trainer.ref_model = None
        del trainer, model, kwargs
        _free_memory(backend)
        knobs = back_off(run, knobs, oom_step)  # UserError when nothing is left to shrink
    step = trainer.state.global_step
    gathered = None
    if rank is not None and par["mode"] == "fsdp" and not stop.requested:
        gathered = _gather_fsdp_adapter(run, trainer)  # every rank takes part; rank 0 writes
    if not main:
        return
    shutil.rmtree(setup.partial, ignore_errors=True)  # only trl's model card (README.md) is left there
    if stop.requested:
        last = run.complete_checkpoints()
        run.write_status(state="stopped", step=step, pid=None)
        append_event(run.events_path, "stopped", step=step, checkpoint=last[-1].name if last else None)
        return
    if gathered is not None:
        publish_adapter(run, tokenizer, method.card(knobs, setup),
                        lambda tmp: shutil.copytree(gathered, tmp, dirs_exist_ok=True))
        shutil.rmtree(gathered, ignore_errors=True)
    else:
        _save_adapter(run, trainer.model, tokenizer, method.card(knobs, setup))
    elapsed = attempt.elapsed()
    run.write_status(state="completed", step=step, pid=None, adapter=str(run.adapter_dir))
    append_event(run.events_path, "finished", step=step, adapter=str(run.adapter_dir),
                 train_loss=getattr(result, "training_loss", None), elapsed_s=round(elapsed, 1),
                 tokens=int(trainer.state.num_input_tokens_seen), peak_memory_bytes=_peak_memory_bytes(device))


def _gather_fsdp_adapter(run: RunDir, trainer) -> Path:
    """A sharded run's final adapter: its pieces are spread over the ranks, so every rank calls
    the Trainer's save with FSDP's full state dict (peft's docs, accelerate/fsdp.md: set
    FULL_STATE_DICT before the last save), which gathers the adapter's weights and writes them
    from rank 0 in PEFT's format. Returns the folder (complete once all ranks are back)."""
    from localtune.distributed import barrier

    folder = run.path / ".adapter.fsdp"
    trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(folder))
    barrier()
    return folder


def _save_adapter(run: RunDir, model, tokenizer, card: dict[str, Any]) -> None:
    """The trained adapter (the policy's alone: a DPO run continuing another run's adapter also
    holds a frozen copy of it, "ref", that is not saved) through `publish_adapter`."""
    adapters = list(getattr(model, "peft_config", {}) or {})
    publish_adapter(run, tokenizer, card, lambda tmp: model.save_pretrained(
        tmp, selected_adapters=["default"] if "default" in adapters else None))


def publish_adapter(run: RunDir, tokenizer, card: dict[str, Any], write) -> None:
    """The final adapter, whatever the engine: `write(folder)` writes it there in PEFT's format;
    the tokenizer and `localtune.json` (how it was trained) go beside it; the folder is written
    under a temporary name and renamed to `adapter/`."""
    from localtune.events import atomic_write_json

    tmp = run.path / ".adapter.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / "localtune.json", {"run": run.id, **card})
    if run.adapter_dir.exists():
        shutil.rmtree(run.adapter_dir)
    os.replace(tmp, run.adapter_dir)


def _take_run(run: RunDir) -> None:
    """Hold the run's lock: the one the launcher took and handed over (LOCK_FD_ENV names the
    inherited descriptor), or, for a worker started by hand, a fresh one (UserError when
    another process holds it). From here on the run is this worker's: the launcher's mark
    (`launched`, which makes a worker lost before this point show as failed) goes."""
    fd = os.environ.pop(LOCK_FD_ENV, None)  # not for the processes this one starts
    if fd is not None:
        run.adopt_lock(int(fd))
    else:
        run.acquire_lock()
    if run.read_status().get("launched"):
        run.write_status(launched=None)


def rank_main(run: RunDir) -> int:
    """One rank of several (`python -m localtune.worker --rank RUN_DIR`, started by accelerate's
    launcher for the supervisor): train, and leave the outcome in ranks/rank-R.json for the
    supervisor, which alone decides the run's state on a failure (localtune.distributed)."""
    from localtune.distributed import is_comm_error, this_rank, write_rank_file

    rank = this_rank()
    if rank is None:
        print("localtune worker: --rank is for the processes accelerate starts for a run's supervisor",
              file=sys.stderr)
        return 2
    stop = StopRequest()
    signal.signal(signal.SIGTERM, stop)
    write_rank_file(run, rank, pid=os.getpid(), outcome=None)
    try:
        train(run, stop)
        write_rank_file(run, rank, outcome="stopped" if stop.requested else "completed")
        return 0
    except BaseException as e:  # noqa: BLE001 - every failure must reach the supervisor
        traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        fields: dict[str, Any] = {"error": msg}
        if isinstance(e, RankOutOfMemory):
            fields.update(outcome="oom", step=e.step)
        elif isinstance(e, OSError) and e.errno == errno.ENOSPC:
            fields.update(outcome="user_error", error=f"the disk is full ({e.filename or run.path}); free some "
                                                      f"space, then `localtune resume {run.id}`")
        elif isinstance(e, UserError):
            fields["outcome"] = "user_error"
        elif is_comm_error(e):
            fields["outcome"] = "comm"
        else:
            fields.update(outcome="error", error=f"{type(e).__name__}: {msg}")
        write_rank_file(run, rank, **fields)
        return 75 if isinstance(e, RankOutOfMemory) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--rank":
        return rank_main(RunDir(Path(argv[1]).resolve()))
    node_rank = 0
    if len(argv) == 3 and argv[1] == "--node-rank" and argv[2].isdigit():
        node_rank, argv = int(argv[2]), argv[:1]
    if len(argv) != 1:
        print("usage: python -m localtune.worker RUN_DIR [--node-rank K]", file=sys.stderr)
        return 2
    run = RunDir(Path(argv[0]).resolve())
    stop = StopRequest()
    signal.signal(signal.SIGTERM, stop)
    if node_rank > 0:  # another machine's ranks of a run machine 0 supervises (localtune.distributed)
        return _node_main(run, stop, node_rank)
    try:
        _take_run(run)
    except UserError as e:
        print(f"localtune worker: {e}", file=sys.stderr)
        return 1
    try:
        notify = bool(run.read_config()["run"].get("notify"))
    except Exception:  # noqa: BLE001 - a broken config fails in train(), with its message
        notify = False
    try:
        train(run, stop, node_rank)
        if notify and run.read_status().get("state") == "completed":
            status = run.read_status()
            loss = status.get("loss")
            desktop_notify(f"localtune: run {run.id} finished",
                           f"{status.get('step')} steps" + (f", loss {loss:.4g}" if isinstance(loss, float) else "")
                           + f"; adapter in {run.adapter_dir}")
        return 0
    except BaseException as e:  # noqa: BLE001 - every failure must reach the status and the log
        traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            msg = (f"the disk is full ({e.filename or run.path}); free some space, then "
                   f"`localtune resume {run.id}`")
        elif not isinstance(e, UserError):
            msg = f"{type(e).__name__}: {msg}"
        run.write_status(state="failed", error=msg, pid=None)
        append_event(run.events_path, "failed", error=msg, log=str(run.log_path))
        if notify:
            desktop_notify(f"localtune: run {run.id} failed", msg)
        return 1
    finally:
        run.release_lock()


def _node_main(run: RunDir, stop: StopRequest, node_rank: int) -> int:
    """Machine `node_rank` (> 0) of a run on several machines: its ranks, until the run ends.
    Machine 0 holds the run's lock and writes its state; a failure here reaches it through the
    ranks (a collective fails there) and is only printed here."""
    from localtune.distributed import parallel_of

    try:
        nodes = parallel_of(json.loads(run.plan_path.read_text(encoding="utf-8")))["nodes"]
    except (OSError, ValueError) as e:
        print(f"localtune worker: {run.path} is not a run folder this machine can read ({e})", file=sys.stderr)
        return 1
    if node_rank >= nodes:
        print(f"localtune worker: run {run.id} is planned for {nodes} machine{'s' if nodes != 1 else ''} "
              f"(--node-rank 0 to {nodes - 1}); --node-rank {node_rank} is not one of them", file=sys.stderr)
        return 2
    try:
        train(run, stop, node_rank)
        return 0
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
