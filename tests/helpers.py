"""Helpers for driving the `localtune` command in-process, as a person sees it, and a
stand-in for a run's live worker."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator

from localtune import cli
from localtune.runs import RunDir


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `localtune ARGV...`; return (exit code, stdout, stderr)."""
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> str:
    """The single `localtune: error: ...` line a user's mistake must give, with no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("localtune: error: ")
    return lines[0]


@contextmanager
def live_worker(run: RunDir) -> Iterator[subprocess.Popen]:
    """A process that passes for the run's worker (it holds the lock and names
    `localtune.worker` and the run on its command line) and only sleeps."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "localtune.worker",
                             str(run.path)])
    try:
        run.lock_path.write_text(f"{proc.pid}\n")
        yield proc
    finally:
        proc.kill()
        proc.wait()

