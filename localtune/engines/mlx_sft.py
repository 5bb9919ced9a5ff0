"""Supervised fine-tuning on MLX: the worker's lifecycle over an MLX training loop.

`python -m localtune.worker RUN_DIR` comes here when the run's `engine` knob is `mlx`
(`localtune train --set engine=mlx`). The worker's own pieces do what they do for torch: the
lock, SIGTERM, status.json and events.jsonl (`RunEvents`, `SaveByClock`, driven with
transformers' TrainerState / TrainerControl as a trl trainer drives them), the atomic
checkpoint commit and its rotation (`commit_checkpoint`), the choice of the newest readable
checkpoint, the final adapter written under a temporary name (`publish_adapter`). What is
MLX's own is here:

- the model: mlx-lm's class for the folder, 4-bit when `load_in_4bit`, frozen, LoRA layers on
  `target_modules`, and the rows of the tokens a chat template added (a base model without one
  gets ChatML's) trainable, as peft's `trainable_token_indices` (localtune.engines.mlx_lora);
- the data: localtune.data's rows, chat template, token ids and trained mask, exactly what the
  torch engine trains (localtune.methods.sft prepares them, and writes data.json); rows longer
  than `max_length` are cut there, each micro-batch is padded to its longest row;
- the loss: cross-entropy over the trained (assistant) tokens, summed over the micro-batches of
  an optimizer step and divided by their trained-token count, as transformers does with
  gradient accumulation; gradients clipped to a norm of 1.0 (transformers' default);
- the optimizer: mlx's AdamW with torch's defaults (betas 0.9/0.999, eps 1e-8, bias correction,
  no weight decay), its learning rate set before each step from the schedule transformers
  computes for the same knobs (the same warmup and decay as the torch engine). The
  `learning_rate` a step event shows is the one that step used;
- the data order: an endless stream of permutations of the training rows, one per epoch
  (numpy's PCG64 seeded with (seed, epoch)), read `per_device_train_batch_size *
  gradient_accumulation_steps` rows per optimizer step; an optimizer step's dropout draws from
  MLX's generator seeded with (seed, step) (each block reseeds from it, see below). Both are
  a function of the step alone, so a resumed run draws what the uninterrupted one drew;
- checkpoints: `adapter_config.json` + `adapter_model.safetensors` (PEFT's format, converted
  exactly back on resume), `optimizer.safetensors` (AdamW's moments, its step and learning
  rate, as MLX holds them), `trainer_state.json` (`engine: mlx`, the step, the rows and tokens
  seen, the schedule, the data order's recipe);
- gradient checkpointing (`gradient_checkpointing`): each block recomputed in the backward pass
  with `mx.checkpoint`, its dropout seeded so the recompute draws the same masks
  (mlx_lora.seeded_blocks says why mlx-lm's own helper cannot be used);
- precision: float32 on MLX's CPU backend; on Apple's GPU the base in bfloat16 when `bf16`
  (the LoRA weights and the loss in float32 always).

The order in which rows are read is not the torch engine's (transformers' sampler), so an MLX
run and a torch run of the same configuration see the rows in different orders.

Out of memory (MLX_OOM_MESSAGES, during a step or an evaluation) backs off as on torch: the
attempt is dropped and MLX's cache cleared, the micro-batch halved and the accumulation doubled
(the same rows per optimizer step, in the same order), training goes back to the newest complete
checkpoint; at a micro-batch of 1 max_length is halved (`localtune.worker.back_off`, shared
with the torch engine: the same `oom_backoff` event, note and config.toml update).

Not here yet: `packing` (refused in one line), the preference methods; the `sample` generation stops at `eos_token_id` only.

On Linux, MLX's CPU backend (`pip install 'localtune[mlx]'`) runs this same code: that is how
it is tested. It is slow there (a 135M model trains at a few tokens per second).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable


MAX_GRAD_NORM = 1.0
"""Gradients are clipped to this global norm (transformers' TrainingArguments default)."""


class DataOrder:
    """Which training rows each optimizer step reads: an endless stream of the rows, each epoch
    a fresh permutation drawn from (seed, epoch); the rows of a step are the next
    `rows_per_step` of the stream. A resumed run needs only how many rows were read."""

    def __init__(self, n_rows: int, seed: int) -> None:
        self.n_rows, self.seed = n_rows, seed
        self._epochs: dict[int, list[int]] = {}

    def _permutation(self, epoch: int) -> list[int]:
        import numpy as np

        if epoch not in self._epochs:
            self._epochs = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n_rows).tolist()}
        return self._epochs[epoch]

    def rows(self, start: int, count: int) -> list[int]:
        """Rows `start` .. `start + count - 1` of the stream (row indices into the data)."""
        return [self._permutation(pos // self.n_rows)[pos % self.n_rows] for pos in range(start, start + count)]

    def describe(self) -> dict[str, Any]:
        return {"kind": "a permutation per epoch, numpy PCG64 seeded with [seed, epoch]", "seed": self.seed,
                "rows": self.n_rows}


def lr_schedule(knobs, total_steps: int) -> tuple[Callable[[int], float], int]:
    """The learning rate of each optimizer step (0-based) and the warmup steps: transformers'
    own schedule for `lr_scheduler_type` and `warmup_steps` (as TrainingArguments reads an int
    or a fraction), evaluated on a dummy torch optimizer, so both engines follow one curve."""
    import torch
    from transformers import get_scheduler

    warmup = int(knobs.warmup_steps) if knobs.warmup_steps >= 1 else math.ceil(total_steps * knobs.warmup_steps)
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=knobs.learning_rate)
    factor = get_scheduler(knobs.lr_scheduler_type, dummy, num_warmup_steps=warmup,
                           num_training_steps=total_steps).lr_lambdas[0]
    return (lambda i: knobs.learning_rate * float(factor(i))), warmup


def _step_seed(seed: int, step: int) -> int:
    """The seed of MLX's generator (dropout) for optimizer step `step`."""
    return (seed * 1_000_003 + step) % 2**63


def _rows(ds, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, assistant_masks) of every row, cut to `max_length` (as trl cuts them)."""
    if ds is None:
        return []
    return [(ids[:max_length], mask[:max_length]) for ids, mask in zip(ds["input_ids"], ds["assistant_masks"])]


def _batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Token ids and trained-token mask of `rows`, padded on the right to the longest."""
    import mlx.core as mx
    import numpy as np

    width = max(len(ids) for ids, _ in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=np.float32)
    for i, (r, m) in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(m)] = m
    return mx.array(ids), mx.array(mask)


def loss_sum(model, ids, mask):
    """The summed cross-entropy of the trained tokens (each predicted from the ones before it)."""
    import mlx.core as mx
    import mlx.nn as nn

    logits = model(ids[:, :-1]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="none")
    return (ce * mask[:, 1:]).sum()


def eval_loss(model, rows, micro_batch: int, pad_id: int) -> float:
    """The loss per trained token over `rows`, with dropout off."""
    total, count = 0.0, 0.0
    model.eval()
    try:
        for i in range(0, len(rows), micro_batch):
            ids, mask = _batch(rows[i:i + micro_batch], pad_id)
            total += loss_sum(model, ids, mask).item()
            count += mask[:, 1:].sum().item()
    finally:
        model.train()
    return total / max(count, 1.0)


def sample_answer_mlx(model, tokenizer, prompt: str) -> str:
    """The model's greedy answer to `prompt` (SAMPLE_MAX_NEW_TOKENS at most), with mlx-lm's
    generation loop, in the middle of training."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from localtune.callbacks import SAMPLE_MAX_NEW_TOKENS

    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    model.eval()
    try:
        for token, _ in generate_step(mx.array(ids), model, max_tokens=SAMPLE_MAX_NEW_TOKENS):
            token = int(token)
            if token == tokenizer.eos_token_id:
                break
            out.append(token)
    finally:
        model.train()
    return tokenizer.decode(out, skip_special_tokens=True)


def compute_dtype(knobs):
    """What an MLX run holds its floating weights and computes in: bfloat16 on Apple's GPU
    with the `bf16` knob, float32 otherwise (MLX's CPU backend)."""
    import mlx.core as mx

    return mx.bfloat16 if knobs.bf16 and _device_name() == "mlx:gpu" else mx.float32


def _device_name() -> str:
    import mlx.core as mx

    return "mlx:gpu" if mx.default_device().type == mx.gpu else "mlx:cpu"


def _write_checkpoint(folder: Path, model, optimizer, knobs, *, base_model: str, adapted: list[str],
                      trainer_state: dict[str, Any]) -> None:
    """Everything resume needs, into `folder` (the lifecycle renames it into place after)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from localtune.engines.mlx_lora import save_peft_adapter

    save_peft_adapter(model, folder, knobs, base_model=base_model, adapted=adapted)
    mx.save_safetensors(str(folder / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n", encoding="utf-8")


def _read_checkpoint(folder: Path, model, optimizer) -> dict[str, Any]:
    """Restore the adapter and the optimizer from `folder`; return its trainer_state.json."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from localtune.engines.mlx_lora import load_peft_adapter

    load_peft_adapter(model, folder)
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    return json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))


MLX_OOM_MESSAGES = (
    "[malloc] Unable to allocate",                   # MLX's allocator: the Metal (and CUDA) buffer it asked for
    "[metal::malloc] Attempting to allocate",        # one buffer over the GPU's largest (maxBufferLength)
    "kIOGPUCommandBufferCallbackErrorOutOfMemory",   # "[METAL] Command buffer execution failed: Insufficient Memory"
)
"""How MLX says it ran out of memory (mlx 0.32: mlx/backend/metal/allocator.cpp and device.cpp).
All of them reach Python as RuntimeError, raised by the `mx.eval` that runs the step."""


def is_mlx_oom(e: BaseException) -> bool:
    """An out-of-memory error of MLX (MLX_OOM_MESSAGES)."""
    return isinstance(e, RuntimeError) and any(m in str(e) for m in MLX_OOM_MESSAGES)


class _OutOfMemory(Exception):
    """An attempt ran out of memory during optimizer step `step` (MLX's own error is dropped with
    the attempt's frames, so that the model and the optimizer state are freed)."""

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step


def train_mlx(run, stop, knobs) -> None:
    """Train the run on MLX to the end (or to a stop). Takes minutes to hours. The worker's
    `train` hands over here for engine=mlx; its `main` has taken the lock and reports a failure.

    As the torch engine does: one attempt per pass of the loop (load the base, put LoRA on it,
    restore the newest usable checkpoint, train); out of memory frees the attempt, backs the
    knobs off (a smaller micro-batch with the accumulation grown: the same rows per optimizer
    step; at a micro-batch of 1, a shorter max_length) and goes round again."""
    import gc
    import os

    import mlx.core as mx

    from localtune.callbacks import FAULT_OOM_AT_STEP_ENV, RunInfo, SaveByClock
    from localtune.engines import require_engine
    from localtune.engines.mlx_lora import QUANT_GROUP_SIZE, model_folder
    from localtune.events import append_event
    from localtune.methods.sft import SFT
    from localtune.worker import _setup_or_stop, back_off

    require_engine(knobs)
    setup = _setup_or_stop(run, knobs, stop)
    if setup is None:  # stopped while the model downloaded
        return
    setup, hardware, model_path, _ = setup
    from localtune.worker import calibrate_run

    knobs = calibrate_run(run, knobs, hardware)  # one measured MLX step before step 1 (localtune.calibrate)
    data = SFT().prepare(setup, knobs)  # localtune.data's ids and mask; writes data.json
    device = _device_name()
    dtype = compute_dtype(knobs)
    weights = "bfloat16" if dtype == mx.bfloat16 else "float32"
    precision = (f"4-bit weights (MLX, group size {QUANT_GROUP_SIZE}), {weights} compute" if knobs.load_in_4bit
                 else weights)
    info = RunInfo(run=run, device=device, backend=setup.backend, hardware=hardware, precision=precision,
                   padding_free=False, method="sft")
    fault = os.environ.get(FAULT_OOM_AT_STEP_ENV)
    once = {"oom_at": int(fault)} if fault else {}  # test-only; fires once per process (see the worker)
    base = _Base(folder=model_folder(model_path), model_path=str(model_path), dtype=dtype)
    clock = SaveByClock(knobs.save_minutes)
    while True:  # one attempt per pass; running out of memory backs off and goes round again
        try:
            outcome = _attempt(run, stop, knobs, setup, data, base, info, clock, once)
            break
        except _OutOfMemory as e:
            oom_step = e.step
        gc.collect()  # the attempt's model, optimizer state and graph
        mx.clear_cache()
        knobs = back_off(run, knobs, oom_step)  # UserError when nothing is left to shrink

    step, model, adapted, losses, attempt, tokens = outcome
    shutil.rmtree(setup.partial, ignore_errors=True)
    if stop.requested:
        last = run.complete_checkpoints()
        run.write_status(state="stopped", step=step, pid=None)
        append_event(run.events_path, "stopped", step=step, checkpoint=last[-1].name if last else None)
        return
    from localtune.engines.mlx_lora import save_peft_adapter
    from localtune.worker import publish_adapter

    publish_adapter(run, setup.tokenizer, {"method": "sft", "engine": "mlx"},
                    lambda tmp: save_peft_adapter(model, tmp, knobs, base_model=base.model_path, adapted=adapted))
    run.write_status(state="completed", step=step, pid=None, adapter=str(run.adapter_dir))
    append_event(run.events_path, "finished", step=step, adapter=str(run.adapter_dir),
                 train_loss=sum(losses) / len(losses) if losses else None, elapsed_s=round(attempt.elapsed(), 1),
                 tokens=tokens, peak_memory_bytes=int(mx.get_peak_memory()))


class _Base:
    """Where the base model is and how it is held: the same for every attempt."""

    def __init__(self, *, folder: Path, model_path: str, dtype) -> None:
        self.folder, self.model_path, self.dtype = folder, model_path, dtype


def _attempt(run, stop, knobs, setup, data, base: _Base, info, clock, once: dict):
    """One pass of train_mlx's loop with these knobs: from the newest usable checkpoint (or the
    start) to the end or a stop. Returns (step, model, adapted modules, this attempt's step
    losses, the Attempt, tokens seen); raises _OutOfMemory when MLX runs out of memory."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_map
    from transformers import TrainerControl, TrainerState

    from localtune.callbacks import FAULT_OOM_AT_STEP_ENV, Attempt, RunEvents
    from localtune.engines.mlx_lora import (add_lora, add_token_rows, checkpoint_weight_names, load_base,
                                            seeded_blocks)
    from localtune.worker import _elapsed_before, commit_checkpoint, newest_usable_checkpoint

    tokenizer = setup.tokenizer
    train_rows = _rows(data.train, knobs.max_length)
    eval_rows = _rows(data.eval, knobs.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    mb, accum = knobs.per_device_train_batch_size, knobs.gradient_accumulation_steps
    rows_per_step = mb * accum  # a back-off keeps it: the same rows per optimizer step
    total = knobs.max_steps if knobs.max_steps > 0 else max(
        1, math.ceil(knobs.num_train_epochs * len(train_rows) / rows_per_step))
    schedule, warmup = lr_schedule(knobs, total)
    order = DataOrder(len(train_rows), knobs.seed)

    shutil.rmtree(setup.partial, ignore_errors=True)  # whatever a crash left there is incomplete
    model = load_base(base.folder, knobs, base.dtype)
    mx.random.seed(knobs.seed)  # the LoRA layers' initialisation
    names = checkpoint_weight_names(base.folder)
    adapted = add_lora(model, knobs, hf_weight_names=names)
    add_token_rows(model, tokenizer, setup.template.added_tokens, hf_weight_names=names)  # ChatML's, on a base model
    seeded_blocks(model, checkpoint=knobs.gradient_checkpointing)
    model.train()
    optimizer = optim.AdamW(learning_rate=knobs.learning_rate, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0,
                            bias_correction=True)
    loss_and_grad = nn.value_and_grad(model, loss_sum)

    step, rows_seen, tokens_seen = 0, 0, 0
    resume = newest_usable_checkpoint(run)
    if resume is not None:
        saved = _read_checkpoint(resume, model, optimizer)
        step, rows_seen, tokens_seen = saved["global_step"], saved["rows_seen"], saved["num_input_tokens_seen"]

    attempt = Attempt(resumed_from=resume.name if resume else None, elapsed_before=_elapsed_before(run, resume))
    events = RunEvents(info, attempt, stop, tokenizer=tokenizer,
                       sample_prompt=setup.rcfg.get("sample_prompt") or "What is the capital of Italy?",
                       sample_steps=int(setup.rcfg.get("sample_steps") or knobs.eval_steps), sample=sample_answer_mlx)
    state = TrainerState(global_step=step, max_steps=total, num_input_tokens_seen=tokens_seen,
                         epoch=rows_seen / len(train_rows))

    def trainer_state() -> dict[str, Any]:
        return {"engine": "mlx", "global_step": state.global_step, "max_steps": total, "epoch": state.epoch,
                "rows_seen": rows_seen, "num_input_tokens_seen": state.num_input_tokens_seen,
                "rows_per_step": rows_per_step, "data_order": order.describe(),
                "schedule": {"lr_scheduler_type": knobs.lr_scheduler_type, "learning_rate": knobs.learning_rate,
                             "warmup_steps": warmup, "total_steps": total, "next_step": state.global_step},
                "dropout_seed": "MLX's generator seeded with seed * 1000003 + step, before each optimizer step"}

    def save() -> None:
        name = f"checkpoint-{state.global_step}"
        commit_checkpoint(run, state.global_step, knobs.save_total_limit,
                          lambda: _write_checkpoint(setup.partial / name, model, optimizer, knobs,
                                                    base_model=base.model_path, adapted=adapted,
                                                    trainer_state=trainer_state()))

    attempt.begin()
    events.on_train_begin(None, state, TrainerControl())
    clock.on_train_begin(None, state, TrainerControl())
    losses: list[float] = []  # this attempt's step losses
    since_log: list[float] = []
    while state.global_step < total:
        mx.random.seed(_step_seed(knobs.seed, state.global_step + 1))
        picked = order.rows(rows_seen, rows_per_step)
        lr = schedule(state.global_step)
        summed, trained, tokens, grads = 0.0, 0.0, 0, None
        try:
            if once.get("oom_at") == state.global_step + 1:
                del once["oom_at"]
                raise RuntimeError(f"[malloc] Unable to allocate {2**32} bytes. (injected by {FAULT_OOM_AT_STEP_ENV})")
            for k in range(accum):
                part = [train_rows[i] for i in picked[k * mb:(k + 1) * mb]]
                ids, mask = _batch(part, pad_id)
                loss, g = loss_and_grad(model, ids, mask)
                grads = g if grads is None else tree_map(mx.add, grads, g)
                mx.eval(loss, grads)  # one micro-batch's graph at a time
                summed += loss.item()
                trained += mask[:, 1:].sum().item()
                tokens += sum(len(r) for r, _ in part)
            grads = tree_map(lambda x: x / max(trained, 1.0), grads)
            grads, grad_norm = optim.clip_grad_norm(grads, MAX_GRAD_NORM)
            optimizer.learning_rate = lr
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state, grad_norm)
        except RuntimeError as e:
            if is_mlx_oom(e):
                raise _OutOfMemory(state.global_step + 1) from None
            raise
        rows_seen += rows_per_step
        state.global_step += 1
        state.epoch = rows_seen / len(train_rows)
        state.num_input_tokens_seen += tokens
        step_loss = summed / max(trained, 1.0)
        losses.append(step_loss)
        since_log.append(step_loss)

        control = TrainerControl()
        clock.on_step_end(None, state, control)
        events.on_step_end(None, state, control, model=model)  # a stop asks for a checkpoint; the sample
        done = state.global_step
        if done % knobs.logging_steps == 0 or done == total:
            events.on_log(None, state, control, logs={"loss": sum(since_log) / len(since_log), "learning_rate": lr,
                                                      "grad_norm": grad_norm.item()})
            since_log = []
        if eval_rows and done % knobs.eval_steps == 0:
            try:
                eval_loss_ = eval_loss(model, eval_rows, mb, pad_id)
            except RuntimeError as e:
                if is_mlx_oom(e):
                    raise _OutOfMemory(state.global_step) from None
                raise
            events.on_log(None, state, control, logs={"eval_loss": eval_loss_})
        if control.should_save or done % knobs.save_steps == 0 or done == total:
            save()
            clock.on_save(None, state, control)
        if control.should_training_stop:
            break
    return state.global_step, model, adapted, losses, attempt, int(state.num_input_tokens_seen)
