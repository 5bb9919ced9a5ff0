"""The training worker: `python -m localtune.worker RUN_DIR`.

It runs in its own process session (started by `localtune train` / `resume`), so it outlives
the command or TUI that started it; it owns the accelerator. It reads `config.toml` and
`plan.json` from the run directory, trains with trl's SFTTrainer and reports everything
through `events.jsonl` and `status.json` (see localtune.events and localtune.runs).

- Checkpoints are written under `checkpoints/.partial/` and renamed into `checkpoints/` only
  when complete, so a crash or a full disk never leaves a half checkpoint that resume would
  pick. Only the newest `save_total_limit` are kept.
- SIGTERM (`localtune stop`) ends the current optimizer step, writes a checkpoint and sets
  the state to `stopped`.
- Resume continues from the newest complete checkpoint: the Trainer restores the adapter,
  optimizer, scheduler and RNG state and skips the batches already seen, so the data order and
  the loss curve match an uninterrupted run.
- Out of memory (`torch.OutOfMemoryError`, or MPS's "MPS backend out of memory") raised by
  training backs off in the same process: the trainer and model are dropped and the memory
  freed, the micro-batch is halved and the accumulation doubled (the effective batch, and so the
  data order and the loss per optimizer step, stay the same), training goes back to the newest
  complete checkpoint (or the start) and goes on. At a micro-batch of 1 it halves max_length
  instead (not below 64); past that the run fails, saying what to change. Each back-off is an
  `oom_backoff` event and a line in the status's `notes`, and the new knobs are written into
  config.toml's [knobs], so a later resume keeps them.

- Checkpoints are also written by the clock: every `save_minutes` minutes since the last one,
  whatever `save_steps` says, so a run of slow steps is never hours away from a checkpoint.
- A newest checkpoint that cannot be read (a file missing, truncated or corrupt, as a crash of
  the machine or a bad disk can leave it) is moved aside to `checkpoint-N.corrupt` (kept, not
  deleted) with a `warning` event, and training resumes from the one before.
- A full disk while writing a checkpoint (ENOSPC) removes the half-written copy, leaves the
  checkpoints before it as they were, and fails the run with a status that says so: free
  space, then `localtune resume`.
- `max_gpu_temp` ([run] in config.toml, `--max-gpu-temp`): between optimizer steps, while the
  NVIDIA GPU is hotter than the limit, the worker waits (a `thermal_pause` event), polling every
  THERMAL_POLL_S, until it has cooled THERMAL_HYSTERESIS_C below it (`thermal_resume`).
- `notify` ([run], `--notify`): a desktop notification when the run finishes or fails
  (localtune.notify).

Anything that escapes is written to the status (`failed`, with the reason) and the traceback
to worker.log.

Test-only switch: with `LOCALTUNE_FAULT_KILL_IN_CHECKPOINT=N` in the environment the worker
kills itself (`os._exit(137)`, like SIGKILL) while writing the checkpoint of step N: after the
checkpoint's files are written under `checkpoints/.partial/`, before the rename. The tests use
it to check that resume ignores a half-written checkpoint. Never set it otherwise.

Test-only switch: with `LOCALTUNE_FAULT_ENOSPC_IN_CHECKPOINT=N` in the environment, writing the
checkpoint of step N fails as a full disk does (`OSError(ENOSPC)`), after part of it is written
under `checkpoints/.partial/`. Never set it otherwise.

Test-only switch: with `LOCALTUNE_FAULT_OOM_AT_STEP=N` in the environment the worker raises
`torch.cuda.OutOfMemoryError("CUDA out of memory (injected by LOCALTUNE_FAULT_OOM_AT_STEP)")`
at the start of optimizer step N, once per process (it does not fire again after the back-off),
on any backend. The tests use it to check the out-of-memory back-off. Never set it otherwise.

Benchmark-only switch: with `LOCALTUNE_CUDA_MEMORY_CAP_GB=N` in the environment a worker that
trains on CUDA lets torch's allocator use at most N GiB of its GPU
(`torch.cuda.set_per_process_memory_fraction`), as if the card had N GiB, and at exit writes one
line to worker.log: `localtune worker: cuda memory peak: max_memory_allocated=A
max_memory_reserved=R` (bytes). `benchmarks/gpu_check.py` uses it to measure a 24 GB card's run
on a larger GPU. Never set it otherwise.
"""

from __future__ import annotations

import errno
import gc
import importlib.metadata
import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from localtune.errors import UserError
from localtune.events import append_event, atomic_write_json, read_events
from localtune.notify import desktop_notify
from localtune.runs import LOCK_FD_ENV, RunDir

SAMPLE_MAX_NEW_TOKENS = 32
FAULT_KILL_IN_CHECKPOINT_ENV = "LOCALTUNE_FAULT_KILL_IN_CHECKPOINT"
"""Test-only: the step whose checkpoint writing the worker dies in (see the module docstring)."""
FAULT_OOM_AT_STEP_ENV = "LOCALTUNE_FAULT_OOM_AT_STEP"
"""Test-only: the optimizer step at whose start an out-of-memory error is injected, once."""
FAULT_ENOSPC_IN_CHECKPOINT_ENV = "LOCALTUNE_FAULT_ENOSPC_IN_CHECKPOINT"
"""Test-only: the step whose checkpoint meets a full disk (see the module docstring)."""
CUDA_MEMORY_CAP_ENV = "LOCALTUNE_CUDA_MEMORY_CAP_GB"
"""Benchmark-only: GiB of the GPU the worker may use, and its peaks in worker.log (see the module docstring)."""
MIN_BACKOFF_MAX_LENGTH = 64
"""The out-of-memory back-off halves max_length down to this, and no further."""
THERMAL_POLL_S = 10.0
"""How often a run paused for heat reads the GPU's temperature."""
THERMAL_HYSTERESIS_C = 3
"""A run paused for heat goes on once the GPU is this many degrees below the limit."""


class _StopRequest:
    """Set by SIGTERM; read between optimizer steps."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.reason = signal.Signals(signum).name


def _device_of(backend: str, plan: dict[str, Any]) -> str:
    """The plan's training device: 'cuda:N' for the plan's first GPU (N is its CUDA ordinal in
    this process, as the probe numbered it), else the backend."""
    if backend == "cuda":
        index = plan["hardware"]["devices"][0].get("index") or 0
        return f"cuda:{index}"
    return backend


def _use_device(device: str) -> None:
    """Make the plan's GPU this process's current CUDA device, so that everything that asks
    for 'the' device (bitsandbytes' kernels, `torch.cuda.is_bf16_supported`, the Trainer's
    `cuda` placement, memory readings without an argument) means it, not device 0."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))


def _cap_cuda_memory(device: str) -> None:
    """Benchmark-only (LOCALTUNE_CUDA_MEMORY_CAP_GB): cap torch's allocator on the training GPU
    at that many GiB and report the peaks at exit (see the module docstring)."""
    cap_gb = os.environ.get(CUDA_MEMORY_CAP_ENV)
    if not cap_gb or not device.startswith("cuda"):
        return
    import atexit

    import torch

    dev = torch.device(device)
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap_gb) * 2**30 / total), dev)
    atexit.register(lambda: print(f"localtune worker: cuda memory peak: max_memory_allocated="
                                  f"{torch.cuda.max_memory_allocated(dev)} max_memory_reserved="
                                  f"{torch.cuda.max_memory_reserved(dev)}", file=sys.stderr, flush=True))


def _load_model(path: str, knobs, precision, device: str, trust_remote_code: bool):
    """The base model as the plan asks: 4-bit weights (QLoRA) when `load_in_4bit`, else in
    `precision.weights_dtype`; on the plan's device; flash-attention 2 where
    localtune.precision found that it runs."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    if knobs.load_in_4bit:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=knobs.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=knobs.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=precision.bnb_compute_torch_dtype())
    if device != "cpu":
        kw["device_map"] = {"": device}
    if precision.attn_implementation:
        kw["attn_implementation"] = precision.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, dtype=precision.torch_dtype(), **kw)
    if knobs.load_in_4bit and not getattr(model, "is_loaded_in_4bit", False):
        raise RuntimeError(f"{path} did not load in 4 bits although the plan asks for it (bitsandbytes "
                           f"{importlib.metadata.version('bitsandbytes')})")
    if knobs.load_in_4bit and device == "cpu":
        keep_4bit_weights_trainable(model)
    # no KV cache in training; padding-free batches need this too: transformers finds the row
    # boundaries in position_ids only when there is no cache
    model.config.use_cache = False
    return model


def torch_index(device: str) -> int | None:
    """N of 'cuda:N'; None for other devices."""
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else None


def _trainable_token_indices(model, tokenizer, added_tokens: list[str]) -> dict[str, list[int]] | None:
    """peft's `trainable_token_indices` for the tokens the chat template added (a model that had
    no template gets ChatML's): only their rows of the input embeddings train, and of the
    output layer too unless it is tied to them (peft then ties the two). Training full copies
    of both matrices instead (`modules_to_save`) would add ~1 B trainable parameters to an 8B
    model with a 128k vocabulary; these rows are 2 x hidden each. None when nothing was added."""
    if not added_tokens:
        return None
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(added_tokens)]
    names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    embed, out = model.get_input_embeddings(), model.get_output_embeddings()
    targets = {names[embed]: ids}
    tied = out is None or out.weight is embed.weight
    if not tied:
        targets[names[out]] = ids
    return targets


def keep_4bit_weights_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference in the middle of training.

    bitsandbytes 0.50, on a CPU with AVX512-BF16, repacks a Linear4bit's weight into an
    inference-only layout the first time the layer runs in eval mode without gradients (a sample
    generation, an evaluation), for good; from then on its matmul bypasses autograd, so the
    gradients that should flow through the frozen base weights to the LoRA layers below are
    lost, silently (measured on a tiny Llama: the first layer's LoRA gradient off by 80% after
    one eval forward), and training goes on the slower kernel too. Returns the layers changed."""
    import bitsandbytes as bnb

    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _trainable_weights_in_float32(model) -> int:
    """Keep the trained weights (LoRA, token rows) in float32 over a 4-bit base, as peft keeps
    them over any other base. trl 1.16's SFTTrainer casts them to bfloat16 for a quantised model
    (after the QLoRA paper); but a resumed run reloads them through peft's `load_adapter`, which
    casts them back to float32, so the resumed steps drifted from the uninterrupted run's (2e-3
    in the loss after 2 steps on the built-in model), and updates smaller than bfloat16 can hold
    are lost. The memory estimate counts 4 bytes for each. Returns the tensors cast."""
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def _expose_bias_of_token_wrappers(model) -> None:
    """trl's fused LM head reads `lm_head.weight` and `lm_head.bias` off the output layer. Where
    peft trains token rows of that layer (`trainable_token_indices`), the layer is a
    TrainableTokensWrapper, whose `weight` is the base weight with the trained rows merged in
    (differentiable, as the fused head needs) but which answers only `weight` of its wrapped
    layer's attributes (peft 0.21), so reading `bias` raised AttributeError. Give each wrapper
    its layer's bias (None for every model localtune knows)."""
    from peft.utils.other import TrainableTokensWrapper

    for m in model.modules():
        if isinstance(m, TrainableTokensWrapper) and "bias" not in m.__dict__:
            object.__setattr__(m, "bias", getattr(m.token_adapter.base_layer, "bias", None))


def _padding_free(backend: str, precision) -> bool:
    """Whether batches go padding-free: each micro-batch's rows laid end to end in one row,
    with position_ids restarting at every row, so no compute goes to padding (on
    `shared/bench/varied_lengths.jsonl`, padded batches of 4 hold 1.66 tokens per real one).
    On the CPU transformers' sdpa attention sees the row boundaries in the position_ids and
    masks across them (a block-diagonal mask). On CUDA only with flash-attention 2 (which
    localtune.precision allows on compute capability 8.0+, in 16 bits, when installed): sdpa
    would compute attention over the whole joined row through a mask, which costs the square
    of the joined length. Apple: padded (not measured there)."""
    if backend == "cpu":
        return True
    return backend == "cuda" and precision.attn_implementation == "flash_attention_2"


def _sample(model, tokenizer, prompt: str) -> str:
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    ids = {k: v.to(model.device) for k, v in ids.items()}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=SAMPLE_MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, use_cache=True)
    if was_training:
        model.train()
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


OOM_MESSAGES = (
    "CUDA out of memory",            # the caching allocator (torch.OutOfMemoryError's text)
    "CUDA error: out of memory",     # a raw cudaMalloc or kernel launch (torch.AcceleratorError)
    "CUBLAS_STATUS_ALLOC_FAILED",    # cuBLAS could not allocate its workspace or handle
    "CUDNN_STATUS_ALLOC_FAILED",     # cuDNN's workspace (cuDNN 8)
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "MPS backend out of memory",     # Apple's allocator
)
"""Error texts that mean the accelerator ran out of memory although they are not
torch.OutOfMemoryError: the libraries under torch report their own allocation failures as
RuntimeError (torch.AcceleratorError since torch 2.8) with their status name in the text."""


def _is_oom(e: BaseException) -> bool:
    """An out-of-memory error of the accelerator: torch's own, or one reported by cuBLAS,
    cuDNN, the CUDA runtime or Apple's MPS allocator (OOM_MESSAGES)."""
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MESSAGES)


def _backoff_knobs(knobs):
    """The knobs to retry with after running out of memory: a smaller micro-batch with the
    accumulation grown to keep the effective batch exactly (knobs.halve_micro_batch, the rule
    the planner steps down with); at a micro-batch of 1, max_length halved (not below
    MIN_BACKOFF_MAX_LENGTH). Raises UserError when neither can go lower."""
    from localtune.knobs import halve_micro_batch

    smaller = halve_micro_batch(knobs)
    if smaller is not None:
        return smaller
    if knobs.max_length > MIN_BACKOFF_MAX_LENGTH:
        return knobs.replace(max_length=max(MIN_BACKOFF_MAX_LENGTH, knobs.max_length // 2))
    fixes = ["a smaller model"]
    if not knobs.load_in_4bit:
        fixes.append("4-bit loading (--set load_in_4bit=true)")
    fixes.append(f"a shorter max_length (--set max_length=N, now {knobs.max_length})")
    raise UserError(f"out of memory even with a micro-batch of 1 and max_length {knobs.max_length}: "
                    f"train with {', or '.join(fixes)}")


class DiskFull(UserError):
    """The disk filled up while the worker wrote a checkpoint or the adapter."""


def checkpoint_problem(ck: Path) -> str | None:
    """What makes checkpoint folder `ck` unusable for resume (a file missing, truncated or
    corrupt), or None when every file reads back. The torch files are zip archives, checked
    member by member against their CRCs; the adapter's tensors are read in full."""
    import zipfile

    from safetensors import safe_open

    try:
        state = json.loads((ck / "trainer_state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (ValueError, UnicodeDecodeError):
        return "trainer_state.json is not valid JSON"
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json has no global_step"
    weights = ck / "adapter_model.safetensors"
    if not weights.is_file():
        return "adapter_model.safetensors is missing"
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        return f"adapter_model.safetensors is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        p = ck / name
        if not p.is_file():
            return f"{name} is missing"
        try:
            with zipfile.ZipFile(p) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError):
            return f"{name} is truncated or corrupt"
        if bad is not None:
            return f"{name} is corrupt (member {bad})"
    return None


def newest_usable_checkpoint(run: RunDir) -> Path | None:
    """The newest complete checkpoint that reads back. Each newer one that does not is moved
    aside to `checkpoint-N.corrupt` (kept for a person to look at, never picked again) with a
    `warning` event."""
    for ck in reversed(run.complete_checkpoints()):
        problem = checkpoint_problem(ck)
        if problem is None:
            return ck
        aside = ck.with_name(f"{ck.name}.corrupt")
        n = 1
        while aside.exists():
            n += 1
            aside = ck.with_name(f"{ck.name}.corrupt{n}")
        os.replace(ck, aside)
        before = [c.name for c in run.complete_checkpoints()]
        msg = (f"{ck.name} cannot be read ({problem}); moved it to checkpoints/{aside.name} and "
               f"resuming from {before[-1] if before else 'the start'}")
        print(f"localtune worker: {msg}", file=sys.stderr, flush=True)
        append_event(run.events_path, "warning", message=msg)
    return None


class ThermalGuard(TrainerCallback):
    """Between optimizer steps, wait while the GPU is hotter than `limit_c`: a `thermal_pause`
    event, a reading every `poll_s`, and a `thermal_resume` event once it is
    THERMAL_HYSTERESIS_C below the limit (or a stop is requested). `read_temp` returns degrees
    C, or None where it cannot tell (then training goes on)."""

    def __init__(self, limit_c: float, read_temp, events_path: Path, stop: _StopRequest, *,
                 sleep=time.sleep, poll_s: float = THERMAL_POLL_S) -> None:
        self.limit_c, self.read_temp, self.events_path, self.stop = limit_c, read_temp, events_path, stop
        self.sleep, self.poll_s = sleep, poll_s
        self.paused_total_s = 0.0

    def on_step_end(self, args, state, control, **kw):
        self.wait(state.global_step)

    def wait(self, step: int) -> float:
        """Pause while hot; return the seconds paused."""
        temp = self.read_temp()
        if temp is None or temp <= self.limit_c:
            return 0.0
        append_event(self.events_path, "thermal_pause", step=step, temperature_c=temp, max_gpu_temp_c=self.limit_c)
        start = time.monotonic()
        while not self.stop.requested:
            self.sleep(self.poll_s)
            temp = self.read_temp()
            if temp is None or temp <= self.limit_c - THERMAL_HYSTERESIS_C:
                break
        paused = time.monotonic() - start
        self.paused_total_s += paused
        append_event(self.events_path, "thermal_resume", step=step, temperature_c=temp, paused_s=round(paused, 1))
        return paused


def thermal_guard_for(max_gpu_temp: float | None, backend: str, hardware, events_path: Path,
                      stop: _StopRequest) -> ThermalGuard | None:
    """The ThermalGuard for a run's `max_gpu_temp`, reading the training GPU (the plan's first
    device) through NVML; None without a limit or off CUDA (nothing to read there)."""
    if not max_gpu_temp or backend != "cuda":
        return None
    from localtune.hardware import sample_devices

    def read_temp() -> float | None:
        try:
            return sample_devices(hardware)[0].temperature_c
        except Exception:  # noqa: BLE001 - a failed reading must not stop training
            return None

    return ThermalGuard(float(max_gpu_temp), read_temp, events_path, stop)


class SaveByClock(TrainerCallback):
    """Ask for a checkpoint when `minutes` have passed since the last one (0: never)."""

    def __init__(self, minutes: float, clock=time.monotonic) -> None:
        self.every_s, self.clock = minutes * 60.0, clock
        self.last = clock()

    def on_train_begin(self, args, state, control, **kw):
        self.last = self.clock()

    def on_step_end(self, args, state, control, **kw):
        if self.every_s > 0 and self.clock() - self.last >= self.every_s:
            control.should_save = True

    def on_save(self, args, state, control, **kw):
        self.last = self.clock()


def _peak_memory_bytes(device: str) -> int:
    """torch.cuda.max_memory_allocated of the training GPU on CUDA; this process's peak RSS
    elsewhere."""
    import resource

    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _write_knobs(run: RunDir, knobs) -> None:
    """Replace config.toml's [knobs] with `knobs`, so a later resume uses them."""
    cfg = run.read_config()
    cfg["knobs"] = knobs.to_dict()
    run.write_config(cfg)


def _free_memory(backend: str) -> None:
    import torch

    gc.collect()
    if backend == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the current device: the plan's (_use_device)
    elif backend == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


def _hardware_event(run: RunDir, backend: str, hw, device: str) -> None:
    """Memory, utilisation, temperature and power of the training device now. `hw` is the
    launch probe: sampling re-reads only the live fields (a full probe per logged step would be
    work on the hot path); its first device is the plan's, `device`."""
    import psutil

    vm = psutil.virtual_memory()
    fields: dict[str, Any] = {"cpu_pct": psutil.cpu_percent(), "ram_used_bytes": vm.total - vm.available,
                              "utilization_pct": None, "temperature_c": None, "power_w": None}
    if backend == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        fields.update(memory_used_bytes=total - free, memory_total_bytes=total)
        try:
            from localtune.hardware import sample_devices

            d = sample_devices(hw)[0]
            fields.update(utilization_pct=d.utilization_pct, temperature_c=d.temperature_c, power_w=d.power_w)
        except Exception:  # noqa: BLE001 - live readings are optional
            pass
    else:
        fields.update(memory_used_bytes=psutil.Process().memory_info().rss, memory_total_bytes=vm.total)
    append_event(run.events_path, "hardware", **fields)


def train(run: RunDir, stop: _StopRequest) -> None:
    """Train the run to the end (or to a stop). Takes minutes to hours."""
    import json

    from trl import SFTConfig, SFTTrainer

    from localtune.data import chat_template_for, load_data, split_eval, tokenize
    from localtune.knobs import knobs_from_mapping
    from localtune.models import load_tokenizer, resolve_model, weights_location

    cfg = run.read_config()
    rcfg = cfg["run"]
    plan = json.loads(run.plan_path.read_text())
    knobs = knobs_from_mapping(cfg["knobs"], str(run.config_path))
    backend = plan["hardware"]["backend"]
    from localtune.hardware import Hardware

    hardware = Hardware.from_dict(plan["hardware"])  # what the launch probe found
    device = _device_of(backend, plan)
    _use_device(device)
    _cap_cuda_memory(device)  # benchmark-only; nothing unless LOCALTUNE_CUDA_MEMORY_CAP_GB is set
    from localtune.precision import DeviceFacts, precision_for

    # the live device's own facts (its compute capability, the running macOS), not the probe's
    precision = precision_for(knobs, DeviceFacts.live(backend, torch_index(device)))
    trust = bool(rcfg.get("trust_remote_code", False))

    model_ref = resolve_model(rcfg["model"], trust_remote_code=trust)
    model_path = weights_location(model_ref, log=lambda m: append_event(run.events_path, "warning", message=m))
    tokenizer = load_tokenizer(model_ref)
    template = chat_template_for(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    loaded = load_data(rcfg["data"], format=rcfg.get("format") or None, skip_bad_rows=bool(rcfg.get("skip_bad_rows")))
    train_rows, eval_rows = loaded.examples, []
    if rcfg.get("eval_data"):
        eval_rows = load_data(rcfg["eval_data"], format=rcfg.get("format") or None,
                              skip_bad_rows=bool(rcfg.get("skip_bad_rows"))).examples
    elif float(rcfg.get("eval_split", 0) or 0) > 0:
        train_rows, eval_rows = split_eval(loaded.examples, float(rcfg["eval_split"]), knobs.seed)
    train_on_inputs = bool(rcfg.get("train_on_inputs", False))
    # what the data and the template were, so that chat and export render exactly as training did
    atomic_write_json(run.path / "data.json", {**loaded.summary(), "train_rows": len(train_rows),
                                               "eval_rows": len(eval_rows), "train_on_inputs": train_on_inputs,
                                               "chat_template": template.to_dict()})
    padding_free = _padding_free(backend, precision) and not knobs.packing
    full_train = tokenize(train_rows, tokenizer, template, train_on_inputs=train_on_inputs).remove_columns("length")
    full_eval = (tokenize(eval_rows, tokenizer, template, train_on_inputs=train_on_inputs).remove_columns("length")
                 if eval_rows else None)

    def truncated(ds, n: int):
        """Padding-free, trl leaves truncation to us (rows left with nothing to learn it drops)."""
        if ds is None or not padding_free:
            return ds
        return ds.map(lambda b: {k: [v[:n] for v in b[k]] for k in ("input_ids", "assistant_masks")},
                      batched=True, desc="Truncating")

    from peft import LoraConfig

    targets = "all-linear" if "all-linear" in knobs.target_modules else list(knobs.target_modules)

    def peft_config_for(model) -> LoraConfig:
        return LoraConfig(r=knobs.r, lora_alpha=knobs.lora_alpha, lora_dropout=knobs.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM",
                          trainable_token_indices=_trainable_token_indices(model, tokenizer, template.added_tokens))

    partial = run.checkpoints_dir / ".partial"

    def sft_config(knobs) -> SFTConfig:
        return SFTConfig(
            output_dir=str(partial),
            per_device_train_batch_size=knobs.per_device_train_batch_size,
            per_device_eval_batch_size=knobs.per_device_train_batch_size,
            gradient_accumulation_steps=knobs.gradient_accumulation_steps,
            learning_rate=knobs.learning_rate,
            lr_scheduler_type=knobs.lr_scheduler_type,
            warmup_steps=knobs.warmup_steps,
            num_train_epochs=knobs.num_train_epochs,
            max_steps=knobs.max_steps,
            optim=knobs.optim,
            activation_checkpointing=knobs.gradient_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False} if knobs.gradient_checkpointing else None,
            max_length=None if padding_free else knobs.max_length,  # padding-free: truncated above
            packing=knobs.packing,
            padding_free=padding_free,
            logging_steps=knobs.logging_steps,
            save_strategy="steps",
            save_steps=knobs.save_steps,
            save_total_limit=None,  # rotation happens in checkpoints/, after the rename
            eval_strategy="steps" if full_eval is not None else "no",
            eval_steps=knobs.eval_steps,
            seed=knobs.seed,
            data_seed=knobs.seed,
            bf16=precision.trainer_bf16,
            fp16=precision.trainer_fp16,
            use_cpu=backend == "cpu",
            report_to="none",
            include_num_input_tokens_seen="non_padding",
            dataloader_num_workers=0,
            disable_tqdm=True,
            save_only_model=False,
        )
    sample_prompt = rcfg.get("sample_prompt") or "What is the capital of Italy?"
    sample_steps = int(rcfg.get("sample_steps") or knobs.eval_steps)
    final_dir = run.checkpoints_dir

    class LocaltuneTrainer(SFTTrainer):
        def _save_checkpoint(self, model, trial):
            name = f"checkpoint-{self.state.global_step}"
            try:
                super()._save_checkpoint(model, trial)
                if os.environ.get(FAULT_ENOSPC_IN_CHECKPOINT_ENV) == str(self.state.global_step):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial / name / "optimizer.pt"))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                shutil.rmtree(partial, ignore_errors=True)  # no half checkpoint; and the space back
                last = run.complete_checkpoints()
                raise DiskFull(
                    f"the disk is full: writing {name} failed ({e.filename or final_dir}); "
                    f"{'the checkpoints before it are intact (newest: ' + last[-1].name + ')' if last else 'no checkpoint was lost'}; "
                    f"free some space, then `localtune resume {run.id}`") from e
            if os.environ.get(FAULT_KILL_IN_CHECKPOINT_ENV) == str(self.state.global_step):
                os._exit(137)  # test-only: die with the checkpoint written but not yet renamed
            src, dst = partial / name, final_dir / name
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(src, dst)  # complete: only now can resume see it
            for old in run.complete_checkpoints()[:-knobs.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
            run.write_status(last_checkpoint=name, step=self.state.global_step)
            append_event(run.events_path, "checkpoint", step=self.state.global_step, path=str(dst))

    class Events(TrainerCallback):
        def __init__(self) -> None:
            self.t_last = time.time()
            self.tokens_last = 0
            self.paused_last = sum(getattr(c, "paused_total_s", 0.0) for c in extra_callbacks)
            self.elapsed_before = elapsed_before  # training time of the attempts before a resume

        def on_train_begin(self, args, state, control, **kw):
            self.t_last = time.time()
            self.tokens_last = state.num_input_tokens_seen
            run.write_status(state="running", pid=os.getpid(), max_steps=state.max_steps, step=state.global_step,
                             error=None)
            append_event(run.events_path, "started", pid=os.getpid(), resumed_from=resume.name if resume else None,
                         max_steps=state.max_steps, device=device, precision=precision.describe(),
                         padding_free=padding_free or knobs.packing)

        def on_step_end(self, args, state, control, **kw):
            if stop.requested:
                append_event(run.events_path, "stopping", reason=stop.reason)
                run.write_status(state="stopping")
                control.should_save = True
                control.should_training_stop = True
            elif sample_steps and state.global_step % sample_steps == 0:
                append_event(run.events_path, "sample", step=state.global_step, prompt=sample_prompt,
                             text=_sample(kw["model"], tokenizer, sample_prompt))

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" in logs:
                now = time.time()
                tokens = state.num_input_tokens_seen
                paused = sum(getattr(c, "paused_total_s", 0.0) for c in extra_callbacks)  # a thermal pause
                rate = (tokens - self.tokens_last) / max(now - self.t_last - (paused - self.paused_last), 1e-9)
                self.t_last, self.tokens_last, self.paused_last = now, tokens, paused
                append_event(run.events_path, "step", step=state.global_step, max_steps=state.max_steps,
                             epoch=state.epoch, loss=logs["loss"], learning_rate=logs.get("learning_rate"),
                             grad_norm=logs.get("grad_norm"), tokens_per_s=round(rate, 1),
                             elapsed_s=round(self.elapsed_before + now - started_at, 1))
                run.write_status(step=state.global_step, loss=logs["loss"])
                _hardware_event(run, backend, hardware, device)
            if "eval_loss" in logs:
                append_event(run.events_path, "eval", step=state.global_step, eval_loss=logs["eval_loss"])

    class InjectOom(TrainerCallback):
        """Test-only (LOCALTUNE_FAULT_OOM_AT_STEP): out of memory at the start of step N, once."""

        def __init__(self, at_step: int) -> None:
            self.at_step, self.fired = at_step, False

        def on_step_begin(self, args, state, control, **kw):
            if not self.fired and state.global_step + 1 == self.at_step:
                import torch

                self.fired = True
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_OOM_AT_STEP_ENV})")

    fault_oom = os.environ.get(FAULT_OOM_AT_STEP_ENV)
    extra_callbacks: list[TrainerCallback] = [SaveByClock(knobs.save_minutes)]
    if fault_oom:
        extra_callbacks.append(InjectOom(int(fault_oom)))  # one instance: fires once per process
    guard = thermal_guard_for(rcfg.get("max_gpu_temp"), backend, hardware, run.events_path, stop)
    if guard is not None:  # first in the list: a stop asked for during a pause is seen at the end of that step
        extra_callbacks.insert(0, guard)

    while True:  # one attempt per pass; running out of memory backs off and goes round again
        shutil.rmtree(partial, ignore_errors=True)  # whatever a crash left there is incomplete
        model = _load_model(model_path, knobs, precision, device, trust)
        if template.added_tokens:
            model.resize_token_embeddings(len(tokenizer))
        resume = newest_usable_checkpoint(run)
        elapsed_before = 0.0
        if resume is not None:  # `elapsed_s` counts the attempts before a resume too: it goes on
            resume_step = int(resume.name.rsplit("-", 1)[1])  # from the last step the checkpoint holds
            done = [e for e in read_events(run.events_path)
                    if e.get("kind") == "step" and e.get("step", 0) <= resume_step]
            elapsed_before = float(done[-1].get("elapsed_s") or 0.0) if done else 0.0
        trainer = LocaltuneTrainer(model=model, args=sft_config(knobs),
                                   train_dataset=truncated(full_train, knobs.max_length),
                                   eval_dataset=truncated(full_eval, knobs.max_length),
                                   processing_class=tokenizer, peft_config=peft_config_for(model),
                                   callbacks=[*extra_callbacks, Events()])
        _expose_bias_of_token_wrappers(trainer.model)
        _trainable_weights_in_float32(trainer.model)
        started_at = time.time()
        try:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            break
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; the rest goes on up
            if not _is_oom(e):
                raise
            oom_step = trainer.state.global_step + 1  # the optimizer step under way
        # out of the except block, so the traceback (which holds the training frames) is gone too
        trainer.accelerator.free_memory()
        trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
        del trainer, model
        _free_memory(backend)
        before, knobs = knobs, _backoff_knobs(knobs)  # UserError when nothing is left to shrink
        _write_knobs(run, knobs)
        newest = run.complete_checkpoints()
        back_to = newest[-1].name if newest else None
        append_event(run.events_path, "oom_backoff", step=oom_step,
                     per_device_train_batch_size=knobs.per_device_train_batch_size,
                     gradient_accumulation_steps=knobs.gradient_accumulation_steps,
                     max_length=knobs.max_length, resume_from=back_to)
        note = (f"out of memory at step {oom_step}: micro-batch {before.per_device_train_batch_size} x "
                f"{before.gradient_accumulation_steps} -> {knobs.per_device_train_batch_size} x "
                f"{knobs.gradient_accumulation_steps}, max_length {before.max_length} -> {knobs.max_length}; "
                f"going back to {back_to or 'the start'}")
        print(f"localtune worker: {note}", file=sys.stderr, flush=True)
        run.write_status(notes=[*run.read_status().get("notes", []), note])
    shutil.rmtree(partial, ignore_errors=True)  # only trl's model card (README.md) is left there
    step = trainer.state.global_step
    if stop.requested:
        last = run.complete_checkpoints()
        run.write_status(state="stopped", step=step, pid=None)
        append_event(run.events_path, "stopped", step=step, checkpoint=last[-1].name if last else None)
        return
    tmp = run.path / ".adapter.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if run.adapter_dir.exists():
        shutil.rmtree(run.adapter_dir)
    os.replace(tmp, run.adapter_dir)
    elapsed = elapsed_before + time.time() - started_at
    run.write_status(state="completed", step=step, pid=None, adapter=str(run.adapter_dir))
    append_event(run.events_path, "finished", step=step, adapter=str(run.adapter_dir),
                 train_loss=getattr(result, "training_loss", None), elapsed_s=round(elapsed, 1),
                 tokens=int(trainer.state.num_input_tokens_seen), peak_memory_bytes=_peak_memory_bytes(device))


def _take_run(run: RunDir) -> None:
    """Hold the run's lock: the one the launcher took and handed over (LOCK_FD_ENV names the
    inherited descriptor), or, for a worker started by hand, a fresh one (UserError when
    another process holds it). From here on the run is this worker's: the launcher's mark
    (`launched`, which makes a worker lost before this point show as failed) goes."""
    fd = os.environ.pop(LOCK_FD_ENV, None)  # not for the processes this one starts
    if fd is not None:
        run.adopt_lock(int(fd))
    else:
        run.acquire_lock()
    if run.read_status().get("launched"):
        run.write_status(launched=None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m localtune.worker RUN_DIR", file=sys.stderr)
        return 2
    run = RunDir(Path(argv[0]).resolve())
    stop = _StopRequest()
    signal.signal(signal.SIGTERM, stop)
    try:
        _take_run(run)
    except UserError as e:
        print(f"localtune worker: {e}", file=sys.stderr)
        return 1
    try:
        notify = bool(run.read_config()["run"].get("notify"))
    except Exception:  # noqa: BLE001 - a broken config fails in train(), with its message
        notify = False
    try:
        train(run, stop)
        if notify and run.read_status().get("state") == "completed":
            status = run.read_status()
            loss = status.get("loss")
            desktop_notify(f"localtune: run {run.id} finished",
                           f"{status.get('step')} steps" + (f", loss {loss:.4g}" if isinstance(loss, float) else "")
                           + f"; adapter in {run.adapter_dir}")
        return 0
    except BaseException as e:  # noqa: BLE001 - every failure must reach the status and the log
        traceback.print_exc()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            msg = (f"the disk is full ({e.filename or run.path}); free some space, then "
                   f"`localtune resume {run.id}`")
        elif not isinstance(e, UserError):
            msg = f"{type(e).__name__}: {msg}"
        run.write_status(state="failed", error=msg, pid=None)
        append_event(run.events_path, "failed", error=msg, log=str(run.log_path))
        if notify:
            desktop_notify(f"localtune: run {run.id} failed", msg)
        return 1
    finally:
        run.release_lock()


if __name__ == "__main__":
    raise SystemExit(main())
