"""Preference tuning (DPO, ORPO) through the worker's lifecycle, as a person meets it: the same
`python -m localtune.worker RUN_DIR`, read back through events.jsonl, status.json, the
checkpoints and the adapter. Everything SFT has, DPO has too: exact resume after SIGKILL, the
out-of-memory back-off (micro-batch of pairs halved, accumulation doubled), an adapter written
once at the end; and `--from RUN` continues an SFT run's adapter with that run's model as the
reference.

The runs train `tiny_chat_model_dir` (a tiny Llama with the real SmolLM2 tokenizer) on 24 pairs
made from the demo set (the chosen answer is the row's own, the rejected one another row's), on
the CPU, single-threaded and in float32, so two runs compute bit for bit the same.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from localtune.events import EVENT_FIELDS, METHOD_FIELDS, read_events
from localtune.runs import RunDir, create_run
from tests.test_worker import (KNOBS, _cpu_hardware, events_of, kill_after_first_checkpoint, log_tail,
                               partial_leftovers, run_to_end, start_worker, step_losses, wait_worker)

MAX_STEPS = 8
PAIR_KNOBS = {**KNOBS, "max_steps": MAX_STEPS, "save_steps": 2, "eval_steps": 4, "learning_rate": 5e-3,
              "beta": 0.1, "lora_dropout": 0.0}
LOSS_TOL = 1e-4
OOM_LOSS_TOL = 1e-3
DPO_STEP_FIELDS = {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 pairs in trl's conversational form with an explicit prompt."""
    from localtune.demo import demo_dataset_path

    rows = [json.loads(line) for line in demo_dataset_path().read_text(encoding="utf-8").splitlines()[:25]]
    out = []
    for i, row in enumerate(rows[:24]):
        *prompt, answer = row["messages"]
        other = rows[i + 1]["messages"][-1]
        out.append({"prompt": prompt, "chosen": [answer], "rejected": [other]})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from localtune.demo import demo_dataset_path

    rows = demo_dataset_path().read_text(encoding="utf-8").splitlines()[:16]
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def make_run(run_id: str, model_dir: Path, data: Path, *, run_extra: dict[str, Any] | None = None,
             **knobs: Any) -> RunDir:
    from localtune.models import resolve_model
    from localtune.plan import make_plan

    plan = make_plan(_cpu_hardware(), resolve_model(str(model_dir)), profile="cpu",
                     pinned={**PAIR_KNOBS, "method": "dpo", **knobs})
    assert plan.fits
    config = {"run": {"model": str(model_dir), "data": str(data), "eval_split": 0.25, "sample_steps": 4,
                      **(run_extra or {})},
              "knobs": plan.knobs.to_dict()}
    return create_run(config, plan.to_dict(), run_id)


def assert_events_well_formed(run: RunDir) -> None:
    for e in read_events(run.events_path):
        fields = set(e) - {"t", "kind"}
        required = set(EVENT_FIELDS[e["kind"]])
        assert required <= fields, e
        assert fields - required <= set(METHOD_FIELDS.get(e["kind"], {})), e


@pytest.fixture(scope="module")
def dpo_reference(tiny_chat_model_dir: Path, pairs_file: Path, tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    """One uninterrupted DPO run, trained once for the module."""
    home = tmp_path_factory.mktemp("dpo-reference-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCALTUNE_HOME", str(home))
        run = make_run("dpo-reference", tiny_chat_model_dir, pairs_file)
        run_to_end(run)
    return run


def test_a_dpo_run_reports_its_rewards_and_writes_one_adapter(dpo_reference: RunDir) -> None:
    run = dpo_reference
    assert run.read_status()["state"] == "completed", log_tail(run)
    assert_events_well_formed(run)
    started = events_of(run, "started")
    assert [(s["method"], s["from_run"]) for s in started] == [("dpo", None)]
    steps = events_of(run, "step")
    assert [e["step"] for e in steps] == list(range(1, MAX_STEPS + 1))
    for e in steps:
        assert DPO_STEP_FIELDS <= set(e), e
        assert e["reward_margin"] == pytest.approx(e["rewards_chosen"] - e["rewards_rejected"], abs=1e-4)
        assert 0.0 <= e["reward_accuracy"] <= 1.0
    # step 1 is computed before any update: the policy is the reference (a fresh adapter adds nothing)
    assert abs(steps[0]["rewards_chosen"]) < 1e-4 and abs(steps[0]["rewards_rejected"]) < 1e-4
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0)
    # and it learned: the margin grows, the loss falls below log 2 (a tiny random model moves slowly)
    assert steps[-1]["reward_margin"] > 0.005 and steps[-1]["loss"] < 0.69
    evals = events_of(run, "eval")
    assert [e["step"] for e in evals] == [4, 8]
    assert all(0.0 <= e["eval_reward_accuracy"] <= 1.0 and "eval_reward_margin" in e for e in evals)
    card = json.loads((run.adapter_dir / "localtune.json").read_text())
    assert card == {"run": run.id, "method": "dpo", "beta": 0.1, "loss_type": "sigmoid", "from_run": None}
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    assert not (run.adapter_dir / "ref").exists()
    data = json.loads((run.path / "data.json").read_text())
    assert (data["method"], data["train_rows"], data["eval_rows"]) == ("dpo", 18, 6)


def test_dpo_resumes_after_sigkill_with_the_losses_of_the_uninterrupted_run(
        dpo_reference: RunDir, tiny_chat_model_dir: Path, pairs_file: Path) -> None:
    run = make_run("dpo-killed", tiny_chat_model_dir, pairs_file)
    newest = kill_after_first_checkpoint(start_worker(run), run)
    run_to_end(run)
    assert run.read_status()["state"] == "completed", log_tail(run)
    assert [s["resumed_from"] for s in events_of(run, "started")] == [None, newest]
    got, want = step_losses(run), step_losses(dpo_reference)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=LOSS_TOL), (step, got[step], want[step])
    margins = {e["step"]: e["reward_margin"] for e in events_of(run, "step")}
    ref_margins = {e["step"]: e["reward_margin"] for e in events_of(dpo_reference, "step")}
    for step in margins:
        assert margins[step] == pytest.approx(ref_margins[step], abs=LOSS_TOL)
    assert partial_leftovers(run) == []


def test_dpo_backs_off_out_of_memory_with_pairs_halved_and_the_effective_batch_kept(
        dpo_reference: RunDir, tiny_chat_model_dir: Path, pairs_file: Path) -> None:
    run = make_run("dpo-oom", tiny_chat_model_dir, pairs_file)
    proc = start_worker(run, LOCALTUNE_FAULT_OOM_AT_STEP="4")
    assert wait_worker(proc, run) == 0, log_tail(run)
    assert run.read_status()["state"] == "completed", log_tail(run)
    backoffs = [{k: v for k, v in e.items() if k not in ("t", "kind")} for e in events_of(run, "oom_backoff")]
    assert backoffs == [{"step": 4, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4,
                         "max_length": PAIR_KNOBS["max_length"], "resume_from": "checkpoint-2"}]
    got, want = step_losses(run), step_losses(dpo_reference)
    assert sorted(got) == list(range(1, MAX_STEPS + 1))
    for step in got:  # the same pairs in the same order: the loss per optimizer step is the same
        assert got[step] == pytest.approx(want[step], abs=OOM_LOSS_TOL), (step, got[step], want[step])


def test_orpo_trains_without_a_reference_and_reports_its_odds_ratio(
        tiny_chat_model_dir: Path, pairs_file: Path) -> None:
    """...with its checkpoints by the clock: save_steps far away, save_minutes tiny."""
    run = make_run("orpo", tiny_chat_model_dir, pairs_file, method="orpo", max_steps=4, save_steps=100,
                   eval_steps=4, save_minutes=1e-4)
    run_to_end(run)
    assert run.read_status()["state"] == "completed", log_tail(run)
    assert_events_well_formed(run)
    assert events_of(run, "started")[0]["method"] == "orpo"
    steps = events_of(run, "step")
    assert len(steps) == 4
    for e in steps:
        assert DPO_STEP_FIELDS | {"log_odds_ratio", "nll_loss"} <= set(e), e
        assert e["tokens_per_s"] > 0, e  # ORPO's batches have no input_ids: the pairs are counted
    assert json.loads((run.adapter_dir / "localtune.json").read_text())["method"] == "orpo"
    assert [e["step"] for e in events_of(run, "checkpoint")] == [1, 2, 3, 4]  # by the clock


def test_dpo_from_an_sft_run_continues_its_adapter_against_its_model(
        tiny_chat_model_dir: Path, pairs_file: Path, sft_file: Path) -> None:
    """The policy starts as the SFT model and so does the reference: at step 1 (before any
    update) the rewards are 0. Had the reference been the bare base, the SFT adapter's effect
    would show as a reward at once."""
    from localtune.models import resolve_model
    from localtune.plan import make_plan

    sft_knobs = {**PAIR_KNOBS, "method": "sft", "max_steps": 4, "save_steps": 4, "learning_rate": 1e-2}
    plan = make_plan(_cpu_hardware(), resolve_model(str(tiny_chat_model_dir)), profile="cpu", pinned=sft_knobs)
    sft = create_run({"run": {"model": str(tiny_chat_model_dir), "data": str(sft_file)},
                      "knobs": plan.knobs.to_dict()}, plan.to_dict(), "sft-first")
    run_to_end(sft)
    assert sft.read_status()["state"] == "completed", log_tail(sft)

    run = make_run("dpo-from-sft", tiny_chat_model_dir, pairs_file, max_steps=2, save_steps=2, eval_steps=2,
                   run_extra={"from_run": sft.id, "from_adapter": str(sft.adapter_dir)})
    run_to_end(run)
    assert run.read_status()["state"] == "completed", log_tail(run)
    assert events_of(run, "started")[0]["from_run"] == sft.id
    first = events_of(run, "step")[0]
    assert abs(first["rewards_chosen"]) < 1e-4 and abs(first["rewards_rejected"]) < 1e-4, first

    # the SFT adapter moved the model: against the bare base its log-probs differ, so a reference
    # of the base would have given rewards far from 0 at step 1
    base = make_run("dpo-from-base", tiny_chat_model_dir, pairs_file, max_steps=1, save_steps=1, eval_steps=1)
    run_to_end(base)
    assert abs(events_of(base, "step")[0]["rewards_chosen"]) < 1e-4  # fresh adapter: policy = base = reference

    from safetensors.torch import load_file

    sft_w, dpo_w = load_file(sft.adapter_dir / "adapter_model.safetensors"), load_file(
        run.adapter_dir / "adapter_model.safetensors")
    assert sorted(sft_w) == sorted(dpo_w)  # the same adapter, trained on
    assert max((sft_w[k] - dpo_w[k]).abs().max().item() for k in sft_w) > 0
    assert not (run.adapter_dir / "ref").exists()
    assert json.loads((run.adapter_dir / "localtune.json").read_text())["from_run"] == sft.id


def test_the_reference_is_the_policy_model_itself_never_a_second_copy(
        tiny_chat_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    """In-process, as the worker builds it: DPO from a fresh adapter has no ref_model (the
    adapter is disabled for the reference); from an SFT adapter, a frozen 'ref' adapter copy."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from localtune.data import chat_template_for
    from localtune.methods import Setup, get_method
    from localtune.knobs import Knobs
    from localtune.models import load_tokenizer, resolve_model
    from localtune.precision import DeviceFacts, precision_for

    run = make_run("in-process", tiny_chat_model_dir, pairs_file)
    knobs = Knobs(**{k: v for k, v in run.read_config()["knobs"].items()})
    tok = load_tokenizer(resolve_model(str(tiny_chat_model_dir)))
    setup = Setup(run=run, rcfg=run.read_config()["run"], backend="cpu", device="cpu",
                  precision=precision_for(knobs, DeviceFacts.live("cpu", None)), tokenizer=tok,
                  template=chat_template_for(tok), seed=knobs.seed, partial=tmp_path / "partial")
    method = get_method("dpo")
    data = method.prepare(setup, knobs)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir)
    cls, kw = method.trainer(setup, data, model, knobs, [])
    trainer = cls(**kw)
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]

    sft_dir = tmp_path / "sft-adapter"
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir),
                                LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(sft_dir)
    setup.from_adapter, setup.from_run = sft_dir, "sft"
    cls, kw = method.trainer(setup, data, AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir), knobs, [])
    trainer = cls(**kw)
    assert trainer.ref_model is None and sorted(trainer.model.peft_config) == ["default", "ref"]
    params = dict(trainer.model.named_parameters())
    ref = [n for n in params if ".ref." in n]
    assert ref and not any(params[n].requires_grad for n in ref)
    for n in ref:
        assert torch.equal(params[n], params[n.replace(".ref.", ".default.")])
    assert any(p.requires_grad for n, p in params.items() if ".default." in n)


def test_a_dpo_run_exports_gguf_with_a_modelfile_and_merged_with_its_method_on_the_card_and_chats(
        dpo_reference: RunDir, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "LOCALTUNE_HOME": str(dpo_reference.path.parent.parent), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "gguf"
    done = subprocess.run([sys.executable, "-m", "localtune", "export", str(dpo_reference.path), "--format", "gguf",
                           "--ollama", "--out", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert list(out.glob("*.gguf")) and (out / "Modelfile").is_file()
    merged = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-m", "localtune", "export", str(dpo_reference.path), "--format", "merged",
                           "--out", str(merged)], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    card = (merged / "README.md").read_text(encoding="utf-8")
    assert "| method | direct preference optimisation (DPO, beta 0.1, loss sigmoid) |" in card, card
    assert "| held-out preference accuracy |" in card
    assert "- dpo" in card.split("---")[1]  # the card's tags
    chat = subprocess.run([sys.executable, "-m", "localtune", "chat", str(dpo_reference.path), "--max-new-tokens", "4"],
                          input="Hello\n/quit\n", capture_output=True, text=True, timeout=600, env=env)
    assert chat.returncode == 0 and "tuned> " in chat.stdout, chat.stdout[-1500:] + chat.stderr[-1500:]
    assert "Traceback" not in chat.stderr


def test_orpo_counts_the_tokens_of_both_answers_without_padding() -> None:
    """transformers counts `inputs["input_ids"]`, which an ORPO batch lacks; localtune counts the
    chosen and rejected sequences (prompt included), padding left out."""
    import torch
    from types import SimpleNamespace

    from localtune.methods.orpo import counting_pairs

    class Base:
        def __init__(self, mode: str) -> None:
            self.args = SimpleNamespace(include_num_input_tokens_seen=mode, device="cpu")
            self.state = SimpleNamespace(num_input_tokens_seen=10)
            self.accelerator = SimpleNamespace(gather=lambda t: t.reshape(1))

    batch = {"chosen_input_ids": torch.ones(2, 6, dtype=torch.long),
             "chosen_attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
             "rejected_input_ids": torch.ones(2, 5, dtype=torch.long),
             "rejected_attention_mask": torch.tensor([[1] * 3 + [0] * 2, [1] * 5])}
    trainer = counting_pairs(Base)("non_padding")
    trainer._track_num_input_tokens(batch)
    assert trainer.state.num_input_tokens_seen == 10 + (6 + 4) + (3 + 5)
    every = counting_pairs(Base)("all")
    every._track_num_input_tokens(batch)
    assert every.state.num_input_tokens_seen == 10 + 12 + 10
    off = counting_pairs(Base)("no")
    off._track_num_input_tokens(batch)
    assert off.state.num_input_tokens_seen == 10


def test_rpo_alpha_adds_the_chosen_answers_nll_at_its_weight(
        tiny_chat_model_dir: Path, pairs_file: Path) -> None:
    """`rpo_alpha` reaches trl as loss_type [sigmoid, sft] with loss_weights [1, alpha]: at step
    1 (policy = reference, so the DPO term is log 2) the loss is log 2 + alpha x the chosen
    answers' NLL, the same NLL for alpha 1 and 2 (same pairs, same order)."""
    import math

    first = {}
    for alpha in (1.0, 2.0):
        run = make_run(f"rpo-{alpha:g}", tiny_chat_model_dir, pairs_file, max_steps=1, save_steps=1, eval_steps=1,
                       rpo_alpha=alpha)
        run_to_end(run)
        assert run.read_status()["state"] == "completed", log_tail(run)
        (step,) = events_of(run, "step")
        assert abs(step["rewards_chosen"]) < 1e-4 and abs(step["rewards_rejected"]) < 1e-4
        first[alpha] = step["loss"] - math.log(2)
        card = json.loads((run.adapter_dir / "localtune.json").read_text())
        assert card["rpo_alpha"] == alpha
    assert first[1.0] > 1.0, first  # a random tiny model: the NLL is several nats
    assert first[2.0] == pytest.approx(2 * first[1.0], rel=1e-3), first
