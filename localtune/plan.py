"""The planner: the profile that matches the machine, stepped down until the run fits.

`make_plan(hardware, model, ...)` takes the matching profile's knobs, lays the user's pinned
knobs (`--set`, `--max-seq-len`) over them, estimates peak memory (`memory.estimate`) and, while
the estimate exceeds the budget, applies the first step of this fixed list that can still
move. The order puts first what costs only speed, then what costs a little accuracy, and last
what changes what the model sees:

1. gradient checkpointing on            recompute activations (~30% more compute)
2. 4-bit base weights (NVIDIA; the      only when the 16-bit weights take over half the
   MLX engine on Apple)                 budget: then no batch size can make them fit
3. 8-bit paged AdamW (NVIDIA)           optimizer state 8 -> ~2 bytes per LoRA parameter
4. smaller micro-batch, more            the effective batch (micro-batch x accumulation) is
   gradient accumulation                exactly unchanged (knobs.halve_micro_batch), so
                                        training is the same, only slower
5. 4-bit base weights (the CPU, MLX)    bitsandbytes 4-bit on the CPU is slower than 16-bit
6. activation offloading (NVIDIA)       what the blocks save moves to the CPU's RAM (trl's
                                        activation_offloading; not ORPO): PCIe traffic each
                                        step, only while the CPU's free RAM holds it twice
7. halve max_length (not below 256)     longer rows get truncated
8. halve the LoRA rank (not below 4)    lora_alpha is halved with it, keeping the scale

With `method` dpo or orpo a row of the data is a preference pair: the micro-batch counts pairs,
each two sequences (chosen and rejected), and the estimate says what that costs (for DPO, also
a reference forward without gradients; for ORPO, the full logits). Step 4 halves the pairs
per micro-batch with the same rule, so the effective batch of pairs is unchanged; the plan
carries one note saying so (`Plan.notes`).

On Apple's MPS the torch engine never gets steps 2, 3 and 5: bitsandbytes does not run there
(profiles.BITSANDBYTES_BACKENDS), and a knob the user pins to it is refused before anything
else (`check_backend_runs`). The Apple profiles train with the MLX engine (`engine = "mlx"`),
whose 4-bit weights are MLX's own (memory.weights_bytes counts them): steps 2 and 5 turn
them on there. A run of a method the MLX engine does not have (dpo, orpo) goes to torch, and
the plan says so, unless the person pinned the engine. The dtypes, and so the bytes, come from localtune.precision with
the probed device's facts: float32 weights on a Mac before macOS 14 count 4 bytes each.

A pinned knob is never changed: its step is skipped (halving the micro-batch is also skipped
when gradient accumulation is pinned, since the effective batch would change). If the
smallest configuration still does not fit, the plan says so and what would: a smaller
model, 4-bit, shorter sequences.

The budget is the device's free memory minus a headroom of 10% of its total: the
estimate's worst measured shortfall (ESTIMATE_WORST_UNDER, 9.8%), which also leaves room for other
programs, the display and the allocator's own bookkeeping. `Plan` is the one value that
training, the TUI and `localtune plan --json` share.

Several devices (localtune.parallel: `--gpus`, `--processes`, `--nodes`). The budget is per
rank: the smallest selected card's free memory minus its headroom, or on the CPU the RAM's
budget divided by the processes (they share it). The knobs are per rank too: each rank's
Trainer gets the micro-batch and the accumulation. The mode (`Plan.parallel`):

- one device: "single".
- the CPU's `--processes N`: "ddp" (gloo) always; each process holds the whole model in its
  share of the RAM, and if it does not fit there the plan does not fit.
- NVIDIA, more than one rank: the plan is first made for one card, as above. If it fits
  without shortening max_length or halving r, "ddp": every card holds the whole model and
  trains on its own share of each batch, the fastest way to use the cards. Otherwise the
  planner also plans FSDP (QLoRA: 4-bit weights, turned on unless pinned off, stored in the
  compute dtype, bitsandbytes' `bnb_4bit_quant_storage`, so that FSDP can shard them) with
  `memory.estimate(..., shards=ranks)`: per card 1/ranks of the weights, the adapter, its
  gradients and optimizer state, plus what FSDP gathers whole (a block twice, the root unit's
  embeddings and lm_head); the activations, the logits and the overhead are not divided. The
  sharded plan steps down the same list without the 8-bit optimizer and activation offloading
  (neither documented with FSDP). "fsdp" is chosen when it fits where one card does not, or
  fits with fewer cuts of max_length and r; a tie goes to "ddp" (no gathers: faster). The
  reason says which and why, with the numbers.

The effective batch stays what one device would train with: micro-batch x accumulation x
ranks equals the profile's (and the pins') micro-batch x accumulation. The accumulation is
divided by the ranks where they divide it; otherwise a micro-batch no larger than planned and
an accumulation that give exactly the same batch; where none does (15 rows over 2 ranks), the
smallest larger batch, said in `Plan.notes`. A pinned accumulation is never changed: then
the effective batch grows with the ranks, and a note says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from localtune.engines import MLX_METHODS
from localtune.errors import UserError
from localtune.hardware import Device, GiB, Hardware
from localtune.knobs import HARDWARE_KNOBS, KNOB_FIELDS, Knobs, halve_micro_batch
from localtune.memory import MemoryEstimate, estimate
from localtune.models import ModelRef
from localtune.parallel import Parallel, Selection, select
from localtune.precision import DeviceFacts, precision_for
from localtune.profiles import (BITSANDBYTES_BACKENDS, Profile, check_backend_runs, get_profile,
                                match_profile)

MLX_4BIT = "MLX 4-bit (group size 64, with a scale and a bias per group)"
"""What the MLX engine's `load_in_4bit` is, in the planner's words (localtune.engines.mlx_lora)."""
ESTIMATE_WORST_UNDER = 0.098
"""The largest share by which the estimate has been measured under the real peak: -9.8%
(128 tokens x 8, the CPU: benchmarks/memory_accuracy_cpu.json scored against this estimate,
`memory_accuracy_cpu.py --rescore`; tests/test_memory.py holds this figure to it)."""
HEADROOM_FRAC = max(0.05, -(-round(ESTIMATE_WORST_UNDER * 1000) // 10) / 100)
"""Share of the device's total memory kept free: what the estimate can be short by (its worst
measured error, rounded up to a whole percent: 10%), and never under 5% (other programs, the
display, the allocator's own bookkeeping). A plan that fills its budget, measured that much
over its estimate, still fits in the free memory (the shortfall is a share of the estimate,
which is at most the free memory). Calibration (localtune.calibrate) then measures the run's
own peak before training."""
MIN_MAX_LENGTH = 256
PCIE_BYTES_PER_S = 20e9
"""What a PCIe 4.0 x16 link moves per second to and from pinned memory in practice (the speed
cost the planner states for activation offloading)."""
MIN_RANK = 4


@dataclass
class Adjustment:
    """One change the planner made to a knob, and why."""

    knob: str
    old: Any
    new: Any
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"knob": self.knob, "old": self.old, "new": self.new, "reason": self.reason}


@dataclass
class Plan:
    """Knobs that fit this machine, the estimate behind them, and the reasons."""

    model: ModelRef
    hardware: Hardware
    profile: Profile
    knobs: Knobs
    estimate: MemoryEstimate
    budget_bytes: int
    """Free memory on the primary device minus the headroom."""
    headroom_bytes: int
    pinned: dict[str, Any] = field(default_factory=dict)
    """Knobs the user set; the planner never changes them."""
    method_defaults: list[str] = field(default_factory=list)
    """Knobs the training method set (METHOD_DEFAULTS)."""
    adjustments: list[Adjustment] = field(default_factory=list)
    fits: bool = True
    advice: list[str] = field(default_factory=list)
    """When nothing fits: what would."""
    notes: list[str] = field(default_factory=list)
    """What the estimate counts that the knobs alone do not show (a preference method's pairs)."""
    reference_adapter: bool = False
    """DPO continuing from a trained adapter: its frozen copy is the reference."""
    parallel: Parallel = field(default_factory=Parallel)
    """Which devices train and how (single, ddp, fsdp); the knobs are per rank."""

    @property
    def backend(self) -> str:
        return self.hardware.backend

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    @property
    def effective_batch_size(self) -> int:
        """Rows per optimizer step over every rank: micro-batch x accumulation x world size."""
        return self.knobs.effective_batch_size * self.parallel.world_size

    @property
    def shards(self) -> int:
        """What the estimate divides by (memory.estimate's `shards`): the ranks under FSDP, else 1."""
        return self.parallel.world_size if self.parallel.mode == "fsdp" else 1

    @property
    def devices(self) -> list[Device]:
        """The devices one machine trains on: the selected GPUs, or the one device."""
        chosen = [d for d in self.hardware.devices if d.index is not None and d.index in self.parallel.devices]
        return chosen or [self.hardware.primary]

    @property
    def budget_device(self) -> Device:
        """The selected device whose free memory sets the budget (the smallest budget)."""
        return min(self.devices, key=lambda d: d.free_bytes - int(d.total_bytes * HEADROOM_FRAC))

    def device_facts(self) -> DeviceFacts:
        """The facts the estimate was made with: the first selected device's."""
        return DeviceFacts.from_hardware(self.hardware, self.devices[0])

    def knob_sources(self) -> dict[str, str]:
        """Where each knob's value came from, in words, for the TUI and `plan`."""
        defaults, ours = Knobs().to_dict(), self.profile.knobs.to_dict()
        out = {k: f"profile {self.profile.name}" if k in HARDWARE_KNOBS or ours[k] != defaults[k] else "default"
               for k in KNOB_FIELDS}
        for k in self.method_defaults:
            out[k] = f"{self.knobs.method} default"
        for k in self.pinned:
            out[k] = "set by you"
        for a in self.adjustments:
            out[a.knob] = f"planner: {a.reason}"
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "hardware": self.hardware.to_dict(),
            "profile": {"name": self.profile.name, "description": self.profile.description,
                        "path": str(self.profile.path)},
            "knobs": self.knobs.to_dict(),
            "pinned": dict(self.pinned),
            "estimate": self.estimate.to_dict(),
            "budget_bytes": self.budget_bytes,
            "headroom_bytes": self.headroom_bytes,
            "fits": self.fits,
            "adjustments": [a.to_dict() for a in self.adjustments],
            "advice": list(self.advice),
            "notes": list(self.notes),
            "reference_adapter": self.reference_adapter,
            "knob_sources": self.knob_sources(),
            "parallel": self.parallel.to_dict(),
        }


def hypothetical_hardware(backend: str, budget_gb: float, cards: int = 1) -> Hardware:
    """A machine that is not this one: one device of `budget_gb` GiB, all of it free (on cuda,
    `cards` such GPUs)."""
    if backend not in ("cuda", "mps", "cpu"):
        raise UserError(f"--backend must be cuda, mps or cpu, got {backend!r}")
    if not budget_gb > 0:
        raise UserError(f"--budget must be a positive number of GB, got {budget_gb:g}")
    total = int(budget_gb * GiB)
    name = {"cuda": "NVIDIA GPU", "mps": "Apple Silicon GPU", "cpu": "CPU RAM"}[backend]
    devices = [Device(name=f"{name} ({budget_gb:g} GB, planned)", total_bytes=total, free_bytes=total,
                      index=i if backend == "cuda" else None) for i in range(cards if backend == "cuda" else 1)]
    many = f"{len(devices)} GPUs of {budget_gb:g} GB" if len(devices) > 1 else f"{budget_gb:g} GB"
    return Hardware(backend=backend, devices=devices, ram_total_bytes=total, ram_available_bytes=total,
                    cpu_cores=0, notes=[f"planning for a {backend} machine with {many}, not this one"])


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s"


def _gb(n: float) -> str:
    return f"{n / GiB:.2f} GB"


def method_note(knobs: Knobs, reference_adapter: bool = False) -> str | None:
    """One line on what a preference method's micro-batch holds and costs; None for sft."""
    mb, n = knobs.per_device_train_batch_size, knobs.max_length
    pairs = f"{mb} row{'s' if mb != 1 else ''} = {2 * mb} sequences"
    if knobs.method == "dpo":
        ref = ("a frozen copy of the adapter it continues" if reference_adapter
               else "the base model with the adapter off")
        return (f"method dpo: a DPO row is two sequences (chosen and rejected, each up to {n} tokens; "
                f"{pairs} per micro-batch) plus a reference forward without gradients ({ref}), "
                "counted where it rises above the policy's own peak")
    if knobs.method == "orpo":
        return (f"method orpo: an ORPO row is two sequences (chosen and rejected, each up to {n} tokens; "
                f"{pairs} per micro-batch) and no reference model, but trl's ORPOTrainer forms the full "
                "logits of both")
    return None


METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpo": {"learning_rate": 5e-6},
    "orpo": {"learning_rate": 8e-6},
}
"""Knobs a preference method sets where the user did not: the profiles' learning rate is for SFT
(2e-4 for LoRA); preference tuning moves the model much less (Unsloth's DPO and ORPO notebooks:
5e-6 and 8e-6 with LoRA; trl's own default is 1e-6 for full fine-tuning)."""


def make_plan(hardware: Hardware, model: ModelRef, *, profile: str | Profile | None = None,
              pinned: dict[str, Any] | None = None, reference_adapter: bool = False,
              gpus: str | None = None, processes: int | None = None, nodes: int = 1) -> Plan:
    """Fit the run to the machine. Pure arithmetic on the model's shape: takes milliseconds.
    `reference_adapter`: a DPO run continues from a trained adapter (see memory.estimate).
    `gpus`, `processes`, `nodes`: which devices train (localtune.parallel.select); the knobs
    are then per rank and the mode (single, ddp, fsdp) is chosen as the module docstring says."""
    pinned = dict(pinned or {})
    sel = select(hardware, gpus=gpus, processes=processes, nodes=nodes, headroom_frac=HEADROOM_FRAC)
    smallest = min(sel.devices, key=lambda d: d.total_bytes)
    view = hardware if smallest is hardware.primary else replace(hardware, devices=[smallest])
    prof = profile if isinstance(profile, Profile) else (get_profile(profile) if profile else match_profile(view))
    knobs = prof.knobs.replace(**pinned)
    method_defaults = {k: v for k, v in METHOD_DEFAULTS.get(knobs.method, {}).items() if k not in pinned}
    knobs = knobs.replace(**method_defaults)
    adjustments: list[Adjustment] = []
    if knobs.engine == "mlx" and knobs.method not in MLX_METHODS and "engine" not in pinned:
        # the profile's engine (Apple's), not the person's: the method goes to the engine that has it
        adjustments.append(Adjustment("engine", "mlx", "torch", f"the MLX engine trains {', '.join(MLX_METHODS)} "
                                      f"only; {knobs.method} trains with torch"))
        knobs = knobs.replace(engine="torch")
    check_backend_runs(knobs, hardware.backend)  # a pinned knob the backend cannot run: refused before anything
    world = sel.world_size
    if world > 1 and knobs.engine == "mlx":
        raise UserError(f"the MLX engine trains in one process; {world} ranks need --set engine=torch")
    budget, headroom = sel.budget_bytes, sel.headroom_bytes
    backend = hardware.backend
    facts = DeviceFacts.from_hardware(hardware, sel.devices[0])

    def est_for(shards: int):
        def est(k: Knobs) -> MemoryEstimate:
            return estimate(model.shape, k, facts, reference_adapter=reference_adapter, shards=shards)
        return est

    def free(knob: str) -> bool:
        return knob not in pinned

    s_knobs, s_adj, s_est = _fit(knobs, pinned, budget, est_for(1), backend, hardware.ram_available_bytes)
    mode, shards = ("single" if world == 1 else "ddp"), 1
    chosen = (s_knobs, s_adj, s_est)
    f_plan = None
    if backend == "cuda" and world > 1 and (s_est.total_bytes > budget or _cuts(s_adj)):
        start, pre = knobs, []
        dtype = precision_for(knobs, facts).compute_dtype
        if free("load_in_4bit") and not knobs.load_in_4bit:
            pre.append(Adjustment("load_in_4bit", False, True,
                                  f"FSDP shards QLoRA's 4-bit weights, stored in {dtype} "
                                  "(bnb_4bit_quant_storage) so that FSDP can split them across the cards"))
            start = knobs.replace(load_in_4bit=True)
        f_knobs, f_adj, f_est = _fit(start, pinned, budget, est_for(world), backend,
                                     hardware.ram_available_bytes, fsdp=True)
        f_plan = (f_knobs, pre + f_adj, f_est)

        def key(e: MemoryEstimate, adj: list[Adjustment]) -> tuple:
            over = e.total_bytes > budget
            return (over, len(_cuts(adj)), e.total_bytes if over else 0)

        if key(f_est, f_plan[1]) < key(s_est, s_adj):  # ties go to DDP: no gathers, faster
            mode, shards, chosen = "fsdp", world, f_plan
    knobs, adj, current = chosen
    adjustments += adj
    notes: list[str] = []
    if world > 1:
        knobs, batch_adj, batch_notes = _split_batch(knobs, pinned, world, _ranks_text(sel))
        adjustments += batch_adj
        notes += batch_notes
        current = est_for(shards)(knobs)
    par = Parallel(mode=mode, processes=sel.processes, nodes=sel.nodes,
                   devices=[d.index for d in sel.devices] if backend == "cuda" else [],
                   reason=_reason(sel, mode, budget, current, s_knobs, s_adj, s_est, f_plan, knobs))
    note = method_note(knobs, reference_adapter)
    plan = Plan(model=model, hardware=hardware, profile=prof, knobs=knobs, estimate=current,
                method_defaults=sorted(method_defaults),
                budget_bytes=budget, headroom_bytes=headroom, pinned=pinned, adjustments=adjustments,
                fits=current.total_bytes <= budget, notes=([note] if note else []) + notes,
                reference_adapter=reference_adapter, parallel=par)
    if not plan.fits:
        plan.advice = _advice(plan)
    return plan


def _fit(knobs: Knobs, pinned: dict[str, Any], budget: int, est: Callable[[Knobs], MemoryEstimate],
         backend: str, ram_available: int, fsdp: bool = False) -> tuple[Knobs, list[Adjustment], MemoryEstimate]:
    """Step `knobs` down the module docstring's list until `est` fits `budget`: the knobs, the
    adjustments made and the last estimate. `fsdp`: the sharded plan, which skips the 8-bit
    optimizer (bitsandbytes' 8-bit state over FSDP's flattened shards is not what peft and
    bitsandbytes document; the sharded 32-bit state is small) and activation offloading (not
    run with FSDP by anyone here)."""
    adjustments: list[Adjustment] = []
    mlx = knobs.engine == "mlx"
    bnb = backend in BITSANDBYTES_BACKENDS

    def change(knob: str, new: Any, reason: str, **also: Any) -> None:
        nonlocal knobs
        adjustments.append(Adjustment(knob, getattr(knobs, knob), new, reason))
        for k, v in also.items():
            adjustments.append(Adjustment(k, getattr(knobs, k), v, f"follows {knob}"))
        knobs = knobs.replace(**{knob: new}, **also)

    def free(knob: str) -> bool:
        return knob not in pinned

    def offloading(k: Knobs, now: MemoryEstimate) -> MemoryEstimate | None:
        """The estimate with trl's activation offloading on, where it runs (torch on CUDA, not
        ORPO), saves GPU memory, and the CPU's free RAM holds what it moves there (twice over)."""
        if k.activation_offloading or k.engine != "torch" or k.method == "orpo":
            return None
        after = est(k.replace(activation_offloading=True))
        moved = after.details["offloaded_activation_bytes"]
        if after.total_bytes >= now.total_bytes or 2 * moved > ram_available:
            return None
        return after

    current = est(knobs)
    while current.total_bytes > budget:
        over = f"estimate {_gb(current.total_bytes)} > budget {_gb(budget)}"
        if free("gradient_checkpointing") and not knobs.gradient_checkpointing:
            after = est(knobs.replace(gradient_checkpointing=True))
            change("gradient_checkpointing", True,
                   f"{over}: recomputing activations saves "
                   f"{_gb(current.activations_bytes - after.activations_bytes)} for ~30% more compute")
        elif ((backend == "cuda" or mlx) and free("load_in_4bit") and not knobs.load_in_4bit
              and current.weights_bytes > budget / 2):
            after = est(knobs.replace(load_in_4bit=True))
            change("load_in_4bit", True,
                   f"{over}: the 16-bit weights ({_gb(current.weights_bytes)}) take over half the budget; "
                   f"{MLX_4BIT if mlx else '4-bit NF4'} holds them in {_gb(after.weights_bytes)}")
        elif backend == "cuda" and not fsdp and free("optim") and "8bit" not in knobs.optim:
            after = est(knobs.replace(optim="paged_adamw_8bit"))
            change("optim", "paged_adamw_8bit",
                   f"{over}: 8-bit paged AdamW saves {_gb(current.adapter_bytes - after.adapter_bytes)} "
                   "of optimizer state")
        elif (free("per_device_train_batch_size") and free("gradient_accumulation_steps")
              and knobs.per_device_train_batch_size > 1):
            smaller = halve_micro_batch(knobs)
            rows = " (of preference pairs, two sequences each)" if knobs.method in ("dpo", "orpo") else ""
            change("per_device_train_batch_size", smaller.per_device_train_batch_size,
                   f"{over}: a smaller micro-batch{rows} needs fewer activations; accumulation grows "
                   f"so the effective batch stays {knobs.effective_batch_size}",
                   gradient_accumulation_steps=smaller.gradient_accumulation_steps)
        elif (bnb or mlx) and free("load_in_4bit") and not knobs.load_in_4bit:
            after = est(knobs.replace(load_in_4bit=True))
            cost = "" if backend == "cuda" or mlx else f"; bitsandbytes 4-bit on {backend} is slower than 16-bit"
            change("load_in_4bit", True,
                   f"{over}: {MLX_4BIT if mlx else '4-bit NF4'} weights take {_gb(after.weights_bytes)} instead of "
                   f"{_gb(current.weights_bytes)}{cost}")
        elif (backend == "cuda" and not fsdp and free("activation_offloading")
              and (after := offloading(knobs, current))):
            moved = after.details["offloaded_activation_bytes"]
            change("activation_offloading", True,
                   f"{over}: trl's activation offloading keeps what the blocks save for the backward pass "
                   f"({_gb(moved)} per micro-batch) in the CPU's RAM, saving {_gb(current.total_bytes - after.total_bytes)}"
                   f" on the GPU; every micro-batch moves it over PCIe and back (~{_seconds(2 * moved / PCIE_BYTES_PER_S)} "
                   f"at {PCIE_BYTES_PER_S / 1e9:.0f} GB/s, partly hidden behind compute)")
        elif free("max_length") and knobs.max_length > MIN_MAX_LENGTH:
            new_len = max(MIN_MAX_LENGTH, knobs.max_length // 2)
            change("max_length", new_len,
                   f"{over}: shorter sequences need fewer activations and a smaller logits spike; "
                   f"rows longer than {new_len} tokens will be truncated")
        elif free("r") and knobs.r > MIN_RANK:
            new_r = max(MIN_RANK, knobs.r // 2)
            extra = {}
            if free("lora_alpha"):
                extra["lora_alpha"] = knobs.lora_alpha * new_r / knobs.r
            change("r", new_r, f"{over}: a smaller LoRA rank means fewer trainable parameters "
                   "and less optimizer state", **extra)
        else:
            break
        current = est(knobs)
    return knobs, adjustments, current


def _cuts(adjustments: list[Adjustment]) -> list[Adjustment]:
    """The adjustments that change what is trained (shorter sequences, a smaller rank), not only how fast."""
    return [a for a in adjustments if a.knob in ("max_length", "r")]


def _ranks_text(sel: Selection) -> str:
    """'2 GPUs', '3 processes', '4 ranks (2 GPUs on each of 2 machines)'."""
    n = sel.processes
    per = f"{n} GPU{'s' if n != 1 else ''}" if sel.devices[0].index is not None else f"{n} process{'es' if n != 1 else ''}"
    if sel.nodes == 1:
        return per
    return f"{sel.world_size} ranks ({per} on each of {sel.nodes} machines)"


def _split_batch(knobs: Knobs, pinned: dict[str, Any], world: int,
                 ranks: str) -> tuple[Knobs, list[Adjustment], list[str]]:
    """The per-rank micro-batch and accumulation for `world` ranks that keep the effective batch
    (micro-batch x accumulation x ranks) what one device would train with: the accumulation
    divided by the ranks where they divide it, else a micro-batch no larger than planned with
    an accumulation that together give exactly the same batch, else the smallest batch above
    it (said in a note). Pinned knobs are never changed (a pinned accumulation grows the batch
    with the ranks: said in a note)."""
    mb, acc = knobs.per_device_train_batch_size, knobs.gradient_accumulation_steps
    target = mb * acc
    pin_mb, pin_acc = "per_device_train_batch_size" in pinned, "gradient_accumulation_steps" in pinned
    if pin_acc:
        return knobs, [], [f"{ranks}: gradient_accumulation_steps is set by you ({acc}), so an optimizer step "
                           f"trains {mb} x {acc} x {world} = {mb * acc * world} rows, not the {target} of one device"]
    if acc % world == 0:
        new = acc // world
        return knobs.replace(gradient_accumulation_steps=new), [Adjustment(
            "gradient_accumulation_steps", acc, new,
            f"{ranks}: accumulation {acc} -> {new} keeps the effective batch {target} = {mb} x {new} x {world}")], []
    sizes = [mb] if pin_mb else range(mb, 0, -1)
    exact = next((m for m in sizes if target % (m * world) == 0), None)
    notes: list[str] = []
    if exact is not None:
        m, a = exact, target // (exact * world)
        why = f"{ranks}: {acc} micro-batches do not divide by {world}; {m} x {a} x {world} keeps the effective batch {target}"
    else:  # the smallest batch above the target, with the largest micro-batch that gives it
        m, a = min(((s, -(-target // (s * world))) for s in sizes), key=lambda x: (x[0] * x[1], -x[0]))
        why = (f"{ranks}: {target} rows per optimizer step do not split evenly over {world} ranks; "
               f"{m} x {a} x {world} = {m * a * world} is the nearest larger batch")
        notes.append(f"the effective batch is {m * a * world} rows ({m} x {a} x {world}), not the {target} of one "
                     f"device: {target} does not split evenly over {world} ranks")
    adjustments = []
    if m != mb:
        adjustments.append(Adjustment("per_device_train_batch_size", mb, m, why))
    if a != acc:
        adjustments.append(Adjustment("gradient_accumulation_steps", acc, a, why))
    return knobs.replace(per_device_train_batch_size=m, gradient_accumulation_steps=a), adjustments, notes


def _reason(sel: Selection, mode: str, budget: int, current: MemoryEstimate, s_knobs: Knobs,
            s_adj: list[Adjustment], s_est: MemoryEstimate,
            f_plan: tuple[Knobs, list[Adjustment], MemoryEstimate] | None, knobs: Knobs) -> str:
    """Which devices and mode, and why, in one sentence."""
    where = sel.why + (f", on each of {sel.nodes} machines" if sel.nodes > 1 else "")
    left = "".join(f"; GPU {d.index} ({d.name}) is left out: {why}" for d, why in sel.left_out)
    if mode == "single":
        return where + left
    cpu = sel.devices[0].index is None
    unit = "process" if cpu else "card"
    if s_est.total_bytes > budget:
        one = f"does not fit one {unit} ({_gb(s_est.total_bytes)} > the {_gb(budget)} budget per {unit})"
    elif _cuts(s_adj):
        first: dict[str, Any] = {}
        for a in _cuts(s_adj):
            first.setdefault(a.knob, a.old)
        one = "fits one card only with " + " and ".join(f"{k} {old} -> {getattr(s_knobs, k)}" for k, old in first.items())
    else:
        one = f"fits one {unit} ({_gb(s_est.total_bytes)} of the {_gb(budget)} budget per {unit})"
    if mode == "ddp":
        how = (f"each of the {sel.world_size} ranks holds the whole model and trains on its own share of every "
               f"batch (data parallel{', gloo' if cpu else ''})")
        text = f"{where}{left}: the plan {one}, so {how}"
        if f_plan is not None:
            f_est = f_plan[2]
            shard = ("does not fit either" if f_est.total_bytes > budget else
                     "would not need fewer cuts")
            text += f"; sharded (FSDP) it {shard} ({_gb(f_est.total_bytes)} per card)"
        return text
    d = current.details
    weights = "4-bit" if knobs.load_in_4bit else "16-bit"
    return (f"{where}{left}: the plan {one}; sharded across {sel.world_size} cards (FSDP, QLoRA with the "
            f"4-bit weights stored in the compute dtype) the {_gb(d['fsdp_unsharded_weights_bytes'])} of "
            f"{weights} weights become {_gb(d['fsdp_sharded_weights_bytes'])} per card + "
            f"{_gb(d['fsdp_gathered_bytes'])} gathered while computing (one block twice, the embeddings and "
            f"lm_head): {_gb(current.total_bytes)} of the {_gb(budget)} budget per card")


CONTEXT_STEP = 64
"""`max_context` answers in multiples of this many tokens."""
CONTEXT_SEARCH_LIMIT = 1 << 20
"""Where `max_context` stops when the model's config names no context window."""


@dataclass
class ContextFit:
    """The longest `max_length` that fits the plan's budget with every other knob as planned."""

    max_length: int
    """In tokens, a multiple of CONTEXT_STEP; 0 when not even CONTEXT_STEP tokens fit."""
    bound: str
    """What stops it going longer, in words."""
    estimate: MemoryEstimate | None
    """The estimate at `max_length` (None when nothing fits)."""
    limit: str = "budget"
    """What bounds it, in one word: budget, window (the model's), search (no window known), nothing."""

    def line(self, short: bool = False) -> str:
        if not self.max_length:
            return "no context fits the budget" if short else f"no context fits: {self.bound}"
        if short:
            what = {"budget": "the memory budget", "window": "the model's context window",
                    "search": "localtune's search limit"}[self.limit]
            return f"longest context that fits: {self.max_length} tokens (bound by {what})"
        return f"longest context that fits: {self.max_length} tokens ({self.bound})"

    def to_dict(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "bound": self.bound, "limit": self.limit,
                "estimate_bytes": self.estimate.total_bytes if self.estimate else None}


def max_context(plan: Plan) -> ContextFit:
    """The largest `max_length` whose estimate fits `plan`'s budget, everything else as planned
    (`_longest`); on CUDA, where the plan has no activation offloading, the bound also says how
    long a context would fit with it."""
    fit = _longest(plan, plan.knobs)
    k = plan.knobs
    if (plan.backend == "cuda" and k.engine == "torch" and k.method != "orpo" and not k.activation_offloading
            and fit.limit == "budget"):
        offloaded = _longest(plan, k.replace(activation_offloading=True))
        if offloaded.max_length > fit.max_length:
            fit.bound += f"; with --set activation_offloading=true: {offloaded.max_length} tokens"
    return fit


def _longest(plan: Plan, knobs: Knobs) -> ContextFit:
    """The largest `max_length` whose estimate fits `plan`'s budget, everything else as planned
    (micro-batch, checkpointing, 4-bit, rank...), and what bounds it: the model's context window
    (its config's max_position_embeddings) or the memory budget (then which parts grow with the
    length, per 1024 tokens). The estimate grows with the length, so a binary search over
    multiples of CONTEXT_STEP finds it in ~15 estimates (milliseconds)."""
    facts = plan.device_facts()
    budget = plan.budget_bytes

    def est(n: int) -> MemoryEstimate:
        return estimate(plan.model.shape, knobs.replace(max_length=n), facts,
                        reference_adapter=plan.reference_adapter, shards=plan.shards)

    window = plan.model.shape.context_length
    top = (window // CONTEXT_STEP) * CONTEXT_STEP if window >= CONTEXT_STEP else CONTEXT_SEARCH_LIMIT
    lowest = est(CONTEXT_STEP)
    if lowest.total_bytes > budget:
        fixed = lowest.weights_bytes + lowest.adapter_bytes + lowest.overhead_bytes
        return ContextFit(0, f"even {CONTEXT_STEP} tokens need {_gb(lowest.total_bytes)} of the {_gb(budget)} budget "
                             f"(weights, adapter and overhead alone: {_gb(fixed)})", None, "nothing")
    highest = est(top)
    if highest.total_bytes <= budget:
        what = (f"the model's context window, max_position_embeddings {window}" if window >= CONTEXT_STEP
                else f"localtune's search limit; the model's config names no context window")
        return ContextFit(top, f"{what}; the estimate there is {_gb(highest.total_bytes)} of a {_gb(budget)} budget",
                          highest, "window" if window >= CONTEXT_STEP else "search")
    lo, hi = 1, top // CONTEXT_STEP  # est(lo * STEP) fits, est(hi * STEP) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if est(mid * CONTEXT_STEP).total_bytes <= budget:
            lo = mid
        else:
            hi = mid
    n = lo * CONTEXT_STEP
    at, over = est(n), est(n + 1024)
    growth = sorted(((getattr(over, f"{k}_bytes") - getattr(at, f"{k}_bytes"), k)
                     for k in ("activations", "logits", "reference", "fragmentation")), reverse=True)
    grows = ", ".join(f"{k} +{_gb(d)}" for d, k in growth if d > 0)
    return ContextFit(n, f"the {_gb(budget)} budget: the estimate is {_gb(at.total_bytes)} there; each 1024 more "
                         f"tokens add {grows}", at)


def _advice(plan: Plan) -> list[str]:
    """What would make a plan that does not fit fit, most effective first."""
    k, e, budget, backend = plan.knobs, plan.estimate, plan.budget_bytes, plan.backend
    out: list[str] = []
    fixed = e.weights_bytes + e.adapter_bytes + e.overhead_bytes
    if fixed > budget:
        share = budget / max(1, fixed)
        params_b = e.base_params * share / 1e9
        out.append(f"a smaller model: the weights alone need {_gb(e.weights_bytes)} of the {_gb(budget)} "
                   f"budget; about {params_b:.1f}B parameters or fewer would leave room to train")
    facts = plan.device_facts()
    shards = plan.shards
    if not k.load_in_4bit and (backend in BITSANDBYTES_BACKENDS or k.engine == "mlx"):
        q = estimate(plan.model.shape, k.replace(load_in_4bit=True), facts,
                     reference_adapter=plan.reference_adapter, shards=shards)
        if q.total_bytes < e.total_bytes:
            out.append(f"4-bit weights (--set load_in_4bit=true): the estimate drops to {_gb(q.total_bytes)}")
    for n in (1024, 512, 256, 128, 64):
        if n >= k.max_length:
            continue
        s = estimate(plan.model.shape, k.replace(max_length=n), facts,
                     reference_adapter=plan.reference_adapter, shards=shards)
        if s.total_bytes <= budget:
            out.append(f"shorter sequences (--max-seq-len {n}): the estimate drops to {_gb(s.total_bytes)}")
            break
    if backend == "cuda" and k.engine == "torch":
        # more cards like these, sharded: the fewest that hold the plan's knobs (4-bit unless pinned off)
        sharded = k if "load_in_4bit" in plan.pinned else k.replace(load_in_4bit=True)
        for cards in (2, 3, 4, 6, 8):
            if cards <= plan.world_size:
                continue
            f = estimate(plan.model.shape, sharded, facts, reference_adapter=plan.reference_adapter, shards=cards)
            if f.total_bytes <= budget:
                out.append(f"{cards} cards like these, sharded (FSDP): {_gb(f.total_bytes)} per card with these knobs")
                break
    if not out:
        out.append(f"a machine with at least {_gb(e.total_bytes + plan.headroom_bytes)} free")
    return out
