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


def test_data_formats_lists_every_format_with_an_example_under_the_methods_that_read_it(capsys):
    rc, out, _ = run(capsys, "data", "formats")
    assert rc == 0
    lines = out.splitlines()
    preference_at = lines.index("Preference pairs, for --method dpo and --method orpo:")
    assert lines[0] == "Supervised fine-tuning (--method sft, the default) reads:"

    def names(part: list[str]) -> list[str]:
        return [line.split()[0] for line in part if line.startswith("  ") and not line.startswith("   ")]

    assert names(lines[1:preference_at]) == ["messages", "sharegpt", "alpaca", "prompt_completion", "text"]
    assert names(lines[preference_at + 1:]) == ["preference", "preference_messages"]
    assert lines[-1].startswith("The format is detected from each row's keys (a row with chosen and rejected is "
                                "a preference pair)")
    for f in FORMATS.values():
        for example in (f.example, *f.more_examples):
            assert f"{'':22} {json.dumps(example)}" in lines
    # the explicit-prompt form of preference_messages is shown too
    assert ('{"prompt": [{"role": "user", "content": "Capital of France?"}], '
            '"chosen": [{"role": "assistant", "content": "Paris."}]') in out


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


# ---------------------------------------------------------------- preference pairs


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


PAIRS = [
    {"chosen": [msg("user", "Capital of France?"), msg("assistant", "Paris.")],
     "rejected": [msg("user", "Capital of France?"), msg("assistant", "Lyon, I think.")]},
    {"prompt": [msg("system", "You are terse."), msg("user", "Two plus two?")],
     "chosen": [msg("assistant", "Four.")], "rejected": [msg("assistant", "Five.")]},
    {"chosen": [msg("user", "Colour of a clear sky?"), msg("assistant", "Blue.")],
     "rejected": [msg("user", "Colour of a clear sky?"), msg("assistant", "Green.")]},
]
SFT_LINE = ("these rows are messages (supervised fine-tuning); --method dpo needs preference pairs (preference: "
            "prompt/chosen/rejected, or preference_messages: chosen/rejected conversations); "
            "see localtune data formats")
PAIRS_LINE = ("these rows are preference_messages (preference pairs, for --method dpo or orpo); --method sft needs "
              "supervised fine-tuning rows (messages, sharegpt, alpaca, prompt_completion or text); "
              "see localtune data formats")


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PAIRS), encoding="utf-8")
    return path


def pair_lengths(model_dir: Path) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of PAIRS, from the tokenizer directly: the prompt
    rendered with the generation prompt, each answer its text and '<|im_end|>\\n'."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for r in PAIRS:
        prompt = r.get("prompt") or r["chosen"][:-1]
        n = len(tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)["input_ids"])
        c, j = (len(tok(r[k][-1]["content"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
                for k in ("chosen", "rejected"))
        out.append((n, c, j))
    return out


def test_inspect_pairs_shows_the_prompt_and_both_answers_as_dpo_trains_them(capsys, pairs_file, builtin_model_dir):
    import statistics

    rc, out, err = run(capsys, "data", "inspect", str(pairs_file), "--max-seq-len", "34")
    lengths = pair_lengths(builtin_model_dir)
    prompts, chosen, rejected = (sorted(x[i] for x in lengths) for i in range(3))
    longest = sorted(p + max(c, r) for p, c, r in lengths)

    assert rc == 0, err
    lines = out.splitlines()
    assert "Format    preference_messages (detected)" in lines
    assert "Rows      3 (3 valid, 0 bad)" in lines
    assert "Model     SmolLM2-135M-Instruct (built-in); chat template: the model's own" in lines
    assert (f"Tokens    prompt min {prompts[0]} · median {prompts[1]} · max {prompts[2]}; chosen min {chosen[0]} · "
            f"median {chosen[1]} · max {chosen[2]}; rejected min {rejected[0]} · median {rejected[1]} · max "
            f"{rejected[2]}  ({sum(map(sum, lengths))} in all, {sum(chosen) + sum(rejected)} in the answers)") in lines
    over = [n - 34 for n in longest if n > 34]
    assert len(over) == 2  # the two pairs with the default system prompt: 34 fits only the one with its own
    assert (f"Too long  2 pairs exceed max_length 34 (prompt + the longer answer) by up to {max(over)} tokens "
            f"(median {statistics.median(over):g}); they will be truncated") in lines
    assert "Too long  2 prompts alone fill max_length 34; trl's DPOTrainer leaves those pairs out" in lines
    assert (f"Example ({pairs_file}:1) as trl's DPOTrainer tokenizes it: the prompt, then each answer between « "
            "and »:") in lines
    p, c, r = lengths[0]
    example = out.split("between « and »:\n", 1)[1]
    assert example == (
        f"Prompt    {p} tokens\n"
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n\n"
        f"Chosen    {c} tokens (with the prompt: {p + c} of max_length 34)\n"
        "«Paris.<|im_end|>\n»\n"
        f"Rejected  {r} tokens (with the prompt: {p + r} of max_length 34)\n"
        "«Lyon, I think.<|im_end|>\n»\n")


def test_inspect_pairs_json(capsys, pairs_file, builtin_model_dir):
    rc, out, err = run(capsys, "data", "inspect", str(pairs_file), "--json", "--method", "dpo", "--max-seq-len", "512")
    lengths = pair_lengths(builtin_model_dir)
    p, c, r = lengths[0]

    assert rc == 0, err
    data = json.loads(out)
    assert (data["format"], data["method"], data["methods"], data["forced_format"]) == \
        ("preference_messages", "dpo", ["dpo", "orpo"], False)
    assert (data["rows"], data["valid_rows"], data["skipped_rows"]) == (3, 3, 0)
    assert data["tokens"]["max"] == max(a + max(b, d) for a, b, d in lengths)
    assert data["tokens"]["rows_over_max_length"] == 0 and data["prompts_filling_max_length"] == 0
    assert data["prompt_tokens"]["min"] == min(x[0] for x in lengths)
    assert data["rejected_tokens"]["max"] == max(x[2] for x in lengths)
    assert data["total_tokens"] == sum(map(sum, lengths))
    assert data["trained_tokens"] == sum(x[1] + x[2] for x in lengths)
    assert data["chat_template"]["source"] == "model"
    assert data["example"] == {
        "where": f"{pairs_file}:1",
        "prompt": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                  "<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n",
        "chosen": "Paris.<|im_end|>\n", "rejected": "Lyon, I think.<|im_end|>\n",
        "tokens": {"prompt": p, "chosen": c, "rejected": r, "longest_pair": p + max(c, r)}}


def test_inspect_string_pairs_for_orpo(capsys, tmp_path, builtin_model_dir):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nThe capital of France is, Paris., Lyon.\n", encoding="utf-8")
    rc, out, err = run(capsys, "data", "inspect", str(path), "--method", "orpo", "--max-seq-len", "64")
    assert rc == 0, err
    lines = out.splitlines()
    assert "Format    preference (detected)" in lines
    assert "Length    every pair fits max_length 64 (prompt + the longer answer: at most 9 tokens)" in lines
    example = out.split("between « and »:\n", 1)[1]
    # trl's ORPOTrainer puts the BOS token (SmolLM2's is <|im_start|>) before a plain prompt
    assert example == ("Prompt    6 tokens\n<|im_start|>The capital of France is\n"
                       "Chosen    3 tokens (with the prompt: 9 of max_length 64)\n« Paris.<|im_end|>»\n"
                       "Rejected  3 tokens (with the prompt: 9 of max_length 64)\n« Lyon.<|im_end|>»\n")
    assert f"Example ({path}:2) as trl's ORPOTrainer tokenizes it" in out


def test_inspect_bad_pairs_fail_and_are_listed_by_line(capsys, tmp_path, builtin_model_dir):
    path = tmp_path / "pairs.jsonl"
    same = {"chosen": [msg("user", "Hi"), msg("assistant", "Hello.")],
            "rejected": [msg("user", "Hi"), msg("assistant", "Hello.")]}
    other_prompt = {"chosen": [msg("user", "Hi"), msg("assistant", "Hello.")],
                    "rejected": [msg("user", "Hey"), msg("assistant", "Go.")]}
    path.write_text("".join(json.dumps(r) + "\n" for r in [PAIRS[0], same, PAIRS[1], other_prompt]), encoding="utf-8")
    rc, out, err = run(capsys, "data", "inspect", str(path), "--max-seq-len", "64")
    assert rc == 1
    lines = out.splitlines()
    assert "Rows      4 (2 valid, 2 bad)" in lines
    assert (f"  {path}:2: 'chosen' and 'rejected' end with the same answer; a pair must differ to show a "
            "preference") in lines
    assert (f"  {path}:4: chosen[0] and rejected[0] differ; a pair shares its prompt (every turn before the last) "
            "and differs only in the assistant's last answer") in lines
    assert "Training would stop on the 2 bad rows: fix them, or pass --skip-bad-rows to leave them out." in lines
    rc, out, _ = run(capsys, "data", "inspect", str(path), "--max-seq-len", "64", "--skip-bad-rows")
    assert rc == 0 and "Training would stop" not in out


def test_inspect_method_mismatch_is_one_line_both_ways(capsys, good_file, pairs_file):
    rc, out, err = run(capsys, "data", "inspect", str(good_file), "--method", "dpo")
    assert (rc, out) == (1, "")
    assert one_line_error(err) == f"localtune: error: {good_file}: {SFT_LINE}"

    rc, out, err = run(capsys, "data", "inspect", str(pairs_file), "--method", "sft")
    assert (rc, out) == (1, "")
    assert one_line_error(err) == f"localtune: error: {pairs_file}: {PAIRS_LINE}"

    rc, _, err = run(capsys, "data", "inspect", str(pairs_file), "--method", "ppo")
    assert rc == 1 and "argument --method: invalid choice: 'ppo'" in one_line_error(err)


def test_inspect_pairs_with_train_on_inputs_is_one_line(capsys, pairs_file):
    rc, _, err = run(capsys, "data", "inspect", str(pairs_file), "--train-on-inputs")
    assert rc == 1
    assert one_line_error(err) == ("localtune: error: --train-on-inputs is for supervised fine-tuning; dpo and orpo "
                                   "score the chosen and rejected answers after the prompt")
