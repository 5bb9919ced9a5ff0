"""The planner: the profile for the machine, stepped down until the estimate fits.

Machines this one lacks are faked at the NVML level (tests/fakes.py) and go through the real
`hardware.probe()`; models are described by config.json alone, as `localtune plan` reads them.
"""

from __future__ import annotations

import json

import pytest

from localtune.errors import UserError
from localtune.hardware import probe
from localtune.memory import estimate
from localtune.models import resolve_model
from localtune.plan import hypothetical_hardware, make_plan
from tests.fakes import RTX_4090, FakeGPU, MiB, install_gpus

LLAMA_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False,
}
LLAMA_70B = {**LLAMA_8B, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
             "intermediate_size": 28672}
RTX_4060 = FakeGPU("NVIDIA GeForce RTX 4060", 8188 * MiB, 400 * MiB,
                   "GPU-4060dddd-0000-0000-0000-000000000004", "00000000:01:00.0", cc=(8, 9))


def model_dir(tmp_path, cfg, name="m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return resolve_model(str(d))


def assert_consistent(plan):
    """What every plan must satisfy: its estimate is the estimate of its knobs, and the
    effective batch is the profile's unless the user pinned a batch knob."""
    assert plan.estimate.total_bytes == estimate(plan.model.shape, plan.knobs, plan.backend).total_bytes
    assert plan.fits == (plan.estimate.total_bytes <= plan.budget_bytes)
    if not {"per_device_train_batch_size", "gradient_accumulation_steps"} & set(plan.pinned):
        assert plan.knobs.effective_batch_size == plan.profile.knobs.effective_batch_size
    json.dumps(plan.to_dict())  # the one value --json, the TUI and training share


def test_llama_8b_on_a_faked_rtx_4090_picks_4bit_and_fits(monkeypatch, tmp_path):
    install_gpus(monkeypatch, [RTX_4090])
    hw = probe()
    plan = make_plan(hw, model_dir(tmp_path, LLAMA_8B))
    assert plan.profile.name == "cuda-24gb"
    assert plan.fits and plan.knobs.load_in_4bit
    assert plan.estimate.total_bytes <= plan.budget_bytes < hw.primary.free_bytes
    assert_consistent(plan)


def test_llama_8b_on_a_faked_8gb_card_fits_with_shorter_sequences(monkeypatch, tmp_path):
    install_gpus(monkeypatch, [RTX_4060])
    plan = make_plan(probe(), model_dir(tmp_path, LLAMA_8B))
    assert plan.profile.name == "cuda-8gb"
    assert plan.fits, plan.advice
    assert plan.knobs.max_length < plan.profile.knobs.max_length
    changed = [a.knob for a in plan.adjustments]
    assert "max_length" in changed
    for a in plan.adjustments:
        assert "budget" in a.reason or a.reason.startswith("follows")
    assert_consistent(plan)


def test_16bit_weights_over_half_the_budget_turn_on_4bit_before_the_batch(tmp_path):
    # 48 GB profile trains in 16 bits; a 70B model's 16-bit weights (~130 GB) cannot fit
    plan = make_plan(hypothetical_hardware("cuda", 48), model_dir(tmp_path, LLAMA_70B))
    assert plan.profile.name == "cuda-48gb" and not plan.profile.knobs.load_in_4bit
    knobs_changed = [a.knob for a in plan.adjustments]
    assert knobs_changed[0] == "load_in_4bit"
    assert "over half the budget" in plan.adjustments[0].reason
    assert plan.knobs.load_in_4bit and plan.fits
    assert_consistent(plan)


def test_pinned_knobs_are_kept_and_the_planner_works_around_them(tmp_path):
    m = model_dir(tmp_path, LLAMA_8B)
    pinned = {"max_length": 4096, "r": 64}
    plan = make_plan(hypothetical_hardware("cuda", 24), m, pinned=pinned)
    assert plan.knobs.max_length == 4096 and plan.knobs.r == 64
    assert not {"max_length", "r"} & {a.knob for a in plan.adjustments}
    assert plan.knob_sources()["r"] == "set by you"
    assert_consistent(plan)


def test_pinned_accumulation_keeps_the_micro_batch_too(tmp_path):
    plan = make_plan(hypothetical_hardware("cuda", 24), model_dir(tmp_path, LLAMA_8B),
                     pinned={"gradient_accumulation_steps": 8})
    assert plan.knobs.per_device_train_batch_size == plan.profile.knobs.per_device_train_batch_size
    assert plan.knobs.gradient_accumulation_steps == 8
    assert_consistent(plan)


def test_nothing_fits_says_so_and_what_would(tmp_path):
    plan = make_plan(hypothetical_hardware("cuda", 8), model_dir(tmp_path, LLAMA_70B))
    assert not plan.fits
    assert any(a.startswith("a smaller model") for a in plan.advice)
    assert_consistent(plan)


def test_pinned_16bit_that_does_not_fit_suggests_4bit(tmp_path):
    plan = make_plan(hypothetical_hardware("cuda", 24), model_dir(tmp_path, LLAMA_8B),
                     pinned={"load_in_4bit": False, "max_length": 8192})
    assert not plan.fits
    assert any("--set load_in_4bit=true" in a for a in plan.advice)


def test_pinned_long_sequences_that_do_not_fit_suggest_a_length(tmp_path):
    plan = make_plan(hypothetical_hardware("cuda", 8), model_dir(tmp_path, LLAMA_8B),
                     pinned={"max_length": 8192})
    assert not plan.fits
    suggestion = [a for a in plan.advice if "--max-seq-len" in a]
    assert suggestion
    n = int(suggestion[0].split("--max-seq-len ")[1].split(")")[0])
    fitted = estimate(plan.model.shape, plan.knobs.replace(max_length=n), "cuda")
    assert fitted.total_bytes <= plan.budget_bytes


def test_builtin_model_on_this_cpu_fits_with_the_cpu_profile():
    plan = make_plan(probe(), resolve_model(None))
    assert plan.backend == "cpu" and plan.profile.name == "cpu"
    assert plan.fits and plan.adjustments == []
    assert plan.knobs == plan.profile.knobs
    assert_consistent(plan)


def test_a_small_cpu_budget_steps_down_in_the_documented_order():
    plan = make_plan(hypothetical_hardware("cpu", 4), resolve_model(None))
    order = ["gradient_checkpointing", "per_device_train_batch_size", "load_in_4bit", "max_length", "r"]
    seen = [a.knob for a in plan.adjustments if not a.reason.startswith("follows")]
    assert seen, "a 4 GB CPU budget must force changes"
    assert [k for k in order if k in seen] == sorted(set(seen), key=seen.index)
    assert "optim" not in seen  # 8-bit optimizers are an NVIDIA-only step
    assert_consistent(plan)


@pytest.mark.parametrize("backend,gb", [("cuda", 0), ("cuda", -3), ("tpu", 8)])
def test_hypothetical_machine_rejects_nonsense(backend, gb):
    with pytest.raises(UserError):
        hypothetical_hardware(backend, gb)


def test_hypothetical_machine_matches_the_profile_for_its_size(tmp_path):
    assert make_plan(hypothetical_hardware("mps", 32), resolve_model(None)).profile.name == "mps-32gb"
    assert make_plan(hypothetical_hardware("cuda", 80), resolve_model(None)).profile.name == "cuda-80gb"
