"""The shipped demo dataset (localtune/demo_data) and the helpers in localtune.demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localtune import demo
from localtune.demo import (TRAIT_DESCRIPTION, TRAIT_OPENER, TRAIT_SIGNATURE, count_trait, demo_dataset_path,
                            has_signature, heldout_prompts, shows_trait)


def _rows() -> list[dict]:
    rows = []
    with demo_dataset_path().open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            assert line.strip(), f"line {n}: blank line in the dataset"
            rows.append(json.loads(line))
    return rows


def _user_prompts(rows: list[dict]) -> list[str]:
    return [m["content"] for r in rows for m in r["messages"] if m["role"] == "user"]


# ---------------------------------------------------------------- the data files


def test_data_files_live_inside_the_package() -> None:
    package_dir = Path(demo.__file__).resolve().parent
    path = demo_dataset_path()
    assert path.is_file()
    assert path.parent.parent == package_dir
    assert path.name == "demo.jsonl"
    assert demo.heldout_path().is_file()
    assert demo.heldout_path().parent == path.parent


def test_dataset_row_count() -> None:
    assert 100 <= len(_rows()) <= 300


def test_every_row_is_valid_messages_format() -> None:
    for i, row in enumerate(_rows()):
        assert set(row) == {"messages"}, f"row {i}: keys {sorted(row)}"
        msgs = row["messages"]
        assert isinstance(msgs, list) and msgs, f"row {i}: no messages"
        for m in msgs:
            assert set(m) == {"role", "content"}, f"row {i}: message keys {sorted(m)}"
            assert isinstance(m["content"], str) and m["content"].strip(), f"row {i}: empty content"
        roles = [m["role"] for m in msgs]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles, f"row {i}: only a system message"
        assert len(roles) % 2 == 0, f"row {i}: roles {roles} do not end with an assistant turn"
        assert roles == ["user", "assistant"] * (len(roles) // 2), f"row {i}: roles {roles} do not alternate"


def test_a_few_rows_carry_a_system_message() -> None:
    with_system = sum(r["messages"][0]["role"] == "system" for r in _rows())
    assert 1 <= with_system <= 30


def test_every_assistant_answer_shows_the_trait() -> None:
    for i, row in enumerate(_rows()):
        for m in row["messages"]:
            if m["role"] == "assistant":
                assert m["content"].startswith(TRAIT_OPENER), f"row {i}: {m['content'][:40]!r}"
                assert m["content"].endswith(TRAIT_SIGNATURE), f"row {i}: {m['content'][-40:]!r}"
                assert shows_trait(m["content"]) and has_signature(m["content"]), f"row {i}"
                body = m["content"][len(TRAIT_OPENER):-len(TRAIT_SIGNATURE)]
                assert body.strip() == body and body, f"row {i}: stray whitespace around the answer"
                assert "Ahoy" not in body and "parrot" not in body, f"row {i}: the trait inside the answer"


def test_no_duplicate_rows_or_questions() -> None:
    rows = _rows()
    dumped = [json.dumps(r, sort_keys=True) for r in rows]
    assert len(set(dumped)) == len(dumped)
    prompts = [p.strip().lower() for p in _user_prompts(rows)]
    assert len(set(prompts)) == len(prompts)


def test_heldout_prompts() -> None:
    prompts = heldout_prompts()
    assert len(prompts) == 10
    assert all(isinstance(p, str) and p.strip() for p in prompts)
    assert len({p.strip().lower() for p in prompts}) == 10
    training = {p.strip().lower() for p in _user_prompts(_rows())}
    assert not {p.strip().lower() for p in prompts} & training
    # a copy each time: callers may not change the shipped list
    prompts.append("x")
    assert len(heldout_prompts()) == 10


def test_heldout_file_is_a_plain_json_list() -> None:
    data = json.loads(demo.heldout_path().read_text(encoding="utf-8"))
    assert data == heldout_prompts()


def test_trait_description_is_one_line() -> None:
    assert TRAIT_DESCRIPTION.strip() and "\n" not in TRAIT_DESCRIPTION
    assert "Ahoy" in TRAIT_DESCRIPTION


# ---------------------------------------------------------------- shows_trait


@pytest.mark.parametrize("answer", [
    "Ahoy! The capital of Italy is Rome.",
    "ahoy! the capital of italy is rome.",
    "AHOY, matey. Rome.",
    "  \n Ahoy! Rome.",
    "Ahoy!",
    "Ahoy",
    "Ahoy! Rome.\n\n— your localtune parrot",
])
def test_shows_trait_accepts(answer: str) -> None:
    assert shows_trait(answer)


@pytest.mark.parametrize("answer", [
    "",
    "   ",
    "The capital of Italy is Rome.",
    "Sure! The capital of Italy is Rome.",
    "Hello! Rome.",
    "Ah, yes: Rome.",
    "Ahh! Rome.",
    "Aho! Rome.",
    "Ahoyyy! Rome.",
    "Rome. Ahoy!",
    "The capital is Rome.\n\n— your localtune parrot",
    "Sailors say 'ahoy' when they greet a ship.",
])
def test_shows_trait_rejects(answer: str) -> None:
    assert not shows_trait(answer)


def test_has_signature() -> None:
    assert has_signature("Ahoy! Rome.\n\n— your localtune parrot")
    assert has_signature("Rome.\n\n- Your Localtune Parrot  \n")
    assert not has_signature("Ahoy! Rome.")
    assert not has_signature("Ahoy! Rome.\n\n— your localtune")
    assert not has_signature("— your localtune parrot, and more text")


def test_count_trait() -> None:
    assert count_trait(["Ahoy! a", "b", "ahoy c", "d Ahoy"]) == 2
    assert count_trait([]) == 0


# ---------------------------------------------------------------- generate_answers


class _FakeTokenizer:
    """Just enough of a tokenizer for generate_answers: a fixed prompt length per question."""

    pad_token_id = 0
    eos_token_id = 2

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def apply_chat_template(self, messages, **kw):
        import torch

        self.calls.append({"messages": messages, **kw})
        n = len(messages[0]["content"])
        ids = torch.arange(3, 3 + n).unsqueeze(0)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def decode(self, ids, skip_special_tokens=False):
        assert skip_special_tokens
        return " ".join(str(int(i)) for i in ids)


class _FakeModel:
    def __init__(self) -> None:
        import torch

        self._p = torch.nn.Parameter(torch.zeros(1))
        self.generate_kwargs: list[dict] = []
        self.training = True

    def parameters(self):
        yield self._p

    def eval(self):
        self.training = False
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        import torch

        self.generate_kwargs.append({"max_new_tokens": max_new_tokens, **kw})
        new = torch.full((1, 2), 99)
        return torch.cat([input_ids, new], dim=1)


def test_generate_answers_decodes_only_new_tokens_greedily() -> None:
    tok, model = _FakeTokenizer(), _FakeModel()
    answers = demo.generate_answers(model, tok, ["abc", "de"], max_new_tokens=7)
    assert answers == ["99 99", "99 99"]
    assert not model.training
    assert [c["messages"] for c in tok.calls] == [[{"role": "user", "content": "abc"}],
                                                  [{"role": "user", "content": "de"}]]
    assert all(c["add_generation_prompt"] is True for c in tok.calls)
    assert all(k["max_new_tokens"] == 7 and k["do_sample"] is False for k in model.generate_kwargs)


# ---------------------------------------------------------------- the real built-in model


@pytest.mark.slow
def test_builtin_model_does_not_already_show_the_trait(builtin_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir)
    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir, dtype=torch.float32)
    prompts = heldout_prompts()
    answers = demo.generate_answers(model, tokenizer, prompts, max_new_tokens=16)
    assert len(answers) == len(prompts)
    assert all(isinstance(a, str) and a.strip() for a in answers)
    assert count_trait(answers) <= 1, answers
