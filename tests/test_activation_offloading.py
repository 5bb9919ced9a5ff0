"""trl's activation offloading as a knob (`activation_offloading`): what the estimate moves to
the CPU's RAM, the planner's step for it on CUDA (after the micro-batch, before shorter
sequences), the refusals where it cannot run, and the trl configs that receive it.

No CUDA device runs here: the GPU side is read from trl's source (trl/models/
activation_offloading.py), not measured; the README says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localtune.errors import UserError
from localtune.hardware import GiB
from localtune.knobs import Knobs
from localtune.memory import estimate
from localtune.plan import hypothetical_hardware, make_plan, max_context
from localtune.profiles import check_backend_runs
from tests.helpers import one_line_error, run as run_cli
from tests.test_memory import LLAMA_31_8B, QLORA_8B
from tests.test_plan import LLAMA_8B, model_dir


@pytest.mark.parametrize("checkpointing", [True, False])
def test_offloading_moves_what_the_blocks_keep_to_the_cpu(checkpointing):
    k = QLORA_8B.replace(max_length=8192, gradient_checkpointing=checkpointing)
    on = estimate(LLAMA_31_8B, k.replace(activation_offloading=True), "cuda")
    off = estimate(LLAMA_31_8B, k, "cuda")
    d = on.details
    block = d["activation_bytes_per_token_per_block"]
    h, L, tokens = LLAMA_31_8B.hidden_size, LLAMA_31_8B.num_hidden_layers, 8192
    kept = L * 2 * h if checkpointing else L * block  # the blocks' inputs (bf16), or everything they save
    assert d["offloaded_activation_bytes"] == int(tokens * kept)
    # on the GPU: one block's working set and the final norm's float32 input, as when it is recomputed
    assert on.activations_bytes == int(tokens * (block + 4 * h)) + d["dequant_buffer_bytes"]
    assert off.activations_bytes - on.activations_bytes == pytest.approx(d["offloaded_activation_bytes"]
                                                                          - (0 if checkpointing else tokens * block),
                                                                          abs=16)
    assert (on.weights_bytes, on.logits_bytes, on.adapter_bytes) == (off.weights_bytes, off.logits_bytes,
                                                                    off.adapter_bytes)
    assert off.details["offloaded_activation_bytes"] == 0


def test_the_planner_offloads_on_cuda_before_it_shortens_sequences(tmp_path):
    plan = make_plan(hypothetical_hardware("cuda", 20), model_dir(tmp_path, LLAMA_8B),
                     pinned={"max_length": 16384, "per_device_train_batch_size": 1})
    steps = [a for a in plan.adjustments if not a.reason.startswith("follows")]
    assert [a.knob for a in steps][0] == "activation_offloading" and plan.knobs.activation_offloading
    assert plan.fits and plan.knobs.max_length == 16384
    reason = steps[0].reason
    assert "per micro-batch) in the CPU's RAM" in reason and "over PCIe and back (~429 ms at 20 GB/s" in reason
    # free: the planner halves max_length only after offloading
    free = make_plan(hypothetical_hardware("cuda", 16), model_dir(tmp_path, LLAMA_8B, "m2"),
                     pinned={"per_device_train_batch_size": 1, "r": 16})
    knobs = [a.knob for a in free.adjustments]
    if "max_length" in knobs:
        assert "activation_offloading" in knobs and knobs.index("activation_offloading") < knobs.index("max_length")


def test_offloading_needs_the_cpus_ram_twice_over(tmp_path):
    from dataclasses import replace

    hw = hypothetical_hardware("cuda", 16)
    small_ram = replace(hw, ram_available_bytes=4 * GiB)  # 4 GB would be moved: not with 4 GB free
    plan = make_plan(small_ram, model_dir(tmp_path, LLAMA_8B), pinned={"max_length": 16384,
                                                                       "per_device_train_batch_size": 1})
    assert not plan.knobs.activation_offloading
    assert "activation_offloading" not in [a.knob for a in plan.adjustments]


@pytest.mark.parametrize("backend, knobs, why", [
    ("cpu", {}, "this run trains on cpu"),
    ("mps", {}, "this run trains on mps"),
    ("mps", {"engine": "mlx"}, "this run trains on MLX"),
    ("cuda", {"method": "orpo"}, "ORPO's trainer (trl.experimental) has no activation offloading"),
])
def test_offloading_where_it_cannot_run_is_refused_in_one_line(backend, knobs, why):
    with pytest.raises(UserError) as e:
        check_backend_runs(Knobs(activation_offloading=True, **knobs), backend)
    assert why in str(e.value) and "set --set activation_offloading=false" in str(e.value)
    check_backend_runs(Knobs(activation_offloading=True), "cuda")  # torch on CUDA: runs


def test_plan_set_activation_offloading_on_this_cpu_is_one_line_and_exit_1(capsys):
    rc, out, err = run_cli(capsys, "plan", "--set", "activation_offloading=true")
    assert rc == 1
    assert one_line_error(err).startswith("localtune: error: activation_offloading=true: it moves activations from an NVIDIA GPU")


def test_max_context_on_cuda_says_how_long_offloading_would_fit(tmp_path):
    plan = make_plan(hypothetical_hardware("cuda", 24), model_dir(tmp_path, {**LLAMA_8B, "max_position_embeddings": 131072}),
                     pinned={"per_device_train_batch_size": 1})
    fit = max_context(plan)
    n = int(fit.bound.rsplit("activation_offloading=true: ", 1)[1].split()[0])
    assert n > fit.max_length
    with_it = max_context(make_plan(hypothetical_hardware("cuda", 24), plan.model,
                                    pinned={"per_device_train_batch_size": 1, "activation_offloading": True}))
    assert with_it.max_length == n


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_the_trl_config_receives_the_knob(method, tiny_chat_model_dir: Path, tmp_path: Path, monkeypatch):
    """SFTConfig and DPOConfig get `activation_offloading` from the knob (trl builds its
    OffloadActivations context when the trainer is made; on this CPU the trainer is not built)."""
    from localtune.data import chat_template_for
    from localtune.methods import Setup, get_method
    from localtune.models import load_tokenizer, resolve_model
    from localtune.precision import DeviceFacts, precision_for
    from tests.test_worker import make_run

    data = tmp_path / "rows.jsonl"
    if method == "sft":
        data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(8)))
    else:
        data.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"}) + "\n"
                                for i in range(8)))
    monkeypatch.setenv("LOCALTUNE_HOME", str(tmp_path / "home"))
    run = make_run(f"offload-{method}", tiny_chat_model_dir, data, method=method)
    knobs = Knobs(**run.read_config()["knobs"]).replace(activation_offloading=True)
    tok = load_tokenizer(resolve_model(str(tiny_chat_model_dir)))
    setup = Setup(run=run, rcfg=run.read_config()["run"], backend="cpu", device="cpu",
                  precision=precision_for(knobs, DeviceFacts.live("cpu", None)), tokenizer=tok,
                  template=chat_template_for(tok), seed=knobs.seed, partial=tmp_path / "partial")
    m = get_method(method)
    from transformers import AutoModelForCausalLM

    _, kw = m.trainer(setup, m.prepare(setup, knobs), AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir),
                      knobs, [])
    assert kw["args"].activation_offloading is True
