"""Talk to a run's tuned model: the base model with the run's adapter (unmerged, so the same
weights can also answer as the plain base model), rendered with the chat template the run
trained with (data.json).

    session = ChatSession.load(run)                              # seconds for the built-in model
    session.reply(messages, tuned=True, on_text=print_piece)     # one answer, streamed

The session knows nothing about terminals: `localtune chat` (and later the TUI) keep the
conversation, read the input and show the text that `on_text` receives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from localtune.runs import RunDir

DEFAULT_MAX_NEW_TOKENS = 256


def _device_and_dtype():
    """The accelerator if there is one (bf16 on CUDA where supported), else the CPU in float32."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps", torch.float32
    return "cpu", torch.float32


@dataclass
class ChatSession:
    """A loaded tuned model and its tokenizer, with the run's chat template."""

    run: RunDir
    model: Any
    """peft's PeftModel: base + adapter; `disable_adapter()` gives the base model."""
    tokenizer: Any
    template: dict[str, Any]
    """The run's ChatTemplate fields (template, end_of_turn, ...)."""
    device: str

    @classmethod
    def load(cls, run: RunDir, *, progress: Callable[[str, int, int], None] | None = None) -> "ChatSession":
        """Load base + adapter (UserError when the run has no adapter yet)."""
        from localtune.export import load_tuned_model, require_adapter

        require_adapter(run)
        device, dtype = _device_and_dtype()
        kw = {"progress": progress} if progress else {}
        model, tokenizer, template = load_tuned_model(run, dtype=dtype, device=device, **kw)
        return cls(run=run, model=model, tokenizer=tokenizer, template=template, device=device)

    def _stop_ids(self) -> list[int]:
        ids = []
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        end = (self.template.get("end_of_turn") or "").strip()
        if end:
            tid = self.tokenizer.convert_tokens_to_ids(end)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
        return ids

    def reply(self, messages: list[dict[str, str]], *, tuned: bool = True,
              max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.0,
              on_text: Callable[[str], None] | None = None) -> str:
        """The next assistant turn for `messages` (greedy when temperature is 0), from the tuned
        model or, with tuned=False, the base model alone. `on_text` gets the text as it comes."""
        import contextlib

        import torch
        from transformers import TextStreamer

        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        streamer = None
        if on_text is not None:
            class _Callback(TextStreamer):
                def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                    if text:
                        on_text(text)

            streamer = _Callback(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stops = self._stop_ids()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (stops[0] if stops else None)
        sampling = ({"do_sample": True, "temperature": temperature, "top_p": None, "top_k": None} if temperature > 0
                    else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})
        adapter_off = contextlib.nullcontext() if tuned else self.model.disable_adapter()
        with torch.no_grad(), adapter_off:
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                                      pad_token_id=pad, streamer=streamer, **sampling)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
