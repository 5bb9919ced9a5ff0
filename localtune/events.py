"""The event log: the one contract between the training worker and every viewer.

The worker appends one JSON object per line to `RUN_DIR/events.jsonl`; the headless progress
view, the TUI dashboard and the tests all read the same file. Every event has `t` (unix time,
seconds) and `kind`; the other fields per kind are listed in `EVENT_FIELDS`, the one place
they are defined. A viewer must ignore fields and kinds it does not know.

A line is written with one `write` call and flushed, so a reader sees whole lines; a reader
that meets a partial last line (the worker is mid-write) leaves it for the next read.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

EVENT_FIELDS: dict[str, dict[str, str]] = {
    "started": {
        "pid": "the worker's process id",
        "resumed_from": "checkpoint folder name, or null for a fresh start",
        "max_steps": "optimizer steps the run will take",
        "device": "what the model trains on, e.g. 'cpu' or 'cuda:0'; 'mlx:gpu' or 'mlx:cpu' on the MLX engine",
        "precision": "what it computes in, e.g. 'bfloat16', 'float32', 'bfloat16 autocast' (over float32 "
                     "weights, on CPUs with native bf16), 'nf4 weights, bfloat16 compute'",
        "padding_free": "whether batches are laid end to end without padding (or packed)",
        "method": "the training method: 'sft', 'dpo' or 'orpo'",
        "from_run": "the run whose adapter this one continues (dpo, orpo), or null",
    },
    "download": {
        "repo": "the hub model being downloaded before training (org/name)",
        "file": "the file under way (its path in the repository)",
        "bytes_done": "bytes of the files to fetch that are on disk (a resumed file's earlier part included)",
        "bytes_total": "bytes of the files to fetch (those not in the Hugging Face cache yet)",
        "bytes_per_s": "transfer speed since the download began, or null before the first chunk",
        "eta_s": "seconds left at that speed, or null",
    },
    "step": {
        "step": "optimizer steps done",
        "max_steps": "optimizer steps in all",
        "epoch": "epochs done (fractional)",
        "loss": "training loss averaged since the last step event",
        "learning_rate": "learning rate used",
        "grad_norm": "gradient norm before clipping (may be null)",
        "tokens_per_s": "non-padding tokens trained per second since the last step event",
        "elapsed_s": "seconds of training in this run, resumes included",
    },
    "eval": {"step": "optimizer steps done", "eval_loss": "loss on the evaluation rows"},
    "sample": {"step": "optimizer steps done", "prompt": "the fixed prompt", "text": "the greedy answer"},
    "hardware": {
        "memory_used_bytes": "memory in use on the training device (RSS on the CPU; MLX's active and cached "
                             "memory on Apple's GPU under the MLX engine)",
        "memory_total_bytes": "the device's memory",
        "utilization_pct": "GPU utilisation, or null",
        "temperature_c": "GPU temperature, or null",
        "power_w": "GPU power draw, or null",
        "cpu_pct": "CPU use of the machine",
        "ram_used_bytes": "system RAM in use",
    },
    "checkpoint": {"step": "optimizer step of the checkpoint", "path": "its folder, complete"},
    "oom_backoff": {
        "step": "step the out-of-memory error hit",
        "per_device_train_batch_size": "the new micro-batch",
        "gradient_accumulation_steps": "the new accumulation (the effective batch is unchanged)",
        "max_length": "the new maximum sequence length",
        "resume_from": "checkpoint training goes back to",
    },
    "calibrated": {
        "estimate_bytes": "the plan's estimate", "measured_bytes": "the peak measured on this device",
        "budget_bytes": "the plan's budget", "how": "how the peak was read",
        "micro_batch": "the micro-batch measured", "max_length": "tokens per row measured",
        "seconds": "what calibration took", "action": "kept | replanned | larger micro-batch fits | "
        "larger micro-batch taken", "knobs": "the knobs it changed (new values)", "note": "what it found, one line"},
    "warning": {"message": "something a person should know"},
    "thermal_pause": {"step": "optimizer steps done", "temperature_c": "the GPU's temperature",
                      "max_gpu_temp_c": "the limit it is over (--max-gpu-temp)"},
    "thermal_resume": {"step": "optimizer steps done", "temperature_c": "the GPU's temperature now",
                       "paused_s": "seconds the run waited"},
    "stopping": {"reason": "why the worker is stopping (e.g. 'SIGTERM')"},
    "finished": {"step": "optimizer steps done", "adapter": "folder of the final adapter",
                 "train_loss": "mean training loss", "elapsed_s": "seconds of training",
                 "tokens": "non-padding tokens trained, resumes included",
                 "peak_memory_bytes": "peak memory of this attempt: the worker's peak RSS on the CPU and Apple, "
                                      "torch.cuda.max_memory_allocated on CUDA, mx.get_peak_memory() on the "
                                      "MLX engine (its arrays, on Apple's GPU or the CPU)"},
    "stopped": {"step": "optimizer steps done", "checkpoint": "the checkpoint to resume from"},
    "failed": {"error": "what went wrong, one line", "log": "the worker log with the traceback"},
    "interrupted": {"error": "several ranks only: which rank ended without a word, and where resume starts",
                    "log": "the worker log"},
}
"""Each event kind and its fields, besides `t` and `kind`."""

METHOD_FIELDS: dict[str, dict[str, str]] = {
    "step": {
        "rewards_chosen": "dpo, orpo: the chosen answers' mean implicit reward (beta x log-ratio to the reference)",
        "rewards_rejected": "dpo, orpo: the rejected answers' mean implicit reward",
        "reward_margin": "dpo, orpo: mean of chosen minus rejected reward",
        "reward_accuracy": "dpo, orpo: fraction of pairs whose chosen reward is the higher",
        "log_odds_ratio": "orpo: mean log odds ratio of chosen over rejected",
        "nll_loss": "orpo: the chosen answers' negative log-likelihood",
    },
    "eval": {
        "eval_reward_accuracy": "dpo, orpo: preference accuracy on the evaluation pairs",
        "eval_reward_margin": "dpo, orpo: mean reward margin on the evaluation pairs",
    },
}
"""Fields a kind carries only for some training methods (an SFT run's events have none of them)."""

RANK_FIELDS: dict[str, dict[str, str]] = {
    "started": {
        "world_size": "how many ranks train together (GPUs, or CPU processes)",
        "parallel_mode": "'ddp' (each rank holds the model) or 'fsdp' (sharded)",
        "devices": "the CUDA ordinals of the ranks' GPUs ([] on the CPU)",
    },
    "hardware": {
        "devices": "each rank's device: {rank, name, index, memory_used_bytes, memory_total_bytes, "
                   "utilization_pct, temperature_c, power_w}",
    },
}
"""Fields a kind carries only in a run of several ranks (localtune.distributed)."""

KINDS = tuple(EVENT_FIELDS)
END_KINDS = ("finished", "stopped", "failed", "interrupted")
"""The kinds that end an attempt. A later `started` (a resume) begins a new one."""


def append_event(path: Path, kind: str, /, **fields: Any) -> dict[str, Any]:
    """Append one event to the log at `path` and return it."""
    if kind not in EVENT_FIELDS:
        raise ValueError(f"unknown event kind {kind!r}")  # our bug, not the user's
    event = {"t": round(time.time(), 3), "kind": kind, **fields}
    line = json.dumps(event, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
    return event


class EventReader:
    """Reads the new whole lines of an events file since the last call (a `tail -f`)."""

    def __init__(self, path: Path, *, offset: int = 0):
        """`offset`: where to start reading, in bytes (the file's size then: only what comes next)."""
        self.path = Path(path)
        self._offset = offset

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # leave a partial last line for the next read
        self._offset += end
        out = []
        for line in chunk[:end].splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn line after a crash; the next line is whole again
        return out


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every whole event in the file."""
    return EventReader(path).read_new()


def last_event(path: Path, kind: str, *, block: int = 1 << 16) -> dict[str, Any] | None:
    """The newest whole event of `kind`, read from the end of the file backwards: a long run's
    log holds megabytes, and a listing wants only its last step."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        pos = f.seek(0, os.SEEK_END)
        carry = b""  # the start of a line whose beginning is in the block before
        while pos > 0:
            size = min(block, pos)
            pos -= size
            f.seek(pos)
            lines = (f.read(size) + carry).split(b"\n")
            carry = lines.pop(0) if pos > 0 else b""
            for line in reversed(lines):
                if kind.encode() not in line:
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written, or torn by a crash
                if event.get("kind") == kind:
                    return event
    return None


def iter_kind(events: list[dict[str, Any]], kind: str) -> Iterator[dict[str, Any]]:
    return (e for e in events if e.get("kind") == kind)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old file or the new one, never
    half of either (written to a temporary name, synced, renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    """`atomic_write_text` of `data` as JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, default=str))
