"""A person's mistakes as the `localtune` command meets them: a run's config.toml edited by hand
into bad TOML or a bad value, and numeric options out of range. Each is one line that says
what, where and how to fix it, exit code 1, no traceback; a listing goes on with the other runs."""

from __future__ import annotations

import json
import re

import pytest

from localtune.paths import runs_dir
from localtune.runs import create_run
from tests.helpers import one_line_error, run

GOOD = '[run]\nmodel = "smollm2-135m"\ndata = "demo"\n'

BROKEN_CONFIGS = {
    "bad TOML": ("[run\nmodel = ",
                 "{path}: invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 5); "
                 "correct that line"),
    "a knob of the wrong type": (GOOD + '[knobs]\nr = "x"\n', "{path}: [knobs]: 'r' must be an integer, got 'x'"),
    "a knob out of range": (GOOD + "[knobs]\nlearning_rate = 5.0\n",
                            "{path}: [knobs]: 'learning_rate' must be at most 1, got 5.0"),
    "an unknown knob": (GOOD + "[knobs]\nepochs = 3\n",
                        "{path}: [knobs]: unknown key 'epochs' (did you mean num_train_epochs?). Known keys: "),
    "an unknown [run] key": (GOOD + "steps = 3\n", "{path}: [run]: unknown key 'steps'; known keys: model, data, "),
    "a [run] value of the wrong type": (GOOD + "skip_bad_rows = 1\n",
                                        "{path}: [run] skip_bad_rows: must be true or false, got 1"),
    "an eval split that is no fraction": (GOOD + "eval_split = 2\n",
                                          "{path}: [run] eval_split: 2 is not a fraction of the rows; give a number "
                                          "from 0 (none) up to but not including 1, e.g. 0.05"),
    "the data line deleted": ('[run]\nmodel = "smollm2-135m"\n',
                              '{path}: [run] has no data; put back the line data = "..." (the run cannot go on '
                              'without it)'),
    "an unknown table": (GOOD + "[trainer]\nr = 8\n",
                         "{path}: unknown table 'trainer'; a config has [run] and [knobs]"),
}


def two_runs(config_text: str):
    """A good run, and a newer one whose config.toml was edited into `config_text`."""
    good = create_run({"run": {"model": "smollm2-135m", "data": "demo"}, "knobs": {}}, {}, "20260101-090000-good")
    broken = create_run({"run": {"model": "smollm2-135m", "data": "demo"}, "knobs": {}}, {}, "20260102-090000-edited")
    broken.config_path.write_text(config_text, encoding="utf-8")
    return good, broken


def expected(message: str, path) -> str:
    return message.format(path=path)


@pytest.mark.parametrize("case", list(BROKEN_CONFIGS))
def test_runs_lists_a_run_with_a_broken_config_as_unreadable_and_the_others_as_they_are(capsys, monkeypatch, case):
    text, message = BROKEN_CONFIGS[case]
    good, broken = two_runs(text)
    monkeypatch.setenv("COLUMNS", "120")
    rc, out, err = run(capsys, "runs")
    assert rc == 0 and err == ""
    assert re.search(rf"^{good.id}\s+sft\s+created\s+0/\?\s+-\s+smollm2-135m\s", out, re.M), out
    assert re.search(rf"^{broken.id}\s+-\s+unreadable\s+0/\?\s+-\s+-\s", out, re.M), out
    assert out.splitlines()[-1].startswith(f"{broken.id}: unreadable: {expected(message, broken.config_path)}")

    rc, out, _ = run(capsys, "runs", "--json")
    listed = {r["id"]: r for r in json.loads(out)}
    assert listed[good.id]["state"] == "created" and listed[good.id]["error"] is None
    assert listed[broken.id]["state"] == "unreadable"
    assert listed[broken.id]["error"].startswith(expected(message, broken.config_path))


@pytest.mark.parametrize("case", list(BROKEN_CONFIGS))
def test_resume_of_a_run_with_a_broken_config_is_one_line(capsys, case):
    text, message = BROKEN_CONFIGS[case]
    _, broken = two_runs(text)
    rc, out, err = run(capsys, "resume", broken.id, "--detach")
    assert rc == 1
    assert one_line_error(err).startswith(f"localtune: error: {expected(message, broken.config_path)}")
    assert broken.read_status()["state"] == "created" and not broken.read_status().get("launched")  # nothing started
    assert broken.config_path.read_text(encoding="utf-8") == text  # and nothing the person wrote was changed


def test_a_config_file_with_a_bad_value_names_the_file_and_key(capsys, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[run]\neval_split = -0.5\n[knobs]\nr = 8\n')
    rc, _, err = run(capsys, "train", "--config", str(cfg), "--detach")
    assert rc == 1
    assert one_line_error(err) == (f"localtune: error: {cfg}: [run] eval_split: -0.5 is not a fraction of the rows; "
                                   "give a number from 0 (none) up to but not including 1, e.g. 0.05")
    assert not runs_dir().exists() or not any(runs_dir().iterdir())


# ---------------------------------------------------------------- numeric options


@pytest.mark.parametrize("argv, line", [
    (["--max-new-tokens", "0"], "--max-new-tokens: 0 is not a length of answer; give 1 or more tokens, e.g. 256"),
    (["--max-new-tokens", "-3"], "--max-new-tokens: -3 is not a length of answer; give 1 or more tokens, e.g. 256"),
    (["--temperature", "-0.5"], "--temperature: -0.5 is not a sampling temperature; give 0 (greedy) or more, e.g. 0.7"),
    (["--temperature", "nan"], "--temperature: nan is not a sampling temperature; give 0 (greedy) or more, e.g. 0.7"),
    (["--temperature", "inf"], "--temperature: inf is not a sampling temperature; give 0 (greedy) or more, e.g. 0.7"),
])
def test_out_of_range_chat_options_are_one_line_before_anything_loads(capsys, argv, line):
    chat_run = create_run({"run": {"model": "smollm2-135m", "data": "demo"}, "knobs": {}}, {}, "20260101-090000-chat")
    rc, out, err = run(capsys, "chat", chat_run.id, *argv)
    assert rc == 1 and out == ""
    assert one_line_error(err) == f"localtune: error: {line}"


@pytest.mark.parametrize("value", ["0", "-8", "nan", "inf"])
def test_an_impossible_budget_is_one_line(capsys, value):
    rc, _, err = run(capsys, "plan", "--budget", value, "--backend", "cuda")
    assert rc == 1
    assert one_line_error(err) == (f"localtune: error: --budget: {float(value)!r} is not a memory size; give a "
                                   "positive number of GB, e.g. 24")


@pytest.mark.parametrize("value", ["1.5", "1", "-0.1", "nan"])
def test_an_eval_split_that_is_no_fraction_is_one_line_and_starts_nothing(capsys, value):
    rc, _, err = run(capsys, "train", "--eval-split", value, "--detach")
    assert rc == 1
    assert one_line_error(err) == (f"localtune: error: --eval-split: {float(value)!r} is not a fraction of the rows; "
                                   "give a number from 0 (none) up to but not including 1, e.g. 0.05")
    assert not runs_dir().exists() or not any(runs_dir().iterdir())


def test_data_inspect_checks_max_seq_len_like_plan_does(capsys):
    rc, _, err = run(capsys, "data", "inspect", "--max-seq-len", "0")
    assert rc == 1
    assert one_line_error(err) == "localtune: error: --max-seq-len: 'max_length' must be at least 16, got 0"
