"""Is the demo trait learnable in the default CPU demo run?

What: trains LoRA on the built-in SmolLM2-135M-Instruct on the shipped demo dataset
(`localtune/demo_data/demo.jsonl`, see `localtune/demo.py`) on the CPU with trl's SFTTrainer
(float32, LoRA r=16 alpha=32 on all seven projections, full-sequence loss, no packing) for a
given number of steps, and reports:

- model load time, training wall time, final (last logged) and mean training loss;
- how many of the 10 held-out greedy answers show the trait ("Ahoy!" opener) before and after
  training (and how many carry the signature line), with the answers themselves.

This is the plain recipe, written out by hand, that localtune's demo defaults are tuned
against: the defaults are the settings where the trait shows in >= 8/10 held-out answers after
a few minutes of training on a 2-core CPU.

How to run (from the repository root; the first run converts the built-in model, ~20 s):

    python benchmarks/demo_learnability.py                     # the demo defaults
    python benchmarks/demo_learnability.py --steps 30 --lr 1e-3 --batch-size 8
    python benchmarks/demo_learnability.py --skip-before --json out.json

Set LOCALTUNE_HOME to keep the converted model out of your own localtune folder.

Measured on a 2-core AMD EPYC VM (torch 2.13 CPU, transformers 5.24, trl 1.16, peft 0.21),
with the defaults below (30 steps x batch 8 = 1.1 epochs of the 218 rows, lr 1e-3 linear
with 3 warm-up steps, max_length 128, LoRA r=16 alpha=32 dropout 0 on all 7 projections,
float32, no activation checkpointing):

    training 104 s (3.5 s/step), whole script 2 min 27 s including both generations
    final loss 1.04 (from 4.1 at step 1); peak RSS about 4 GB
    trait before 0/10, after 10/10 (signature line 10/10); seeds 0, 1, 2 all give 10/10
    the trait appears around step 8-9 (6-9/10) and is 10/10 from step 12 on
    lr 2e-4 for the same 30 steps: only 2/10 -- too slow for the demo

Note that trl's SFTConfig turns activation (gradient) checkpointing on by default; here it
only costs time, so it is switched off. On a machine shared with other busy processes the
two torch threads can stall each other badly (10x slower steps): measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# Run from a checkout without installing: make `localtune` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULTS = {
    "steps": 30,
    "batch_size": 8,
    "lr": 1e-3,
    "max_length": 128,
    "warmup_steps": 3,
    "scheduler": "linear",
    "seed": 0,
}
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a local model folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="rows per step (default %(default)s)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="learning rate (default %(default)s)")
    p.add_argument("--max-length", type=int, default=DEFAULTS["max_length"],
                   help="tokens per row after the chat template (default %(default)s; the longest demo row is ~110)")
    p.add_argument("--warmup-steps", type=int, default=DEFAULTS["warmup_steps"], help="(default %(default)s)")
    p.add_argument("--scheduler", default=DEFAULTS["scheduler"], help="lr scheduler type (default %(default)s)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="generation budget per held-out answer")
    p.add_argument("--probe-every", type=int, default=0,
                   help="every N steps, count the trait in short greedy held-out answers (0: never)")
    p.add_argument("--probe-tokens", type=int, default=4, help="generation budget of a probe (default %(default)s)")
    p.add_argument("--skip-before", action="store_true", help="do not generate with the base model first")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from localtune.demo import (TRAIT_DESCRIPTION, count_trait, demo_dataset_path, generate_answers,
                                has_signature, heldout_prompts)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    if args.model:
        model_dir = Path(args.model)
    else:
        from localtune.models import ensure_builtin_model
        model_dir = ensure_builtin_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    print(f"model: {model_dir} (loaded in {load_s:.1f} s, {torch.get_num_threads()} threads)", flush=True)
    print(f"trait: {TRAIT_DESCRIPTION}", flush=True)

    prompts = heldout_prompts()
    before: list[str] | None = None
    before_s = 0.0
    if not args.skip_before:
        t = time.perf_counter()
        before = generate_answers(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens)
        before_s = time.perf_counter() - t
        print(f"before: {count_trait(before)}/{len(prompts)} held-out answers show the trait "
              f"({before_s:.1f} s to generate)", flush=True)

    dataset = load_dataset("json", data_files=str(demo_dataset_path()), split="train")

    losses: list[tuple[int, float]] = []
    probes: list[tuple[int, int]] = []
    probe_s = [0.0, 0.0]  # wall, cpu

    class LossLog(TrainerCallback):
        def on_log(self, _args, state, _control, logs=None, **_kw):
            if logs and "loss" in logs:
                losses.append((state.global_step, float(logs["loss"])))
                print(f"  step {state.global_step:4d}  loss {logs['loss']:.4f}  "
                      f"({time.perf_counter() - train_t0 - probe_s[0]:.0f} s wall, "
                      f"{time.process_time() - cpu_t0 - probe_s[1]:.0f} s cpu)", flush=True)

        def on_step_end(self, _args, state, _control, model=None, **_kw):
            if args.probe_every and state.global_step % args.probe_every == 0 and state.global_step < args.steps:
                t, c = time.perf_counter(), time.process_time()
                was_training = model.training
                n = count_trait(generate_answers(model, tokenizer, prompts, max_new_tokens=args.probe_tokens))
                if was_training:
                    model.train()
                probes.append((state.global_step, n))
                probe_s[0] += time.perf_counter() - t
                probe_s[1] += time.process_time() - c
                print(f"  step {state.global_step:4d}  probe: {n}/{len(prompts)} show the trait", flush=True)

    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"localtune-demo-learnability-{os.getpid()}"
    config = SFTConfig(
        output_dir=str(out_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type=args.scheduler,
        warmup_steps=args.warmup_steps,
        max_length=args.max_length,
        packing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=args.seed,
        dataloader_num_workers=0,
        activation_checkpointing=False,  # trl turns it on by default; it only costs time here
        disable_tqdm=True,
    )
    peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                             target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[LossLog()])
    from transformers.trainer_callback import PrinterCallback
    trainer.remove_callback(PrinterCallback)  # LossLog prints a shorter line
    train_t0 = time.perf_counter()
    cpu_t0 = time.process_time()
    trainer.train()
    train_s = time.perf_counter() - train_t0 - probe_s[0]  # probes are not training time
    train_cpu_s = time.process_time() - cpu_t0 - probe_s[1]

    t = time.perf_counter()
    after = generate_answers(trainer.model, tokenizer, prompts, max_new_tokens=args.max_new_tokens)
    after_s = time.perf_counter() - t
    total_s = time.perf_counter() - t0

    final_loss = losses[-1][1] if losses else math.nan
    tail = [v for _, v in losses[-5:]]
    report = {
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                     "max_length": args.max_length, "warmup_steps": args.warmup_steps,
                     "scheduler": args.scheduler, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
                     "target_modules": TARGET_MODULES, "seed": args.seed, "dtype": "float32",
                     "threads": torch.get_num_threads(), "rows": len(dataset),
                     "epochs": round(args.steps * args.batch_size / len(dataset), 2)},
        "load_s": round(load_s, 1),
        "train_s": round(train_s, 1),
        "s_per_step": round(train_s / max(args.steps, 1), 2),
        "train_cpu_s": round(train_cpu_s, 1),
        "probe_s": round(probe_s[0], 1),
        "probes": probes,
        "generate_after_s": round(after_s, 1),
        "total_s": round(total_s, 1),
        "final_loss": round(final_loss, 4),
        "mean_loss_last5": round(sum(tail) / len(tail), 4) if tail else None,
        "losses": losses,
        "trait_before": count_trait(before) if before is not None else None,
        "trait_after": count_trait(after),
        "signature_after": sum(has_signature(a) for a in after),
        "heldout": len(prompts),
        "answers_before": before,
        "answers_after": after,
    }
    print()
    for prompt, answer in zip(prompts, after):
        print(f"Q: {prompt}\nA: {answer!r}\n")
    print(f"settings: {report['settings']}")
    print(f"train {train_s:.1f} s wall ({report['s_per_step']} s/step), {train_cpu_s:.0f} s cpu, "
          f"load {load_s:.1f} s, total {total_s:.1f} s, "
          f"final loss {final_loss:.4f}")
    before_txt = f"{report['trait_before']}/{len(prompts)}" if before is not None else "skipped"
    if probes:
        print("probes (step: trait count): " + ", ".join(f"{st}: {n}" for st, n in probes))
    print(f"trait before: {before_txt}   after: {report['trait_after']}/{len(prompts)}   "
          f"signature after: {report['signature_after']}/{len(prompts)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
