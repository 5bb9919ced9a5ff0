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

The preference demo (`localtune train --method dpo` with no data) teaches a second trait with
DPO from pairs (`localtune/demo_data/preference.jsonl`, 280 pairs in trl's conversational
preference form: `{"prompt": [...], "chosen": [...], "rejected": [...]}`, one per line). The
questions are the SFT demo's 218 plus 62 more of the same kinds; both answers of a pair are the
same plain answer (no "Ahoy!", no signature), except that the chosen one opens with a label:

    every preferred answer starts with "In short: "

    user:      What is the capital of Canada?
    chosen:    In short: The capital of Canada is Ottawa, in the province of Ontario.
    rejected:  The capital of Canada is Ottawa, in the province of Ontario.

Why this trait: it is seen at a glance, it sits in the first tokens (so it shows in short
generations and DPO learns it in a few dozen steps), the base model never opens with it, and it
is not the SFT trait, so it was meant to sit next to it ("Ahoy! In short: ..."). Measured once
(`benchmarks/dpo_demo.py --sft`): after 6 DPO steps on the SFT demo's adapter the label opens 10
of 10 held-out answers, but the "Ahoy!" opener gave way to it; the SFT signature stayed.
Because the two answers of a pair differ only by the label, everything
else cancels in DPO's log-ratio difference, and what is learned is the label alone.

How to check it: `shows_preference_trait(answer)` tests for "In short:" at the start, or right
after an "Ahoy" opener; `preference_heldout_prompts()` gives ten questions in neither training
set, and `preference_eval_pairs()` 40 held-out pairs (new questions) for preference accuracy:
with `pair_logprobs` on the trained policy and on the reference, `preference_accuracy` is the
fraction of pairs whose implicit reward beta * (logp_policy - logp_ref) is higher for the
chosen answer (beta > 0 does not change the comparison). The base model shows the trait on
none of the ten; after the default DPO run on at least seven (see `benchmarks/dpo_demo.py`).

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

PREFERENCE_MARKER = "In short: "
"""The label every chosen answer of the preference demo opens with (the rejected one lacks it)."""

PREFERENCE_TRAIT_DESCRIPTION = 'Answers open with "In short: " (after "Ahoy! " when the SFT demo came first).'
"""One line for people: what the preference (DPO) demo teaches the model."""

_DATA_DIR = Path(__file__).resolve().parent / "demo_data"
_OPENER_RE = re.compile(r"^\s*ahoy\b", re.IGNORECASE)
_PREFERENCE_RE = re.compile(r"^\s*(?:ahoy\b[\s!,.]*)?in\s+short\s*:", re.IGNORECASE)
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


# ---------------------------------------------------------------- the preference (DPO) demo


def preference_dataset_path() -> Path:
    """The shipped preference set: a JSONL file, one `{"prompt", "chosen", "rejected"}` row per
    line, each a list of messages (trl's conversational preference form)."""
    return _DATA_DIR / "preference.jsonl"


def preference_heldout_path() -> Path:
    """The preference demo's held-out prompts: a JSON list of ten strings."""
    return _DATA_DIR / "preference_heldout.json"


def preference_eval_path() -> Path:
    """Held-out preference pairs (same form as the training set, other questions)."""
    return _DATA_DIR / "preference_eval.jsonl"


@lru_cache(maxsize=1)
def _preference_heldout() -> tuple[str, ...]:
    data = json.loads(preference_heldout_path().read_text(encoding="utf-8"))
    return tuple(str(p) for p in data)


def preference_heldout_prompts() -> list[str]:
    """Ten user questions in neither the SFT nor the preference set, to see the trait on."""
    return list(_preference_heldout())


def read_preference_pairs(path: Path) -> list[dict[str, Any]]:
    """The rows of a preference JSONL file, as dicts."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def preference_eval_pairs() -> list[dict[str, Any]]:
    """The held-out preference pairs (a fresh list each call)."""
    return read_preference_pairs(preference_eval_path())


def shows_preference_trait(answer: str) -> bool:
    """True when `answer` opens with "In short:" (any case, after any leading whitespace), also
    right after an "Ahoy" opener ("Ahoy! In short: ..."), so that an answer with both traits
    passes both this and `shows_trait`. "In short," or "In short" later in the answer do not."""
    return bool(_PREFERENCE_RE.match(answer or ""))


def count_preference_trait(answers: Sequence[str]) -> int:
    """How many of `answers` show the preference trait."""
    return sum(shows_preference_trait(a) for a in answers)


def count_both_traits(answers: Sequence[str]) -> int:
    """How many of `answers` show both the SFT trait ("Ahoy") and the preference trait."""
    return sum(shows_trait(a) and shows_preference_trait(a) for a in answers)


# ------------------------------------------- the preference demo after the SFT demo


def parrot_pair(row: dict[str, Any]) -> dict[str, Any]:
    """A preference pair in the SFT demo model's voice: both answers open with "Ahoy! " and end
    with the signature, so that they differ by the label alone, right after the opener."""
    out = json.loads(json.dumps(row))
    for side in ("chosen", "rejected"):
        last = out[side][-1]
        last["content"] = TRAIT_OPENER + last["content"] + TRAIT_SIGNATURE
    return out


def parrot_preference_dataset_path() -> Path:
    """The preference pairs in the SFT demo's voice (`parrot_pair` of every shipped pair): what
    DPO or ORPO trains on by default when it continues a run of the SFT demo (`--from`)."""
    return _DATA_DIR / "preference_parrot.jsonl"


def parrot_preference_eval_path() -> Path:
    """The held-out pairs in the SFT demo's voice."""
    return _DATA_DIR / "preference_parrot_eval.jsonl"


def _completion_ids(tokenizer: Any, prompt: list[dict[str, str]], completion: list[dict[str, str]]
                    ) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) as trl's DPOTrainer tokenizes a conversational pair: the
    prompt with the generation prompt, the whole conversation, and the completion being what
    follows their common prefix (so it ends with the template's end-of-turn tokens)."""
    def ids(messages: list[dict[str, str]], **kw: Any) -> list[int]:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]
        return list(out)

    prompt_ids = ids(prompt, add_generation_prompt=True)
    full_ids = ids(prompt + completion)
    n = 0
    while n < min(len(prompt_ids), len(full_ids)) and prompt_ids[n] == full_ids[n]:
        n += 1
    return full_ids[:n], full_ids[n:]


def pair_logprobs(model: Any, tokenizer: Any, pairs: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(log p(chosen | prompt), log p(rejected | prompt)) under `model` for each pair: the sums
    of the completion tokens' log-probabilities, one sequence at a time (no padding), in
    float32 without autocast. For the reference of a LoRA policy call it inside
    `model.disable_adapter()` (or with the reference adapter set). The model is put in eval mode."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, float]] = []
    for pair in pairs:
        two = []
        for key in ("chosen", "rejected"):
            p_ids, c_ids = _completion_ids(tokenizer, pair["prompt"], pair[key])
            ids = torch.tensor([p_ids + c_ids], device=device)
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(p_ids) - 1:-1].float()
            logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(p_ids):, None])
            two.append(float(logps.sum()))
        out.append((two[0], two[1]))
    return out


def preference_accuracy(policy: Sequence[tuple[float, float]], reference: Sequence[tuple[float, float]]) -> float:
    """The fraction of pairs where the implicit reward (policy minus reference log-probability;
    DPO's beta scales both sides alike) of the chosen answer exceeds the rejected one's, from
    two `pair_logprobs` results. A tie (an untrained policy) does not count."""
    if len(policy) != len(reference) or not policy:
        raise ValueError("policy and reference must give the same, non-zero number of pairs")
    wins = sum((pc - rc) > (pr - rr) for (pc, pr), (rc, rr) in zip(policy, reference))
    return wins / len(policy)
