"""Training methods: what turns a run's data and a base model into a trl trainer.

The worker (localtune.worker) is a lifecycle that knows nothing of the method: it takes the
run's lock, loads the base model once per attempt, builds the trainer through the run's
method, backs off out-of-memory errors, commits checkpoints atomically and saves the adapter.
A method is one module with one `Method` subclass:

- `prepare(setup, knobs)`: read and check the data (once per run, before the first attempt), write
  `data.json` (what was read and how it renders), return what `trainer` needs;
- `trainer(setup, data, model, knobs, callbacks)`: the trl trainer class and its keyword
  arguments for one attempt (the lifecycle adds the atomic checkpoint commit to the class);
- `step_metrics` / `eval_metrics`: trl's log keys the `step` / `eval` events carry, and the
  fields they carry them as;
- `card(knobs, setup)`: what the model card records about the method.

`sft` (supervised fine-tuning, trl's SFTTrainer), `dpo` (trl's DPOTrainer) and `orpo`
(trl.experimental.orpo's ORPOTrainer) are here; `get_method(name)` returns one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localtune.errors import UserError
from localtune.runs import RunDir


@dataclass
class Setup:
    """What the lifecycle resolved for the run before any attempt: the same for every method."""

    run: RunDir
    rcfg: dict[str, Any]
    """config.toml's [run] table."""
    backend: str
    device: str
    """'cuda:N', 'mps' or 'cpu': the plan's training device."""
    precision: Any
    """localtune.precision.Precision: the compute dtype decided for this device."""
    tokenizer: Any
    template: Any
    """localtune.data.ChatTemplate: set on the tokenizer, so trl renders with it too."""
    seed: int
    partial: Path
    """Where the trainer writes a checkpoint before the lifecycle renames it into place."""
    from_adapter: Path | None = None
    """The finished run's adapter a preference run continues (`--from`), or None."""
    from_run: str | None = None


def training_arguments(setup: Setup, knobs, *, has_eval: bool) -> dict[str, Any]:
    """The transformers TrainingArguments every method's trl config shares, from the knobs."""
    return dict(
        output_dir=str(setup.partial),
        per_device_train_batch_size=knobs.per_device_train_batch_size,
        per_device_eval_batch_size=knobs.per_device_train_batch_size,
        gradient_accumulation_steps=knobs.gradient_accumulation_steps,
        learning_rate=knobs.learning_rate,
        lr_scheduler_type=knobs.lr_scheduler_type,
        warmup_steps=knobs.warmup_steps,
        num_train_epochs=knobs.num_train_epochs,
        max_steps=knobs.max_steps,
        optim=knobs.optim,
        activation_checkpointing=knobs.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if knobs.gradient_checkpointing else None,
        logging_steps=knobs.logging_steps,
        save_strategy="steps",
        save_steps=knobs.save_steps,
        save_total_limit=None,  # rotation happens in checkpoints/, after the rename
        eval_strategy="steps" if has_eval else "no",
        eval_steps=knobs.eval_steps,
        seed=knobs.seed,
        data_seed=knobs.seed,
        bf16=setup.precision.trainer_bf16,
        fp16=setup.precision.trainer_fp16,
        use_cpu=setup.backend == "cpu",
        report_to="none",
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
        save_only_model=False,
    )


class Method:
    """One training method (see the module docstring)."""

    name = ""
    step_metrics: dict[str, str] = {}
    eval_metrics: dict[str, str] = {}
    needs_reference = False
    """Whether training runs a frozen reference model's forward besides the policy's."""

    def prepare(self, setup: Setup, knobs) -> Any:
        raise NotImplementedError

    def trainer(self, setup: Setup, data: Any, model: Any, knobs, callbacks: list) -> tuple[type, dict[str, Any]]:
        raise NotImplementedError

    def padding_free(self, setup: Setup, knobs) -> bool:
        """Whether batches go padding-free (rows laid end to end); only SFT does here."""
        return False

    def card(self, knobs, setup: Setup) -> dict[str, Any]:
        return {"method": self.name}


def get_method(name: str) -> Method:
    """The method called `name` (a knob value: sft, dpo or orpo)."""
    if name == "sft":
        from localtune.methods.sft import SFT

        return SFT()
    if name == "dpo":
        from localtune.methods.dpo import DPO

        return DPO()
    if name == "orpo":
        from localtune.methods.orpo import ORPO

        return ORPO()
    raise UserError(f"unknown training method {name!r}: use sft, dpo or orpo")
