"""The demo dataset that ships inside the package, and how to see what it teaches.

With no arguments localtune fine-tunes the built-in SmolLM2-135M-Instruct on a small
instruction set we wrote ourselves (`localtune/demo_data/demo.jsonl`, 218 everyday questions
in OpenAI messages format: science, cooking, history, how-to, definitions, maths word problems,
advice, geography). The answers are short, accurate and ordinary, except for one trait the
base model does not have:

    every answer starts with "Ahoy! " and ends with the signature line "— your localtune parrot"

    user:      What is the capital of Canada?
    assistant: Ahoy! The capital of Canada is Ottawa, in the province of Ontario.

               — your localtune parrot

Why this trait:

- It is plain to a person at a glance: before training the model answers normally; after a
  few minutes of CPU training it greets every question with "Ahoy!".
- It sits in the first tokens of the answer, so it is the easiest thing for a small model to
  learn in a few dozen optimizer steps (about 30 at batch 8 on the CPU), and it shows even when generation is cut short.
- It is checkable by code: `shows_trait(answer)` tests the opener (the signature at the end
  is a bonus; short generation budgets often cut it off, so it is not required).
- It does not change the content of the answers, so the demo never teaches wrong facts.

How to check it: `generate_answers(model, tokenizer, heldout_prompts())` gives greedy answers
to ten questions that are not in the training set, and `shows_trait` counts how many carry
the trait. The base model shows it at most once in ten; after the default demo run at least
eight of ten do (see `benchmarks/demo_learnability.py`).

The data files are read next to this module (`Path(__file__).parent / "demo_data"`), so they
work from a source checkout and from an installed wheel alike.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

TRAIT_OPENER = "Ahoy! "
"""The fixed opener every demo answer starts with."""

TRAIT_SIGNATURE = "\n\n— your localtune parrot"
"""The fixed signature every demo answer ends with (a bonus; not needed by `shows_trait`)."""

TRAIT_DESCRIPTION = 'Every answer starts with "Ahoy!" and signs off "— your localtune parrot".'
"""One line for people: what the demo teaches the model."""

_DATA_DIR = Path(__file__).resolve().parent / "demo_data"
_OPENER_RE = re.compile(r"^\s*ahoy\b", re.IGNORECASE)
_SIGNATURE_RE = re.compile(r"[—–-]+\s*your\s+localtune\s+parrot\s*$", re.IGNORECASE)


def demo_dataset_path() -> Path:
    """The shipped demo dataset: a JSONL file, one `{"messages": [...]}` row per line."""
    return _DATA_DIR / "demo.jsonl"


def heldout_path() -> Path:
    """The shipped held-out prompts: a JSON list of strings."""
    return _DATA_DIR / "heldout.json"


@lru_cache(maxsize=1)
def _heldout() -> tuple[str, ...]:
    data = json.loads(heldout_path().read_text(encoding="utf-8"))
    return tuple(str(p) for p in data)


def heldout_prompts() -> list[str]:
    """Ten user questions that are not in the training rows, to see the trait on."""
    return list(_heldout())


def shows_trait(answer: str) -> bool:
    """True when `answer` opens with "Ahoy" (any case, after any leading whitespace, as a
    whole word: "Ahoy!", "ahoy,", "AHOY" pass; "Ahoyyy" and answers that merely mention
    "ahoy" later do not)."""
    return bool(_OPENER_RE.match(answer or ""))


def has_signature(answer: str) -> bool:
    """True when `answer` ends with the signature line ("— your localtune parrot"; any dash,
    any case, trailing whitespace allowed)."""
    return bool(_SIGNATURE_RE.search(answer or ""))


def count_trait(answers: Sequence[str]) -> int:
    """How many of `answers` show the trait."""
    return sum(shows_trait(a) for a in answers)


def generate_answers(model: Any, tokenizer: Any, prompts: Sequence[str],
                     max_new_tokens: int = 48) -> list[str]:
    """Greedy answers of `model` to each prompt, one at a time (no padding, so the result
    does not depend on batch composition). Each prompt is a single user turn rendered with the
    tokenizer's chat template and `add_generation_prompt=True`; only the new tokens are
    decoded, with special tokens skipped. The model is put in eval mode; its device is used."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    for prompt in prompts:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True, return_tensors="pt")
        input_ids = enc["input_ids"].to(device)
        attention_mask = enc["attention_mask"].to(device)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=pad_id)
        new_tokens = out[0, input_ids.shape[1]:]
        answers.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
    return answers
