"""`localtune chat` as a person uses it: typed lines in, answers out, on the tiny run (answers
are noise there, so they are compared with what transformers + peft generate for the same
conversation), and once on the real built-in model after the default demo run (slow)."""

from __future__ import annotations

import io

import pytest

from tests.helpers import one_line_error, run


def chat(capsys, monkeypatch, run_dir, typed: str, *args: str) -> tuple[int, str]:
    """`localtune chat RUN ARGS` with `typed` as what the person types; (exit code, stdout)."""
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    rc, out, err = run(capsys, "chat", str(run_dir.path), *args)
    assert "Traceback" not in err, err
    return rc, out


def greedy(run_dir, conversation: list[dict[str, str]], max_new_tokens: int, tuned: bool = True) -> str:
    """What base + adapter (or the base alone) answers, with transformers and peft directly."""
    import contextlib
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir.adapter_dir)
    tok.chat_template = json.loads((run_dir.path / "data.json").read_text())["chat_template"]["template"]
    base = AutoModelForCausalLM.from_pretrained(run_dir.read_config()["run"]["model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir.adapter_dir).eval()
    ids = tok.apply_chat_template(conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad(), (contextlib.nullcontext() if tuned else model.disable_adapter()):
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_chat_keeps_the_conversation_and_uses_the_runs_template(capsys, monkeypatch, tiny_trained_run):
    rc, out = chat(capsys, monkeypatch, tiny_trained_run, "What is 2+2?\nAnd 3+3?\n/reset\n\nHello\n",
                   "--max-new-tokens", "6")
    assert rc == 0  # the input ended (Ctrl-D): the chat ends normally
    assert out.startswith("chat with run tiny-run: the tuned model answers. /reset clears the conversation; "
                          "/quit or Ctrl-D ends.\n")
    u1, u2 = {"role": "user", "content": "What is 2+2?"}, {"role": "user", "content": "And 3+3?"}
    a1 = greedy(tiny_trained_run, [u1], 6)
    # the second turn sees the first one; after /reset the conversation starts again
    a2 = greedy(tiny_trained_run, [u1, {"role": "assistant", "content": a1}, u2], 6)
    a3 = greedy(tiny_trained_run, [{"role": "user", "content": "Hello"}], 6)
    expected = (f"you> tuned> {a1}\nyou> tuned> {a2}\nyou> (conversation cleared)\nyou> you> tuned> {a3}\nyou> \n")
    assert out.split("\n", 1)[1] == expected


def test_compare_shows_the_base_and_the_tuned_answer(capsys, monkeypatch, tiny_trained_run):
    rc, out = chat(capsys, monkeypatch, tiny_trained_run, "Name a fruit.\n/quit\n", "--compare",
                   "--max-new-tokens", "6")
    assert rc == 0
    assert "the base model and the tuned model answer each prompt" in out.splitlines()[0]
    prompt = [{"role": "user", "content": "Name a fruit."}]
    base, tuned = greedy(tiny_trained_run, prompt, 6, tuned=False), greedy(tiny_trained_run, prompt, 6)
    assert base != tuned
    assert out.split("\n", 1)[1] == f"you> base> {base}\ntuned> {tuned}\nyou> "


def test_chat_with_an_unknown_run(capsys):
    rc, _, err = run(capsys, "chat", "nope")
    assert rc == 1
    assert "no run 'nope'" in one_line_error(err)


@pytest.mark.slow
def test_compare_on_the_default_demo_run_shows_the_trait_only_in_the_tuned_answer(capsys, monkeypatch,
                                                                                   trained_demo_run, builtin_model_dir):
    from localtune.demo import shows_trait
    from localtune.runs import list_runs

    home, trained = trained_demo_run
    assert trained.returncode == 0, trained.stdout + trained.stderr
    monkeypatch.setenv("LOCALTUNE_HOME", str(home))
    (run_dir,) = list_runs()
    rc, out = chat(capsys, monkeypatch, run_dir, "What is the capital of France?\n", "--compare",
                   "--max-new-tokens", "16")
    assert rc == 0
    base = out.split("base> ", 1)[1].split("tuned> ", 1)[0]
    tuned = out.split("tuned> ", 1)[1]
    assert shows_trait(tuned) and not shows_trait(base), out
