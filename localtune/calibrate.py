"""Calibration: the plan's memory estimate held against the user's own device before training.

    python -m localtune.calibrate RUN_DIR        # prints one JSON line: what was measured

The worker runs this before step 1 of a fresh run (`calibrate` knob, on by default), and
`localtune plan --calibrate` runs it on a throw-away run folder. It is a separate process on
purpose: it loads the model as the worker will, builds the run's trainer (the method's, with
its LoRA config and optimizer), takes CALIBRATION_STEPS optimizer step(s) of one micro-batch
on rows of exactly `max_length` tokens (the estimate's worst case: the longest rows, padded to
max_length where the data's are shorter; random token ids, since memory does not depend on
them), measures the peak, and exits. The run itself is untouched: its weights, optimizer and
random state are what they would have been without calibration, because they are another
process's. It costs a second model load (seconds for the built-in model, ~a minute for an 8B
one).

The peak, by device:

- CUDA: `torch.cuda.max_memory_reserved` (what torch's caching allocator held at its
  highest) plus what the process holds outside it (the CUDA context, cuBLAS workspaces), read
  through NVML as the process's GPU memory minus torch's reserved memory at the end;
- Apple (MPS): `torch.mps.driver_allocated_memory()`, sampled after loading and after each
  step (Metal's allocator keeps what it took, so the largest sample is the peak);
- the CPU: the process's peak resident size (`getrusage`), everything included, with the
  worker's allocator setting (MALLOC_MMAP_THRESHOLD_, see launch.start_worker).

Where the parts can be told apart it records them too: the runtime before the model is loaded
(against the estimate's overhead), the weights counted tensor by tensor (against its weights),
and the rest of the peak (against adapter + activations + logits + fragmentation). `decide` turns a measurement into the worker's action:
over the budget, the knobs step down (the back-off's rule: a smaller micro-batch with the
accumulation grown, then a shorter max_length) until the measured figure, scaled, fits; far
under it, a larger micro-batch that would fit is named (and taken with `auto_batch`, the
effective batch kept). A measured step that itself runs out of memory is a measurement too:
the worker backs the knobs off by the same rule and measures again, instead of failing the run.

Runs on the torch engine calibrate (sft, dpo and orpo: for a preference method the rows are
pairs whose chosen and rejected sequences both reach max_length), and so do MLX runs (sft):
there the peak is the process's memory before loading plus MLX's own peak
(`mx.get_peak_memory`, which counts every array MLX allocated: on a Mac, in the unified memory
the Metal GPU uses; with `mlx[cpu]`, on the CPU).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CALIBRATION_STEPS = 1
"""Optimizer steps measured. The first step's peak (the backward pass: activations and
gradients) comes before AdamW allocates its state, which every later step holds through its
own peak: the state's bytes, counted from the optimizer, are added to the measured peak.
(Two steps would measure it directly, at twice the time.)"""
FAULT_OOM_ENV = "LOCALTUNE_FAULT_CALIBRATION_OOM_OVER"
"""Test-only: with N here, calibration runs out of memory (torch's error, injected) at every
micro-batch above N, as a card too small for the plan would."""
FAR_UNDER = 0.6
"""Measured below this share of the budget: say what larger micro-batch would fit."""


@dataclass
class Measurement:
    """What one calibration measured, in bytes."""

    peak_bytes: int
    how: str
    """How the peak was read, in words."""
    before_load_bytes: int
    """The process's memory before the model was loaded (Python, torch, transformers
    imported), same measure (on the CPU: the resident size)."""
    weights_bytes: int
    """The loaded model's parameters and buffers, counted tensor by tensor."""
    optimizer_bytes: int
    """The optimizer's state after the step(s), counted tensor by tensor."""
    seconds: float
    micro_batch: int
    max_length: int
    tokens: int
    """Tokens per micro-batch measured (both sequences of a pair counted)."""
    parts: dict[str, int] = field(default_factory=dict)
    out_of_memory: bool = False
    """The step ran out of memory: the peak is unknown, only that it is over what the device has."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def supported(knobs) -> str | None:
    """None when a run with `knobs` can be calibrated; else why not, in words. (Both engines
    measure: torch for sft, dpo and orpo, MLX for sft, the one method it trains.)"""
    if knobs.engine not in ("torch", "mlx"):
        return f"calibration does not know the {knobs.engine} engine"
    return None


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _peak_rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


class _Meter:
    """The device's memory as calibration reads it (see the module docstring)."""

    def __init__(self, backend: str, device: str) -> None:
        self.backend, self.device = backend, device
        self.samples: list[int] = []

    def now(self) -> int:
        import torch

        if self.backend == "cuda":
            return int(torch.cuda.memory_reserved(torch.device(self.device)))
        if self.backend == "mps":
            v = int(torch.mps.driver_allocated_memory())
            self.samples.append(v)
            return v
        return _rss()

    def peak(self) -> tuple[int, str]:
        import torch

        if self.backend == "cuda":
            dev = torch.device(self.device)
            reserved = int(torch.cuda.max_memory_reserved(dev))
            outside = max(0, _nvml_process_bytes(dev.index or 0) - int(torch.cuda.memory_reserved(dev)))
            return reserved + outside, "torch.cuda.max_memory_reserved + the process's memory outside torch (NVML)"
        if self.backend == "mps":
            self.now()
            return max(self.samples), "torch.mps.driver_allocated_memory, the largest sample"
        return _peak_rss(), "the process's peak resident size"


def _nvml_process_bytes(torch_index: int) -> int:
    """This process's memory on the GPU torch calls `torch_index`, through NVML (0 when NVML
    cannot say: the CUDA context is then left out of the figure)."""
    try:
        import pynvml as nv

        nv.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        index = int(visible.split(",")[torch_index]) if visible and visible.split(",")[0].isdigit() else torch_index
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        for p in nv.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == os.getpid() and p.usedGpuMemory:
                return int(p.usedGpuMemory)
    except Exception:  # noqa: BLE001 - no NVML, or a driver that hides per-process figures
        pass
    return 0


def worst_case_rows(vocab: int, length: int, count: int, seed: int = 0):
    """`count` rows of exactly `length` random token ids, every token trained: what the
    estimate assumes (a micro-batch of rows at max_length)."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    rows = [{"input_ids": [rng.randrange(3, vocab) for _ in range(length)], "assistant_masks": [1] * length}
            for _ in range(count)]
    return Dataset.from_list(rows)


def worst_case_pairs(length: int, count: int):
    """`count` preference pairs whose chosen and rejected sequences both run past `length`
    tokens (a short prompt, answers of `length` words: one token each in a BPE or
    sentencepiece vocabulary), so trl cuts both to max_length: the estimate's worst case."""
    from datasets import Dataset

    prompt = " ".join(["Tell"] + ["me"] * max(1, length // 8)) + "."
    return Dataset.from_list([{"prompt": prompt, "chosen": " yes" * length, "rejected": " no" * length}
                              for _ in range(count)])


def measure(run_path: Path) -> Measurement:
    """Load the run's model, build its trainer and take CALIBRATION_STEPS steps on worst-case
    rows (see the module docstring). Minutes at most; in this process."""
    from localtune.knobs import knobs_from_mapping
    from localtune.loading import load_base_model, settle_trainable_weights
    from localtune.methods import get_method
    from localtune.methods.sft import SFTData
    from localtune.runs import RunDir
    from localtune.worker import _setup

    t0 = time.monotonic()
    run = RunDir(run_path)
    knobs = knobs_from_mapping(run.read_config()["knobs"], str(run.config_path))
    steps = knobs.replace(max_steps=CALIBRATION_STEPS, gradient_accumulation_steps=1, save_steps=10**9,
                          eval_steps=10**9, logging_steps=10**9, warmup_steps=0)
    setup, _, model_path, trust = _setup(run, knobs)
    if knobs.engine == "mlx":
        return _measure_mlx(setup, knobs, model_path, t0)
    meter = _Meter(setup.backend, setup.device)
    before = meter.now()
    model = load_base_model(model_path, knobs, setup.precision, setup.device, trust)
    if setup.template.added_tokens:
        model.resize_token_embeddings(len(setup.tokenizer))
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    count = knobs.per_device_train_batch_size * CALIBRATION_STEPS
    method = get_method(knobs.method)
    with tempfile.TemporaryDirectory(prefix="localtune-calibrate-") as tmp:
        setup.partial = Path(tmp)  # the trainer's output_dir: never the run's checkpoints
        if knobs.method == "sft":
            data = SFTData(train=worst_case_rows(len(setup.tokenizer), knobs.max_length, count, knobs.seed),
                           eval=None, padding_free=method.padding_free(setup, knobs))
        else:  # dpo, orpo: pairs of two sequences at max_length
            from localtune.methods.dpo import PreferenceData

            data = PreferenceData(train=worst_case_pairs(knobs.max_length, count), eval=None)
        cls, kwargs = method.trainer(setup, data, model, steps, [])
        trainer = cls(**kwargs)
        settle_trainable_weights(trainer.model)
        oom, opt_bytes = False, 0
        try:
            fault = os.environ.get(FAULT_OOM_ENV)
            if fault and knobs.per_device_train_batch_size > int(fault):
                import torch

                raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_OOM_ENV})")
            trainer.train()
        except Exception as e:  # noqa: BLE001 - out of memory is a measurement; the rest goes on up
            from localtune.worker import _is_oom

            if not _is_oom(e):
                raise
            oom = True
        meter.now()
        if not oom:
            state = [t for s in trainer.optimizer.state.values() for t in s.values() if hasattr(t, "element_size")]
            opt_bytes = sum(t.numel() * t.element_size() for t in state)
    peak, how = meter.peak()
    peak += opt_bytes
    return Measurement(peak_bytes=peak, how=f"{how}, + the optimizer's state", before_load_bytes=before,
                       weights_bytes=weights, optimizer_bytes=opt_bytes, seconds=round(time.monotonic() - t0, 1),
                       micro_batch=knobs.per_device_train_batch_size, max_length=knobs.max_length,
                       tokens=knobs.per_device_train_batch_size * knobs.max_length * (1 if knobs.method == "sft" else 2),
                       parts={"runtime": before, "weights": weights, "training": peak - before - weights},
                       out_of_memory=oom)


def _measure_mlx(setup, knobs, model_path, t0: float) -> Measurement:
    """measure() for an MLX run: the base loaded as train_mlx loads it (4-bit with MLX where the
    plan says so), LoRA put on it, CALIBRATION_STEPS AdamW step(s) of one micro-batch of rows of
    exactly max_length random ids. The peak is what the process held before loading (its
    resident size) plus MLX's own peak (`mx.get_peak_memory`: every array MLX allocated, the
    optimizer's state included, on Apple's GPU or, with mlx[cpu], the CPU)."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from localtune.engines.mlx_lora import (add_lora, add_token_rows, checkpoint_weight_names, load_base,
                                            model_folder, seeded_blocks)
    from localtune.engines.mlx_sft import _batch, compute_dtype, is_mlx_oom, loss_sum

    before = _rss()
    mx.reset_peak_memory()
    folder = model_folder(model_path)
    model = load_base(folder, knobs, compute_dtype(knobs))  # as train_mlx loads it
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    names = checkpoint_weight_names(folder)
    add_lora(model, knobs, hf_weight_names=names)
    add_token_rows(model, setup.tokenizer, setup.template.added_tokens, hf_weight_names=names)
    seeded_blocks(model, checkpoint=knobs.gradient_checkpointing)
    model.train()
    optimizer = optim.AdamW(learning_rate=knobs.learning_rate, weight_decay=0.0)
    loss_and_grad = nn.value_and_grad(model, loss_sum)
    mb = knobs.per_device_train_batch_size
    rows = worst_case_rows(len(setup.tokenizer), knobs.max_length, mb * CALIBRATION_STEPS, knobs.seed)
    oom, opt_bytes = False, 0
    try:
        fault = os.environ.get(FAULT_OOM_ENV)
        if fault and mb > int(fault):
            raise RuntimeError(f"[malloc] Unable to allocate {2**32} bytes. (injected by {FAULT_OOM_ENV})")
        for k in range(CALIBRATION_STEPS):
            part = [(r["input_ids"], r["assistant_masks"]) for r in rows.select(range(k * mb, (k + 1) * mb))]
            ids, mask = _batch(part, 0)
            loss, grads = loss_and_grad(model, ids, mask)
            optimizer.update(model, grads)
            mx.eval(loss, model.trainable_parameters(), optimizer.state)
        opt_bytes = sum(v.nbytes for _, v in tree_flatten(optimizer.state) if hasattr(v, "nbytes"))
    except RuntimeError as e:
        if not is_mlx_oom(e):
            raise
        oom = True
    peak = before + int(mx.get_peak_memory())
    return Measurement(peak_bytes=peak, how="the process before loading + MLX's peak memory (mx.get_peak_memory)",
                       before_load_bytes=before, weights_bytes=weights, optimizer_bytes=opt_bytes,
                       seconds=round(time.monotonic() - t0, 1), micro_batch=mb, max_length=knobs.max_length,
                       tokens=mb * knobs.max_length,
                       parts={"runtime": before, "weights": weights, "training": peak - before - weights},
                       out_of_memory=oom)


def run_measurement(run_path: Path, env: dict[str, str] | None = None, timeout: float | None = None) -> Measurement:
    """`measure` in a child process (`python -m localtune.calibrate RUN_DIR`), with the
    worker's environment; its log lines go to the run's worker.log."""
    import subprocess

    from localtune.errors import UserError

    full = dict(os.environ if env is None else env)
    full.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 << 20))  # as launch.start_worker sets it for the worker
    full.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = Path(run_path) / "worker.log"
    with open(log, "ab") as err:
        proc = subprocess.run([sys.executable, "-m", "localtune.calibrate", str(run_path)], env=full,
                              stdout=subprocess.PIPE, stderr=err, timeout=timeout)
    lines = [ln for ln in proc.stdout.decode("utf-8", "replace").splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise UserError(f"calibration failed (exit {proc.returncode}); see {log}, or skip it with "
                        "--set calibrate=false")
    return Measurement(**json.loads(lines[-1]))


@dataclass
class Decision:
    """What the worker does with a measurement."""

    action: str
    """kept | replanned | larger micro-batch fits | larger micro-batch taken"""
    knobs: Any
    note: str
    predicted_bytes: int


def decide(measured: Measurement, knobs, shape, facts, budget: int, estimate_bytes: int, *,
           auto_batch: bool, reference_adapter: bool = False) -> Decision:
    """From the measured peak: step the knobs down until it fits (over the budget), or name
    the largest micro-batch that would fit (far under it; taken with `auto_batch`). A
    candidate's figure is predicted from the measurement: the measured peak plus what the
    estimate says the change adds, scaled by how far the estimate was off where it was low
    (measured / estimate when above 1), so a low estimate never talks a run into less room."""
    from localtune.knobs import halve_micro_batch
    from localtune.memory import estimate

    scale = max(1.0, measured.peak_bytes / max(1, estimate_bytes))

    def predicted(k) -> int:
        e = estimate(shape, k, facts, reference_adapter=reference_adapter).total_bytes
        return int(measured.peak_bytes + (e - estimate_bytes) * scale)

    gb = 1024 ** 3
    if measured.peak_bytes > budget:
        from localtune.worker import MIN_BACKOFF_MAX_LENGTH

        k = knobs
        while predicted(k) > budget:
            smaller = halve_micro_batch(k)
            if smaller is None:
                if k.max_length <= MIN_BACKOFF_MAX_LENGTH:
                    break
                smaller = k.replace(max_length=max(MIN_BACKOFF_MAX_LENGTH, k.max_length // 2))
            k = smaller
        note = (f"measured {measured.peak_bytes / gb:.2f} GB at micro-batch {knobs.per_device_train_batch_size} x "
                f"{knobs.max_length} tokens, over the {budget / gb:.2f} GB budget (estimate {estimate_bytes / gb:.2f} GB): "
                f"micro-batch {k.per_device_train_batch_size} x {k.gradient_accumulation_steps}, max_length "
                f"{k.max_length} (predicted {predicted(k) / gb:.2f} GB)")
        return Decision("replanned", k, note, predicted(k))
    note = (f"measured {measured.peak_bytes / gb:.2f} GB of a {budget / gb:.2f} GB budget "
            f"(estimate {estimate_bytes / gb:.2f} GB, {measured.peak_bytes / max(1, estimate_bytes) - 1:+.0%})")
    if measured.peak_bytes < FAR_UNDER * budget:
        eff = knobs.effective_batch_size
        bigger = [m for m in range(knobs.per_device_train_batch_size + 1, eff + 1)
                  if eff % m == 0 and predicted(knobs.replace(per_device_train_batch_size=m,
                                                              gradient_accumulation_steps=eff // m)) <= budget]
        if bigger:
            m = bigger[-1]
            k = knobs.replace(per_device_train_batch_size=m, gradient_accumulation_steps=eff // m)
            if auto_batch:
                return Decision("larger micro-batch taken", k, f"{note}; micro-batch {m} x {eff // m} taken "
                                f"(auto_batch; predicted {predicted(k) / gb:.2f} GB)", predicted(k))
            return Decision("larger micro-batch fits", knobs, f"{note}; a micro-batch of {m} (x {eff // m}) would fit "
                            f"(predicted {predicted(k) / gb:.2f} GB): --set auto_batch=true takes it", predicted(k))
    return Decision("kept", knobs, note, measured.peak_bytes)


def record(m: Measurement, decision: Decision, estimate: dict[str, Any], budget: int, changed: dict[str, Any]) -> dict:
    """What plan.json's "calibration" holds (and `plan --calibrate --json` prints): the
    measurement, the decision, and estimate against measured for the parts that can be told
    apart (`estimate`: MemoryEstimate.to_dict())."""
    total, weights, overhead = estimate["total_bytes"], estimate["weights_bytes"], estimate["overhead_bytes"]
    return {"measured": m.to_dict(), "action": decision.action, "note": decision.note, "knobs": changed,
            "estimate_bytes": total, "budget_bytes": budget, "predicted_bytes": decision.predicted_bytes,
            "by_part": {"runtime": {"estimate": overhead, "measured": m.parts.get("runtime")},
                        "weights": {"estimate": weights, "measured": m.parts.get("weights")},
                        "training": {"estimate": total - weights - overhead, "measured": m.parts.get("training")}}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m localtune.calibrate RUN_DIR", file=sys.stderr)
        return 2
    m = measure(Path(argv[0]))
    print(json.dumps(m.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
