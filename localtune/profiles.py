"""Hardware profiles: which knobs suit which class of machine.

A profile is one TOML file. This docstring is the one place its schema is defined::

    # a comment saying why these choices
    name = "cuda-24gb"                 # a string; the shipped files are named <name>.toml
    description = "One 24 GB NVIDIA card (RTX 3090 / 4090): ..."

    [match]
    backend = "cuda"                   # "cuda", "mps" or "cpu" (as `Hardware.backend`)
    min_memory_gb = 20                 # inclusive; a number >= 0
    max_memory_gb = 36                 # exclusive; a number > min; omit for no upper bound

    [knobs]                            # knob names and checks: localtune.knobs.Knobs
    r = 32
    ...                                # every key in knobs.HARDWARE_KNOBS, others optional

Top-level keys are exactly `name`, `description`, `match`, `knobs`; `[match]` holds only the
three keys above; `[knobs]` only knob names, each checked by `knobs.check_knob`. Knobs a
profile leaves out (those not in `HARDWARE_KNOBS`, such as `seed`) keep the `Knobs` defaults.
Anything else is a `UserError` naming the file, the key and what was expected: a profile is
checked whole when it is loaded, never half-used.

Matching: memory is the primary device's *total* memory in GiB (1024**3 bytes), because free
memory changes from minute to minute and a profile describes the machine, not its moment (the
planner budgets free memory later). A profile matches when the backend is equal and
`min_memory_gb <= GiB < max_memory_gb`. Cards report a little under their label (a 24 GB
RTX 4090 has 23.99 GiB, an 80 GB A100 79.15 GiB), so the shipped ranges place their
boundaries between the labels, and per backend they tile [0, inf) with no gap or overlap.

The shipped profiles live in the repository's top-level `profiles/` folder; the wheel carries
them as `localtune/profiles/` (see pyproject.toml), which `profiles_dir()` prefers.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from localtune.errors import UserError
from localtune.hardware import GiB, Hardware
from localtune.knobs import HARDWARE_KNOBS, Knobs, knobs_from_mapping

BACKENDS = ("cuda", "mps", "cpu")
BITSANDBYTES_BACKENDS = ("cuda", "cpu")
"""Where bitsandbytes runs: 4-bit weights, 8-bit and paged optimizers. CUDA, and the CPU (its
multi-backend build, 0.46 and later: NF4 training and 8-bit AdamW were run on this project's
CPU). Not Apple's MPS: bitsandbytes has no Metal kernels there, and nothing localtune runs
shows that it works."""


def needs_bitsandbytes(knobs: Knobs) -> list[str]:
    """The knobs (as `key=value`) that only bitsandbytes can run (on the MLX engine, 4-bit
    weights are MLX's own)."""
    out = []
    if knobs.load_in_4bit and knobs.engine != "mlx":
        out.append("load_in_4bit=true")
    if "8bit" in knobs.optim or knobs.optim.startswith("paged_"):
        out.append(f"optim={knobs.optim}")
    return out


def check_backend_runs(knobs: Knobs, backend: str, where: str = "") -> None:
    """UserError (naming `where`, a file and table, when given) when `knobs` ask for what
    `backend` cannot run: bitsandbytes 4-bit weights or 8-bit / paged optimizers on Apple's MPS."""
    if knobs.activation_offloading and (backend != "cuda" or knobs.engine != "torch" or knobs.method == "orpo"):
        why = (f"ORPO's trainer (trl.experimental) has no activation offloading" if knobs.method == "orpo"
               else f"it moves activations from an NVIDIA GPU to the CPU's RAM, and this run trains on "
                    f"{'MLX' if knobs.engine == 'mlx' else backend}")
        raise UserError(f"{where + ': ' if where else ''}activation_offloading=true: {why}; "
                        "set --set activation_offloading=false")
    if backend in BITSANDBYTES_BACKENDS:
        return
    bad = needs_bitsandbytes(knobs)
    if bad:
        raise UserError(f"{where + ': ' if where else ''}{' and '.join(bad)} need{'s' * (len(bad) == 1)} "
                        f"bitsandbytes, which does not run on {backend} "
                        "(Apple's GPU); train in 16 bits with optim=adamw_torch (a smaller model fits where "
                        "a larger one does not)")
_TOP_KEYS = ("name", "description", "match", "knobs")
_MATCH_KEYS = ("backend", "min_memory_gb", "max_memory_gb")


@dataclass(frozen=True)
class Profile:
    """One class of machine and the knobs that suit it (one TOML file)."""

    name: str
    """Short id, e.g. 'cuda-24gb'; what `get_profile` and `--profile` take."""
    description: str
    """One line for people: which machines, which model sizes."""
    backend: str
    """'cuda', 'mps' or 'cpu'."""
    min_memory_gb: float
    """Lowest device total memory (GiB) this profile matches, inclusive."""
    max_memory_gb: float | None
    """Memory (GiB) from which this profile no longer matches; None for no upper bound."""
    knobs: Knobs
    """The profile's knobs laid over the `Knobs` defaults."""
    path: Path
    """The file it was loaded from."""

    def matches(self, backend: str, memory_gb: float) -> bool:
        """True when a `backend` device with `memory_gb` GiB of total memory is in range."""
        return (backend == self.backend and memory_gb >= self.min_memory_gb
                and (self.max_memory_gb is None or memory_gb < self.max_memory_gb))

    @property
    def range_text(self) -> str:
        """'20–36 GiB' or '64+ GiB', for tables and messages."""
        hi = "+" if self.max_memory_gb is None else f"–{self.max_memory_gb:g}"
        return f"{self.min_memory_gb:g}{hi} GiB"


def profiles_dir() -> Path:
    """The folder of shipped profiles.

    An installed wheel has them at `localtune/profiles/` beside this module; a source or
    editable checkout has them only at the repository's top-level `profiles/`.
    """
    here = Path(__file__).resolve().parent
    packaged = here / "profiles"
    return packaged if packaged.is_dir() else here.parent / "profiles"


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_profile(path: str | Path) -> Profile:
    """Read and check one profile file; raise `UserError` on the first thing wrong."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: profile file not found") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read profile: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        # tomllib's message ends "(at line N, column M)", which is what a person needs.
        raise UserError(f"{path}: invalid TOML: {e}") from None

    for key in data:
        if key not in _TOP_KEYS:
            raise UserError(f"{path}: unknown top-level key '{key}'; expected only {', '.join(_TOP_KEYS)}")
    for key in _TOP_KEYS:
        if key not in data:
            raise UserError(f"{path}: missing top-level key '{key}'")
    name, description, match, knobs = (data[k] for k in _TOP_KEYS)
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{path}: 'name' must be a non-empty string, got {name!r}")
    if not isinstance(description, str):
        raise UserError(f"{path}: 'description' must be a string, got {description!r}")
    for key, value in (("match", match), ("knobs", knobs)):
        if not isinstance(value, dict):
            raise UserError(f"{path}: '{key}' must be a table ([{key}]), got {value!r}")

    where = f"{path}: [match]"
    for key in match:
        if key not in _MATCH_KEYS:
            raise UserError(f"{where}: unknown key '{key}'; expected {', '.join(_MATCH_KEYS)}")
    backend = match.get("backend")
    if backend not in BACKENDS:
        raise UserError(f"{where}: 'backend' must be one of {', '.join(BACKENDS)}; got {backend!r}")
    lo = match.get("min_memory_gb")
    if not _number(lo) or lo < 0:
        raise UserError(f"{where}: 'min_memory_gb' must be a number >= 0, got {lo!r}")
    hi = match.get("max_memory_gb")
    if hi is not None and (not _number(hi) or hi <= lo):
        raise UserError(f"{where}: 'max_memory_gb' must be a number greater than min_memory_gb ({lo:g}), "
                        f"or left out for no upper bound; got {hi!r}")

    where = f"{path}: [knobs]"
    checked = knobs_from_mapping(knobs, where)  # wrong keys and values first: the likelier typo
    # Every machine-dependent knob must be stated, so a profile never silently inherits a
    # default that was chosen for some other machine.
    missing = [k for k in HARDWARE_KNOBS if k not in knobs]
    if missing:
        raise UserError(f"{where}: missing required knob{'s' * (len(missing) > 1)} "
                        f"{', '.join(repr(k) for k in missing)}")
    check_backend_runs(checked, backend, where)
    return Profile(
        name=name, description=description, backend=backend,
        min_memory_gb=float(lo), max_memory_gb=None if hi is None else float(hi),
        knobs=checked, path=path,
    )


def load_profiles(directory: str | Path | None = None) -> list[Profile]:
    """Load every `*.toml` in `directory` (the shipped profiles when None), sorted by backend
    and then by lowest memory. Duplicate names and overlapping ranges are errors, since either
    would make `get_profile` or `match_profile` ambiguous."""
    directory = Path(directory) if directory is not None else profiles_dir()
    if not directory.is_dir():
        raise UserError(f"{directory}: profile folder not found")
    profiles = sorted((load_profile(p) for p in directory.glob("*.toml")),
                      key=lambda p: (p.backend, p.min_memory_gb))
    seen: dict[str, Profile] = {}
    for p in profiles:
        if p.name in seen:
            raise UserError(f"{p.path}: profile name '{p.name}' is also used by {seen[p.name].path}")
        seen[p.name] = p
    for a, b in zip(profiles, profiles[1:]):
        if a.backend == b.backend and (a.max_memory_gb is None or a.max_memory_gb > b.min_memory_gb):
            raise UserError(f"{b.path}: memory range {b.range_text} overlaps {a.path} ({a.range_text})")
    return profiles


def match_profile(hardware: Hardware, profiles: list[Profile] | None = None) -> Profile:
    """The profile for this machine: same backend, primary device's total GiB in range."""
    profiles = load_profiles() if profiles is None else profiles
    gb = hardware.primary.total_bytes / GiB
    for p in profiles:
        if p.matches(hardware.backend, gb):
            return p
    names = ", ".join(p.name for p in profiles) or "none"
    raise UserError(f"no profile matches backend '{hardware.backend}' with {gb:.1f} GiB "
                    f"(profiles: {names}); pass --profile NAME or a .toml file")


def get_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name ('cuda-24gb'), or any profile file by path."""
    text = str(name_or_path)
    # Anything that looks like a path is one; a bare word is a shipped name.
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text:
        return load_profile(name_or_path)
    shipped = load_profiles()
    for p in shipped:
        if p.name == text:
            return p
    raise UserError(f"unknown profile '{text}'; shipped profiles: {', '.join(p.name for p in shipped)} "
                    f"(or give a path to a .toml file)")
