"""The dtype and device decisions for the machines localtune is for, with faked device facts.

This machine has no NVIDIA card and no Mac, so each CUDA and Apple decision is driven here
from the facts the real device would report: a compute capability (a T4 is 7.5, an RTX 4090
8.9), a macOS version, which GPU the plan chose. The worker's functions that act on them
(`_use_device`, `_load_model`, `_hardware_event`, `_peak_memory_bytes`, `_is_oom`) run against
a faked `torch.cuda` that records what it was asked, as the NVML fakes record their calls.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from localtune import worker
from localtune.knobs import Knobs
from localtune.memory import estimate
from localtune.models import shape_from_config
from localtune.precision import DeviceFacts, precision_for

T4 = DeviceFacts("cuda", compute_capability=(7, 5), flash_attn_installed=True)
RTX_2080 = DeviceFacts("cuda", compute_capability=(7, 5))
RTX_4090 = DeviceFacts("cuda", compute_capability=(8, 9), flash_attn_installed=True)
RTX_4090_NO_FLASH = DeviceFacts("cuda", compute_capability=(8, 9), flash_attn_installed=False)
MAC_13 = DeviceFacts("mps", macos_version=(13, 6))
MAC_14 = DeviceFacts("mps", macos_version=(14, 2))

QLORA = Knobs(load_in_4bit=True, bnb_4bit_compute_dtype="bfloat16", bf16=True)
LORA16 = Knobs(load_in_4bit=False, bf16=True)


# ---------------------------------------------------------------- bf16 only where it is computed


@pytest.mark.parametrize("facts", [T4, RTX_2080], ids=["T4", "RTX-2080"])
def test_cards_before_ampere_train_in_float16_even_when_bf16_is_asked(facts):
    p = precision_for(LORA16, facts)
    assert (p.weights_dtype, p.compute_dtype) == ("float16", "float16")
    assert (p.trainer_bf16, p.trainer_fp16) == (False, True)


def test_qlora_compute_dtype_follows_the_card_not_the_profile():
    # the 24 GB profile says bfloat16; a T4 has no bf16, so 4-bit weights are dequantised to float16
    assert precision_for(QLORA, T4).bnb_compute == "float16"
    assert precision_for(QLORA, RTX_4090).bnb_compute == "bfloat16"
    # a profile that says float16 on a bf16 card gets the card's bf16, so both sides of a matmul agree
    assert precision_for(QLORA.replace(bnb_4bit_compute_dtype="float16"), RTX_4090).bnb_compute == "bfloat16"
    # float32 is kept: the slow, exact choice runs everywhere
    assert precision_for(QLORA.replace(bnb_4bit_compute_dtype="float32"), T4).bnb_compute == "float32"


def test_ampere_and_later_train_in_bf16_and_describe_it():
    p = precision_for(QLORA, RTX_4090)
    assert (p.weights_dtype, p.trainer_bf16, p.trainer_fp16) == ("bfloat16", True, False)
    assert p.describe() == "nf4 weights, bfloat16 compute"
    assert precision_for(QLORA, T4).describe() == "nf4 weights, float16 compute"


def test_bf16_off_on_cuda_means_float16():
    p = precision_for(LORA16.replace(bf16=False), RTX_4090)
    assert (p.weights_dtype, p.trainer_fp16) == ("float16", True)


# ---------------------------------------------------------------- flash-attention 2


def test_flash_attention_only_on_ampere_in_16_bits_when_installed():
    assert precision_for(QLORA, RTX_4090).attn_implementation == "flash_attention_2"
    assert precision_for(LORA16.replace(bf16=False), RTX_4090).attn_implementation == "flash_attention_2"  # fp16
    assert precision_for(QLORA, T4).attn_implementation is None  # compute capability 7.5
    assert precision_for(QLORA, RTX_4090_NO_FLASH).attn_implementation is None
    # 4-bit weights dequantised to float32: flash-attn has no float32 kernel
    assert precision_for(QLORA.replace(bnb_4bit_compute_dtype="float32"), RTX_4090).attn_implementation is None


def test_padding_free_batches_on_cuda_follow_flash_attention():
    assert worker._padding_free("cuda", precision_for(QLORA, RTX_4090)) is True
    assert worker._padding_free("cuda", precision_for(QLORA, T4)) is False
    assert worker._padding_free("mps", precision_for(LORA16, MAC_14)) is False


# ---------------------------------------------------------------- Apple


def test_apple_before_macos_14_trains_in_float32_and_the_estimate_counts_4_bytes(tiny_llama_dir):
    shape = shape_from_config(json.loads((tiny_llama_dir / "config.json").read_text()), "config.json")
    assert precision_for(LORA16, MAC_13).weights_dtype == "float32"
    assert precision_for(LORA16, MAC_14).weights_dtype == "bfloat16"
    assert precision_for(LORA16.replace(bf16=False), MAC_14).weights_dtype == "float32"
    old, new = estimate(shape, LORA16, MAC_13), estimate(shape, LORA16, MAC_14)
    off = estimate(shape, LORA16.replace(bf16=False), MAC_14)
    # tiny Llama: 2 blocks of hidden 64, untied embeddings of 256 x 64: every weight in float32 is twice the bf16
    params = old.base_params
    assert new.weights_bytes == 2 * params and old.weights_bytes == 4 * params == off.weights_bytes
    assert old.details["compute_dtype_bytes"] == 4 and new.details["compute_dtype_bytes"] == 2


# ---------------------------------------------------------------- the live facts and the plan's device


class FakeCuda:
    """`torch.cuda` as far as the worker uses it, on a machine with a T4 as device 0 and an RTX
    4090 as device 1; every call is recorded with the device it was asked about."""

    CAPABILITY = {0: (7, 5), 1: (8, 9)}

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.current = 0

    def _index(self, device) -> int:
        if device is None:
            return self.current
        return device.index if isinstance(device, torch.device) else int(device)

    def set_device(self, device) -> None:
        self.calls.append(("set_device", self._index(device)))
        self.current = self._index(device)

    def current_device(self) -> int:
        return self.current

    def get_device_capability(self, device=None):
        self.calls.append(("get_device_capability", self._index(device)))
        return self.CAPABILITY[self._index(device)]

    def mem_get_info(self, device=None):
        self.calls.append(("mem_get_info", self._index(device)))
        return (10 << 30, 24 << 30) if self._index(device) == 1 else (1 << 30, 16 << 30)

    def max_memory_allocated(self, device=None):
        self.calls.append(("max_memory_allocated", self._index(device)))
        return 7 << 30 if self._index(device) == 1 else 123


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    for name in ("set_device", "current_device", "get_device_capability", "mem_get_info", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


def test_the_plan_device_is_the_training_device(fake_cuda, tmp_path):
    plan = {"hardware": {"backend": "cuda", "devices": [{"index": 1, "name": "NVIDIA GeForce RTX 4090"}]}}
    device = worker._device_of("cuda", plan)
    assert device == "cuda:1"
    worker._use_device(device)
    assert fake_cuda.calls == [("set_device", 1)]
    # the live facts are the 4090's (8.9), not device 0's T4 (7.5)
    facts = DeviceFacts.live("cuda", worker.torch_index(device))
    assert facts.compute_capability == (8, 9) and facts.bf16_native
    assert ("get_device_capability", 1) in fake_cuda.calls


def test_memory_readings_are_taken_on_the_plan_device(fake_cuda, monkeypatch, tmp_path):
    from localtune.events import read_events
    from localtune.hardware import Device, Hardware
    from localtune.runs import RunDir

    run = RunDir(tmp_path)
    hw = Hardware(backend="cuda", devices=[Device("NVIDIA GeForce RTX 4090", 24 << 30, 20 << 30, index=1)],
                  ram_total_bytes=64 << 30, ram_available_bytes=32 << 30, cpu_cores=8)
    monkeypatch.setattr("localtune.hardware.sample_devices", lambda h: [replace_live(h.devices[0])])
    worker._hardware_event(run, "cuda", hw, "cuda:1")
    assert worker._peak_memory_bytes("cuda:1") == 7 << 30
    assert ("mem_get_info", 1) in fake_cuda.calls and ("max_memory_allocated", 1) in fake_cuda.calls
    assert not [c for c in fake_cuda.calls if c[1] == 0], fake_cuda.calls
    (e,) = read_events(run.events_path)
    assert (e["memory_used_bytes"], e["memory_total_bytes"]) == (14 << 30, 24 << 30)
    assert e["temperature_c"] == 61.0


def replace_live(d):
    from dataclasses import replace

    return replace(d, temperature_c=61.0, utilization_pct=97.0, power_w=320.0)


def test_the_model_loads_as_the_card_computes(monkeypatch):
    """What `from_pretrained` is asked for: QLoRA on a T4 dequantises to float16 and uses sdpa; on
    a 4090 with flash-attn installed, bf16 and flash-attention 2; both on the plan's GPU."""
    from transformers import AutoModelForCausalLM

    seen = []

    def fake_from_pretrained(path, **kw):
        seen.append(kw)
        return SimpleNamespace(config=SimpleNamespace(use_cache=True), is_loaded_in_4bit=True)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    worker._load_model("m", QLORA, precision_for(QLORA, T4), "cuda:1", False)
    worker._load_model("m", QLORA, precision_for(QLORA, RTX_4090), "cuda:0", False)
    t4, ada = seen
    assert t4["dtype"] == torch.float16 and t4["quantization_config"].bnb_4bit_compute_dtype == torch.float16
    assert "attn_implementation" not in t4 and t4["device_map"] == {"": "cuda:1"}
    assert ada["dtype"] == torch.bfloat16 and ada["quantization_config"].bnb_4bit_compute_dtype == torch.bfloat16
    assert ada["attn_implementation"] == "flash_attention_2" and ada["device_map"] == {"": "cuda:0"}
    assert t4["use_safetensors"] is True and t4["trust_remote_code"] is False


# ---------------------------------------------------------------- out of memory, in every form


@pytest.mark.parametrize("message", [
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.2 GB)",
])
def test_library_allocation_failures_count_as_out_of_memory(message):
    assert worker._is_oom(RuntimeError(message))
    assert worker._is_oom(torch.AcceleratorError(message)) if hasattr(torch, "AcceleratorError") else True


def test_other_cuda_errors_are_not_out_of_memory():
    assert worker._is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not worker._is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not worker._is_oom(ValueError("CUBLAS_STATUS_ALLOC_FAILED"))  # not an error torch raises


# ---------------------------------------------------------------- the probe's facts reach the planner


def test_plan_facts_come_from_the_probed_card(monkeypatch):
    from localtune.hardware import probe
    from tests.fakes import RTX_4090 as FAKE_4090
    from tests.fakes import FakeGPU, MiB, install_gpus

    t4 = FakeGPU("Tesla T4", 15360 * MiB, 256 * MiB, "GPU-7e5a0000-0000-0000-0000-000000000009", "00000000:05:00.0",
                 cc=(7, 5))
    install_gpus(monkeypatch, [t4, FAKE_4090])
    hw = probe()
    assert DeviceFacts.from_hardware(hw).compute_capability == (7, 5)
    assert DeviceFacts.from_hardware(hw, hw.devices[1]).compute_capability == (8, 9)
    assert not DeviceFacts.from_hardware(hw).bf16_native


def test_unknown_facts_of_a_planned_machine_assume_todays_hardware():
    assert DeviceFacts("cuda").bf16_native and DeviceFacts("mps").bf16_native
    assert not DeviceFacts("cpu").bf16_native


# ---------------------------------------------------------------- chat after a run that needed 4 bits


def _plan(budget_gb: float, index: int = 1) -> dict:
    from tests.test_memory import LLAMA_31_8B

    return {"hardware": {"backend": "cuda", "devices": [{"index": index}]},
            "model": {"shape": LLAMA_31_8B.to_dict()}, "budget_bytes": int(budget_gb * 2**30)}


def test_chat_loads_the_base_in_4_bits_where_16_bits_would_not_fit_the_runs_budget():
    from localtune.chat import chat_loading

    how = chat_loading(_plan(10.8), QLORA, cuda_available=True, mps_available=False, facts=RTX_4090)
    # Llama-3.1-8B in bf16 is 14.96 GB: more than a 12 GB card's budget
    assert (how.device, how.dtype, how.load_in_4bit, how.bnb_compute) == ("cuda:1", "bfloat16", True, "bfloat16")
    assert "would not fit" in how.reason and "14.96" not in how.reason and "15.0 GB" in how.reason
    # on a T4 the 4-bit weights are dequantised to float16, as in training
    t4 = chat_loading(_plan(14.0, index=0), QLORA, cuda_available=True, mps_available=False, facts=T4)
    assert (t4.device, t4.dtype, t4.load_in_4bit, t4.bnb_compute) == ("cuda:0", "float16", True, "float16")


def test_chat_loads_16_bits_where_they_fit_and_on_the_cpu_when_the_gpu_is_gone():
    from localtune.chat import chat_loading

    roomy = chat_loading(_plan(44.0), QLORA, cuda_available=True, mps_available=False, facts=RTX_4090)
    assert (roomy.device, roomy.dtype, roomy.load_in_4bit) == ("cuda:1", "bfloat16", False)
    lora = chat_loading(_plan(10.8), LORA16, cuda_available=True, mps_available=False, facts=T4)
    assert (lora.dtype, lora.load_in_4bit) == ("float16", False)
    gone = chat_loading(_plan(10.8), QLORA, cuda_available=False, mps_available=False)
    assert (gone.device, gone.dtype, gone.load_in_4bit) == ("cpu", "float32", False)
