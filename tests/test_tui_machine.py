"""The Machine screen as a person meets it: the backend, each device with its memory and live
readings, RAM, CPU, libraries, notes and the matching profile; live readings that refresh;
snapshots of a CPU box and an RTX 4090 box at 100x30 and 80x24.

The probe is fixed (tests.tui_support) and `read_machine` is replaced by one that returns
fixed readings, so nothing here depends on the machine the tests run on."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from typing import Any, Awaitable, Callable

import pytest
from rich.console import Console

from localtune.hardware import Hardware
from localtune.tui.app import LocaltuneApp
from localtune.tui.screens import machine
from tests.tui_support import GiB, cpu_machine, freeze_clock, gpu_machine


def fixed_reading(hw: Hardware, **device_changes: Any) -> machine.Reading:
    """What `read_machine` would say about `hw` if nothing changed, with `device_changes`
    applied to the first device, and the CPU 7% busy."""
    devices = [replace(d, **device_changes) if i == 0 else d for i, d in enumerate(hw.devices)]
    if hw.backend == "cpu":
        devices[0] = replace(devices[0], utilization_pct=7.0)
    return machine.Reading(devices, hw.ram_total_bytes, hw.ram_available_bytes, 7.0)


@pytest.fixture
def fixed_readings(monkeypatch) -> dict[str, Any]:
    """Live readings come from `readings['changes']` (device fields), not from this machine."""
    readings: dict[str, Any] = {"changes": {}, "calls": 0}

    def read(hw: Hardware) -> machine.Reading:
        readings["calls"] += 1
        return fixed_reading(hw, **readings["changes"])

    monkeypatch.setattr(machine, "read_machine", read)
    freeze_clock(monkeypatch)
    return readings


def plain(renderable: Any) -> str:
    console = Console(width=200, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def shown(app: LocaltuneApp, selector: str) -> str:
    """The text a widget shows (a Static's content, or what a custom widget renders)."""
    widget = app.screen.query_one(selector)
    content = getattr(widget, "content", "")
    return plain(content if content else widget.render())


async def settle(pilot) -> None:
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def drive(hw: Hardware, test: Callable[[LocaltuneApp, Any], Awaitable[None]],
          size: tuple[int, int] = (100, 30)) -> None:
    app = LocaltuneApp(hardware=hw, mode="machine")

    async def main() -> None:
        async with app.run_test(size=size) as pilot:
            await settle(pilot)
            await test(app, pilot)

    asyncio.run(main())


def test_gpu_machine_shows_the_card_its_readings_and_profile(fixed_readings) -> None:
    async def test(app, pilot) -> None:
        assert "cuda (NVIDIA, driver 560.35.03, CUDA 12.6)" in shown(app, "#machine-backend")
        assert app.screen.query_one("#device-0").border_title == "GPU 0: NVIDIA GeForce RTX 4090 (compute 8.9)"
        assert "1.0 GB / 24.0 GB" in shown(app, "#device-0-memory")
        assert shown(app, "#device-0-live").strip() == "45 °C · 3% utilisation · 30 W of 450 W"
        assert "6.0 GB / 64.0 GB" in shown(app, "#ram")
        assert "AMD Ryzen 9 7950X, 16 cores · 7% busy" in shown(app, "#cpu")
        assert "torch 2.13.0+cu126" in shown(app, "#machine-libraries")
        assert shown(app, "#profile-name").startswith("cuda-24gb: One 24 GB NVIDIA card")
        knobs = shown(app, "#profile-knobs")
        assert "rank 32" in knobs and "4-bit on" in knobs and "gradient checkpointing on" in knobs
        assert shown(app, "#profile-engine").strip() == "torch (transformers, trl, peft) 2.13.0+cu126"
        assert "press 2 to plan a new run, 3 for runs" in shown(app, "#machine-next").lower()

    drive(gpu_machine(), test)


def test_cpu_machine_shows_ram_and_cpu_use_once(fixed_readings) -> None:
    async def test(app, pilot) -> None:
        assert "training runs on the CPU" in shown(app, "#machine-backend")
        assert app.screen.query_one("#device-0").border_title == "CPU: AMD EPYC, 2 cores"
        assert "2.0 GB / 24.0 GB" in shown(app, "#device-0-memory")
        assert "7% busy" in shown(app, "#device-0-live")
        assert not app.screen.query("#ram")  # the device above is the RAM already
        assert shown(app, "#profile-name").startswith("cpu: CPU only")

    drive(cpu_machine(), test)


def test_a_mac_shows_that_its_runs_train_on_mlx(fixed_readings) -> None:
    from localtune.hardware import Device, Hardware
    from tests.tui_support import GiB, VERSIONS

    chip = Device(name="Apple M2", total_bytes=16 * GiB, free_bytes=10 * GiB, recommended_max_bytes=11 * GiB)
    mac = Hardware(backend="mps", devices=[chip], chip="Apple M2", macos_version="14.5", ram_total_bytes=16 * GiB,
                   ram_available_bytes=10 * GiB, cpu_cores=8, cpu_name="Apple M2",
                   versions={**VERSIONS, "mlx": "0.32.4", "mlx-lm": "0.32.2"})

    async def test(app, pilot) -> None:
        assert shown(app, "#profile-name").startswith("mps-16gb")
        assert shown(app, "#profile-engine").strip() == (
            "mlx (Apple's MLX, mlx-lm) 0.32.4; --set engine=torch trains on PyTorch (MPS) instead")
        assert "mlx 0.32.4 · mlx-lm 0.32.2" in shown(app, "#machine-libraries")

    drive(mac, test)


def test_live_readings_refresh_and_notes_show(fixed_readings, monkeypatch) -> None:
    monkeypatch.setattr(machine, "REFRESH_S", 0.05)
    hw = replace(gpu_machine(), notes=["NVIDIA GPU 1 (NVML index) could not be read: Unknown Error"])

    async def test(app, pilot) -> None:
        assert "45 °C" in shown(app, "#device-0-live")
        fixed_readings["changes"] = {"temperature_c": 71.0, "utilization_pct": 98.0, "power_w": 320.0,
                                     "free_bytes": 4 * GiB}
        calls = fixed_readings["calls"]
        while fixed_readings["calls"] < calls + 2:
            await pilot.pause(0.05)
        await settle(pilot)
        assert shown(app, "#device-0-live").strip() == "71 °C · 98% utilisation · 320 W of 450 W"
        assert "20.0 GB / 24.0 GB" in shown(app, "#device-0-memory")
        assert "could not be read: Unknown Error" in plain(app.screen.query_one(".machine-note").content)

    drive(hw, test)


def test_readings_that_fail_are_reported_not_fatal(fixed_readings, monkeypatch) -> None:
    def broken(hw):
        raise RuntimeError("NVML went away")

    monkeypatch.setattr(machine, "read_machine", broken)

    async def test(app, pilot) -> None:
        assert "live readings failed: RuntimeError: NVML went away" in shown(app, "#machine-live-error")
        assert app.screen.query_one("#machine-live-error").display
        assert "1.0 GB / 24.0 GB" in shown(app, "#device-0-memory")  # the probe's numbers stay

    drive(gpu_machine(), test)


@pytest.mark.parametrize("size", [(100, 30), (80, 24)], ids=["100x30", "80x24"])
@pytest.mark.parametrize("hw", [cpu_machine, gpu_machine], ids=["cpu", "gpu"])
def test_snapshot(snap_compare, fixed_readings, hw, size) -> None:
    assert snap_compare(LocaltuneApp(hardware=hw(), mode="machine"), terminal_size=size, run_before=settle)


def test_several_gpus_say_which_train_by_default_and_which_are_left_out(fixed_readings) -> None:
    """Two RTX 3090s and a 3060: a run uses the two 3090s (the cards that match GPU 0) and the
    screen says so, and why the 3060 is left out."""
    hw = gpu_machine()
    g0 = replace(hw.devices[0], name="NVIDIA GeForce RTX 3090")
    odd = replace(g0, name="NVIDIA GeForce RTX 3060", total_bytes=12 * GiB, free_bytes=11 * GiB, index=2, nvml_index=2)
    hw = replace(hw, devices=[g0, replace(g0, index=1, nvml_index=1), odd])

    async def test(app, pilot) -> None:
        line = " ".join(shown(app, "#profile-gpus").split())
        assert line.startswith("training uses GPU 0 and 1 (2 x NVIDIA GeForce RTX 3090, 24.0 GB): data parallel "
                               "when the model fits one card, sharded (FSDP) when it does not; --gpus picks others")
        assert "GPU 2 (NVIDIA GeForce RTX 3060, 12.0 GB) is left out: it does not match GPU 0" in line

    drive(hw, test, size=(100, 40))


def test_one_gpu_says_it_trains_there_and_a_cpu_box_has_no_gpu_line(fixed_readings) -> None:
    async def one(app, pilot) -> None:
        assert shown(app, "#profile-gpus").strip() == "training uses GPU 0 (NVIDIA GeForce RTX 4090, 24.0 GB)"

    async def cpu(app, pilot) -> None:
        assert not app.screen.query("#profile-gpus")

    drive(gpu_machine(), one)
    drive(cpu_machine(), cpu)
