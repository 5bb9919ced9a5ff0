"""`localtune data inspect` and `localtune data formats` as a person meets them: the exit code
and the lines on screen, with the built-in model's tokenizer; and the README's list of formats.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localtune import cli
from tests.helpers import one_line_error, run
from localtune.formats import FORMATS

README = Path(__file__).resolve().parents[1] / "README.md"

ROWS = [
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "Two plus two?"},
                  {"role": "assistant", "content": "Four, as everyone knows."}]},
    {"messages": [{"role": "user", "content": "Colour of a clear sky?"},
                  {"role": "assistant", "content": "Blue."}]},
]
BAD_LINES = [
    json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 3}]}),
    "{not json",
]


@pytest.fixture(autouse=True)
def wide_screen(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at the terminal width; keep each line whole


@pytest.fixture
def good_file(tmp_path) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.fixture
def bad_file(tmp_path) -> Path:
    path = tmp_path / "chat.jsonl"
    lines = [json.dumps(ROWS[0]), BAD_LINES[0], json.dumps(ROWS[1]), BAD_LINES[1], json.dumps(ROWS[2])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def builtin_lengths(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [len(tok.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in ROWS]


def test_inspect_shows_format_rows_lengths_and_the_trained_part(capsys, good_file, builtin_model_dir):
    rc, out, err = run(capsys, "data", "inspect", str(good_file), "--max-seq-len", "16")
    lengths = sorted(builtin_lengths(builtin_model_dir))

    assert rc == 0, err
    lines = out.splitlines()
    assert f"Data      {good_file}" in lines
    assert "Format    messages (detected)" in lines
    assert "Rows      3 (3 valid, 0 bad)" in lines
    assert "Model     SmolLM2-135M-Instruct (built-in); chat template: the model's own" in lines
    tokens = next(line for line in lines if line.startswith("Tokens"))
    assert tokens.startswith(f"Tokens    min {lengths[0]} · median {lengths[1]} · p95 {lengths[2]} "
                             f"· max {lengths[2]}")
    assert f"({sum(lengths)} in all, " in tokens
    assert (f"Too long  3 rows exceed max_length 16 by up to {lengths[2] - 16} tokens "
            f"(median {lengths[1] - 16}); they will be truncated") in lines
    assert f"Example ({good_file}:1); the trained part is between « and »:" in lines
    # the first row, rendered with the model's template, and only the answer is marked
    assert "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n" \
           "<|im_start|>assistant\n«Paris.<|im_end|>»\n" in out
    example = out.split("between « and »:\n", 1)[1]
    assert example.count("«") == example.count("»") == 1


def test_inspect_train_on_inputs_marks_everything_and_every_row_fits(capsys, good_file, builtin_model_dir):
    rc, out, _ = run(capsys, "data", "inspect", str(good_file), "--max-seq-len", "4096", "--train-on-inputs")
    assert rc == 0
    assert "Length    every row fits max_length 4096" in out.splitlines()
    assert "Too long" not in out
    example = out.split("between « and »:\n", 1)[1]
    assert example.startswith("«<|im_start|>system\nYou are terse.") and example.endswith("Paris.<|im_end|>\n»\n")


def test_inspect_forced_format_is_reported(capsys, tmp_path, builtin_model_dir):
    path = tmp_path / "both.jsonl"
    path.write_text(json.dumps({"prompt": "Capital of France?", "completion": " Paris.", "text": "Paris."}) + "\n")
    rc, out, _ = run(capsys, "data", "inspect", str(path), "--format", "text", "--max-seq-len", "64")
    assert rc == 0
    assert "Format    text (forced with --format)" in out.splitlines()
    assert "«Paris.<|im_end|>»" in out


def test_inspect_json(capsys, bad_file, builtin_model_dir):
    rc, out, err = run(capsys, "data", "inspect", str(bad_file), "--json", "--skip-bad-rows", "--max-seq-len", "16")
    lengths = sorted(builtin_lengths(builtin_model_dir))

    assert rc == 0, err
    data = json.loads(out)
    assert data["format"] == "messages" and data["forced_format"] is False
    assert (data["rows"], data["valid_rows"], data["skipped_rows"]) == (5, 3, 2)
    assert data["skipped"] == [f"{bad_file}:2: messages[1].content must be a string, got int",
                               f"{bad_file}:4: not valid JSON (Expecting property name enclosed in double quotes "
                               "at column 2)"]
    assert data["tokens"] == {"min": lengths[0], "median": lengths[1], "p95": lengths[2], "max": lengths[2],
                              "max_length": 16, "rows_over_max_length": 3, "max_excess_tokens": lengths[2] - 16,
                              "median_excess_tokens": lengths[1] - 16}
    assert data["total_tokens"] == sum(lengths)
    assert data["chat_template"]["source"] == "model"
    assert data["chat_template"]["end_of_turn"] == "<|im_end|>"
    assert "<|im_start|>" in data["chat_template"]["template"]
    text, spans = data["example"]["text"], data["example"]["trained_spans"]
    assert [text[a:b] for a, b in spans] == ["Paris.<|im_end|>"]


def test_inspect_bad_rows_fail_and_are_listed_by_line(capsys, bad_file, builtin_model_dir):
    before = bad_file.read_bytes()
    rc, out, err = run(capsys, "data", "inspect", str(bad_file), "--max-seq-len", "64")
    assert rc == 1
    lines = out.splitlines()
    assert "Rows      5 (3 valid, 2 bad)" in lines
    assert f"  {bad_file}:2: messages[1].content must be a string, got int" in lines
    assert any(line.startswith(f"  {bad_file}:4: not valid JSON") for line in lines)
    assert "Training would stop on the 2 bad rows: fix them, or pass --skip-bad-rows to leave them out." in lines
    assert "Traceback" not in err

    rc, out, _ = run(capsys, "data", "inspect", str(bad_file), "--max-seq-len", "64", "--skip-bad-rows")
    assert rc == 0
    assert "Rows      5 (3 valid, 2 bad)" in out.splitlines()
    assert "Training would stop" not in out
    # inspecting only reads: the same bytes, nothing written beside the file
    assert bad_file.read_bytes() == before
    assert sorted(p.name for p in bad_file.parent.iterdir()) == ["chat.jsonl", "localtune-home"]


def test_inspect_file_with_only_bad_rows_is_an_error_listing_them(capsys, tmp_path, builtin_model_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BAD_LINES) + "\n")
    rc, _, err = run(capsys, "data", "inspect", str(path), "--max-seq-len", "64")
    assert rc == 1
    assert err.startswith(f"localtune: error: {path}: 2 problems in 2 rows")
    assert f"  {path}:1: messages[1].content must be a string, got int" in err
    assert "Traceback" not in err


def test_inspect_missing_file_is_one_line(capsys, tmp_path):
    rc, out, err = run(capsys, "data", "inspect", str(tmp_path / "nope.jsonl"))
    assert rc == 1
    assert out == ""
    assert one_line_error(err) == f"localtune: error: {tmp_path / 'nope.jsonl'}: no such file or folder"


def test_inspect_unknown_format_is_one_line(capsys, good_file):
    rc, _, err = run(capsys, "data", "inspect", str(good_file), "--format", "chatml")
    assert rc == 1
    assert "--format 'chatml': unknown format" in one_line_error(err)


def test_data_formats_lists_every_format_with_an_example(capsys):
    rc, out, _ = run(capsys, "data", "formats")
    assert rc == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines if not line.startswith(" ")] == list(FORMATS)
    for f in FORMATS.values():
        assert json.dumps(f.example) in out


def test_readme_documents_every_format():
    readme = README.read_text(encoding="utf-8")
    assert "## Data formats" in readme
    for f in FORMATS.values():
        assert f"`{f.name}`" in readme, f.name
        assert json.dumps(f.example) in readme, f"README's example row for {f.name} differs from FORMATS"


def test_inspect_without_a_file_shows_the_shipped_demo_set(capsys, builtin_model_dir):
    from localtune.demo import demo_dataset_path

    rc = cli.main(["data", "inspect", "--json"])
    out = capsys.readouterr().out
    data = json.loads(out)
    assert rc == 0
    assert data["source"] == str(demo_dataset_path())
    assert data["format"] == "messages" and data["rows"] == data["valid_rows"] >= 100
    assert data["example"]["text"][slice(*data["example"]["trained_spans"][0])].startswith("Ahoy! ")
