"""The dataset formats localtune reads: the one definition the loader, the README and the
tests share.

Supervised fine-tuning (`--method sft`) reads the first five formats; the preference methods
(`--method dpo`, `--method orpo`) read the last two. For supervised fine-tuning every row is
turned into one of three shapes before rendering:

- a conversation (`messages`: system / user / assistant turns), rendered with the model's
  chat template; by default only the assistant turns are trained on;
- a prompt and a completion (plain strings, concatenated as trl does); only the completion
  is trained on by default;
- plain text, trained on whole.

| format                | a row looks like                                                         |
|-----------------------|--------------------------------------------------------------------------|
| `messages`            | {"messages": [{"role": "system"/"user"/"assistant", "content": "..."}]}  |
| `sharegpt`            | {"conversations": [{"from": "system"/"human"/"gpt", "value": "..."}]}    |
| `alpaca`              | {"instruction": "...", "input": "...", "output": "...", "system": "..."} |
| `prompt_completion`   | {"prompt": "...", "completion": "..."}                                   |
| `text`                | {"text": "..."}                                                          |
| `preference`          | {"prompt": "...", "chosen": "...", "rejected": "..."}                    |
| `preference_messages` | {"prompt": [messages], "chosen": [messages], "rejected": [messages]}     |

(`input` and `system` are optional in alpaca rows; a system turn is optional in the
conversation formats; "prompt" is optional in preference_messages rows.)

A preference pair becomes a prompt and two answers, the chosen and the rejected one, in trl's
forms: plain strings (trl concatenates prompt and answer and ends the answer with the model's
EOS), or conversations, where the prompt is every turn before the last (given apart in
"prompt", trl's explicit form, or left inside both conversations, its implicit form) and each
answer is the last, assistant turn, rendered with the model's chat template. A string
"prompt" beside conversations is read as trl reads it: the conversations hold the prompt (as in
HuggingFaceH4/ultrafeedback_binarized); when they hold only the answers, it is the user's turn.

A format is detected from each row's keys: a row with `chosen` and `rejected` is a preference
pair (`preference_messages` when they are lists of messages, else `preference`), any other row
is the first of the five supervised formats, in the order of the table, whose keys it has.
`--format` forces one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONVERSATION, PROMPT_COMPLETION, TEXT = "conversation", "prompt_completion", "text"
PREFERENCE_CONVERSATION, PREFERENCE_TEXT = "preference_conversation", "preference_text"
"""The shapes of a preference pair: conversations, or plain strings."""
SFT_METHODS, PREFERENCE_METHODS = ("sft",), ("dpo", "orpo")
"""The methods (knobs.METHODS) each kind of format is for."""


@dataclass(frozen=True)
class Format:
    """One dataset format: the keys that identify it and an example row."""

    name: str
    required: tuple[str, ...]
    """Keys every row must have; their presence is how the format is detected."""
    optional: tuple[str, ...]
    shape: str
    """What it becomes: CONVERSATION, PROMPT_COMPLETION or TEXT."""
    description: str
    example: dict[str, Any]
    methods: tuple[str, ...] = SFT_METHODS
    """The training methods that read this format."""
    more_examples: tuple[dict[str, Any], ...] = ()
    """Other ways to write a row (shown by `localtune data formats`)."""


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("messages", ("messages",), (), CONVERSATION,
               "OpenAI chat messages: role system/user/assistant and content",
               {"messages": [{"role": "system", "content": "You are terse."},
                             {"role": "user", "content": "Capital of France?"},
                             {"role": "assistant", "content": "Paris."}]}),
        Format("sharegpt", ("conversations",), ("system",), CONVERSATION,
               "ShareGPT: conversations of from (system/human/gpt) and value",
               {"conversations": [{"from": "human", "value": "Capital of France?"},
                                  {"from": "gpt", "value": "Paris."}]}),
        Format("alpaca", ("instruction", "output"), ("input", "system"), CONVERSATION,
               "Alpaca: instruction, optional input, output, optional system",
               {"instruction": "Name the capital.", "input": "France", "output": "Paris."}),
        Format("prompt_completion", ("prompt", "completion"), (), PROMPT_COMPLETION,
               "a prompt and its completion, as plain strings",
               {"prompt": "The capital of France is", "completion": " Paris."}),
        Format("text", ("text",), (), TEXT,
               "plain text, trained on whole",
               {"text": "Paris is the capital of France."}),
        Format("preference", ("prompt", "chosen", "rejected"), (), PREFERENCE_TEXT,
               "a prompt, a chosen and a rejected answer, as plain strings",
               {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Lyon."},
               methods=PREFERENCE_METHODS),
        Format("preference_messages", ("chosen", "rejected"), ("prompt",), PREFERENCE_CONVERSATION,
               "chosen and rejected conversations (role/content) that differ only in the last, assistant "
               "turn; or a prompt conversation and the two answers",
               {"chosen": [{"role": "user", "content": "Capital of France?"},
                           {"role": "assistant", "content": "Paris."}],
                "rejected": [{"role": "user", "content": "Capital of France?"},
                             {"role": "assistant", "content": "Lyon."}]},
               methods=PREFERENCE_METHODS,
               more_examples=({"prompt": [{"role": "user", "content": "Capital of France?"}],
                               "chosen": [{"role": "assistant", "content": "Paris."}],
                               "rejected": [{"role": "assistant", "content": "Lyon."}]},)),
    )
}

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
"""ShareGPT `from` values and the roles they stand for (some exports write user/assistant)."""


def is_preference(fmt: str) -> bool:
    """Whether `fmt` holds preference pairs (for dpo and orpo) rather than supervised rows."""
    return FORMATS[fmt].methods == PREFERENCE_METHODS


def formats_for(method: str | None) -> list[str]:
    """The formats `method` reads (every format for None)."""
    return [f.name for f in FORMATS.values() if method is None or method in f.methods]


def detect(row: Any, among: list[str] | tuple[str, ...] | None = None) -> str | None:
    """The format this row is in (one of `among`, every format by default), or None.

    A row with `chosen` and `rejected` is a preference pair: `preference_messages` when either
    is a list (of messages), else `preference`. Otherwise it is the first supervised format
    whose required keys the row has. When `among` leaves the preference formats out, such a row
    can still be a supervised one (a file may carry a `messages` column beside its pairs)."""
    if not isinstance(row, dict):
        return None
    names = list(FORMATS) if among is None else among
    if "chosen" in row and "rejected" in row:
        name = ("preference_messages" if isinstance(row["chosen"], list) or isinstance(row["rejected"], list)
                else "preference")
        if name in names:
            return name
    for f in FORMATS.values():
        if f.name in names and not is_preference(f.name) and all(k in row for k in f.required):
            return f.name
    return None
