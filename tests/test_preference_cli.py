"""`localtune train --method dpo|orpo [--from RUN]` as a person types it: what is refused in one
line (exit code 1, no traceback, no run folder written), and what the run's config records.
Nothing here trains: the worker is not started (`start_worker` is replaced) where a run is made."""

from __future__ import annotations

import json

import pytest

from localtune.paths import runs_dir
from localtune.runs import create_run, list_runs
from tests.helpers import one_line_error, run


def finished_sft_run(run_id: str, model: str = "smollm2-135m", *, adapter: bool = True, state: str = "completed",
                     data: str = "demo"):
    r = create_run({"run": {"model": model, "data": data},
                    "knobs": {"method": "sft", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                              "target_modules": ["q_proj", "v_proj"]}}, {}, run_id)
    r.write_status(state=state)
    if adapter:
        r.adapter_dir.mkdir()
        (r.adapter_dir / "adapter_config.json").write_text("{}", encoding="utf-8")
    return r


def pairs_file(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Good answer {i}.",
                                     "rejected": f"Bad answer {i}."}) + "\n" for i in range(6)), encoding="utf-8")
    return p


@pytest.fixture
def no_worker(monkeypatch):
    started = []
    monkeypatch.setattr("localtune.launch.start_worker", lambda r, lock=None: started.append(r) or _Proc())
    return started


class _Proc:
    pid = 4242


def only_runs() -> list[str]:
    return [r.id for r in list_runs()]


def test_from_a_run_that_did_not_finish_is_one_line(capsys, machine_without_gpu) -> None:
    finished_sft_run("20260101-090000-sft", state="stopped", adapter=False)
    rc, _, err = run(capsys, "train", "--method", "dpo", "--from", "20260101-090000-sft", "--detach")
    assert rc == 1
    assert one_line_error(err) == (
        "localtune: error: --from 20260101-090000-sft: run 20260101-090000-sft has no finished adapter to continue "
        "(it is stopped); continue from a completed run (`localtune runs` lists them)")
    assert only_runs() == ["20260101-090000-sft"]


def test_from_a_run_of_another_base_model_is_one_line(capsys, machine_without_gpu, tiny_chat_model_dir) -> None:
    finished_sft_run("20260101-090000-sft")
    rc, _, err = run(capsys, "train", "--model", str(tiny_chat_model_dir), "--from", "20260101-090000-sft",
                     "--detach")
    assert rc == 1
    line = one_line_error(err)
    assert line.startswith("localtune: error: --from 20260101-090000-sft: run 20260101-090000-sft trained "
                           "'smollm2-135m', not ")
    assert line.endswith("its adapter fits only that base model: train with --model smollm2-135m "
                         "(or start without --from)")
    assert only_runs() == ["20260101-090000-sft"]


def test_from_with_method_sft_is_one_line(capsys, machine_without_gpu) -> None:
    finished_sft_run("20260101-090000-sft")
    rc, _, err = run(capsys, "train", "--method", "sft", "--from", "last", "--detach")
    assert rc == 1
    assert one_line_error(err) == (
        "localtune: error: --from last: continuing a run's adapter is for preference tuning; use --method dpo "
        "or --method orpo (or leave --method out: dpo)")


def test_an_sft_file_for_dpo_is_one_line_naming_both_formats(capsys, machine_without_gpu, tmp_path) -> None:
    sft = tmp_path / "data.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello"}]}) + "\n", encoding="utf-8")
    rc, _, err = run(capsys, "train", "--method", "dpo", "--data", str(sft), "--detach")
    assert rc == 1
    assert one_line_error(err) == (
        f"localtune: error: {sft}: these rows are messages (supervised fine-tuning); --method dpo needs preference "
        "pairs (preference: prompt/chosen/rejected, or preference_messages: chosen/rejected conversations); see "
        "localtune data formats")
    assert only_runs() == []


def test_dpo_from_a_finished_run_records_it_and_trains_its_adapter_shape(
        capsys, machine_without_gpu, no_worker, tmp_path) -> None:
    src = finished_sft_run("20260101-090000-sft")
    rc, out, err = run(capsys, "train", "--from", "last", "--data", str(pairs_file(tmp_path)), "--detach")
    assert rc == 0, err
    assert "with DPO, continuing run 20260101-090000-sft" in out
    new = [r for r in list_runs() if r.id != src.id]
    assert len(new) == 1 and no_worker == new
    cfg = new[0].read_config()
    assert cfg["knobs"]["method"] == "dpo"
    assert cfg["run"]["from_run"] == src.id and cfg["run"]["from_adapter"] == str(src.adapter_dir)
    # the adapter it continues decides the LoRA knobs, whatever the profile says
    assert {k: cfg["knobs"][k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules")} == {
        "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def test_dpo_with_no_data_takes_the_preference_demo_and_its_held_out_pairs(
        capsys, machine_without_gpu, no_worker) -> None:
    from localtune.launch import PREFERENCE_DEMO_RECIPE

    rc, out, err = run(capsys, "train", "--method", "dpo", "--detach")
    assert rc == 0, err
    (r,) = list_runs()
    cfg = r.read_config()
    assert (cfg["run"]["data"], cfg["run"]["eval_data"]) == ("demo-preference", "demo-preference-eval")
    assert cfg["knobs"]["method"] == "dpo"
    for k, v in PREFERENCE_DEMO_RECIPE.items():
        assert cfg["knobs"][k] == v, k
    assert r.read_status()["rows"] == 280
    assert str(runs_dir()) in str(r.path)


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_after_the_sft_demo_the_preference_demo_speaks_in_its_voice(
        capsys, machine_without_gpu, no_worker, tmp_path, method) -> None:
    """Continuing a run of the SFT demo with no data: the pairs (and the held-out pairs) are the
    preference demo's in that model's voice, "Ahoy! " and the signature on both answers."""
    from localtune import demo
    from localtune.launch import PREFERENCE_DEMO_RECIPE

    src = finished_sft_run("20260101-090000-sft")
    rc, out, err = run(capsys, "train", "--method", method, "--from", src.id, "--detach")
    assert rc == 0, err
    assert "on demo-preference-parrot" in out
    (r,) = [r for r in list_runs() if r.id != src.id]
    cfg = r.read_config()
    assert (cfg["run"]["data"], cfg["run"]["eval_data"]) == ("demo-preference-parrot", "demo-preference-parrot-eval")
    assert cfg["knobs"]["learning_rate"] == PREFERENCE_DEMO_RECIPE["learning_rate"]
    assert cfg["knobs"]["rpo_alpha"] == (1.0 if method == "dpo" else 0.0)  # DPO's NLL term keeps it fluent
    assert r.read_status()["rows"] == 280
    first = demo.read_preference_pairs(demo.parrot_preference_dataset_path())[0]
    assert first["chosen"][-1]["content"].startswith("Ahoy! In short: ")
    assert first["rejected"][-1]["content"].startswith("Ahoy! ")


def test_the_plain_preference_demo_when_asked_for_or_after_other_data(
        capsys, machine_without_gpu, no_worker, tmp_path) -> None:
    finished_sft_run("20260101-090000-sft")
    rc, _, err = run(capsys, "train", "--from", "20260101-090000-sft", "--data", "demo-preference", "--detach")
    assert rc == 0, err
    finished_sft_run("20260101-100000-own", data=str(pairs_file(tmp_path)))
    rc, _, err = run(capsys, "train", "--from", "20260101-100000-own", "--detach")
    assert rc == 0, err
    made = {r.read_config()["run"]["from_run"]: r.read_config()["run"] for r in list_runs()
            if r.read_config()["run"].get("from_run")}
    assert {k: (v["data"], v["eval_data"]) for k, v in made.items()} == {
        "20260101-090000-sft": ("demo-preference", "demo-preference-eval"),
        "20260101-100000-own": ("demo-preference", "demo-preference-eval")}


def test_a_preference_method_takes_its_own_learning_rate_unless_one_is_set(machine_without_gpu) -> None:
    from localtune.hardware import probe
    from localtune.models import resolve_model
    from localtune.plan import make_plan

    model = resolve_model("smollm2-135m")
    sft = make_plan(probe(), model)
    assert sft.knobs.learning_rate == 2e-4 and sft.knob_sources()["learning_rate"] == "profile cpu"
    dpo = make_plan(probe(), model, pinned={"method": "dpo"})
    assert dpo.knobs.learning_rate == 5e-6 and dpo.knob_sources()["learning_rate"] == "dpo default"
    orpo = make_plan(probe(), model, pinned={"method": "orpo"})
    assert orpo.knobs.learning_rate == 8e-6
    mine = make_plan(probe(), model, pinned={"method": "dpo", "learning_rate": 1e-5})
    assert mine.knobs.learning_rate == 1e-5 and mine.knob_sources()["learning_rate"] == "set by you"


def test_the_model_card_names_an_nll_term_when_dpo_had_one() -> None:
    from localtune.export import _method_rows

    plain = _method_rows("dpo", {"beta": 0.1, "loss_type": "sigmoid", "rpo_alpha": 0.0}, {})
    rpo = _method_rows("dpo", {"beta": 0.1, "loss_type": "sigmoid", "rpo_alpha": 0.5},
                       {"from_run": "20260101-090000-sft"})
    assert plain == ["| method | direct preference optimisation (DPO, beta 0.1, loss sigmoid) |"]
    assert rpo[0] == ("| method | direct preference optimisation (DPO, beta 0.1, loss sigmoid + 0.5 x NLL of the "
                      "chosen answers (RPO)) |")
    assert rpo[1] == "| started from | run `20260101-090000-sft`'s adapter (the DPO reference: that run's model) |"


def test_rpo_alpha_is_checked_like_every_knob(capsys, machine_without_gpu) -> None:
    rc, _, err = run(capsys, "train", "--method", "dpo", "--set", "rpo_alpha=-1", "--detach")
    assert rc == 1
    assert one_line_error(err) == "localtune: error: --set rpo_alpha: 'rpo_alpha' must be at least 0, got -1.0"
    assert only_runs() == []
