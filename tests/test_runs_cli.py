"""`localtune runs`: the method of each run (sft, dpo, orpo) in the table and in --json, with
the run a preference run continues (fabricated run folders; nothing trains)."""

from __future__ import annotations

import json

from localtune.runs import create_run
from tests.helpers import run as run_cli

SFT_RUN = "20260921-101500-smollm2-135m"
DPO_RUN = "20260921-140000-smollm2-135m"


def make_runs() -> None:
    create_run({"run": {"model": "smollm2-135m", "data": "demo"}, "knobs": {}}, {}, "20260920-090000-old")
    create_run({"run": {"model": "smollm2-135m", "data": "demo"}, "knobs": {"method": "sft"}}, {}, SFT_RUN)
    create_run({"run": {"model": "smollm2-135m", "data": "/data/pairs.jsonl", "from_run": SFT_RUN},
                "knobs": {"method": "dpo", "beta": 0.1}}, {}, DPO_RUN)
    create_run({"run": {"model": "smollm2-135m", "data": "/data/pairs.jsonl"}, "knobs": {"method": "orpo"}}, {},
               "20260921-150000-orpo")


def test_runs_lists_the_method_of_each_run(capsys):
    make_runs()
    rc, out, err = run_cli(capsys, "runs")
    assert rc == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["run", "method", "state", "step", "loss", "model", "updated"]
    methods = {row.split()[0]: row.split()[1] for row in rows}
    # a config from before the method knob is an sft run's
    assert methods == {"20260920-090000-old": "sft", SFT_RUN: "sft", DPO_RUN: "dpo", "20260921-150000-orpo": "orpo"}
    assert max(len(line) for line in out.splitlines()) <= 80


def test_runs_json_has_the_method_and_the_run_continued(capsys):
    make_runs()
    rc, out, err = run_cli(capsys, "runs", "--json")
    assert rc == 0, err
    by_id = {r["id"]: r for r in json.loads(out)}
    assert (by_id[DPO_RUN]["method"], by_id[DPO_RUN]["from_run"]) == ("dpo", SFT_RUN)
    assert (by_id[SFT_RUN]["method"], by_id[SFT_RUN]["from_run"]) == ("sft", None)
    assert by_id["20260920-090000-old"]["method"] == "sft"
