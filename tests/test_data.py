"""Training data as a user meets it: every format in every file type, the rows checked with the
file and line of each problem, the evaluation split, and the tokens that are trained on.

The rendering tests use the real SmolLM2 tokenizer (`builtin_model_dir`) and compare the trained
tokens with the assistant replies tokenized on their own, so a wrong mask cannot pass.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest

from localtune.data import (CHATML_TEMPLATE, CHATML_TOKENS, DataError, Example, chat_template_for, length_stats,
                            load_data, render, split_eval, tokenize)
from localtune.errors import UserError
from localtune.formats import CONVERSATION, FORMATS, PROMPT_COMPLETION, TEXT, detect, formats_for

SYSTEM = {"role": "system", "content": "Be terse."}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# Two rows per format and the canonical shape each must become. The second row of each
# exercises an optional part (a system prompt, an alpaca input), so that a dropped field shows.
ROWS: dict[str, list[dict]] = {
    "messages": [
        {"messages": [SYSTEM, user("Capital of France?"), assistant("Paris.")]},
        {"messages": [user("Two plus two?"), assistant("Four."), user("And three?"), assistant("Five.")]},
    ],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}]},
        {"system": "Be terse.",
         "conversations": [{"from": "human", "value": "Two plus two?"}, {"from": "gpt", "value": "Four."}]},
    ],
    "alpaca": [
        {"instruction": "Name the capital.", "input": "France", "output": "Paris."},
        {"instruction": "Add two and two.", "output": "Four.", "system": "Be terse."},
    ],
    "prompt_completion": [
        {"prompt": "The capital of France is", "completion": " Paris."},
        {"prompt": "Two plus two is", "completion": " four."},
    ],
    "text": [
        {"text": "Paris is the capital of France."},
        {"text": "Two plus two is four."},
    ],
}
EXPECTED: dict[str, list[dict]] = {
    "messages": [
        {"shape": CONVERSATION, "messages": ROWS["messages"][0]["messages"]},
        {"shape": CONVERSATION, "messages": ROWS["messages"][1]["messages"]},
    ],
    "sharegpt": [
        {"shape": CONVERSATION, "messages": [user("Capital of France?"), assistant("Paris.")]},
        {"shape": CONVERSATION, "messages": [SYSTEM, user("Two plus two?"), assistant("Four.")]},
    ],
    "alpaca": [
        {"shape": CONVERSATION, "messages": [user("Name the capital.\n\nFrance"), assistant("Paris.")]},
        {"shape": CONVERSATION, "messages": [SYSTEM, user("Add two and two."), assistant("Four.")]},
    ],
    "prompt_completion": [
        {"shape": PROMPT_COMPLETION, "prompt": "The capital of France is", "completion": " Paris."},
        {"shape": PROMPT_COMPLETION, "prompt": "Two plus two is", "completion": " four."},
    ],
    "text": [
        {"shape": TEXT, "text": "Paris is the capital of France."},
        {"shape": TEXT, "text": "Two plus two is four."},
    ],
}


def columns(rows: list[dict]) -> dict[str, list]:
    """Rows as columns, every key in every row (None where a row lacks it), as a table holds them."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write(kind: str, folder: Path, rows: list[dict]) -> tuple[Path, str]:
    """Write `rows` as a user would in file type `kind`; (path, where the first row is)."""
    if kind == "jsonl":
        p = write_jsonl(folder / "data.jsonl", rows)
        return p, f"{p}:1"
    if kind == "json-list":
        p = folder / "data.json"
        p.write_text(json.dumps(rows, indent=2), encoding="utf-8")
        return p, f"{p}: row 1"
    if kind == "json-object":
        p = folder / "data.json"
        p.write_text(json.dumps({"version": 1, "data": rows}), encoding="utf-8")
        return p, f"{p}: row 1"
    if kind == "csv":
        p = folder / "data.csv"
        cols = columns(rows)
        with p.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in rows:  # a conversation is JSON text in its cell; a missing field an empty cell
                w.writerow([json.dumps(r[k]) if isinstance(r.get(k), list) else r.get(k, "") for k in cols])
        return p, f"{p}:2"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = folder / "data.parquet"
        pq.write_table(pa.table(columns(rows)), p)
        return p, f"{p}: row 1"
    if kind == "save_to_disk":
        import datasets

        p = folder / "saved"
        datasets.Dataset.from_dict(columns(rows)).save_to_disk(str(p))
        return p, f"{p}: row 1"
    raise AssertionError(kind)


FILE_KINDS = ("jsonl", "json-list", "json-object", "csv", "parquet", "save_to_disk")


def canonical(ex: Example) -> dict:
    out = {"shape": ex.shape, "messages": ex.messages, "prompt": ex.prompt, "completion": ex.completion,
           "text": ex.text}
    return {k: v for k, v in out.items() if v is not None}


def tree_digest(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", FILE_KINDS)
@pytest.mark.parametrize("fmt", formats_for("sft"))  # the preference formats: test_preference_data.py
def test_every_format_loads_from_every_file_type(tmp_path, fmt, kind):
    path, first_where = write(kind, tmp_path, ROWS[fmt])
    before = tree_digest(path)
    listing = sorted(tmp_path.rglob("*"))

    loaded = load_data(path)

    assert loaded.format == fmt
    assert loaded.total_rows == 2 and not loaded.skipped and not loaded.warnings
    assert [canonical(ex) for ex in loaded.examples] == EXPECTED[fmt]
    assert loaded.examples[0].where == first_where
    # the user's data is only ever read: same bytes, no file written beside it
    assert tree_digest(path) == before
    assert sorted(tmp_path.rglob("*")) == listing


def test_every_format_example_row_is_detected_as_itself():
    for name, f in FORMATS.items():
        assert detect(f.example) == name


def test_format_forcing_wins_over_detection(tmp_path):
    rows = [{"prompt": "Q: capital of France?", "completion": " Paris.", "text": "Paris is the capital."},
            {"prompt": "Q: two plus two?", "completion": " Four.", "text": "Two and two make four."}]
    path = write_jsonl(tmp_path / "both.jsonl", rows)

    detected = load_data(path)
    assert detected.format == "prompt_completion"  # first in FORMATS' order
    assert [ex.completion for ex in detected.examples] == [" Paris.", " Four."]

    forced = load_data(path, format="text")
    assert forced.format == "text"
    assert [canonical(ex) for ex in forced.examples] == [
        {"shape": TEXT, "text": "Paris is the capital."}, {"shape": TEXT, "text": "Two and two make four."}]


def test_forced_format_that_the_rows_do_not_have_names_each_row(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", ROWS["text"])
    with pytest.raises(DataError) as e:
        load_data(path, format="alpaca")
    assert f"{path}:1: missing 'instruction' (alpaca rows need instruction and output)" in str(e.value)
    assert f"{path}:2: missing 'instruction'" in str(e.value)


def test_unknown_forced_format_lists_the_formats(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", ROWS["text"])
    with pytest.raises(UserError, match="--format 'chatml': unknown format; use one of "
                                        "messages, sharegpt, alpaca, prompt_completion, text, preference, "
                                        "preference_messages$"):
        load_data(path, format="chatml")


def test_rows_in_no_known_format_show_the_keys_found(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError) as e:
        load_data(path)
    assert "no row is in a known format (first row's keys: answer, question)" in str(e.value)
    assert "alpaca (instruction, output)" in str(e.value)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(UserError, match=r"data\.txt: unsupported file type '\.txt'; use one of \.jsonl, \.json"):
        load_data(path)


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such file or folder") as e:
        load_data(tmp_path / "nope.jsonl")
    assert str(tmp_path / "nope.jsonl") in str(e.value)


def test_hugging_face_dataset_id_offline_is_one_clear_error():
    # HF_HUB_OFFLINE is set for every test (conftest); a hub dataset's download is
    # localtune.download's, tested against a stand-in hub in test_download.py
    with pytest.raises(UserError) as e:
        load_data("localtune-tests/no-such-dataset")
    message = str(e.value)
    assert message.startswith("--data localtune-tests/no-such-dataset: not (completely) in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in message
    assert "\n" not in message


# ---------------------------------------------------------------- checking rows


GOOD = {"messages": [user("Hi"), assistant("Hello.")]}

BAD_ROWS = [
    pytest.param('{"messages": [{"role": "user", "content": "Hi"}, ',
                 "not valid JSON (Expecting value at column", id="malformed-json"),
    pytest.param(json.dumps({"messages": [user("Hi"), {"role": "assistant"}]}),
                 "messages[1] has no 'content'", id="missing-field"),
    pytest.param(json.dumps({"messages": [user("Hi"), {"role": "assistant", "content": 42}]}),
                 "messages[1].content must be a string, got int", id="wrong-type"),
    pytest.param(json.dumps({"messages": "Hi"}),
                 "'messages' must be a list of {role, content} objects, got str", id="not-a-list"),
    pytest.param(json.dumps({"messages": [user("Hi"), assistant("  ")]}),
                 "messages[1] (assistant) is empty", id="empty-assistant"),
    pytest.param(json.dumps({"messages": [user("Hi"), {"role": "bot", "content": "Hello."}]}),
                 "messages[1] has role 'bot'; expected one of system, user, assistant", id="unknown-role"),
    pytest.param(json.dumps({"messages": [user("Hi"), user("Anyone?"), assistant("Hello.")]}),
                 "messages[1] is a second 'user' turn in a row; turns must alternate user/assistant",
                 id="not-alternating"),
    pytest.param(json.dumps({"messages": [user("Hi"), assistant("Hello."), user("Bye")]}),
                 "the last turn is 'user'; a conversation must end with an assistant turn", id="ends-on-user"),
    pytest.param(json.dumps({"messages": [SYSTEM]}),
                 "the conversation has only a system message", id="only-system"),
    pytest.param(json.dumps([GOOD]), "a row must be a JSON object, got list", id="row-not-object"),
]


@pytest.mark.parametrize("line, problem", BAD_ROWS)
def test_each_bad_row_is_named_by_file_and_line(tmp_path, line, problem):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_data(path)
    message = str(e.value)
    assert message.startswith(f"{path}: 1 problem in 3 rows; fix them, or pass --skip-bad-rows")
    assert f"\n  {path}:2: {problem}" in message
    assert [p.where for p in e.value.problems] == [f"{path}:2"]


def test_bad_row_in_a_json_list_is_named_by_row_index(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([GOOD, GOOD, {"messages": [user("Hi"), assistant("")]}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"chat\.json: row 3: messages\[1\] \(assistant\) is empty"):
        load_data(path)


def test_bad_row_in_a_csv_is_named_by_its_line(tmp_path):
    path = tmp_path / "chat.csv"
    # a quoted cell spanning two lines: the second row starts on line 4
    path.write_text('prompt,completion\n"a prompt\nover two lines", an answer\nsecond prompt,"  "\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_data(path)
    assert f"{path}:4: 'completion' is empty" in str(e.value)


def test_bad_json_cell_in_a_csv(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text('messages\n"[{""role"": ""user""]"\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_data(path)
    assert f"{path}:2: 'messages' is not valid JSON" in str(e.value)


def test_non_utf8_line_is_named_and_says_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "tea"}\n{"text": "caf\xe9 au lait"}\n{"text": "water"}\n')  # Latin-1 on line 2
    with pytest.raises(DataError) as e:
        load_data(path)
    assert f"{path}:2: not valid UTF-8 (byte 0xe9 at column 14); save the file as UTF-8" in str(e.value)
    assert load_data(path, skip_bad_rows=True).total_rows == 3


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_non_utf8_whole_file_types_name_the_line(tmp_path, suffix):
    path = tmp_path / f"latin1{suffix}"
    body = '[{"text": "ok"},\n {"text": "caf\u00e9"}]' if suffix == ".json" else "text\nok\ncaf\u00e9\n"
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(UserError) as e:
        load_data(path)
    assert str(e.value).startswith(f"{path}:" + ("2" if suffix == ".json" else "3") + ": not valid UTF-8")
    assert "save the file as UTF-8" in str(e.value)


def test_malformed_json_file_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_data(path)
    assert str(e.value).startswith(f"{path}:4: not valid JSON")


def test_json_object_without_one_list(tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"train": [ROWS["text"][0]], "test": [ROWS["text"][1]]}), encoding="utf-8")
    with pytest.raises(UserError, match="expected a list of rows, or an object holding one list; "
                                        "lists found: train, test"):
        load_data(path)


def test_every_line_malformed_shows_the_lines_not_a_format_error(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text("{oops\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_data(path)
    assert f"{path}:1: not valid JSON" in str(e.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match="the file is empty") as e:
        load_data(path)
    assert not isinstance(e.value, DataError)
    assert str(e.value).startswith(str(path))


def test_several_formats_in_one_file(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [ROWS["text"][0], ROWS["prompt_completion"][0], ROWS["text"][1]])
    with pytest.raises(DataError) as e:
        load_data(path)
    message = str(e.value)
    assert (f"{path}: rows in several formats: 2 text, 1 prompt_completion (first at {path}:2); "
            "one file holds one format (or force one with --format)") in message
    assert f"{path}:2: this row is prompt_completion, the file is text" in message


def make_thirteen_bad_rows(path: Path) -> Path:
    lines = [json.dumps(GOOD)]
    lines += [json.dumps({"messages": [user(f"Question {i}"), assistant("")]}) for i in range(13)]
    lines += [json.dumps({"messages": [user("Last"), assistant("Answer.")]})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_at_most_ten_problems_are_listed_with_the_total(tmp_path):
    path = make_thirteen_bad_rows(tmp_path / "bad.jsonl")
    with pytest.raises(DataError) as e:
        load_data(path)
    lines = str(e.value).splitlines()
    assert lines[0] == (f"{path}: 13 problems in 15 rows; fix them, or pass --skip-bad-rows to leave those "
                        "rows out:")
    assert lines[1:11] == [f"  {path}:{n}: messages[1] (assistant) is empty" for n in range(2, 12)]
    assert lines[11:] == ["  ... and 3 more"]
    assert len(e.value.problems) == 13


def test_skip_bad_rows_leaves_them_out_and_counts_them(tmp_path):
    path = make_thirteen_bad_rows(tmp_path / "bad.jsonl")
    loaded = load_data(path, skip_bad_rows=True)
    assert loaded.total_rows == 15
    assert [ex.where for ex in loaded.examples] == [f"{path}:1", f"{path}:15"]
    assert len(loaded.skipped) == 13
    assert str(loaded.skipped[0]) == f"{path}:2: messages[1] (assistant) is empty"
    assert loaded.warnings == ["13 bad rows left out (--skip-bad-rows)"]
    summary = loaded.summary()
    assert summary["rows"] == 15 and summary["valid_rows"] == 2 and summary["skipped_rows"] == 13


def test_skip_bad_rows_with_no_good_row_left_is_still_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [user("Hi"), assistant("")]}) + "\n")
    with pytest.raises(DataError, match="1 problem in 1 row;"):
        load_data(path, skip_bad_rows=True)


def test_duplicate_rows_are_a_warning_with_the_count(tmp_path):
    path = write_jsonl(tmp_path / "dups.jsonl", [GOOD, GOOD, ROWS["messages"][0], GOOD])
    loaded = load_data(path)
    assert len(loaded.examples) == 4  # kept
    assert loaded.duplicates == 2
    assert loaded.warnings == [f"2 duplicate rows (first: {path}:2 repeats {path}:1); they are kept"]


def test_loading_never_changes_the_file_even_with_problems(tmp_path):
    path = make_thirteen_bad_rows(tmp_path / "bad.jsonl")
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(DataError):
        load_data(path)
    load_data(path, skip_bad_rows=True)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "localtune-home"]


# ---------------------------------------------------------------- evaluation split


def examples(n: int) -> list[Example]:
    return [Example(where=f"row {i}", shape=TEXT, text=f"text {i}") for i in range(n)]


def test_split_eval_sizes_and_coverage():
    rows = examples(200)
    train, held = split_eval(rows, 0.05, seed=7)
    assert (len(train), len(held)) == (190, 10)
    names_train, names_held = {e.where for e in train}, {e.where for e in held}
    assert not names_train & names_held
    assert names_train | names_held == {e.where for e in rows}
    # each side keeps the file's order
    assert [e.where for e in train] == [e.where for e in rows if e.where in names_train]


def test_split_eval_is_the_same_for_a_seed_and_differs_across_seeds():
    rows = examples(200)
    first = [e.where for e in split_eval(rows, 0.05, seed=7)[1]]
    again = [e.where for e in split_eval(examples(200), 0.05, seed=7)[1]]
    other = [e.where for e in split_eval(rows, 0.05, seed=8)[1]]
    assert first == again
    assert first != other


def test_split_eval_holds_out_at_least_one_row():
    train, held = split_eval(examples(10), 0.01, seed=0)
    assert (len(train), len(held)) == (9, 1)


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_eval_rejects_bad_fractions(fraction):
    with pytest.raises(UserError, match=f"--eval-split must be between 0 and 1 \\(e.g. 0.05\\), got {fraction:g}"):
        split_eval(examples(200), fraction, seed=0)


def test_split_eval_that_leaves_no_training_rows():
    with pytest.raises(UserError, match="--eval-split 0.9 leaves no training rows out of 2"):
        split_eval(examples(2), 0.9, seed=0)


# ---------------------------------------------------------------- rendering and masks


@pytest.fixture(scope="module")
def smol_dir(builtin_model_dir) -> Path:
    return builtin_model_dir


def smol_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


CONVERSATION_WITH_SYSTEM = [
    {"role": "system", "content": "You answer in one short sentence."},
    user("What is the capital of France?"),
    assistant("The capital of France is Paris."),
    user("And of Italy?"),
    assistant("Rome is the capital of Italy."),
]


def trained_ids(row) -> list[int]:
    return [t for t, m in zip(row["input_ids"], row["assistant_masks"]) if m]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_replies(tokenizer, messages, end: str = "<|im_end|>") -> list[int]:
    return [t for m in messages if m["role"] == "assistant" for t in ids(tokenizer, m["content"] + end)]


def runs_of_ones(mask: list[int]) -> int:
    return sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))


def test_only_each_assistant_reply_and_its_end_token_are_trained(smol_dir):
    tok = smol_tokenizer(smol_dir)
    template = chat_template_for(tok)
    assert (template.source, template.end_of_turn, template.added_tokens) == ("model", "<|im_end|>", [])

    row = tokenize([Example("x", CONVERSATION, messages=CONVERSATION_WITH_SYSTEM)], tok, template)[0]

    # the whole row is exactly what the model's own template gives
    assert row["input_ids"] == tok.apply_chat_template(CONVERSATION_WITH_SYSTEM, tokenize=True)["input_ids"]
    assert row["length"] == len(row["input_ids"])
    # the trained tokens are the two replies, each closed by <|im_end|>, and nothing else
    assert trained_ids(row) == expected_replies(tok, CONVERSATION_WITH_SYSTEM)
    assert runs_of_ones(row["assistant_masks"]) == 2
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [i for i, t in enumerate(row["input_ids"]) if t == im_end]
    assert [row["assistant_masks"][i] for i in ends] == [0, 0, 1, 0, 1]  # system, user, reply, user, reply


def test_a_reply_that_also_appears_in_the_template_text_is_found(smol_dir):
    # 'a' occurs in '<|im_start|>assistant' and 'end' in '<|im_end|>': the reply itself is trained
    tok = smol_tokenizer(smol_dir)
    template = chat_template_for(tok)
    for reply in ("a", "end", "assistant"):
        messages = [user("Pick a, b or c."), assistant(reply)]
        row = tokenize([Example("x", CONVERSATION, messages=messages)], tok, template)[0]
        assert trained_ids(row) == ids(tok, reply + "<|im_end|>"), reply
        text, spans, _ = render(Example("x", CONVERSATION, messages=messages), tok, template)
        assert [text[a:b] for a, b in spans] == [reply + "<|im_end|>"]
        assert text.endswith(reply + "<|im_end|>\n")


def test_train_on_inputs_trains_every_token(smol_dir):
    tok = smol_tokenizer(smol_dir)
    template = chat_template_for(tok)
    rows = tokenize([Example("x", CONVERSATION, messages=CONVERSATION_WITH_SYSTEM),
                     Example("y", CONVERSATION, messages=[user("Hi"), assistant("Hello.")])],
                    tok, template, train_on_inputs=True)
    for row in rows:
        assert row["assistant_masks"] == [1] * len(row["input_ids"])


def test_prompt_completion_trains_the_completion_and_eos(smol_dir):
    tok = smol_tokenizer(smol_dir)
    template = chat_template_for(tok)
    ex = Example("x", PROMPT_COMPLETION, prompt="The capital of France is", completion=" Paris.")
    row = tokenize([ex], tok, template)[0]
    assert row["input_ids"] == ids(tok, "The capital of France is Paris.") + [tok.eos_token_id]
    assert trained_ids(row) == ids(tok, " Paris.") + [tok.eos_token_id]
    assert row["assistant_masks"][-1] == 1 and row["assistant_masks"][0] == 0

    everything = tokenize([ex], tok, template, train_on_inputs=True)[0]
    assert everything["assistant_masks"] == [1] * len(everything["input_ids"])


def test_text_trains_everything(smol_dir):
    tok = smol_tokenizer(smol_dir)
    template = chat_template_for(tok)
    row = tokenize([Example("x", TEXT, text="Paris is the capital of France.")], tok, template)[0]
    assert row["input_ids"] == ids(tok, "Paris is the capital of France.") + [tok.eos_token_id]
    assert row["assistant_masks"] == [1] * len(row["input_ids"])


def test_base_model_without_a_chat_template_gets_chatml(smol_dir):
    tok = smol_tokenizer(smol_dir)
    tok.chat_template = None  # a base model: the ChatML tokens exist, the template does not
    vocab_before = len(tok)

    template = chat_template_for(tok)

    assert template.source == "chatml"
    assert template.template == CHATML_TEMPLATE == tok.chat_template
    assert template.to_dict()["template"] == CHATML_TEMPLATE  # recorded with the run
    assert template.end_of_turn == "<|im_end|>" and template.added_tokens == []
    assert len(tok) == vocab_before
    row = tokenize([Example("x", CONVERSATION, messages=CONVERSATION_WITH_SYSTEM)], tok, template)[0]
    text, _, _ = render(Example("x", CONVERSATION, messages=CONVERSATION_WITH_SYSTEM), tok, template)
    assert text.startswith("<|im_start|>system\nYou answer in one short sentence.<|im_end|>\n")
    assert trained_ids(row) == expected_replies(tok, CONVERSATION_WITH_SYSTEM)
    assert runs_of_ones(row["assistant_masks"]) == 2


def tiny_tokenizer_without_chatml():
    """A fast tokenizer that knows a few words and none of ChatML's tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "</s>", "\n", " ", "system", "user", "assistant", "Be", "terse", ".", "Hi", "Hello",
             "there", "Bye", "Goodbye"]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|\w+|[^\w\s]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", eos_token="</s>")


def test_tokenizer_without_chatml_tokens_gets_them_added():
    tok = tiny_tokenizer_without_chatml()
    assert tok.chat_template is None and not set(CHATML_TOKENS) & set(tok.get_vocab())
    size = len(tok)

    template = chat_template_for(tok)

    assert template.source == "chatml"
    assert template.added_tokens == ["<|im_start|>", "<|im_end|>"]
    assert len(tok) == size + 2
    # each is one token now, never split into pieces
    assert [len(ids(tok, t)) for t in CHATML_TOKENS] == [1, 1]
    messages = [{"role": "system", "content": "Be terse."}, user("Hi"), assistant("Hello there."), user("Bye"),
                assistant("Goodbye.")]
    row = tokenize([Example("x", CONVERSATION, messages=messages)], tok, template)[0]
    assert tok.unk_token_id not in row["input_ids"]
    assert trained_ids(row) == expected_replies(tok, messages)
    assert runs_of_ones(row["assistant_masks"]) == 2


def test_a_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False

    with pytest.raises(UserError, match="no fast \\(Rust\\) version"):
        tokenize([Example("x", TEXT, text="hi")], Slow(), None)


def test_length_stats():
    stats = length_stats([40, 10, 100, 30, 20], max_length=25)
    assert stats == {"min": 10, "median": 30, "p95": 100, "max": 100, "max_length": 25,
                     "rows_over_max_length": 3, "max_excess_tokens": 75, "median_excess_tokens": 15}
    assert length_stats([5, 6], max_length=8)["rows_over_max_length"] == 0
