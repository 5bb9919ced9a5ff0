"""Supervised fine-tuning: trl's SFTTrainer on the run's rows, trained on the answers only
(unless `train_on_inputs`), padding-free where the device handles it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from localtune.events import atomic_write_json
from localtune.methods import Method, Setup, training_arguments


def _padding_free(backend: str, precision) -> bool:
    """Whether batches go padding-free: each micro-batch's rows laid end to end in one row,
    with position_ids restarting at every row, so no compute goes to padding (on
    `shared/bench/varied_lengths.jsonl`, padded batches of 4 hold 1.66 tokens per real one).
    On the CPU transformers' sdpa attention sees the row boundaries in the position_ids and
    masks across them (a block-diagonal mask). On CUDA only with flash-attention 2 (which
    localtune.precision allows on compute capability 8.0+, in 16 bits, when installed): sdpa
    would compute attention over the whole joined row through a mask, which costs the square
    of the joined length. Apple: padded (not measured there)."""
    if backend == "cpu":
        return True
    return backend == "cuda" and precision.attn_implementation == "flash_attention_2"


def load_rows(setup: Setup, method: str, seed: int):
    """The run's training and evaluation rows, checked (localtune.data), for `method`; writes
    data.json (what was read, and the template, so that chat and export render as training did).
    Returns (loaded, train_rows, eval_rows)."""
    from localtune.data import load_data, split_eval

    rcfg = setup.rcfg
    fmt = rcfg.get("format") or None
    skip = bool(rcfg.get("skip_bad_rows"))
    loaded = load_data(rcfg["data"], format=fmt, skip_bad_rows=skip, method=method)
    train_rows, eval_rows = loaded.examples, []
    if rcfg.get("eval_data"):
        eval_rows = load_data(rcfg["eval_data"], format=fmt, skip_bad_rows=skip, method=method).examples
    elif float(rcfg.get("eval_split", 0) or 0) > 0:
        train_rows, eval_rows = split_eval(loaded.examples, float(rcfg["eval_split"]), seed)
    atomic_write_json(setup.run.path / "data.json", {
        **loaded.summary(), "method": method, "train_rows": len(train_rows), "eval_rows": len(eval_rows),
        "train_on_inputs": bool(rcfg.get("train_on_inputs", False)), "chat_template": setup.template.to_dict()})
    return loaded, train_rows, eval_rows


@dataclass
class SFTData:
    train: Any
    """datasets.Dataset: input_ids and assistant_masks of every training row."""
    eval: Any
    padding_free: bool


class SFT(Method):
    name = "sft"

    def padding_free(self, setup: Setup, knobs) -> bool:
        return _padding_free(setup.backend, setup.precision) and not knobs.packing

    def prepare(self, setup: Setup, knobs) -> SFTData:
        from localtune.data import tokenize

        _, train_rows, eval_rows = load_rows(setup, "sft", setup.seed)
        train_on_inputs = bool(setup.rcfg.get("train_on_inputs", False))
        tok, template = setup.tokenizer, setup.template
        full_train = tokenize(train_rows, tok, template, train_on_inputs=train_on_inputs).remove_columns("length")
        full_eval = (tokenize(eval_rows, tok, template, train_on_inputs=train_on_inputs).remove_columns("length")
                     if eval_rows else None)
        return SFTData(full_train, full_eval, self.padding_free(setup, knobs))

    @staticmethod
    def _truncated(ds, n: int, padding_free: bool):
        """Padding-free, trl leaves truncation to us (rows left with nothing to learn it drops)."""
        if ds is None or not padding_free:
            return ds
        return ds.map(lambda b: {k: [v[:n] for v in b[k]] for k in ("input_ids", "assistant_masks")},
                      batched=True, desc="Truncating")

    def trainer(self, setup: Setup, data: SFTData, model: Any, knobs, callbacks: list) -> tuple[type, dict[str, Any]]:
        from trl import SFTConfig, SFTTrainer

        from localtune.loading import lora_config

        args = SFTConfig(
            **training_arguments(setup, knobs, has_eval=data.eval is not None),
            max_length=None if data.padding_free else knobs.max_length,  # padding-free: truncated here
            packing=knobs.packing,
            padding_free=data.padding_free,
            activation_offloading=knobs.activation_offloading,
        )
        return SFTTrainer, dict(
            model=model, args=args, processing_class=setup.tokenizer, callbacks=callbacks,
            train_dataset=self._truncated(data.train, knobs.max_length, data.padding_free),
            eval_dataset=self._truncated(data.eval, knobs.max_length, data.padding_free),
            peft_config=lora_config(knobs, model, setup.tokenizer, setup.template.added_tokens))
