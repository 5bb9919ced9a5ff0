"""The worker's callbacks: module-level classes with their state in their fields.

Each one watches the trl trainer from outside, whatever the training method:

- `RunEvents` writes what a run is doing into `events.jsonl` and `status.json` (started, step
  with the method's own metrics, eval, sample, hardware): one instance per attempt;
- `SaveByClock` asks for a checkpoint every `save_minutes`;
- `ThermalGuard` pauses between optimizer steps while the GPU is too hot;
- `InjectOom` (test-only) raises an out-of-memory error at the start of one step, once.

`StopRequest` is the SIGTERM flag the worker installs; `RunEvents` turns it into a checkpoint
and the end of training at the next step's end.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from localtune.events import append_event
from localtune.runs import RunDir

SAMPLE_MAX_NEW_TOKENS = 32
THERMAL_POLL_S = 10.0
"""How often a run paused for heat reads the GPU's temperature."""
THERMAL_HYSTERESIS_C = 3
"""A run paused for heat goes on once the GPU is this many degrees below the limit."""
FAULT_OOM_AT_STEP_ENV = "LOCALTUNE_FAULT_OOM_AT_STEP"
"""Test-only: the optimizer step at whose start an out-of-memory error is injected, once."""


class StopRequest:
    """Set by SIGTERM; read between optimizer steps."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.reason = signal.Signals(signum).name


def sample_answer(model, tokenizer, prompt: str) -> str:
    """The model's greedy answer to `prompt` (SAMPLE_MAX_NEW_TOKENS at most), in the middle of training."""
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    ids = {k: v.to(model.device) for k, v in ids.items()}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=SAMPLE_MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, use_cache=True)
    if was_training:
        model.train()
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


class AgreeOnStop(TrainerCallback):
    """Several ranks (localtune.distributed): at each step's end, before the callbacks that act
    on a stop, the ranks agree whether one was asked for (any rank's SIGTERM), so all end at
    the same step and write the same checkpoint."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop

    def on_step_end(self, args, state, control, **kw):
        from localtune.distributed import agree_any

        if agree_any(self.stop.requested) and not self.stop.requested:
            self.stop.requested, self.stop.reason = True, "SIGTERM (another rank)"


class AnnounceRank(TrainerCallback):
    """Several ranks: each rank's pid in ranks/rank-R.json once training begins, after the ranks
    met (on several machines the supervisor of machine 0 clears that folder before its ranks
    start, which may be after another machine's ranks wrote theirs)."""

    def __init__(self, run: RunDir, rank) -> None:
        self.run, self.rank = run, rank

    def on_train_begin(self, args, state, control, **kw):
        from localtune.distributed import write_rank_file

        write_rank_file(self.run, self.rank, pid=os.getpid(), outcome=None)


class ThermalGuard(TrainerCallback):
    """Between optimizer steps, wait while the GPU is hotter than `limit_c`: a `thermal_pause`
    event, a reading every `poll_s`, and a `thermal_resume` event once it is
    THERMAL_HYSTERESIS_C below the limit (or a stop is requested). `read_temp` returns degrees
    C, or None where it cannot tell (then training goes on). With several ranks every rank has
    a guard whose reading is the hottest card's (distributed.make_agreeing_reader), so all pause
    together; only rank 0's writes events (`events_path` None on the others)."""

    def __init__(self, limit_c: float, read_temp, events_path: Path | None, stop: StopRequest, *,
                 sleep=time.sleep, poll_s: float = THERMAL_POLL_S) -> None:
        self.limit_c, self.read_temp, self.events_path, self.stop = limit_c, read_temp, events_path, stop
        self.sleep, self.poll_s = sleep, poll_s
        self.paused_total_s = 0.0

    def on_step_end(self, args, state, control, **kw):
        self.wait(state.global_step)

    def wait(self, step: int) -> float:
        """Pause while hot; return the seconds paused."""
        temp = self.read_temp()
        if temp is None or temp <= self.limit_c:
            return 0.0
        if self.events_path is not None:
            append_event(self.events_path, "thermal_pause", step=step, temperature_c=temp,
                         max_gpu_temp_c=self.limit_c)
        start = time.monotonic()
        while not self.stop.requested:
            self.sleep(self.poll_s)
            temp = self.read_temp()
            if temp is None or temp <= self.limit_c - THERMAL_HYSTERESIS_C:
                break
        paused = time.monotonic() - start
        self.paused_total_s += paused
        if self.events_path is not None:
            append_event(self.events_path, "thermal_resume", step=step, temperature_c=temp, paused_s=round(paused, 1))
        return paused


def thermal_guard_for(max_gpu_temp: float | None, backend: str, hardware, events_path: Path,
                      stop: StopRequest, rank=None, devices: list[int] | None = None) -> ThermalGuard | None:
    """The ThermalGuard for a run's `max_gpu_temp`, reading the training GPU (the plan's first
    device) through NVML; None without a limit or off CUDA (nothing to read there). A rank of
    several (`rank`: localtune.distributed.Rank) reads its own card (the plan's `devices`
    [local rank]) and pauses with the others while the hottest is over the limit."""
    if not max_gpu_temp or backend != "cuda":
        return None
    from localtune.hardware import sample_devices

    index = 0
    if devices:  # the plan's GPUs (--gpus): this rank's, or the one GPU a single process trains on
        local = rank.local_rank if rank is not None else 0
        ordinal = devices[local] if local < len(devices) else None
        index = next((i for i, d in enumerate(hardware.devices) if d.index == ordinal), 0)

    def read_temp() -> float | None:
        try:
            return sample_devices(hardware)[index].temperature_c
        except Exception:  # noqa: BLE001 - a failed reading must not stop training
            return None

    if rank is None:
        return ThermalGuard(float(max_gpu_temp), read_temp, events_path, stop)
    from localtune.distributed import make_agreeing_reader

    return ThermalGuard(float(max_gpu_temp), make_agreeing_reader(read_temp, stop),
                        events_path if rank.main else None, stop)


class SaveByClock(TrainerCallback):
    """Ask for a checkpoint when `minutes` have passed since the last one (0: never)."""

    def __init__(self, minutes: float, clock=time.monotonic, agree: Callable[[bool], bool] = lambda due: due) -> None:
        self.every_s, self.clock, self.agree = minutes * 60.0, clock, agree
        self.last = clock()
        """`agree`: with several ranks, any rank's clock being due makes every rank save
        (distributed.agree_any; every rank calls it at each step's end)."""

    def on_train_begin(self, args, state, control, **kw):
        self.last = self.clock()

    def on_step_end(self, args, state, control, **kw):
        if self.agree(self.every_s > 0 and self.clock() - self.last >= self.every_s):
            control.should_save = True

    def on_save(self, args, state, control, **kw):
        self.last = self.clock()


def rank_devices(run: RunDir, backend: str, hw, parallel: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's device now, for a run of several: each GPU of the plan (NVML: memory in use
    on the card, utilisation, temperature, power), or on the CPU each rank process's memory."""
    import psutil

    out: list[dict[str, Any]] = []
    if backend == "cuda":
        from localtune.hardware import sample_devices

        wanted = list(parallel.get("devices") or [])
        for rank, d in enumerate(d for d in sample_devices(hw) if d.index in wanted):
            out.append({"rank": rank, "name": d.name, "index": d.index,
                        "memory_used_bytes": d.total_bytes - d.free_bytes, "memory_total_bytes": d.total_bytes,
                        "utilization_pct": d.utilization_pct, "temperature_c": d.temperature_c, "power_w": d.power_w})
        return out
    from localtune.distributed import read_rank_files

    total = psutil.virtual_memory().total
    for rank, f in sorted(read_rank_files(run).items()):
        try:
            rss = psutil.Process(int(f["pid"])).memory_info().rss
        except (psutil.Error, KeyError, TypeError, ValueError):
            rss = None
        out.append({"rank": rank, "name": f"{backend} process {rank}", "index": None, "memory_used_bytes": rss,
                    "memory_total_bytes": total, "utilization_pct": None, "temperature_c": None, "power_w": None})
    return out


def hardware_event(run: RunDir, backend: str, hw, device: str, parallel: dict[str, Any] | None = None) -> None:
    """Memory, utilisation, temperature and power of the training device now. `hw` is the
    launch probe: sampling re-reads only the live fields (a full probe per logged step would be
    work on the hot path); its first device is the plan's, `device`. A run of several ranks
    (`parallel`, plan.json's) adds `devices`: every rank's (rank_devices)."""
    import psutil

    vm = psutil.virtual_memory()
    fields: dict[str, Any] = {"cpu_pct": psutil.cpu_percent(), "ram_used_bytes": vm.total - vm.available,
                              "utilization_pct": None, "temperature_c": None, "power_w": None}
    if backend == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        fields.update(memory_used_bytes=total - free, memory_total_bytes=total)
        try:
            from localtune.hardware import sample_devices

            several = parallel is not None and parallel.get("world_size", 1) > 1
            if several:  # one NVML reading of every rank's card; rank 0's is the training device
                fields["devices"] = rank_devices(run, backend, hw, parallel)
                own = fields["devices"][0] if fields["devices"] else {}
            else:  # the plan's GPU (--gpus may have picked another than the probe's first)
                chosen = (parallel or {}).get("devices") or []
                readings = sample_devices(hw)
                d = next((x for x in readings if chosen and x.index == chosen[0]), readings[0])
                own = {"utilization_pct": d.utilization_pct, "temperature_c": d.temperature_c, "power_w": d.power_w}
            fields.update({k: own.get(k) for k in ("utilization_pct", "temperature_c", "power_w")})
        except Exception:  # noqa: BLE001 - live readings are optional
            pass
    elif device == "mlx:gpu":  # Apple's GPU under MLX: its buffers (in use and cached) are not in the RSS
        import mlx.core as mx

        fields.update(memory_used_bytes=mx.get_active_memory() + mx.get_cache_memory(), memory_total_bytes=vm.total)
    else:
        fields.update(memory_used_bytes=psutil.Process().memory_info().rss, memory_total_bytes=vm.total)
    if parallel is not None and parallel.get("world_size", 1) > 1 and "devices" not in fields:
        try:
            fields["devices"] = rank_devices(run, backend, hw, parallel)
        except Exception:  # noqa: BLE001 - live readings are optional
            pass
    append_event(run.events_path, "hardware", **fields)


class InjectOom(TrainerCallback):
    """Test-only (LOCALTUNE_FAULT_OOM_AT_STEP): out of memory at the start of step N, once per
    process: the same instance serves every attempt, so it does not fire again after the back-off."""

    def __init__(self, at_step: int) -> None:
        self.at_step, self.fired = at_step, False

    def on_step_begin(self, args, state, control, **kw):
        if not self.fired and state.global_step + 1 == self.at_step:
            import torch

            self.fired = True
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_OOM_AT_STEP_ENV})")


@dataclass
class Attempt:
    """One pass of the worker's out-of-memory loop: what it resumed from and when it began."""

    resumed_from: str | None
    """The checkpoint's name, or None from the start."""
    elapsed_before: float = 0.0
    """Training seconds of the attempts before (a resumed run's `elapsed_s` goes on from them)."""
    started_at: float = field(default_factory=time.time)

    def begin(self) -> None:
        """Training starts now (the trainer is built; its data prepared)."""
        self.started_at = time.time()

    def elapsed(self, now: float | None = None) -> float:
        return self.elapsed_before + (time.time() if now is None else now) - self.started_at


@dataclass
class RunInfo:
    """What RunEvents says about the run in its `started` event and needs for the others."""

    run: RunDir
    device: str
    backend: str
    hardware: Any
    """The launch probe (localtune.hardware.Hardware); live readings re-sample it."""
    precision: str
    """localtune.precision's description of the compute dtype."""
    padding_free: bool
    method: str
    from_run: str | None = None
    step_metrics: dict[str, str] = field(default_factory=dict)
    """trl's log keys -> the step event's fields, for the method's own metrics."""
    eval_metrics: dict[str, str] = field(default_factory=dict)
    """trl's eval log keys -> the eval event's fields (besides eval_loss)."""
    writes: bool = True
    """Whether this process writes events and the status: False on ranks other than 0."""
    parallel: dict[str, Any] | None = None
    """plan.json's `parallel` (localtune.parallel): the GPUs the plan picked, and for a rank of
    several (localtune.distributed) how many there are; None for a plan from before it existed."""


class RunEvents(TrainerCallback):
    """events.jsonl and status.json for one attempt: `started` (with the method and what it
    resumed from), `step` (loss, learning rate, gradient norm, tokens/s without the time paused
    for heat, the method's metrics), `eval`, `sample` every `sample_steps`, `hardware` with each
    step; and the stop: when `stop` is set, the current step ends with a checkpoint and training
    ends (`stopping`)."""

    def __init__(self, info: RunInfo, attempt: Attempt, stop: StopRequest, *, tokenizer: Any,
                 sample_prompt: str, sample_steps: int, paused_s: Callable[[], float] = lambda: 0.0,
                 sample: Callable[[Any, Any, str], str] = sample_answer) -> None:
        self.info, self.attempt, self.stop = info, attempt, stop
        self.tokenizer, self.sample_prompt, self.sample_steps = tokenizer, sample_prompt, sample_steps
        self.paused_s, self.sample = paused_s, sample
        self.t_last = time.time()
        self.tokens_last = 0
        self.paused_last = paused_s()

    @property
    def run(self) -> RunDir:
        return self.info.run

    def on_train_begin(self, args, state, control, **kw):
        self.t_last = time.time()
        self.tokens_last = state.num_input_tokens_seen
        self.paused_last = self.paused_s()
        info = self.info
        if not info.writes:
            return
        par = info.parallel or {}
        ranks = ({"world_size": par.get("world_size"), "parallel_mode": par.get("mode"),
                  "devices": list(par.get("devices") or [])} if par.get("world_size", 1) > 1 else {})
        self.run.write_status(state="running", pid=os.getpid(), max_steps=state.max_steps, step=state.global_step,
                              error=None)
        append_event(self.run.events_path, "started", pid=os.getpid(), resumed_from=self.attempt.resumed_from,
                     max_steps=state.max_steps, device=info.device, precision=info.precision,
                     padding_free=info.padding_free, method=info.method, from_run=info.from_run, **ranks)

    def on_step_end(self, args, state, control, **kw):
        if self.stop.requested:
            if self.info.writes:
                append_event(self.run.events_path, "stopping", reason=self.stop.reason)
                self.run.write_status(state="stopping")
            control.should_save = True
            control.should_training_stop = True
        elif not self.info.writes:
            return
        elif self.sample_steps and state.global_step % self.sample_steps == 0:
            append_event(self.run.events_path, "sample", step=state.global_step, prompt=self.sample_prompt,
                         text=self.sample(kw["model"], self.tokenizer, self.sample_prompt))

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if not self.info.writes:
            return
        if "loss" in logs:
            now = time.time()
            tokens = state.num_input_tokens_seen
            paused = self.paused_s()  # a thermal pause is not training time
            rate = (tokens - self.tokens_last) / max(now - self.t_last - (paused - self.paused_last), 1e-9)
            self.t_last, self.tokens_last, self.paused_last = now, tokens, paused
            extra = {field_: float(logs[key]) for key, field_ in self.info.step_metrics.items() if key in logs}
            append_event(self.run.events_path, "step", step=state.global_step, max_steps=state.max_steps,
                         epoch=state.epoch, loss=logs["loss"], learning_rate=logs.get("learning_rate"),
                         grad_norm=logs.get("grad_norm"), tokens_per_s=round(rate, 1),
                         elapsed_s=round(self.attempt.elapsed(now), 1), **extra)
            self.run.write_status(step=state.global_step, loss=logs["loss"])
            hardware_event(self.run, self.info.backend, self.info.hardware, self.info.device, self.info.parallel)
        if "eval_loss" in logs:
            extra = {field_: float(logs[key]) for key, field_ in self.info.eval_metrics.items() if key in logs}
            append_event(self.run.events_path, "eval", step=state.global_step, eval_loss=logs["eval_loss"], **extra)
