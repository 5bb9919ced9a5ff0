"""Planning for several GPUs (or several processes on the CPU): which devices, which mode
(single, ddp, fsdp) and why, the budget and the batch per rank, and FSDP's per-card estimate.

Machines are built as `Hardware` values directly (the probe is tested in test_hardware.py);
models are described by config.json alone, as `localtune plan` reads them."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from localtune.errors import UserError
from localtune.hardware import Device, Hardware
from localtune.knobs import Knobs
from localtune.memory import estimate
from localtune.models import resolve_model
from localtune.parallel import Parallel
from localtune.plan import HEADROOM_FRAC, make_plan
from localtune.profiles import get_profile
from tests.fakes import MiB
from tests.helpers import one_line_error, run
from tests.test_plan import LLAMA_8B, LLAMA_70B, model_dir

GiB = 1024**3
CARD_24 = 24576 * MiB  # an RTX 3090 / 4090 as NVML reports it: 24.0 GB
LLAMA2_70B = {**LLAMA_70B, "vocab_size": 32000}
"""Llama-2-70B's shape: Answer.AI's FSDP-QLoRA case (its 32k vocabulary keeps the embeddings small)."""


def gpu(i: int, name: str = "NVIDIA GeForce RTX 3090", total: int = CARD_24, used: int = 300 * MiB) -> Device:
    return Device(name=name, total_bytes=total, free_bytes=total - used, index=i, nvml_index=i,
                  compute_capability="8.6")


def cuda(*devices: Device) -> Hardware:
    return Hardware(backend="cuda", devices=list(devices), ram_total_bytes=128 * GiB,
                    ram_available_bytes=120 * GiB, cpu_cores=16)


def two_3090s_and_a_3060() -> Hardware:
    return cuda(gpu(0), gpu(1), gpu(2, "NVIDIA GeForce RTX 3060", 12288 * MiB))


def cpu_box() -> Hardware:
    ram = Device(name="AMD EPYC", total_bytes=24 * GiB, free_bytes=22 * GiB)
    return Hardware(backend="cpu", devices=[ram], ram_total_bytes=24 * GiB, ram_available_bytes=22 * GiB,
                    cpu_cores=2, cpu_name="AMD EPYC")


def budget_of(d: Device) -> int:
    return d.free_bytes - int(d.total_bytes * HEADROOM_FRAC)


@pytest.fixture(scope="module")
def builtin():
    return resolve_model(None)  # the built-in model's shape, read once


# ---------------------------------------------------------------- which GPUs


def test_by_default_the_gpus_matching_gpu_0_train_and_an_odd_card_is_named_as_left_out(builtin):
    hw = two_3090s_and_a_3060()
    plan = make_plan(hw, builtin)
    par = plan.parallel
    assert (par.mode, par.devices, par.processes, par.nodes, par.world_size) == ("ddp", [0, 1], 2, 1, 2)
    assert par.reason.startswith("GPU 0 and 1 (2 x NVIDIA GeForce RTX 3090, 24.0 GB), every GPU here that matches GPU 0")
    assert "GPU 2 (NVIDIA GeForce RTX 3060) is left out: it does not match GPU 0 in model and memory" in par.reason
    assert plan.budget_bytes == budget_of(hw.devices[0])  # a 3090's budget, not the 3060's
    assert plan.profile.name == "cuda-24gb"


@pytest.mark.parametrize("spec, devices, budget_card", [
    ("all", [0, 1, 2], 2),   # the 3060 joins: every card gets its (smaller) budget
    ("1", [0], 0),           # a number is how many: the first one
    ("2", [0, 1], 0),
    ("0,2", [0, 2], 2),
    ("2, 0", [0, 2], 2),     # in CUDA order whatever the order given
    ("1,", [1], 1),          # GPU 1 alone
])
def test_gpus_picks_the_cards_and_the_smallest_budget_is_every_cards(builtin, spec, devices, budget_card):
    hw = two_3090s_and_a_3060()
    plan = make_plan(hw, builtin, gpus=spec)
    assert plan.parallel.devices == devices
    assert plan.parallel.mode == ("single" if len(devices) == 1 else "ddp")
    assert plan.budget_bytes == budget_of(hw.devices[budget_card])
    assert f"picked with --gpus {spec}" in plan.parallel.reason
    if budget_card == 2:
        assert plan.profile.name == "cuda-12gb"  # the profile of the smallest card picked


@pytest.mark.parametrize("spec, says", [
    ("7,", "there is no GPU 7"),
    ("0,3", "there is no GPU 3"),
    ("0,0", "a GPU is named twice"),
    ("abc", "expected all, a number of GPUs or a comma list"),
    ("0", "a number is how many GPUs to use (the first N), 1 to 3"),
    ("4", "a number is how many GPUs to use (the first N), 1 to 3"),
    ("-1", "expected all, a number of GPUs or a comma list"),
    ("", "expected all, a number of GPUs or a comma list"),
])
def test_a_bad_gpus_spec_is_refused_naming_the_gpus_there_are(builtin, spec, says):
    with pytest.raises(UserError) as e:
        make_plan(two_3090s_and_a_3060(), builtin, gpus=spec)
    msg = str(e.value)
    assert msg.startswith(f"--gpus {spec}: ") and says in msg and "\n" not in msg
    assert ("this machine has GPU 0 (NVIDIA GeForce RTX 3090, 24.0 GB), GPU 1 (NVIDIA GeForce RTX 3090, 24.0 GB), "
            "GPU 2 (NVIDIA GeForce RTX 3060, 12.0 GB)") in msg


def test_gpus_on_the_cpu_and_processes_on_cuda_are_refused(builtin):
    with pytest.raises(UserError, match=r"^--gpus picks NVIDIA GPUs; this machine trains on cpu \(--processes N"):
        make_plan(cpu_box(), builtin, gpus="all")
    with pytest.raises(UserError, match=r"^--processes 2 is for the CPU; on NVIDIA GPUs --gpus picks the GPUs"):
        make_plan(two_3090s_and_a_3060(), builtin, processes=2)
    for bad in (0, -1):
        with pytest.raises(UserError, match="--processes must be a whole number of at least 1"):
            make_plan(cpu_box(), builtin, processes=bad)
        with pytest.raises(UserError, match="--nodes must be a whole number of at least 1"):
            make_plan(cpu_box(), builtin, nodes=bad)
    mac = Hardware(backend="mps", devices=[Device("Apple M2", 16 * GiB, 10 * GiB, recommended_max_bytes=11 * GiB)],
                   ram_total_bytes=16 * GiB, ram_available_bytes=10 * GiB, cpu_cores=8, macos_version="14.5")
    with pytest.raises(UserError, match="--processes 2 runs several processes on the CPU; this machine trains on mps"):
        make_plan(mac, builtin, processes=2)
    # the default (1) is no request: accepted everywhere
    assert make_plan(two_3090s_and_a_3060(), builtin, processes=1).parallel.world_size == 2


def test_mig_slices_are_never_grouped(builtin):
    a = replace(gpu(0, "NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40192 * MiB), mig_index=0)
    b = replace(a, index=1, mig_index=1)
    plan = make_plan(cuda(a, b), builtin)
    assert plan.parallel.mode == "single" and plan.parallel.devices == [0]
    assert "GPU 1 (NVIDIA A100-SXM4-80GB MIG 3g.40gb) is left out: a MIG slice trains alone" in plan.parallel.reason
    with pytest.raises(UserError, match="a MIG slice trains alone"):
        make_plan(cuda(a, b), builtin, gpus="all")


# ---------------------------------------------------------------- data parallel


def test_the_builtin_model_on_two_24gb_cards_is_data_parallel_with_half_the_accumulation(builtin):
    one = make_plan(cuda(gpu(0)), builtin)
    two = make_plan(cuda(gpu(0), gpu(1)), builtin)
    assert one.parallel == Parallel(mode="single", processes=1, nodes=1, devices=[0],
                                    reason="GPU 0 (NVIDIA GeForce RTX 3090, 24.0 GB)")
    assert two.parallel.mode == "ddp" and two.world_size == 2
    k1, k2 = one.knobs, two.knobs
    assert (k1.per_device_train_batch_size, k1.gradient_accumulation_steps) == (2, 8)
    assert (k2.per_device_train_batch_size, k2.gradient_accumulation_steps) == (2, 4)
    assert two.effective_batch_size == one.effective_batch_size == 16
    # each card holds the whole model: the same estimate per card as on one card
    assert two.estimate.total_bytes == one.estimate.total_bytes and two.budget_bytes == one.budget_bytes
    (a,) = [a for a in two.adjustments if a.knob == "gradient_accumulation_steps"]
    assert (a.old, a.new, a.reason) == (8, 4, "2 GPUs: accumulation 8 -> 4 keeps the effective batch 16 = 2 x 4 x 2")
    assert "the plan fits one card (1.81 GB of the 21.31 GB budget per card)" in two.parallel.reason
    assert "holds the whole model and trains on its own share of every batch (data parallel)" in two.parallel.reason
    assert two.notes == []


def test_an_8b_model_that_fits_one_24gb_card_is_data_parallel_not_sharded(tmp_path):
    plan = make_plan(cuda(gpu(0), gpu(1)), model_dir(tmp_path, LLAMA_8B))
    assert plan.parallel.mode == "ddp" and plan.fits
    assert "fsdp_shards" not in plan.estimate.details


def test_nodes_multiply_the_ranks(builtin):
    plan = make_plan(cuda(gpu(0)), builtin, nodes=2)
    assert (plan.parallel.mode, plan.parallel.processes, plan.parallel.nodes, plan.world_size) == ("ddp", 1, 2, 2)
    assert plan.knobs.gradient_accumulation_steps == 4 and plan.effective_batch_size == 16
    assert "on each of 2 machines" in plan.parallel.reason
    (a,) = [a for a in plan.adjustments if a.knob == "gradient_accumulation_steps"]
    assert a.reason.startswith("2 ranks (1 GPU on each of 2 machines): accumulation 8 -> 4")
    four = make_plan(cuda(gpu(0), gpu(1)), builtin, nodes=2)
    assert four.world_size == 4 and four.knobs.gradient_accumulation_steps == 2 and four.effective_batch_size == 16


# ---------------------------------------------------------------- the batch over the ranks


def _with_batch(mb: int, acc: int):
    prof = get_profile("cuda-24gb")
    return replace(prof, knobs=prof.knobs.replace(per_device_train_batch_size=mb, gradient_accumulation_steps=acc))


def test_a_pinned_accumulation_is_kept_and_the_batch_grows_with_the_ranks(builtin):
    plan = make_plan(cuda(gpu(0), gpu(1)), builtin, pinned={"gradient_accumulation_steps": 8})
    assert plan.knobs.gradient_accumulation_steps == 8 and plan.knobs.per_device_train_batch_size == 2
    assert plan.effective_batch_size == 32
    assert not [a for a in plan.adjustments if a.knob == "gradient_accumulation_steps"]
    assert plan.notes == ["2 GPUs: gradient_accumulation_steps is set by you (8), so an optimizer step trains "
                          "2 x 8 x 2 = 32 rows, not the 16 of one device"]


def test_an_accumulation_the_ranks_do_not_divide_moves_to_the_micro_batch_exactly(builtin):
    """4 x 3 = 12 over 2 GPUs: 3 does not halve, so 3 x 2 x 2 = 12."""
    plan = make_plan(cuda(gpu(0), gpu(1)), builtin, profile=_with_batch(4, 3))
    assert (plan.knobs.per_device_train_batch_size, plan.knobs.gradient_accumulation_steps) == (3, 2)
    assert plan.effective_batch_size == 12 and plan.notes == []
    why = "2 GPUs: 3 micro-batches do not divide by 2; 3 x 2 x 2 keeps the effective batch 12"
    assert [(a.knob, a.old, a.new, a.reason) for a in plan.adjustments] == [
        ("per_device_train_batch_size", 4, 3, why), ("gradient_accumulation_steps", 3, 2, why)]


def test_a_batch_that_does_not_split_takes_the_nearest_larger_and_says_so(builtin):
    # 8 x 1 over 3 GPUs: accumulation 1 stays, 3 rows each: 9
    plan = make_plan(cuda(gpu(0), gpu(1), gpu(2)), builtin, profile=_with_batch(8, 1))
    assert (plan.knobs.per_device_train_batch_size, plan.knobs.gradient_accumulation_steps) == (3, 1)
    assert plan.effective_batch_size == 9
    assert plan.notes == ["the effective batch is 9 rows (3 x 1 x 3), not the 8 of one device: "
                          "8 does not split evenly over 3 ranks"]
    # 5 x 3 = 15 over 2: the micro-batch may not grow past 5, so 4 x 2 x 2 = 16
    odd = make_plan(cuda(gpu(0), gpu(1)), builtin, profile=_with_batch(5, 3))
    assert (odd.knobs.per_device_train_batch_size, odd.knobs.gradient_accumulation_steps) == (4, 2)
    assert odd.effective_batch_size == 16 and "not the 15 of one device" in odd.notes[0]


# ---------------------------------------------------------------- FSDP


def test_fsdp_estimate_with_one_shard_is_todays_estimate(tmp_path):
    shape = model_dir(tmp_path, LLAMA_8B).shape
    for k in (Knobs(), Knobs(load_in_4bit=True, optim="paged_adamw_8bit")):
        assert estimate(shape, k, "cuda", shards=1).to_dict() == estimate(shape, k, "cuda").to_dict()
    with pytest.raises(ValueError):
        estimate(shape, Knobs(), "cuda", shards=0)


def test_fsdp_divides_the_weights_and_the_adapter_not_the_activations(tmp_path):
    shape = model_dir(tmp_path, LLAMA2_70B).shape
    k = Knobs(load_in_4bit=True, per_device_train_batch_size=1, max_length=1024)
    one, two = estimate(shape, k, "cuda"), estimate(shape, k, "cuda", shards=2)
    d = two.details
    assert d["fsdp_shards"] == 2 and d["fsdp_unsharded_weights_bytes"] == one.weights_bytes
    # half of what FSDP shards, the 4-bit block constants whole on each card, plus the gathers
    rep, gathered = d["fsdp_replicated_bytes"], d["fsdp_gathered_bytes"]
    assert two.weights_bytes == -(-(one.weights_bytes - rep) // 2) + rep + gathered
    assert 0.02 < rep / one.weights_bytes < 0.04  # double-quantised constants: ~0.016 of 0.5 bytes per weight
    # gathered: one block twice (4-bit packed, its norms) and the root unit (embeddings, lm_head, norm in bf16)
    assert d["fsdp_root_bytes"] == (2 * 32000 * 8192 + 8192) * 2
    assert gathered == 2 * d["fsdp_block_bytes"] + d["fsdp_root_bytes"]
    assert round(one.weights_bytes / GiB, 2) == 33.87 and round(two.weights_bytes / GiB, 2) == 19.21
    assert two.adapter_bytes == -(-one.adapter_bytes // 2)
    assert (two.activations_bytes, two.logits_bytes, two.overhead_bytes) == (
        one.activations_bytes, one.logits_bytes, one.overhead_bytes)


def test_a_70b_model_on_two_24gb_cards_is_sharded_and_fits_per_card(tmp_path):
    """Llama-2-70B in 4 bits is 33.9 GB: no 24 GB card holds it (a 21.3 GB budget per card).
    Sharded, each card holds half of it, the block constants, a block twice and the embeddings:
    19.2 GB, leaving room only for 256 tokens at rank 4 (Answer.AI's 2 x 24 GB runs also
    offloaded the parameters to the CPU, which localtune does not plan)."""
    hw = cuda(gpu(0), gpu(1))
    model = model_dir(tmp_path, LLAMA2_70B)
    plan = make_plan(hw, model)
    assert plan.parallel.mode == "fsdp" and plan.parallel.devices == [0, 1] and plan.fits
    e = plan.estimate
    assert e.details["fsdp_shards"] == 2
    assert e.total_bytes <= plan.budget_bytes == budget_of(hw.devices[0])
    assert round(e.total_bytes / GiB, 2) == 21.26 and round(plan.budget_bytes / GiB, 2) == 21.31
    single_weights = e.details["fsdp_unsharded_weights_bytes"]
    assert abs(e.weights_bytes - e.details["fsdp_gathered_bytes"] - single_weights / 2) < 0.04 * single_weights
    assert (plan.knobs.load_in_4bit, plan.knobs.max_length, plan.knobs.r) == (True, 256, 4)
    assert plan.knobs.gradient_accumulation_steps == 8 and plan.effective_batch_size == 16
    r = plan.parallel.reason
    assert "the plan does not fit one card (35.66 GB > the 21.31 GB budget per card)" in r
    assert ("the 33.87 GB of 4-bit weights become 17.44 GB per card + 1.77 GB gathered while computing "
            "(one block twice, the embeddings and lm_head): 21.26 GB of the 21.31 GB budget per card") in r
    # the estimate is of the knobs, sharded two ways
    assert e.total_bytes == estimate(model.shape, plan.knobs, plan.device_facts(), shards=2).total_bytes


def test_sharding_wins_over_shorter_sequences_and_keeps_them(tmp_path):
    """Llama-2-70B on two 48 GB cards: one card fits it only at 2048 tokens; sharded, the
    profile's 4096 fit (33.7 GB per card). 4-bit is turned on for FSDP with the reason."""
    hw = cuda(gpu(0, "NVIDIA RTX A6000", 49140 * MiB), gpu(1, "NVIDIA RTX A6000", 49140 * MiB))
    plan = make_plan(hw, model_dir(tmp_path, LLAMA2_70B))
    assert plan.parallel.mode == "fsdp" and plan.fits
    assert plan.knobs.max_length == plan.profile.knobs.max_length == 4096
    assert "the plan fits one card only with max_length 4096 -> 2048" in plan.parallel.reason
    (q,) = [a for a in plan.adjustments if a.knob == "load_in_4bit"]
    assert q.reason.startswith("FSDP shards QLoRA's 4-bit weights, stored in bfloat16 (bnb_4bit_quant_storage)")
    assert round(plan.estimate.total_bytes / GiB, 1) == 33.7


def test_a_llama3_70b_does_not_fit_two_24gb_cards_and_the_advice_says_how_many_would(tmp_path):
    """Its 128k vocabulary makes the embeddings and lm_head 3.9 GB, gathered whole on each card."""
    model = model_dir(tmp_path, LLAMA_70B)
    plan = make_plan(cuda(gpu(0), gpu(1)), model)
    assert plan.parallel.mode == "fsdp" and not plan.fits
    assert any(a.startswith("3 cards like these, sharded (FSDP): ") for a in plan.advice)
    four = make_plan(cuda(*(gpu(i) for i in range(4))), model)
    assert four.parallel.mode == "fsdp" and four.fits and four.knobs.max_length == 1024


def test_the_longest_context_of_a_sharded_plan_is_per_card(tmp_path):
    from localtune.plan import max_context

    plan = make_plan(cuda(gpu(0), gpu(1)), model_dir(tmp_path, LLAMA2_70B))
    fit = max_context(plan)
    assert fit.max_length >= plan.knobs.max_length and fit.estimate.details["fsdp_shards"] == 2
    assert fit.estimate.total_bytes <= plan.budget_bytes


# ---------------------------------------------------------------- processes on the CPU


def test_two_processes_on_the_cpu_are_data_parallel_with_half_the_ram_each(builtin):
    hw = cpu_box()
    one, two = make_plan(hw, builtin), make_plan(hw, builtin, processes=2)
    assert (two.parallel.mode, two.parallel.processes, two.parallel.devices) == ("ddp", 2, [])
    assert two.budget_bytes == (22 * GiB - int(24 * GiB * HEADROOM_FRAC)) // 2 == one.budget_bytes // 2
    assert two.knobs.gradient_accumulation_steps == one.knobs.gradient_accumulation_steps // 2
    assert two.effective_batch_size == one.effective_batch_size
    assert two.parallel.reason.startswith("2 processes on the CPU, picked with --processes: the plan fits one process")
    assert "(data parallel, gloo)" in two.parallel.reason


def test_a_model_too_big_for_a_process_share_of_the_ram_does_not_fit_and_is_never_sharded(tmp_path):
    hw = cpu_box()
    plan = make_plan(hw, model_dir(tmp_path, LLAMA_8B), processes=4)
    assert plan.parallel.mode == "ddp" and not plan.fits
    assert "fsdp_shards" not in plan.estimate.details


# ---------------------------------------------------------------- the value others read


def test_plan_to_dict_carries_the_parallel_plan(builtin):
    plan = make_plan(cuda(gpu(0), gpu(1)), builtin)
    d = json.loads(json.dumps(plan.to_dict()))["parallel"]
    assert set(d) == {"mode", "processes", "nodes", "devices", "reason", "world_size"}
    assert (d["mode"], d["processes"], d["nodes"], d["devices"], d["world_size"]) == ("ddp", 2, 1, [0, 1], 2)
    assert Parallel.from_dict(d) == plan.parallel
    assert Parallel.from_dict(None) == Parallel() and Parallel().world_size == 1


# ---------------------------------------------------------------- the command line


def test_plan_with_bad_gpus_or_processes_is_one_line(capsys, machine_without_gpu):
    rc, _, err = run(capsys, "plan", "--gpus", "bad")
    assert rc == 1 and "--gpus picks NVIDIA GPUs; this machine trains on cpu" in one_line_error(err)
    rc, _, err = run(capsys, "plan", "--processes", "0")
    assert rc == 1 and "--processes must be a whole number of at least 1, got 0" in one_line_error(err)
    rc, _, err = run(capsys, "plan", "--budget", "24", "--backend", "cuda", "--gpus", "0,0")
    assert rc == 1 and "--gpus 0,0: a GPU is named twice; this machine has GPU 0" in one_line_error(err)


def test_plan_on_two_faked_gpus_prints_the_mode_and_the_budget_per_card(capsys, monkeypatch):
    from tests.fakes import RTX_4090, install_gpus

    second = replace(RTX_4090, uuid="GPU-4090aaaa-0000-0000-0000-000000000002", bus_id="00000000:02:00.0")
    install_gpus(monkeypatch, [RTX_4090, second])
    rc, out, _ = run(capsys, "plan")
    assert rc == 0
    assert "Parallel data parallel (DDP), 2 ranks: GPU 0 and 1 (2 x NVIDIA GeForce RTX 4090, 24.0 GB)" in out
    assert "budget per card" in out and "effective batch 16 = micro-batch 2 x accumulation 4 x 2 ranks" in out
    rc, out, _ = run(capsys, "plan", "--json", "--gpus", "1,")
    assert json.loads(out)["parallel"]["devices"] == [1] and json.loads(out)["parallel"]["mode"] == "single"
    rc, _, err = run(capsys, "plan", "--processes", "2")
    assert rc == 1 and "--processes 2 is for the CPU" in one_line_error(err)
