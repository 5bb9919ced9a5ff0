"""Fixed inputs for the TUI tests: a machine that does not change between runs, a frozen
clock, and run folders written with known events, so that snapshots compare."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from localtune.hardware import Device, Hardware

GiB = 1024**3
FIXED_NOW = 1_790_000_000.0
"""2026-09-21 (UTC): the clock of every snapshot test (localtune.tui.fmt.now)."""

VERSIONS = {"torch": "2.13.0+cpu", "transformers": "5.24.0", "peft": "0.21.2", "trl": "1.16.0",
            "bitsandbytes": "0.50.2"}


def cpu_machine() -> Hardware:
    """A 2-core CPU box with 24 GB of RAM, 22 GB of it free."""
    ram = Device(name="AMD EPYC", total_bytes=24 * GiB, free_bytes=22 * GiB)
    return Hardware(backend="cpu", devices=[ram], ram_total_bytes=24 * GiB, ram_available_bytes=22 * GiB,
                    cpu_cores=2, cpu_name="AMD EPYC", versions=dict(VERSIONS))


def gpu_machine() -> Hardware:
    """An RTX 4090 (24 GB, 23 GB free, 45 C, 3% busy, 30 of 450 W) in a 64 GB box."""
    gpu = Device(name="NVIDIA GeForce RTX 4090", total_bytes=24 * GiB, free_bytes=23 * GiB, index=0, nvml_index=0,
                 compute_capability="8.9", temperature_c=45.0, utilization_pct=3.0, power_w=30.0,
                 power_limit_w=450.0)
    return Hardware(backend="cuda", devices=[gpu], ram_total_bytes=64 * GiB, ram_available_bytes=58 * GiB,
                    cpu_cores=16, cpu_name="AMD Ryzen 9 7950X", driver_version="560.35.03",
                    cuda_driver_version="12.6", versions={**VERSIONS, "torch": "2.13.0+cu126"})


def freeze_clock(monkeypatch, now: float = FIXED_NOW) -> None:
    """Make the TUI's clock (ages, 'updated 3m ago') read `now`."""
    from localtune.tui import fmt

    monkeypatch.setattr(fmt, "now", lambda: now)


def write_events(path: Path, events: list[dict[str, Any]]) -> None:
    """Append events as the worker writes them (one JSON object per line); each needs `t` and `kind`."""
    with open(path, "a", encoding="utf-8") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")


def step_events(first: int, last: int, max_steps: int, *, t0: float, dt: float = 3.0,
                loss0: float = 3.2, decay: float = 0.04) -> list[dict[str, Any]]:
    """`step` events first..last with a smoothly falling loss and fixed timings."""
    out = []
    for s in range(first, last + 1):
        out.append({"t": t0 + s * dt, "kind": "step", "step": s, "max_steps": max_steps, "epoch": s / max_steps,
                    "loss": round(loss0 * (1 - decay) ** s, 4), "learning_rate": 1e-3 * (1 - s / max_steps),
                    "grad_norm": round(1.5 - s * 0.01, 3), "tokens_per_s": 230.0 + s % 3, "elapsed_s": s * dt})
    return out


def preference_step_events(first: int, last: int, max_steps: int, *, t0: float, dt: float = 3.0,
                           orpo: bool = False) -> list[dict[str, Any]]:
    """`step` events of a DPO (or ORPO) run: the sft fields plus the rewards trl logs, the loss
    falling from log 2, the reward margin growing and the preference accuracy rising to 1."""
    out = step_events(first, last, max_steps, t0=t0, dt=dt, loss0=0.6931, decay=0.05)
    for e in out:
        s = e["step"]
        chosen, rejected = round(0.02 * s, 4), round(-0.015 * s, 4)
        e.update(rewards_chosen=chosen, rewards_rejected=rejected, reward_margin=round(chosen - rejected, 4),
                 reward_accuracy=min(1.0, round(0.5 + s / 32, 4)))
        if orpo:
            e.update(log_odds_ratio=round(-0.8 + 0.05 * s, 4), nll_loss=round(1.9 - 0.03 * s, 4))
    return out
