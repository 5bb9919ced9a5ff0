"""Several ranks (localtune.distributed): two processes over gloo on this CPU, the same code path
as two GPUs (accelerate's MULTI_GPU launcher, torchrun underneath), the device aside.

The slow tests train the real built-in model through the `localtune` command, as a person
would: 2 processes x micro-batch 2 against 1 process x micro-batch 2 x accumulation 2 (the same
effective batch, the same rows per step); SIGKILL of one rank, then `localtune resume`; an
out-of-memory error injected on rank 1 alone; two "machines" on the loopback address started
with the commands `--print-launch` printed. The fast ones check the pieces: the supervisor's
verdict on the ranks' outcomes, accelerate's configuration, the rendezvous address, the 4-bit
storage FSDP needs, and the ranks agreeing on a stop and on the hottest card (two real gloo
processes, no model).

Tolerance: the losses of the two-process run and the one-process run are compared at 1e-3
(measured: equal to the printed 5 decimals; bf16 autocast on this CPU). After the out-of-memory
back-off the micro-batch is 1 x 2 instead of 2 x 1, which changes the padding-free batches'
rounding: 1e-2 there (measured 1.6e-3).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localtune.distributed import (FSDP_CONFIG, accelerate_config, dump_yaml, gpu_ids, judge, parse_address)
from localtune.errors import UserError
from localtune.events import EVENT_FIELDS, RANK_FIELDS
from localtune.runs import RunDir
from tests.test_worker import signal_after_first_checkpoint

STEPS = 4
PINS = ["--set", f"max_steps={STEPS}", "--set", "save_steps=2", "--set", "eval_steps=100", "--set", "max_length=64",
        "--set", "per_device_train_batch_size=2"]
LOSS_TOL = 1e-3
BACKOFF_TOL = 1e-2


def _home(builtin_model_dir: Path, tmp_path_factory, name: str) -> Path:
    home = tmp_path_factory.mktemp(name)
    link = home / "cache" / "models" / builtin_model_dir.name
    link.parent.mkdir(parents=True)
    os.symlink(builtin_model_dir, link, target_is_directory=True)
    (home / "sample.toml").write_text("[run]\nsample_steps = 2\n")
    return home


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "LOCALTUNE_HOME": str(home), "HF_HUB_OFFLINE": "1", **extra}


def _localtune(home: Path, *argv: str, timeout: float = 900, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localtune", *argv], capture_output=True, text=True,
                          timeout=timeout, env=_env(home, **env), stdin=subprocess.DEVNULL)


def _only_run(home: Path) -> RunDir:
    (path,) = (home / "runs").iterdir()
    return RunDir(path)


def _events(run: RunDir) -> list[dict]:
    return [json.loads(line) for line in run.events_path.read_text().splitlines() if line.strip()]


def _losses(run: RunDir) -> dict[int, float]:
    """The loss of each step, the last attempt's where a step was trained twice."""
    return {e["step"]: e["loss"] for e in _events(run) if e["kind"] == "step"}


@pytest.fixture(scope="module")
def two_process_run(builtin_model_dir, tmp_path_factory):
    """`localtune train --processes 2` on the built-in model, 4 steps of 2 ranks x 2 rows."""
    home = _home(builtin_model_dir, tmp_path_factory, "two-process")
    done = _localtune(home, "train", "--processes", "2", *PINS, "--set", "gradient_accumulation_steps=1",
                      "--config", str(home / "sample.toml"), "--headless")
    return home, _only_run(home), done


@pytest.fixture(scope="module")
def one_process_run(builtin_model_dir, tmp_path_factory):
    """The same rows per step in one process: micro-batch 2 x accumulation 2."""
    home = _home(builtin_model_dir, tmp_path_factory, "one-process")
    done = _localtune(home, "train", *PINS, "--set", "gradient_accumulation_steps=2", "--headless")
    return home, _only_run(home), done


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_effective_batch(two_process_run, one_process_run) -> None:
    _, run, done = two_process_run
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + run.log_path.read_text()[-3000:]
    assert f"finished: {STEPS} steps" in done.stdout
    _, single, single_done = one_process_run
    assert single_done.returncode == 0, single_done.stderr[-2000:]
    two, one = _losses(run), _losses(single)
    assert sorted(two) == list(range(1, STEPS + 1)) == sorted(one)
    for step in two:
        assert two[step] == pytest.approx(one[step], abs=LOSS_TOL), (step, two, one)

    plan = json.loads(run.plan_path.read_text())
    assert plan["parallel"]["mode"] == "ddp" and plan["parallel"]["world_size"] == 2
    import yaml

    cfg = yaml.safe_load((run.path / "accelerate.yaml").read_text())
    assert (cfg["distributed_type"], cfg["num_processes"], cfg["use_cpu"]) == ("MULTI_GPU", 2, True)

    events = _events(run)
    for e in events:  # every field is documented: the kind's own, and those of a run of several ranks
        assert set(e) - {"t", "kind"} == set(EVENT_FIELDS[e["kind"]]) | set(RANK_FIELDS.get(e["kind"], {})), e
    kinds = [e["kind"] for e in events]
    # rank 0 alone writes: one start, one event per step, one finish
    assert kinds.count("started") == 1 and kinds.count("step") == STEPS and kinds.count("finished") == 1
    started = next(e for e in events if e["kind"] == "started")
    assert started["world_size"] == 2 and started["parallel_mode"] == "ddp"
    assert kinds.count("sample") == 2  # rank 0 generates at steps 2 and 4 while rank 1 waits
    hardware = [e for e in events if e["kind"] == "hardware"]
    assert hardware and all(len(e["devices"]) == 2 for e in hardware)
    assert all(d["memory_used_bytes"] > 100e6 for d in hardware[-1]["devices"])  # each rank holds the model

    for ck in run.complete_checkpoints():
        assert (ck / "rng_state_0.pth").is_file() and (ck / "rng_state_1.pth").is_file(), list(ck.iterdir())
    assert [c.name for c in run.complete_checkpoints()] == ["checkpoint-2", "checkpoint-4"]
    # one adapter, written once, by rank 0
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    outcomes = {json.loads(p.read_text())["rank"]: json.loads(p.read_text())["outcome"]
                for p in (run.path / "ranks").glob("rank-*.json")}
    assert outcomes == {0: "completed", 1: "completed"}
    # the export is the one a single process's run gets: the same adapter files and shape
    home = two_process_run[0]
    exported = _localtune(home, "export", run.id, "--format", "adapter", "--out", str(home / "out"), timeout=300)
    assert exported.returncode == 0, exported.stderr
    mine = json.loads((home / "out" / "adapter_config.json").read_text())
    theirs = json.loads((single.adapter_dir / "adapter_config.json").read_text())
    assert (mine["r"], mine["lora_alpha"], sorted(mine["target_modules"])) == \
        (theirs["r"], theirs["lora_alpha"], sorted(theirs["target_modules"]))
    assert sorted(p.name for p in (home / "out").iterdir()) == sorted(p.name for p in single.adapter_dir.iterdir())


@pytest.mark.slow
def test_sigkill_of_one_rank_interrupts_the_run_and_resume_continues_exactly(builtin_model_dir, tmp_path_factory,
                                                                              two_process_run) -> None:
    home = _home(builtin_model_dir, tmp_path_factory, "two-process-kill")
    started = _localtune(home, "train", "--processes", "2", *PINS, "--set", "gradient_accumulation_steps=1",
                         "--detach")
    assert started.returncode == 0, started.stderr
    run = _only_run(home)
    supervisor = run.live_worker_pid()
    assert supervisor is not None
    newest = signal_after_first_checkpoint(None, run, signal.SIGKILL,
                                           pid=lambda: json.loads((run.path / "ranks" / "rank-1.json").read_text())["pid"])
    assert newest == "checkpoint-2"
    deadline = time.time() + 120
    while run.live_worker_pid() is not None and time.time() < deadline:
        time.sleep(0.5)
    assert run.live_worker_pid() is None, "the supervisor did not end after a rank died"
    state, error = run.state_and_error()
    assert state == "interrupted", (state, error, run.log_path.read_text()[-3000:])
    assert "rank 1 ended without a word" in error and "checkpoint-2" in error
    listed = _localtune(home, "runs", "--json")
    assert json.loads(listed.stdout)[0]["state"] == "interrupted"

    resumed = _localtune(home, "resume", run.id, "--headless")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + run.log_path.read_text()[-3000:]
    assert run.state() == "completed"
    restarted = [e for e in _events(run) if e["kind"] == "started"]
    assert restarted[-1]["resumed_from"] == "checkpoint-2"
    after, reference = _losses(run), _losses(two_process_run[1])
    for step in range(3, STEPS + 1):
        assert after[step] == pytest.approx(reference[step], abs=LOSS_TOL), (step, after, reference)


@pytest.mark.slow
def test_localtune_stop_reaches_every_rank_and_they_stop_at_one_step(builtin_model_dir, tmp_path_factory) -> None:
    home = _home(builtin_model_dir, tmp_path_factory, "two-process-stop")
    started = _localtune(home, "train", "--processes", "2", *PINS, "--set", "gradient_accumulation_steps=1",
                         "--set", "max_steps=30", "--detach")
    assert started.returncode == 0, started.stderr
    run = _only_run(home)
    deadline = time.time() + 600
    while not run.complete_checkpoints():
        assert time.time() < deadline and run.live_worker_pid(), run.log_path.read_text()[-3000:]
        time.sleep(0.5)
    stopped = _localtune(home, "stop", run.id, "--wait", timeout=300)  # it signals the supervisor alone
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert run.state() == "stopped"
    events = _events(run)
    (end,) = [e for e in events if e["kind"] == "stopped"]
    assert [e["kind"] for e in events].count("stopping") == 1  # rank 0 alone says it
    assert end["checkpoint"] == f"checkpoint-{end['step']}" and 2 <= end["step"] < 30
    ck = run.checkpoints_dir / end["checkpoint"]
    assert (ck / "rng_state_0.pth").is_file() and (ck / "rng_state_1.pth").is_file()
    outcomes = {d["rank"]: d["outcome"] for d in map(lambda p: json.loads(p.read_text()),
                                                      (run.path / "ranks").glob("rank-*.json"))}
    assert outcomes == {0: "stopped", 1: "stopped"}  # both ended the same step, neither was killed


@pytest.mark.slow
def test_out_of_memory_on_rank_1_backs_off_every_rank(builtin_model_dir, tmp_path_factory, two_process_run) -> None:
    home = _home(builtin_model_dir, tmp_path_factory, "two-process-oom")
    done = _localtune(home, "train", "--processes", "2", *PINS, "--set", "gradient_accumulation_steps=1",
                      "--headless", LOCALTUNE_FAULT_OOM_AT_STEP="3", LOCALTUNE_FAULT_OOM_RANK="1")
    run = _only_run(home)
    assert done.returncode == 0, done.stdout[-2000:] + run.log_path.read_text()[-3000:]
    log = run.log_path.read_text()
    assert "out of memory on rank 1: every rank backs off" in log
    (backoff,) = [e for e in _events(run) if e["kind"] == "oom_backoff"]
    assert (backoff["step"], backoff["per_device_train_batch_size"], backoff["gradient_accumulation_steps"],
            backoff["resume_from"]) == (3, 1, 2, "checkpoint-2")
    knobs = run.read_config()["knobs"]
    assert (knobs["per_device_train_batch_size"], knobs["gradient_accumulation_steps"]) == (1, 2)
    assert "micro-batch now 1 x 2" in done.stdout
    after, reference = _losses(run), _losses(two_process_run[1])
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in after:
        assert after[step] == pytest.approx(reference[step], abs=BACKOFF_TOL), (step, after, reference)


@pytest.mark.slow
def test_two_machines_on_the_loopback_address_train_as_the_two_process_run(builtin_model_dir, tmp_path_factory,
                                                                           two_process_run) -> None:
    from localtune.distributed import free_port

    home = _home(builtin_model_dir, tmp_path_factory, "two-nodes")
    port = free_port()
    printed = _localtune(home, "train", "--nodes", "2", *PINS, "--set", "gradient_accumulation_steps=1",
                         "--config", str(home / "sample.toml"), "--print-launch",
                         "--main-address", f"127.0.0.1:{port}")
    assert printed.returncode == 0, printed.stderr
    run = _only_run(home)
    assert "nothing started yet" in printed.stdout and f"rendezvous: 127.0.0.1:{port}" in printed.stdout
    assert run.state() == "created" and not (run.path / "ranks").exists()
    commands = [line.split(": ", 1)[1] for line in printed.stdout.splitlines() if line.strip().startswith("machine ")]
    assert len(commands) == 2 and commands[1].endswith("--node-rank 1"), printed.stdout
    import yaml

    cfg = yaml.safe_load((run.path / "accelerate.yaml").read_text())
    assert (cfg["num_machines"], cfg["num_processes"], cfg["main_process_port"]) == (2, 2, port)

    with open(run.path / "machine-1.log", "wb") as log1:
        # two "machines" on one 2-core box: accelerate gives each machine's one process every core
        # (OMP_NUM_THREADS unset), and four threads on two cores made a step 15x slower
        machines = [subprocess.Popen(shlex.split(c), env=_env(home, OMP_NUM_THREADS="1"), stdin=subprocess.DEVNULL,
                                     stdout=open(run.log_path, "ab") if k == 0 else log1, stderr=subprocess.STDOUT)
                    for k, c in enumerate(commands)]
        codes = [m.wait(timeout=900) for m in machines]
    assert codes == [0, 0], run.log_path.read_text()[-3000:] + (run.path / "machine-1.log").read_text()[-2000:]
    assert run.state() == "completed"
    reference_run = two_process_run[1]
    kinds = sorted({e["kind"] for e in _events(run)})
    assert kinds == sorted({e["kind"] for e in _events(reference_run)})
    assert [c.name for c in run.complete_checkpoints()] == [c.name for c in reference_run.complete_checkpoints()]
    assert all((c / "rng_state_1.pth").is_file() for c in run.complete_checkpoints())
    after, reference = _losses(run), _losses(reference_run)
    for step in reference:
        assert after[step] == pytest.approx(reference[step], abs=LOSS_TOL), (step, after, reference)


# ---------------------------------------------------------------- the pieces, fast


def test_the_supervisor_backs_off_on_any_ranks_oom_and_calls_a_silent_rank_interrupted() -> None:
    oom = {0: {"rank": 0, "outcome": "comm", "error": "Connection closed by peer"},
           1: {"rank": 1, "outcome": "oom", "step": 7}}
    assert judge(oom, 2, 1, stopping=False) == ("oom", {"step": 7, "ranks": "1"})
    killed = {0: {"rank": 0, "outcome": "comm", "error": "Connection closed by peer"}, 1: {"rank": 1, "outcome": None}}
    verdict, detail = judge(killed, 2, 1, stopping=False)
    assert verdict == "interrupted" and detail["error"].startswith("rank 1 ended without a word")
    bad = {0: {"rank": 0, "outcome": "user_error", "error": "the disk is full"}, 1: {"rank": 1, "outcome": "comm"}}
    assert judge(bad, 2, 1, stopping=False) == ("user_error", {"error": "the disk is full"})
    bug = {0: {"rank": 0, "outcome": "error", "error": "TypeError: x"}, 1: {"rank": 1, "outcome": "comm"}}
    assert judge(bug, 2, 1, stopping=False) == ("error", {"error": "rank 0: TypeError: x"})
    # out of memory while stopping: no back-off and relaunch, the stop wins
    assert judge(oom, 2, 1, stopping=True)[0] == "interrupted"


def test_accelerate_gets_torchruns_launcher_on_the_cpu_and_the_plans_gpus_in_cuda_order() -> None:
    cpu = accelerate_config({"mode": "ddp", "processes": 2, "nodes": 1, "devices": []}, "cpu", port=1234)
    # accelerate's MULTI_CPU needs mpirun (and starts one process without it): MULTI_GPU + use_cpu is torchrun over gloo
    assert (cpu["distributed_type"], cpu["use_cpu"], cpu["num_processes"], cpu["gpu_ids"]) == ("MULTI_GPU", True, 2, "all")
    gpus = accelerate_config({"mode": "ddp", "processes": 2, "nodes": 2, "devices": [0, 2]}, "cuda",
                             main_address="10.0.0.5", port=29500, env={})
    assert (gpus["num_processes"], gpus["num_machines"], gpus["gpu_ids"], gpus["use_cpu"]) == (4, 2, "0,2", False)
    assert gpus["main_process_ip"] == "10.0.0.5"
    # the probe numbered GPUs within this process's CUDA_VISIBLE_DEVICES: ordinals 0 and 2 are cards 5 and 7
    assert gpu_ids([0, 2], {"CUDA_VISIBLE_DEVICES": "5,6,7"}) == "5,7"
    fsdp = accelerate_config({"mode": "fsdp", "processes": 2, "nodes": 1, "devices": [0, 1]}, "cuda", env={})
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"] == FSDP_CONFIG
    assert FSDP_CONFIG["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and not FSDP_CONFIG["fsdp_use_orig_params"]
    import yaml

    assert yaml.safe_load(dump_yaml(fsdp)) == fsdp  # what accelerate reads is what was planned


def test_accelerate_reads_the_written_configuration_as_written(tmp_path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    path = tmp_path / "accelerate.yaml"
    path.write_text(dump_yaml(accelerate_config({"mode": "fsdp", "processes": 2, "nodes": 2, "devices": [0, 1]},
                                                "cuda", main_address="10.0.0.5", port=29400, env={})))
    cfg = load_config_from_file(str(path))
    assert (str(cfg.distributed_type), cfg.num_processes, cfg.num_machines, cfg.main_process_port) == \
        ("DistributedType.FSDP", 4, 2, 29400)
    assert cfg.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert cfg.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True


def test_a_bad_rendezvous_address_is_one_line_and_leaves_no_run(capsys, builtin_model_dir, localtune_home) -> None:
    from tests.helpers import one_line_error, run as run_cli

    rc, _, err = run_cli(capsys, "train", "--nodes", "2", "--main-address", "node0:99999", "--print-launch")
    assert rc == 1
    assert "--main-address 'node0:99999': give HOST or HOST:PORT" in one_line_error(err)
    assert not (localtune_home / "runs").exists() or not any((localtune_home / "runs").iterdir())
    assert parse_address("10.0.0.5", "--main-address") == ("10.0.0.5", 29500)
    assert parse_address("node0:1234", "--main-address") == ("node0", 1234)
    for bad in ("10.0.0.5:", ":80", "host:99999", "host:abc"):
        with pytest.raises(UserError, match="--main-address"):
            parse_address(bad, "--main-address")


def test_fsdp_ranks_store_4bit_weights_in_the_compute_dtype(tiny_llama_dir: Path) -> None:
    """FSDP flattens every parameter of a unit into one tensor of one dtype: bitsandbytes' 4-bit
    weights must be stored in the compute dtype (bnb_4bit_quant_storage), not uint8."""
    import bitsandbytes as bnb
    import torch

    from localtune.knobs import Knobs
    from localtune.loading import load_base_model
    from localtune.precision import DeviceFacts, precision_for

    knobs = Knobs(load_in_4bit=True)
    precision = precision_for(knobs, DeviceFacts.live("cpu", None))
    sharded = load_base_model(str(tiny_llama_dir), knobs, precision, "cpu", False, fsdp=True)
    alone = load_base_model(str(tiny_llama_dir), knobs, precision, "cpu", False)
    storage = {m.weight.dtype for m in sharded.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert storage == {precision.bnb_compute_torch_dtype()} and torch.uint8 not in storage
    assert {m.weight.dtype for m in alone.modules() if isinstance(m, bnb.nn.Linear4bit)} == {torch.uint8}


def _agree_in_two_processes(rank: int, port: int, out: str) -> None:
    """One of two gloo processes: rank 1 is asked to stop and its card is hot; both must see both."""
    import torch.distributed as dist

    from localtune.callbacks import AgreeOnStop, StopRequest, ThermalGuard
    from localtune.distributed import make_agreeing_reader

    from datetime import timedelta

    # ranks that disagree would wait for each other forever: a collective gives up after 30 s instead
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    stop = StopRequest()
    temps = iter([95.0, 90.0, 70.0] if rank == 1 else [60.0, 60.0, 60.0])
    events = Path(out) / "events.jsonl"
    guard = ThermalGuard(80.0, make_agreeing_reader(lambda: next(temps), stop), events if rank == 0 else None, stop,
                         sleep=lambda s: None, poll_s=0.0)
    guard.wait(step=4)
    readings = 3 - len(list(temps))  # what was read before the pause ended: the same on both ranks
    if rank == 1:
        stop.requested = True
    AgreeOnStop(stop).on_step_end(None, None, None)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"readings": readings, "stop": stop.requested,
                                                            "reason": stop.reason}))
    dist.destroy_process_group()


def test_ranks_pause_for_the_hottest_card_and_stop_together(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from localtune.distributed import free_port

    mp.start_processes(_agree_in_two_processes, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["readings"] == r1["readings"] == 3  # both paused until rank 1's card was 70 C
    assert r0["stop"] and r1["stop"]  # rank 1's stop reached rank 0
    assert r0["reason"] == "SIGTERM (another rank)"
    kinds = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    # rank 0's own card was cool: it paused for rank 1's, and only rank 0 wrote the events
    assert [e["kind"] for e in kinds] == ["thermal_pause", "thermal_resume"]
    assert kinds[0]["temperature_c"] == 95.0 and kinds[1]["temperature_c"] == 70.0


def test_a_machine_the_run_was_not_planned_for_is_refused(tmp_path: Path) -> None:
    """`python -m localtune.worker RUN --node-rank K` on a run planned for fewer machines trains
    nothing (it would be a second, unsupervised copy of the run)."""
    from localtune.runs import create_run

    run = create_run({"run": {"model": "smollm2-135m", "data": "demo"}, "knobs": {}},
                     {"parallel": {"mode": "ddp", "processes": 2, "nodes": 1, "devices": []}}, "20261207-100000-x")
    done = subprocess.run([sys.executable, "-m", "localtune.worker", str(run.path), "--node-rank", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "is planned for 1 machine (--node-rank 0 to 0); --node-rank 1 is not one of them" in done.stderr
    assert run.read_status()["state"] == "created" and not (run.path / "ranks").exists()


def test_every_ranks_gpu_is_in_the_hardware_event(monkeypatch, tmp_path: Path) -> None:
    """Two RTX 4090s under a faked NVML (this machine has none): rank 0's hardware event carries
    both cards' memory in use and temperature, as NVML reads them."""
    from dataclasses import replace

    from localtune import hardware
    from localtune.callbacks import hardware_event
    from localtune.runs import create_run
    from tests.fakes import RTX_4090, MiB, install_gpus

    hot = replace(RTX_4090, used=20000 * MiB, temp=83, uuid="GPU-4090aaaa-0000-0000-0000-000000000002",
                  bus_id="00000000:02:00.0")
    install_gpus(monkeypatch, [RTX_4090, hot])
    monkeypatch.setattr(hardware, "_probe_apple", lambda ram_total: None)
    hw = hardware.probe()
    assert hw.backend == "cuda" and [d.index for d in hw.devices] == [0, 1]
    monkeypatch.setattr("torch.cuda.mem_get_info", lambda device=None: (4 * 2**30, 24 * 2**30))
    run = create_run({"run": {"model": "smollm2-135m", "data": "demo"}, "knobs": {}}, {}, "20261207-100001-x")
    hardware_event(run, "cuda", hw, "cuda:0", {"mode": "ddp", "world_size": 2, "devices": [0, 1]})
    (event,) = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    cards = event["devices"]
    assert [(d["rank"], d["index"], d["temperature_c"]) for d in cards] == [(0, 0, 45.0), (1, 1, 83.0)]
    # in use on the card: the fake's 20000 MiB and what NVML's v2 reading adds for the driver (300 MiB here)
    assert 20000 * MiB <= cards[1]["memory_used_bytes"] <= 20512 * MiB
    assert cards[0]["memory_used_bytes"] < 2048 * MiB and cards[1]["memory_total_bytes"] == RTX_4090.total


def test_gpus_that_skip_gpu_0_train_are_read_and_guarded_on_the_cards_picked(monkeypatch) -> None:
    """`--gpus 1` (one process) and `--gpus 1,2` (two ranks) on a faked 3-GPU NVML: training,
    the hardware event's readings and the thermal guard follow the picked cards, not GPU 0."""
    from dataclasses import replace

    from localtune import hardware
    from localtune.callbacks import StopRequest, hardware_event, thermal_guard_for
    from localtune.distributed import parallel_of
    from localtune.runs import create_run
    from localtune.worker import _device_of
    from tests.fakes import RTX_4090, install_gpus

    cards = [replace(RTX_4090, temp=t, uuid=f"GPU-4090aaaa-0000-0000-0000-00000000000{i}", bus_id=f"00000000:0{i + 1}:00.0")
             for i, t in enumerate((40, 83, 61))]
    install_gpus(monkeypatch, cards)
    monkeypatch.setattr(hardware, "_probe_apple", lambda ram_total: None)
    monkeypatch.setattr("torch.cuda.mem_get_info", lambda device=None: (4 * 2**30, 24 * 2**30))
    hw = hardware.probe()
    run = create_run({"run": {"model": "smollm2-135m", "data": "demo"}, "knobs": {}}, {}, "20261207-100002-x")

    one = {"hardware": hw.to_dict(), "parallel": {"mode": "single", "processes": 1, "nodes": 1, "devices": [1]}}
    assert _device_of("cuda", one) == "cuda:1"
    hardware_event(run, "cuda", hw, "cuda:1", parallel_of(one))
    guard = thermal_guard_for(80, "cuda", hw, run.events_path, StopRequest(), devices=[1])
    assert guard.read_temp() == 83.0

    two = {"mode": "ddp", "processes": 2, "nodes": 1, "devices": [1, 2]}
    hardware_event(run, "cuda", hw, "cuda:0", parallel_of({"parallel": two}))  # rank 0 sees GPU 1 as cuda:0
    single, ranked = [json.loads(line) for line in run.events_path.read_text().splitlines()]
    assert single["temperature_c"] == 83.0 and "devices" not in single
    assert ranked["temperature_c"] == 83.0
    assert [(d["rank"], d["index"], d["temperature_c"]) for d in ranked["devices"]] == [(0, 1, 83.0), (1, 2, 61.0)]
