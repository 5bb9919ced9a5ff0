"""The Machine screen (key 1): what the probe found and the profile it matched, with live
readings of memory, temperature, utilisation and power. On NVIDIA it also says which GPUs a
run trains on when `--gpus` is left out (every GPU matching GPU 0), and names any left out.

The probe itself ran once when the app started (`app.hardware`); this screen only re-reads
what changes, every `REFRESH_S` seconds, in a thread (NVML calls can block), and the thread
posts a `MachineRead` message: it never touches a widget. Reading pauses while the screen is
not shown.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Footer, Header, Label, Static

from localtune.engines import engine_line
from localtune.errors import UserError
from localtune.hardware import Device, Hardware, gpu_live_facts, sample_devices
from localtune.parallel import machine_line
from localtune.profiles import Profile, match_profile
from localtune.tui.widgets import MemoryBar

REFRESH_S = 2.0


@dataclass
class Reading:
    """One live reading of the machine."""

    devices: list[Device]
    ram_total_bytes: int
    ram_available_bytes: int
    cpu_pct: float | None


def read_machine(hw: Hardware) -> Reading:
    """Fresh device readings (`sample_devices`), system RAM and CPU use. May block briefly on
    NVML, so the screen calls it from a thread."""
    devices = sample_devices(hw)
    vm = psutil.virtual_memory()
    # on a CPU machine sample_devices already read the CPU use; a second call would measure
    # the microseconds since the first
    cpu = devices[0].utilization_pct if hw.backend == "cpu" else psutil.cpu_percent(interval=None)
    return Reading(devices, vm.total, vm.available, cpu)


class MachineRead(Message):
    """A reading from the sampling thread (or why it failed)."""

    def __init__(self, reading: Reading | None, error: str | None = None) -> None:
        super().__init__()
        self.reading, self.error = reading, error


def backend_line(hw: Hardware) -> str:
    """'cuda (NVIDIA, driver 560.35.03, CUDA 12.6)' and the like."""
    if hw.backend == "cuda":
        extra = [f"driver {hw.driver_version}"] if hw.driver_version else []
        extra += [f"CUDA {hw.cuda_driver_version}"] if hw.cuda_driver_version else []
        return "cuda (NVIDIA" + "".join(f", {x}" for x in extra) + ")"
    if hw.backend == "mps":
        return "mps (Apple GPU through Metal)"
    return "cpu (no supported GPU: training runs on the CPU)"


def device_title(hw: Hardware, d: Device) -> str:
    if hw.backend == "cuda":
        cc = f" (compute {d.compute_capability})" if d.compute_capability else ""
        return f"GPU {d.index}: {d.name}{cc}"
    if hw.backend == "mps":
        return f"{hw.chip or d.name}: GPU with unified memory"
    return f"CPU: {hw.cpu_name or d.name}, {hw.cpu_cores} cores"


def live_facts(hw: Hardware, d: Device, cpu_pct: float | None) -> str:
    """The device's live readings in one line; '-' for what this machine cannot read."""
    if hw.backend == "cpu":
        return f"{pct(cpu_pct)} busy"
    if hw.backend == "mps":
        rec = d.recommended_max_bytes
        return f"recommended working set {rec / 2**30:.1f} GB" if rec else "recommended working set unknown"
    return " · ".join(gpu_live_facts(d)) or "no live readings (NVML gives none for this device)"


def row(label: str, widget: Widget) -> Horizontal:
    """A labelled line: the label in a narrow column, the value beside it (wrapping there)."""
    widget.add_class("row-value")
    return Horizontal(Label(label, classes="row-label"), widget, classes="row")


def pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}%"


def profile_knobs_line(p: Profile) -> str:
    k = p.knobs
    return (f"rank {k.r} · micro-batch {k.per_device_train_batch_size} × accumulation "
            f"{k.gradient_accumulation_steps} · max length {k.max_length} · "
            f"4-bit {'on' if k.load_in_4bit else 'off'} · "
            f"gradient checkpointing {'on' if k.gradient_checkpointing else 'off'}")


class MachineScreen(Screen):
    """What this machine can do: devices, memory, libraries, and the matching profile."""

    SUB_TITLE = "Machine"

    def __init__(self) -> None:
        super().__init__()
        self._timer: Timer | None = None
        """Started when the screen is first shown; paused while it is not."""

    def compose(self) -> ComposeResult:
        hw: Hardware = self.app.hardware
        yield Header()
        with VerticalScroll(id="machine"):
            yield Static(Text.assemble(("Backend ", "bold"), backend_line(hw)), id="machine-backend")
            for i, d in enumerate(hw.devices):
                with Vertical(classes="section device", id=f"device-{i}") as box:
                    box.border_title = device_title(hw, d)
                    yield row("RAM" if hw.backend == "cpu" else "memory",
                              MemoryBar(d.total_bytes - d.free_bytes, d.total_bytes, id=f"device-{i}-memory"))
                    yield row("CPU use" if hw.backend == "cpu" else "live",
                              Static(live_facts(hw, d, None), id=f"device-{i}-live"))
            with Vertical(classes="section", id="machine-system") as box:
                box.border_title = "System"
                if hw.backend != "cpu":  # on a CPU machine the device above is the RAM and CPU
                    yield row("RAM", MemoryBar(hw.ram_total_bytes - hw.ram_available_bytes, hw.ram_total_bytes,
                                               id="ram"))
                    yield row("CPU", Static(self._cpu_line(None), id="cpu"))
                yield row("libraries", Static(" · ".join(f"{k} {v}" for k, v in hw.versions.items()) or "-",
                                              id="machine-libraries"))
                for note in hw.notes:
                    yield row("note", Static(note, classes="machine-note"))
            with Vertical(classes="section", id="machine-profile") as box:
                box.border_title = "Profile"
                try:
                    p = match_profile(hw)
                except UserError as e:
                    yield Static(str(e), classes="error", id="profile-name")
                else:
                    yield row("matched", Static(Text.assemble((p.name, "bold"), f": {p.description}"),
                                                id="profile-name"))
                    yield row("knobs", Static(profile_knobs_line(p), id="profile-knobs"))
                    yield row("engine", Static(engine_line(p.knobs.engine, hw.versions), id="profile-engine"))
                if hw.backend == "cuda":  # which GPUs a run uses when --gpus is left out, and why
                    yield row("GPUs", Static(machine_line(hw), id="profile-gpus"))
            yield Static("", id="machine-live-error", classes="error")
            yield Static("Press 2 to plan a new run, 3 for runs.", id="machine-next")
        yield Footer(compact=True)

    def _cpu_line(self, cpu_pct: float | None) -> str:
        hw: Hardware = self.app.hardware
        return f"{hw.cpu_name or 'CPU'}, {hw.cpu_cores} cores · {pct(cpu_pct)} busy"

    # ------------------------------------------------------------ live readings

    def on_screen_resume(self) -> None:
        self._sample()
        if self._timer is None:
            self._timer = self.set_interval(REFRESH_S, self._sample)
        else:
            self._timer.resume()

    def on_screen_suspend(self) -> None:
        if self._timer is not None:
            self._timer.pause()

    @work(thread=True, exclusive=True, group="machine-sample", exit_on_error=False)
    def _sample(self) -> None:
        try:
            self.post_message(MachineRead(read_machine(self.app.hardware)))
        except Exception as e:  # a reading that fails must not take the screen down
            self.post_message(MachineRead(None, f"live readings failed: {type(e).__name__}: {e}"))

    def on_machine_read(self, message: MachineRead) -> None:
        hw: Hardware = self.app.hardware
        error = self.query_one("#machine-live-error", Static)
        error.update(message.error or "")
        error.display = bool(message.error)
        r = message.reading
        if r is None:
            return
        for i, d in enumerate(r.devices):
            self.query_one(f"#device-{i}-memory", MemoryBar).set(d.total_bytes - d.free_bytes, d.total_bytes)
            self.query_one(f"#device-{i}-live", Static).update(live_facts(hw, d, r.cpu_pct))
        if hw.backend != "cpu":
            self.query_one("#ram", MemoryBar).set(r.ram_total_bytes - r.ram_available_bytes, r.ram_total_bytes)
            self.query_one("#cpu", Static).update(self._cpu_line(r.cpu_pct))
