"""The hardware probe, with NVML, the CUDA driver API and Apple's MPS faked where this
machine lacks them. The fake NVML keeps the real nvidia-ml-py error classes and constants,
so `except pynvml.NVMLError` behaves as it will on a real machine."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pynvml
import pytest

from localtune import hardware
from localtune.hardware import GiB, describe, probe, sample_devices
from localtune.plan import HEADROOM_FRAC
from tests.fakes import (RTX_3060, RTX_4090, RTX_A6000, FakeGPU, FakeMig, MiB, cuda_bus_id, fake_nvml,
                         install_gpus)


@pytest.fixture
def use(monkeypatch):
    """Install a fake NVML and a fake CUDA driver view (default: every GPU, in NVML order)."""

    def install(gpus, cuda=..., **kw):
        return install_gpus(monkeypatch, gpus, cuda, **kw)

    return install


def gb(n: int) -> float:
    return round(n / GiB, 1)




def test_rtx_4090(use):
    use([RTX_4090])
    hw = probe()
    assert hw.backend == "cuda"
    assert len(hw.devices) == 1
    d = hw.primary
    assert d.name == "NVIDIA GeForce RTX 4090"
    assert (d.index, d.nvml_index) == (0, 0)
    assert gb(d.total_bytes) == 24.0
    assert d.free_bytes == (24564 - 1024 - 300) * MiB  # v2: the driver's reserve is not free
    assert d.compute_capability == "8.9"
    assert (d.temperature_c, d.utilization_pct) == (45.0, 7.0)
    assert (d.power_w, d.power_limit_w) == (31.5, 450.0)
    assert d.pci_bus_id == "00000000:01:00.0"
    assert hw.driver_version == "550.54.14" and hw.cuda_driver_version == "12.4"
    assert hw.notes == []
    assert hardware.Hardware.from_dict(hw.to_dict()) == hw


def test_rtx_a6000_without_optional_readings(use):
    use([RTX_A6000])
    hw = probe()
    d = hw.primary
    assert hw.backend == "cuda"
    assert d.name == "NVIDIA RTX A6000" and gb(d.total_bytes) == 48.0
    assert d.compute_capability == "8.6"
    # NOT_SUPPORTED from NVML is a missing reading, not a failed probe.
    assert d.temperature_c is d.utilization_pct is d.power_w is d.power_limit_w is None
    assert not any("°C" in line or " W" in line for line in describe(hw))


def test_two_gpus_come_back_in_cuda_order(use):
    # NVML lists by PCI bus: the 3060 (0x0A) before the A6000 (0x41). CUDA puts the faster
    # card first; the first entry matches by UUID, the second only by PCI bus id.
    gpus = sorted([RTX_A6000, RTX_3060], key=lambda g: g.bus_id)
    use(gpus, cuda=[(RTX_A6000.uuid.upper(), None), (None, cuda_bus_id(RTX_3060.bus_id))])
    hw = probe()
    assert [d.name for d in hw.devices] == ["NVIDIA RTX A6000", "NVIDIA GeForce RTX 3060"]
    assert [d.index for d in hw.devices] == [0, 1]
    assert [d.nvml_index for d in hw.devices] == [1, 0]
    assert [gb(d.total_bytes) for d in hw.devices] == [48.0, 12.0]
    assert hw.primary.uuid == RTX_A6000.uuid
    # Live sampling reads each device by its own NVML index, keeping the CUDA order.
    RTX_3060.used += 4096 * MiB
    try:
        live = sample_devices(hw)
    finally:
        RTX_3060.used -= 4096 * MiB
    assert [d.name for d in live] == ["NVIDIA RTX A6000", "NVIDIA GeForce RTX 3060"]
    assert live[1].free_bytes == hw.devices[1].free_bytes - 4096 * MiB
    assert live[0].free_bytes == hw.devices[0].free_bytes


def test_gpus_hidden_from_cuda_are_left_out(use):
    use([RTX_3060, RTX_A6000], cuda=[(RTX_A6000.uuid, None)])  # CUDA_VISIBLE_DEVICES=1
    hw = probe()
    assert [(d.name, d.index, d.nvml_index) for d in hw.devices] == [("NVIDIA RTX A6000", 0, 1)]


def test_one_unreadable_gpu_does_not_hide_the_others(use):
    nv = use([RTX_3060, RTX_A6000])

    def name(h):
        if h is RTX_3060:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return h.name

    nv.nvmlDeviceGetName = name
    hw = probe()
    assert hw.backend == "cuda"
    # The lost card still holds CUDA ordinal 0, so the A6000 keeps ordinal 1.
    assert [(d.name, d.index) for d in hw.devices] == [("NVIDIA RTX A6000", 1)]
    assert any("GPU is lost" in n for n in hw.notes)


def test_without_driver_api_cuda_visible_devices_is_read(use, monkeypatch):
    use([RTX_3060, RTX_A6000], cuda=None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a6000,0,7,1")  # CUDA stops at '7'
    hw = probe()
    assert [(d.name, d.index, d.nvml_index) for d in hw.devices] == [
        ("NVIDIA RTX A6000", 0, 1), ("NVIDIA GeForce RTX 3060", 1, 0)]
    assert any("CUDA_VISIBLE_DEVICES" in n for n in hw.notes)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    hw = probe()
    assert hw.backend == "cpu"
    assert any("none is visible to CUDA" in n for n in hw.notes)


def test_old_driver_without_v2_memory_uses_v1(use):
    nv = use([RTX_4090], v2=False)
    hw = probe()
    assert hw.backend == "cuda"
    assert hw.primary.free_bytes == (24564 - 1024) * MiB
    assert ("memory", None) in nv.calls  # fell back to the v1 call


def test_nvml_failing_to_initialise_gives_a_clean_cpu_report(use):
    use([RTX_4090], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    hw = probe()
    assert hw.backend == "cpu"
    assert len(hw.devices) == 1 and hw.primary.total_bytes == hw.ram_total_bytes
    assert any(n.startswith("NVML failed to initialise") and "Driver Not Loaded" in n
               for n in hw.notes)
    assert any(line.startswith("Note: NVML failed") for line in describe(hw))


def test_nvidia_ml_py_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    hw = probe()
    assert hw.backend == "cpu"
    assert any("nvidia-ml-py" in n for n in hw.notes)


def test_m2_mac_32gb(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 21_845 * MiB, raising=False)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 1024 * MiB, raising=False)
    monkeypatch.setattr(hardware.psutil, "virtual_memory",
                        lambda: SimpleNamespace(total=32 * GiB, available=20 * GiB))
    asked = []
    monkeypatch.setattr(hardware, "_sysctl", lambda key: asked.append(key) or "Apple M2")
    # NVML must not be consulted on a Mac.
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([RTX_4090]))
    monkeypatch.setattr(hardware, "_cuda_driver_devices", lambda: pytest.fail("driver API"))

    hw = probe()
    assert hw.backend == "mps"
    assert hw.chip == "Apple M2" and hw.primary.name == "Apple M2"
    assert "machdep.cpu.brand_string" in asked
    assert gb(hw.primary.total_bytes) == 32.0
    assert gb(hw.primary.recommended_max_bytes) == 21.3
    assert hw.primary.free_bytes == (21_845 - 1024) * MiB
    assert hw.notes == []
    text = "\n".join(describe(hw))
    assert "Apple M2" in text and "32.0 GB unified memory" in text
    assert "recommended working set 21.3 GB" in text
    # the MLX engine's libraries, as installed (the test extra installs them here)
    import importlib.metadata as md

    assert hw.versions["mlx"] == md.version("mlx") and hw.versions["mlx-lm"] == md.version("mlx-lm")
    assert f"mlx {md.version('mlx')}" in text


def test_mlx_versions_on_a_mac_without_it_and_elsewhere(monkeypatch):
    import importlib.metadata as md

    real = md.version

    def without_mlx(name):
        if name in ("mlx", "mlx-lm"):
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(hardware.importlib.metadata, "version", without_mlx)
    on_mac = hardware._versions(apple=True)
    assert on_mac["mlx"] == "not installed" and on_mac["mlx-lm"] == "not installed"
    elsewhere = hardware._versions(apple=False)
    assert "mlx" not in elsewhere and "mlx-lm" not in elsewhere and elsewhere["torch"] == real("torch")


def test_the_engine_line_says_which_engine_and_how_to_switch():
    from localtune.engines import engine_line

    assert engine_line("mlx", {"mlx": "0.32.4", "torch": "2.13.0"}) == (
        "mlx (Apple's MLX, mlx-lm) 0.32.4; --set engine=torch trains on PyTorch (MPS) instead")
    assert engine_line("mlx", {"mlx": "not installed"}) == (
        "mlx (Apple's MLX, mlx-lm), not installed: pip install 'localtune[mlx]'; --set engine=torch trains on "
        "PyTorch (MPS) instead")
    assert engine_line("torch", {"torch": "2.13.0+cu126"}) == "torch (transformers, trl, peft) 2.13.0+cu126"


def test_mac_chip_name_falls_back(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 1 / 0, raising=False)
    monkeypatch.setattr(hardware, "_sysctl", lambda key: None)
    hw = probe()
    assert hw.backend == "mps" and hw.chip == "Apple Silicon"
    assert hw.primary.recommended_max_bytes is None
    assert hw.primary.free_bytes == hw.primary.total_bytes


def test_a_machine_without_a_gpu_is_a_clean_cpu_report(machine_without_gpu):
    hw = probe()
    assert hw.backend == "cpu"
    assert hw.ram_total_bytes > 0 and hw.ram_available_bytes > 0 and hw.cpu_cores >= 1
    assert hw.primary.total_bytes == hw.ram_total_bytes
    assert "torch" in hw.versions and hw.versions["torch"] != "not installed"
    # MLX's libraries only where installed (the test extra installs mlx[cpu] here)
    import importlib.util

    mlx = {n for n in ("mlx", "mlx-lm") if importlib.util.find_spec(n.replace("-", "_")) is not None}
    assert hw.versions.keys() == {"torch", "transformers", "peft", "trl", "bitsandbytes"} | mlx
    assert hw.cpu_name
    live = sample_devices(hw)
    assert len(live) == 1 and 0 < live[0].free_bytes <= live[0].total_bytes
    assert describe(hw)[0].startswith("Backend: cpu")
    assert any(n.startswith("NVML failed to initialise") for n in hw.notes), hw.notes


def test_describe_rtx_4090(use):
    use([RTX_4090])
    lines = describe(probe())
    text = "\n".join(lines)
    assert lines[0] == "Backend: cuda (NVIDIA, driver 550.54.14, CUDA 12.4)"
    assert "GPU 0: NVIDIA GeForce RTX 4090, 24.0 GB total, 22.7 GB free" in lines
    for fact in ("compute capability 8.9", "45 °C", "7% utilisation", "32 W of 450 W",
                 "System RAM:", "CPU:", "torch "):
        assert fact in text, fact


def test_pci_bus_ids_compare_across_spellings():
    assert hardware._pci_key("00000000:0A:00.0") == hardware._pci_key("0000:0a:00.0")
    assert hardware._pci_key("00000000:0A:00.0") != hardware._pci_key("0000:0b:00.0")


def test_sysctl_failure_is_none():
    assert hardware._sysctl("no.such.key.localtune") is None


A100_MIG = FakeGPU("NVIDIA A100-SXM4-80GB", 81920 * MiB, 0, "GPU-a100dddd-0000-0000-0000-000000000004",
                   "00000000:07:00.0", cc=(8, 0), temp=52, util=None, power_mw=180_000, limit_mw=400_000,
                   mig=[FakeMig("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40192 * MiB, 512 * MiB,
                                "MIG-5b3c0000-1111-2222-3333-444444444444"),
                        FakeMig("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40192 * MiB, 30000 * MiB,
                                "MIG-7d9e0000-5555-6666-7777-888888888888")])


def _cuda_view_of_mig(card: FakeGPU) -> list[tuple[str, str]]:
    """What cuDeviceGetUuid_v2 and cuDeviceGetPCIBusId report for a card split into MIG slices:
    one CUDA device per slice, each with the slice's UUID (our formatter writes 'GPU-' before
    the 16 raw bytes) and the card's bus id."""
    return [("GPU-" + m.uuid[4:], cuda_bus_id(card.bus_id)) for m in card.mig or []]


def test_a_mig_slice_is_budgeted_with_its_own_memory_not_its_cards(use, tmp_path):
    from localtune.models import resolve_model
    from localtune.plan import make_plan

    use([A100_MIG], cuda=_cuda_view_of_mig(A100_MIG))
    hw = probe()
    assert hw.backend == "cuda" and [d.index for d in hw.devices] == [0, 1]
    first, second = hw.devices
    assert first.name == "NVIDIA A100-SXM4-80GB MIG 3g.40gb" and first.mig_index == 0 and second.mig_index == 1
    assert gb(first.total_bytes) == 39.2  # the slice (40192 MiB), not the card's 80 GB
    assert second.free_bytes == (40192 - 30000 - 300) * MiB  # the second slice is mostly in use
    assert first.compute_capability == "8.0" and first.uuid.startswith("MIG-")
    # the plan budgets the slice CUDA will train on (device 0) and matches a profile by its size
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, '
                                          '"num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 256}')
    plan = make_plan(hw, resolve_model(str(tmp_path)))
    assert plan.profile.name == "cuda-48gb"
    assert plan.budget_bytes == (40192 - 512 - 300) * MiB - int(40192 * MiB * HEADROOM_FRAC)
    # live readings: the slice's memory, the card's temperature and power, no per-slice utilisation
    live = sample_devices(hw)[1]
    assert live.free_bytes == (40192 - 30000 - 300) * MiB and live.temperature_c == 52.0 and live.power_w == 180.0
    assert live.utilization_pct is None
    assert "GPU 1: NVIDIA A100-SXM4-80GB MIG 3g.40gb, 39.2 GB total" in "\n".join(describe(hw))


def test_cuda_visible_devices_may_name_a_mig_slice(use, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", A100_MIG.mig[1].uuid)
    use([A100_MIG], cuda=None)  # no driver API: the environment variable is read
    hw = probe()
    assert [(d.index, d.mig_index) for d in hw.devices] == [(0, 1)]
