"""Odds-ratio preference optimisation: trl's ORPOTrainer (trl.experimental.orpo in trl 1.16) on
prompt / chosen / rejected pairs. No reference model: the loss is the chosen answer's NLL plus
`beta` times the log odds ratio of chosen over rejected, so one model is in memory whatever the
adapter. With `--from RUN` the policy continues that run's adapter."""

from __future__ import annotations

from typing import Any

from localtune.methods import Method, Setup, training_arguments
from localtune.methods.dpo import PREFERENCE_EVAL_METRICS, PREFERENCE_STEP_METRICS, PreferenceData, policy_model
from localtune.methods.sft import load_rows


def counting_pairs(trainer_cls: type) -> type:
    """`trainer_cls` counting the tokens of both answers of each pair into
    `state.num_input_tokens_seen`. ORPO's batches hold `chosen_input_ids` / `rejected_input_ids`
    (prompt included) and no `input_ids`, so transformers' own count (`Trainer._track_num_input_tokens`,
    which reads `inputs[model.main_input_name]`) finds nothing and the run would show 0 tokens/s."""

    def _track_num_input_tokens(self, inputs):
        if self.args.include_num_input_tokens_seen == "no":
            return
        import torch

        seen = 0
        for side in ("chosen", "rejected"):
            mask = inputs.get(f"{side}_attention_mask")
            ids = inputs.get(f"{side}_input_ids")
            if mask is not None and self.args.include_num_input_tokens_seen == "non_padding":
                seen += int(mask.sum())
            elif ids is not None:
                seen += int(ids.numel())
        count = torch.as_tensor(seen, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(count).sum().item()

    return type(trainer_cls.__name__, (trainer_cls,), {"_track_num_input_tokens": _track_num_input_tokens})


class ORPO(Method):
    name = "orpo"
    step_metrics = {**PREFERENCE_STEP_METRICS, "log_odds_ratio": "log_odds_ratio", "nll_loss": "nll_loss"}
    eval_metrics = PREFERENCE_EVAL_METRICS

    def prepare(self, setup: Setup, knobs) -> PreferenceData:
        """The pairs as `localtune.data.orpo_dataset` renders them (one end of turn per answer)."""
        from localtune.data import orpo_dataset

        _, train_rows, eval_rows = load_rows(setup, self.name, setup.seed)
        tok = setup.tokenizer
        return PreferenceData(orpo_dataset(train_rows, tok), orpo_dataset(eval_rows, tok) if eval_rows else None)

    def trainer(self, setup: Setup, data: PreferenceData, model: Any, knobs, callbacks: list) -> tuple[type, dict[str, Any]]:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        model, peft_config = policy_model(setup, model, knobs)
        args = ORPOConfig(**training_arguments(setup, knobs, has_eval=data.eval is not None),
                          max_length=knobs.max_length, beta=knobs.beta)
        return counting_pairs(ORPOTrainer), dict(model=model, args=args, processing_class=setup.tokenizer, callbacks=callbacks,
                                 train_dataset=data.train, eval_dataset=data.eval, peft_config=peft_config)

    def card(self, knobs, setup: Setup) -> dict[str, Any]:
        return {"method": self.name, "beta": knobs.beta, "from_run": setup.from_run}
