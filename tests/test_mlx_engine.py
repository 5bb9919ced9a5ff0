"""The MLX engine (`--set engine=mlx`) as a person meets it, on MLX's CPU backend (`mlx[cpu]`):
the worker writes the same run directory as the torch engine, resumes exactly after SIGKILL,
saves an adapter peft loads with the same logits, and `localtune train` says how to install
MLX when it is missing.

Every worker here trains `tiny_chat_model_dir` (a tiny Llama with the real SmolLM2 tokenizer)
on the first 40 rows of the demo set, with test_worker's knobs (12 optimizer steps of 2 x 2
rows, a checkpoint every 2, dropout on, cosine schedule with warmup), gradient checkpointing on. Skipped where mlx and
mlx-lm are not installed (`pip install -e '.[mlx]'`); CI installs them.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest

from localtune.events import EVENT_FIELDS, read_events
from localtune.runs import RunDir
from tests.helpers import one_line_error, run as run_cli
from tests.test_worker import (KNOBS, MAX_STEPS, SAVE_STEPS, _no_orphan_workers, events_of, log_tail,  # noqa: F401
                               kill_after_first_checkpoint, make_run, partial_leftovers, run_to_end,
                               signal_after_first_checkpoint, start_worker,
                               step_losses, train_file, wait_worker)

mx = pytest.importorskip("mlx.core", reason="the MLX engine's tests need mlx: pip install -e '.[mlx]'")
pytest.importorskip("mlx_lm", reason="the MLX engine's tests need mlx-lm: pip install -e '.[mlx]'")

MLX_KNOBS = dict(engine="mlx", gradient_checkpointing=True)
"""test_worker's knobs on the MLX engine, with each block recomputed in the backward pass (and
LoRA dropout 0.05), so resume is checked with the seeded checkpointed blocks too."""
LOSS_TOL = 1e-4
"""Resumed losses against the uninterrupted run's (the issue's bound; measured: equal to the bit)."""
ADAPTER_TOL = 1e-6
LOGITS_TOL = 1e-4
"""MLX with its adapter against peft with the converted adapter, float32 (measured ~1e-6)."""


@pytest.fixture(scope="module")
def mlx_reference_run(tiny_chat_model_dir: Path, train_file: Path, tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """One uninterrupted MLX run, trained once for the module."""
    home = tmp_path_factory.mktemp("mlx-reference-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCALTUNE_HOME", str(home))
        run = make_run("mlx-reference", tiny_chat_model_dir, train_file, **MLX_KNOBS)
        run_to_end(run)
    return run


def test_an_mlx_run_writes_the_same_run_directory_as_torch(mlx_reference_run: RunDir) -> None:
    run = mlx_reference_run
    status = run.read_status()
    assert status["state"] == "completed" and run.state() == "completed", log_tail(run)
    assert status["step"] == MAX_STEPS and status["pid"] is None and status["adapter"] == str(run.adapter_dir)
    assert run.read_config()["knobs"]["engine"] == "mlx"

    events = read_events(run.events_path)
    for e in events:  # every event a documented kind with exactly its documented fields
        assert set(e) - {"t", "kind"} == set(EVENT_FIELDS[e["kind"]]), e
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert not {"failed", "stopping", "stopped", "warning"} & set(kinds)
    assert events[0]["device"] == "mlx:cpu" and events[0]["precision"] == "float32"

    steps = events_of(run, "step")
    assert [e["step"] for e in steps] == list(range(1, MAX_STEPS + 1))
    for e in steps:
        assert math.isfinite(e["loss"]) and e["loss"] > 0 and e["tokens_per_s"] > 0, e
        assert e["learning_rate"] >= 0 and math.isfinite(e["grad_norm"]), e
    assert steps[0]["learning_rate"] == 0.0  # warmup_steps=1: transformers' schedule starts at 0
    assert steps[1]["learning_rate"] == pytest.approx(1e-3)  # then the peak, then the cosine decay
    assert steps[-1]["learning_rate"] < steps[2]["learning_rate"]
    assert steps[-1]["loss"] < steps[0]["loss"]  # it learns
    assert steps[0]["epoch"] < 1 < steps[-1]["epoch"]
    assert events_of(run, "hardware")
    assert [e["step"] for e in events_of(run, "eval")] == [4, 8, 12]
    assert [e["step"] for e in events_of(run, "sample")] == [4, 8, 12]
    assert events[-1]["peak_memory_bytes"] > 0 and events[-1]["tokens"] > 0

    assert [e["step"] for e in events_of(run, "checkpoint")] == list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    kept = run.complete_checkpoints()
    assert [p.name for p in kept] == [f"checkpoint-{s}" for s in (MAX_STEPS - 4, MAX_STEPS - 2, MAX_STEPS)]
    for p in kept:
        for f in ("adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"):
            assert (p / f).is_file(), f"{p.name} lacks {f}"
        state = json.loads((p / "trainer_state.json").read_text())
        assert state["engine"] == "mlx" and state["global_step"] == int(p.name.rsplit("-", 1)[1])

    from safetensors.torch import load_file

    tensors = load_file(run.adapter_dir / "adapter_model.safetensors")
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert tuple(a.shape) == (8, 64) and tuple(b.shape) == (64, 8)  # peft's (r, in) and (out, r)
    assert len(tensors) == 2 * 7 * 2 and b.abs().max() > 0  # 2 layers x 7 modules x A, B; it trained
    assert json.loads((run.adapter_dir / "localtune.json").read_text())["engine"] == "mlx"
    assert (run.adapter_dir / "tokenizer_config.json").is_file()
    assert partial_leftovers(run) == [] and not run.lock_path.exists()


def test_mlx_resume_after_sigkill_matches_the_uninterrupted_run(mlx_reference_run: RunDir, tiny_chat_model_dir: Path,
                                                                 train_file: Path) -> None:
    run = make_run("mlx-interrupted", tiny_chat_model_dir, train_file, **MLX_KNOBS)
    newest = kill_after_first_checkpoint(start_worker(run), run)
    assert int(newest.rsplit("-", 1)[1]) < MAX_STEPS

    run_to_end(run)  # resume: the same command on the same folder
    assert run.read_status()["state"] == "completed", log_tail(run)
    assert [s["resumed_from"] for s in events_of(run, "started")] == [None, newest]
    got, want = step_losses(run), step_losses(mlx_reference_run)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    first_resumed = int(newest.rsplit("-", 1)[1]) + 1
    diffs = {s: abs(got[s] - want[s]) for s in range(first_resumed, MAX_STEPS + 1)}
    print(f"resumed from {newest}: largest loss difference {max(diffs.values()):.3g} over steps {sorted(diffs)}")
    assert max(diffs.values()) <= LOSS_TOL, f"resumed losses differ from the uninterrupted run's: {diffs}"

    from safetensors.torch import load_file

    a = load_file(run.adapter_dir / "adapter_model.safetensors")
    b = load_file(mlx_reference_run.adapter_dir / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= ADAPTER_TOL, f"the resumed adapter differs from the uninterrupted one by {worst:g}"
    assert partial_leftovers(run) == [] and not run.lock_path.exists()


def test_mlx_stop_ends_the_step_with_a_checkpoint_and_resume_matches(mlx_reference_run: RunDir,
                                                                     tiny_chat_model_dir: Path,
                                                                     train_file: Path) -> None:
    """`localtune stop` (SIGTERM) on an MLX run: the step under way ends, is logged and
    checkpointed, the run is `stopped`; resuming it ends as the uninterrupted run did."""
    run = make_run("mlx-stopped", tiny_chat_model_dir, train_file, **MLX_KNOBS)
    proc = start_worker(run)
    signal_after_first_checkpoint(proc, run, signal.SIGTERM)
    assert wait_worker(proc, run) == 0, log_tail(run)
    status = run.read_status()
    assert status["state"] == "stopped" and run.state() == "stopped" and status["pid"] is None
    assert [e["reason"] for e in events_of(run, "stopping")] == ["SIGTERM"]
    (stopped,) = events_of(run, "stopped")
    step = stopped["step"]
    assert 0 < step < MAX_STEPS
    assert events_of(run, "step")[-1]["step"] == step and stopped["checkpoint"] == f"checkpoint-{step}"
    assert run.complete_checkpoints()[-1].name == f"checkpoint-{step}" and status["last_checkpoint"] == f"checkpoint-{step}"
    assert not events_of(run, "finished") and not run.adapter_dir.exists() and not run.lock_path.exists()

    run_to_end(run)
    assert run.read_status()["state"] == "completed", log_tail(run)
    got, want = step_losses(run), step_losses(mlx_reference_run)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    assert max(abs(got[s] - want[s]) for s in got) <= LOSS_TOL


MLX_OOM_LOSS_TOL = 2e-3
"""Loss per step after an MLX back-off vs the uninterrupted run. Micro-batch 1 x 4 reads the same
rows per optimizer step as 2 x 2 and the loss is normalised by the step's trained tokens either
way; what differs is the LoRA dropout, whose masks are drawn for tensors of other shapes, and the
padding (test_worker's OOM_LOSS_TOL says the same of torch). Measured on MLX's CPU backend: at
most 1.4e-3 (step 11), 2e-5..4e-4 at the others; steps move the loss by ~1e-2."""


def test_mlx_out_of_memory_backs_off_with_the_same_effective_batch(mlx_reference_run: RunDir,
                                                                   tiny_chat_model_dir: Path,
                                                                   train_file: Path) -> None:
    """MLX runs out of memory at step 4 (injected as MLX's allocator says it): the same process
    halves the micro-batch, doubles the accumulation, goes back to checkpoint-2 and trains to the
    end; config.toml keeps the new knobs and the losses follow the uninterrupted run's."""
    import tomllib

    run = make_run("mlx-oom", tiny_chat_model_dir, train_file, **MLX_KNOBS)
    proc = start_worker(run, LOCALTUNE_FAULT_OOM_AT_STEP="4")
    assert wait_worker(proc, run) == 0, log_tail(run)
    assert run.read_status()["state"] == "completed", log_tail(run)
    for e in read_events(run.events_path):
        assert set(e) - {"t", "kind"} == set(EVENT_FIELDS[e["kind"]]), e
    backoffs = [{k: v for k, v in e.items() if k not in ("t", "kind")} for e in events_of(run, "oom_backoff")]
    assert backoffs == [{"step": 4, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4,
                         "max_length": 64, "resume_from": "checkpoint-2"}]
    starts = events_of(run, "started")
    assert [s["resumed_from"] for s in starts] == [None, "checkpoint-2"] and len({s["pid"] for s in starts}) == 1
    (note,) = run.read_status()["notes"]
    assert "out of memory at step 4" in note and "2 x 2 -> 1 x 4" in note and "checkpoint-2" in note
    assert "localtune worker: out of memory at step 4" in run.log_path.read_text()
    with run.config_path.open("rb") as f:
        knobs = tomllib.load(f)["knobs"]
    assert (knobs["per_device_train_batch_size"], knobs["gradient_accumulation_steps"]) == (1, 4)

    got, want = step_losses(run), step_losses(mlx_reference_run)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    diffs = {s: abs(got[s] - want[s]) for s in got}
    print(f"MLX back-off: largest loss difference {max(diffs.values()):.3g}; per step {diffs}")
    assert max(diffs[1], diffs[2]) <= LOSS_TOL  # before the error: the very same run
    assert max(diffs.values()) <= MLX_OOM_LOSS_TOL, diffs
    assert partial_leftovers(run) == [] and not run.lock_path.exists()


@pytest.mark.parametrize("text, oom", [
    ("[malloc] Unable to allocate 17179869184 bytes.", True),
    ("[metal::malloc] Attempting to allocate 96905199616 bytes which is greater than the maximum allowed buffer "
     "size of 17179869184 bytes.", True),
    ("[METAL] Command buffer execution failed: Insufficient Memory "
     "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory).", True),
    ("[metal::malloc] Resource limit (499000) exceeded.", False),
    ("[matmul] Last dimension of first input with shape (2,3) must match second to last dimension", False),
])
def test_mlx_out_of_memory_is_told_from_other_errors(text: str, oom: bool) -> None:
    from localtune.engines.mlx_sft import is_mlx_oom

    assert is_mlx_oom(RuntimeError(text)) is oom
    assert not is_mlx_oom(ValueError(text))


def test_an_mlx_run_calibrates_with_mlxs_peak_and_trains_as_it_would_have_without(
        mlx_reference_run: RunDir, tiny_chat_model_dir: Path, train_file: Path, tmp_path: Path, monkeypatch) -> None:
    """Calibration on MLX: one MLX step in a separate process before step 1, read through
    mx.get_peak_memory (on top of the process's memory before loading), recorded as on torch;
    the run's losses equal the uncalibrated run's."""
    monkeypatch.setenv("LOCALTUNE_HOME", str(tmp_path / "home"))
    run = make_run("mlx-calibrated", tiny_chat_model_dir, train_file, **MLX_KNOBS, calibrate=True)
    run_to_end(run)
    assert run.read_status()["state"] == "completed", log_tail(run)
    kinds = [e["kind"] for e in read_events(run.events_path)]
    assert kinds[0] == "calibrated" and kinds[1] == "started"
    (e,) = events_of(run, "calibrated")
    assert "mx.get_peak_memory" in e["how"] and e["max_length"] == KNOBS["max_length"]
    cal = json.loads(run.plan_path.read_text())["calibration"]
    assert cal["measured"]["peak_bytes"] == e["measured_bytes"]
    # the tiny model's float32 weights as MLX holds them, against the estimate's
    assert cal["by_part"]["weights"]["measured"] == pytest.approx(cal["by_part"]["weights"]["estimate"], rel=0.02)
    assert cal["by_part"]["training"]["measured"] > 0 and cal["measured"]["optimizer_bytes"] > 0
    assert step_losses(run) == step_losses(mlx_reference_run)  # another process measured: the same run


def test_an_mlx_step_out_of_memory_while_calibrating_backs_off_and_measures_again(
        tiny_chat_model_dir: Path, train_file: Path, tmp_path: Path, monkeypatch) -> None:
    """MLX's own out-of-memory error in the measured step (injected above a micro-batch of 1):
    the knobs back off as training's back-off would and the smaller step is measured."""
    from localtune.calibrate import FAULT_OOM_ENV
    from localtune.hardware import Hardware
    from localtune.knobs import Knobs
    from localtune.worker import calibrate_run

    monkeypatch.setenv("LOCALTUNE_HOME", str(tmp_path / "home"))
    run = make_run("mlx-cal-oom", tiny_chat_model_dir, train_file, **MLX_KNOBS, calibrate=True)
    knobs = Knobs(**run.read_config()["knobs"])
    monkeypatch.setenv(FAULT_OOM_ENV, "1")
    after = calibrate_run(run, knobs, Hardware.from_dict(json.loads(run.plan_path.read_text())["hardware"]))
    assert after.per_device_train_batch_size == 1
    assert (after.per_device_train_batch_size * after.gradient_accumulation_steps
            == knobs.per_device_train_batch_size * knobs.gradient_accumulation_steps)
    (e,) = events_of(run, "calibrated")
    assert e["micro_batch"] == 1 and "out of memory at micro-batch x tokens" in e["note"]


def test_a_damaged_mlx_checkpoint_is_named_and_not_resumed_from(mlx_reference_run: RunDir, tmp_path: Path) -> None:
    """Resume reads an MLX checkpoint back before it trusts it: a truncated optimizer state or
    a missing one is named (and the worker then sets the checkpoint aside, as for torch)."""
    import shutil

    from localtune.worker import checkpoint_problem

    ck = tmp_path / "checkpoint-12"
    shutil.copytree(mlx_reference_run.complete_checkpoints()[-1], ck)
    assert checkpoint_problem(ck) is None
    opt = ck / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    assert checkpoint_problem(ck).startswith("optimizer.safetensors is unreadable")
    opt.unlink()
    assert checkpoint_problem(ck) == "optimizer.safetensors is missing"


def test_export_and_chat_work_unchanged_on_an_mlx_run(capsys, monkeypatch, mlx_reference_run: RunDir,
                                                      tmp_path: Path) -> None:
    """`localtune export` (adapter, merged with its own logits check, GGUF with a Modelfile) and
    `localtune chat` read an MLX run as they read a torch one."""
    from safetensors.torch import load_file

    from tests.test_chat import chat, greedy
    from tests.test_export import export

    run = mlx_reference_run
    adapter = export(capsys, run, "--format", "adapter", "--out", str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file(), adapter
    merged = export(capsys, run, "--format", "merged", "--out", str(tmp_path / "merged"))
    assert merged["checks"]["merge_max_rel_logit_diff"] <= 1e-5  # the export's own float32 check of the merge
    assert not any("lora" in k for k in load_file(tmp_path / "merged" / "model.safetensors"))
    rc, out, err = run_cli(capsys, "export", str(run.path), "--format", "gguf", "--quant", "q8_0", "--ollama",
                           "--out", str(tmp_path / "gguf"))
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == ["Modelfile", "mlx-reference-q8_0.gguf"]

    rc, out = chat(capsys, monkeypatch, run, "What is 2+2?\n", "--max-new-tokens", "6")
    assert rc == 0
    answer = greedy(run, [{"role": "user", "content": "What is 2+2?"}], 6)  # transformers + peft, directly
    assert out.split("\n", 1)[1] == f"you> tuned> {answer}\nyou> \n"


def _mlx_lora_model(folder: Path, **knobs):
    """The base in `folder` loaded by the MLX engine with LoRA on every linear layer, and the knobs."""
    from localtune.engines.mlx_lora import add_lora, checkpoint_weight_names, load_base
    from localtune.knobs import Knobs

    k = Knobs(**{"engine": "mlx", "r": 4, "lora_alpha": 12, "lora_dropout": 0.0, **knobs})
    model = load_base(folder, k, mx.float32)
    mx.random.seed(0)
    adapted = add_lora(model, k, hf_weight_names=checkpoint_weight_names(folder))
    return model, k, adapted


def test_the_mlx_adapter_in_peft_format_gives_peft_the_same_logits(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """An adapter the MLX engine trained is one peft loads: the MLX model with its LoRA layers and
    transformers' model with `PeftModel.from_pretrained` on the converted files give the same
    logits in float32 (within LOGITS_TOL), and the converted files load back into MLX exactly."""
    import numpy as np
    import torch
    from mlx.utils import tree_flatten, tree_map
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from localtune.engines.mlx_lora import load_peft_adapter, save_peft_adapter

    model, knobs, adapted = _mlx_lora_model(tiny_llama_dir)
    assert len(adapted) == 2 * 7  # 2 blocks x q, k, v, o, gate, up, down
    # a trained adapter: lora_b is zero at the start, and would hide a wrong layout or scale
    rng = np.random.default_rng(0)
    model.update(tree_map(lambda a: mx.array(rng.normal(0, 0.2, a.shape).astype(np.float32)),
                          model.trainable_parameters()))
    ids = np.array([[1, 17, 200, 3, 99, 45, 12, 250, 7], [5, 5, 80, 81, 82, 0, 11, 64, 33]])
    mlx_logits = np.array(model(mx.array(ids)))
    save_peft_adapter(model, tmp_path / "adapter", knobs, base_model=str(tiny_llama_dir), adapted=adapted)

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        peft_logits = peft_model(torch.tensor(ids)).logits.numpy()
    with peft_model.disable_adapter(), torch.no_grad():
        plain_logits = peft_model(torch.tensor(ids)).logits.numpy()
    assert np.abs(peft_logits - plain_logits).max() > 0.1, "the adapter changes nothing: the test would prove nothing"
    diff = np.abs(mlx_logits - peft_logits).max()
    print(f"MLX vs peft logits: largest difference {diff:.3g} (the adapter moves them by "
          f"{np.abs(peft_logits - plain_logits).max():.3g})")
    assert diff <= LOGITS_TOL

    fresh, _, _ = _mlx_lora_model(tiny_llama_dir)
    load_peft_adapter(fresh, tmp_path / "adapter")
    assert np.array_equal(np.array(fresh(mx.array(ids))), mlx_logits)  # the round trip is exact
    a, b = dict(tree_flatten(fresh.trainable_parameters())), dict(tree_flatten(model.trainable_parameters()))
    assert sorted(a) == sorted(b)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_added_chat_tokens_train_only_their_rows_on_mlx_and_peft_gives_the_same_logits(tmp_path: Path,
                                                                                      tied: bool) -> None:
    """A base model without a chat template gets ChatML's two tokens: on MLX only their rows
    of the embedding (and of an untied output layer) train, as peft's trainable_token_indices,
    and the saved adapter gives peft (over the base grown to the tokenizer) the same logits,
    the added tokens' included, within LOGITS_TOL."""
    import numpy as np
    import torch
    from mlx.utils import tree_flatten, tree_map
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from localtune.data import chat_template_for
    from localtune.engines.mlx_lora import add_token_rows, load_peft_adapter, save_peft_adapter
    from tests.test_added_tokens import base_model_without_template

    folder = base_model_without_template(tmp_path / "base", tied=tied)
    tok = AutoTokenizer.from_pretrained(folder)
    template = chat_template_for(tok)
    assert template.added_tokens == ["<|im_start|>", "<|im_end|>"]
    new_ids = tok.convert_tokens_to_ids(template.added_tokens)

    def mlx_model():
        model, knobs, adapted = _mlx_lora_model(folder)
        indices = add_token_rows(model, tok, template.added_tokens)
        return model, knobs, adapted, indices

    model, knobs, adapted, indices = mlx_model()
    assert indices == ({"embed_tokens": new_ids} if tied else {"embed_tokens": new_ids, "lm_head": new_ids})
    rows = {k: v.shape for k, v in tree_flatten(model.trainable_parameters()) if "lora" not in k}
    assert rows == ({"model.embed_tokens.token_rows": (2, 64)} if tied
                    else {"model.embed_tokens.token_rows": (2, 64), "lm_head.token_rows": (2, 64)})
    rng = np.random.default_rng(0)  # a trained adapter and trained rows
    model.update(tree_map(lambda a: mx.array(rng.normal(0, 0.2, a.shape).astype(np.float32)),
                          model.trainable_parameters()))
    ids = np.array([[new_ids[0], 5, 9, 12, new_ids[1], 3], [new_ids[0], 7, 7, 2, 4, new_ids[1]]])  # a 15-word vocabulary
    mlx_logits = np.array(model(mx.array(ids)))
    assert mlx_logits.shape == (2, 6, len(tok))
    save_peft_adapter(model, tmp_path / "adapter", knobs, base_model=str(folder), adapted=adapted)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == indices

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    base.resize_token_embeddings(len(tok))  # as the export does for a run whose template added tokens
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        peft_logits = peft_model(torch.tensor(ids)).logits.numpy()
    diff = np.abs(mlx_logits - peft_logits).max()
    print(f"added tokens ({'tied' if tied else 'untied'}): MLX vs peft logits, largest difference {diff:.3g}")
    assert diff <= LOGITS_TOL

    fresh, _, _, _ = mlx_model()
    load_peft_adapter(fresh, tmp_path / "adapter")
    assert np.array_equal(np.array(fresh(mx.array(ids))), mlx_logits)


def test_an_mlx_run_on_a_base_model_without_a_template_trains_exports_and_chats(tmp_path: Path, capsys,
                                                                                 monkeypatch) -> None:
    """The worker on MLX with a model that has no chat template: ChatML's tokens are added, their
    rows train (the end-of-turn row moves), and export (merged) and chat read the run."""
    from safetensors.numpy import load_file

    from localtune.chat import ChatSession
    from tests.test_added_tokens import base_model_without_template

    folder = base_model_without_template(tmp_path / "base", tied=False)
    data = tmp_path / "train.jsonl"
    pairs = [("Hi", "Hello there."), ("Bye", "Goodbye."), ("Hello", "Hi there."), ("Goodbye", "Bye.")]
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in pairs * 4))
    monkeypatch.setenv("LOCALTUNE_HOME", str(tmp_path / "home"))
    run = make_run("mlx-added-tokens", folder, data, engine="mlx", max_steps=4, save_steps=2, eval_steps=4,
                   max_length=32, r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-2, warmup_steps=0)
    run_to_end(run)
    assert run.read_status()["state"] == "completed", log_tail(run)
    template = json.loads((run.path / "data.json").read_text())["chat_template"]
    assert template["source"] == "chatml" and template["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    tensors = load_file(run.adapter_dir / "adapter_model.safetensors")
    rows = {k: v for k, v in tensors.items() if "trainable_tokens" in k}
    assert sorted(rows) == ["base_model.model.lm_head.token_adapter.trainable_tokens_delta",
                            "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert all(v.shape == (2, 64) for v in rows.values())
    base = load_file(folder / "model.safetensors")
    mean = base["lm_head.weight"].mean(axis=0)
    moved = abs(rows["base_model.model.lm_head.token_adapter.trainable_tokens_delta"][1] - mean).max()
    assert moved > 1e-3, "the end-of-turn token's output row did not train"

    rc, out, err = run_cli(capsys, "export", str(run.path), "--format", "merged", "--out", str(tmp_path / "merged"))
    assert rc == 0, err
    session = ChatSession.load(run)
    assert isinstance(session.reply([{"role": "user", "content": "Hi"}], max_new_tokens=4), str)


def test_load_in_4bit_quantises_the_base_with_mlx_and_lora_trains_over_it(tiny_llama_dir: Path) -> None:
    """`load_in_4bit` on MLX: the base's linear layers become 4-bit (group size 64) under their
    LoRA layers, only the LoRA weights train, and a few AdamW steps lower the loss."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.lora import LoRALinear

    from localtune.engines.mlx_sft import loss_sum

    model, _, _ = _mlx_lora_model(tiny_llama_dir, load_in_4bit=True)
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and isinstance(q.linear, nn.QuantizedLinear)
    assert (q.linear.bits, q.linear.group_size) == (4, 64)
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)

    ids = mx.array([[1, 17, 200, 3, 99, 45, 12, 250, 7, 8, 9, 10]])
    mask = mx.ones(ids.shape)
    step = nn.value_and_grad(model, loss_sum)
    opt = optim.AdamW(learning_rate=1e-2, weight_decay=0.0, bias_correction=True)
    first = None
    for _ in range(5):
        loss, grads = step(model, ids, mask)
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.state)
        first = loss.item() if first is None else first
    assert loss.item() < first


def test_train_with_engine_mlx_runs_the_mlx_engine_from_the_command_line(capsys, tiny_chat_model_dir: Path,
                                                                        train_file: Path) -> None:
    """`localtune train --headless --set engine=mlx` trains with MLX, follows the run to its end
    and exits 0; config.toml records the engine."""
    from localtune.runs import list_runs

    rc, out, err = run_cli(capsys, "train", "--headless", "--model", str(tiny_chat_model_dir), "--data",
                           str(train_file), "--set", "engine=mlx", "--set", "max_steps=2", "--set", "max_length=64",
                           "--set", "per_device_train_batch_size=2", "--set", "gradient_accumulation_steps=1",
                           "--set", "save_steps=2")
    assert rc == 0, out + err
    (run,) = list_runs()
    assert f"run {run.id} started: {tiny_chat_model_dir} on the MLX engine on {train_file}, worker pid" in out, out
    assert run.read_config()["knobs"]["engine"] == "mlx"
    assert run.read_status()["state"] == "completed", log_tail(run)
    assert events_of(run, "started")[0]["device"] == "mlx:cpu"
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()


def test_engine_mlx_without_mlx_installed_says_how_to_install_it(capsys, monkeypatch, tiny_chat_model_dir: Path,
                                                                 train_file: Path) -> None:
    from localtune import engines

    monkeypatch.setattr(engines, "mlx_available", lambda: False)
    rc, out, err = run_cli(capsys, "train", "--headless", "--model", str(tiny_chat_model_dir), "--data",
                           str(train_file), "--set", "engine=mlx")
    assert rc == 1
    line = one_line_error(err)
    assert "engine=mlx needs mlx and mlx-lm" in line and "pip install 'localtune[mlx]'" in line, line


def test_engine_mlx_refuses_the_preference_methods_in_one_line(capsys, tiny_chat_model_dir: Path) -> None:
    rc, out, err = run_cli(capsys, "train", "--headless", "--model", str(tiny_chat_model_dir), "--method", "dpo",
                           "--set", "engine=mlx")
    assert rc == 1
    assert "engine=mlx trains sft only, not dpo" in one_line_error(err)


def test_engine_mlx_refuses_packing_in_one_line(capsys, tiny_chat_model_dir: Path, train_file: Path) -> None:
    """Packing is not in the MLX engine yet: said before a run folder is written, not ignored."""
    from localtune.runs import list_runs

    rc, out, err = run_cli(capsys, "train", "--headless", "--model", str(tiny_chat_model_dir), "--data",
                           str(train_file), "--set", "engine=mlx", "--set", "packing=true")
    assert rc == 1
    assert one_line_error(err) == ("localtune: error: engine=mlx does not pack rows into one sequence yet: set "
                                   "--set packing=false, or train with --set engine=torch")
    assert list_runs() == []


def test_gradient_checkpointing_on_mlx_gives_the_same_gradients_with_dropout(tiny_llama_dir: Path) -> None:
    """`gradient_checkpointing` on the MLX engine recomputes each block in the backward pass; with
    LoRA dropout on, the recompute must draw the same masks, so the loss and the gradients
    equal those without checkpointing (to the bit, on the CPU)."""
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten, tree_map

    from localtune.engines.mlx_lora import seeded_blocks
    from localtune.engines.mlx_sft import loss_sum

    ids = mx.array([[1, 17, 200, 3, 99, 45, 12, 250, 7, 8, 9, 10], [4, 4, 4, 90, 91, 92, 93, 94, 95, 96, 97, 98]])
    mask = mx.ones(ids.shape)

    def gradients(checkpoint: bool):
        model, _, _ = _mlx_lora_model(tiny_llama_dir, lora_dropout=0.3)
        rng = np.random.default_rng(0)  # lora_b away from zero, so the masks reach the loss too
        model.update(tree_map(lambda a: mx.array(rng.normal(0, 0.2, a.shape).astype(np.float32)),
                              model.trainable_parameters()))
        seeded_blocks(model, checkpoint=checkpoint)
        model.train()
        mx.random.seed(123)
        loss, grads = nn.value_and_grad(model, loss_sum)(model, ids, mask)
        mx.eval(loss, grads)
        return loss.item(), dict(tree_flatten(grads))

    plain_loss, plain = gradients(False)
    ckpt_loss, ckpt = gradients(True)
    assert ckpt_loss == plain_loss
    assert sorted(ckpt) == sorted(plain)
    worst = max(float(mx.abs(ckpt[k] - plain[k]).max()) for k in plain)
    assert worst == 0.0, f"checkpointed gradients differ by {worst:g}"
    assert max(float(mx.abs(g).max()) for g in plain.values()) > 0.1


@pytest.mark.slow
def test_the_builtin_model_trains_a_few_steps_on_mlx_and_exports(capsys, builtin_model_dir: Path,
                                                                 tmp_path: Path) -> None:
    """The real built-in model (SmolLM2-135M) on the demo set, 2 optimizer steps of 2 rows of at
    most 64 tokens on MLX's CPU backend (~2 minutes here: a few tokens per second), then its
    merged export, whose own check compares the merge with base + adapter in float32."""
    from tests.test_export import export

    rc, out, err = run_cli(capsys, "train", "--headless", "--set", "engine=mlx", "--set", "max_steps=2",
                           "--set", "per_device_train_batch_size=2", "--set", "gradient_accumulation_steps=1",
                           "--set", "max_length=64", "--set", "save_steps=2")
    assert rc == 0, out + err
    from localtune.runs import list_runs

    (run,) = list_runs()
    assert run.read_status()["state"] == "completed", log_tail(run)
    steps = events_of(run, "step")
    assert [e["step"] for e in steps] == [1, 2] and all(math.isfinite(e["loss"]) for e in steps)
    assert events_of(run, "started")[0]["device"] == "mlx:cpu"
    merged = export(capsys, run, "--format", "merged", "--out", str(tmp_path / "merged"))
    assert merged["checks"]["merge_max_rel_logit_diff"] <= 1e-5
    print(f"built-in model on MLX: losses {[round(e['loss'], 4) for e in steps]}, "
          f"{[e['tokens_per_s'] for e in steps]} tokens/s")
