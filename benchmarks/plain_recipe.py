"""The plain recipe: what a person writes with trl alone, for benchmarks/train_speed.py.

    python benchmarks/plain_recipe.py MODEL_DIR DATA.jsonl OUT.json [--device cuda] [--memory-cap-gb N]

LoRA r=16 alpha=32 dropout 0.05 on the seven projections; trl's SFTTrainer with
per_device_train_batch_size=4, gradient_accumulation_steps=4, learning_rate=2e-4, cosine
schedule, warmup 3% (transformers 5 spells warmup_ratio=0.03 as warmup_steps=0.03), no
packing, max_length 1024, one epoch, use_cpu=True (transformers asks for it on a machine
without a GPU); everything else as trl 1.16 sets it (bf16 autocast and
activation checkpointing on, the loss on every token of a `messages` row). It writes what it
measured to OUT.json: non-padding tokens, training seconds, per-step losses, peak RSS.

`--device cuda` runs the same recipe on the GPU (use_cpu=False: the Trainer puts the model on
it and trl's bf16 default applies); OUT.json then also has `torch.cuda.max_memory_allocated` and
`max_memory_reserved`. `--memory-cap-gb N` lets torch's allocator use only N GiB of the GPU
(`torch.cuda.set_per_process_memory_fraction`), as on a smaller card (benchmarks/gpu_check.py).
The CPU is the default, as benchmarks/train_speed.py runs it.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--memory-cap-gb", type=float, default=None, help="CUDA only: use at most this many GiB")
    args = ap.parse_args()
    model_dir, data, out, cuda = args.model_dir, args.data, args.out, args.device == "cuda"
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    if cuda and args.memory_cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 2**30 / total), 0)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=data, split="train")
    args = SFTConfig(output_dir=out + ".trainer", per_device_train_batch_size=4, gradient_accumulation_steps=4,
                     learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, packing=False,
                     max_length=1024, num_train_epochs=1, logging_steps=1, save_strategy="no", report_to="none",
                     include_num_input_tokens_seen="non_padding", disable_tqdm=True, seed=42,
                     use_cpu=not cuda)  # on a CPU, transformers refuses trl's default bf16 without it
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
    result = {"tokens": int(trainer.state.num_input_tokens_seen), "train_s": seconds, "losses": losses,
              "steps": trainer.state.global_step, "peak_rss_bytes": rss, "first_step_s": first_step[0],
              "weights_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if cuda:
        result.update(device=torch.cuda.get_device_name(0), peak_cuda_allocated_bytes=torch.cuda.max_memory_allocated(0),
                      peak_cuda_reserved_bytes=torch.cuda.max_memory_reserved(0))
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
