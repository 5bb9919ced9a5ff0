"""An Ollama `Modelfile` for an exported GGUF file: FROM, a TEMPLATE equivalent to the run's
chat template, the stop tokens and parameters.

Ollama's TEMPLATE is a Go template, the run's chat template a Jinja one; no general
translation exists. We derive the pieces the Jinja template writes around each message by
rendering it on marker messages (system, user, assistant, then a user turn again), assuming
the common shape: every message is `prefix(role) + content + suffix(role)`, an optional
default system block when the conversation has no system message (SmolLM2 adds one), and a
generation prompt at the end. The pieces are then put into one Go template. Before anything
is written, `ollama_template` renders a few conversations both ways (the Jinja template, and
the pieces as the Go template would join them) and refuses when they differ, so a template
of another shape is never written half-right.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from localtune.errors import UserError

_M = {"system": "\u2063SYS\u2063", "u1": "\u2063USER1\u2063", "a1": "\u2063ASSISTANT1\u2063", "u2": "\u2063USER2\u2063"}


@dataclass
class TemplatePieces:
    """What the chat template writes around each message."""

    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    default_system: str
    """Written first when the conversation has no system message ('' when none)."""
    system_prefix: str | None = None
    """None: the template does not take system messages."""
    system_suffix: str | None = None


def _render(template: str, messages: list[dict[str, str]], add_generation_prompt: bool, special: dict[str, str]) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **special)
    return rendered[0]


def _between(text: str, *markers: str) -> list[str]:
    """The text before, between and after the markers, which must appear in order."""
    out, pos = [], 0
    for m in markers:
        at = text.find(m, pos)
        if at < 0:
            raise ValueError(f"marker missing: {m!r}")
        out.append(text[pos:at])
        pos = at + len(m)
    out.append(text[pos:])
    return out


def derive_pieces(template: str, special: dict[str, str]) -> TemplatePieces:
    """Render the template on marker messages and cut out the pieces (ValueError when the
    template is not of the per-message shape)."""
    user, asst = lambda m: {"role": "user", "content": m}, lambda m: {"role": "assistant", "content": m}
    r = lambda msgs, gen: _render(template, msgs, gen, special)  # noqa: E731
    q0, _ = _between(r([user(_M["u1"])], False), _M["u1"])
    _, user_suffix = _between(r([user(_M["u1"])], False), _M["u1"])
    _, user_then_gen = _between(r([user(_M["u1"])], True), _M["u1"])
    if not user_then_gen.startswith(user_suffix):
        raise ValueError("the generation prompt does not follow the user turn's suffix")
    generation_prompt = user_then_gen[len(user_suffix):]
    _, _, assistant_suffix = _between(r([user(_M["u1"]), asst(_M["a1"])], False), _M["u1"], _M["a1"])
    _, p2, p3, _ = _between(r([user(_M["u1"]), asst(_M["a1"]), user(_M["u2"])], True), _M["u1"], _M["a1"], _M["u2"])
    if not (p2.startswith(user_suffix) and p3.startswith(assistant_suffix)):
        raise ValueError("the text between turns is not suffix + prefix")
    assistant_prefix, user_prefix = p2[len(user_suffix):], p3[len(assistant_suffix):]
    if not q0.endswith(user_prefix):
        raise ValueError("the first user turn is not written like the others")
    pieces = TemplatePieces(user_prefix=user_prefix, user_suffix=user_suffix, assistant_prefix=assistant_prefix,
                            assistant_suffix=assistant_suffix, generation_prompt=generation_prompt,
                            default_system=q0[:len(q0) - len(user_prefix)])
    try:
        p0, p1, _ = _between(r([{"role": "system", "content": _M["system"]}, user(_M["u1"])], False),
                             _M["system"], _M["u1"])
    except Exception:  # noqa: BLE001 - a template that raises on a system message (Mistral's) has none
        return pieces
    if p1.endswith(user_prefix):
        pieces.system_prefix, pieces.system_suffix = p0, p1[:len(p1) - len(user_prefix)]
    return pieces


def render_with_pieces(p: TemplatePieces, messages: list[dict[str, str]]) -> str:
    """What the Go template from `go_template(p)` renders for `messages` with a generation
    prompt (Ollama always asks for the next assistant turn)."""
    out = []
    if messages and messages[0]["role"] != "system":
        out.append(p.default_system)
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "system" and p.system_prefix is not None:
            out.append(p.system_prefix + m["content"] + (p.system_suffix or ""))
        elif m["role"] == "user":
            out.append(p.user_prefix + m["content"] + p.user_suffix + (p.generation_prompt if last else ""))
        elif m["role"] == "assistant":
            out.append(p.assistant_prefix + m["content"] + ("" if last else p.assistant_suffix))
    return "".join(out)


def _go(text: str) -> str:
    """Literal text inside a Go template: only `{{` needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(p: TemplatePieces) -> str:
    """The Go template. One line of actions with no trim markers (`{{-`), so the newlines inside
    the pieces are kept exactly."""
    system = (f'{{{{ if eq .Role "system" }}}}{_go(p.system_prefix)}{{{{ .Content }}}}{_go(p.system_suffix or "")}{{{{ else }}}}'
              if p.system_prefix is not None else "")
    return (
        f'{{{{ if .Messages }}}}{{{{ if ne (index .Messages 0).Role "system" }}}}{_go(p.default_system)}{{{{ end }}}}{{{{ end }}}}'
        f'{{{{ range $i, $_ := .Messages }}}}{{{{ $last := eq (len (slice $.Messages $i)) 1 }}}}'
        f'{system}'
        f'{{{{ if eq .Role "user" }}}}{_go(p.user_prefix)}{{{{ .Content }}}}{_go(p.user_suffix)}'
        f'{{{{ if $last }}}}{_go(p.generation_prompt)}{{{{ end }}}}'
        f'{{{{ else if eq .Role "assistant" }}}}{_go(p.assistant_prefix)}{{{{ .Content }}}}'
        f'{{{{ if not $last }}}}{_go(p.assistant_suffix)}{{{{ end }}}}'
        f'{{{{ end }}}}'
        f'{"{{ end }}" if p.system_prefix is not None else ""}'
        f'{{{{ end }}}}'
    )


CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of Italy?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
]


def ollama_template(template: str, special: dict[str, str]) -> TemplatePieces:
    """The pieces for an Ollama TEMPLATE equivalent to `template`, checked on CHECK_CONVERSATIONS;
    UserError when the template is of another shape. Cheap (a few renders)."""
    refuse = ("the run's chat template cannot be written as an Ollama TEMPLATE by localtune ({}); export "
              "without --ollama and write the Modelfile's TEMPLATE by hand")
    try:
        p = derive_pieces(template, special)
    except Exception as e:  # noqa: BLE001 - any template error means: not of the shape we translate
        raise UserError(refuse.format(str(e).splitlines()[0] if str(e) else type(e).__name__)) from None
    for conv in CHECK_CONVERSATIONS:
        if conv[0]["role"] == "system" and p.system_prefix is None:
            continue
        want = _render(template, conv, True, special)
        if render_with_pieces(p, conv) != want:
            raise UserError(refuse.format(f"it renders a {len(conv)}-message conversation differently"))
    if '"""' in go_template(p):
        raise UserError(refuse.format('it contains """, which ends a Modelfile string'))
    return p


def ollama_model_name(run_id: str) -> str:
    """A name `ollama create` accepts: lowercase letters, digits, '-', '_', '.'."""
    return "localtune-" + (re.sub(r"[^a-z0-9._-]+", "-", run_id.lower()).strip("-.") or "model")


def modelfile_text(gguf_name: str, pieces: TemplatePieces, stops: list[str], parameters: dict[str, Any]) -> str:
    lines = ["# Written by localtune. Create the model with:  ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}", "", f'TEMPLATE """{go_template(pieces)}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    lines += [f"PARAMETER {k} {v}" for k, v in parameters.items()]
    return "\n".join(lines) + "\n"


def ollama_parameters(generation_config: dict[str, Any], context_length: int | None) -> dict[str, Any]:
    """num_ctx (the model's context, at most 4096: Ollama's KV cache grows with it) and the
    sampling settings the model ships in generation_config.json, in Ollama's names."""
    params: dict[str, Any] = {}
    if context_length:
        params["num_ctx"] = min(int(context_length), 4096)
    for hf, ol in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                   ("repetition_penalty", "repeat_penalty")):
        if generation_config.get(hf) is not None and generation_config.get("do_sample", True):
            params[ol] = generation_config[hf]
    return params
