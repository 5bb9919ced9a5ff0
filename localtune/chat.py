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


@dataclass(frozen=True)
class ChatLoading:
    """How chat loads a run's base model: where, in what dtype, and whether in 4 bits."""

    device: str
    """'cuda:N' (the run's GPU), 'mps' or 'cpu'."""
    dtype: str
    """The dtype of the weights that are not quantised (localtune.precision's choice)."""
    load_in_4bit: bool
    """Load the base the way a QLoRA run trained it, because 16 bits would not fit."""
    bnb_compute: str = ""
    """With 4 bits: what the weights are dequantised to (as in training, on this device)."""
    reason: str = ""
    """Why 4 bits, in words (empty otherwise)."""


def chat_loading(plan: dict[str, Any], knobs: Any, *, cuda_available: bool, mps_available: bool,
                 facts: Any = None) -> ChatLoading:
    """Decide how chat loads the run's model on this machine. The run's own device when it is
    still there (the plan's GPU, not device 0), else the CPU; the dtype localtune.precision gives
    that device (`facts`: its DeviceFacts, read live when None). A run that trained with 4-bit
    weights is chatted with in 4 bits too when its base in 16 bits would not fit the plan's
    budget (an 8B model on a 12 GB card): loading it in 16 bits would only fail. Where it fits,
    16 bits answer exactly as the merged export will."""
    from localtune.memory import weights_bytes
    from localtune.models import ModelShape
    from localtune.precision import DeviceFacts, precision_for
    from localtune.profiles import BITSANDBYTES_BACKENDS

    backend = plan["hardware"]["backend"]
    if backend == "cuda" and cuda_available:
        index = plan["hardware"]["devices"][0].get("index") or 0
        device = f"cuda:{index}"
        facts = facts or DeviceFacts.live("cuda", index)
    elif backend == "mps" and mps_available:
        device = "mps"
        facts = facts or DeviceFacts.live("mps")
    else:
        device, facts = "cpu", DeviceFacts("cpu")  # chat on the CPU: float32, no autocast
    precision = precision_for(knobs.replace(load_in_4bit=False), facts)
    if not knobs.load_in_4bit or facts.backend != backend or backend not in BITSANDBYTES_BACKENDS:
        return ChatLoading(device, precision.weights_dtype, False)
    shape = ModelShape(**plan["model"]["shape"])
    full, _, _ = weights_bytes(shape, load_in_4bit=False, double_quant=False, dtype_bytes=precision.weights_bytes)
    budget = int(plan.get("budget_bytes") or 0)
    if full <= budget:
        return ChatLoading(device, precision.weights_dtype, False)
    return ChatLoading(device, precision.weights_dtype, True, precision_for(knobs, facts).bnb_compute,
                       f"the base model in {precision.weights_dtype} ({full / 2**30:.1f} GB) would not fit the run's "
                       f"budget ({budget / 2**30:.1f} GB), so it loads in 4 bits as the run trained it")


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

        import json

        import torch

        from localtune.knobs import knobs_from_mapping

        require_adapter(run)
        plan = json.loads(run.plan_path.read_text(encoding="utf-8"))
        knobs = knobs_from_mapping(run.read_config()["knobs"], str(run.config_path))
        how = chat_loading(plan, knobs, cuda_available=torch.cuda.is_available(),
                           mps_available=torch.backends.mps.is_available())
        quantization = None
        if how.load_in_4bit:
            from transformers import BitsAndBytesConfig

            quantization = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=knobs.bnb_4bit_quant_type,
                bnb_4bit_use_double_quant=knobs.bnb_4bit_use_double_quant,
                bnb_4bit_compute_dtype=getattr(torch, how.bnb_compute))
            if progress:
                progress(how.reason, 0, 0)
        kw = {"progress": progress} if progress else {}
        model, tokenizer, template = load_tuned_model(run, dtype=getattr(torch, how.dtype), device=how.device,
                                                      quantization_config=quantization, **kw)
        return cls(run=run, model=model, tokenizer=tokenizer, template=template, device=how.device)

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
