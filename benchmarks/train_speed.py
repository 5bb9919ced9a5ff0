"""localtune against the plain recipe: training speed, peak memory and loss on the CPU, and
the time from `localtune train --headless` to the first step, cold and warm.

    python benchmarks/train_speed.py [--rows 192] [--skip-start]

Both sides train the built-in SmolLM2-135M-Instruct (converted once into a scratch
LOCALTUNE_HOME) on the first `--rows` conversations of `shared/bench/varied_lengths.jsonl`,
one epoch, the same rows in the same order, the same objective (the loss on every token:
trl's default for `messages` rows, `--train-on-inputs` for localtune), LoRA r=16 alpha=32
dropout 0.05 on the seven projections, effective batch 16, learning rate 2e-4 cosine with 3%
warmup, max_length 1024:

- the plain recipe: `benchmarks/plain_recipe.py`, trl's SFTTrainer with
  per_device_train_batch_size=4, gradient_accumulation_steps=4 and trl's defaults for the rest;
- localtune: `localtune train --headless` with the same learning rate, schedule, LoRA and
  length pinned by `--set`; the rest is what localtune picks on this machine: the CPU
  profile's micro-batch 2 x accumulation 8 (the same effective batch of 16, so the same rows
  per optimizer step), padding-free batches, bf16 autocast where the CPU has native bf16, no
  activation checkpointing, the worker's malloc setting.

Reported for each: non-padding tokens per second of training, peak RSS of the training
process, final loss (the mean of the last three logged step losses), and the ratios. Target:
localtune >= 1.5x the recipe's tokens/s at equal or lower peak RSS, final loss within 5%.

Then the time from starting `localtune train --headless` (no arguments: the demo) to the line
of its first step: cold (an empty LOCALTUNE_HOME, so the built-in model is converted first) and
warm (the conversion cached). Target: warm <= 15 s.

Run it on a quiet machine: two busy processes on two cores stall each other's threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "bench" / "varied_lengths.jsonl"
KNOBS = ["learning_rate=2e-4",
         "lr_scheduler_type=\"cosine\"", "warmup_steps=0.03", "max_length=1024", "num_train_epochs=1",
         "r=16", "lora_alpha=32", "lora_dropout=0.05", "save_steps=100000", "save_minutes=0",
         "eval_steps=100000", "logging_steps=1", "seed=42"]


def final_loss(losses: list[float]) -> float:
    return statistics.fmean(losses[-3:])


def run_recipe(env: dict[str, str], model_dir: Path, data: Path, scratch: Path) -> dict:
    out = scratch / "recipe.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "plain_recipe.py"), str(model_dir), str(data), str(out)],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    return {"tokens": r["tokens"], "train_s": r["train_s"], "peak_rss": r["peak_rss_bytes"],
            "final_loss": final_loss(r["losses"]), "steps": r["steps"]}


def run_localtune(env: dict[str, str], data: Path) -> dict:
    from localtune.events import read_events
    from localtune.runs import find_run

    subprocess.run([sys.executable, "-m", "localtune", "train", "--headless", "--data", str(data),
                    "--train-on-inputs", *[a for k in KNOBS for a in ("--set", k)]], env=env, check=True, stdout=subprocess.DEVNULL)
    os.environ["LOCALTUNE_HOME"] = env["LOCALTUNE_HOME"]
    run = find_run("last")
    events = read_events(run.events_path)
    end = next(e for e in events if e["kind"] == "finished")
    started = next(e for e in events if e["kind"] == "started")
    losses = [e["loss"] for e in events if e["kind"] == "step"]
    return {"tokens": end["tokens"], "train_s": end["elapsed_s"], "peak_rss": end["peak_memory_bytes"],
            "final_loss": final_loss(losses), "steps": end["step"],
            "how": f"{started['precision']}, padding-free {started['padding_free']}"}


def time_to_first_step(env: dict[str, str]) -> float:
    """Seconds from starting `localtune train --headless` to the line of its first step; the
    run is then stopped."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "localtune", "train", "--headless"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        for line in proc.stdout:
            if line.startswith("step 1/"):
                return time.monotonic() - t0
        raise RuntimeError(f"no first step; exit code {proc.wait()}")
    finally:
        subprocess.run([sys.executable, "-m", "localtune", "stop", "last", "--wait"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=192, help="conversations to train on (16 per optimizer step)")
    ap.add_argument("--skip-start", action="store_true", help="skip the cold/warm start measurement")
    ap.add_argument("--skip-train", action="store_true", help="skip the training comparison")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="localtune-bench-"))
    home = scratch / "home"
    env = {**os.environ, "LOCALTUNE_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # the recipe runs as a person runs it
    os.environ.update(LOCALTUNE_HOME=str(home), HF_HUB_OFFLINE="1")
    sys.path.insert(0, str(REPO))
    import torch
    import transformers
    import trl

    from localtune.hardware import cpu_has_native_bf16
    from localtune.models import ensure_builtin_model

    print(f"train_speed: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"native bf16 {cpu_has_native_bf16()}, load average {os.getloadavg()[0]:.1f} at the start; "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl.__version__}\n")

    if not args.skip_train:
        model_dir = ensure_builtin_model()
        rows = DATA.read_text(encoding="utf-8").splitlines()[: args.rows]
        data = scratch / "rows.jsonl"
        data.write_text("\n".join(rows) + "\n", encoding="utf-8")
        recipe = run_recipe(env, model_dir, data, scratch)
        ours = run_localtune(env, data)
        print(f"{args.rows} conversations of varied_lengths.jsonl, {recipe['steps']} optimizer steps of 16; "
              f"localtune ran in {ours['how']}; load average {os.getloadavg()[0]:.1f} at the end\n")
        print("| side         | tokens  | train s | tokens/s | peak RSS GB | final loss |")
        print("|--------------|---------|---------|----------|-------------|------------|")
        for name, r in (("plain recipe", recipe), ("localtune", ours)):
            print(f"| {name:<12} | {r['tokens']:>7,} | {r['train_s']:>7.1f} | {r['tokens'] / r['train_s']:>8.1f} | "
                  f"{r['peak_rss'] / 1e9:>11.2f} | {r['final_loss']:>10.4f} |")
        speed = (ours["tokens"] / ours["train_s"]) / (recipe["tokens"] / recipe["train_s"])
        mem = ours["peak_rss"] / recipe["peak_rss"]
        loss = ours["final_loss"] / recipe["final_loss"] - 1
        print(f"\nlocaltune / recipe: tokens/s {speed:.2f}x (target >= 1.5x), peak RSS {mem:.2f}x (target <= 1), "
              f"final loss {loss:+.1%} (target within 5%)")
        print(f"same tokens trained: {ours['tokens'] == recipe['tokens']} ({ours['tokens']:,} / {recipe['tokens']:,})")

    if not args.skip_start:
        cold_env = {**env, "LOCALTUNE_HOME": str(scratch / "cold-home")}
        cold = time_to_first_step(cold_env)
        warm = time_to_first_step(cold_env)
        print(f"\n`localtune train --headless` to its first step: cold {cold:.1f} s (converting the built-in "
              f"model first), warm {warm:.1f} s (target <= 15 s)")


if __name__ == "__main__":
    main()
