"""The planner: the profile for the machine, stepped down until the estimate fits.

Machines this one lacks are faked at the NVML level (tests/fakes.py) and go through the real
`hardware.probe()`; models are described by config.json alone, as `localtune plan` reads them.
"""

from __future__ import annotations

import json

import pytest

from localtune.precision import DeviceFacts

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
    facts = DeviceFacts.from_hardware(plan.hardware)  # the probed device's bf16, as the planner reads it
    assert plan.estimate.total_bytes == estimate(plan.model.shape, plan.knobs, facts).total_bytes
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


def test_llama_8b_on_a_faked_8gb_card_offloads_activations_before_it_shortens_sequences(monkeypatch, tmp_path):
    """Before it shortens sequences the planner moves what the blocks keep to the CPU's RAM
    (here the 32 blocks' inputs at 1024 tokens: 0.25 GB, ~27 ms over PCIe each micro-batch);
    with the 10% headroom an 8 GB card then still needs 512 tokens."""
    install_gpus(monkeypatch, [RTX_4060])
    plan = make_plan(probe(), model_dir(tmp_path, LLAMA_8B))
    assert plan.fits and plan.knobs.activation_offloading
    assert [a.knob for a in plan.adjustments] == ["activation_offloading", "max_length"]
    assert plan.knobs.max_length == plan.profile.knobs.max_length // 2
    (a,) = [a for a in plan.adjustments if a.knob == "activation_offloading"]
    assert "(0.25 GB per micro-batch) in the CPU's RAM" in a.reason and "(~27 ms at 20 GB/s" in a.reason
    assert_consistent(plan)


def test_llama_8b_on_a_faked_8gb_card_fits_with_shorter_sequences(monkeypatch, tmp_path):
    install_gpus(monkeypatch, [RTX_4060])
    plan = make_plan(probe(), model_dir(tmp_path, LLAMA_8B), pinned={"activation_offloading": False})
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
                     pinned={"load_in_4bit": False, "max_length": 16384})
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


def test_builtin_model_on_a_cpu_machine_fits_with_the_cpu_profile(machine_without_gpu):
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


# ---------------------------------------------------------------- Apple: only what MPS runs


def test_an_8b_model_on_a_16gb_mac_never_gets_bitsandbytes_on_torch(tmp_path, capsys):
    from tests.helpers import run

    plan = make_plan(hypothetical_hardware("mps", 16), model_dir(tmp_path, LLAMA_8B), pinned={"engine": "torch"})
    assert not plan.knobs.load_in_4bit and "8bit" not in plan.knobs.optim
    assert "load_in_4bit" not in {a.knob for a in plan.adjustments} and "optim" not in {a.knob for a in plan.adjustments}
    assert not plan.fits  # 16-bit weights of 8B parameters (15 GB) do not fit 15.2 GB with room to train
    assert not any("4-bit" in a for a in plan.advice), plan.advice
    rc, out, err = run(capsys, "plan", "--backend", "mps", "--budget", "16", "--model", str(tmp_path / "m"),
                       "--set", "engine=torch")
    assert rc == 1 and "load_in_4bit                 false" in out and "Does not fit" in out
    assert_consistent(plan)


def test_an_8b_model_on_a_16gb_mac_trains_in_mlx_4bit_and_the_plan_says_so(tmp_path, capsys):
    """The Apple profiles train on the MLX engine; an 8B model's 16-bit weights (15 GB) take over
    half of a 16 GB Mac's budget, so the planner turns MLX's 4-bit weights on: 4 bits and a
    16-bit scale and bias per group of 64 weights, the embeddings quantised too."""
    from tests.helpers import run

    plan = make_plan(hypothetical_hardware("mps", 16), model_dir(tmp_path, LLAMA_8B))
    assert plan.knobs.engine == "mlx" and plan.knobs.load_in_4bit and plan.fits
    (four_bit,) = [a for a in plan.adjustments if a.knob == "load_in_4bit"]
    assert "MLX 4-bit (group size 64, with a scale and a bias per group)" in four_bit.reason
    # 8.03B parameters; all but the norms quantised at 0.5625 bytes each
    assert plan.estimate.weights_bytes == pytest.approx(8.03e9 * 0.5625, rel=0.01)
    assert plan.knob_sources()["engine"] == "profile mps-16gb"
    rc, out, err = run(capsys, "plan", "--backend", "mps", "--budget", "16", "--model", str(tmp_path / "m"))
    assert rc == 0 and "MLX 4-bit" in out and "Does not fit" not in out
    assert_consistent(plan)


def test_a_preference_run_on_a_mac_goes_to_torch_and_the_plan_says_why(tmp_path):
    plan = make_plan(hypothetical_hardware("mps", 32), model_dir(tmp_path, LLAMA_8B), pinned={"method": "dpo"})
    assert plan.knobs.engine == "torch" and not plan.knobs.load_in_4bit
    assert [(a.old, a.new, a.reason) for a in plan.adjustments if a.knob == "engine"] == [
        ("mlx", "torch", "the MLX engine trains sft only; dpo trains with torch")]
    pinned = make_plan(hypothetical_hardware("mps", 32), resolve_model(str(tmp_path / "m")),
                       pinned={"method": "dpo", "engine": "mlx"})
    assert pinned.knobs.engine == "mlx"  # pinned: never changed (`train` refuses it in one line)


@pytest.mark.parametrize("knob", ["load_in_4bit=true", "optim=paged_adamw_8bit", "optim=adamw_bnb_8bit"])
def test_bitsandbytes_knobs_on_mps_are_refused_in_one_line(tmp_path, capsys, knob):
    from tests.helpers import one_line_error, run

    model_dir(tmp_path, LLAMA_8B)
    rc, out, err = run(capsys, "plan", "--backend", "mps", "--budget", "64", "--model", str(tmp_path / "m"),
                       "--set", "engine=torch", "--set", knob)  # torch on MPS (the Apple profiles' engine is MLX)
    assert rc == 1 and out == ""
    assert one_line_error(err) == (f"localtune: error: {knob} needs bitsandbytes, which does not run on mps "
                                   "(Apple's GPU); train in 16 bits with optim=adamw_torch (a smaller model fits "
                                   "where a larger one does not)")
    # the same knob on a CUDA machine is a plan like any other
    assert run(capsys, "plan", "--backend", "cuda", "--budget", "24", "--model", str(tmp_path / "m"),
               "--set", knob)[0] == 0


def test_a_mac_before_macos_14_is_planned_in_float32_on_torch(tmp_path):
    from dataclasses import replace

    hw = hypothetical_hardware("mps", 32)
    torch_mps = {"engine": "torch"}  # PyTorch's MPS (the Apple profiles' engine is MLX)
    old = make_plan(replace(hw, macos_version="13.6"), model_dir(tmp_path, LLAMA_8B), pinned=torch_mps)
    new = make_plan(replace(hw, macos_version="14.4"), resolve_model(str(tmp_path / "m")), pinned=torch_mps)
    # 8.03B parameters: 4 bytes each before macOS 14, 2 after
    assert old.estimate.weights_bytes == 2 * new.estimate.weights_bytes
    assert round(old.estimate.weights_bytes / 2**30, 1) == 29.9


# ---------------------------------------------------------------- one rule for a smaller micro-batch


def test_stepping_down_a_5_by_3_micro_batch_keeps_the_effective_batch_of_15(tmp_path):
    from localtune.knobs import halve_micro_batch
    from localtune.worker import _backoff_knobs

    plan = make_plan(hypothetical_hardware("cuda", 24), model_dir(tmp_path, LLAMA_8B),
                     pinned={"per_device_train_batch_size": 5, "gradient_accumulation_steps": 3})
    assert plan.knobs.per_device_train_batch_size == 5  # pinned: the planner leaves it alone
    # unpinned, the planner steps it down with the one rule the out-of-memory back-off uses too
    from localtune.profiles import get_profile

    prof = get_profile("cuda-24gb")
    five = prof.knobs.replace(per_device_train_batch_size=5, gradient_accumulation_steps=3, max_length=4096)
    from dataclasses import replace as dc_replace

    tight = make_plan(hypothetical_hardware("cuda", 10), model_dir(tmp_path, LLAMA_8B, "m2"),
                      profile=dc_replace(prof, knobs=five))
    steps = [(a.knob, a.old, a.new) for a in tight.adjustments if a.knob in ("per_device_train_batch_size",
                                                                              "gradient_accumulation_steps")]
    assert steps[:2] == [("per_device_train_batch_size", 5, 1), ("gradient_accumulation_steps", 3, 15)]
    assert tight.knobs.effective_batch_size == 15
    assert _backoff_knobs(five).per_device_train_batch_size == 1
    assert _backoff_knobs(five).effective_batch_size == 15 == halve_micro_batch(five).effective_batch_size
    eight = five.replace(per_device_train_batch_size=12, gradient_accumulation_steps=2)
    assert (halve_micro_batch(eight).per_device_train_batch_size, halve_micro_batch(eight).effective_batch_size) == (6, 24)
    assert halve_micro_batch(five.replace(per_device_train_batch_size=1)) is None


# ---------------------------------------------------------------- the longest context that fits


def test_max_context_is_the_longest_length_that_fits_with_everything_else_as_planned(tmp_path):
    from localtune.plan import CONTEXT_STEP, max_context

    model = model_dir(tmp_path, {**LLAMA_8B, "max_position_embeddings": 131072})
    plan = make_plan(hypothetical_hardware("cuda", 24), model)
    fit = max_context(plan)
    assert fit.limit == "budget" and fit.max_length % CONTEXT_STEP == 0 and fit.max_length > plan.knobs.max_length
    at = estimate(plan.model.shape, plan.knobs.replace(max_length=fit.max_length), "cuda")
    beyond = estimate(plan.model.shape, plan.knobs.replace(max_length=fit.max_length + CONTEXT_STEP), "cuda")
    assert at.total_bytes <= plan.budget_bytes < beyond.total_bytes  # the longest, not merely one that fits
    assert fit.estimate.total_bytes == at.total_bytes
    assert "budget" in fit.bound and "activations +" in fit.bound  # what grows with the length, per 1024 tokens
    # everything else as planned: a micro-batch of 1 (pinned) fits about twice the length
    single = max_context(make_plan(hypothetical_hardware("cuda", 24), model,
                                   pinned={"per_device_train_batch_size": 1}))
    assert single.max_length > 1.8 * fit.max_length


def test_max_context_stops_at_the_models_context_window(tmp_path):
    from localtune.plan import max_context

    plan = make_plan(hypothetical_hardware("cuda", 80), model_dir(tmp_path, {**LLAMA_8B, "max_position_embeddings": 2048}))
    fit = max_context(plan)
    assert (fit.max_length, fit.limit) == (2048, "window")
    assert "max_position_embeddings 2048" in fit.bound
    assert fit.line(short=True) == "longest context that fits: 2048 tokens (bound by the model's context window)"


def test_max_context_when_nothing_fits_says_why(tmp_path):
    from localtune.plan import max_context

    fit = max_context(make_plan(hypothetical_hardware("cuda", 8), model_dir(tmp_path, LLAMA_70B)))
    assert fit.max_length == 0 and fit.limit == "nothing" and fit.estimate is None
    assert fit.line().startswith("no context fits: even 64 tokens need ")
