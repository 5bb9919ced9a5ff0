"""Where localtune keeps things on disk.

Everything lives under one folder, `$LOCALTUNE_HOME` (default: the platform's user data
folder, e.g. ~/.local/share/localtune on Linux): `runs/` holds one directory per run, `cache/`
holds what can be rebuilt (the built-in model converted to safetensors). Deleting `cache/`
costs only the time to rebuild it; deleting `runs/` loses runs.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    env = os.environ.get("LOCALTUNE_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("localtune", appauthor=False))


def runs_dir() -> Path:
    return home() / "runs"


def cache_dir() -> Path:
    return home() / "cache"
