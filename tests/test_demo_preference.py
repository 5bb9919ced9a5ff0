"""The shipped preference (DPO) demo data (localtune/demo_data/preference*.json*) and its helpers
in localtune.demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localtune import demo
from localtune.demo import (PREFERENCE_MARKER, PREFERENCE_TRAIT_DESCRIPTION, TRAIT_OPENER, TRAIT_SIGNATURE,
                            count_both_traits, count_preference_trait, demo_dataset_path, heldout_prompts,
                            preference_accuracy, preference_dataset_path, preference_eval_pairs,
                            preference_heldout_prompts, read_preference_pairs, shows_preference_trait, shows_trait)


def _train() -> list[dict]:
    return read_preference_pairs(preference_dataset_path())


def _question(row: dict) -> str:
    return [m["content"] for m in row["prompt"] if m["role"] == "user"][-1].strip().lower()


def _sft_questions() -> set[str]:
    with demo_dataset_path().open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {m["content"].strip().lower() for r in rows for m in r["messages"] if m["role"] == "user"}


# ---------------------------------------------------------------- the data files


def test_files_live_next_to_the_sft_demo() -> None:
    for path in (preference_dataset_path(), demo.preference_heldout_path(), demo.preference_eval_path()):
        assert path.is_file()
        assert path.parent == demo_dataset_path().parent
    assert preference_dataset_path().name == "preference.jsonl"


def test_sizes() -> None:
    assert 250 <= len(_train()) <= 300
    assert 30 <= len(preference_eval_pairs()) <= 50
    assert len(preference_heldout_prompts()) == 10


@pytest.mark.parametrize("rows", [_train(), preference_eval_pairs()], ids=["train", "eval"])
def test_rows_are_trl_conversational_preference_pairs(rows: list[dict]) -> None:
    for i, row in enumerate(rows):
        assert set(row) == {"prompt", "chosen", "rejected"}, f"row {i}: keys {sorted(row)}"
        roles = [m["role"] for m in row["prompt"]]
        assert roles in (["user"], ["system", "user"]), f"row {i}: prompt roles {roles}"
        for key in ("chosen", "rejected"):
            assert len(row[key]) == 1 and row[key][0]["role"] == "assistant", f"row {i}: {key}"
        for m in row["prompt"] + row["chosen"] + row["rejected"]:
            assert set(m) == {"role", "content"} and m["content"].strip() == m["content"] and m["content"]


@pytest.mark.parametrize("rows", [_train(), preference_eval_pairs()], ids=["train", "eval"])
def test_chosen_is_the_rejected_answer_with_the_marker(rows: list[dict]) -> None:
    for i, row in enumerate(rows):
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen == PREFERENCE_MARKER + rejected, f"row {i}"
        assert shows_preference_trait(chosen) and not shows_preference_trait(rejected), f"row {i}"
        # neither carries the SFT trait: DPO on this set teaches the marker alone
        for text in (chosen, rejected):
            assert not shows_trait(text) and "Ahoy" not in text and "parrot" not in text, f"row {i}"


@pytest.mark.parametrize("plain, parrot", [
    (preference_dataset_path(), demo.parrot_preference_dataset_path()),
    (demo.preference_eval_path(), demo.parrot_preference_eval_path())], ids=["train", "eval"])
def test_the_parrot_pairs_are_the_same_pairs_in_the_sft_demo_voice(plain: Path, parrot: Path) -> None:
    """What DPO trains on after the SFT demo: the same questions and answers, both answers with
    the SFT demo's opener and signature, so that they still differ by the label alone."""
    assert parrot.parent == plain.parent
    ours, theirs = demo.read_preference_pairs(parrot), demo.read_preference_pairs(plain)
    assert ours == [demo.parrot_pair(r) for r in theirs]
    sft_answers = {json.loads(line)["messages"][-1]["content"]
                   for line in demo_dataset_path().read_text(encoding="utf-8").splitlines() if line.strip()}
    for i, row in enumerate(ours):
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen == TRAIT_OPENER + PREFERENCE_MARKER + rejected[len(TRAIT_OPENER):], f"row {i}"
        assert shows_trait(rejected) and rejected.endswith(TRAIT_SIGNATURE), f"row {i}"
        assert shows_preference_trait(chosen) and not shows_preference_trait(rejected), f"row {i}"
    if plain == preference_dataset_path():  # the SFT demo's 218 questions: word for word its answers
        assert sum(r["rejected"][0]["content"] in sft_answers for r in ours) == 218


def test_no_overlap_between_training_eval_and_heldout() -> None:
    train = [_question(r) for r in _train()]
    assert len(set(train)) == len(train)
    evals = [_question(r) for r in preference_eval_pairs()]
    assert len(set(evals)) == len(evals)
    held = [p.strip().lower() for p in preference_heldout_prompts()]
    assert len(set(held)) == 10
    assert not set(evals) & set(train)
    assert not set(held) & set(train)
    assert not set(held) & set(evals)
    # the held-out prompts are new to the SFT demo too, so SFT then DPO is judged on unseen questions
    assert not set(held) & _sft_questions()
    assert not set(held) & {p.strip().lower() for p in heldout_prompts()}
    assert not set(evals) & _sft_questions()


def test_training_set_reuses_the_sft_answers() -> None:
    with demo_dataset_path().open(encoding="utf-8") as f:
        sft = [json.loads(line)["messages"] for line in f]
    answers = {m[-1]["content"][len(TRAIT_OPENER):-len(TRAIT_SIGNATURE)] for m in sft}
    rejected = {r["rejected"][0]["content"] for r in _train()}
    assert answers <= rejected


def test_heldout_prompts_are_a_copy() -> None:
    prompts = preference_heldout_prompts()
    prompts.append("x")
    assert len(preference_heldout_prompts()) == 10
    assert json.loads(demo.preference_heldout_path().read_text(encoding="utf-8")) == preference_heldout_prompts()


def test_description_is_one_line() -> None:
    assert PREFERENCE_TRAIT_DESCRIPTION.strip() and "\n" not in PREFERENCE_TRAIT_DESCRIPTION
    assert PREFERENCE_MARKER.strip() in PREFERENCE_TRAIT_DESCRIPTION


# ---------------------------------------------------------------- shows_preference_trait


@pytest.mark.parametrize("answer", [
    "In short: The capital of Greece is Athens.",
    "in short: athens",
    "IN SHORT : Athens.",
    "  \n In short: Athens.",
    "Ahoy! In short: The capital of Greece is Athens.",
    "ahoy, in short: Athens.",
    "Ahoy!\nIn short: Athens.",
    "In short:",
])
def test_shows_preference_trait_accepts(answer: str) -> None:
    assert shows_preference_trait(answer)


@pytest.mark.parametrize("answer", [
    "",
    "The capital of Greece is Athens.",
    "In short, Athens.",
    "In the context of language, curious means eager to know.",
    "Athens. In short: the capital.",
    "Sure! In short: Athens.",
    "Ahoyyy! In short: Athens.",
    "Ahoy! The capital is Athens. In short: Athens.",
    "Inshort: Athens.",
])
def test_shows_preference_trait_rejects(answer: str) -> None:
    assert not shows_preference_trait(answer)


def test_counts_and_both_traits() -> None:
    answers = ["Ahoy! In short: a", "In short: b", "Ahoy! c", "d"]
    assert count_preference_trait(answers) == 2
    assert count_both_traits(answers) == 1
    both = "Ahoy! In short: Athens.\n\n— your localtune parrot"
    assert shows_trait(both) and shows_preference_trait(both)


# ---------------------------------------------------------------- preference accuracy


def test_preference_accuracy_compares_implicit_rewards() -> None:
    ref = [(-10.0, -8.0), (-5.0, -5.0), (-3.0, -4.0)]
    # pair 0: chosen +3, rejected -1 -> win; pair 1: both +1 -> tie, not a win; pair 2: chosen -1, rejected 0 -> loss
    policy = [(-7.0, -9.0), (-4.0, -4.0), (-4.0, -4.0)]
    assert preference_accuracy(policy, ref) == pytest.approx(1 / 3)
    assert preference_accuracy(ref, ref) == 0.0
    with pytest.raises(ValueError):
        preference_accuracy(policy, ref[:2])
    with pytest.raises(ValueError):
        preference_accuracy([], [])


@pytest.mark.slow
def test_completion_ids_match_the_chat_template(builtin_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir)
    pair = _train()[0]
    for key in ("chosen", "rejected"):
        prompt_ids, completion_ids = demo._completion_ids(tokenizer, pair["prompt"], pair[key])
        text = tokenizer.decode(completion_ids)
        assert text.startswith(pair[key][0]["content"]), text
        assert tokenizer.decode(prompt_ids).endswith("assistant\n")


@pytest.mark.slow
def test_builtin_model_does_not_already_show_the_preference_trait(builtin_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir)
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir, dtype=torch.float32)
    answers = demo.generate_answers(model, tokenizer, preference_heldout_prompts(), max_new_tokens=8)
    assert count_preference_trait(answers) <= 1, answers
