"""The wheel carries the profiles, and an installed (non-editable) localtune finds and loads them.

A source checkout reads the top-level `profiles/`; only a real install proves that hatchling's
force-include put them at `localtune/profiles/` and that `profiles_dir()` looks there.
"""

from __future__ import annotations

import json
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
def test_installed_wheel_runs_as_the_localtune_command(wheel: Path, tmp_path: Path):
    """Installed from the wheel, the `localtune` console script (not `python -m`) runs and lists
    the shipped profiles from inside the installed package."""
    prefix = tmp_path / "prefix"
    # --no-deps: the dependencies are already in this environment, whose python the script runs with;
    # --ignore-installed: pip would otherwise uninstall this environment's (editable) localtune first,
    # and every later worker started outside the checkout would find no `localtune.worker`
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
                        "--ignore-installed", "--prefix", str(prefix), str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    script = prefix / "bin" / "localtune"
    assert script.is_file() and os.access(script, os.X_OK), sorted(p.name for p in (prefix / "bin").iterdir())
    (site,) = prefix.glob("lib/python*/site-packages")
    # the installed package first, and run outside the repository, so the checkout cannot shadow it
    env = {**os.environ, "PYTHONPATH": str(site), "LOCALTUNE_HOME": str(tmp_path / "home")}
    r = subprocess.run([str(script), "profiles", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    profiles = json.loads(r.stdout)
    assert sorted(Path(p["path"]).name for p in profiles) == SHIPPED
    assert all(Path(p["path"]).resolve().is_relative_to(site.resolve() / "localtune" / "profiles") for p in profiles)
    r = subprocess.run([str(script), "--version"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("localtune "), r.stdout + r.stderr
    r = subprocess.run([str(script), "plan", "--set", "r=x"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("localtune: error: --set r: 'r' must be an integer")
