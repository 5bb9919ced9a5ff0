"""Which devices a run trains on, and how: one device, data parallel (DDP) or sharded (FSDP).

`Parallel` is the plan's answer (`Plan.parallel`), the value the launcher reads: the mode, the
ranks per machine, the machines, the CUDA ordinals used, and one sentence saying which and why.

`select(hardware, gpus=..., processes=..., nodes=...)` reads the person's choice and checks it:

- `--gpus` (CUDA only): "all", "N" (the first N in CUDA order), or a comma list of CUDA
  ordinals ("0,2"; "1," is GPU 1 alone). Left out, every GPU that matches the first one
  (`hardware.devices[0]`) in name and total memory: a second identical card is used, an odd
  one is not (a run whose ranks wait on the slowest card, with the smallest card's budget,
  is rarely what a person with a 4090 and a 3060 wants). A MIG slice trains alone: CUDA gives
  a process one MIG instance, and NCCL does not run across them.
- `--processes N` (the CPU only): N processes on this CPU, each with 1/N of the RAM budget
  (they share the RAM). The same code path as N GPUs, the device aside: how the runtime is
  tested on a machine without GPUs.
- `--nodes N`: N machines, each with the same selection. The world size is the ranks per
  machine times the machines.

The budget is per rank: on CUDA the smallest selected card's (free memory minus the headroom,
`HEADROOM_FRAC` of that card's total), on the CPU the RAM's divided by the processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from localtune.errors import UserError
from localtune.hardware import Device, GiB, Hardware

MODES = ("single", "ddp", "fsdp")


@dataclass
class Parallel:
    """How the run is spread over devices: `Plan.parallel`."""

    mode: str = "single"
    """'single' (one device), 'ddp' (every rank holds the whole model and trains on its share
    of each batch) or 'fsdp' (the model, the adapter's gradients and optimizer state sharded
    across the ranks; QLoRA with the 4-bit weights stored in the compute dtype)."""
    processes: int = 1
    """Ranks per machine: GPUs used on each, or processes on the CPU."""
    nodes: int = 1
    """Machines, each with the same selection."""
    devices: list[int] = field(default_factory=list)
    """CUDA ordinals used on each machine; [] on the CPU and Apple."""
    reason: str = ""
    """Which and why, in one sentence."""

    @property
    def world_size(self) -> int:
        return self.processes * self.nodes

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "processes": self.processes, "nodes": self.nodes,
                "devices": list(self.devices), "reason": self.reason, "world_size": self.world_size}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Parallel:
        """From `to_dict` (a run's plan.json); a plan written before there was a "parallel" is
        a single-device run."""
        d = d or {}
        return cls(mode=d.get("mode", "single"), processes=int(d.get("processes", 1)), nodes=int(d.get("nodes", 1)),
                   devices=[int(i) for i in d.get("devices", [])], reason=d.get("reason", ""))


@dataclass
class Selection:
    """The devices a run uses and the budget of one rank (`select`)."""

    devices: list[Device]
    """The selected GPUs in CUDA order; on the CPU and Apple the one device."""
    processes: int
    nodes: int
    budget_bytes: int
    """Per rank: the smallest selected card's free memory minus its headroom, or the RAM's / processes."""
    headroom_bytes: int
    budget_device: Device
    """The device whose free memory sets the budget."""
    why: str
    """Which devices, and why these, in words."""
    left_out: list[tuple[Device, str]] = field(default_factory=list)
    """GPUs the default selection leaves out, and why."""

    @property
    def world_size(self) -> int:
        return self.processes * self.nodes


def gb(n: float) -> str:
    return f"{n / GiB:.1f} GB"


def gpu_name(d: Device) -> str:
    return f"GPU {d.index}"


def gpu_list(devices: list[Device]) -> str:
    """'GPU 0', 'GPU 0 and 1', 'GPU 0, 1 and 3'."""
    idx = [str(d.index) for d in devices]
    if len(idx) == 1:
        return f"GPU {idx[0]}"
    return f"GPU {', '.join(idx[:-1])} and {idx[-1]}"


def cards_text(devices: list[Device]) -> str:
    """'2 x NVIDIA GeForce RTX 3090, 24.0 GB' for identical cards, else each named."""
    if len({(d.name, d.total_bytes) for d in devices}) == 1:
        d = devices[0]
        return f"{len(devices)} x {d.name}, {gb(d.total_bytes)}" if len(devices) > 1 else f"{d.name}, {gb(d.total_bytes)}"
    return "; ".join(f"{d.name}, {gb(d.total_bytes)}" for d in devices)


def _matches(first: Device, d: Device) -> bool:
    return d.name == first.name and d.total_bytes == first.total_bytes


def default_gpus(hw: Hardware) -> tuple[list[Device], list[tuple[Device, str]]]:
    """The GPUs a run uses when `--gpus` is left out, and those left out with why."""
    first = hw.devices[0]
    chosen, left = [first], []
    for d in hw.devices[1:]:
        if first.mig_index is not None or d.mig_index is not None:
            left.append((d, "a MIG slice trains alone (CUDA gives a process one MIG instance)"))
        elif not _matches(first, d):
            left.append((d, f"it does not match GPU {first.index} in model and memory (--gpus all would add it, "
                            "with the smallest card's budget for every card)"))
        else:
            chosen.append(d)
    return chosen, left


def available_gpus(hw: Hardware) -> str:
    return ", ".join(f"GPU {d.index} ({d.name}, {gb(d.total_bytes)})" for d in hw.devices)


def parse_gpus(spec: str, hw: Hardware) -> list[Device]:
    """The GPUs `--gpus spec` names (see the module docstring), or UserError in one line."""
    s = spec.strip().lower()
    n = len(hw.devices)
    there = f"this machine has {available_gpus(hw)}"
    if s == "all":
        return list(hw.devices)
    if s.isdigit() and "," not in s:
        count = int(s)
        if not 1 <= count <= n:
            raise UserError(f"--gpus {spec}: a number is how many GPUs to use (the first N), 1 to {n}; {there} "
                            "(a list picks GPUs by number: --gpus 0,2, or --gpus 1, for GPU 1 alone)")
        return list(hw.devices[:count])
    items = [t.strip() for t in s.split(",")]
    if items and items[-1] == "" and len(items) > 1:
        items = items[:-1]  # "1," is GPU 1 alone
    if not items or not all(t.isdigit() for t in items):
        raise UserError(f"--gpus {spec}: expected all, a number of GPUs or a comma list of GPU numbers "
                        f"such as 0,2; {there}")
    ordinals = [int(t) for t in items]
    if len(set(ordinals)) != len(ordinals):
        raise UserError(f"--gpus {spec}: a GPU is named twice; {there}")
    by_index = {d.index: d for d in hw.devices}
    missing = [i for i in ordinals if i not in by_index]
    if missing:
        raise UserError(f"--gpus {spec}: there is no GPU {', '.join(map(str, missing))}; {there}")
    return [by_index[i] for i in sorted(ordinals)]


def _count(value: Any, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{flag} must be a whole number of at least 1, got {value!r}")
    return value


def select(hw: Hardware, *, gpus: str | None = None, processes: int | None = None, nodes: int = 1,
           headroom_frac: float) -> Selection:
    """Check the person's choice against the machine and work out the budget of one rank."""
    nodes = _count(nodes, "--nodes")
    backend = hw.backend
    if processes is not None:
        processes = _count(processes, "--processes")
    if gpus is not None and backend != "cuda":
        raise UserError(f"--gpus picks NVIDIA GPUs; this machine trains on {backend}"
                        + (" (--processes N runs N processes on the CPU)" if backend == "cpu" else ""))
    if backend == "cuda":
        if processes not in (None, 1):
            raise UserError(f"--processes {processes} is for the CPU; on NVIDIA GPUs --gpus picks the GPUs "
                            "(one process each), e.g. --gpus 2")
        left: list[tuple[Device, str]] = []
        if gpus is None:
            chosen, left = default_gpus(hw)
            why = (f"{gpu_list(chosen)} ({cards_text(chosen)})"
                   + (", every GPU here that matches GPU 0" if len(chosen) > 1 else ""))
        else:
            chosen = parse_gpus(gpus, hw)
            why = f"{gpu_list(chosen)} ({cards_text(chosen)}), picked with --gpus {gpus}"
        if len(chosen) > 1 and any(d.mig_index is not None for d in chosen):
            raise UserError(f"--gpus {gpus}: {gpu_list(chosen)} include MIG slices, and a MIG slice trains alone "
                            "(CUDA gives a process one MIG instance; NCCL does not run across them)")
        budgets = [(max(0, d.free_bytes - int(d.total_bytes * headroom_frac)), d) for d in chosen]
        budget, device = min(budgets, key=lambda x: x[0])
        return Selection(chosen, len(chosen), nodes, budget, int(device.total_bytes * headroom_frac), device,
                         why, left)
    if processes not in (None, 1) and backend != "cpu":
        raise UserError(f"--processes {processes} runs several processes on the CPU; this machine trains on {backend}")
    if nodes > 1 and backend == "mps":
        raise UserError(f"--nodes {nodes}: several machines train through NCCL (NVIDIA) or gloo (the CPU); "
                        "Apple's GPU trains on one machine")
    procs = processes or 1
    d = hw.primary
    headroom = int(d.total_bytes * headroom_frac)
    budget = max(0, d.free_bytes - headroom) // procs
    if backend == "cpu":
        why = "one process on the CPU" if procs == 1 else f"{procs} processes on the CPU, picked with --processes"
    else:
        why = f"the Mac's GPU ({d.name})"
    return Selection([d], procs, nodes, budget, headroom, d, why)


def machine_line(hw: Hardware) -> str:
    """What the Machine screen says about the GPUs training uses when --gpus is left out."""
    if hw.backend != "cuda":
        return ""
    chosen, left = default_gpus(hw)
    text = f"training uses {gpu_list(chosen)} ({cards_text(chosen)})"
    if len(chosen) > 1:
        text += (": data parallel when the model fits one card, sharded (FSDP) when it does not; "
                 "--gpus picks others")
    else:
        text += "; --gpus picks others" if len(hw.devices) > 1 else ""
    for d, why in left:
        text += f". {gpu_name(d)} ({d.name}, {gb(d.total_bytes)}) is left out: {why}"
    return text
