"""Does DPO on the shipped preference set teach its trait ("In short: ") in a few CPU minutes?

What: trains a LoRA adapter on the built-in SmolLM2-135M-Instruct with trl's DPOTrainer on
`localtune/demo_data/preference.jsonl` (see `localtune/demo.py`), the way localtune's worker
does on the CPU (float32 weights, bf16 autocast, LoRA r=16 alpha=32 dropout 0.05 on all seven
projections passed as `peft_config`, so the reference is the base with the adapter disabled;
adamw_torch, cosine, warm-up 0.03, the chat template, max_length 1024), and reports:

- how many of the 10 held-out greedy answers (`preference_heldout_prompts()`) show the trait
  before and after training (and the "Ahoy" trait, and both);
- held-out preference accuracy: on the 40 pairs of `preference_eval.jsonl`, the fraction where
  the trained policy's implicit reward beta * (logp_policy - logp_ref) of the chosen answer
  exceeds the rejected one's;
- time: model load, trl's tokenisation, training wall time and seconds per optimizer step.

With `--sft` it first trains the SFT demo recipe (30 steps x 8 rows, lr 1e-3 linear, 3 warm-up
steps, 128 tokens, LoRA dropout 0; `localtune/launch.py`'s DEMO_RECIPE) on the Ahoy set, saves
that adapter, reloads it with `PeftModel.from_pretrained(base, dir, is_trainable=True)` and
runs DPO on it with no `peft_config`: trl then copies the adapter into a frozen "ref" adapter,
so the reference is the SFT model. `--sft-adapter DIR` starts from an SFT adapter you already
have. `--adapter DIR` only evaluates a trained DPO adapter (against the base, or against
`--ref-adapter DIR`).

How to run (from the repository root; the first run converts the built-in model, ~20 s):

    python benchmarks/dpo_demo.py                         # the DPO demo recipe from the base
    python benchmarks/dpo_demo.py --sft                   # SFT demo, then DPO on that adapter
    python benchmarks/dpo_demo.py --lr 5e-5 --beta 0.1 --epochs 1 --batch-size 2 --grad-accum 8
    python benchmarks/dpo_demo.py --adapter runs/x/adapter --skip-before

The measured numbers are in benchmarks/README.md ("DPO preference demo").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Run from a checkout without installing: make `localtune` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULTS = {
    "lr": 5e-5,
    "beta": 0.1,
    "batch_size": 2,
    "grad_accum": 8,
    "epochs": 1.0,
    "max_steps": -1,
    "seed": 0,
}
"""The DPO demo recipe (the knobs a DPO run takes when the user pins none)."""

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SFT_RECIPE = {"max_steps": 30, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
              "learning_rate": 1e-3, "lr_scheduler_type": "linear", "warmup_steps": 3, "max_length": 128}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a local model folder (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", type=Path, default=None, help="only evaluate this trained DPO adapter")
    p.add_argument("--ref-adapter", type=Path, default=None,
                   help="with --adapter: the reference adapter (default: the base, adapter disabled)")
    p.add_argument("--sft", action="store_true", help="train the SFT demo recipe first, then DPO on that adapter")
    p.add_argument("--sft-adapter", type=Path, default=None, help="start DPO from this SFT adapter")
    p.add_argument("--sft-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for the --sft stage (default: as --bf16)")
    p.add_argument("--data", type=Path, default=None, help="preference JSONL (default: the shipped set)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="learning rate (default %(default)s)")
    p.add_argument("--beta", type=float, default=DEFAULTS["beta"], help="DPO beta (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="pairs per micro-batch (default %(default)s)")
    p.add_argument("--grad-accum", type=int, default=DEFAULTS["grad_accum"], help="(default %(default)s)")
    p.add_argument("--epochs", type=float, default=DEFAULTS["epochs"], help="(default %(default)s)")
    p.add_argument("--max-steps", type=int, default=DEFAULTS["max_steps"], help="optimizer steps; wins over --epochs when > 0")
    p.add_argument("--scheduler", default="cosine")
    p.add_argument("--warmup", type=float, default=0.03, help="warm-up (a fraction of all steps when below 1)")
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast over the float32 weights (default: where the CPU computes bf16 natively, "
                        "AVX512-BF16 or AMX, as localtune does; emulated bf16 is several times slower)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="generation budget per held-out answer")
    p.add_argument("--probe-every", type=int, default=0,
                   help="every N steps, count the trait in short greedy held-out answers (0: never)")
    p.add_argument("--probe-tokens", type=int, default=24, help="generation budget of a probe (default %(default)s)")
    p.add_argument("--skip-before", action="store_true", help="do not generate with the starting model first")
    p.add_argument("--save", type=Path, default=None, help="save the trained DPO adapter here")
    p.add_argument("--show", action="store_true", help="print the held-out answers after training")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    return p.parse_args(argv)


def counts(answers: list[str]) -> dict[str, int]:
    from localtune.demo import count_both_traits, count_preference_trait, count_trait
    return {"in_short": count_preference_trait(answers), "ahoy": count_trait(answers),
            "both": count_both_traits(answers),
            # degenerate answers ("In short: In short: ..."): the label more than once
            "repeated": sum(a.lower().count("in short") > 1 for a in answers)}


def train_sft(model_dir: Path, tokenizer, out_dir: Path, args) -> float:
    """The SFT demo recipe on the Ahoy set; saves the adapter in out_dir; returns the seconds."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from localtune.demo import demo_dataset_path

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(demo_dataset_path()), split="train")
    config = SFTConfig(output_dir=str(out_dir / "sft-trainer"), **SFT_RECIPE, packing=False, logging_steps=10,
                       save_strategy="no", report_to="none", use_cpu=True, bf16=args.sft_bf16, seed=args.seed,
                       optim="adamw_torch", dataloader_num_workers=0, activation_checkpointing=False,
                       disable_tqdm=True)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGET_MODULES,
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    t = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t
    trainer.model.save_pretrained(str(out_dir / "sft-adapter"))
    return secs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from localtune.demo import (PREFERENCE_TRAIT_DESCRIPTION, generate_answers, pair_logprobs, preference_accuracy,
                                preference_dataset_path, preference_eval_pairs, preference_heldout_prompts,
                                )

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bf16 is None:
        from localtune.hardware import cpu_has_native_bf16
        args.bf16 = cpu_has_native_bf16()
    if args.sft_bf16 is None:
        args.sft_bf16 = args.bf16
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if args.model:
        model_dir = Path(args.model)
    else:
        from localtune.models import ensure_builtin_model
        model_dir = ensure_builtin_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load_base = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # noqa: E731
    print(f"model: {model_dir} ({torch.get_num_threads()} threads, bf16 autocast {'on' if args.bf16 else 'off'})",
          flush=True)
    print(f"trait: {PREFERENCE_TRAIT_DESCRIPTION}", flush=True)

    prompts = preference_heldout_prompts()
    eval_pairs = preference_eval_pairs()
    report: dict = {"heldout": len(prompts), "eval_pairs": len(eval_pairs)}
    work = Path(tempfile.mkdtemp(prefix="localtune-dpo-demo-"))

    def show(label: str, answers: list[str]) -> dict[str, int]:
        c = counts(answers)
        print(f"{label}: in short {c['in_short']}/{len(prompts)}, ahoy {c['ahoy']}/{len(prompts)}, "
              f"both {c['both']}/{len(prompts)}; the label repeated in {c['repeated']}", flush=True)
        return c

    try:
        # ------------------------------------------------------------ evaluate only
        if args.adapter:
            model = PeftModel.from_pretrained(load_base(), str(args.adapter), adapter_name="default")
            if args.ref_adapter:
                model.load_adapter(str(args.ref_adapter), adapter_name="ref")
            if not args.skip_before:
                with model.disable_adapter():
                    report["before"] = show("base", generate_answers(model, tokenizer, prompts, args.max_new_tokens))
            after = generate_answers(model, tokenizer, prompts, args.max_new_tokens)
            report["after"] = show("adapter", after)
            policy = pair_logprobs(model, tokenizer, eval_pairs)
            if args.ref_adapter:
                model.set_adapter("ref")
                ref = pair_logprobs(model, tokenizer, eval_pairs)
            else:
                with model.disable_adapter():
                    ref = pair_logprobs(model, tokenizer, eval_pairs)
            report["preference_accuracy"] = preference_accuracy(policy, ref)
            print(f"held-out preference accuracy: {report['preference_accuracy']:.3f} ({len(eval_pairs)} pairs)")
            return _finish(args, report, prompts, after)

        # ------------------------------------------------------------ the starting model
        sft_dir = args.sft_adapter
        if args.sft:
            secs = train_sft(model_dir, tokenizer, work, args)
            sft_dir = work / "sft-adapter"
            report["sft_train_s"] = round(secs, 1)
            print(f"SFT demo recipe: {secs:.0f} s", flush=True)
        base = load_base()
        if sft_dir:
            model = PeftModel.from_pretrained(base, str(sft_dir), is_trainable=True)
            start = "SFT model"
        else:
            model = base
            start = "base"
        report["start"] = start
        load_s = time.perf_counter() - t0
        if not args.skip_before:
            t = time.perf_counter()
            report["before"] = show(start, generate_answers(model, tokenizer, prompts, args.max_new_tokens))
            print(f"  ({time.perf_counter() - t:.0f} s to generate)", flush=True)
        t = time.perf_counter()
        ref = pair_logprobs(model, tokenizer, eval_pairs)  # the reference is the starting model
        print(f"reference log-probabilities of {len(eval_pairs)} held-out pairs: {time.perf_counter() - t:.0f} s",
              flush=True)
        if sft_dir:
            model.train()

        # ------------------------------------------------------------ DPO
        from datasets import load_dataset
        from transformers.trainer_callback import PrinterCallback
        from trl import DPOConfig, DPOTrainer

        data_path = args.data or preference_dataset_path()
        dataset = load_dataset("json", data_files=str(data_path), split="train")
        log: list[dict] = []
        probes: list[tuple[int, int]] = []
        probe_s = [0.0]

        class Log(TrainerCallback):
            def on_log(self, _a, state, _c, logs=None, **_kw):
                if logs and "loss" in logs:
                    row = {"step": state.global_step, "loss": round(float(logs["loss"]), 4),
                           "acc": round(float(logs.get("rewards/accuracies", float("nan"))), 3),
                           "margin": round(float(logs.get("rewards/margins", float("nan"))), 3),
                           "s": round(time.perf_counter() - train_t0 - probe_s[0], 1)}
                    log.append(row)
                    print(f"  step {row['step']:3d}  loss {row['loss']:.4f}  reward acc {row['acc']:.2f}  "
                          f"margin {row['margin']:.3f}  ({row['s']:.0f} s)", flush=True)

            def on_step_end(self, _a, state, _c, model=None, **_kw):
                if args.probe_every and state.global_step % args.probe_every == 0:
                    t = time.perf_counter()
                    answers = generate_answers(model, tokenizer, prompts, args.probe_tokens)
                    model.train()
                    c = counts(answers)
                    probes.append((state.global_step, c["in_short"], c["repeated"]))
                    probe_s[0] += time.perf_counter() - t
                    print(f"  step {state.global_step:3d}  probe: {c['in_short']}/{len(prompts)} show the trait, "
                          f"{c['repeated']} repeat it; {answers[0]!r}", flush=True)

        config = DPOConfig(
            output_dir=str(work / "dpo-trainer"),
            learning_rate=args.lr, beta=args.beta,
            per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
            num_train_epochs=args.epochs, max_steps=args.max_steps,
            lr_scheduler_type=args.scheduler, warmup_steps=args.warmup, optim="adamw_torch",
            max_length=1024, bf16=args.bf16, use_cpu=True, gradient_checkpointing=False,
            logging_steps=1, save_strategy="no", report_to="none", seed=args.seed,
            dataloader_num_workers=0, disable_tqdm=True,
        )
        peft_config = None
        if not sft_dir:
            peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout,
                                     target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
        t = time.perf_counter()
        trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[Log()])
        trainer.remove_callback(PrinterCallback)
        prep_s = time.perf_counter() - t
        train_t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - train_t0 - probe_s[0]
        steps = trainer.state.global_step
        policy_model = trainer.model
        if args.save:
            policy_model.save_pretrained(str(args.save))

        after = generate_answers(policy_model, tokenizer, prompts, args.max_new_tokens)
        report["after"] = show("after DPO", after)
        policy = pair_logprobs(policy_model, tokenizer, eval_pairs)
        report["preference_accuracy"] = preference_accuracy(policy, ref)
        margins = [args.beta * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in zip(policy, ref)]
        report["eval_mean_margin"] = round(sum(margins) / len(margins), 3)
        report.update({
            "recipe": {"learning_rate": args.lr, "beta": args.beta, "per_device_train_batch_size": args.batch_size,
                       "gradient_accumulation_steps": args.grad_accum, "num_train_epochs": args.epochs,
                       "max_steps": args.max_steps, "lr_scheduler_type": args.scheduler,
                       "warmup_steps": args.warmup, "optim": "adamw_torch", "bf16": args.bf16,
                       "lora": ("the SFT adapter" if sft_dir else
                                {"r": 16, "lora_alpha": 32, "lora_dropout": args.lora_dropout,
                                 "target_modules": TARGET_MODULES}),
                       "max_length": 1024, "seed": args.seed, "rows": len(dataset),
                       "threads": torch.get_num_threads()},
            "load_s": round(load_s, 1), "tokenize_s": round(prep_s, 1), "train_s": round(train_s, 1),
            "steps": steps, "s_per_step": round(train_s / max(steps, 1), 2),
            "total_s": round(time.perf_counter() - t0, 1), "log": log, "probes": probes,
        })
        print(f"held-out preference accuracy: {report['preference_accuracy']:.3f} ({len(eval_pairs)} pairs, "
              f"mean implicit reward margin {report['eval_mean_margin']:.3f})")
        print(f"DPO: {steps} steps in {train_s:.0f} s ({report['s_per_step']} s/step), trl tokenisation "
              f"{prep_s:.0f} s, whole script {report['total_s']:.0f} s")
        return _finish(args, report, prompts, after)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _finish(args, report: dict, prompts: list[str], after: list[str]) -> int:
    report["answers_after"] = after
    if args.show:
        print()
        for prompt, answer in zip(prompts, after):
            print(f"Q: {prompt}\nA: {answer!r}\n")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
