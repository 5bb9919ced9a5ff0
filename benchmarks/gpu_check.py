"""Everything localtune needs measured on a CUDA GPU, in one call of a lent GPU machine.

    bash benchmarks/gpu_check.sh run                          on the GPU machine (installs the
                                                              carried wheels, then runs this)
    python benchmarks/gpu_check.py --rehearse-on-cpu --out D  here: every stage at tiny sizes
                                                              (or `bash benchmarks/gpu_check.sh rehearse`)

The model: SmolLM2-135M-Instruct's architecture and real tokenizer (`.gpu-model/model`, made by
`gpu_check.sh prepare` from the converted built-in model) with weights drawn from a fixed seed
on this machine: the built-in GGUF is too big to travel, and memory and speed do not depend on
the weights' values (why the decoder weights are drawn smaller than transformers' default: see
LINEAR_STD). Losses start near ln(49152) = 10.8 and the chat reply is noise.
The data: the first rows of `shared/bench/varied_lengths.jsonl` (`.gpu-model/rows.jsonl`).

Every localtune run is made as `localtune train` makes it (`make_plan` on the probed machine,
then the run directory of `launch.prepare_run` with the data checked, then `launch.start_worker`,
which runs `python -m localtune.worker RUN_DIR`), except that the probe's first GPU is capped
at 24 GiB before planning (the plan a 24 GB card gets) and the worker caps torch's allocator at
24 GiB too (`LOCALTUNE_CUDA_MEMORY_CAP_GB=24`, documented in localtune/worker.py; it also writes
the process's `max_memory_reserved` into worker.log).

Stages (each prints a table; all tables again at the end, and in OUT/gpu_check.md):

1. QLoRA on CUDA through the real worker: the 24 GB plan (profile cuda-24gb) with 4-bit NF4
   double quantisation pinned, a few optimizer steps, checkpoints, the `started` event's
   precision, whether flash-attention 2 was used, the peak memory; then
   `localtune export RUN --format merged` and `--format gguf`, and one chat reply through
   `localtune.chat.ChatSession`.
2. The memory estimate against the measured peak: a grid of 4-bit on/off x gradient
   checkpointing on/off x micro-batch 1/4 x max_length 512/2048, each a 3-step worker run on
   rows long enough that every micro-batch is exactly micro-batch x max_length tokens (the
   estimate's worst case). `plan.estimate.allocated_bytes` (the tensor parts) against the
   worker's `max_memory_allocated` (the `finished` event's `peak_memory_bytes`), the estimate's
   total against `max_memory_reserved` (worker.log). Several runs at a time (each process has
   its own allocator and its own peak counters, so they do not disturb each other's figures).
3. Tokens/s against the plain recipe (benchmarks/plain_recipe.py --device cuda): the same rows,
   one epoch, the knobs benchmarks/train_speed.py pins on the CPU; localtune once with its own
   24 GB plan and once with 16-bit weights pinned (what the recipe loads). Tokens/s, peak
   memory and final loss of each, and the ratios. Runs one at a time, alone on the GPU.

Time: `--budget-s` (default 420) is shared out so that every stage gets its turn; a run that
would not finish in its stage's time is not started, and one that overruns is stopped (SIGTERM:
the worker checkpoints and exits; then SIGKILL), so something always comes back. Stages 1 and 2
run side by side on the GPU (`--no-overlap` runs them one after the other).

Outputs under `--out`: gpu_check.json (every figure), gpu_check.md (the tables),
worker_logs.txt (the end of each run's worker.log and of each failed command's stderr). Exit
status 1 when anything failed (a stage, a run, an export); budget skips are not failures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GPU_MODEL = REPO / ".gpu-model"
CAP_GB = 24
GiB = 2**30
SEED = 1234
"""The seed of the random weights (the same model on every run of this check)."""
LINEAR_STD = 0.005
"""Standard deviation of the random decoder weights (transformers' `initializer_range`; the
embeddings keep its default 0.02). The merged export checks that the saved 16-bit model's logits
match base + adapter within 2% of the largest logit. At transformers' 0.02 a random 30-layer
network amplifies the bf16 rounding of the merged weights so much that the check failed (9.9%
after 2 QLoRA steps on the CPU); with decoder weights at 0.005 the same kind of adapter merged
within 0.22% while leaving the adapter out moved the logits by 23.7%, so the check still tells
a merged adapter from a missing one. Trained weights are well conditioned (0.9% measured on
the real model). Memory and speed do not depend on the values."""
CAP_ENV = "LOCALTUNE_CUDA_MEMORY_CAP_GB"  # localtune.worker.CUDA_MEMORY_CAP_ENV
PEAK_RE = re.compile(r"cuda memory peak: max_memory_allocated=(\d+) max_memory_reserved=(\d+)")
CHAT_PROMPT = "What is the capital of Italy?"

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
_print_lock = threading.Lock()


def say(msg: str) -> None:
    with _print_lock:
        print(msg, flush=True)


# ------------------------------------------------------------------------------------ settings


@dataclasses.dataclass(frozen=True)
class GridPoint:
    load_in_4bit: bool
    gradient_checkpointing: bool
    micro_batch: int
    max_length: int

    @property
    def name(self) -> str:
        return (f"{'4bit' if self.load_in_4bit else '16bit'} {'gc' if self.gradient_checkpointing else 'nogc'} "
                f"{self.micro_batch}x{self.max_length}")


def _grid(lengths: tuple[int, int], batches: tuple[int, int]) -> list[GridPoint]:
    """All 16 points, the most telling first: the corners (small and large, both weights), then
    the rest; a short budget runs the head of the list."""
    short, long = lengths
    small, big = batches
    first = [GridPoint(False, False, big, long), GridPoint(True, True, big, long),
             GridPoint(False, True, big, long), GridPoint(True, False, big, long),
             GridPoint(False, False, small, short), GridPoint(True, True, small, short),
             GridPoint(False, True, small, long), GridPoint(True, True, small, long)]
    rest = [GridPoint(q, g, b, n) for q in (False, True) for g in (False, True) for b in batches
            for n in lengths if GridPoint(q, g, b, n) not in first]
    return first + rest


@dataclasses.dataclass(frozen=True)
class Settings:
    cuda: bool
    budget_s: float
    shares_s: dict[int, float]
    """Each stage's share of the budget: stage k may run until the budget's end minus the
    shares of the stages after it (so time left over goes on to the next stage)."""
    s1_pins: dict[str, Any]
    s1_sample_steps: int
    chat_tokens: int
    s1_train_on_inputs: bool
    """The CPU rehearsal trains on whole rows: at its 64 tokens most replies would be cut off."""
    grid: list[GridPoint]
    grid_pins: dict[str, Any]
    grid_min_s: float
    """Don't start a grid run with less time than this left in the stage."""
    concurrency: int
    s3_rows: int
    s3_min_s: float
    overlap: bool


QLORA = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
GRID_COMMON = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "optim": "adamw_torch",
               "gradient_accumulation_steps": 1, "max_steps": 3, "save_steps": 100000, "save_minutes": 0.0,
               "eval_steps": 100000, "logging_steps": 1, "bnb_4bit_quant_type": "nf4",
               "bnb_4bit_use_double_quant": True}


def settings(args: argparse.Namespace) -> Settings:
    if args.rehearse_on_cpu:
        return Settings(
            cuda=False, budget_s=args.budget_s or 3600, shares_s={1: 900, 2: 900, 3: 900},
            s1_pins={**QLORA, "max_steps": 2, "save_steps": 1, "eval_steps": 100000, "logging_steps": 1,
                     "max_length": 64, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                     "save_minutes": 0.0},
            s1_sample_steps=2, chat_tokens=8, s1_train_on_inputs=True,
            grid=_grid((32, 64), (1, 2))[: args.grid_points or 2], grid_pins=GRID_COMMON, grid_min_s=5,
            concurrency=args.concurrency or 1, s3_rows=args.rows or 8, s3_min_s=5, overlap=args.overlap is True)
    return Settings(
        cuda=True, budget_s=args.budget_s or 420, shares_s={1: 130, 2: 120, 3: 170},
        s1_pins={**QLORA, "max_steps": 10, "save_steps": 5, "eval_steps": 100000, "logging_steps": 1,
                 "save_minutes": 0.0},
        s1_sample_steps=5, chat_tokens=24, s1_train_on_inputs=False,
        grid=_grid((512, 2048), (1, 4))[: args.grid_points or 16], grid_pins=GRID_COMMON, grid_min_s=40,
        concurrency=args.concurrency or 4, s3_rows=args.rows or 256, s3_min_s=35, overlap=args.overlap is not False)


class Budget:
    def __init__(self, s: Settings, stages: list[int]) -> None:
        self.t0 = time.monotonic()
        self.end = self.t0 + s.budget_s
        self.shares = {k: v for k, v in s.shares_s.items() if k in stages}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def deadline(self, stage: int, overlap_with: tuple[int, ...] = ()) -> float:
        """The stage may run until the budget's end minus the later stages' shares."""
        later = [k for k in self.shares if k > stage and k not in overlap_with]
        return self.end - sum(self.shares[k] for k in later)


# --------------------------------------------------------------------------------- the machine


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "gguf",
                 "tokenizers", "safetensors", "flash_attn"):
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def capped_machine(cuda: bool):
    """The probe, with the first GPU shown as a 24 GiB card with all of it free (the plan such a
    card gets); the CPU's probe as it is."""
    from localtune.hardware import probe

    hw = probe()
    if not cuda:
        return hw
    if hw.backend != "cuda":
        raise RuntimeError(f"the probe found no NVIDIA GPU (backend {hw.backend}; notes: {hw.notes})")
    d = hw.devices[0]
    cap = CAP_GB * GiB
    hw.devices = [dataclasses.replace(d, total_bytes=cap, free_bytes=cap)]
    hw.notes.append(f"gpu_check: {d.name} ({d.total_bytes / GiB:.0f} GiB) planned as a {CAP_GB} GiB card")
    return hw


def build_model(dest: Path) -> Path:
    """SmolLM2-135M-Instruct's architecture with weights from SEED, saved in bf16 with the real
    tokenizer files beside it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(SEED)
    config = AutoConfig.from_pretrained(GPU_MODEL / "model")
    embedding_std, config.initializer_range = config.initializer_range, LINEAR_STD
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, embedding_std)  # tied to lm_head
    model.config.initializer_range = embedding_std
    model.save_pretrained(dest)
    for f in (GPU_MODEL / "model").iterdir():
        if f.name != "config.json":
            shutil.copy2(f, dest / f.name)
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    say(f"model: SmolLM2-135M-Instruct architecture, {n / 1e6:.1f}M parameters, random weights (seed {SEED}, "
        f"decoder std {LINEAR_STD}), bf16, in {dest}")
    return dest


def long_text_rows(rows: Path, dest: Path, n: int, min_chars: int) -> Path:
    """`n` text rows of at least `min_chars` characters, each made of consecutive conversations
    of the benchmark file, so that every row is longer than the longest max_length tried."""
    texts = []
    for line in rows.read_text(encoding="utf-8").splitlines():
        msgs = json.loads(line)["messages"]
        texts.append(" ".join(m["content"] for m in msgs))
    out, cur, i = [], "", 0
    while len(out) < n:
        cur += texts[i % len(texts)] + "\n\n"
        i += 1
        if len(cur) >= min_chars:
            out.append(json.dumps({"text": cur}))
            cur = ""
    dest.write_text("\n".join(out) + "\n", encoding="utf-8")
    return dest


# ---------------------------------------------------------------------------------- worker runs


@dataclasses.dataclass
class RunResult:
    name: str
    run_id: str = ""
    ok: bool = False
    seconds: float = 0.0
    timed_out: bool = False
    error: str = ""
    started: dict[str, Any] = dataclasses.field(default_factory=dict)
    finished: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    checkpoints: list[str] = dataclasses.field(default_factory=list)
    samples: list[str] = dataclasses.field(default_factory=list)
    max_allocated: int | None = None
    max_reserved: int | None = None
    knobs: dict[str, Any] = dataclasses.field(default_factory=dict)
    estimate: dict[str, Any] = dataclasses.field(default_factory=dict)
    log_tail: str = ""


def plan_for(model_dir: Path, hw, pins: dict[str, Any]):
    from localtune.models import resolve_model
    from localtune.plan import make_plan

    plan = make_plan(hw, resolve_model(str(model_dir)), pinned=pins)
    if not plan.fits:
        raise RuntimeError(f"the plan does not fit: {plan.advice}")
    return plan


def make_run(plan, data: Path, run_id: str, **run_cfg: Any):
    """A run directory as `localtune train` writes it (launch.prepare_run), under a chosen id:
    runs started in the same second would get the same default id."""
    from localtune.data import load_data
    from localtune.launch import default_run_config, new_run

    cfg = default_run_config(model=plan.model.location, data=str(data), **run_cfg)
    loaded = load_data(cfg["data"])
    run = new_run(run_cfg=cfg, plan=plan, run_id=run_id)
    run.write_status(rows=len(loaded.examples), skipped_rows=len(loaded.skipped))
    return run


def run_worker(run, name: str, deadline: float, *, echo_steps: bool = False) -> RunResult:
    """Start the worker on `run` and wait for it, stopping it at `deadline` (monotonic)."""
    from localtune.events import read_events
    from localtune.launch import request_stop, start_worker

    res = RunResult(name, run.id)
    t0 = time.monotonic()
    proc = start_worker(run)
    seen = 0
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                res.timed_out = True
                with contextlib.suppress(Exception):
                    request_stop(run)  # the worker ends the step, checkpoints and exits
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                break
            if echo_steps:
                events = read_events(run.events_path)
                for e in events[seen:]:
                    if e["kind"] == "step":
                        say(f"  [{name}] step {e['step']}/{e['max_steps']} loss {e['loss']:.4f} "
                            f"{e.get('tokens_per_s') or 0:,.0f} tokens/s")
                    elif e["kind"] in ("calibrated", "started", "checkpoint", "sample", "oom_backoff", "warning", "failed"):
                        say(f"  [{name}] {e['kind']}: " + ", ".join(
                            f"{k}={v!r:.100}" if isinstance(v, str) else f"{k}={v}"
                            for k, v in e.items() if k not in ("t", "kind")))
                seen = len(events)
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res.seconds = time.monotonic() - t0
    events = read_events(run.events_path)
    for e in events:
        if e["kind"] == "started" and not res.started:
            res.started = e
        elif e["kind"] == "finished":
            res.finished = e
        elif e["kind"] == "step":
            res.steps.append(e)
        elif e["kind"] == "checkpoint":
            res.checkpoints.append(Path(e["path"]).name)
        elif e["kind"] == "sample":
            res.samples.append(e["text"])
    log = run.log_path.read_text(encoding="utf-8", errors="replace") if run.log_path.is_file() else ""
    m = PEAK_RE.search(log)
    if m:
        res.max_allocated, res.max_reserved = int(m.group(1)), int(m.group(2))
    elif res.finished:
        res.max_allocated = res.finished.get("peak_memory_bytes")
    res.log_tail = "\n".join(log.splitlines()[-60:])
    res.ok = bool(res.finished)
    if not res.ok:
        status = run.read_status()
        res.error = ("stopped at the time limit" if res.timed_out else "") or status.get("error") or \
            f"no finished event (state {status.get('state')}, exit code {proc.returncode})"
    return res


def final_loss(losses: list[float]) -> float | None:
    return statistics.fmean(losses[-3:]) if losses else None


# --------------------------------------------------------------------------------- stage 1


def stage1(s: Settings, ctx: dict[str, Any], deadline: float) -> dict[str, Any]:
    from localtune.precision import DeviceFacts, precision_for

    out: dict[str, Any] = {}
    plan = plan_for(ctx["model_dir"], ctx["hw"], s.s1_pins)
    out["profile"] = plan.profile.name
    out["knobs"] = plan.knobs.to_dict()
    out["estimate_total_bytes"] = plan.estimate.total_bytes
    out["estimate_allocated_bytes"] = plan.estimate.allocated_bytes
    out["adjustments"] = [a.to_dict() for a in plan.adjustments]
    k = plan.knobs
    say(f"[stage 1] plan: profile {plan.profile.name}, 4-bit {k.load_in_4bit} ({k.bnb_4bit_quant_type}, double quant "
        f"{k.bnb_4bit_use_double_quant}), r {k.r}, micro-batch {k.per_device_train_batch_size} x "
        f"{k.gradient_accumulation_steps}, max_length {k.max_length}, checkpointing {k.gradient_checkpointing}, "
        f"{k.optim}, {k.max_steps} steps")
    facts = DeviceFacts.live("cuda", 0) if s.cuda else DeviceFacts.live("cpu")
    prec = precision_for(k, facts)
    out["flash_attention_2"] = prec.attn_implementation == "flash_attention_2"
    out["flash_attn_installed"] = importlib.util.find_spec("flash_attn") is not None
    run = make_run(plan, ctx["rows"], "s1-qlora", sample_steps=s.s1_sample_steps,
                   train_on_inputs=s.s1_train_on_inputs)
    res = run_worker(run, "stage 1", deadline - 60, echo_steps=True)  # 60 s kept for export and chat
    out["run"] = dataclasses.asdict(res)
    out["run_dir"] = str(run.path)
    if not res.ok:
        raise RuntimeError(f"the QLoRA run failed: {res.error}\n{res.log_tail}")
    out["precision"] = res.started.get("precision")
    out["padding_free"] = res.started.get("padding_free")
    out["device"] = res.started.get("device")
    fin = res.finished
    out["train_tokens_per_s"] = fin["tokens"] / fin["elapsed_s"] if fin.get("elapsed_s") else None

    env = dict(os.environ)
    for fmt in ("merged", "gguf"):
        if fmt == "gguf" and importlib.util.find_spec("gguf") is None:
            out[f"export_{fmt}"] = {"skipped": "the gguf package is not installed"}
            continue
        left = deadline - time.monotonic()
        if left < 20:
            out[f"export_{fmt}"] = {"skipped": f"budget: {left:.0f} s left in stage 1"}
            continue
        t = time.monotonic()
        cmd = [sys.executable, "-m", "localtune", "export", run.id, "--format", fmt, "--json"]
        if fmt == "gguf" and ctx.get("no_llama_cpp"):
            env = {**env, "PYTHONPATH": f"{ctx['no_llama_cpp']}{os.pathsep}{env.get('PYTHONPATH', '')}"}
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(10, left - 5))
        except subprocess.TimeoutExpired:
            out[f"export_{fmt}"] = {"ok": False, "error": "timed out", "seconds": round(time.monotonic() - t, 1)}
            continue
        entry: dict[str, Any] = {"ok": p.returncode == 0, "seconds": round(time.monotonic() - t, 1)}
        if p.returncode == 0:
            r = json.loads(p.stdout)
            entry.update(checks=r["checks"], notes=r["notes"],
                         files={Path(f).name: Path(f).stat().st_size for f in r["files"]})
        else:
            entry["error"] = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
            entry["stderr_tail"] = "\n".join(p.stderr.splitlines()[-30:])
        out[f"export_{fmt}"] = entry
        say(f"[stage 1] export {fmt}: {'ok' if entry['ok'] else 'FAILED: ' + entry['error']} in {entry['seconds']} s")

    if deadline - time.monotonic() < 10:
        out["chat"] = {"skipped": "budget"}
        return out
    from localtune.chat import ChatSession

    t = time.monotonic()
    session = ChatSession.load(run)
    load_s = time.monotonic() - t
    t = time.monotonic()
    text = session.reply([{"role": "user", "content": CHAT_PROMPT}], max_new_tokens=s.chat_tokens)
    base_dtype = str(next(session.model.parameters()).dtype).removeprefix("torch.")
    four_bit = bool(getattr(session.model.get_base_model(), "is_loaded_in_4bit", False))
    out["chat"] = {"device": session.device, "weights_dtype": base_dtype, "loaded_in_4bit": four_bit,
                   "load_s": round(load_s, 1), "reply_s": round(time.monotonic() - t, 2), "prompt": CHAT_PROMPT,
                   "reply": text}
    del session
    gc.collect()
    if s.cuda:
        import torch

        torch.cuda.empty_cache()
    return out


def stage1_table(r: dict[str, Any]) -> str:
    run = r.get("run", {})
    fin = run.get("finished", {})
    steps = run.get("steps", [])
    rows = [
        ("plan", f"profile {r.get('profile')}; " + ", ".join(
            f"{k}={r['knobs'][k]}" for k in ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "r",
                                             "per_device_train_batch_size", "gradient_accumulation_steps",
                                             "max_length", "gradient_checkpointing", "optim", "max_steps")
            if "knobs" in r)),
        ("started: device, precision", f"{r.get('device')}, {r.get('precision')}"),
        ("flash-attention 2 used", f"{r.get('flash_attention_2')} (flash_attn installed: {r.get('flash_attn_installed')}); "
                                   f"padding-free batches: {r.get('padding_free')}"),
        ("steps, first / last loss", f"{fin.get('step')} steps, {steps[0]['loss']:.4f} / {steps[-1]['loss']:.4f}"
         if steps else "-"),
        ("tokens, train s, tokens/s", f"{fin.get('tokens', 0):,}, {fin.get('elapsed_s')}, "
                                      f"{r.get('train_tokens_per_s') or 0:,.0f}" if fin else "-"),
        ("checkpoints", ", ".join(run.get("checkpoints", [])) or "none"),
        ("sample during training", repr((run.get("samples") or ["-"])[-1][:80])),
        ("peak allocated / reserved GiB" if (r.get("device") or "").startswith("cuda") else "peak RSS GiB",
         f"{_gib(run.get('max_allocated'))} / {_gib(run.get('max_reserved'))} "
                                          f"(estimate: tensors {_gib(r.get('estimate_allocated_bytes'))}, "
                                          f"total {_gib(r.get('estimate_total_bytes'))})"),
    ]
    for fmt in ("merged", "gguf"):
        e = r.get(f"export_{fmt}")
        if e is None:
            continue
        if "skipped" in e:
            rows.append((f"export {fmt}", f"skipped: {e['skipped']}"))
        elif e.get("ok"):
            c = e.get("checks", {})
            what = (f"rel. logit diff {c.get('max_rel_logit_diff', c.get('merge_max_rel_logit_diff'))}, top-1 "
                    f"{c.get('top1_agreement', c.get('merge_top1_agreement'))}")
            if fmt == "gguf":
                what += f", {c.get('bytes', 0) / 2**20:.0f} MiB" + (
                    f", llama.cpp: {c['llama_cpp_answer'][:40]!r}" if "llama_cpp_answer" in c else ", no llama.cpp check")
            rows.append((f"export {fmt}", f"ok in {e['seconds']} s: {what}"))
        else:
            rows.append((f"export {fmt}", f"FAILED in {e.get('seconds')} s: {e.get('error')}"))
    c = r.get("chat")
    if c:
        rows.append(("chat (ChatSession)", f"skipped: {c['skipped']}" if "skipped" in c else
                     f"{c['device']}, {c['weights_dtype']}{', 4-bit' if c['loaded_in_4bit'] else ''}, load "
                     f"{c['load_s']} s, reply {c['reply_s']} s: {c['reply'][:60]!r}"))
    return table(["what", "result"], rows)


# --------------------------------------------------------------------------------- stage 2


def stage2(s: Settings, ctx: dict[str, Any], deadline: float) -> list[dict[str, Any]]:
    """The grid, `s.concurrency` worker runs at a time, until the points or the time run out."""
    points = list(s.grid)
    rows = long_text_rows(ctx["rows"], ctx["work"] / "long_rows.jsonl", n=16,
                          min_chars=int(max(p.max_length for p in points) * 6.5))
    results: list[dict[str, Any]] = []
    running: list[tuple[GridPoint, Any, threading.Thread, dict]] = []
    while points or running:
        while points and len(running) < s.concurrency:
            left = deadline - time.monotonic()
            if left < s.grid_min_s:
                for p in points:
                    results.append({"point": p.name, "skipped": f"budget: {left:.0f} s left in stage 2"})
                points = []
                break
            p = points.pop(0)
            pins = {**s.grid_pins, "load_in_4bit": p.load_in_4bit, "gradient_checkpointing": p.gradient_checkpointing,
                    "per_device_train_batch_size": p.micro_batch, "max_length": p.max_length}
            try:
                plan = plan_for(ctx["model_dir"], ctx["hw"], pins)
                run = make_run(plan, rows, "s2-" + p.name.replace(" ", "-"))
            except Exception as e:  # noqa: BLE001 - one bad point must not end the grid
                results.append({"point": p.name, "error": f"{type(e).__name__}: {e}"})
                continue
            box: dict[str, Any] = {"plan": plan}
            th = threading.Thread(target=lambda b=box, r=run, n=p.name: b.update(res=run_worker(r, n, deadline)))
            th.start()
            running.append((p, run, th, box))
            say(f"[stage 2] {p.name}: started ({len(running)} running)")
        time.sleep(0.5)
        for item in [x for x in running if not x[2].is_alive()]:
            running.remove(item)
            p, run, th, box = item
            res: RunResult = box["res"]
            est = box["plan"].estimate
            entry = {"point": p.name, "run": dataclasses.asdict(res), "estimate": est.to_dict(),
                     "estimate_allocated_bytes": est.allocated_bytes, "estimate_total_bytes": est.total_bytes,
                     "knobs": box["plan"].knobs.to_dict()}
            results.append(entry)
            say(f"[stage 2] {p.name}: " + (f"estimate {_gib(est.allocated_bytes)} GiB, measured "
                                           f"{_gib(res.max_allocated)} GiB ({_err(est.allocated_bytes, res.max_allocated)}) "
                                           f"in {res.seconds:.0f} s" if res.ok else f"FAILED: {res.error}"))
    order = {p.name: i for i, p in enumerate(s.grid)}
    results.sort(key=lambda r: order.get(r["point"], 99))
    return results


def stage2_table(results: list[dict[str, Any]], cuda: bool) -> str:
    head = ["config (weights, checkpointing, micro-batch x length)", "est parts w/ad/act/lg GiB", "est tensors GiB",
            "max_allocated GiB" if cuda else "peak RSS GiB", "error", "est total GiB",
            "max_reserved GiB" if cuda else "-", "error", "s"]
    rows = []
    for r in results:
        if "run" not in r:
            rows.append([r["point"], (r.get("skipped") and "skipped: " + r["skipped"]) or "FAILED: " + r.get("error", ""),
                         *["-"] * (len(head) - 2)])
            continue
        run, e = r["run"], r["estimate"]
        if not run["ok"]:
            rows.append([r["point"], "FAILED: " + run["error"][:80], *["-"] * (len(head) - 2)])
            continue
        parts = "/".join(f"{e[k] / GiB:.2f}" for k in ("weights_bytes", "adapter_bytes", "activations_bytes", "logits_bytes"))
        alloc = run["max_allocated"]
        rows.append([r["point"], parts, _gib(r["estimate_allocated_bytes"]), _gib(alloc),
                     _err(r["estimate_allocated_bytes"], alloc), _gib(r["estimate_total_bytes"]),
                     _gib(run["max_reserved"]) if cuda else "-",
                     _err(r["estimate_total_bytes"], run["max_reserved"]) if cuda else "-", f"{run['seconds']:.0f}"])
    return table(head, rows)


# --------------------------------------------------------------------------------- stage 3


def stage3(s: Settings, ctx: dict[str, Any], deadline: float) -> dict[str, Any]:
    from localtune.knobs import parse_set_options
    from train_speed import KNOBS

    lines = ctx["rows"].read_text(encoding="utf-8").splitlines()[: s.s3_rows]
    data = ctx["work"] / f"rows{s.s3_rows}.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pins = parse_set_options(KNOBS)  # the knobs train_speed.py pins on the CPU
    out: dict[str, Any] = {"rows": s.s3_rows, "pins": pins}

    left = deadline - time.monotonic()
    if left < s.s3_min_s:
        out["recipe"] = {"skipped": f"budget: {left:.0f} s left"}
    else:
        say("[stage 3] the plain recipe: running")
        res_path = ctx["work"] / "recipe.json"
        cmd = [sys.executable, str(REPO / "benchmarks" / "plain_recipe.py"), str(ctx["model_dir"]), str(data),
               str(res_path)]
        if s.cuda:
            cmd += ["--device", "cuda", "--memory-cap-gb", str(CAP_GB)]
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}  # as a person runs it
        t = time.monotonic()
        try:
            # the recipe may take up to 40% of the stage: the two localtune runs need the rest
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(5, left * 0.4))
            if p.returncode == 0:
                r = json.loads(res_path.read_text())
                out["recipe"] = {"ok": True, "tokens": r["tokens"], "train_s": r["train_s"], "steps": r["steps"],
                                 "final_loss": final_loss(r["losses"]), "wall_s": round(time.monotonic() - t, 1),
                                 "peak_allocated": r.get("peak_cuda_allocated_bytes"),
                                 "peak_reserved": r.get("peak_cuda_reserved_bytes"), "peak_rss": r["peak_rss_bytes"],
                                 "how": f"{r.get('weights_dtype')} weights, bf16 autocast, micro-batch 4 x 4, checkpointing"}
            else:
                out["recipe"] = {"ok": False, "error": (p.stderr.strip().splitlines() or ["?"])[-1],
                                 "stderr_tail": "\n".join(p.stderr.splitlines()[-40:])}
        except subprocess.TimeoutExpired:
            out["recipe"] = {"ok": False, "error": "timed out"}
        say(f"[stage 3] the plain recipe: {_side_line(out['recipe'])}")

    for key, extra in (("localtune", {}), ("localtune_16bit", {"load_in_4bit": False})):
        left = deadline - time.monotonic()
        if left < s.s3_min_s:
            out[key] = {"skipped": f"budget: {left:.0f} s left"}
            continue
        try:
            plan = plan_for(ctx["model_dir"], ctx["hw"], {**pins, **extra})
            run = make_run(plan, data, f"s3-{key.replace('_', '-')}", train_on_inputs=True)
        except Exception as e:  # noqa: BLE001
            out[key] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            continue
        say(f"[stage 3] {key}: running")
        end = deadline if key == "localtune_16bit" else time.monotonic() + left * 0.55
        res = run_worker(run, key, end)
        k = plan.knobs
        entry: dict[str, Any] = {"ok": res.ok, "error": res.error, "run": dataclasses.asdict(res),
                                 "how": f"{res.started.get('precision')}, micro-batch {k.per_device_train_batch_size}"
                                        f" x {k.gradient_accumulation_steps}, checkpointing "
                                        f"{k.gradient_checkpointing}, {k.optim}, padding-free "
                                        f"{res.started.get('padding_free')}"}
        if res.ok:
            fin = res.finished
            entry.update(tokens=fin["tokens"], train_s=fin["elapsed_s"], steps=fin["step"],
                         final_loss=final_loss([e["loss"] for e in res.steps]), peak_allocated=res.max_allocated,
                         peak_reserved=res.max_reserved, peak_rss=None if s.cuda else fin.get("peak_memory_bytes"))
        out[key] = entry
        say(f"[stage 3] {key}: {_side_line(entry)}")
    return out


def _side_line(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return "skipped: " + r["skipped"]
    if not r.get("ok"):
        return "FAILED: " + r.get("error", "")
    return f"{r['tokens']:,} tokens in {r['train_s']:.1f} s = {r['tokens'] / r['train_s']:,.0f} tokens/s"


def stage3_table(r: dict[str, Any], cuda: bool) -> str:
    head = ["side", "how", "tokens", "train s", "tokens/s",
            "peak allocated GiB" if cuda else "peak RSS GiB", "peak reserved GiB" if cuda else "-", "final loss"]
    rows = []
    names = {"recipe": "plain recipe", "localtune": "localtune (its 24 GB plan)" if cuda else "localtune (its plan)",
             "localtune_16bit": "localtune, 16-bit pinned"}
    for key, label in names.items():
        x = r.get(key, {"skipped": "not run"})
        if "skipped" in x or not x.get("ok"):
            rows.append([label, _side_line(x)[:90], *["-"] * (len(head) - 2)])
            continue
        peak = x["peak_allocated"] if cuda else x["peak_rss"]
        rows.append([label, x["how"], f"{x['tokens']:,}", f"{x['train_s']:.1f}", f"{x['tokens'] / x['train_s']:,.0f}",
                     _gib(peak), _gib(x["peak_reserved"]) if cuda else "-",
                     f"{x['final_loss']:.4f}" if x.get("final_loss") is not None else "-"])
    text = table(head, rows)
    rec = r.get("recipe", {})
    for key in ("localtune", "localtune_16bit"):
        x = r.get(key, {})
        if rec.get("ok") and x.get("ok"):
            speed = (x["tokens"] / x["train_s"]) / (rec["tokens"] / rec["train_s"])
            pk = "peak_allocated" if cuda else "peak_rss"
            mem = f"{x[pk] / rec[pk]:.2f}x" if x.get(pk) and rec.get(pk) else "-"
            text += f"\n{names[key]} / recipe: tokens/s {speed:.2f}x, peak memory {mem}"
    return text


# ------------------------------------------------------------------------------------ output


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def _err(est: float | None, meas: float | None) -> str:
    return "-" if not est or not meas else f"{(est - meas) / meas:+.1%}"


def table(head: list[str], rows: list) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def no_llama_cpp_dir(work: Path) -> Path:
    """A folder whose `llama_cpp` cannot be imported, put first on the export's PYTHONPATH in the
    CPU rehearsal: the venv's llama-cpp-python crashes in llama_decode on the project's CPU box
    (a known problem being fixed), and the GPU machine has none, so its export runs without it too."""
    d = work / "no_llama_cpp"
    d.mkdir(exist_ok=True)
    (d / "llama_cpp.py").write_text('raise ImportError("llama_cpp left out by gpu_check --rehearse-on-cpu")\n')
    return d


# -------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rehearse-on-cpu", action="store_true",
                    help="run every stage on this CPU at tiny sizes (no cap, no CUDA memory counters)")
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md, worker_logs.txt")
    ap.add_argument("--stages", default="1,2,3", help="which stages, e.g. 2 or 1,3 (default 1,2,3)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for all stages (default 420 on the GPU)")
    ap.add_argument("--grid-points", type=int, default=None, help="stage 2: the first N points of the grid")
    ap.add_argument("--rows", type=int, default=None,
                    help="stage 3: rows of .gpu-model/rows.jsonl to train on (GPU default 256, at most 512)")
    ap.add_argument("--concurrency", type=int, default=None, help="stage 2: worker runs at a time (GPU default 4)")
    ap.add_argument("--overlap", dest="overlap", action="store_true", default=None,
                    help="run stages 1 and 2 side by side (the GPU default)")
    ap.add_argument("--no-overlap", dest="overlap", action="store_false")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (runs, model)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings(args)
    stages = sorted({int(x) for x in args.stages.split(",") if x.strip()})
    args.out.mkdir(parents=True, exist_ok=True)
    if not (GPU_MODEL / "model" / "config.json").is_file() or not (GPU_MODEL / "rows.jsonl").is_file():
        print(f"gpu_check: {GPU_MODEL} is missing or incomplete: run `bash benchmarks/gpu_check.sh prepare` in the "
              "checkout first (and carry .gpu-model)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    os.environ.update(LOCALTUNE_HOME=str(work / "home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                      TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                      PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if s.cuda:
        os.environ[CAP_ENV] = str(CAP_GB)
    budget = Budget(s, stages)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "mode": "cpu rehearsal" if not s.cuda else "cuda",
                              "versions": versions(), "settings": dataclasses.asdict(s), "stages": stages,
                              "weights": f"random, seed {SEED}, decoder weights std {LINEAR_STD} "
                                         "(SmolLM2-135M-Instruct architecture and tokenizer)"}
    failed: list[str] = []
    say(f"gpu_check ({report['mode']}), {report['date']}; budget {s.budget_s:.0f} s; stages {stages}")
    say("versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    try:
        import torch

        if s.cuda:
            if not torch.cuda.is_available():
                failed.append(f"CUDA is not available (torch {torch.__version__}); on a machine without a GPU "
                              "run --rehearse-on-cpu")
                return 1
            p = torch.cuda.get_device_properties(0)
            report["gpu"] = {"name": p.name, "total_bytes": p.total_memory, "capability": f"{p.major}.{p.minor}",
                             "cuda": torch.version.cuda, "sms": p.multi_processor_count}
            say(f"GPU: {p.name}, {p.total_memory / GiB:.1f} GiB, capability {p.major}.{p.minor}, CUDA {torch.version.cuda}; "
                f"every run capped at {CAP_GB} GiB")
        ctx = {"work": work, "rows": GPU_MODEL / "rows.jsonl", "hw": capped_machine(s.cuda),
               "model_dir": build_model(work / "model")}
        if not s.cuda:
            ctx["no_llama_cpp"] = str(no_llama_cpp_dir(work))
        say(f"setup done at {budget.elapsed():.0f} s")

        def guarded(k: int, fn, *a) -> None:
            t = time.monotonic()
            try:
                report[f"stage{k}"] = fn(*a)
            except Exception as e:  # noqa: BLE001 - a failed stage is reported; the others still run
                traceback.print_exc()
                report[f"stage{k}"] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
                failed.append(f"stage {k}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            report[f"stage{k}_s"] = round(time.monotonic() - t, 1)
            say(f"[stage {k}] done in {report[f'stage{k}_s']} s (at {budget.elapsed():.0f} s of {s.budget_s:.0f})")

        overlap = s.overlap and 1 in stages and 2 in stages
        grid_thread = None
        if overlap:
            grid_thread = threading.Thread(target=guarded, args=(2, stage2, s, ctx, budget.deadline(2, (1,))))
            grid_thread.start()
        if 1 in stages:
            guarded(1, stage1, s, ctx, budget.deadline(1, (2,) if overlap else ()))
        if grid_thread is not None:
            grid_thread.join()
        elif 2 in stages:
            guarded(2, stage2, s, ctx, budget.deadline(2))
        if 3 in stages:
            guarded(3, stage3, s, ctx, budget.deadline(3))
    finally:
        write_outputs(args.out, report, s, failed)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def problems(report: dict[str, Any]) -> list[str]:
    """What failed inside the stages that ran: runs, exports, the recipe (not budget skips)."""
    out = []
    st1 = report.get("stage1")
    if isinstance(st1, dict):
        for fmt in ("merged", "gguf"):
            e = st1.get(f"export_{fmt}") or {}
            if "ok" in e and not e["ok"]:
                out.append(f"stage 1 export {fmt}: {e.get('error')}")
    if isinstance(report.get("stage2"), list):
        for r in report["stage2"]:
            if "error" in r or ("run" in r and not r["run"]["ok"]):
                out.append(f"stage 2 {r['point']}: {r.get('error') or r['run']['error']}")
    st3 = report.get("stage3")
    if isinstance(st3, dict):
        for key in ("recipe", "localtune", "localtune_16bit"):
            e = st3.get(key) or {}
            if "ok" in e and not e["ok"]:
                out.append(f"stage 3 {key}: {e.get('error')}")
    return out


def write_outputs(out: Path, report: dict[str, Any], s: Settings, failed: list[str]) -> None:
    failed += problems(report)
    report["failed"] = failed
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    logs = []
    entries: list[tuple[str, Any]] = []
    for key in ("stage1", "stage3"):
        st = report.get(key)
        if isinstance(st, dict):
            entries += [(f"{key} {name}", v) for name, v in st.items() if isinstance(v, dict)]
    if isinstance(report.get("stage2"), list):
        entries += [(f"stage2 {r['point']}", r) for r in report["stage2"]]
    for label, v in entries:
        run = v.get("run") if isinstance(v.get("run"), dict) else v
        if run.get("log_tail"):
            logs.append(f"===== {label}: worker.log of {run.get('run_id')}\n{run['log_tail']}")
        if v.get("stderr_tail"):
            logs.append(f"===== {label}: stderr\n{v['stderr_tail']}")
    (out / "worker_logs.txt").write_text("\n\n".join(logs) + "\n", encoding="utf-8")

    v = report["versions"]
    gpu = report.get("gpu")
    machine = (f"{gpu['name']}, {gpu['total_bytes'] / GiB:.0f} GiB, capability {gpu['capability']}, CUDA "
               f"{gpu['cuda']}; every run capped at {CAP_GB} GiB" if gpu else
               f"this CPU, {os.cpu_count()} cores (a rehearsal: tiny sizes, no CUDA)" if not s.cuda else "no GPU found")
    parts = [f"# gpu_check, {report['date']} ({report['mode']})", "", f"machine: {machine}",
             "versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
             f"weights: {report['weights']}: memory and speed do not depend on their values", ""]
    for k, title, render in ((1, "stage 1: QLoRA through the worker, export, chat", lambda r: stage1_table(r)),
                             (2, "stage 2: memory estimate against the measured peak (3 steps each)",
                              lambda r: stage2_table(r, s.cuda)),
                             (3, "stage 3: tokens/s against the plain recipe", lambda r: stage3_table(r, s.cuda))):
        key = f"stage{k}"
        if key not in report:
            continue
        r = report[key]
        parts.append(f"## {title} ({report.get(key + '_s', '?')} s)")
        if isinstance(r, dict) and "error" in r and len(r) == 1:
            parts.append("FAILED: " + r["error"].splitlines()[0])
        else:
            try:
                parts.append(render(r))
            except Exception as e:  # noqa: BLE001 - a table that cannot be drawn must not hide the JSON
                parts.append(f"(table failed: {type(e).__name__}: {e}; see gpu_check.json)")
        parts.append("")
    parts.append("FAILED: " + "; ".join(f[:300] for f in failed) if failed else "everything ran")
    md = "\n".join(parts)
    (out / "gpu_check.md").write_text(md + "\n", encoding="utf-8")
    say("\n" + "=" * 30 + " summary (also in gpu_check.md) " + "=" * 30 + "\n" + md)


if __name__ == "__main__":
    sys.exit(main())
