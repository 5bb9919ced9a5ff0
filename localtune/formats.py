"""The dataset formats localtune reads: the one definition the loader, the README and the
tests share.

Every row is turned into one of three shapes before rendering:

- a conversation (`messages`: system / user / assistant turns), rendered with the model's
  chat template; by default only the assistant turns are trained on;
- a prompt and a completion (plain strings, concatenated as trl does); only the completion
  is trained on by default;
- plain text, trained on whole.

| format              | a row looks like                                                          |
|---------------------|---------------------------------------------------------------------------|
| `messages`          | {"messages": [{"role": "system"/"user"/"assistant", "content": "..."}]}   |
| `sharegpt`          | {"conversations": [{"from": "system"/"human"/"gpt", "value": "..."}]}     |
| `alpaca`            | {"instruction": "...", "input": "...", "output": "...", "system": "..."}  |
| `prompt_completion` | {"prompt": "...", "completion": "..."}                                    |
| `text`              | {"text": "..."}                                                           |

(`input` and `system` are optional in alpaca rows; a system turn is optional in the two
conversation formats.) A format is detected from each row's keys, in the order of the table;
`--format` forces one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CONVERSATION, PROMPT_COMPLETION, TEXT = "conversation", "prompt_completion", "text"


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
    )
}

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
"""ShareGPT `from` values and the roles they stand for (some exports write user/assistant)."""


def detect(row: Any) -> str | None:
    """The format whose required keys this row has, or None."""
    if not isinstance(row, dict):
        return None
    for f in FORMATS.values():
        if all(k in row for k in f.required):
            return f.name
    return None
