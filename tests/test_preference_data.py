"""Preference pairs (for --method dpo and orpo) as a user meets them: both formats in every file
type, detection beside the supervised formats, every row problem with its file and line, the
one-line mismatch between a file and a method, the evaluation split, and the token ids trl 1.16's
DPOTrainer and ORPOTrainer make of preference_dataset's columns with the built-in model's
tokenizer (compared with tokenize_pairs, which `localtune data inspect` shows).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localtune.data import (DataError, Example, MethodMismatch, PreferenceExample, chat_template_for, load_data,
                            orpo_dataset, pair_texts, preference_dataset, split_eval, tokenize, tokenize_pairs)
from localtune.errors import UserError
from localtune.formats import FORMATS, PREFERENCE_CONVERSATION, PREFERENCE_TEXT, TEXT, detect, formats_for
from tests.test_data import tree_digest, write, write_jsonl

SYSTEM = {"role": "system", "content": "Be terse."}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# two rows per form; the canonical pair each must become (trl's explicit-prompt form)
STRING_ROWS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Lyon."},
    {"prompt": "Two plus two is", "chosen": " four.", "rejected": " five."},
]
STRING_PAIRS = [
    (PREFERENCE_TEXT, "The capital of France is", " Paris.", " Lyon."),
    (PREFERENCE_TEXT, "Two plus two is", " four.", " five."),
]
CONVERSATION_ROWS = [
    # implicit prompt: both conversations hold it (a system turn too)
    {"chosen": [SYSTEM, user("Two plus two?"), assistant("Four.")],
     "rejected": [SYSTEM, user("Two plus two?"), assistant("Five.")]},
    # explicit prompt of three turns, and the answers alone
    {"prompt": [user("Capital of France?"), assistant("Paris."), user("And of Italy?")],
     "chosen": [assistant("Rome.")], "rejected": [assistant("Milan.")]},
]
CONVERSATION_PAIRS = [
    (PREFERENCE_CONVERSATION, [SYSTEM, user("Two plus two?")], [assistant("Four.")], [assistant("Five.")]),
    (PREFERENCE_CONVERSATION, [user("Capital of France?"), assistant("Paris."), user("And of Italy?")],
     [assistant("Rome.")], [assistant("Milan.")]),
]
ROWS = {"preference": STRING_ROWS, "preference_messages": CONVERSATION_ROWS}
PAIRS = {"preference": STRING_PAIRS, "preference_messages": CONVERSATION_PAIRS}

SFT_ROWS = [{"messages": [user("Capital of France?"), assistant("Paris.")]},
            {"messages": [user("Two plus two?"), assistant("Four.")]}]

DPO_NEEDS = ("--method dpo needs preference pairs (preference: prompt/chosen/rejected, or preference_messages: "
             "chosen/rejected conversations); see localtune data formats")
SFT_NEEDS = ("--method sft needs supervised fine-tuning rows (messages, sharegpt, alpaca, prompt_completion or "
             "text); see localtune data formats")


def as_tuple(ex: PreferenceExample) -> tuple:
    return ex.shape, ex.prompt, ex.chosen, ex.rejected


# ---------------------------------------------------------------- formats and file types


# CSV cells are strings: only the string format is read from a .csv
KINDS = {"preference": ("jsonl", "json-list", "json-object", "csv", "parquet", "save_to_disk"),
         "preference_messages": ("jsonl", "json-list", "json-object", "parquet", "save_to_disk")}


@pytest.mark.parametrize("fmt, kind", [(f, k) for f, kinds in KINDS.items() for k in kinds])
def test_every_preference_format_loads_from_every_file_type(tmp_path, fmt, kind):
    path, first_where = write(kind, tmp_path, ROWS[fmt])
    before = tree_digest(path)

    loaded = load_data(path, method="dpo")

    assert loaded.format == fmt
    assert loaded.total_rows == 2 and not loaded.skipped and not loaded.warnings
    assert [as_tuple(ex) for ex in loaded.examples] == PAIRS[fmt]
    assert all(isinstance(ex, PreferenceExample) for ex in loaded.examples)
    assert loaded.examples[0].where == first_where
    assert loaded.summary()["methods"] == ["dpo", "orpo"]
    assert tree_digest(path) == before  # only read


@pytest.mark.parametrize("method", ["dpo", "orpo", None])
def test_pairs_read_the_same_for_dpo_orpo_and_no_method(tmp_path, method):
    path = write_jsonl(tmp_path / "pairs.jsonl", CONVERSATION_ROWS)
    assert [as_tuple(ex) for ex in load_data(path, method=method).examples] == CONVERSATION_PAIRS


def test_string_prompt_beside_conversations_is_read_as_trl_reads_it(tmp_path):
    rows = [
        # the conversations hold the prompt (HuggingFaceH4/ultrafeedback_binarized): the string is not used
        {"prompt": "Two plus two?", "chosen": [user("Two plus two?"), assistant("Four.")],
         "rejected": [user("Two plus two?"), assistant("Five.")]},
        # the conversations hold only the answers: the string is the user's turn
        {"prompt": "Capital of France?", "chosen": [assistant("Paris.")], "rejected": [assistant("Lyon.")]},
    ]
    loaded = load_data(write_jsonl(tmp_path / "pairs.jsonl", rows), method="dpo")
    assert loaded.format == "preference_messages"
    assert [as_tuple(ex) for ex in loaded.examples] == [
        (PREFERENCE_CONVERSATION, [user("Two plus two?")], [assistant("Four.")], [assistant("Five.")]),
        (PREFERENCE_CONVERSATION, [user("Capital of France?")], [assistant("Paris.")], [assistant("Lyon.")]),
    ]


def test_forcing_a_preference_format(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", STRING_ROWS)
    loaded = load_data(path, format="preference", method="orpo")
    assert loaded.format == "preference" and [as_tuple(ex) for ex in loaded.examples] == STRING_PAIRS
    with pytest.raises(DataError) as e:
        load_data(path, format="preference_messages", method="dpo")
    assert f"{path}:1: 'chosen' must be a list of {{role, content}} objects, got str" in str(e.value)


# ---------------------------------------------------------------- detection


def test_a_row_with_chosen_and_rejected_is_a_pair_and_prompt_completion_stays_itself():
    assert detect({"prompt": "p", "completion": " c"}) == "prompt_completion"
    assert detect({"prompt": "p", "chosen": " a", "rejected": " b"}) == "preference"
    assert detect({"prompt": "p", "completion": " c", "chosen": " a", "rejected": " b"}) == "preference"
    assert detect({"chosen": " a", "rejected": " b"}) == "preference"  # then: missing 'prompt'
    assert detect({"prompt": [user("q")], "chosen": [assistant("a")], "rejected": [assistant("b")]}) \
        == "preference_messages"
    assert detect({"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}) \
        == "preference_messages"
    # a file may carry supervised columns beside its pairs: for sft those are read
    both = {"messages": [user("q"), assistant("a")], "chosen": [user("q"), assistant("a")],
            "rejected": [user("q"), assistant("b")]}
    assert detect(both) == "preference_messages"
    assert detect(both, formats_for("sft")) == "messages"
    assert detect({"prompt": "p", "completion": " c"}, formats_for("dpo")) is None
    for name, f in FORMATS.items():
        assert detect(f.example) == name
        for example in f.more_examples:
            assert detect(example) == name


def test_prompt_completion_files_are_not_taken_for_pairs(tmp_path):
    rows = [{"prompt": "The capital of France is", "completion": " Paris."},
            {"prompt": "Two plus two is", "completion": " four."}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    loaded = load_data(path, method=None)
    assert loaded.format == "prompt_completion"
    assert [(ex.prompt, ex.completion) for ex in loaded.examples] == [(r["prompt"], r["completion"]) for r in rows]
    with pytest.raises(MethodMismatch) as e:
        load_data(path, method="dpo")
    assert str(e.value) == f"{path}: these rows are prompt_completion (supervised fine-tuning); {DPO_NEEDS}"


def test_pairs_with_a_completion_column_are_pairs(tmp_path):
    rows = [{**r, "completion": r["chosen"]} for r in STRING_ROWS]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert load_data(path, method=None).format == "preference"
    # for sft the same file is prompt/completion rows
    assert load_data(path, method="sft").format == "prompt_completion"


def test_a_file_with_messages_beside_its_pairs_serves_both_methods(tmp_path):
    rows = [{"prompt": "Two plus two?", "messages": [user("Two plus two?"), assistant("Four.")],
             "chosen": [user("Two plus two?"), assistant("Four.")],
             "rejected": [user("Two plus two?"), assistant("Five.")]}]
    path = write_jsonl(tmp_path / "both.jsonl", rows)
    sft = load_data(path, method="sft")
    assert sft.format == "messages" and sft.examples[0].messages == rows[0]["messages"]
    dpo = load_data(path, method="dpo")
    assert dpo.format == "preference_messages" and as_tuple(dpo.examples[0])[3] == [assistant("Five.")]


# ---------------------------------------------------------------- row problems


GOOD_STRING = json.dumps(STRING_ROWS[0])
GOOD_CONVERSATION = json.dumps(CONVERSATION_ROWS[0])
PAIR_SHARED = ("a pair shares its prompt (every turn before the last) and differs only in the assistant's last "
               "answer")
ALTERNATE = "turns must alternate user/assistant after an optional system message"

BAD_STRING_ROWS = [
    pytest.param({"prompt": "Q", "chosen": " A"},
                 "missing 'rejected' (preference rows need prompt, chosen and rejected)", id="missing-rejected"),
    pytest.param({"chosen": " A", "rejected": " B"},
                 "missing 'prompt' (preference rows need prompt, chosen and rejected)", id="missing-prompt"),
    pytest.param({"prompt": "Q", "chosen": "  ", "rejected": " B"}, "'chosen' is empty", id="empty-chosen"),
    pytest.param({"prompt": "Q", "chosen": " A", "rejected": ""}, "'rejected' is empty", id="empty-rejected"),
    pytest.param({"prompt": "", "chosen": " A", "rejected": " B"}, "'prompt' is empty", id="empty-prompt"),
    pytest.param({"prompt": "Q", "chosen": 3, "rejected": " B"}, "'chosen' must be a string, got int",
                 id="wrong-type"),
    pytest.param({"prompt": "Q", "chosen": " Same.", "rejected": " Same. "},
                 "'chosen' and 'rejected' are the same answer; a pair must differ to show a preference",
                 id="chosen-equals-rejected"),
    pytest.param({"prompt": "Q", "completion": " A"},
                 "this row is prompt_completion (supervised fine-tuning), the file is preference", id="sft-row"),
]

BAD_CONVERSATION_ROWS = [
    pytest.param({"chosen": [user("Hi"), assistant("Hello.")]},
                 "missing 'rejected' (preference_messages rows need chosen and rejected)", id="missing-rejected"),
    pytest.param({"chosen": [], "rejected": [user("Hi"), assistant("Hello.")]}, "'chosen' is empty",
                 id="empty-chosen"),
    pytest.param({"chosen": [user("Hi"), assistant("Hello.")], "rejected": [user("Hi"), assistant(" ")]},
                 "rejected[1] (assistant) is empty", id="empty-answer"),
    pytest.param({"chosen": [user("Hi"), assistant("Hello.")], "rejected": [user("Hi"), assistant("Hello.")]},
                 "'chosen' and 'rejected' end with the same answer; a pair must differ to show a preference",
                 id="chosen-equals-rejected"),
    pytest.param({"chosen": [user("Hi"), assistant("Hello.")], "rejected": [user("Hey"), assistant("Go away.")]},
                 f"chosen[0] and rejected[0] differ; {PAIR_SHARED}", id="prompts-differ"),
    pytest.param({"chosen": [user("Hi"), assistant("Hello."), user("Bye"), assistant("Bye.")],
                  "rejected": [user("Hi"), assistant("Go.")]},
                 f"'chosen' has 3 turns before its answer, 'rejected' 1; {PAIR_SHARED}", id="prompt-lengths-differ"),
    pytest.param({"chosen": [user("Hi"), assistant("Hello."), user("Bye")],
                  "rejected": [user("Hi"), assistant("Hello."), user("Bye"), assistant("No.")]},
                 "the last turn of 'chosen' is 'user'; chosen and rejected must end with the assistant's answer",
                 id="last-turn-not-assistant"),
    pytest.param({"chosen": [user("Hi"), {"role": "bot", "content": "Hello."}],
                  "rejected": [user("Hi"), assistant("Go.")]},
                 "chosen[1] has role 'bot'; expected one of system, user, assistant", id="bad-role"),
    pytest.param({"chosen": [user("Hi"), assistant("Hello.")], "rejected": [user("Hi"), {"role": "assistant"}]},
                 "rejected[1] has no 'content'", id="no-content"),
    pytest.param({"chosen": [user("Hi"), assistant("Hello.")], "rejected": [user("Hi"), assistant(7)]},
                 "rejected[1].content must be a string, got int", id="content-not-a-string"),
    pytest.param({"chosen": "Hello.", "rejected": [user("Hi"), assistant("Go.")]},
                 "'chosen' must be a list of {role, content} objects, got str", id="chosen-not-a-list"),
    pytest.param({"chosen": [assistant("Hello.")], "rejected": [assistant("Go.")]},
                 f"chosen[0] is an assistant turn before any user turn; {ALTERNATE}", id="answer-without-prompt"),
    pytest.param({"prompt": [{"role": "human", "content": "Hi"}], "chosen": [assistant("A")],
                  "rejected": [assistant("B")]},
                 "prompt[0] has role 'human'; expected one of system, user, assistant", id="bad-prompt-role"),
    pytest.param({"prompt": [], "chosen": [assistant("A")], "rejected": [assistant("B")]}, "'prompt' is empty",
                 id="empty-prompt"),
    pytest.param({"prompt": [user("Hi")], "chosen": [user("Hi"), assistant("A")], "rejected": [assistant("B")]},
                 "'chosen' repeats the prompt; beside a separate 'prompt', chosen and rejected hold only the answer",
                 id="answer-repeats-prompt"),
    pytest.param({"prompt": [user("Hi")], "chosen": [assistant("A"), assistant("B")], "rejected": [assistant("C")]},
                 f"chosen[1] is a second 'assistant' turn in a row; {ALTERNATE}", id="two-answers"),
    pytest.param({"prompt": [user("Hi"), user("Anyone?")], "chosen": [assistant("A")], "rejected": [assistant("B")]},
                 f"prompt[1] is a second 'user' turn in a row; {ALTERNATE}", id="prompt-not-alternating"),
]


def check_bad_row(tmp_path: Path, good: str, row, problem: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(good + "\n" + json.dumps(row) + "\n" + good + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_data(path, method="dpo")
    message = str(e.value)
    assert message.startswith(f"{path}: 1 problem in 3 rows; fix them, or pass --skip-bad-rows")
    assert [str(p) for p in e.value.problems] == [f"{path}:2: {problem}"]
    # --skip-bad-rows leaves the row out and counts it, as for SFT rows
    loaded = load_data(path, method="dpo", skip_bad_rows=True)
    assert [ex.where for ex in loaded.examples] == [f"{path}:1", f"{path}:3"]
    assert [str(p) for p in loaded.skipped] == [f"{path}:2: {problem}"]
    assert "1 bad row left out (--skip-bad-rows)" in loaded.warnings


@pytest.mark.parametrize("row, problem", BAD_STRING_ROWS)
def test_each_bad_string_pair_is_named_by_file_and_line(tmp_path, row, problem):
    check_bad_row(tmp_path, GOOD_STRING, row, problem)


@pytest.mark.parametrize("row, problem", BAD_CONVERSATION_ROWS)
def test_each_bad_conversation_pair_is_named_by_file_and_line(tmp_path, row, problem):
    check_bad_row(tmp_path, GOOD_CONVERSATION, row, problem)


def test_both_preference_formats_in_one_file(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [*STRING_ROWS, CONVERSATION_ROWS[0]])
    with pytest.raises(DataError) as e:
        load_data(path, method="dpo")
    assert [str(p) for p in e.value.problems] == [
        f"{path}: rows in several formats: 2 preference, 1 preference_messages (first at {path}:3); one file holds "
        "one format (or force one with --format)",
        f"{path}:3: this row is preference_messages, the file is preference"]


def test_bad_pair_in_a_json_list_and_a_csv_is_named_by_row_and_line(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([*STRING_ROWS, {"prompt": "Q", "chosen": " A", "rejected": " A"}]), encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_data(path, method="dpo")
    assert [str(p) for p in e.value.problems] == [
        f"{path}: row 3: 'chosen' and 'rejected' are the same answer; a pair must differ to show a preference"]

    path = tmp_path / "pairs.csv"
    # a quoted cell over two lines: the second pair starts on line 4
    path.write_text('prompt,chosen,rejected\n"The capital\nof France is", Paris., Lyon.\nQ,,B\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_data(path, method="dpo")
    assert [str(p) for p in e.value.problems] == [f"{path}:4: 'chosen' is empty"]


def test_duplicate_pairs_are_a_warning(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [STRING_ROWS[0], STRING_ROWS[1], STRING_ROWS[0]])
    loaded = load_data(path, method="dpo")
    assert loaded.duplicates == 1
    assert loaded.warnings == [f"1 duplicate row (first: {path}:3 repeats {path}:1); they are kept"]


# ---------------------------------------------------------------- file and method


def test_sft_file_for_dpo_or_orpo_is_one_line_naming_both(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", SFT_ROWS)
    for method in ("dpo", "orpo"):
        with pytest.raises(MethodMismatch) as e:
            load_data(path, method=method)
        assert str(e.value) == (
            f"{path}: these rows are messages (supervised fine-tuning); --method {method} needs preference pairs "
            "(preference: prompt/chosen/rejected, or preference_messages: chosen/rejected conversations); "
            "see localtune data formats")
        assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_pair_file_for_sft_is_one_line_naming_both(tmp_path):
    for fmt, rows in ROWS.items():
        path = write_jsonl(tmp_path / f"{fmt}.jsonl", rows)
        with pytest.raises(MethodMismatch) as e:
            load_data(path)  # the default method is sft
        assert str(e.value) == f"{path}: these rows are {fmt} (preference pairs, for --method dpo or orpo); {SFT_NEEDS}"


def test_a_forced_format_for_the_other_method_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", SFT_ROWS)
    with pytest.raises(MethodMismatch) as e:
        load_data(path, format="messages", method="dpo")
    assert str(e.value) == f"{path}: --format messages is for supervised fine-tuning; {DPO_NEEDS}"
    with pytest.raises(MethodMismatch) as e:
        load_data(path, format="preference", method="sft")
    assert str(e.value) == f"{path}: --format preference is for --method dpo or orpo; {SFT_NEEDS}"


def test_mostly_sft_rows_with_a_few_pairs_is_the_mismatch_for_dpo(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [*SFT_ROWS, SFT_ROWS[0], STRING_ROWS[0]])
    with pytest.raises(MethodMismatch, match="these rows are messages"):
        load_data(path, method="dpo")
    # mostly pairs with one SFT row: the row is the problem
    path = write_jsonl(tmp_path / "pairs.jsonl", [*STRING_ROWS, SFT_ROWS[0]])
    with pytest.raises(DataError) as e:
        load_data(path, method="dpo")
    assert [str(p) for p in e.value.problems] == [
        f"{path}:3: this row is messages (supervised fine-tuning), the file is preference"]


def test_unknown_method(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", SFT_ROWS)
    with pytest.raises(UserError, match="--method 'ppo': unknown method; use one of sft, dpo, orpo"):
        load_data(path, method="ppo")


# ---------------------------------------------------------------- the dataset trl reads


def test_preference_dataset_columns_in_trl_form(tmp_path):
    conversations = load_data(write_jsonl(tmp_path / "c.jsonl", CONVERSATION_ROWS), method="dpo").examples
    ds = preference_dataset(conversations)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds.to_list() == [
        {"prompt": [SYSTEM, user("Two plus two?")], "chosen": [assistant("Four.")], "rejected": [assistant("Five.")]},
        {"prompt": [user("Capital of France?"), assistant("Paris."), user("And of Italy?")],
         "chosen": [assistant("Rome.")], "rejected": [assistant("Milan.")]},
    ]
    strings = load_data(write_jsonl(tmp_path / "s.jsonl", STRING_ROWS), method="dpo").examples
    assert preference_dataset(strings).to_list() == STRING_ROWS

    with pytest.raises(ValueError, match="several shapes"):
        preference_dataset([*conversations, *strings])
    with pytest.raises(TypeError, match="PreferenceExample"):
        preference_dataset([Example("x", TEXT, text="hello")])
    with pytest.raises(TypeError, match="preference_dataset"):
        tokenize(conversations, _FastTokenizer(), None)


class _FastTokenizer:
    is_fast = True


def test_split_eval_holds_out_whole_pairs_the_same_for_a_seed():
    pairs = [PreferenceExample(f"row {i}", PREFERENCE_TEXT, f"Q{i}", f" A{i}", f" B{i}") for i in range(40)]
    train, held = split_eval(pairs, 0.1, seed=3)
    assert (len(train), len(held)) == (36, 4)
    assert sorted(ex.where for ex in train + held) == sorted(ex.where for ex in pairs)
    assert split_eval(pairs, 0.1, seed=3) == (train, held)
    assert split_eval(pairs, 0.1, seed=4)[1] != held
    assert preference_dataset(held).to_list() == [ex.row() for ex in held]


# ---------------------------------------------------------------- trl's tokenization


@pytest.fixture(scope="module")
def smol(builtin_model_dir):
    """The built-in model's tokenizer as the worker sets it up, and a tiny random model on it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(builtin_model_dir)
    assert chat_template_for(tok).source == "model"
    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=len(tok), tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return tok, lambda: LlamaForCausalLM(config)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
"""What SmolLM2's template puts first when a conversation has no system turn."""


def trl_dpo_rows(tmp_path, tok, new_model, examples) -> list[dict]:
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "dpo"), report_to=[], use_cpu=True, max_length=None)
    trainer = DPOTrainer(new_model(), ref_model=new_model(), args=args, train_dataset=preference_dataset(examples),
                         processing_class=tok)
    return [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in trainer.train_dataset]


def test_dpo_trainer_tokenizes_conversation_pairs_with_the_chat_template(tmp_path, smol):
    tok, new_model = smol
    examples = [PreferenceExample("x", *p) for p in CONVERSATION_PAIRS]

    rows = trl_dpo_rows(tmp_path, tok, new_model, examples)

    # the prompt is the template's rendering with the generation prompt; each answer is the
    # assistant's text closed by <|im_end|> and the template's newline
    assert tok.decode(rows[0]["prompt_ids"]) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nTwo plus two?<|im_end|>\n<|im_start|>assistant\n")
    assert rows[0]["prompt_ids"] == tok.apply_chat_template([SYSTEM, user("Two plus two?")], tokenize=True,
                                                            add_generation_prompt=True)["input_ids"]
    assert rows[0]["chosen_ids"] == ids(tok, "Four.<|im_end|>\n")
    assert rows[0]["rejected_ids"] == ids(tok, "Five.<|im_end|>\n")
    assert tok.decode(rows[1]["prompt_ids"]) == (
        SMOL_SYSTEM + "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(rows[1]["chosen_ids"]) == "Rome.<|im_end|>\n"
    assert tok.decode(rows[1]["rejected_ids"]) == "Milan.<|im_end|>\n"
    assert rows[0]["chosen_ids"][-2:] == [tok.convert_tokens_to_ids("<|im_end|>"), ids(tok, "\n")[0]]
    # what `data inspect` shows is what trl trains
    assert tokenize_pairs(examples, tok) == rows
    assert pair_texts(rows[1], tok)["rejected"] == "Milan.<|im_end|>\n"


def test_dpo_trainer_tokenizes_string_pairs_with_eos_and_the_common_prefix_rule(tmp_path, smol):
    tok, new_model = smol
    examples = [PreferenceExample("x", *STRING_PAIRS[0]),
                # a prompt ending in a space: " Paris" is one token, so the space moves into the answer
                PreferenceExample("y", PREFERENCE_TEXT, "The capital of France is ", "Paris.", "Lyon.")]

    rows = trl_dpo_rows(tmp_path, tok, new_model, examples)

    assert tok.eos_token == "<|im_end|>"
    assert rows[0]["prompt_ids"] == ids(tok, "The capital of France is")
    assert rows[0]["chosen_ids"] == ids(tok, " Paris.<|im_end|>")
    assert rows[0]["rejected_ids"] == ids(tok, " Lyon.<|im_end|>")
    assert ids(tok, "The capital of France is ") == ids(tok, "The capital of France is") + ids(tok, " ")
    assert rows[1] == rows[0]  # the trailing space's token is cut from the prompt: the same ids
    assert len(rows[1]["prompt_ids"]) == len(ids(tok, "The capital of France is ")) - 1 == 5
    assert tokenize_pairs(examples, tok) == rows
    assert pair_texts(rows[1], tok) == {"prompt": "The capital of France is", "chosen": " Paris.<|im_end|>",
                                        "rejected": " Lyon.<|im_end|>"}


def test_orpo_trainer_tokenization_is_reproduced(tmp_path, smol):
    """trl 1.16's ORPOTrainer (trl.experimental.orpo) tokenizes differently from its DPOTrainer:
    it appends the EOS token to an answer that does not end with it (after the template's
    '<|im_end|>\\n' that made '<|im_end|>\\n<|im_end|>': orpo_dataset ends a rendered answer at its
    '<|im_end|>' instead) and puts the BOS token (SmolLM2's is '<|im_start|>') before a plain
    prompt. tokenize_pairs(method='orpo') shows what the trainer gets from orpo_dataset."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok, new_model = smol
    for pairs in (CONVERSATION_PAIRS, STRING_PAIRS):
        examples = [PreferenceExample("x", *p) for p in pairs]
        args = ORPOConfig(output_dir=str(tmp_path / "orpo"), report_to=[], use_cpu=True, max_length=512)
        trainer = ORPOTrainer(new_model(), args=args, train_dataset=orpo_dataset(examples, tok), processing_class=tok)
        ours = tokenize_pairs(examples, tok, "orpo")
        for row, mine in zip(trainer.train_dataset, ours):
            assert mine["prompt_ids"] == row["prompt_input_ids"]
            assert mine["prompt_ids"] + mine["chosen_ids"] == row["chosen_input_ids"]
            assert mine["prompt_ids"] + mine["rejected_ids"] == row["rejected_input_ids"]
            assert row["chosen_labels"][:len(mine["prompt_ids"])] == [-100] * len(mine["prompt_ids"])
            assert row["chosen_labels"][len(mine["prompt_ids"]):] == mine["chosen_ids"]
    texts = [pair_texts(t, tok) for t in tokenize_pairs([PreferenceExample("x", *CONVERSATION_PAIRS[0]),
                                                         PreferenceExample("y", *STRING_PAIRS[0])], tok, "orpo")]
    assert texts[0]["chosen"] == "Four.<|im_end|>"  # one end of turn, as the model ends an answer
    assert texts[1] == {"prompt": "<|im_start|>The capital of France is", "chosen": " Paris.<|im_end|>",
                        "rejected": " Lyon.<|im_end|>"}
