"""The plain recipe: what a person writes with trl alone, for benchmarks/train_speed.py.

    python benchmarks/plain_recipe.py MODEL_DIR DATA.jsonl OUT.json

LoRA r=16 alpha=32 dropout 0.05 on the seven projections; trl's SFTTrainer with
per_device_train_batch_size=4, gradient_accumulation_steps=4, learning_rate=2e-4, cosine
schedule, warmup 3% (transformers 5 spells warmup_ratio=0.03 as warmup_steps=0.03), no
packing, max_length 1024, one epoch, use_cpu=True (transformers asks for it on a machine
without a GPU); everything else as trl 1.16 sets it (bf16 autocast and
activation checkpointing on, the loss on every token of a `messages` row). It writes what it
measured to OUT.json: non-padding tokens, training seconds, per-step losses, peak RSS.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main() -> None:
    model_dir, data, out = sys.argv[1:4]
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=data, split="train")
    args = SFTConfig(output_dir=out + ".trainer", per_device_train_batch_size=4, gradient_accumulation_steps=4,
                     learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, packing=False,
                     max_length=1024, num_train_epochs=1, logging_steps=1, save_strategy="no", report_to="none",
                     include_num_input_tokens_seen="non_padding", disable_tqdm=True, seed=42,
                     use_cpu=True)  # on a CPU, transformers refuses trl's default bf16 without it
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    losses: list[float] = []
    first_step: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

        def on_step_end(self, args, state, control, **kw):
            if not first_step:
                first_step.append(time.time() - t0)

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=[Record()])
    t1 = time.time()
    trainer.train()
    seconds = time.time() - t1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    with open(out, "w") as f:
        json.dump({"tokens": int(trainer.state.num_input_tokens_seen), "train_s": seconds, "losses": losses,
                   "steps": trainer.state.global_step, "peak_rss_bytes": rss, "first_step_s": first_step[0]}, f)


if __name__ == "__main__":
    main()
