"""Direct preference optimisation: trl's DPOTrainer on prompt / chosen / rejected pairs.

The reference model is the policy's own base, never a second copy of it in memory (trl 1.16,
`DPOTrainer.__init__` and `_compute_loss`):

- a new adapter (`peft_config` given): the reference forward runs with the adapter disabled,
  so the reference is the base model;
- `--from RUN` (a PeftModel holding that run's adapter, trainable, and no `peft_config`): trl
  copies the adapter into a second, frozen adapter named "ref" and runs the reference forward
  through it, so the reference is the SFT model (base + that adapter) while the policy trains
  the "default" copy. A checkpoint holds both (`ref/` beside the policy's adapter); resume
  reloads both; the finished adapter is the policy's alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from localtune.methods import Method, Setup, training_arguments
from localtune.methods.sft import load_rows

PREFERENCE_STEP_METRICS = {"rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
                           "rewards/margins": "reward_margin", "rewards/accuracies": "reward_accuracy"}
PREFERENCE_EVAL_METRICS = {"eval_rewards/accuracies": "eval_reward_accuracy",
                           "eval_rewards/margins": "eval_reward_margin"}


@dataclass
class PreferenceData:
    train: Any
    """datasets.Dataset of prompt / chosen / rejected in trl's form (localtune.data.preference_dataset)."""
    eval: Any


def prepare_pairs(setup: Setup, method: str, seed: int) -> PreferenceData:
    """The run's pairs, checked row by row, as trl's preference dataset."""
    from localtune.data import preference_dataset

    _, train_rows, eval_rows = load_rows(setup, method, seed)
    return PreferenceData(preference_dataset(train_rows), preference_dataset(eval_rows) if eval_rows else None)


def policy_model(setup: Setup, model: Any, knobs) -> tuple[Any, Any]:
    """(model, peft_config) for a preference trainer: a new LoRA adapter over the base, or,
    with `--from`, the finished run's adapter loaded trainable (and no peft_config)."""
    from localtune.loading import lora_config

    if setup.from_adapter is None:
        return model, lora_config(knobs, model, setup.tokenizer, setup.template.added_tokens)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(setup.from_adapter), is_trainable=True), None


def dpo_losses(knobs) -> dict[str, Any]:
    """DPOConfig's `loss_type` (and `loss_weights`) for the knobs: the DPO loss alone, or with
    `rpo_alpha` > 0 the DPO loss plus trl's 'sft' term (the chosen answers' mean NLL) at that
    weight, which is how trl 1.16 spells RPO (its DPOConfig has no `rpo_alpha` any more)."""
    if knobs.rpo_alpha > 0:
        return {"loss_type": [knobs.loss_type, "sft"], "loss_weights": [1.0, knobs.rpo_alpha]}
    return {"loss_type": [knobs.loss_type]}


class DPO(Method):
    name = "dpo"
    step_metrics = PREFERENCE_STEP_METRICS
    eval_metrics = PREFERENCE_EVAL_METRICS
    needs_reference = True

    def prepare(self, setup: Setup, knobs) -> PreferenceData:
        return prepare_pairs(setup, self.name, setup.seed)

    def trainer(self, setup: Setup, data: PreferenceData, model: Any, knobs, callbacks: list) -> tuple[type, dict[str, Any]]:
        from trl import DPOConfig, DPOTrainer

        model, peft_config = policy_model(setup, model, knobs)
        args = DPOConfig(**training_arguments(setup, knobs, has_eval=data.eval is not None),
                         max_length=knobs.max_length, beta=knobs.beta, precompute_ref_log_probs=False,
                         activation_offloading=knobs.activation_offloading, **dpo_losses(knobs))
        return DPOTrainer, dict(model=model, args=args, processing_class=setup.tokenizer, callbacks=callbacks,
                                train_dataset=data.train, eval_dataset=data.eval, peft_config=peft_config)

    def card(self, knobs, setup: Setup) -> dict[str, Any]:
        card = {"method": self.name, "beta": knobs.beta, "loss_type": knobs.loss_type, "from_run": setup.from_run}
        if knobs.rpo_alpha > 0:
            card["rpo_alpha"] = knobs.rpo_alpha
        return card
