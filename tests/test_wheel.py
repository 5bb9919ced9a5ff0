"""The wheel carries the profiles, and an installed (non-editable) localtune finds and loads them.

A source checkout reads the top-level `profiles/`; only a real install proves that hatchling's
force-include put them at `localtune/profiles/` and that `profiles_dir()` looks there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.name for p in (ROOT / "profiles").glob("*.toml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Build from a copy of what the wheel is made of, so the build neither sees half-saved
    # edits elsewhere in the checkout nor leaves anything behind in it.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE", "localtune", "profiles"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    if not (src / "README.md").exists():
        # pyproject names README.md as the long description; its absence is not what this
        # test is about, so a stub stands in for it.
        (src / "README.md").write_text("# localtune\n")
    out = tmp_path_factory.mktemp("dist")
    # Build isolation fetches hatchling from PyPI into a throwaway environment.
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"wheel build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    (whl,) = out.glob("localtune-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_contains_profiles(wheel: Path):
    assert SHIPPED
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in SHIPPED if f"localtune/profiles/{f}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "localtune/profiles.py" in names


@pytest.mark.slow
def test_installed_wheel_loads_profiles(wheel: Path, tmp_path: Path):
    site = tmp_path / "site"
    # --no-deps: the dependencies are already in the system site-packages.
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
                        "--target", str(site), str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    snippet = f"""
import localtune.profiles as lp
from pathlib import Path
site = Path({str(site)!r}).resolve()
d = lp.profiles_dir()
assert d.is_relative_to(site), (d, site)
assert Path(lp.__file__).resolve().is_relative_to(site), lp.__file__
names = sorted(p.path.name for p in lp.load_profiles())
assert names == {SHIPPED!r}, names
assert lp.get_profile("cuda-24gb").path.parent == d
print("ok", len(names))
"""
    # Run outside the repository so the checkout's `localtune` cannot shadow the installed one.
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"ok {len(SHIPPED)}"
