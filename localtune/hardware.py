"""Probe the machine: which accelerator, how much memory, what live sampling can read.

`probe()` returns one `Hardware` value. NVIDIA GPUs are read through NVML (nvidia-ml-py),
which never creates a CUDA context, so probing from the UI costs no GPU memory and does not
claim the card the worker will use. Apple Silicon is read through `torch.mps` and `psutil`;
a CPU-only machine through `psutil`. A machine without an accelerator gives a clean CPU
report, never an error.

NVML numbers GPUs in PCI bus order, while CUDA (and so torch) puts the fastest first and
renumbers under CUDA_VISIBLE_DEVICES. The probe asks the CUDA driver API (`cuInit`, which
creates no context) for each visible device's UUID and PCI bus id, matches them to NVML's
devices, and returns the devices in CUDA order: `Device.index` is what `cuda:N` means in the
worker. Library versions come from package metadata; nothing heavy is imported.

Memory is reported in bytes; `describe` shows it in GB of 2**30 bytes, so that a card sold
as 24 GB (24564 MiB in nvidia-smi) shows as 24.0 GB.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import psutil

GiB = 1024**3


@dataclass
class Device:
    """One accelerator (or the CPU's RAM when there is none)."""

    name: str
    """Marketing name, e.g. 'NVIDIA GeForce RTX 4090' or 'Apple M2 Pro'."""
    total_bytes: int
    """Memory the device has."""
    free_bytes: int
    """Memory free now (for Apple: the recommended working set minus what is in use)."""
    index: int | None = None
    """CUDA ordinal (as torch numbers devices in this process), None where not CUDA."""
    nvml_index: int | None = None
    """NVML's own index (PCI bus order); differs from `index` under CUDA_VISIBLE_DEVICES. For
    a MIG slice: its parent card's."""
    mig_index: int | None = None
    """A MIG slice of an A100/H100 (a GPU instance CUDA sees as a device of its own): its index
    on the parent card. Its memory is the slice's; temperature and power are the whole card's."""
    uuid: str | None = None
    pci_bus_id: str | None = None
    compute_capability: str | None = None
    """'8.9' for an RTX 4090; NVIDIA only."""
    temperature_c: float | None = None
    utilization_pct: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    recommended_max_bytes: int | None = None
    """Apple only: Metal's recommended maximum working set."""


@dataclass
class Hardware:
    """What the probe found: the backend localtune will train on and its devices."""

    backend: str
    """'cuda', 'mps' or 'cpu'."""
    devices: list[Device]
    """Accelerators in CUDA order; for 'cpu' a single entry describing system RAM."""
    ram_total_bytes: int
    ram_available_bytes: int
    cpu_cores: int
    """Physical cores (logical when psutil cannot tell)."""
    cpu_name: str = ""
    driver_version: str | None = None
    """NVIDIA driver version."""
    cuda_driver_version: str | None = None
    """Highest CUDA version the NVIDIA driver supports, e.g. '12.4'."""
    chip: str | None = None
    """Apple chip name, e.g. 'Apple M2 Pro'."""
    macos_version: str | None = None
    """Apple only: the macOS version, e.g. '14.4' (MPS computes bfloat16 from 14)."""
    versions: dict[str, str] = field(default_factory=dict)
    """Versions of torch, transformers, peft, trl, bitsandbytes (or 'not installed')."""
    notes: list[str] = field(default_factory=list)
    """Why a richer probe fell back (e.g. 'NVML failed to initialise: ...')."""

    @property
    def primary(self) -> Device:
        """The device training runs on (CUDA device 0, the Mac's GPU, or RAM)."""
        return self.devices[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Hardware:
        d = dict(d)
        d["devices"] = [Device(**x) for x in d["devices"]]
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# probe

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes")
MLX_LIBRARIES = ("mlx", "mlx-lm")
"""The MLX engine's libraries: reported on a Mac always (installed or not), elsewhere when installed."""
_LIVE_FIELDS = ("temperature_c", "utilization_pct", "power_w", "power_limit_w")


def probe() -> Hardware:
    """Find the backend localtune will train on: cuda, else mps, else cpu. Never raises for a
    missing or broken driver; the reason for each fallback lands in `Hardware.notes`."""
    notes: list[str] = []
    vm = psutil.virtual_memory()
    common: dict[str, Any] = dict(
        ram_total_bytes=vm.total,
        ram_available_bytes=vm.available,
        cpu_cores=psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
        cpu_name=_cpu_name(),
        versions=_versions(apple=_is_apple_silicon()),
        notes=notes,
    )
    # macOS has had no NVIDIA driver for years; looking for NVML there would only add a note.
    if sys.platform == "darwin":
        apple = _probe_apple(vm.total)
        if apple is not None:
            return Hardware(backend="mps", devices=[apple], chip=apple.name,
                            macos_version=platform.mac_ver()[0] or None, **common)
    else:
        nvidia = _probe_nvidia(notes)
        if nvidia is not None:
            devices, driver, cuda = nvidia
            return Hardware(
                backend="cuda",
                devices=devices,
                driver_version=driver,
                cuda_driver_version=cuda,
                **common,
            )
    ram = Device(name=common["cpu_name"], total_bytes=vm.total, free_bytes=vm.available)
    return Hardware(backend="cpu", devices=[ram], **common)


def _nvml() -> Any:
    """The pynvml module, imported late so that `import localtune.hardware` stays cheap
    (tests put a fake one in `sys.modules`)."""
    import pynvml

    return pynvml


def _probe_nvidia(notes: list[str]) -> tuple[list[Device], str | None, str | None] | None:
    try:
        nv = _nvml()
    except ImportError:
        notes.append("nvidia-ml-py is not installed, so NVIDIA GPUs were not looked for")
        return None
    try:
        nv.nvmlInit()
    except nv.NVMLError as e:
        notes.append(f"NVML failed to initialise: {e}; no NVIDIA GPU will be used")
        return None
    try:
        driver = _opt(nv, lambda: _s(nv.nvmlSystemGetDriverVersion()))
        cuda = _opt(nv, nv.nvmlSystemGetCudaDriverVersion)  # e.g. 12040 for CUDA 12.4
        gpus = []
        for i in range(nv.nvmlDeviceGetCount()):
            try:
                gpus.extend(_read_gpus(nv, i, notes))
            except nv.NVMLError as e:  # one lost or locked-down GPU should not hide the rest
                notes.append(f"NVIDIA GPU {i} (NVML index) could not be read: {e}")
    except nv.NVMLError as e:
        notes.append(f"NVML failed while reading the GPUs: {e}; no NVIDIA GPU will be used")
        return None
    finally:
        # NVML counts inits, so this does not close a session that sampling keeps open.
        try:
            nv.nvmlShutdown()
        except nv.NVMLError:
            pass
    if not gpus:
        return None
    devices = _in_cuda_order(gpus, notes)
    if not devices:
        notes.append(
            f"{len(gpus)} NVIDIA GPU(s) found but none is visible to CUDA here "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
        return None
    return devices, driver, f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None


def _read_gpus(nv: Any, i: int, notes: list[str]) -> list[Device]:
    """The card at NVML index `i`, or, when it is split into MIG slices, each slice: CUDA then
    sees the slices as its devices (never the card), and each has only its own memory, so a
    plan must budget the slice and not the card (NVML's memory reading on the card's handle
    is the whole card's)."""
    gpu = _read_gpu(nv, i)
    h = nv.nvmlDeviceGetHandleByIndex(i)
    mode = _opt(nv, lambda: nv.nvmlDeviceGetMigMode(h))  # (current, pending); NOT_SUPPORTED before Ampere
    if not mode or mode[0] != nv.NVML_DEVICE_MIG_ENABLE:
        return [gpu]
    slices = []
    for j in range(_opt(nv, lambda: nv.nvmlDeviceGetMaxMigDeviceCount(h)) or 0):
        try:
            mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
        except nv.NVMLError:  # NOT_FOUND: no GPU instance in this slot
            continue
        total, free = _memory(nv, mh)
        slices.append(replace(
            gpu, name=_opt(nv, lambda: _s(nv.nvmlDeviceGetName(mh))) or f"{gpu.name} MIG {j}",
            total_bytes=total, free_bytes=free, uuid=_opt(nv, lambda: _s(nv.nvmlDeviceGetUUID(mh))),
            mig_index=j, utilization_pct=None))  # NVML has no utilisation per slice
    if not slices:
        notes.append(f"{gpu.name} (NVML index {i}) is in MIG mode with no MIG instance: CUDA cannot use it")
    return slices


def _read_gpu(nv: Any, i: int) -> Device:
    h = nv.nvmlDeviceGetHandleByIndex(i)
    total, free = _memory(nv, h)
    cc = _opt(nv, lambda: nv.nvmlDeviceGetCudaComputeCapability(h))
    return Device(
        name=_s(nv.nvmlDeviceGetName(h)),
        total_bytes=total,
        free_bytes=free,
        nvml_index=i,
        uuid=_opt(nv, lambda: _s(nv.nvmlDeviceGetUUID(h))),
        pci_bus_id=_opt(nv, lambda: _s(nv.nvmlDeviceGetPciInfo(h).busId)),
        compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
        **_live(nv, h),
    )


def _memory(nv: Any, h: Any) -> tuple[int, int]:
    """(total, free) bytes. The v2 call leaves out memory the driver reserves, so its `free`
    is what an allocation can really get; drivers older than 510 only have v1."""
    try:
        m = nv.nvmlDeviceGetMemoryInfo(h, version=nv.nvmlMemory_v2)
    except (nv.NVMLError, AttributeError, TypeError):  # old driver, or an old nvidia-ml-py
        m = nv.nvmlDeviceGetMemoryInfo(h)
    return int(m.total), int(m.free)


def _live(nv: Any, h: Any) -> dict[str, float | None]:
    """What changes while training; each reading is optional (consumer cards and VMs lack some)."""
    power = _opt(nv, lambda: nv.nvmlDeviceGetPowerUsage(h))  # milliwatts
    limit = _opt(nv, lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h))
    temp = _opt(nv, lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
    util = _opt(nv, lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu)
    return dict(
        temperature_c=float(temp) if temp is not None else None,
        utilization_pct=float(util) if util is not None else None,
        power_w=power / 1000 if power is not None else None,
        power_limit_w=limit / 1000 if limit is not None else None,
    )


def _in_cuda_order(gpus: list[Device], notes: list[str]) -> list[Device]:
    """The NVML devices that CUDA sees, in CUDA's order, with `index` set to the CUDA ordinal.

    NVML numbers GPUs in PCI bus order; CUDA puts the fastest first and renumbers under
    CUDA_VISIBLE_DEVICES, so the two are matched by UUID or PCI bus id, never by index."""
    cuda = _cuda_driver_devices()
    if cuda is None:
        order: list[Device | None] = list(_visible_by_env(gpus))
        note = "CUDA driver API unavailable: CUDA's devices inferred from CUDA_VISIBLE_DEVICES"
        if len(order) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
            note += " in PCI bus order (CUDA itself may put the fastest GPU first)"
        notes.append(note)
    else:
        order = [_match(gpus, uuid, pci) for uuid, pci in cuda]
    devices = []
    for ordinal, gpu in enumerate(order):
        if gpu is None:
            notes.append(f"CUDA device {ordinal} has no NVML counterpart and is left out")
        else:
            devices.append(replace(gpu, index=ordinal))
    return devices


def _uuid_key(uuid: str) -> str:
    """The hex of a UUID without its 'GPU-' or 'MIG-' prefix: CUDA's driver API gives 16 raw
    bytes (for a MIG slice, the slice's UUID: cuDeviceGetUuid_v2), NVML writes 'GPU-...' for a
    card and 'MIG-...' for a slice."""
    u = uuid.strip().lower()
    return u[4:] if u[:4] in ("gpu-", "mig-") else u


def _match(gpus: list[Device], uuid: str | None, pci: str | None) -> Device | None:
    for g in gpus:
        if uuid and g.uuid and _uuid_key(g.uuid) == _uuid_key(uuid):
            return g
    if pci:  # drivers without cuDeviceGetUuid still have a bus id; MIG slices share their card's
        same_bus = [g for g in gpus if g.pci_bus_id and _pci_key(g.pci_bus_id) == _pci_key(pci)]
        if len(same_bus) == 1:
            return same_bus[0]
    return None


def _pci_key(bus_id: str) -> tuple[int, int, int] | str:
    """(domain, bus, device): NVML writes '00000000:01:00.0', CUDA '0000:01:00.0'."""
    try:
        domain, bus, rest = bus_id.strip().split(":")
        return int(domain, 16), int(bus, 16), int(rest.split(".")[0], 16)
    except ValueError:
        return bus_id.strip().lower()


def _visible_by_env(gpus: list[Device]) -> list[Device]:
    """CUDA_VISIBLE_DEVICES read the way CUDA reads it: ordinals or 'GPU-' UUID prefixes,
    stopping at the first entry that names no device (or one already named)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return list(gpus)
    out: list[Device] = []
    for token in (t.strip() for t in env.split(",")):
        if token.isdigit():
            found = [gpus[int(token)]] if int(token) < len(gpus) else []
        elif token.upper().startswith(("GPU-", "MIG-")):
            found = [g for g in gpus if (g.uuid or "").lower().startswith(token.lower())]
        else:
            found = []
        if len(found) != 1 or any(g is found[0] for g in out):
            break
        out.append(found[0])
    return out


def _cuda_driver_devices() -> list[tuple[str | None, str | None]] | None:
    """(uuid, PCI bus id) of each device CUDA sees, in CUDA order, or None when the driver
    API cannot be used. cuInit creates no context, so no GPU memory is taken and the worker
    still owns the card; it does honour CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER."""
    import ctypes

    try:
        lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return None
    rc = lib.cuInit(0)
    if rc == 100:  # CUDA_ERROR_NO_DEVICE: CUDA_VISIBLE_DEVICES hides every GPU
        return []
    count = ctypes.c_int()
    if rc != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return None
    get_uuid = getattr(lib, "cuDeviceGetUuid_v2", None) or getattr(lib, "cuDeviceGetUuid", None)
    out: list[tuple[str | None, str | None]] = []
    for ordinal in range(count.value):
        dev = ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(dev), ordinal) != 0:
            return None
        buf = ctypes.create_string_buffer(32)
        pci = buf.value.decode() if lib.cuDeviceGetPCIBusId(buf, 32, dev) == 0 else None
        raw = (ctypes.c_ubyte * 16)()
        uuid = None
        if get_uuid is not None and get_uuid(raw, dev) == 0:
            x = bytes(raw).hex()
            uuid = f"GPU-{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"
        out.append((uuid, pci))
    return out


def _probe_apple(ram_total: int) -> Device | None:
    try:
        import torch  # only here: importing torch takes seconds

        if not torch.backends.mps.is_available():
            return None
    except Exception:  # no torch, or a build without MPS
        return None
    recommended = _call(torch.mps.recommended_max_memory)
    allocated = _call(torch.mps.current_allocated_memory) or 0
    return Device(
        name=_sysctl("machdep.cpu.brand_string") or "Apple Silicon",
        total_bytes=ram_total,  # unified memory: the GPU shares system RAM
        free_bytes=max(0, (recommended or ram_total) - allocated),
        recommended_max_bytes=recommended,
    )


def _sysctl(key: str) -> str | None:
    try:
        r = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


def _cpu_name() -> str:
    # platform.processor() says only 'x86_64' on Linux and 'arm' on macOS, so ask those first.
    if sys.platform == "darwin":
        name = _sysctl("machdep.cpu.brand_string")
        if name:
            return name
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def _versions(apple: bool = False) -> dict[str, str]:
    """Library versions from package metadata: importing torch or bitsandbytes would cost
    seconds (and bitsandbytes may touch CUDA). MLX's on Apple Silicon (where it is the engine),
    elsewhere only when installed."""
    out = {}
    for name in LIBRARIES + MLX_LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name in LIBRARIES or apple:
                out[name] = "not installed"
    return out


def _opt(nv: Any, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except nv.NVMLError:
        return None


def _call(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:
        return None


def _s(x: Any) -> str:
    """nvidia-ml-py returns str from some calls and bytes from others (old versions: all)."""
    return x.decode(errors="replace") if isinstance(x, bytes) else str(x)


# ---------------------------------------------------------------------------------------------
# live sampling

_sampling_nvml: Any = None
"""The pynvml module initialised for sampling. It stays open: without persistence mode
nvmlInit can take a good fraction of a second, too slow to repeat every second."""


def sample_devices(hw: Hardware) -> list[Device]:
    """A fresh reading of `hw.devices`: free memory, and for NVIDIA also temperature,
    utilisation and power; for a CPU, CPU utilisation. Cheap enough to call every second.

    The readings are system-wide, so a dashboard in another process sees the worker's use.
    For Apple, free is system RAM available capped at the recommended working set, since
    torch.mps only counts the calling process's own allocations."""
    if hw.backend == "cuda":
        nv = _sampling_session()
        return [_sample_gpu(nv, d) for d in hw.devices]
    vm = psutil.virtual_memory()
    if hw.backend == "mps":
        return [replace(d, free_bytes=min(vm.available, d.recommended_max_bytes or vm.available))
                for d in hw.devices]
    busy = psutil.cpu_percent(interval=None)  # since the previous call; never blocks
    return [replace(d, total_bytes=vm.total, free_bytes=vm.available, utilization_pct=busy)
            for d in hw.devices]


def _sample_gpu(nv: Any, d: Device) -> Device:
    if nv is not None and d.nvml_index is not None:
        try:
            h = nv.nvmlDeviceGetHandleByIndex(d.nvml_index)
            if d.mig_index is None:
                total, free = _memory(nv, h)
                return replace(d, total_bytes=total, free_bytes=free, **_live(nv, h))
            # a MIG slice: its own memory; temperature and power are the card's, utilisation has no per-slice reading
            total, free = _memory(nv, nv.nvmlDeviceGetMigDeviceHandleByIndex(h, d.mig_index))
            return replace(d, total_bytes=total, free_bytes=free, **{**_live(nv, h), "utilization_pct": None})
        except nv.NVMLError:
            pass
    # No reading is better than a stale one shown as live.
    return replace(d, **dict.fromkeys(_LIVE_FIELDS))


def _sampling_session() -> Any:
    global _sampling_nvml
    try:
        nv = _nvml()
    except ImportError:
        return None
    if _sampling_nvml is not nv:  # first call, or a different module (tests swap it)
        try:
            nv.nvmlInit()
        except nv.NVMLError:
            return None
        _sampling_nvml = nv
    return nv


# ---------------------------------------------------------------------------------------------
# report


def _gb(n: int | None) -> str:
    return f"{(n or 0) / GiB:.1f} GB"


def gpu_live_facts(d: Device) -> list[str]:
    """A GPU's live readings in words, those it has: '45 °C', '7% utilisation', '32 W of 450 W'."""
    facts = []
    if d.temperature_c is not None:
        facts.append(f"{d.temperature_c:.0f} °C")
    if d.utilization_pct is not None:
        facts.append(f"{d.utilization_pct:.0f}% utilisation")
    if d.power_w is not None:
        limit = f" of {d.power_limit_w:.0f} W" if d.power_limit_w is not None else ""
        facts.append(f"{d.power_w:.0f} W{limit}")
    return facts


def describe(hw: Hardware) -> list[str]:
    """Lines for `localtune probe`: what a person checks before training (which device, how
    much memory is free, driver and library versions, and why a richer probe fell back)."""
    lines = []
    if hw.backend == "cuda":
        drv = [f"driver {hw.driver_version}"] if hw.driver_version else []
        drv += [f"CUDA {hw.cuda_driver_version}"] if hw.cuda_driver_version else []
        lines.append("Backend: cuda (NVIDIA" + "".join(f", {x}" for x in drv) + ")")
        for d in hw.devices:
            lines.append(f"GPU {d.index}: {d.name}, {_gb(d.total_bytes)} total, "
                         f"{_gb(d.free_bytes)} free")
            facts = [f"compute capability {d.compute_capability}"] if d.compute_capability else []
            facts += gpu_live_facts(d)
            if facts:
                lines.append("  " + ", ".join(facts))
    elif hw.backend == "mps":
        d = hw.primary
        lines.append("Backend: mps (Apple GPU through Metal)")
        lines.append(f"Chip: {hw.chip or d.name}, {_gb(d.total_bytes)} unified memory")
        if d.recommended_max_bytes:
            lines.append(f"  recommended working set {_gb(d.recommended_max_bytes)}, "
                         f"{_gb(d.free_bytes)} free")
    else:
        lines.append("Backend: cpu (no GPU in use; training runs on the CPU)")
    lines.append(f"System RAM: {_gb(hw.ram_total_bytes)} total, "
                 f"{_gb(hw.ram_available_bytes)} available")
    lines.append(f"CPU: {hw.cpu_name or 'CPU'}, {hw.cpu_cores} cores")
    lines.append("Libraries: " + ", ".join(f"{k} {v}" for k, v in hw.versions.items()))
    lines.extend(f"Note: {n}" for n in hw.notes)
    return lines


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 AVX512-BF16 or AMX-BF16, read from
    /proc/cpuinfo on Linux): there bf16 autocast trains about twice as fast as float32, where
    elsewhere it is emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False
