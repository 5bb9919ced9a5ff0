"""The shipped profiles load, tile memory per backend, match real machines, and bad files fail
with one line naming the file and the key."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from localtune.errors import UserError
from localtune.hardware import GiB, Device, Hardware
from localtune.knobs import HARDWARE_KNOBS
from localtune.profiles import (
    BACKENDS, Profile, get_profile, load_profile, load_profiles, match_profile, profiles_dir,
)

SHIPPED = sorted(profiles_dir().glob("*.toml"))


def test_shipped_set():
    assert {p.stem for p in SHIPPED} == {
        "cuda-8gb", "cuda-12gb", "cuda-16gb", "cuda-24gb", "cuda-48gb", "cuda-80gb",
        "mps-16gb", "mps-32gb", "mps-64gb", "mps-128gb", "cpu",
    }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_profile_loads(path: Path):
    p = load_profile(path)
    assert p.name == path.stem
    assert p.description and p.path == path
    # Every machine-dependent knob is written out in the file itself, not inherited.
    text = path.read_text()
    for key in HARDWARE_KNOBS:
        assert re.search(rf"^{key}\s*=", text, re.M), f"{path.name} does not set {key}"
    assert text.lstrip().startswith("#"), "each profile starts with a comment saying why"
    k = p.knobs
    if p.backend != "cuda":
        # bitsandbytes 4-bit / 8-bit optimizers are CUDA-only.
        assert not k.load_in_4bit and k.optim == "adamw_torch"
    assert k.learning_rate == 2e-4 and k.lr_scheduler_type == "cosine" and k.warmup_steps == 0.03


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranges_tile_zero_to_infinity(backend: str):
    ranges = [(p.min_memory_gb, p.max_memory_gb if p.max_memory_gb is not None else math.inf)
              for p in load_profiles() if p.backend == backend]
    assert ranges, f"no {backend} profile"
    assert ranges[0][0] == 0
    for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
        assert hi == lo, f"{backend}: gap or overlap at {hi} / {lo}"
    assert ranges[-1][1] == math.inf


def test_knobs_grow_with_memory():
    for backend in ("cuda", "mps"):
        ps = [p for p in load_profiles() if p.backend == backend]
        for a, b in zip(ps, ps[1:]):
            assert b.knobs.r >= a.knobs.r
            tokens = lambda p: p.knobs.per_device_train_batch_size * p.knobs.max_length  # noqa: E731
            assert tokens(b) >= tokens(a), f"{b.name} fits fewer tokens per pass than {a.name}"


def _hw(backend: str, total_gib: float, name: str = "dev") -> Hardware:
    total = int(total_gib * GiB)
    return Hardware(backend=backend, devices=[Device(name=name, total_bytes=total, free_bytes=total)],
                    ram_total_bytes=64 * GiB, ram_available_bytes=32 * GiB, cpu_cores=8)


@pytest.mark.parametrize("backend, gib, expected", [
    ("cuda", 23.99, "cuda-24gb"),   # RTX 4090: 24564 MiB
    ("cuda", 7.63, "cuda-8gb"),     # RTX 3070
    ("cuda", 11.72, "cuda-12gb"),   # RTX 3060 12GB
    ("cuda", 14.58, "cuda-16gb"),   # Tesla T4
    ("cuda", 47.5, "cuda-48gb"),    # RTX A6000
    ("cuda", 79.15, "cuda-80gb"),   # A100 80GB
    ("cuda", 139.8, "cuda-80gb"),   # H200
    ("cuda", 10.0, "cuda-12gb"),    # lower bound is inclusive
    ("mps", 16.0, "mps-16gb"),
    ("mps", 32.0, "mps-32gb"),
    ("mps", 64.0, "mps-64gb"),
    ("mps", 192.0, "mps-128gb"),
    ("cpu", 31.2, "cpu"),
])
def test_match(backend: str, gib: float, expected: str):
    assert match_profile(_hw(backend, gib)).name == expected


def test_match_uses_primary_device():
    hw = _hw("cuda", 23.99)
    hw.devices.append(Device(name="second", total_bytes=80 * GiB, free_bytes=80 * GiB))
    assert match_profile(hw).name == "cuda-24gb"


def test_match_none():
    only_cpu = [get_profile("cpu")]
    with pytest.raises(UserError, match="no profile matches backend 'cuda' with 24.0 GiB"):
        match_profile(_hw("cuda", 24), only_cpu)


def test_get_profile_by_name_and_path(tmp_path: Path):
    assert get_profile("cuda-24gb").name == "cuda-24gb"
    copy = tmp_path / "mine.toml"
    copy.write_text((profiles_dir() / "cpu.toml").read_text().replace('name = "cpu"', 'name = "mine"'))
    p = get_profile(str(copy))
    assert isinstance(p, Profile) and p.name == "mine" and p.path == copy
    assert get_profile(copy).name == "mine"


def test_get_profile_unknown_name_lists_shipped():
    with pytest.raises(UserError) as e:
        get_profile("cuda-9000gb")
    msg = str(e.value)
    assert "unknown profile 'cuda-9000gb'" in msg
    assert "cuda-24gb" in msg and "mps-32gb" in msg and "cpu" in msg


# --- bad files -------------------------------------------------------------------------

GOOD = (profiles_dir() / "cuda-24gb.toml").read_text()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_profile(path)
    msg = str(e.value)
    assert str(path) in msg, f"message does not name the file: {msg}"
    assert "\n" not in msg
    return msg


def _sub(old: str, new: str) -> str:
    assert re.search(old, GOOD, re.M), old
    return re.sub(old, new, GOOD, count=1, flags=re.M)


def test_unknown_knob(tmp_path: Path):
    msg = _error(tmp_path, GOOD + "lora_rank = 8\n")
    assert "[knobs]: unknown key 'lora_rank'" in msg


def test_wrong_type(tmp_path: Path):
    msg = _error(tmp_path, _sub(r"^r = \d+", 'r = "sixteen"'))
    assert "[knobs]: 'r' must be an integer, got 'sixteen'" in msg


def test_bool_given_as_string(tmp_path: Path):
    msg = _error(tmp_path, _sub(r"^load_in_4bit = \w+", 'load_in_4bit = "yes"'))
    assert "'load_in_4bit' must be true or false" in msg


@pytest.mark.parametrize("line, key, expected", [
    ("r = 0", "r", "must be at least 1, got 0"),
    ("per_device_train_batch_size = -1", "per_device_train_batch_size", "must be at least 1, got -1"),
    ('optim = "sgd"', "optim", "must be one of adamw_torch"),
])
def test_out_of_range(tmp_path: Path, line: str, key: str, expected: str):
    msg = _error(tmp_path, _sub(rf"^{key} = .*$", line))
    assert f"[knobs]: '{key}' {expected}" in msg


def test_missing_required_knob(tmp_path: Path):
    msg = _error(tmp_path, _sub(r"^max_length = .*\n", ""))
    assert "[knobs]: missing required knob 'max_length'" in msg


def test_unknown_top_level_key(tmp_path: Path):
    msg = _error(tmp_path, 'author = "me"\n' + GOOD)
    assert "unknown top-level key 'author'" in msg


def test_missing_top_level_key(tmp_path: Path):
    msg = _error(tmp_path, _sub(r"^description = .*\n", ""))
    assert "missing top-level key 'description'" in msg


def test_bad_backend(tmp_path: Path):
    msg = _error(tmp_path, _sub(r'^backend = "cuda"', 'backend = "rocm"'))
    assert "[match]: 'backend' must be one of cuda, mps, cpu; got 'rocm'" in msg


def test_unknown_match_key(tmp_path: Path):
    msg = _error(tmp_path, _sub(r"^backend = ", "min_vram = 3\nbackend = "))
    assert "[match]: unknown key 'min_vram'" in msg


@pytest.mark.parametrize("old, new, expected", [
    (r"^min_memory_gb = \d+", "min_memory_gb = -1", "'min_memory_gb' must be a number >= 0"),
    (r"^max_memory_gb = \d+", "max_memory_gb = 20", "'max_memory_gb' must be a number greater than"),
    (r"^max_memory_gb = \d+", 'max_memory_gb = "36"', "'max_memory_gb' must be a number greater than"),
])
def test_bad_memory_range(tmp_path: Path, old: str, new: str, expected: str):
    assert expected in _error(tmp_path, _sub(old, new))


def test_invalid_toml_names_line(tmp_path: Path):
    lines = GOOD.splitlines()
    n = next(i for i, line in enumerate(lines) if line.startswith("r = ")) + 1
    lines[n - 1] = "r = = 16"
    msg = _error(tmp_path, "\n".join(lines) + "\n")
    assert "invalid TOML" in msg and f"line {n}" in msg


def test_missing_file(tmp_path: Path):
    with pytest.raises(UserError, match="profile file not found"):
        load_profile(tmp_path / "nope.toml")


def test_folder_with_overlap_or_duplicate(tmp_path: Path):
    (tmp_path / "a.toml").write_text(GOOD)
    (tmp_path / "b.toml").write_text(_sub(r"^name = .*$", 'name = "other"'))
    with pytest.raises(UserError, match="overlaps"):
        load_profiles(tmp_path)
    (tmp_path / "b.toml").write_text(_sub(r"^backend = .*$", 'backend = "cpu"'))
    with pytest.raises(UserError, match="'cuda-24gb' is also used by"):
        load_profiles(tmp_path)


def test_an_apple_profile_may_not_ask_for_bitsandbytes(tmp_path: Path):
    """bitsandbytes (4-bit weights, 8-bit and paged optimizers) does not run on Apple's MPS."""
    path = _write(tmp_path, _sub(r"^backend = .*$", 'backend = "mps"'))
    with pytest.raises(UserError) as e:
        load_profile(path)
    assert str(e.value) == (f"{path}: [knobs]: load_in_4bit=true and optim=adamw_8bit need bitsandbytes, which "
                            "does not run on mps (Apple's GPU); train in 16 bits with optim=adamw_torch (a smaller "
                            "model fits where a larger one does not)")
