"""Fakes for what this machine lacks: an NVIDIA driver (NVML and the CUDA driver API).

The fake NVML keeps the real nvidia-ml-py error classes and constants, so
`except pynvml.NVMLError` behaves as it will on a real machine. `install_gpus` puts it in
place for `localtune.hardware.probe()`."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from types import SimpleNamespace

import pynvml

from localtune import hardware

MiB = 1024**2


@dataclass
class FakeMig:
    """One MIG slice (a GPU instance) of a FakeGPU, as NVML's MIG device handle reads it."""

    name: str  # NVML names a slice after its card and profile: 'NVIDIA A100-SXM4-80GB MIG 3g.40gb'
    total: int
    used: int
    uuid: str  # 'MIG-...'


@dataclass
class FakeGPU:
    name: str
    total: int
    used: int
    uuid: str
    bus_id: str  # as NVML writes it: '00000000:01:00.0'
    cc: tuple[int, int] = (8, 6)
    temp: int | None = 40
    util: int | None = 0
    power_mw: int | None = 30_000
    limit_mw: int | None = 300_000
    mig: list[FakeMig] | None = None
    """MIG mode on, with these slices (None: MIG off)."""
    processes: list[tuple[int, int | None]] | None = None
    """(pid, bytes) of the compute processes on the card, as nvmlDeviceGetComputeRunningProcesses
    lists them (bytes None: a driver that hides per-process figures)."""


def fake_nvml(gpus: list[FakeGPU], *, v2: bool = True, init_error: int | None = None):
    """A pynvml module over `gpus`, listed in NVML (PCI bus) order."""
    nv = types.ModuleType("pynvml")
    for k, v in vars(pynvml).items():
        if k.startswith(("NVMLError", "NVML_")) or k == "nvmlMemory_v2":
            setattr(nv, k, v)
    nv.calls = []

    def init():
        if init_error is not None:
            raise pynvml.NVMLError(init_error)

    def opt(value):
        if value is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def memory(h, version=None):
        nv.calls.append(("memory", version))
        if version is not None and not v2:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        reserved = 300 * MiB if version else 0  # v2 reports the driver's reserve apart
        return SimpleNamespace(total=h.total, used=h.used, free=h.total - h.used - reserved)

    nv.nvmlInit = init
    nv.nvmlShutdown = lambda: None
    nv.nvmlSystemGetDriverVersion = lambda: "550.54.14"
    nv.nvmlSystemGetCudaDriverVersion = lambda: 12040
    nv.nvmlDeviceGetCount = lambda: len(gpus)
    nv.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    nv.nvmlDeviceGetName = lambda h: h.name
    nv.nvmlDeviceGetUUID = lambda h: h.uuid
    # ctypes gives the bus id as bytes
    nv.nvmlDeviceGetPciInfo = lambda h: SimpleNamespace(busId=h.bus_id.encode())
    nv.nvmlDeviceGetMemoryInfo = memory
    nv.nvmlDeviceGetCudaComputeCapability = lambda h: h.cc
    nv.nvmlDeviceGetTemperature = lambda h, sensor: opt(h.temp)
    nv.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=opt(h.util), memory=0)
    nv.nvmlDeviceGetPowerUsage = lambda h: opt(h.power_mw)
    nv.nvmlDeviceGetEnforcedPowerLimit = lambda h: opt(h.limit_mw)
    nv.nvmlDeviceGetMigMode = lambda h: (1, 1) if h.mig is not None else (0, 0)
    nv.nvmlDeviceGetMaxMigDeviceCount = lambda h: 7 if h.mig is not None else 0

    def mig_handle(h, j):
        if h.mig is None or j >= len(h.mig):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return h.mig[j]

    nv.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [SimpleNamespace(pid=pid, usedGpuMemory=used)
                                                         for pid, used in (h.processes or [])]
    return nv


def cuda_bus_id(nvml_bus_id: str) -> str:
    """The CUDA driver's spelling of a bus id: a 4-digit domain, lower case here on purpose."""
    return nvml_bus_id[4:].lower()


def install_gpus(monkeypatch, gpus, cuda=..., **kw):
    """Install a fake NVML and a fake CUDA driver view (default: every GPU, in NVML order)."""
    nv = fake_nvml(gpus, **kw)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    if cuda is ...:
        cuda = [(g.uuid, cuda_bus_id(g.bus_id)) for g in gpus]
    monkeypatch.setattr(hardware, "_cuda_driver_devices", lambda: cuda)
    monkeypatch.setattr(hardware, "_sampling_nvml", None)
    return nv


RTX_4090 = FakeGPU("NVIDIA GeForce RTX 4090", 24564 * MiB, 1024 * MiB,
                   "GPU-4090aaaa-0000-0000-0000-000000000001", "00000000:01:00.0",
                   cc=(8, 9), temp=45, util=7, power_mw=31_500, limit_mw=450_000)
RTX_A6000 = FakeGPU("NVIDIA RTX A6000", 49140 * MiB, 512 * MiB,
                    "GPU-a6000bbb-0000-0000-0000-000000000002", "00000000:41:00.0",
                    cc=(8, 6), temp=None, util=None, power_mw=None, limit_mw=None)
RTX_3060 = FakeGPU("NVIDIA GeForce RTX 3060", 12288 * MiB, 256 * MiB,
                   "GPU-3060cccc-0000-0000-0000-000000000003", "00000000:0A:00.0")
